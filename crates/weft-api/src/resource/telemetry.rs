//! `kind: Telemetry`: what the proxies record of each request beyond metrics (access logs),
//! for the whole mesh, one service or one route, applied live; and its checks.
use super::common::{ApplyError, check_name, check_service_ref};
use super::traffic_policy::{GATEWAY_API_GROUP, PolicyTargetRef};
use serde::{Deserialize, Serialize};

/// `kind: Telemetry` — switches access logs on (or off) without restarting anything.
/// Without `targetRef` it applies to every proxy; with `kind: Service` (the default) to the
/// requests to that service, logged by its callers' sidecars (and the gateway) and by its own
/// instances' sidecars; with `kind: HTTPRoute` to the requests that route matches. The most
/// specific one wins: a route's over its service's, a service's over the mesh's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSpec>,
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
    let Some(log) = &spec.access_log else {
        return Err(ApplyError::new(doc, "spec.accessLog", "missing; a Telemetry says what to log (accessLog)"));
    };
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
