//! `kind: Telemetry`: what the proxies record of each request beyond metrics (access logs and
//! traces), for the whole mesh, one service or one route, applied live; and its checks.
use super::common::{ApplyError, check_name, check_service_ref};
use super::traffic_policy::{GATEWAY_API_GROUP, PolicyTargetRef};
use serde::{Deserialize, Serialize};

/// `kind: Telemetry` — switches access logs and tracing on (or off) without restarting
/// anything. Without `targetRef` it applies to every proxy; with `kind: Service` (the default)
/// to the requests to that service, recorded by its callers' sidecars (and the gateway) and by
/// its own instances' sidecars; with `kind: HTTPRoute` (access logs only) to the requests that
/// route matches. The most specific one wins: a route's over its service's, a service's over
/// the mesh's; access logs and tracing are chosen separately.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
}

/// One JSON object per request, written by the proxy off the request path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLogSpec {
    /// `false` switches logs off where a wider Telemetry switched them on (default `true`).
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// `stderr` (the default), `stdout`, or an absolute file path on the proxy's host (the
    /// proxy appends to it, creating it owner-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Only requests that failed: a 5xx, or a gRPC status other than OK.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub errors_only: bool,
    /// The share of requests logged, a percentage (0 to 100, fractions allowed; default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

/// Spans for each proxy hop, exported over OTLP/gRPC. The sampling decision is taken where a
/// trace starts (the first proxy a request meets without a sampled or unsampled `traceparent`)
/// and followed by every hop after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    /// `false` switches tracing off where a wider Telemetry switched it on (default `true`).
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// The OpenTelemetry collector's OTLP/gRPC address, `host:port` (plaintext). A service's
    /// Telemetry without one uses the mesh's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// The share of new traces sampled, a percentage (0 to 100, fractions allowed; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_percentage: Option<f64>,
}

/// The share of new traces sampled when a Telemetry does not say (as Istio's default).
pub const DEFAULT_TRACE_SAMPLING_PERCENT: f64 = 1.0;

fn enabled() -> bool {
    true
}

impl TelemetrySpec {
    /// The route this Telemetry is for, if it targets one.
    pub fn route(&self) -> Option<&str> {
        self.target_ref.as_ref().filter(|t| t.targets_route()).map(|t| t.name.as_str())
    }

    /// The service this Telemetry is for, if it targets one.
    pub fn service(&self) -> Option<&str> {
        self.target_ref.as_ref().filter(|t| !t.targets_route()).map(|t| t.name.as_str())
    }
}

pub(super) fn validate_telemetry(doc: usize, spec: &TelemetrySpec) -> Result<(), ApplyError> {
    if let Some(t) = &spec.target_ref {
        if t.targets_route() {
            if t.group.as_deref().is_some_and(|g| g != GATEWAY_API_GROUP) {
                return Err(ApplyError::new(
                    doc,
                    "spec.targetRef.group",
                    format!("an HTTPRoute is in group {GATEWAY_API_GROUP}"),
                ));
            }
        } else {
            check_service_ref(doc, "spec.targetRef", t.kind.as_deref(), t.group.as_deref()).map_err(|mut e| {
                e.reason.push_str(
                    " (or kind HTTPRoute, group gateway.networking.k8s.io; or no targetRef for the whole mesh)",
                );
                e
            })?;
        }
        check_name(doc, "spec.targetRef.name", &t.name)?;
    }
    if spec.access_log.is_none() && spec.tracing.is_none() {
        return Err(ApplyError::new(
            doc,
            "spec",
            "says nothing; a Telemetry says what to record (accessLog, tracing or both)",
        ));
    }
    if let Some(tracing) = &spec.tracing {
        validate_tracing(doc, spec, tracing)?;
    }
    let Some(log) = &spec.access_log else { return Ok(()) };
    if let Some(out) = &log.output
        && !matches!(out.as_str(), "stderr" | "stdout")
        && !out.starts_with('/')
    {
        return Err(ApplyError::new(
            doc,
            "spec.accessLog.output",
            format!("{out:?} is neither stderr, stdout nor an absolute file path"),
        ));
    }
    if let Some(p) = log.percentage
        && !(0.0..=100.0).contains(&p)
    {
        return Err(ApplyError::new(doc, "spec.accessLog.percentage", format!("{p} is not between 0 and 100")));
    }
    Ok(())
}

fn validate_tracing(doc: usize, spec: &TelemetrySpec, tracing: &TracingSpec) -> Result<(), ApplyError> {
    if spec.route().is_some() {
        return Err(ApplyError::new(
            doc,
            "spec.tracing",
            "tracing is chosen per service or for the whole mesh, not per route; target the route's service",
        ));
    }
    if let Some(c) = &tracing.collector {
        let valid = c.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.contains('/')
                && port.parse::<u16>().is_ok_and(|p| p != 0)
                && !c.contains(char::is_whitespace)
        });
        if !valid {
            return Err(ApplyError::new(
                doc,
                "spec.tracing.collector",
                format!("{c:?} is not host:port (an OTLP/gRPC collector, e.g. 127.0.0.1:4317)"),
            ));
        }
    }
    if let Some(p) = tracing.sampling_percentage
        && !(0.0..=100.0).contains(&p)
    {
        return Err(ApplyError::new(doc, "spec.tracing.samplingPercentage", format!("{p} is not between 0 and 100")));
    }
    Ok(())
}
