//! `kind: TrafficPolicy`: what callers' sidecars do with traffic to a service or a route
//! (connection pool, retries and their budget, outlier detection, faults, rate limits, active
//! health checks), and its checks.
use super::common::{ApplyError, check_name, check_service_ref};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `kind: TrafficPolicy` — how callers' sidecars treat traffic to a service (Gateway API
/// policy attachment: `targetRef` names the Service). Applies to every caller, each sidecar
/// enforcing it on its own traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target_ref: PolicyTargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Box<OutlierDetection>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Box<FaultInjection>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Box<RateLimitPolicy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<ActiveHealthCheck>>,
}

/// Active health checks: each calling sidecar probes every instance of the service (through
/// the instance's sidecar) and stops sending to one that fails, on top of the registry's
/// health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ActiveHealthCheck {
    /// Between probes of one instance (default 5s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// For one probe (default 1s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Failed probes in a row that take an instance out (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Passed probes in a row that bring it back (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    /// `GET path` answered 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    /// A connection to the instance's sidecar succeeds (mutual TLS included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHealthCheck {
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheck {}

pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Local rate limits, enforced by each of the service's own sidecars on the requests it
/// receives (each instance counts alone): token buckets for the whole service and/or for each
/// caller (its SPIFFE identity under mutual TLS, its source address otherwise). A refused
/// request gets `429` with `Retry-After` (gRPC: RESOURCE_EXHAUSTED).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitPolicy {
    /// For all callers together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<TokenBucket>,
    /// For each caller apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_caller: Option<TokenBucket>,
}

/// `requests` per `interval` (default 1s), with bursts of up to `burst` (default `requests`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenBucket {
    pub requests: u32,
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Faults the callers' sidecars inject into requests to the service, for testing how the
/// system copes: a delay before forwarding, or an answer the proxy makes itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(with = "crate::duration")]
    pub fixed_delay: Duration,
    /// Share of requests delayed, 0 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

/// Answered by the proxy with `httpStatus`, or for gRPC requests `grpcStatus`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// Share of requests aborted, 0 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

/// A percentage (0 to 100, fractions allowed) in parts per million.
pub fn percent_per_million(p: Option<f64>) -> u32 {
    (p.unwrap_or(100.0).clamp(0.0, 100.0) * 10_000.0).round() as u32
}

/// Passive health checking by each calling sidecar: an instance that fails several requests in
/// a row is ejected (not picked) for a while, longer each time it is ejected again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or connect failures, resets) that eject an instance; default 5,
    /// 0 turns this check off.
    #[serde(default, rename = "consecutive5xx", skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502, 503 or 504 answers (or connect failures, resets) that eject an
    /// instance; off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How long the first ejection lasts (default 30s); the n-th ejection in a row lasts n
    /// times as long.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// The longest an ejection lasts (default 300s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<Duration>,
    /// The share of instances that may be ejected at once (default 10); one may always be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// When fewer than this percentage of the instances are left un-ejected, ejections are
    /// ignored and every instance is used (default 50; 0 never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
}

pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// Retries of requests to the service, by the caller's sidecar. Only idempotent requests are
/// retried after they reached an app; a request that never did (connect failure) is retried
/// whatever its method. A body is kept for a retry up to 64 KiB.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first attempt (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Time allowed for each attempt (default: only the route's timeout).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// When to retry (default `[gateway-error, connect-failure, reset]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<RetryBackoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// The largest request body kept, while first sent, for a retry (and for failover and
    /// mirrors on the same routes); default 65536, at most 16 MiB. A larger body is sent once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u32>,
}

pub const MAX_BODY_BYTES_LIMIT: u32 = 16 * 1024 * 1024;

pub const RETRY_ON: [&str; 9] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];
pub const DEFAULT_RETRY_ON: [&str; 3] = ["gateway-error", "connect-failure", "reset"];

/// Exponential backoff with full jitter between retries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBackoff {
    /// Default 25ms.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<Duration>,
    /// Default 10 × baseInterval.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<Duration>,
}

/// Retries in flight at once may be at most `percent` of the requests in flight to the
/// service, or `minRetryConcurrency`, whichever is more (Envoy's retry budget). Without a
/// budget, 20% or 10 (a retry counts while in flight, not while it waits out its backoff).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Envoy's budget: retries in flight at most this percent of the requests in flight...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// ...or this many (default 10), whichever is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retry_concurrency: Option<u32>,
    /// Linkerd's budget: retries over the last `ttl` at most this ratio of the requests sent
    /// in it (0.2: one retry for every five requests)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// ...plus this many per second (default 10), so a quiet service can still retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    /// The window the ratio is counted over (default 10s, 1s to 60s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
}

pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
pub const DEFAULT_RETRY_BUDGET_TTL: Duration = Duration::from_secs(10);

pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// What a TrafficPolicy attaches to: a Service (`kind` unset or `Service`), or one HTTPRoute
/// (`kind: HTTPRoute`), whose rules it then governs instead of the service's policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
}

impl PolicyTargetRef {
    pub fn targets_route(&self) -> bool {
        self.kind.as_deref() == Some("HTTPRoute")
    }

    /// `Service/NAME` or `HTTPRoute/NAME`: one TrafficPolicy per target.
    pub fn key(&self) -> String {
        let kind = if self.targets_route() { "HTTPRoute" } else { "Service" };
        format!("{kind}/{}", self.name)
    }
}

/// Limits each calling sidecar keeps towards the service; a request over a limit is answered
/// at once with 503 `x-weft-error: overflow`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Requests in flight to the service at once (until each response head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// HTTP/1.1 connections each calling sidecar keeps to each instance at most; a request that
    /// finds them all busy waits for one (see `maxPendingRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_instance: Option<u32>,
    /// Requests waiting for a connection at once, across the service's instances (default
    /// 1024); more are answered at once with 503 `overflow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests sent on one upstream connection before it is closed (HTTP/1.1 exchanges or
    /// HTTP/2 streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// A pooled connection unused this long is closed (default: the proxy's
    /// `--upstream-idle-timeout`).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// A connection this old takes no new requests (it closes once its last one is done).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Duration>,
}

/// A TrafficPolicy's own checks: its target, and each of its parts.
pub(super) fn validate_traffic_policy(doc: usize, spec: &TrafficPolicySpec) -> Result<(), ApplyError> {
    if spec.target_ref.targets_route() {
        if spec.target_ref.group.as_deref().is_some_and(|g| g != GATEWAY_API_GROUP) {
            return Err(ApplyError::new(
                doc,
                "spec.targetRef.group",
                format!("an HTTPRoute is in group {GATEWAY_API_GROUP}"),
            ));
        }
        // Only what applies per request can be set for one route.
        let service_wide = [
            ("connectionPool", spec.connection_pool.is_some()),
            ("outlierDetection", spec.outlier_detection.is_some()),
            ("rateLimit", spec.rate_limit.is_some()),
            ("healthCheck", spec.health_check.is_some()),
        ];
        if let Some((field, _)) = service_wide.iter().find(|(_, set)| *set) {
            return Err(ApplyError::new(
                doc,
                format!("spec.{field}"),
                "applies to a whole service: target the Service (a policy for an HTTPRoute takes retry and fault)",
            ));
        }
    } else {
        check_service_ref(doc, "spec.targetRef", spec.target_ref.kind.as_deref(), spec.target_ref.group.as_deref())
            .map_err(|mut e| {
                e.reason.push_str(" (or kind HTTPRoute, group gateway.networking.k8s.io)");
                e
            })?;
    }
    check_name(doc, "spec.targetRef.name", &spec.target_ref.name)?;
    if let Some(r) = &spec.retry {
        validate_retry(doc, r)?;
    }
    if let Some(od) = &spec.outlier_detection {
        validate_outlier(doc, od)?;
    }
    if let Some(f) = &spec.fault {
        validate_fault(doc, f)?;
    }
    if let Some(r) = &spec.rate_limit {
        validate_rate_limit(doc, r)?;
    }
    if let Some(h) = &spec.health_check {
        validate_health_check(doc, h)?;
    }
    if let Some(pool) = &spec.connection_pool {
        if pool.max_pending_requests.is_some() && pool.max_connections_per_instance.is_none() {
            return Err(ApplyError::new(
                doc,
                "spec.connectionPool.maxPendingRequests",
                "requests wait for a connection only under maxConnectionsPerInstance: set it too",
            ));
        }
        if pool.max_connections_per_instance == Some(0) {
            return Err(ApplyError::new(doc, "spec.connectionPool.maxConnectionsPerInstance", "must be at least 1"));
        }
        if pool.max_requests_per_connection == Some(0) {
            return Err(ApplyError::new(doc, "spec.connectionPool.maxRequestsPerConnection", "must be at least 1"));
        }
        for (field, d) in [("idleTimeout", pool.idle_timeout), ("maxConnectionDuration", pool.max_connection_duration)]
        {
            if d.is_some_and(|d| d < Duration::from_millis(100)) {
                return Err(ApplyError::new(doc, format!("spec.connectionPool.{field}"), "must be at least 100ms"));
            }
        }
    }
    if spec.connection_pool.as_ref().and_then(|p| p.max_requests) == Some(0) {
        return Err(ApplyError::new(
            doc,
            "spec.connectionPool.maxRequests",
            "must be at least 1 (0 would refuse every request)",
        ));
    }
    Ok(())
}

fn validate_health_check(doc: usize, h: &ActiveHealthCheck) -> Result<(), ApplyError> {
    let at = |f: &str| format!("spec.healthCheck.{f}");
    match (&h.http, &h.tcp) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ApplyError::new(doc, "spec.healthCheck", "set exactly one of http: {path} and tcp: {}"));
        }
        (Some(http), None) if !http.path.starts_with('/') || http.path.contains(char::is_whitespace) => {
            return Err(ApplyError::new(doc, at("http.path"), "must be a path starting with '/', without spaces"));
        }
        _ => {}
    }
    let interval = h.interval.unwrap_or(DEFAULT_HEALTH_CHECK_INTERVAL);
    let timeout = h.timeout.unwrap_or(DEFAULT_HEALTH_CHECK_TIMEOUT);
    if interval < Duration::from_millis(100) {
        return Err(ApplyError::new(doc, at("interval"), "must be at least 100ms"));
    }
    if timeout.is_zero() || timeout > interval {
        return Err(ApplyError::new(
            doc,
            at("timeout"),
            format!("must be above 0 and at most the interval ({interval:?})"),
        ));
    }
    for (field, v) in [("unhealthyThreshold", h.unhealthy_threshold), ("healthyThreshold", h.healthy_threshold)] {
        if v == Some(0) {
            return Err(ApplyError::new(doc, at(field), "must be at least 1"));
        }
    }
    Ok(())
}

fn validate_rate_limit(doc: usize, r: &RateLimitPolicy) -> Result<(), ApplyError> {
    if r.service.is_none() && r.per_caller.is_none() {
        return Err(ApplyError::new(doc, "spec.rateLimit", "sets neither service nor perCaller"));
    }
    for (field, b) in [("service", &r.service), ("perCaller", &r.per_caller)] {
        let Some(b) = b else { continue };
        let at = |f: &str| format!("spec.rateLimit.{field}.{f}");
        if b.requests == 0 {
            return Err(ApplyError::new(doc, at("requests"), "must be at least 1"));
        }
        let interval = b.interval.unwrap_or(Duration::from_secs(1));
        if interval < Duration::from_millis(10) {
            return Err(ApplyError::new(doc, at("interval"), "must be at least 10ms"));
        }
        if interval.as_nanos() / u128::from(b.requests) == 0 {
            return Err(ApplyError::new(doc, at("requests"), "more than one request per nanosecond"));
        }
        if b.burst == Some(0) {
            return Err(ApplyError::new(doc, at("burst"), "must be at least 1"));
        }
    }
    Ok(())
}

fn validate_fault(doc: usize, f: &FaultInjection) -> Result<(), ApplyError> {
    let at = |field: &str| format!("spec.fault.{field}");
    let percentage = |field: &str, p: Option<f64>| match p {
        Some(p) if !(0.0..=100.0).contains(&p) => {
            Err(ApplyError::new(doc, at(field), format!("{p} is not a percentage (0 to 100)")))
        }
        _ => Ok(()),
    };
    if f.delay.is_none() && f.abort.is_none() {
        return Err(ApplyError::new(doc, "spec.fault", "sets neither delay nor abort"));
    }
    if let Some(d) = &f.delay {
        if d.fixed_delay.is_zero() {
            return Err(ApplyError::new(doc, at("delay.fixedDelay"), "must be greater than 0"));
        }
        percentage("delay.percentage", d.percentage)?;
    }
    if let Some(a) = &f.abort {
        match (a.http_status, a.grpc_status) {
            (None, None) => {
                return Err(ApplyError::new(doc, at("abort"), "set httpStatus (200-599) or grpcStatus (1-16)"));
            }
            // Envoy's abort carries one status, which every request it aborts gets.
            (Some(_), Some(_)) => {
                return Err(ApplyError::new(
                    doc,
                    at("abort"),
                    "set httpStatus or grpcStatus, not both: an abort answers with one status (HTTP requests get a grpcStatus abort as 503, gRPC requests an httpStatus abort as its gRPC code)",
                ));
            }
            (Some(s), _) if !(200..=599).contains(&s) => {
                return Err(ApplyError::new(
                    doc,
                    at("abort.httpStatus"),
                    format!("{s} is not an HTTP status (200-599)"),
                ));
            }
            (_, Some(g)) if !(1..=16).contains(&g) => {
                return Err(ApplyError::new(
                    doc,
                    at("abort.grpcStatus"),
                    format!("{g} is not a gRPC error status (1-16)"),
                ));
            }
            _ => {}
        }
        percentage("abort.percentage", a.percentage)?;
    }
    Ok(())
}

fn validate_outlier(doc: usize, od: &OutlierDetection) -> Result<(), ApplyError> {
    let at = |f: &str| format!("spec.outlierDetection.{f}");
    if od.consecutive_5xx == Some(0) && od.consecutive_gateway_errors.is_none_or(|n| n == 0) {
        return Err(ApplyError::new(
            doc,
            at("consecutive5xx"),
            "is 0 and consecutiveGatewayErrors is not set: nothing would eject an instance (remove outlierDetection instead)",
        ));
    }
    if od.consecutive_gateway_errors == Some(0) {
        return Err(ApplyError::new(
            doc,
            at("consecutiveGatewayErrors"),
            "must be at least 1 (leave it out to turn it off)",
        ));
    }
    for (field, p) in [("maxEjectionPercent", od.max_ejection_percent), ("panicThreshold", od.panic_threshold)] {
        if p.is_some_and(|p| p > 100) {
            return Err(ApplyError::new(doc, at(field), format!("{} is not a percentage (0 to 100)", p.unwrap_or(0))));
        }
    }
    let base = od.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION_TIME);
    if base < Duration::from_millis(10) {
        return Err(ApplyError::new(doc, at("baseEjectionTime"), "must be at least 10ms"));
    }
    let max = od.max_ejection_time.unwrap_or(DEFAULT_MAX_EJECTION_TIME.max(base));
    if max < base {
        return Err(ApplyError::new(
            doc,
            at("maxEjectionTime"),
            format!("{max:?} is shorter than baseEjectionTime ({base:?})"),
        ));
    }
    Ok(())
}

fn validate_retry(doc: usize, r: &RetryPolicy) -> Result<(), ApplyError> {
    if r.max_body_bytes.is_some_and(|b| b > MAX_BODY_BYTES_LIMIT) {
        return Err(ApplyError::new(
            doc,
            "spec.retry.maxBodyBytes",
            format!("at most {MAX_BODY_BYTES_LIMIT} (16 MiB): each request in flight may hold this much"),
        ));
    }
    if r.attempts.is_some_and(|a| a > 10) {
        return Err(ApplyError::new(doc, "spec.retry.attempts", "at most 10 retries"));
    }
    if r.per_try_timeout.is_some_and(|t| t.is_zero()) {
        return Err(ApplyError::new(doc, "spec.retry.perTryTimeout", "must be greater than 0"));
    }
    for (i, on) in r.retry_on.iter().enumerate() {
        if !RETRY_ON.contains(&on.as_str()) {
            return Err(ApplyError::new(
                doc,
                format!("spec.retry.retryOn[{i}]"),
                format!("{on:?} is not a retry condition; use {}", RETRY_ON.join(", ")),
            ));
        }
    }
    if let Some(b) = &r.backoff {
        let base = b.base_interval.unwrap_or(Duration::from_millis(25));
        if base.is_zero() {
            return Err(ApplyError::new(doc, "spec.retry.backoff.baseInterval", "must be greater than 0"));
        }
        if b.max_interval.is_some_and(|m| m < base) {
            return Err(ApplyError::new(doc, "spec.retry.backoff.maxInterval", "must not be less than baseInterval"));
        }
    }
    if let Some(b) = &r.budget {
        let at = |f: &str| format!("spec.retry.budget.{f}");
        match (b.percent, b.ratio) {
            (Some(_), Some(_)) => {
                return Err(ApplyError::new(
                    doc,
                    "spec.retry.budget",
                    "set percent (retries in flight, as Envoy) or ratio (retries per request over a window, as Linkerd), not both",
                ));
            }
            (None, None) => {
                return Err(ApplyError::new(
                    doc,
                    "spec.retry.budget",
                    "sets neither percent (retries in flight, as Envoy) nor ratio (retries per request over a window, as Linkerd): set one",
                ));
            }
            (Some(p), None) => {
                if !(p > 0.0 && p <= 100.0) {
                    return Err(ApplyError::new(doc, at("percent"), "must be more than 0 and at most 100"));
                }
                if b.min_retries_per_second.is_some() || b.ttl.is_some() {
                    return Err(ApplyError::new(doc, at("percent"), "minRetriesPerSecond and ttl go with ratio"));
                }
            }
            (None, Some(ratio)) => {
                if !(ratio > 0.0 && ratio <= 10.0) {
                    return Err(ApplyError::new(doc, at("ratio"), "must be more than 0 and at most 10"));
                }
                if b.min_retry_concurrency.is_some() {
                    return Err(ApplyError::new(doc, at("minRetryConcurrency"), "goes with percent, not ratio"));
                }
                if b.ttl.is_some_and(|t| t < Duration::from_secs(1) || t > Duration::from_secs(60)) {
                    return Err(ApplyError::new(doc, at("ttl"), "must be between 1s and 60s"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_documents;

    fn err(text: &str) -> ApplyError {
        parse_documents(text).unwrap_err()
    }

    #[test]
    fn traffic_policy_values_are_checked() {
        let policy = |spec: &str| {
            err(&format!(
                "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: backend}}\n  {spec}\n"
            ))
        };
        let e = policy("outlierDetection: {consecutive5xx: 0}");
        assert_eq!(e.path, "spec.outlierDetection.consecutive5xx");
        let e = policy("outlierDetection: {maxEjectionPercent: 120}");
        assert_eq!(e.path, "spec.outlierDetection.maxEjectionPercent");
        let e = policy("outlierDetection: {baseEjectionTime: 1m, maxEjectionTime: 30s}");
        assert_eq!(e.path, "spec.outlierDetection.maxEjectionTime");
        assert!(e.reason.contains("shorter than baseEjectionTime"), "{e}");
        let e = policy("outlierDetection: {consecutiveGatewayErrors: 0}");
        assert_eq!(e.path, "spec.outlierDetection.consecutiveGatewayErrors");
        let e = policy("retry: {retryOn: [sometimes]}");
        assert_eq!(e.path, "spec.retry.retryOn[0]");
        let ok = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  targetRef: {name: backend}\n  outlierDetection: {consecutive5xx: 0, consecutiveGatewayErrors: 3}\n";
        assert!(parse_documents(ok).is_ok());
    }
}
