//! Tracing, from an HTTP connection manager's `tracing`: Envoy's OpenTelemetry tracer, exporting
//! over OTLP/gRPC to a `google_grpc` target (the collector's `host:port`), and the share of new
//! traces sampled (`random_sampling`). Anything else (another tracer, an `envoy_grpc` cluster,
//! an HTTP exporter, a sampler extension, custom tags, client or overall sampling) is refused:
//! the proxy would trace other requests, or send spans elsewhere, than was asked.
use super::decode::{decode, duration, ser_duration};
use super::schema;
use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing::http::ConfigType};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use prost::Name;
use serde::Serialize;
use std::time::Duration;
use weft_api::names::OTEL_TRACER;

/// A listener's tracing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TracingDef {
    /// The OTLP/gRPC collector, `host:port` (plaintext).
    pub collector: String,
    /// The share of new traces sampled, per million (Envoy's default: all of them).
    pub sampling_per_million: u32,
    /// The spans' `service.name`; empty for the proxy's own service.
    pub service_name: String,
    /// How long one export may take (default 5 s).
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn tracing(t: &Tracing) -> Result<TracingDef, String> {
    let provider = t.provider.as_ref().ok_or("tracing needs a provider (envoy.tracers.opentelemetry)")?;
    let Some(ConfigType::TypedConfig(cfg)) = &provider.config_type else {
        return Err(format!("tracing provider {:?} needs a typed_config", provider.name));
    };
    if cfg.type_url != OpenTelemetryConfig::type_url() {
        return Err(format!("tracer {} is not supported (only {OTEL_TRACER})", cfg.type_url));
    }
    schema::check(&cfg.value, &schema::OPEN_TELEMETRY, "tracing.provider.typed_config")?;
    let otel: OpenTelemetryConfig = decode(cfg, "Listener").map_err(|e| e.reason)?;
    let grpc = otel.grpc_service.as_ref().ok_or("the OpenTelemetry tracer needs a grpc_service")?;
    let Some(TargetSpecifier::GoogleGrpc(target)) = &grpc.target_specifier else {
        return Err("the OpenTelemetry tracer's grpc_service must be google_grpc with the collector's host:port".into());
    };
    if !valid_target(&target.target_uri) {
        return Err(format!("tracing collector {:?} is not host:port", target.target_uri));
    }
    let sampling_per_million = match &t.random_sampling {
        None => 1_000_000,
        Some(p) if (0.0..=100.0).contains(&p.value) => (p.value * 10_000.0).round() as u32,
        Some(p) => return Err(format!("tracing random_sampling {} is not a percentage", p.value)),
    };
    Ok(TracingDef {
        collector: target.target_uri.clone(),
        sampling_per_million,
        service_name: otel.service_name,
        timeout: grpc.timeout.as_ref().map_or(DEFAULT_TIMEOUT, duration),
    })
}

/// `host:port` with a port above 0 (a bracketed IPv6 address is a host).
fn valid_target(t: &str) -> bool {
    t.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && port.parse::<u16>().is_ok_and(|p| p != 0)
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:_".contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{GrpcService, grpc_service};
    use envoy_types::pb::envoy::config::trace::v3::tracing;
    use envoy_types::pb::envoy::r#type::v3::Percent;
    use envoy_types::util::pack_any;

    fn otel(target: TargetSpecifier) -> Tracing {
        let cfg = OpenTelemetryConfig {
            grpc_service: Some(GrpcService { target_specifier: Some(target), ..Default::default() }),
            service_name: "frontend".into(),
            ..Default::default()
        };
        Tracing {
            random_sampling: Some(Percent { value: 12.5 }),
            provider: Some(tracing::Http {
                name: OTEL_TRACER.into(),
                config_type: Some(ConfigType::TypedConfig(pack_any(cfg))),
            }),
            ..Default::default()
        }
    }

    fn google(uri: &str) -> TargetSpecifier {
        TargetSpecifier::GoogleGrpc(grpc_service::GoogleGrpc { target_uri: uri.into(), ..Default::default() })
    }

    #[test]
    fn decodes_the_collector_and_sampling() {
        let def = tracing(&otel(google("127.0.0.1:4317"))).unwrap();
        assert_eq!(def.collector, "127.0.0.1:4317");
        assert_eq!(def.sampling_per_million, 125_000);
        assert_eq!(def.service_name, "frontend");
        assert_eq!(def.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let cluster =
            TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc { cluster_name: "otel".into(), ..Default::default() });
        assert!(tracing(&otel(cluster)).unwrap_err().contains("google_grpc"));
        assert!(tracing(&otel(google("collector"))).unwrap_err().contains("not host:port"));
        let mut sampler = otel(google("127.0.0.1:4317"));
        let Some(ConfigType::TypedConfig(any)) = &mut sampler.provider.as_mut().unwrap().config_type else {
            unreachable!()
        };
        let mut cfg: OpenTelemetryConfig = decode(any, "Listener").unwrap();
        cfg.max_cache_size = Some(envoy_types::pb::google::protobuf::UInt32Value { value: 10 });
        *any = pack_any(cfg);
        assert!(tracing(&sampler).unwrap_err().contains("max_cache_size"));
        let mut over = otel(google("127.0.0.1:4317"));
        over.random_sampling = Some(Percent { value: 150.0 });
        assert!(tracing(&over).unwrap_err().contains("not a percentage"));
    }
}
