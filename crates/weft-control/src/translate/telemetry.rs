//! Telemetry resources as the HTTP connection managers' `access_log` and `tracing` (decoded by
//! the proxy's config/access_log.rs and config/tracing.rs; the round trip is tested in
//! translate/roundtrip.rs).
//!
//! A service's listeners (its instances' inbound one, and every caller's outbound one for it)
//! log as the service's Telemetry says, or the mesh's when it has none. A route's Telemetry
//! applies where routes are evaluated, on the callers' outbound listeners: requests matched by
//! that route are logged as it says, and the service's (or mesh's) log leaves them out.
//!
//! Tracing likewise follows the service's Telemetry or the mesh's, with the mesh's collector
//! when the service's names none; it is encoded as Envoy's OpenTelemetry tracer with a
//! `google_grpc` target (the collector's address), so no cluster is needed for it.
use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLog, AccessLogFilter, AndFilter, ComparisonFilter, ExtensionFilter, GrpcStatusFilter, OrFilter,
    RuntimeFilter, StatusCodeFilter, access_log, access_log_filter, comparison_filter, extension_filter,
    grpc_status_filter,
};
use envoy_types::pb::envoy::config::core::v3::{GrpcService, RuntimeUInt32, grpc_service};
use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
use envoy_types::pb::envoy::extensions::access_loggers::filters::cel::v3::ExpressionFilter;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{StderrAccessLog, StdoutAccessLog};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Percent, fractional_percent};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::util::pack_any;
use std::collections::{BTreeMap, HashMap};
use weft_api::names::OTEL_TRACER;
use weft_api::resource::{
    AccessLogSpec, DEFAULT_TRACE_SAMPLING_PERCENT, HttpRouteSpec, Resource, TracingSpec, percent_per_million,
};

/// The Telemetry resources in force; the first by name wins for each target.
#[derive(Debug, Default)]
pub(super) struct Telemetry {
    mesh: Option<AccessLogSpec>,
    services: HashMap<String, AccessLogSpec>,
    /// By route name: the route's Telemetry and the services the route is for.
    routes: BTreeMap<String, (AccessLogSpec, Vec<String>)>,
    mesh_tracing: Option<TracingSpec>,
    service_tracing: HashMap<String, TracingSpec>,
}

/// What one HTTP connection manager records beyond metrics.
#[derive(Debug, Default)]
pub(super) struct HcmTelemetry {
    pub access_log: Vec<AccessLog>,
    pub tracing: Option<Tracing>,
}

/// Which of a listener's requests one access log takes, by the route they matched.
enum Scope<'a> {
    All,
    Route(&'a str),
    Except(Vec<&'a str>),
}

impl Telemetry {
    pub(super) fn new<'a>(
        resources: &BTreeMap<String, Resource>,
        routes: impl Iterator<Item = (&'a str, &'a HttpRouteSpec)> + Clone,
    ) -> Telemetry {
        let mut logs = Telemetry::default();
        for r in resources.values() {
            let Resource::Telemetry(t) = r else { continue };
            if let Some(spec) = &t.spec.tracing {
                match t.spec.service() {
                    Some(service) => {
                        logs.service_tracing.entry(service.to_owned()).or_insert_with(|| spec.clone());
                    }
                    None => {
                        logs.mesh_tracing.get_or_insert_with(|| spec.clone());
                    }
                }
            }
            let Some(spec) = &t.spec.access_log else { continue };
            if let Some(route) = t.spec.route() {
                let parents = routes
                    .clone()
                    .filter(|(name, _)| *name == route)
                    .flat_map(|(_, r)| r.parent_refs.iter().map(|p| p.name.clone()))
                    .collect();
                logs.routes.entry(route.to_owned()).or_insert((spec.clone(), parents));
            } else if let Some(service) = t.spec.service() {
                logs.services.entry(service.to_owned()).or_insert_with(|| spec.clone());
            } else if logs.mesh.is_none() {
                logs.mesh = Some(spec.clone());
            }
        }
        logs
    }

    /// What a listener carrying `service`'s traffic records; `routed` when its requests are
    /// routed by the service's HTTPRoutes (callers' outbound listeners); `own` is the service
    /// of the proxy the listener is on (its spans' `service.name`).
    pub(super) fn for_listener(&self, service: &str, routed: bool, own: &str) -> HcmTelemetry {
        HcmTelemetry { access_log: self.access_logs(service, routed), tracing: self.tracing(service, own) }
    }

    fn tracing(&self, service: &str, own: &str) -> Option<Tracing> {
        let spec = self.service_tracing.get(service).or(self.mesh_tracing.as_ref()).filter(|t| t.enabled)?;
        // A service's Telemetry without a collector exports to the mesh's; with none at all
        // there is nowhere to send spans (`weft check` warns).
        let collector = spec.collector.as_ref().or(self.mesh_tracing.as_ref()?.collector.as_ref())?;
        let otel = OpenTelemetryConfig {
            grpc_service: Some(GrpcService {
                timeout: Some(PbDuration { seconds: 5, nanos: 0 }),
                target_specifier: Some(grpc_service::TargetSpecifier::GoogleGrpc(grpc_service::GoogleGrpc {
                    target_uri: collector.clone(),
                    stat_prefix: "weft_tracing".to_owned(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            service_name: own.to_owned(),
            ..Default::default()
        };
        Some(Tracing {
            random_sampling: Some(Percent {
                value: spec.sampling_percentage.unwrap_or(DEFAULT_TRACE_SAMPLING_PERCENT),
            }),
            provider: Some(tracing::Http {
                name: OTEL_TRACER.to_owned(),
                config_type: Some(tracing::http::ConfigType::TypedConfig(pack_any(otel))),
            }),
            ..Default::default()
        })
    }

    fn access_logs(&self, service: &str, routed: bool) -> Vec<AccessLog> {
        let own: Vec<(&str, &AccessLogSpec)> = if routed {
            let mut own: Vec<(&str, &AccessLogSpec)> = self
                .routes
                .iter()
                .filter(|(_, (_, parents))| parents.iter().any(|p| p == service))
                .map(|(name, (spec, _))| (name.as_str(), spec))
                .collect();
            own.sort_by_key(|(name, _)| *name);
            own
        } else {
            Vec::new()
        };
        let mut out: Vec<AccessLog> =
            own.iter().filter(|(_, s)| s.enabled).map(|(name, spec)| access_log(spec, Scope::Route(name))).collect();
        if let Some(base) = self.services.get(service).or(self.mesh.as_ref()).filter(|s| s.enabled) {
            let scope = if own.is_empty() { Scope::All } else { Scope::Except(own.iter().map(|(n, _)| *n).collect()) };
            out.push(access_log(base, scope));
        }
        out
    }
}

fn access_log(spec: &AccessLogSpec, scope: Scope<'_>) -> AccessLog {
    let (name, config) = match spec.output.as_deref() {
        None | Some("stderr") => ("envoy.access_loggers.stderr", pack_any(StderrAccessLog::default())),
        Some("stdout") => ("envoy.access_loggers.stdout", pack_any(StdoutAccessLog::default())),
        Some(path) => {
            ("envoy.access_loggers.file", pack_any(FileAccessLog { path: path.to_owned(), ..Default::default() }))
        }
    };
    let mut filters = Vec::new();
    if spec.errors_only {
        filters.push(filter(access_log_filter::FilterSpecifier::OrFilter(OrFilter {
            filters: vec![
                filter(access_log_filter::FilterSpecifier::StatusCodeFilter(StatusCodeFilter {
                    comparison: Some(ComparisonFilter {
                        op: comparison_filter::Op::Ge as i32,
                        value: Some(RuntimeUInt32 { default_value: 500, runtime_key: String::new() }),
                    }),
                })),
                filter(access_log_filter::FilterSpecifier::GrpcStatusFilter(GrpcStatusFilter {
                    statuses: vec![grpc_status_filter::Status::Ok as i32],
                    exclude: true,
                })),
            ],
        })));
    }
    if spec.percentage.is_some_and(|p| p < 100.0) {
        filters.push(filter(access_log_filter::FilterSpecifier::RuntimeFilter(RuntimeFilter {
            runtime_key: "weft.access_log.percentage".to_owned(),
            percent_sampled: Some(FractionalPercent {
                numerator: percent_per_million(spec.percentage),
                denominator: fractional_percent::DenominatorType::Million as i32,
            }),
            use_independent_randomness: true,
        })));
    }
    let expression = match scope {
        Scope::All => None,
        Scope::Route(name) => Some(format!("xds.route_name == '{name}'")),
        Scope::Except(names) => {
            Some(names.iter().map(|n| format!("xds.route_name != '{n}'")).collect::<Vec<_>>().join(" && "))
        }
    };
    if let Some(expression) = expression {
        filters.push(filter(access_log_filter::FilterSpecifier::ExtensionFilter(ExtensionFilter {
            name: "envoy.access_loggers.extension_filters.cel".to_owned(),
            config_type: Some(extension_filter::ConfigType::TypedConfig(pack_any(ExpressionFilter {
                expression,
                ..Default::default()
            }))),
        })));
    }
    let filter = match filters.len() {
        0 => None,
        1 => filters.pop(),
        _ => Some(filter(access_log_filter::FilterSpecifier::AndFilter(AndFilter { filters }))),
    };
    AccessLog { name: name.to_owned(), filter, config_type: Some(access_log::ConfigType::TypedConfig(config)) }
}

fn filter(f: access_log_filter::FilterSpecifier) -> AccessLogFilter {
    AccessLogFilter { filter_specifier: Some(f) }
}
