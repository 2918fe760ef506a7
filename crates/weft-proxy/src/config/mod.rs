//! The proxy's configuration model, decoded and validated from xDS resources.
//!
//! Invariant: config fails closed. A resource is accepted only if the proxy honours every field
//! set in it; anything it would otherwise have to ignore (an HTTP filter such as RBAC, a TLS
//! transport socket, a retry policy, a filter-chain match on source addresses) makes the whole
//! update a NACK naming the field, and the previous configuration stays in force. A proxy that
//! silently dropped a security filter would fail open.
use crate::authz::{self, Authz};
use crate::jwt::JwtAuthn;
use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds as cluster_thresholds;
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Address, HealthStatus, TrafficDirection, address, socket_address};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as CoreHeaderValue, HeaderValueOption, header_value_option,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    RedirectAction, RouteConfiguration, header_matcher, query_parameter_matcher, redirect_action, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::JwtAuthentication;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_connection_manager::PathWithEscapedSlashesAction, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::maglev::v3::Maglev;
use envoy_types::pb::envoy::extensions::load_balancing_policies::random::v3::Random;
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::{Any, UInt32Value, value};
use prost::{Message, Name};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use weft_api::names;
use weft_api::resource::{DEFAULT_CONNECT_TIMEOUT, LoadBalancer};

mod fields;
mod schema;
pub mod tls;

pub use tls::{DownstreamTlsDef, UpstreamTlsDef};

/// Which way a listener's traffic flows, from `Listener.traffic_direction`: inbound traffic
/// comes from other services to the local app, outbound traffic from the local app to others.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue, Serialize)]
#[allow(non_camel_case_types)] // label values are written as-is
pub enum Direction {
    inbound,
    outbound,
}

/// What to do with `%2F` and `%5C` in a path (Envoy's `path_with_escaped_slashes_action`):
/// the same setting as a `Service`'s `escapedSlashes`.
pub use weft_api::resource::EscapedSlashes;

/// How many endpoints a request may be tried on when they fail without it being processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failover {
    /// Endpoints tried per request or connection, the first one included.
    pub max_endpoints: usize,
}

impl Default for Failover {
    /// The first endpoint plus two others.
    fn default() -> Self {
        Failover { max_endpoints: 3 }
    }
}

/// Why a resource was rejected; the text goes back to the control plane in the NACK.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {name:?}: {reason}")]
pub struct InvalidResource {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

fn invalid(kind: &'static str, name: &str, reason: impl Into<String>) -> InvalidResource {
    InvalidResource { kind, name: name.to_owned(), reason: reason.into() }
}

/// Why an xDS update was rejected as a whole (NACK). Nothing of a rejected update is applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Invalid(#[from] InvalidResource),
    #[error("Listener {name:?}: cannot bind {address}: {source} (is another process using the port?)")]
    Bind { name: String, address: SocketAddr, source: std::io::Error },
    #[error("weft does not handle resource type {0}")]
    UnsupportedType(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListenerDef {
    pub name: String,
    pub address: SocketAddr,
    /// From `Listener.traffic_direction`, which must be set.
    pub direction: Direction,
    /// The service whose traffic this listener carries: the `stat_prefix` of its HTTP
    /// connection manager or tcp_proxy (for metrics and logs).
    pub service: String,
    pub http: Option<HttpDef>,
    /// From the HTTP connection manager's `path_with_escaped_slashes_action`. Paths are
    /// always normalised (`normalize_path` and `merge_slashes` are taken as set).
    pub escaped_slashes: EscapedSlashes,
    pub tcp_cluster: Option<String>,
    /// From tcp_proxy's `max_connect_attempts`: endpoints tried per connection.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_failover")]
    pub tcp_failover: Option<Failover>,
    /// TLS termination for chains matched on `transport_protocol: tls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<DownstreamTlsDef>,
    /// Whether plaintext connections have a chain (false: a TLS-only listener closes them).
    pub plaintext: bool,
    /// JWT authentication (HTTP chains) and authorization (the RBAC filters, the same on
    /// every chain).
    #[serde(flatten)]
    pub policy: Arc<InboundPolicyDef>,
}

/// What an inbound listener checks before a request or connection reaches the app, as
/// decoded; the runtime puts a [`crate::inbound::InboundPolicy`] built from it in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InboundPolicyDef {
    /// From the HTTP connection manager's `jwt_authn` filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Arc<JwtAuthn>>,
    /// From the RBAC filters (the same on every chain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
    /// From the `local_ratelimit` HTTP filter (after JWT and RBAC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitDef>,
}

/// Envoy's token bucket: up to `max_tokens`, refilled with `tokens_per_fill` every
/// `fill_interval` (here continuously, at the same rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BucketDef {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    #[serde(serialize_with = "ser_duration")]
    pub fill_interval: Duration,
}

impl BucketDef {
    /// The time one token takes to come back (more than zero).
    pub fn period(&self) -> Result<Duration, String> {
        let period = self.fill_interval / self.tokens_per_fill.max(1);
        if period.is_zero() {
            return Err(format!("token_bucket: fill_interval {:?} is too short", self.fill_interval));
        }
        Ok(period)
    }

    /// The most tokens the bucket holds (at least one).
    pub fn burst(&self) -> Result<std::num::NonZeroU32, String> {
        std::num::NonZeroU32::new(self.max_tokens).ok_or_else(|| "token_bucket: max_tokens must be at least 1".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimitDef {
    /// The listener's bucket, consumed by every request when `always_consume_service` (or
    /// when there is no per-caller bucket).
    pub service: BucketDef,
    pub always_consume_service: bool,
    pub per_caller: Option<BucketDef>,
    /// gRPC requests refused get RESOURCE_EXHAUSTED (else UNAVAILABLE).
    pub grpc_resource_exhausted: bool,
}

fn ser_failover<S: serde::Serializer>(f: &Option<Failover>, s: S) -> Result<S::Ok, S::Error> {
    match f {
        Some(f) => s.serialize_u64(f.max_endpoints as u64),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpDef {
    Rds(String),
    Inline(RouteDef),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteDef {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHostDef>,
}

impl RouteDef {
    /// A table with one virtual host for every domain.
    pub fn any_host(name: &str, rules: Vec<RuleDef>) -> RouteDef {
        RouteDef { name: name.into(), virtual_hosts: vec![VirtualHostDef { domains: vec!["*".into()], rules }] }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VirtualHostDef {
    /// `*`, an exact host, `*.suffix` or `prefix*`; the request's host without its port.
    pub domains: Vec<String>,
    pub rules: Vec<RuleDef>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RuleDef {
    pub path: PathDef,
    /// `:method` for the method.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, StrMatch)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<(String, StrMatch)>,
    /// (cluster, weight)
    pub backends: Vec<(String, u32)>,
    /// `RouteAction.timeout`: the time allowed from the request's arrival until the response
    /// head; `None` (unset or zero) for no limit.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_duration")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    #[serde(skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
    #[serde(skip_serializing_if = "Rewrite::is_empty")]
    pub rewrite: Rewrite,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryDef>,
    /// From `request_mirror_policies`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorDef>,
    /// From the route's `typed_per_filter_config` for the fault filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultDef>,
    /// From `hash_policy`: what consistent-hash load balancing hashes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hash: Vec<HashDef>,
    /// From `request_body_buffer_limit`: the largest request body kept for a retry, a
    /// failover or a mirror (default 64 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_limit: Option<u32>,
    /// A redirect route (Envoy's `redirect` action) answers instead of forwarding; it has no
    /// backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectDef>,
}

/// Where a redirect points; unset parts are the request's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedirectDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Replaces the whole path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_path: Option<String>,
    /// Replaces the matched prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    pub status: u16,
}

/// One source of a request's consistent-hash key; several combine (Envoy's rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashDef {
    Header(String),
    Cookie(String),
    SourceIp,
}

/// A copy of a share of the rule's requests goes to `cluster`; its answers are dropped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MirrorDef {
    pub cluster: String,
    pub per_million: u32,
}

/// Faults injected into a share of the rule's requests (each share in parts per million).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelayDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbortDef>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDelayDef {
    #[serde(serialize_with = "ser_duration")]
    pub delay: Duration,
    pub per_million: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultAbortDef {
    /// The HTTP status answered (gRPC requests get `grpc` if set, else the status's gRPC code).
    pub http: Option<u16>,
    pub grpc: Option<u8>,
    pub per_million: u32,
}

/// From `RouteAction.retry_policy`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryDef {
    /// Retries after the first attempt.
    pub retries: u32,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_duration")]
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    #[serde(serialize_with = "ser_duration")]
    pub base_interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub max_interval: Duration,
}

/// The conditions of `retry_on` weft honours.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx answer, a reset, a connect failure or a per-try timeout.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504 or a per-try timeout.
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    /// gRPC status codes from `cancelled`, `deadline-exceeded`, `internal`,
    /// `resource-exhausted`, `unavailable`.
    pub grpc: Vec<u8>,
}

impl RetryOn {
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for c in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match c {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                other => return Err(format!("retry_on {other:?} is not supported")),
            }
        }
        Ok(on)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathDef {
    Prefix(String),
    Exact(String),
    Regex(String),
}

impl Default for PathDef {
    fn default() -> Self {
        PathDef::Prefix("/".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StrMatch {
    Exact(String),
    /// RE2 syntax, matching the whole value.
    Regex(String),
}

/// Headers a route sets (replacing), adds (appending) and removes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HeaderEdits {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// What a route changes in the request's target before forwarding it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rewrite {
    /// Replaces the matched path prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Replaces the whole path (the query stays).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl Rewrite {
    pub fn is_empty(&self) -> bool {
        self.prefix.is_none() && self.full_path.is_none() && self.host.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterDef {
    pub name: String,
    pub load_balancer: LoadBalancer,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Endpoints given inline (static clusters); EDS clusters get theirs separately.
    pub static_endpoints: Option<Vec<EndpointDef>>,
    /// TLS origination towards the endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTlsDef>,
    /// The HTTP version spoken to the endpoints.
    pub protocol: UpstreamProtocol,
    /// From `circuit_breakers`: requests in flight at once; more are refused (`overflow`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    pub retry_limit: RetryLimit,
    /// From `outlier_detection` and `common_lb_config.healthy_panic_threshold`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierDef>,
    /// From `health_checks` (at most one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckDef>,
    /// From the protocol options' `common_http_protocol_options`.
    pub pool: PoolDef,
}

/// Limits on the upstream connections of a cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolDef {
    /// From `circuit_breakers.per_host_thresholds`: HTTP/1.1 connections to each endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_endpoint: Option<u32>,
    /// From `circuit_breakers.thresholds`: requests waiting for a connection, cluster-wide.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_duration")]
    pub max_connection_duration: Option<Duration>,
}

/// Active health checking of the cluster's endpoints by this proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheckDef {
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// `GET` this path, 2xx healthy; `None`: a connection (with its TLS handshake) is enough.
    pub http_path: Option<String>,
}

/// When an endpoint is ejected for failing, and for how long (Envoy's consecutive-5xx and
/// consecutive-gateway-failure detection).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OutlierDef {
    /// 5xx answers (or local failures) in a row that eject; `None`: not checked.
    pub consecutive_5xx: Option<u32>,
    /// 502/503/504 answers (or local failures) in a row that eject; `None`: not checked.
    pub consecutive_gateway: Option<u32>,
    #[serde(serialize_with = "ser_duration")]
    pub base_ejection: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub max_ejection: Duration,
    /// At most this percentage of the endpoints is ejected at once (at least one may be).
    pub max_ejection_percent: u32,
    /// Below this percentage of un-ejected endpoints, ejections are ignored.
    pub panic_threshold: f64,
}

/// How many retries may be in flight at once (from `circuit_breakers`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryLimit {
    /// `max_retries` (Envoy's default: 3).
    Fixed(u32),
    /// `retry_budget`: this percent of the requests in flight, at least `min` (default 3).
    Budget { percent: f64, min: u32 },
    /// From the cluster's `weft` metadata (`retry_budget`): over the last `ttl`, retries at
    /// most `ratio` × requests + `min_per_second` × the window's seconds (Linkerd's budget).
    Ratio {
        ratio: f64,
        min_per_second: u32,
        #[serde(serialize_with = "ser_duration")]
        ttl: Duration,
    },
}

impl Default for RetryLimit {
    fn default() -> Self {
        RetryLimit::Fixed(3)
    }
}

/// From the cluster's `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// The client's version (`use_downstream_protocol_config`, or no options).
    #[default]
    Downstream,
    /// HTTP/1.1 whatever the client speaks (`explicit_http_config.http_protocol_options`).
    Http1,
    /// HTTP/2 (h2c or, through TLS, h2) whatever the client speaks
    /// (`explicit_http_config.http2_protocol_options`).
    Http2,
}

pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The upstream HTTP version from a cluster's protocol options, refusing any option weft would
/// have to ignore.
fn upstream_protocol(c: &Cluster) -> Result<(UpstreamProtocol, PoolDef), String> {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    };
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
    let mut out = UpstreamProtocol::Downstream;
    let mut pool = PoolDef::default();
    for (key, any) in &c.typed_extension_protocol_options {
        if key != HTTP_PROTOCOL_OPTIONS || any.type_url != HttpProtocolOptions::type_url() {
            return Err(format!(
                "typed_extension_protocol_options {key:?} is not supported (only {HTTP_PROTOCOL_OPTIONS})"
            ));
        }
        let opts = HttpProtocolOptions::decode(any.value.as_slice())
            .map_err(|e| format!("{HTTP_PROTOCOL_OPTIONS}: cannot decode: {e}"))?;
        let only = HttpProtocolOptions {
            upstream_protocol_options: opts.upstream_protocol_options.clone(),
            common_http_protocol_options: opts.common_http_protocol_options,
            ..Default::default()
        };
        if opts != only {
            return Err(format!(
                "{HTTP_PROTOCOL_OPTIONS}: only upstream_protocol_options and common_http_protocol_options are supported"
            ));
        }
        if let Some(common) = &opts.common_http_protocol_options {
            use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions as Common;
            let honoured = Common {
                idle_timeout: common.idle_timeout,
                max_connection_duration: common.max_connection_duration,
                max_requests_per_connection: common.max_requests_per_connection,
                ..Default::default()
            };
            if *common != honoured {
                return Err(format!(
                    "{HTTP_PROTOCOL_OPTIONS}: common_http_protocol_options: only idle_timeout, max_connection_duration and max_requests_per_connection are supported"
                ));
            }
            pool = PoolDef {
                max_requests_per_connection: common.max_requests_per_connection.map(|v| v.value).filter(|v| *v > 0),
                idle_timeout: common.idle_timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
                max_connection_duration: common.max_connection_duration.as_ref().map(duration).filter(|d| !d.is_zero()),
                ..Default::default()
            };
        }
        out = match &opts.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(ProtocolConfig::HttpProtocolOptions(p)) if *p == Default::default() => UpstreamProtocol::Http1,
                Some(ProtocolConfig::Http2ProtocolOptions(p)) if *p == Default::default() => UpstreamProtocol::Http2,
                _ => {
                    return Err(format!(
                        "{HTTP_PROTOCOL_OPTIONS}: explicit_http_config must be http_protocol_options or http2_protocol_options, without settings"
                    ));
                }
            },
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(d))
                if *d == http_protocol_options::UseDownstreamHttpConfig::default() =>
            {
                UpstreamProtocol::Downstream
            }
            _ => {
                return Err(format!(
                    "{HTTP_PROTOCOL_OPTIONS}: only explicit_http_config and use_downstream_protocol_config (without settings) are supported"
                ));
            }
        };
    }
    Ok((out, pool))
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointDef {
    pub address: SocketAddr,
    pub healthy: bool,
    pub zone: String,
    /// From the locality's `priority`: lower first; higher ones take traffic only when no
    /// lower one can.
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: u32,
    pub labels: BTreeMap<String, String>,
}

fn decode<M: Message + Name + Default>(any: &Any, kind: &'static str) -> Result<M, InvalidResource> {
    if any.type_url != M::type_url() {
        return Err(invalid(kind, "", format!("expected {}, got {}", M::type_url(), any.type_url)));
    }
    M::decode(any.value.as_slice()).map_err(|e| invalid(kind, "", format!("cannot decode: {e}")))
}

fn socket_addr(kind: &'static str, name: &str, a: Option<&Address>) -> Result<SocketAddr, InvalidResource> {
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(invalid(kind, name, "needs a socket address"));
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return Err(invalid(kind, name, "needs a numeric port"));
    };
    let ip = sa
        .address
        .parse()
        .map_err(|_| invalid(kind, name, format!("address {:?} is not an IP address", sa.address)))?;
    let port = u16::try_from(port).map_err(|_| invalid(kind, name, format!("port {port} is out of range")))?;
    Ok(SocketAddr::new(ip, port))
}

fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

pub fn listener(any: &Any) -> Result<ListenerDef, InvalidResource> {
    let l: Listener = decode(any, "Listener")?;
    let bad = |reason: String| invalid("Listener", &l.name, reason);
    if let Some(lf) = l.listener_filters.first() {
        return Err(bad(format!("listener filter {:?} is not supported", lf.name)));
    }
    schema::check(&any.value, &schema::LISTENER, "").map_err(bad)?;
    let address = socket_addr("Listener", &l.name, l.address.as_ref())?;
    let direction = match TrafficDirection::try_from(l.traffic_direction) {
        Ok(TrafficDirection::Inbound) => Direction::inbound,
        Ok(TrafficDirection::Outbound) => Direction::outbound,
        _ => return Err(bad("traffic_direction must be INBOUND or OUTBOUND".into())),
    };
    let mut def = ListenerDef {
        name: l.name.clone(),
        address,
        direction,
        service: String::new(),
        http: None,
        escaped_slashes: EscapedSlashes::Keep,
        tcp_cluster: None,
        tcp_failover: None,
        tls: None,
        plaintext: false,
        policy: Arc::default(),
    };
    let mut policy: Option<InboundPolicyDef> = None;
    for chain in &l.filter_chains {
        let p =
            filter_chain(chain, &mut def).map_err(|reason| bad(format!("filter chain {:?}: {reason}", chain.name)))?;
        let Some(before) = &mut policy else {
            policy = Some(p);
            continue;
        };
        if p.authz != before.authz {
            return Err(bad(format!(
                "filter chain {:?} has other RBAC filters than the chains before it; weft applies one authorization per listener",
                chain.name
            )));
        }
        // JWT filters live in HTTP connection managers: HTTP chains must agree; TCP chains
        // carry none.
        match (&before.jwt, p.jwt) {
            (Some(a), Some(b)) if *a != b => {
                return Err(bad(format!(
                    "filter chain {:?} has another jwt_authn filter than the chains before it; weft applies one per listener",
                    chain.name
                )));
            }
            (None, Some(b)) => before.jwt = Some(b),
            _ => {}
        }
        // So do rate limits.
        match (&before.rate_limit, p.rate_limit) {
            (Some(a), Some(b)) if *a != b => {
                return Err(bad(format!(
                    "filter chain {:?} has another local_ratelimit filter than the chains before it; weft applies one per listener",
                    chain.name
                )));
            }
            (None, Some(b)) => before.rate_limit = Some(b),
            _ => {}
        }
    }
    def.policy = Arc::new(policy.unwrap_or_default());
    if def.http.is_none() && def.tcp_cluster.is_none() {
        return Err(bad("has neither an HTTP connection manager nor a tcp_proxy filter".into()));
    }
    if def.service.is_empty() {
        def.service = def.name.clone();
    }
    Ok(def)
}

/// Application protocols the proxy's own detection (or ALPN, inside TLS) recognises; a chain
/// may be matched on them.
const DETECTED_PROTOCOLS: [&str; 3] = ["http/1.1", "h2c", "h2"];

/// A listener's chains are one set of filters reached in plaintext, through TLS, or both: the
/// TLS chains (matched on `transport_protocol: tls`) must carry the same transport socket, and
/// every chain the same filters as the others of its kind (HTTP or TCP).
fn filter_chain(chain: &FilterChain, def: &mut ListenerDef) -> Result<InboundPolicyDef, String> {
    let m = chain.filter_chain_match.clone().unwrap_or_default();
    if let Some(p) = m.application_protocols.iter().find(|p| !DETECTED_PROTOCOLS.contains(&p.as_str())) {
        return Err(format!("filter_chain_match on application protocol {p:?} is not supported"));
    }
    match (m.transport_protocol.as_str(), &chain.transport_socket) {
        ("tls", Some(ts)) => {
            let tls = tls::downstream(ts)?;
            if def.tls.as_ref().is_some_and(|t| *t != tls) {
                return Err("TLS chains with different transport sockets are not supported".into());
            }
            def.tls = Some(tls);
        }
        ("tls", None) => return Err(
            "a chain matched on transport_protocol tls needs a TLS transport socket (TLS passthrough is not supported)"
                .into(),
        ),
        ("" | "raw_buffer", None) => def.plaintext = true,
        ("" | "raw_buffer", Some(ts)) => {
            return Err(format!(
                "transport socket {:?} on a chain not matched on transport_protocol tls is not supported",
                ts.name
            ));
        }
        (other, _) => return Err(format!("filter_chain_match on transport protocol {other:?} is not supported")),
    }
    let (http_before, tcp_before) = (def.http.take(), def.tcp_cluster.take());
    // RBAC filters (network, or HTTP inside the connection manager) come before the terminal
    // filter, DENY before ALLOW.
    let mut authz: Option<Authz> = None;
    let mut jwt = None;
    let mut rate_limit = None;
    for f in &chain.filters {
        let Some(filter::ConfigType::TypedConfig(cfg)) = &f.config_type else {
            return Err(format!("filter {:?} has no typed_config", f.name));
        };
        if cfg.type_url == HttpConnectionManager::type_url() {
            let hcm: HttpConnectionManager = decode(cfg, "Listener").map_err(|e| e.reason)?;
            schema::check(&cfg.value, &schema::HTTP_CONNECTION_MANAGER, "http_connection_manager")?;
            for (i, hf) in hcm.http_filters.iter().enumerate() {
                if rate_limit.is_some()
                    && let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && (c.type_url == HttpRbac::type_url() || c.type_url == JwtAuthentication::type_url())
                {
                    return Err(format!(
                        "HTTP filter {:?} comes after local_ratelimit; weft limits the rate after JWT and RBAC checks",
                        hf.name
                    ));
                }
                if let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && c.type_url == LocalRateLimit::type_url()
                {
                    let at = format!("HTTP filter {:?}", hf.name);
                    if rate_limit.is_some() {
                        return Err(format!("{at}: weft supports one local_ratelimit filter"));
                    }
                    schema::check(&c.value, &schema::LOCAL_RATE_LIMIT, "local_ratelimit")?;
                    let f: LocalRateLimit = decode(c, "Listener").map_err(|e| e.reason)?;
                    rate_limit = Some(local_rate_limit(&f).map_err(|e| format!("{at}: {e}"))?);
                    continue;
                }
                if let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && c.type_url == HttpRbac::type_url()
                {
                    let rbac: HttpRbac = decode(c, "Listener").map_err(|e| e.reason)?;
                    let at = format!("HTTP filter {:?}", hf.name);
                    let rules = rbac.rules.clone().ok_or_else(|| format!("{at}: RBAC without rules"))?;
                    if rbac != (HttpRbac { rules: Some(rules.clone()), ..Default::default() }) {
                        return Err(format!("{at}: RBAC filter fields other than rules are not supported"));
                    }
                    authz::add_rbac(authz.get_or_insert_default(), &rules, &at)?;
                    continue;
                }
                if let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && c.type_url == JwtAuthentication::type_url()
                {
                    let at = format!("HTTP filter {:?}", hf.name);
                    if jwt.is_some() || authz.is_some() {
                        return Err(format!("{at}: weft supports one jwt_authn filter, before any RBAC filter"));
                    }
                    let f: JwtAuthentication = decode(c, "Listener").map_err(|e| e.reason)?;
                    jwt = Some(crate::jwt::decode(&f, &at)?);
                    continue;
                }
                // The fault filter is configured per route; here it must be empty.
                if let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && c.type_url == HttpFault::type_url()
                {
                    if !c.value.is_empty() {
                        return Err(format!(
                            "HTTP filter {:?}: weft takes fault settings per route (typed_per_filter_config), not on the filter",
                            hf.name
                        ));
                    }
                    continue;
                }
                let router = match &hf.config_type {
                    Some(http_filter::ConfigType::TypedConfig(c)) if c.type_url == Router::type_url() => c,
                    config => {
                        let url = match config {
                            Some(http_filter::ConfigType::TypedConfig(c)) => c.type_url.as_str(),
                            _ => "no typed_config",
                        };
                        return Err(format!(
                            "HTTP filter {:?} ({url}) is not supported; weft would have to ignore it",
                            hf.name
                        ));
                    }
                };
                if i + 1 != hcm.http_filters.len() {
                    return Err(format!("HTTP filter {:?} (the router) must be the last one", hf.name));
                }
                schema::check(&router.value, &schema::ROUTER, "router")?;
            }
            def.service.clone_from(&hcm.stat_prefix);
            let slashes = escaped_slashes(hcm.path_with_escaped_slashes_action())?;
            if http_before.is_some() && slashes != def.escaped_slashes {
                return Err("path_with_escaped_slashes_action differs from the HTTP chains before it".into());
            }
            def.escaped_slashes = slashes;
            def.http = Some(match hcm.route_specifier {
                Some(http_connection_manager::RouteSpecifier::Rds(rds)) => HttpDef::Rds(rds.route_config_name),
                Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                    HttpDef::Inline(route_config(&rc).map_err(|e| e.to_string())?)
                }
                _ => return Err("HTTP connection manager needs rds or route_config".into()),
            });
        } else if cfg.type_url == TcpProxy::type_url() {
            let tcp: TcpProxy = decode(cfg, "Listener").map_err(|e| e.reason)?;
            schema::check(&cfg.value, &schema::TCP_PROXY, "tcp_proxy")?;
            def.tcp_failover = match tcp.max_connect_attempts.map(|a| a.value) {
                Some(0) => return Err("tcp_proxy max_connect_attempts must be at least 1".into()),
                Some(n) => Some(Failover { max_endpoints: n as usize }),
                None => None,
            };
            match tcp.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => def.tcp_cluster = Some(c),
                _ => return Err("tcp_proxy needs a cluster".into()),
            }
            if def.service.is_empty() {
                def.service = tcp.stat_prefix;
            }
        } else if cfg.type_url == NetworkRbac::type_url() {
            let rbac: NetworkRbac = decode(cfg, "Listener").map_err(|e| e.reason)?;
            let at = format!("network filter {:?}", f.name);
            let rules = rbac.rules.clone().ok_or_else(|| format!("{at}: RBAC without rules"))?;
            let honoured =
                NetworkRbac { rules: Some(rules.clone()), stat_prefix: rbac.stat_prefix.clone(), ..Default::default() };
            if rbac != honoured {
                return Err(format!("{at}: RBAC filter fields other than rules and stat_prefix are not supported"));
            }
            authz::add_rbac(authz.get_or_insert_default(), &rules, &at)?;
        } else {
            return Err(format!("unsupported network filter {}", cfg.type_url));
        }
    }
    // A kind of chain seen before must carry what it carried then.
    for (before, now, what) in [
        (http_before.as_ref().map(|h| format!("{h:?}")), def.http.as_ref().map(|h| format!("{h:?}")), "HTTP"),
        (tcp_before.clone(), def.tcp_cluster.clone(), "TCP"),
    ] {
        if let (Some(b), Some(n)) = (&before, &now)
            && b != n
        {
            return Err(format!("the {what} filters differ between chains; weft applies one set per listener"));
        }
    }
    if def.http.is_none() {
        def.http = http_before;
    }
    if def.tcp_cluster.is_none() {
        def.tcp_cluster = tcp_before;
    }
    Ok(InboundPolicyDef { jwt, authz, rate_limit })
}

/// Envoy's escaped-slash actions weft takes; a redirect to the decoded path is not one.
fn escaped_slashes(action: PathWithEscapedSlashesAction) -> Result<EscapedSlashes, String> {
    Ok(match action {
        PathWithEscapedSlashesAction::ImplementationSpecificDefault | PathWithEscapedSlashesAction::KeepUnchanged => {
            EscapedSlashes::Keep
        }
        PathWithEscapedSlashesAction::UnescapeAndForward => EscapedSlashes::Decode,
        PathWithEscapedSlashesAction::RejectRequest => EscapedSlashes::Reject,
        PathWithEscapedSlashesAction::UnescapeAndRedirect => {
            return Err(
                "path_with_escaped_slashes_action UNESCAPE_AND_REDIRECT is not supported; use UNESCAPE_AND_FORWARD"
                    .into(),
            );
        }
    })
}

/// The local rate limit filter as weft enforces it: always on and enforced, a bucket for the
/// listener and at most one per-caller descriptor (entry `weft.caller` with an empty value).
fn local_rate_limit(f: &LocalRateLimit) -> Result<RateLimitDef, String> {
    let bucket = |b: &Option<envoy_types::pb::envoy::r#type::v3::TokenBucket>, what: &str| {
        let b = b.as_ref().ok_or_else(|| format!("{what} has no token_bucket"))?;
        let fill = b.fill_interval.as_ref().map(duration).filter(|d| !d.is_zero());
        let def = BucketDef {
            max_tokens: b.max_tokens,
            tokens_per_fill: b.tokens_per_fill.as_ref().map_or(1, |t| t.value),
            fill_interval: fill.ok_or_else(|| format!("{what}: token_bucket needs a fill_interval"))?,
        };
        def.period()?;
        def.burst()?;
        Ok::<_, String>(def)
    };
    for (what, p) in [("filter_enabled", &f.filter_enabled), ("filter_enforced", &f.filter_enforced)] {
        let share = p.as_ref().and_then(|p| p.default_value.as_ref()).map_or(0, per_million);
        if share != 1_000_000 {
            return Err(format!("{what} must be 100% (weft enforces a rate limit on every request, or not at all)"));
        }
    }
    let per_caller = match f.descriptors.as_slice() {
        [] => None,
        [d] if d.entries.len() == 1
            && d.entries[0].key == names::CALLER_DESCRIPTOR
            && d.entries[0].value.is_empty()
            && !d.shadow_mode =>
        {
            Some(bucket(&d.token_bucket, "the descriptor")?)
        }
        _ => {
            return Err(format!(
                "descriptors: weft supports one, with the single entry {{key: {:?}, value: \"\"}} (a bucket per caller)",
                names::CALLER_DESCRIPTOR
            ));
        }
    };
    Ok(RateLimitDef {
        service: bucket(&f.token_bucket, "the filter")?,
        always_consume_service: f.always_consume_default_token_bucket.as_ref().is_none_or(|b| b.value),
        per_caller,
        grpc_resource_exhausted: f.rate_limited_as_resource_exhausted,
    })
}

pub fn route(any: &Any) -> Result<RouteDef, InvalidResource> {
    let rc: RouteConfiguration = decode(any, "RouteConfiguration")?;
    schema::check(&any.value, &schema::ROUTE_CONFIGURATION, "")
        .map_err(|reason| invalid("RouteConfiguration", &rc.name, reason))?;
    route_config(&rc)
}

fn string_match(sm: &StringMatcher, what: &str) -> Result<StrMatch, String> {
    if sm.ignore_case {
        return Err(format!("{what}: ignore_case is not supported"));
    }
    match &sm.match_pattern {
        Some(string_matcher::MatchPattern::Exact(v)) => Ok(StrMatch::Exact(v.clone())),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => {
            weft_api::resource::full_match_regex(&r.regex).map_err(|e| format!("{what}: {e}"))?;
            Ok(StrMatch::Regex(r.regex.clone()))
        }
        _ => Err(format!("{what}: only exact and safe_regex matches are supported")),
    }
}

/// A header match the route table honours: a valid header name, or `:method` with an exact
/// method; other pseudo-headers (`:authority`, `:path`, `:scheme`) and a `:method` regex are
/// refused rather than ignored, which would widen the route to every request.
fn check_header_match(name: &str, value: &StrMatch) -> Result<(), String> {
    match (name, value) {
        (":method", StrMatch::Exact(m)) => {
            http::Method::from_bytes(m.as_bytes()).map(drop).map_err(|_| format!("{m:?} is not an HTTP method"))
        }
        (":method", StrMatch::Regex(_)) => Err("only an exact :method match is supported".into()),
        (pseudo, _) if pseudo.starts_with(':') => {
            Err("pseudo-header matches other than an exact :method are not supported".into())
        }
        (name, _) => {
            http::HeaderName::from_bytes(name.as_bytes()).map(drop).map_err(|_| "not a valid header name".into())
        }
    }
}

fn header_edits(add: &[HeaderValueOption], remove: &[String], what: &str) -> Result<HeaderEdits, String> {
    let mut edits =
        HeaderEdits { remove: remove.iter().map(|n| n.to_ascii_lowercase()).collect(), ..Default::default() };
    for o in add {
        let h = o.header.as_ref().ok_or_else(|| format!("{what}: a header value option without a header"))?;
        let honoured = HeaderValueOption {
            header: Some(CoreHeaderValue { key: h.key.clone(), value: h.value.clone(), ..Default::default() }),
            append_action: o.append_action,
            ..Default::default()
        };
        if *o != honoured {
            return Err(format!("{what}: header {:?}: only key, value and append_action are supported", h.key));
        }
        http::HeaderName::from_bytes(h.key.as_bytes())
            .map_err(|_| format!("{what}: {:?} is not a header name", h.key))?;
        http::HeaderValue::from_str(&h.value).map_err(|_| format!("{what}: the value of {:?} is not valid", h.key))?;
        let pair = (h.key.to_ascii_lowercase(), h.value.clone());
        match header_value_option::HeaderAppendAction::try_from(o.append_action) {
            Ok(header_value_option::HeaderAppendAction::AppendIfExistsOrAdd) => edits.add.push(pair),
            Ok(header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd) => edits.set.push(pair),
            _ => {
                return Err(format!(
                    "{what}: header {:?}: append_action must be APPEND_IF_EXISTS_OR_ADD or OVERWRITE_IF_EXISTS_OR_ADD",
                    h.key
                ));
            }
        }
    }
    Ok(edits)
}

fn redirect_def(rd: &RedirectAction, path: &PathDef) -> Result<RedirectDef, String> {
    use redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let scheme = match &rd.scheme_rewrite_specifier {
        None => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_owned()),
        Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) if s == "http" || s == "https" => Some(s.clone()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => {
            return Err(format!("redirect: scheme {s:?} is not http or https"));
        }
    };
    let (full_path, prefix) = match &rd.path_rewrite_specifier {
        None => (None, None),
        Some(PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
        Some(PathRewriteSpecifier::PrefixRewrite(p)) if matches!(path, PathDef::Prefix(_)) => (None, Some(p.clone())),
        Some(PathRewriteSpecifier::PrefixRewrite(_)) => {
            return Err("redirect: prefix_rewrite needs a prefix match".into());
        }
        Some(_) => return Err("redirect: only path_redirect and prefix_rewrite are supported".into()),
    };
    let status = match RedirectResponseCode::try_from(rd.response_code) {
        Ok(RedirectResponseCode::MovedPermanently) => 301,
        Ok(RedirectResponseCode::Found) => 302,
        Ok(RedirectResponseCode::SeeOther) => 303,
        Ok(RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(RedirectResponseCode::PermanentRedirect) => 308,
        Err(_) => return Err(format!("redirect: unknown response_code {}", rd.response_code)),
    };
    let port = match u16::try_from(rd.port_redirect) {
        Ok(0) => None,
        Ok(p) => Some(p),
        Err(_) => return Err(format!("redirect: port {} is out of range", rd.port_redirect)),
    };
    let host = (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone());
    Ok(RedirectDef { scheme, host, port, full_path, prefix, status })
}

/// A `FractionalPercent` in parts per million.
fn per_million(f: &FractionalPercent) -> u32 {
    let scale = match fractional_percent::DenominatorType::try_from(f.denominator) {
        Ok(fractional_percent::DenominatorType::Hundred) => 10_000,
        Ok(fractional_percent::DenominatorType::TenThousand) => 100,
        _ => 1,
    };
    f.numerator.saturating_mul(scale).min(1_000_000)
}

/// The fault filter's per-route config. As in Envoy, a fault without a percentage applies to
/// no request.
fn fault_def(f: &HttpFault) -> Result<FaultDef, String> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
    let share = |p: &Option<FractionalPercent>| p.as_ref().map_or(0, per_million);
    let delay = match &f.delay {
        None => None,
        Some(d) => match &d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(t)) => {
                Some(FaultDelayDef { delay: duration(t), per_million: share(&d.percentage) })
            }
            _ => return Err("only a fixed_delay is supported (not a header-controlled one)".into()),
        },
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let (http, grpc) = match a.error_type {
                Some(ErrorType::HttpStatus(s)) if (200..600).contains(&s) => (Some(s as u16), None),
                Some(ErrorType::GrpcStatus(g)) if (1..=16).contains(&g) => (None, Some(g as u8)),
                _ => return Err("abort needs an http_status (200-599) or a grpc_status (1-16)".into()),
            };
            Some(FaultAbortDef { http, grpc, per_million: share(&a.percentage) })
        }
    };
    Ok(FaultDef { delay, abort })
}

fn retry_def(p: &envoy_types::pb::envoy::config::route::v3::RetryPolicy) -> Result<RetryDef, String> {
    let base = p.retry_back_off.as_ref().and_then(|b| b.base_interval.as_ref()).map(duration);
    let base = base.filter(|d| !d.is_zero()).unwrap_or(Duration::from_millis(25));
    let max = p.retry_back_off.as_ref().and_then(|b| b.max_interval.as_ref()).map(duration).unwrap_or(base * 10);
    Ok(RetryDef {
        retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: p.per_try_timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
        on: RetryOn::parse(&p.retry_on).map_err(|e| format!("retry_policy: {e}"))?,
        base_interval: base,
        max_interval: max.max(base),
    })
}

/// The one regex rewrite weft honours: the whole path replaced (`^/.*$` → a literal path).
const FULL_PATH_PATTERN: &str = "^/.*$";

fn route_config(rc: &RouteConfiguration) -> Result<RouteDef, InvalidResource> {
    let bad = |reason: String| invalid("RouteConfiguration", &rc.name, reason);
    let mut virtual_hosts = Vec::new();
    for vh in &rc.virtual_hosts {
        let bad = |reason: String| bad(format!("virtual host {:?}: {reason}", vh.name));
        if vh.domains.is_empty() {
            return Err(bad("has no domains".into()));
        }
        for d in &vh.domains {
            let stars = d.matches('*').count();
            let ok = d == "*" || stars == 0 || (stars == 1 && d.len() > 1 && (d.starts_with('*') || d.ends_with('*')));
            if !ok {
                return Err(bad(format!(
                    "domain {d:?}: weft supports \"*\", exact hosts, \"*.suffix\" and \"prefix*\""
                )));
            }
        }
        let mut rules = Vec::new();
        for (i, r) in vh.routes.iter().enumerate() {
            let bad = |reason: String| bad(format!("route {i} {:?}: {reason}", r.name));
            let m = r.r#match.as_ref().ok_or_else(|| bad("route without match".into()))?;
            let path = match &m.path_specifier {
                Some(route_match::PathSpecifier::Prefix(p)) => PathDef::Prefix(p.clone()),
                Some(route_match::PathSpecifier::Path(p)) => PathDef::Exact(p.clone()),
                Some(route_match::PathSpecifier::SafeRegex(re)) => {
                    weft_api::resource::full_match_regex(&re.regex).map_err(bad)?;
                    PathDef::Regex(re.regex.clone())
                }
                None => PathDef::Prefix("/".into()),
                Some(other) => return Err(bad(format!("unsupported path match {other:?}"))),
            };
            let mut headers = Vec::new();
            for h in &m.headers {
                let sm = match &h.header_match_specifier {
                    Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => sm,
                    _ => return Err(bad(format!("header {:?}: only string matches are supported", h.name))),
                };
                let name = h.name.to_ascii_lowercase();
                let value = string_match(sm, &format!("header {:?}", h.name)).map_err(bad)?;
                check_header_match(&name, &value).map_err(|e| bad(format!("header {:?}: {e}", h.name)))?;
                headers.push((name, value));
            }
            let mut query = Vec::new();
            for q in &m.query_parameters {
                let sm = match &q.query_parameter_match_specifier {
                    Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm)) => sm,
                    _ => return Err(bad(format!("query parameter {:?}: only string matches are supported", q.name))),
                };
                query.push((q.name.clone(), string_match(sm, &format!("query parameter {:?}", q.name)).map_err(bad)?));
            }
            let action = match &r.action {
                Some(route::Action::Route(action)) => action,
                Some(route::Action::Redirect(rd)) => {
                    if !r.typed_per_filter_config.is_empty() {
                        return Err(bad("a redirect route takes no typed_per_filter_config".into()));
                    }
                    let edits = !(r.request_headers_to_add.is_empty()
                        && r.request_headers_to_remove.is_empty()
                        && r.response_headers_to_add.is_empty()
                        && r.response_headers_to_remove.is_empty());
                    if edits {
                        return Err(bad("a redirect route takes no header edits".into()));
                    }
                    let redirect = redirect_def(rd, &path).map_err(bad)?;
                    rules.push(RuleDef { path, headers, query, redirect: Some(redirect), ..Default::default() });
                    continue;
                }
                _ => return Err(bad("only route and redirect actions are supported".into())),
            };
            let backends = match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                    let mut out = Vec::new();
                    for c in &w.clusters {
                        out.push((c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)));
                    }
                    out
                }
                _ => return Err(bad("route action needs a cluster or weighted_clusters".into())),
            };
            if backends.iter().all(|(_, w)| *w == 0) {
                return Err(bad("weighted clusters all have weight 0".into()));
            }
            let timeout = action.timeout.as_ref().map(duration).filter(|d| !d.is_zero());
            let full_path = match &action.regex_rewrite {
                None => None,
                Some(rw)
                    if rw.pattern.as_ref().is_some_and(|p| p.regex == FULL_PATH_PATTERN)
                        && rw.substitution.starts_with('/')
                        && !rw.substitution.contains('\\') =>
                {
                    Some(rw.substitution.clone())
                }
                Some(_) => {
                    return Err(bad(format!(
                        "regex_rewrite: weft supports only pattern {FULL_PATH_PATTERN:?} with a literal path (a full path replacement)"
                    )));
                }
            };
            let prefix = (!action.prefix_rewrite.is_empty()).then(|| action.prefix_rewrite.clone());
            if prefix.is_some() && !matches!(path, PathDef::Prefix(_)) {
                return Err(bad("prefix_rewrite needs a prefix match".into()));
            }
            let host = match &action.host_rewrite_specifier {
                None => None,
                Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
                Some(_) => return Err(bad("only host_rewrite_literal is supported".into())),
            };
            let retry = action.retry_policy.as_ref().map(retry_def).transpose().map_err(bad)?;
            let mirrors = action
                .request_mirror_policies
                .iter()
                .map(|m| {
                    if m.cluster.is_empty() {
                        return Err(bad("request_mirror_policies: a mirror needs a cluster".into()));
                    }
                    let fraction = m.runtime_fraction.as_ref().and_then(|f| f.default_value.as_ref());
                    Ok(MirrorDef { cluster: m.cluster.clone(), per_million: fraction.map_or(1_000_000, per_million) })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut fault = None;
            for (name, any) in &r.typed_per_filter_config {
                if any.type_url != HttpFault::type_url() {
                    return Err(bad(format!(
                        "typed_per_filter_config {name:?} ({}) is not supported; weft would have to ignore it",
                        any.type_url
                    )));
                }
                schema::check(&any.value, &schema::HTTP_FAULT, &format!("typed_per_filter_config {name:?}"))
                    .map_err(bad)?;
                let f = HttpFault::decode(any.value.as_slice()).map_err(|e| bad(format!("{name:?}: {e}")))?;
                fault = Some(fault_def(&f).map_err(|e| bad(format!("typed_per_filter_config {name:?}: {e}")))?);
            }
            let mut hash = Vec::new();
            for h in &action.hash_policy {
                use route_action::hash_policy::PolicySpecifier;
                if h.terminal {
                    return Err(bad("hash_policy: terminal is not supported".into()));
                }
                hash.push(match &h.policy_specifier {
                    Some(PolicySpecifier::Header(hd)) if hd.regex_rewrite.is_none() => {
                        HashDef::Header(hd.header_name.to_ascii_lowercase())
                    }
                    Some(PolicySpecifier::Cookie(c)) if c.ttl.is_none() && c.path.is_empty() && c.attributes.is_empty() => {
                        HashDef::Cookie(c.name.clone())
                    }
                    Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => HashDef::SourceIp,
                    _ => {
                        return Err(bad(
                            "hash_policy: weft hashes a header, a cookie (without ttl, path or attributes) or the source IP"
                                .into(),
                        ));
                    }
                });
            }
            rules.push(RuleDef {
                buffer_limit: r.request_body_buffer_limit.map(|b| u32::try_from(b.value).unwrap_or(u32::MAX)),
                redirect: None,
                hash,
                mirrors,
                fault,
                retry,
                path,
                headers,
                query,
                backends,
                timeout,
                request_headers: header_edits(
                    &r.request_headers_to_add,
                    &r.request_headers_to_remove,
                    "request_headers_to_add",
                )
                .map_err(bad)?,
                response_headers: header_edits(
                    &r.response_headers_to_add,
                    &r.response_headers_to_remove,
                    "response_headers_to_add",
                )
                .map_err(bad)?,
                rewrite: Rewrite { prefix, full_path, host },
            });
        }
        virtual_hosts.push(VirtualHostDef { domains: vh.domains.clone(), rules });
    }
    Ok(RouteDef { name: rc.name.clone(), virtual_hosts })
}

pub fn cluster(any: &Any) -> Result<ClusterDef, InvalidResource> {
    let c: Cluster = decode(any, "Cluster")?;
    let bad = |reason: String| invalid("Cluster", &c.name, reason);
    let tls = c.transport_socket.as_ref().map(tls::upstream).transpose().map_err(bad)?;
    schema::check(&any.value, &schema::CLUSTER, "").map_err(bad)?;
    // The first policy of load_balancing_policy that weft knows wins; without one, lb_policy.
    let from_list = c.load_balancing_policy.iter().flat_map(|p| &p.policies).find_map(|p| {
        let url = p.typed_extension_config.as_ref()?.typed_config.as_ref()?.type_url.as_str();
        let known = [
            (LeastRequest::type_url(), LoadBalancer::P2cEwma),
            (RoundRobin::type_url(), LoadBalancer::RoundRobin),
            (Random::type_url(), LoadBalancer::Random),
            (RingHash::type_url(), LoadBalancer::RingHash),
            (Maglev::type_url(), LoadBalancer::Maglev),
        ];
        known.into_iter().find(|(u, _)| u == url).map(|(_, lb)| (lb, p))
    });
    // Settings of a hashing or random policy are not honoured: they must be left at their
    // defaults (least_request's choice_count is read as P2C's two choices).
    if let Some((lb, p)) = &from_list
        && matches!(lb, LoadBalancer::Random | LoadBalancer::RingHash | LoadBalancer::Maglev)
        && p.typed_extension_config.as_ref().and_then(|t| t.typed_config.as_ref()).is_some_and(|a| !a.value.is_empty())
    {
        return Err(bad(format!(
            "load_balancing_policy {}: settings are not supported (leave them at their defaults)",
            lb.as_str()
        )));
    }
    let load_balancer = match (from_list.map(|(lb, _)| lb), cluster::LbPolicy::try_from(c.lb_policy)) {
        (Some(lb), _) => lb,
        (None, Ok(cluster::LbPolicy::RoundRobin)) => LoadBalancer::RoundRobin,
        (None, Ok(cluster::LbPolicy::LeastRequest)) => LoadBalancer::P2cEwma,
        _ => return Err(bad(format!("unsupported lb_policy {}", c.lb_policy))),
    };
    let connect_timeout = c.connect_timeout.as_ref().map(duration).unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let static_endpoints = match c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32 => None,
        Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Static as i32 => {
            let cla = c.load_assignment.as_ref().ok_or_else(|| bad("static cluster without load_assignment".into()))?;
            Some(endpoints(cla)?)
        }
        _ => return Err(bad("only EDS and STATIC clusters are supported".into())),
    };
    let (protocol, mut pool) = upstream_protocol(&c).map_err(bad)?;
    pool.max_connections_per_endpoint = match c
        .circuit_breakers
        .as_ref()
        .map(|cb| cb.per_host_thresholds.as_slice())
        .unwrap_or_default()
    {
        [] => None,
        [t] if t.priority == 0
            && *t == (cluster_thresholds { max_connections: t.max_connections, ..Default::default() }) =>
        {
            t.max_connections.map(|m| m.value.max(1))
        }
        _ => {
            return Err(bad(
                    "circuit_breakers.per_host_thresholds: weft supports one, of DEFAULT priority, with max_connections only"
                        .into(),
                ));
        }
    };
    let (max_requests, retry_limit) = match c
        .circuit_breakers
        .as_ref()
        .map(|cb| cb.thresholds.as_slice())
        .unwrap_or_default()
    {
        [] => (None, RetryLimit::default()),
        [t] if t.priority == 0 => {
            if t.max_connections.is_some() {
                return Err(bad(
                        "circuit_breakers: a cluster-wide max_connections is not supported (weft limits connections per endpoint: per_host_thresholds)".into(),
                    ));
            }
            pool.max_pending_requests = t.max_pending_requests.map(|m| m.value);
            let limit = match (&t.retry_budget, &t.max_retries) {
                (Some(b), _) => RetryLimit::Budget {
                    percent: b.budget_percent.as_ref().map_or(20.0, |p| p.value),
                    min: b.min_retry_concurrency.as_ref().map_or(3, |m| m.value),
                },
                (None, Some(m)) => RetryLimit::Fixed(m.value),
                (None, None) => RetryLimit::default(),
            };
            (t.max_requests.as_ref().map(|m| m.value), limit)
        }
        _ => return Err(bad("circuit_breakers: weft supports one threshold, of DEFAULT priority".into())),
    };
    let outlier =
        c.outlier_detection.as_ref().map(|od| outlier_def(od, c.common_lb_config.as_ref())).transpose().map_err(bad)?;
    let retry_limit = match c.metadata.as_ref().map(ratio_budget).transpose().map_err(bad)?.flatten() {
        Some(_)
            if c.circuit_breakers.as_ref().is_some_and(|cb| {
                cb.thresholds.iter().any(|t| t.max_retries.is_some() || t.retry_budget.is_some())
            }) =>
        {
            return Err(bad(
                "a ratio retry budget (metadata) cannot be combined with circuit_breakers retry limits".into()
            ));
        }
        Some(ratio) => ratio,
        None => retry_limit,
    };
    let health_check = match c.health_checks.as_slice() {
        [] => None,
        [h] => Some(health_check_def(h).map_err(bad)?),
        _ => return Err(bad("health_checks: weft runs at most one".into())),
    };
    Ok(ClusterDef {
        pool,
        health_check,
        outlier,
        name: c.name,
        load_balancer,
        connect_timeout,
        static_endpoints,
        tls,
        protocol,
        max_requests,
        retry_limit,
    })
}

/// The cluster's metadata: only `weft.retry_budget` {ratio, min_retries_per_second,
/// ttl_seconds} is understood (and so accepted).
fn ratio_budget(m: &envoy_types::pb::envoy::config::core::v3::Metadata) -> Result<Option<RetryLimit>, String> {
    if !m.typed_filter_metadata.is_empty() || m.filter_metadata.keys().any(|k| k != names::ENDPOINT_METADATA_NAMESPACE)
    {
        return Err(format!("metadata: only the {:?} namespace is understood", names::ENDPOINT_METADATA_NAMESPACE));
    }
    let Some(weft) = m.filter_metadata.get(names::ENDPOINT_METADATA_NAMESPACE) else { return Ok(None) };
    let bad = || "metadata: weft.retry_budget needs numbers ratio, min_retries_per_second and ttl_seconds".to_owned();
    if weft.fields.keys().any(|k| k != "retry_budget") {
        return Err("metadata: weft understands retry_budget only".into());
    }
    let Some(budget) = weft.fields.get("retry_budget") else { return Ok(None) };
    let Some(value::Kind::StructValue(b)) = &budget.kind else { return Err(bad()) };
    let number = |k: &str| match b.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::NumberValue(n)) if n.is_finite() && *n >= 0.0 => Ok(*n),
        _ => Err(bad()),
    };
    if b.fields.len() != 3 {
        return Err(bad());
    }
    let ttl = number("ttl_seconds")?;
    if !(1.0..=60.0).contains(&ttl) {
        return Err("metadata: weft.retry_budget.ttl_seconds must be 1 to 60".into());
    }
    Ok(Some(RetryLimit::Ratio {
        ratio: number("ratio")?,
        min_per_second: number("min_retries_per_second")? as u32,
        ttl: Duration::from_secs_f64(ttl),
    }))
}

fn health_check_def(h: &envoy_types::pb::envoy::config::core::v3::HealthCheck) -> Result<HealthCheckDef, String> {
    use envoy_types::pb::envoy::config::core::v3::health_check::HealthChecker;
    let interval = h.interval.as_ref().map(duration).filter(|d| !d.is_zero());
    let timeout = h.timeout.as_ref().map(duration).filter(|d| !d.is_zero());
    let (Some(interval), Some(timeout)) = (interval, timeout) else {
        return Err("health_checks: interval and timeout are required".into());
    };
    let http_path = match &h.health_checker {
        Some(HealthChecker::HttpHealthCheck(http)) if http.path.starts_with('/') => Some(http.path.clone()),
        Some(HealthChecker::TcpHealthCheck(tcp)) if tcp.send.is_none() && tcp.receive.is_empty() => None,
        _ => {
            return Err("health_checks: an http_health_check with a path or a tcp_health_check without payloads".into());
        }
    };
    Ok(HealthCheckDef {
        interval,
        timeout,
        unhealthy_threshold: h.unhealthy_threshold.as_ref().map_or(1, |v| v.value).max(1),
        healthy_threshold: h.healthy_threshold.as_ref().map_or(1, |v| v.value).max(1),
        http_path,
    })
}

fn outlier_def(
    od: &envoy_types::pb::envoy::config::cluster::v3::OutlierDetection,
    lb: Option<&cluster::CommonLbConfig>,
) -> Result<OutlierDef, String> {
    // Enforcement is all or nothing: weft does not eject a random share of the time.
    let enforced = |what: &str, v: &Option<UInt32Value>, default: u32| match v.as_ref().map_or(default, |v| v.value) {
        0 => Ok(false),
        100 => Ok(true),
        other => Err(format!("outlier_detection.{what} is {other}: weft enforces 0 or 100 (percent)")),
    };
    if enforced("enforcing_success_rate", &od.enforcing_success_rate, 100)? {
        return Err(
            "outlier_detection: success-rate ejection (on unless enforcing_success_rate is 0) is not supported".into(),
        );
    }
    let five_xx = enforced("enforcing_consecutive_5xx", &od.enforcing_consecutive_5xx, 100)?
        .then(|| od.consecutive_5xx.as_ref().map_or(5, |v| v.value).max(1));
    let gateway = enforced("enforcing_consecutive_gateway_failure", &od.enforcing_consecutive_gateway_failure, 0)?
        .then(|| od.consecutive_gateway_failure.as_ref().map_or(5, |v| v.value).max(1));
    let base = od.base_ejection_time.as_ref().map(duration).unwrap_or(Duration::from_secs(30));
    let max = od.max_ejection_time.as_ref().map(duration).unwrap_or(Duration::from_secs(300)).max(base);
    let panic = lb.and_then(|l| l.healthy_panic_threshold.as_ref()).map_or(50.0, |p| p.value);
    if !(0.0..=100.0).contains(&panic) {
        return Err(format!("common_lb_config.healthy_panic_threshold {panic} is not a percentage"));
    }
    Ok(OutlierDef {
        consecutive_5xx: five_xx,
        consecutive_gateway: gateway,
        base_ejection: base,
        max_ejection: max,
        max_ejection_percent: od.max_ejection_percent.as_ref().map_or(10, |v| v.value.min(100)),
        panic_threshold: panic,
    })
}

pub fn load_assignment(any: &Any) -> Result<(String, Vec<EndpointDef>), InvalidResource> {
    let cla: ClusterLoadAssignment = decode(any, "ClusterLoadAssignment")?;
    schema::check(&any.value, &schema::CLUSTER_LOAD_ASSIGNMENT, "")
        .map_err(|reason| invalid("ClusterLoadAssignment", &cla.cluster_name, reason))?;
    Ok((cla.cluster_name.clone(), endpoints(&cla)?))
}

/// Localities are balanced as one set of endpoints (their weights are not used; gRPC clients
/// need one), so every endpoint weight must be equal.
fn endpoints(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointDef>, InvalidResource> {
    let bad = |reason: String| invalid("ClusterLoadAssignment", &cla.cluster_name, reason);
    let mut out = Vec::new();
    for loc in &cla.endpoints {
        let zone = loc.locality.as_ref().map(|l| l.zone.clone()).unwrap_or_default();
        for e in &loc.lb_endpoints {
            if e.load_balancing_weight.as_ref().is_some_and(|w| w.value != 1) {
                return Err(bad("endpoint weights other than 1 are not supported".into()));
            }
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return Err(bad("endpoint without an address".into()));
            };
            let address = socket_addr("ClusterLoadAssignment", &cla.cluster_name, ep.address.as_ref())?;
            let healthy =
                matches!(HealthStatus::try_from(e.health_status), Ok(HealthStatus::Healthy | HealthStatus::Unknown));
            let labels = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(names::ENDPOINT_METADATA_NAMESPACE))
                .map(|s| {
                    s.fields
                        .iter()
                        .filter_map(|(k, v)| match &v.kind {
                            Some(value::Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(EndpointDef { address, healthy, zone: zone.clone(), labels, priority: loc.priority });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{SocketAddress, TransportSocket};
    use envoy_types::pb::envoy::config::listener::v3::Filter;
    use envoy_types::pb::envoy::config::route::v3::{
        HeaderMatcher, RetryPolicy, Route, RouteAction, RouteMatch, VirtualHost,
    };
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
    use envoy_types::pb::google::protobuf;
    use envoy_types::util::pack_any;

    fn listener_with(filter: Any, chain: impl FnOnce(&mut FilterChain), l: impl FnOnce(&mut Listener)) -> Any {
        let mut fc = FilterChain {
            filters: vec![Filter { name: "f".into(), config_type: Some(filter::ConfigType::TypedConfig(filter)) }],
            ..Default::default()
        };
        chain(&mut fc);
        let mut listener = Listener {
            name: "l".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(9000)),
                    ..Default::default()
                })),
            }),
            traffic_direction: TrafficDirection::Outbound as i32,
            filter_chains: vec![fc],
            ..Default::default()
        };
        l(&mut listener);
        pack_any(listener)
    }

    fn tcp_proxy(cluster: &str) -> Any {
        pack_any(TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })
    }

    fn route_table(action: RouteAction) -> RouteConfiguration {
        RouteConfiguration {
            name: "backend".into(),
            virtual_hosts: vec![VirtualHost {
                name: "backend".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("backend".into())),
                        ..action
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn hcm(filters: Vec<HttpFilter>) -> Any {
        pack_any(HttpConnectionManager {
            stat_prefix: "backend".into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(route_table(
                RouteAction::default(),
            ))),
            http_filters: filters,
            ..Default::default()
        })
    }

    fn http_filter(name: &str, config: Any) -> HttpFilter {
        HttpFilter {
            name: name.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(config)),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_listeners_with_direction_and_service() {
        let def = listener(&listener_with(tcp_proxy("backend"), |_| {}, |_| {})).unwrap();
        assert_eq!(def.address, "127.0.0.1:9000".parse().unwrap());
        assert_eq!((def.direction, def.service.as_str()), (Direction::outbound, "backend"));
        assert_eq!(def.tcp_cluster.as_deref(), Some("backend"));
        let router = http_filter("envoy.filters.http.router", pack_any(Router::default()));
        let def = listener(&listener_with(
            hcm(vec![router]),
            |_| {},
            |l| l.traffic_direction = TrafficDirection::Inbound as i32,
        ))
        .unwrap();
        assert_eq!(def.direction, Direction::inbound);
        assert!(matches!(def.http, Some(HttpDef::Inline(_))));
    }

    /// Everything the proxy cannot honour is refused, naming what it is.
    #[test]
    fn unsupported_config_is_refused_with_what_and_why() {
        let refused = |any: Any| listener(&any).unwrap_err().to_string();
        assert_eq!(
            refused(listener_with(tcp_proxy("b"), |_| {}, |l| l.traffic_direction = 0)),
            "Listener \"l\": traffic_direction must be INBOUND or OUTBOUND"
        );
        let cors =
            Any { type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors".into(), value: vec![] };
        let router = http_filter("envoy.filters.http.router", pack_any(Router::default()));
        assert_eq!(
            refused(listener_with(
                hcm(vec![http_filter("envoy.filters.http.cors", cors), router.clone()]),
                |c| c.name = "http".into(),
                |_| {}
            )),
            "Listener \"l\": filter chain \"http\": HTTP filter \"envoy.filters.http.cors\" \
             (type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors) is not supported; weft would have to ignore it"
        );
        // The fault filter is honoured per route; settings on the filter itself are refused.
        let fault = HttpFault { max_active_faults: Some(UInt32Value { value: 1 }), ..Default::default() };
        assert!(
            refused(listener_with(
                hcm(vec![http_filter("envoy.filters.http.fault", pack_any(fault)), router.clone()]),
                |_| {},
                |_| {}
            ))
            .contains("weft takes fault settings per route")
        );
        // RBAC is honoured, but only what weft can evaluate: a CEL condition is refused.
        let cel = envoy_types::pb::envoy::config::rbac::v3::Rbac {
            policies: [(
                "p".to_owned(),
                envoy_types::pb::envoy::config::rbac::v3::Policy {
                    condition: Some(Default::default()),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let rbac = pack_any(HttpRbac { rules: Some(cel), ..Default::default() });
        assert_eq!(
            refused(listener_with(
                hcm(vec![http_filter("envoy.filters.http.rbac", rbac), router]),
                |c| c.name = "http".into(),
                |_| {}
            )),
            "Listener \"l\": filter chain \"http\": HTTP filter \"envoy.filters.http.rbac\": policy \"p\": CEL conditions are not supported"
        );
        let tls = TransportSocket { name: "envoy.transport_sockets.tls".into(), config_type: None };
        assert_eq!(
            refused(listener_with(tcp_proxy("b"), |c| c.transport_socket = Some(tls.clone()), |_| {})),
            "Listener \"l\": filter chain \"\": transport socket \"envoy.transport_sockets.tls\" on a chain not matched on transport_protocol tls is not supported"
        );
        let by_source = |c: &mut FilterChain| {
            c.filter_chain_match = Some(envoy_types::pb::envoy::config::listener::v3::FilterChainMatch {
                source_ports: vec![443],
                ..Default::default()
            })
        };
        assert_eq!(
            refused(listener_with(tcp_proxy("b"), by_source, |_| {})),
            "Listener \"l\": filter_chains[0].filter_chain_match sets source_ports, which weft does not support"
        );
        let codes = RetryPolicy { retriable_status_codes: vec![409], ..Default::default() };
        let retries = RouteAction { retry_policy: Some(codes), ..Default::default() };
        assert_eq!(
            route(&pack_any(route_table(retries))).unwrap_err().to_string(),
            "RouteConfiguration \"backend\": virtual_hosts[0].routes[0].route.retry_policy sets retriable_status_codes, which weft does not support"
        );
        let on = RetryPolicy { retry_on: "5xx,retriable-4xx".into(), ..Default::default() };
        let retries = RouteAction { retry_policy: Some(on), ..Default::default() };
        assert!(
            route(&pack_any(route_table(retries)))
                .unwrap_err()
                .to_string()
                .contains("retry_on \"retriable-4xx\" is not supported"),
        );
        let mirror =
            RouteAction { idle_timeout: Some(protobuf::Duration { seconds: 5, nanos: 0 }), ..Default::default() };
        let mut inline = hcm(vec![]);
        let mut h = HttpConnectionManager::decode(inline.value.as_slice()).unwrap();
        h.route_specifier = Some(http_connection_manager::RouteSpecifier::RouteConfig(route_table(mirror)));
        inline.value = h.encode_to_vec();
        assert_eq!(
            refused(listener_with(inline, |c| c.name = "http".into(), |_| {})),
            "Listener \"l\": filter chain \"http\": http_connection_manager.route_config.virtual_hosts[0].routes[0].route \
             sets idle_timeout, which weft does not support"
        );
        let mut c = Cluster { name: "c".into(), ..Default::default() };
        c.lb_subset_config = Some(Default::default());
        assert_eq!(
            cluster(&pack_any(c.clone())).unwrap_err().to_string(),
            "Cluster \"c\": it sets lb_subset_config, which weft does not support"
        );
        c.lb_subset_config = None;
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32));
        // Envoy's outlier detection ejects on success rate unless told not to.
        c.outlier_detection = Some(Default::default());
        assert!(cluster(&pack_any(c.clone())).unwrap_err().to_string().contains("success-rate ejection"));
        c.outlier_detection.as_mut().unwrap().enforcing_success_rate = Some(UInt32Value { value: 0 });
        c.outlier_detection.as_mut().unwrap().enforcing_consecutive_5xx = Some(UInt32Value { value: 50 });
        assert!(cluster(&pack_any(c.clone())).unwrap_err().to_string().contains("weft enforces 0 or 100"));
        c.outlier_detection.as_mut().unwrap().enforcing_consecutive_5xx = None;
        let od = cluster(&pack_any(c.clone())).unwrap().outlier.unwrap();
        assert_eq!((od.consecutive_5xx, od.consecutive_gateway, od.panic_threshold), (Some(5), None, 50.0));
        c.outlier_detection = None;
        c.cluster_discovery_type = None;
        c.transport_socket = Some(tls);
        assert_eq!(
            cluster(&pack_any(c)).unwrap_err().to_string(),
            "Cluster \"c\": transport socket \"envoy.transport_sockets.tls\" has no typed_config"
        );
        let e = cluster(&pack_any(Cluster { name: "c".into(), ..Default::default() })).unwrap_err().to_string();
        assert_eq!(e, "Cluster \"c\": only EDS and STATIC clusters are supported");
    }

    #[test]
    fn route_timeout_is_decoded() {
        let timeout =
            RouteAction { timeout: Some(protobuf::Duration { seconds: 1, nanos: 500_000_000 }), ..Default::default() };
        let def = route(&pack_any(route_table(timeout))).unwrap();
        assert_eq!(def.virtual_hosts[0].rules[0].timeout, Some(Duration::from_millis(1500)));
        let zero = RouteAction { timeout: Some(protobuf::Duration::default()), ..Default::default() };
        assert_eq!(route(&pack_any(route_table(zero))).unwrap().virtual_hosts[0].rules[0].timeout, None);
    }

    /// A header match the route table could not honour is refused, naming the header; it is
    /// never dropped (the route would then match every request). An exact `:method` is kept.
    #[test]
    fn pseudo_header_matches_other_than_an_exact_method_are_refused() {
        let with_header = |name: &str, pattern: string_matcher::MatchPattern| {
            let mut rc = route_table(RouteAction::default());
            rc.virtual_hosts[0].routes[0].r#match.as_mut().unwrap().headers = vec![HeaderMatcher {
                name: name.into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                    match_pattern: Some(pattern),
                    ..Default::default()
                })),
                ..Default::default()
            }];
            route(&pack_any(rc))
        };
        let exact = |v: &str| string_matcher::MatchPattern::Exact(v.into());
        let regex = |v: &str| {
            string_matcher::MatchPattern::SafeRegex(envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: v.into(),
                ..Default::default()
            })
        };
        for (name, pattern, why) in [
            (":method", regex("GET|HEAD"), "only an exact :method match is supported"),
            (":method", exact("GET HEAD"), "\"GET HEAD\" is not an HTTP method"),
            (":authority", exact("admin.local"), "pseudo-header matches other than an exact :method are not supported"),
            (":path", regex("/admin.*"), "pseudo-header matches other than an exact :method are not supported"),
            (":scheme", exact("https"), "pseudo-header matches other than an exact :method are not supported"),
            ("bad header", exact("x"), "not a valid header name"),
        ] {
            let err = with_header(name, pattern).unwrap_err().to_string();
            assert!(err.contains(&format!("route 0 \"\": header {name:?}: {why}")), "{name}: {err}");
        }
        let def = with_header(":method", exact("DELETE")).unwrap();
        assert_eq!(def.virtual_hosts[0].rules[0].headers, [(":method".to_owned(), StrMatch::Exact("DELETE".into()))]);
    }
}
