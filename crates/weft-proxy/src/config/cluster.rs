//! Clusters (load balancing, upstream protocol and TLS, circuit breakers, retry limits,
//! outlier detection, health checks) and their endpoints (cluster load assignments).
use super::decode::{InvalidResource, decode, duration, invalid, ser_duration, ser_opt_duration, socket_addr};
use super::schema;
use super::tls::{self, UpstreamTlsDef};
use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds as cluster_thresholds;
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::maglev::v3::Maglev;
use envoy_types::pb::envoy::extensions::load_balancing_policies::random::v3::Random;
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::google::protobuf::{Any, UInt32Value, value};
use prost::{Message, Name};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use weft_api::names;
use weft_api::resource::{DEFAULT_CONNECT_TIMEOUT, LoadBalancer};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterDef {
    pub name: String,
    pub load_balancer: LoadBalancer,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Endpoints given inline (static clusters); EDS clusters get theirs separately.
    pub static_endpoints: Option<Vec<EndpointDef>>,
    /// An `ORIGINAL_DST` cluster (with `lb_policy: CLUSTER_PROVIDED`): a connection goes to
    /// its own original destination (a transparent instance's passthrough).
    pub original_dst: bool,
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
    let original_dst = matches!(c.cluster_discovery_type, Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::OriginalDst as i32);
    let load_balancer = match (from_list.map(|(lb, _)| lb), cluster::LbPolicy::try_from(c.lb_policy)) {
        (None, Ok(cluster::LbPolicy::ClusterProvided)) if original_dst => LoadBalancer::default(),
        (_, _) if original_dst => {
            return Err(bad("an ORIGINAL_DST cluster must have lb_policy CLUSTER_PROVIDED".into()));
        }
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
        _ if original_dst => None,
        _ => return Err(bad("only EDS, STATIC and ORIGINAL_DST clusters are supported".into())),
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
        original_dst,
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
