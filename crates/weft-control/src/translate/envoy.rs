//! Envoy v3 encoders: each turns part of the mesh's model into one standard resource (or a
//! piece of one). Plain functions of their inputs; which resources exist and when they are
//! made again is the pipeline's business (translate.rs).
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, LoadBalancingPolicy, OutlierDetection as EnvoyOutlierDetection, circuit_breakers,
    cluster, load_balancing_policy,
};
use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, Metadata, SocketAddress,
    TrafficDirection, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as CoreHeaderValue, HeaderValueOption, header_value_option,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy as EnvoyRetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, header_matcher, query_parameter_matcher,
    redirect_action, retry_policy, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager,
    http_connection_manager::PathWithEscapedSlashesAction, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::maglev::v3::Maglev;
use envoy_types::pb::envoy::extensions::load_balancing_policies::random::v3::Random;
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SpiffeCertValidatorConfig, SubjectAltNameMatcher, UpstreamTlsContext, common_tls_context, secret,
    spiffe_cert_validator_config, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{
    FractionalPercent, Percent, TokenBucket as EnvoyTokenBucket, fractional_percent,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Struct, UInt32Value, UInt64Value, Value, value};
use prost::{Message, Name};
use std::collections::{BTreeMap, HashMap};
use weft_api::Instance;
use weft_api::identity::{CERT_SECRET, ROOT_SECRET};
use weft_api::names;
use weft_api::names::{SPIFFE_VALIDATOR, TLS_INSPECTOR};
use weft_api::resource::{ActiveHealthCheck, DEFAULT_HEALTH_CHECK_INTERVAL, DEFAULT_HEALTH_CHECK_TIMEOUT};
use weft_api::resource::{
    ConsistentHash, DEFAULT_BASE_EJECTION_TIME, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONSECUTIVE_5XX,
    DEFAULT_MAX_EJECTION_PERCENT, DEFAULT_MAX_EJECTION_TIME, DEFAULT_PANIC_THRESHOLD, DEFAULT_RETRY_ON, Egress,
    EscapedSlashes, FaultInjection, HeaderMatchType, HttpRouteMatch, HttpRouteRule, LoadBalancer, MtlsMode,
    OutlierDetection, PathMatchType, PathModifierType, Protocol, RateLimitPolicy, RetryPolicy, ServiceSpec,
    TokenBucket, TrafficPolicySpec, percent_per_million,
};
use weft_api::resource::{DEFAULT_MIN_RETRIES_PER_SECOND, DEFAULT_RETRY_BUDGET_TTL};

/// What a service's inbound listeners check before the app: JWT, then authorization.
pub(super) struct InboundFilters {
    pub mtls: MtlsMode,
    pub jwt: Option<crate::authn::ServiceJwt>,
    pub rbac: crate::authz::ServiceRbac,
    pub rate_limit: Option<LocalRateLimit>,
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn socket_address(addr: &str) -> Address {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.parse().unwrap_or(0))),
            ..Default::default()
        })),
    }
}

fn duration(d: std::time::Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// The load balancer as an ordered `load_balancing_policy` list: a client uses the first
/// policy it supports. weft's proxy reads least_request (two choices) as P2C peak-EWMA;
/// gRPC clients that lack least_request fall back to round_robin.
fn load_balancing_policy(lb: LoadBalancer) -> LoadBalancingPolicy {
    let policy = |name: &str, any: Any| load_balancing_policy::Policy {
        typed_extension_config: Some(TypedExtensionConfig { name: name.to_owned(), typed_config: Some(any) }),
    };
    let round_robin =
        policy("envoy.load_balancing_policies.round_robin", envoy_types::util::pack_any(RoundRobin::default()));
    let ring_hash =
        || policy("envoy.load_balancing_policies.ring_hash", envoy_types::util::pack_any(RingHash::default()));
    let policies = match lb {
        LoadBalancer::P2cEwma => {
            let lr = LeastRequest { choice_count: Some(UInt32Value { value: 2 }), ..Default::default() };
            vec![policy("envoy.load_balancing_policies.least_request", envoy_types::util::pack_any(lr)), round_robin]
        }
        LoadBalancer::RoundRobin => vec![round_robin],
        LoadBalancer::Random => {
            vec![
                policy("envoy.load_balancing_policies.random", envoy_types::util::pack_any(Random::default())),
                round_robin,
            ]
        }
        LoadBalancer::RingHash => vec![ring_hash()],
        // gRPC clients lack Maglev: they hash on a ring.
        LoadBalancer::Maglev => {
            vec![
                policy("envoy.load_balancing_policies.maglev", envoy_types::util::pack_any(Maglev::default())),
                ring_hash(),
            ]
        }
    };
    LoadBalancingPolicy { policies }
}

/// A TrafficPolicy's retries as Envoy's route retry policy.
fn retry_policy(r: &RetryPolicy) -> EnvoyRetryPolicy {
    let on: Vec<&str> =
        if r.retry_on.is_empty() { DEFAULT_RETRY_ON.to_vec() } else { r.retry_on.iter().map(String::as_str).collect() };
    let base = r.backoff.as_ref().and_then(|b| b.base_interval).unwrap_or(std::time::Duration::from_millis(25));
    let max = r.backoff.as_ref().and_then(|b| b.max_interval).unwrap_or(base * 10);
    EnvoyRetryPolicy {
        retry_on: on.join(","),
        num_retries: Some(UInt32Value { value: r.attempts.unwrap_or(2) }),
        per_try_timeout: r.per_try_timeout.map(duration),
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(duration(base)),
            max_interval: Some(duration(max)),
        }),
        ..Default::default()
    }
}

/// A consistent-hash key as the route's hash policy.
fn hash_policy(h: &ConsistentHash) -> route_action::HashPolicy {
    use route_action::hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier};
    let specifier = match (&h.header, &h.cookie) {
        (Some(name), _) => {
            PolicySpecifier::Header(Header { header_name: name.to_ascii_lowercase(), ..Default::default() })
        }
        (None, Some(name)) => PolicySpecifier::Cookie(Cookie { name: name.clone(), ..Default::default() }),
        (None, None) => PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true }),
    };
    route_action::HashPolicy { policy_specifier: Some(specifier), terminal: false }
}

const FAULT_FILTER: &str = "envoy.filters.http.fault";
const RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";

/// A TrafficPolicy's rate limits as Envoy's local rate limit filter: the service-wide bucket
/// is the filter's own, the per-caller one a descriptor; with only a per-caller limit the
/// filter's bucket (which Envoy requires) is never consumed.
pub(super) fn local_rate_limit(service: &str, r: &RateLimitPolicy) -> LocalRateLimit {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{LocalRateLimitDescriptor, rate_limit_descriptor};
    let bucket = |b: &TokenBucket| EnvoyTokenBucket {
        max_tokens: b.burst.unwrap_or(b.requests),
        tokens_per_fill: Some(UInt32Value { value: b.requests }),
        fill_interval: Some(duration(b.interval.unwrap_or(std::time::Duration::from_secs(1)))),
    };
    let always = RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: fractional_percent::DenominatorType::Hundred as i32,
        }),
        ..Default::default()
    };
    LocalRateLimit {
        stat_prefix: service.to_owned(),
        token_bucket: r.service.as_ref().or(r.per_caller.as_ref()).map(bucket),
        filter_enabled: Some(always.clone()),
        filter_enforced: Some(always),
        descriptors: r
            .per_caller
            .as_ref()
            .map(|b| LocalRateLimitDescriptor {
                entries: vec![rate_limit_descriptor::Entry {
                    key: names::CALLER_DESCRIPTOR.to_owned(),
                    value: String::new(),
                }],
                token_bucket: Some(bucket(b)),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        always_consume_default_token_bucket: Some(BoolValue { value: r.service.is_some() }),
        rate_limited_as_resource_exhausted: true,
        ..Default::default()
    }
}

/// A TrafficPolicy's faults as the fault filter's per-route config.
fn http_fault(f: &FaultInjection) -> HttpFault {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, fault_abort};
    let share = |p: Option<f64>| FractionalPercent {
        numerator: percent_per_million(p),
        denominator: fractional_percent::DenominatorType::Million as i32,
    };
    HttpFault {
        delay: f.delay.as_ref().map(|d| FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(duration(d.fixed_delay))),
            percentage: Some(share(d.percentage)),
        }),
        abort: f.abort.as_ref().map(|a| FaultAbort {
            error_type: Some(match (a.grpc_status, a.http_status) {
                (Some(g), _) => fault_abort::ErrorType::GrpcStatus(g),
                (None, s) => fault_abort::ErrorType::HttpStatus(u32::from(s.unwrap_or(503))),
            }),
            percentage: Some(share(a.percentage)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A TrafficPolicy's active health check as Envoy's.
fn health_check(h: &ActiveHealthCheck) -> envoy_types::pb::envoy::config::core::v3::HealthCheck {
    use envoy_types::pb::envoy::config::core::v3::health_check;
    let n = |value: u32| Some(UInt32Value { value });
    let checker = match &h.http {
        Some(http) => health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
            path: http.path.clone(),
            ..Default::default()
        }),
        None => health_check::HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck::default()),
    };
    envoy_types::pb::envoy::config::core::v3::HealthCheck {
        timeout: Some(duration(h.timeout.unwrap_or(DEFAULT_HEALTH_CHECK_TIMEOUT))),
        interval: Some(duration(h.interval.unwrap_or(DEFAULT_HEALTH_CHECK_INTERVAL))),
        unhealthy_threshold: n(h.unhealthy_threshold.unwrap_or(2)),
        healthy_threshold: n(h.healthy_threshold.unwrap_or(1)),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// A TrafficPolicy's outlier detection as Envoy's: consecutive 5xx (on unless 0) and
/// consecutive gateway failures (on when set) enforced every time.
fn outlier_detection(od: &OutlierDetection) -> EnvoyOutlierDetection {
    let n = |value: u32| Some(UInt32Value { value });
    let five_xx = od.consecutive_5xx.unwrap_or(DEFAULT_CONSECUTIVE_5XX);
    let base = od.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION_TIME);
    EnvoyOutlierDetection {
        consecutive_5xx: n(five_xx.max(1)),
        enforcing_consecutive_5xx: n(if five_xx == 0 { 0 } else { 100 }),
        consecutive_gateway_failure: od.consecutive_gateway_errors.and_then(n),
        enforcing_consecutive_gateway_failure: n(if od.consecutive_gateway_errors.is_some() { 100 } else { 0 }),
        base_ejection_time: Some(duration(base)),
        max_ejection_time: Some(duration(od.max_ejection_time.unwrap_or(DEFAULT_MAX_EJECTION_TIME.max(base)))),
        max_ejection_percent: n(od.max_ejection_percent.unwrap_or(DEFAULT_MAX_EJECTION_PERCENT)),
        // Success-rate and failure-percentage ejection are not offered: off.
        enforcing_success_rate: n(0),
        ..Default::default()
    }
}

/// A retry budget's defaults (Envoy's budget, when a `TrafficPolicy` names none): retries in
/// flight may be 20% of the requests in flight, or 10, whichever is more. Envoy's own default
/// without a budget, 3 retries in flight, turned retries down under a handful of concurrent
/// clients.
const DEFAULT_RETRY_BUDGET_PERCENT: f64 = 20.0;
const DEFAULT_MIN_RETRY_CONCURRENCY: u32 = 10;

/// The cluster of a service; `retried`: some route's own policy retries requests to it.
pub(super) fn eds_cluster(
    name: &str,
    spec: &ServiceSpec,
    policy: Option<&TrafficPolicySpec>,
    retried: bool,
) -> Cluster {
    let max_requests = policy.and_then(|p| p.connection_pool.as_ref()).and_then(|p| p.max_requests);
    let per_instance = policy.and_then(|p| p.connection_pool.as_ref()).and_then(|p| p.max_connections_per_instance);
    let pending = policy.and_then(|p| p.connection_pool.as_ref()).and_then(|p| p.max_pending_requests);
    let retry = policy.and_then(|p| p.retry.as_ref());
    let budget = retry.and_then(|r| r.budget.as_ref());
    // A ratio budget (Linkerd's) has no Envoy field: it travels in the cluster's metadata.
    let ratio_budget = budget.filter(|b| b.ratio.is_some());
    // Otherwise retried requests get Envoy's budget, with weft's defaults for what is unset.
    let budget = (ratio_budget.is_none() && (retry.is_some() || retried)).then(|| {
        let b = budget.cloned().unwrap_or_default();
        (
            b.percent.unwrap_or(DEFAULT_RETRY_BUDGET_PERCENT),
            b.min_retry_concurrency.unwrap_or(DEFAULT_MIN_RETRY_CONCURRENCY),
        )
    });
    let limited = max_requests.is_some() || budget.is_some() || per_instance.is_some();
    let circuit_breakers = limited.then(|| CircuitBreakers {
        per_host_thresholds: per_instance
            .map(|value| circuit_breakers::Thresholds {
                max_connections: Some(UInt32Value { value }),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        thresholds: vec![circuit_breakers::Thresholds {
            max_pending_requests: per_instance.map(|_| UInt32Value { value: pending.unwrap_or(1024) }),
            max_requests: max_requests.map(|value| UInt32Value { value }),
            retry_budget: budget.map(|(percent, min)| circuit_breakers::thresholds::RetryBudget {
                budget_percent: Some(Percent { value: percent }),
                min_retry_concurrency: Some(UInt32Value { value: min }),
                ..Default::default()
            }),
            ..Default::default()
        }],
    });
    let outlier = policy.and_then(|p| p.outlier_detection.as_deref());
    let health_checks = policy.and_then(|p| p.health_check.as_deref()).map(health_check).into_iter().collect();
    let pool = policy.and_then(|p| p.connection_pool.as_ref());
    Cluster {
        metadata: ratio_budget.map(ratio_budget_metadata),
        typed_extension_protocol_options: pool.map(pool_protocol_options).unwrap_or_default(),
        health_checks,
        circuit_breakers,
        outlier_detection: outlier.map(outlier_detection),
        common_lb_config: outlier.map(|od| cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Percent {
                value: f64::from(od.panic_threshold.unwrap_or(DEFAULT_PANIC_THRESHOLD)),
            }),
            ..Default::default()
        }),
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig { eds_config: Some(ads()), service_name: String::new() }),
        connect_timeout: Some(duration(spec.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT))),
        load_balancing_policy: Some(load_balancing_policy(spec.load_balancer)),
        ..Default::default()
    }
}

/// A ratio retry budget as the cluster's `weft` metadata: `retry_budget` with `ratio`,
/// `min_retries_per_second` and `ttl_seconds`.
fn ratio_budget_metadata(b: &weft_api::resource::RetryBudget) -> envoy_types::pb::envoy::config::core::v3::Metadata {
    let number = |n: f64| Value { kind: Some(value::Kind::NumberValue(n)) };
    let budget = Struct {
        fields: [
            ("ratio".to_owned(), number(b.ratio.unwrap_or(0.2))),
            (
                "min_retries_per_second".to_owned(),
                number(f64::from(b.min_retries_per_second.unwrap_or(DEFAULT_MIN_RETRIES_PER_SECOND))),
            ),
            ("ttl_seconds".to_owned(), number(b.ttl.unwrap_or(DEFAULT_RETRY_BUDGET_TTL).as_secs_f64())),
        ]
        .into(),
    };
    let weft =
        Struct { fields: [("retry_budget".to_owned(), Value { kind: Some(value::Kind::StructValue(budget)) })].into() };
    envoy_types::pb::envoy::config::core::v3::Metadata {
        filter_metadata: [(names::ENDPOINT_METADATA_NAMESPACE.to_owned(), weft)].into(),
        ..Default::default()
    }
}

/// Connection limits of a TrafficPolicy as the cluster's HTTP protocol options (the callee's
/// sidecar is spoken to in the client's HTTP version).
fn pool_protocol_options(pool: &weft_api::resource::ConnectionPool) -> HashMap<String, Any> {
    use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions as CommonHttpProtocolOptions;
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
    if pool.max_requests_per_connection.is_none()
        && pool.idle_timeout.is_none()
        && pool.max_connection_duration.is_none()
    {
        return HashMap::new();
    }
    let options = HttpProtocolOptions {
        common_http_protocol_options: Some(CommonHttpProtocolOptions {
            idle_timeout: pool.idle_timeout.map(duration),
            max_connection_duration: pool.max_connection_duration.map(duration),
            max_requests_per_connection: pool.max_requests_per_connection.map(|value| UInt32Value { value }),
            ..Default::default()
        }),
        upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            Default::default(),
        )),
        ..Default::default()
    };
    HashMap::from([(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
        envoy_types::util::pack_any(options),
    )])
}

/// The HTTP version a sidecar speaks to its app: the one the service declares (`http`:
/// HTTP/1.1; `http2`, `grpc`: HTTP/2), whatever its clients speak; otherwise the client's.
fn app_protocol_options(protocol: Protocol) -> HashMap<String, Any> {
    use envoy_types::pb::envoy::config::core::v3::{Http1ProtocolOptions, Http2ProtocolOptions};
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
    use http_protocol_options::explicit_http_config::ProtocolConfig;
    let config = match protocol {
        Protocol::Http => ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default()),
        Protocol::Http2 | Protocol::Grpc => ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default()),
        Protocol::Auto | Protocol::Tcp => return HashMap::new(),
    };
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            http_protocol_options::ExplicitHttpConfig { protocol_config: Some(config) },
        )),
        ..Default::default()
    };
    HashMap::from([(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
        envoy_types::util::pack_any(options),
    )])
}

pub(super) fn static_cluster(name: &str, addr: &str, protocol: Protocol) -> Cluster {
    let endpoint = lb_endpoint(addr, HealthStatus::Healthy, None);
    Cluster {
        typed_extension_protocol_options: app_protocol_options(protocol),
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Static as i32)),
        connect_timeout: Some(duration(DEFAULT_CONNECT_TIMEOUT)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint],
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(value::Kind::StringValue(s.to_owned())) }
}

fn lb_endpoint(addr: &str, health: HealthStatus, instance: Option<&Instance>) -> LbEndpoint {
    let metadata = instance.map(|i| {
        let mut fields: HashMap<String, Value> =
            i.registration.labels.iter().map(|(k, v)| (k.clone(), string_value(v))).collect();
        fields.insert("instance".to_owned(), string_value(&i.id));
        Metadata {
            filter_metadata: HashMap::from([(names::ENDPOINT_METADATA_NAMESPACE.to_owned(), Struct { fields })]),
            ..Default::default()
        }
    });
    LbEndpoint {
        health_status: health as i32,
        metadata,
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(addr)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A peer datacenter's instances of a service, as this datacenter reaches them: through the
/// peer's mesh gateways, which stand for all of them.
#[derive(Debug, Clone)]
pub(super) struct Remote<'a> {
    pub datacenter: &'a str,
    pub gateways: &'a [String],
    /// Whether any of the peer's instances serves.
    pub serving: bool,
    /// The SPIFFE ID its instances of the service prove.
    pub identity: String,
}

/// The instances of a service by zone; `near` (a caller's zone) puts that zone's at priority 0
/// and the others at 1, which clients treat as a failover order. Peer datacenters' come after
/// them, one priority each in `remote`'s order, as endpoints at their mesh gateways with the
/// datacenter as their locality's region.
pub(super) fn load_assignment(
    name: &str,
    members: &[&Instance],
    near: Option<&str>,
    remote: &[Remote<'_>],
) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for i in members {
        let Some(addr) = &i.registration.inbound else { continue };
        let health = if i.serving() { HealthStatus::Healthy } else { HealthStatus::Unhealthy };
        let zone = i.registration.labels.get("zone").map(String::as_str).unwrap_or("");
        by_zone.entry(zone).or_default().push(lb_endpoint(addr, health, Some(i)));
    }
    let local_levels = if near.is_some() { 2 } else { 1 };
    let local = by_zone.into_iter().map(|(zone, lb_endpoints)| LocalityLbEndpoints {
        locality: Some(Locality { zone: zone.to_owned(), ..Default::default() }),
        lb_endpoints,
        // gRPC clients ignore localities without a weight.
        load_balancing_weight: Some(UInt32Value { value: 1 }),
        priority: u32::from(near.is_some_and(|n| n != zone)),
        ..Default::default()
    });
    let remote = remote.iter().enumerate().filter(|(_, r)| !r.gateways.is_empty()).map(|(i, r)| {
        let health = if r.serving { HealthStatus::Healthy } else { HealthStatus::Unhealthy };
        LocalityLbEndpoints {
            locality: Some(Locality { region: r.datacenter.to_owned(), ..Default::default() }),
            lb_endpoints: r.gateways.iter().map(|g| remote_endpoint(g, health, r)).collect(),
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            priority: local_levels + i as u32,
            ..Default::default()
        }
    });
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: local.chain(remote).collect(),
        ..Default::default()
    }
}

/// A peer's mesh gateway standing for its instances of a service (labelled with the
/// `datacenter` and the `identity` they prove).
fn remote_endpoint(gateway: &str, health: HealthStatus, remote: &Remote<'_>) -> LbEndpoint {
    let fields = HashMap::from([
        ("datacenter".to_owned(), string_value(remote.datacenter)),
        ("identity".to_owned(), string_value(&remote.identity)),
    ]);
    LbEndpoint {
        metadata: Some(Metadata {
            filter_metadata: HashMap::from([(names::ENDPOINT_METADATA_NAMESPACE.to_owned(), Struct { fields })]),
            ..Default::default()
        }),
        ..lb_endpoint(gateway, health, None)
    }
}

/// A mesh gateway's listener: it reads the server name of each TLS connection (without
/// terminating it) and hands the connection, still encrypted, to the cluster of the service
/// that name is of; a connection for any other name matches no chain and is closed.
pub(super) fn mesh_gateway_listener(name: &str, addr: &str, routes: &[(String, String)]) -> Listener {
    let chains = routes
        .iter()
        .map(|(server_name, cluster)| {
            let tcp = TcpProxy {
                stat_prefix: cluster.clone(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.clone())),
                ..Default::default()
            };
            FilterChain {
                name: server_name.clone(),
                filter_chain_match: Some(FilterChainMatch {
                    server_names: vec![server_name.clone()],
                    ..Default::default()
                }),
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".to_owned(),
                    config_type: Some(filter::ConfigType::TypedConfig(envoy_types::util::pack_any(tcp))),
                }],
                ..Default::default()
            }
        })
        .collect();
    Listener {
        name: name.to_owned(),
        address: Some(socket_address(addr)),
        listener_filters: vec![ListenerFilter {
            name: TLS_INSPECTOR.to_owned(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(
                TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: chains,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// A mesh gateway's cluster of a service's own instances, without TLS of its own: what
/// it forwards is the caller's mutual TLS, to the instances' sidecars.
pub(super) fn gateway_cluster(name: &str, connect_timeout: std::time::Duration) -> Cluster {
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig { eds_config: Some(ads()), service_name: String::new() }),
        connect_timeout: Some(duration(connect_timeout)),
        ..Default::default()
    }
}

/// A rule of an HTTPRoute with the route's hostnames (empty: any host).
pub(super) type HostRule<'a> = (&'a [String], PolicedRule<'a>);

/// A rule with the TrafficPolicy that targets its HTTPRoute, if any, and that route's name
/// (the proxies' `route` label).
pub(super) type PolicedRule<'a> = (&'a HttpRouteRule, Option<&'a TrafficPolicySpec>, &'a str);

/// Gateway API precedence (HTTPRouteRule): exact paths, then regular expressions (their place
/// is implementation-specific in the spec; after prefixes, a catch-all `/` would hide them),
/// then prefixes, longer first; then a method match, then more header matches, then more
/// query parameter matches; ties keep the order in which rules were applied.
fn precedence(m: &HttpRouteMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        Some(p) if p.kind == PathMatchType::Exact => (0, p.value.len()),
        Some(p) if p.kind == PathMatchType::RegularExpression => (1, p.value.len()),
        Some(p) => (2, p.value.len()),
        None => (2, 1),
    };
    (kind, usize::MAX - len, m.method.is_none(), usize::MAX - m.headers.len(), usize::MAX - m.query_params.len())
}

fn string_match(kind: HeaderMatchType, value: &str) -> StringMatcher {
    let pattern = match kind {
        HeaderMatchType::Exact => string_matcher::MatchPattern::Exact(value.to_owned()),
        HeaderMatchType::RegularExpression => string_matcher::MatchPattern::SafeRegex(regex(value)),
    };
    StringMatcher { match_pattern: Some(pattern), ..Default::default() }
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher { regex: pattern.to_owned(), ..Default::default() }
}

fn header_options(
    headers: &[weft_api::resource::HeaderValue],
    action: header_value_option::HeaderAppendAction,
) -> Vec<HeaderValueOption> {
    headers
        .iter()
        .map(|h| HeaderValueOption {
            header: Some(CoreHeaderValue {
                key: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        })
        .collect()
}

/// A rule's filters on a route: header modifiers on the route, rewrites on its action.
fn apply_filters(route: &mut Route, rule: &HttpRouteRule) {
    use header_value_option::HeaderAppendAction::{AppendIfExistsOrAdd, OverwriteIfExistsOrAdd};
    for f in &rule.filters {
        if let Some(m) = &f.request_header_modifier {
            route.request_headers_to_add.extend(header_options(&m.set, OverwriteIfExistsOrAdd));
            route.request_headers_to_add.extend(header_options(&m.add, AppendIfExistsOrAdd));
            route.request_headers_to_remove.extend(m.remove.iter().map(|n| n.to_ascii_lowercase()));
        }
        if let Some(m) = &f.response_header_modifier {
            route.response_headers_to_add.extend(header_options(&m.set, OverwriteIfExistsOrAdd));
            route.response_headers_to_add.extend(header_options(&m.add, AppendIfExistsOrAdd));
            route.response_headers_to_remove.extend(m.remove.iter().map(|n| n.to_ascii_lowercase()));
        }
        if let (Some(m), Some(route::Action::Route(action))) = (&f.request_mirror, &mut route.action) {
            action.request_mirror_policies.push(route_action::RequestMirrorPolicy {
                cluster: m.backend_ref.name.clone(),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent {
                        numerator: m.per_million(),
                        denominator: fractional_percent::DenominatorType::Million as i32,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        if let (Some(u), Some(route::Action::Route(action))) = (&f.url_rewrite, &mut route.action) {
            if let Some(h) = &u.hostname {
                action.host_rewrite_specifier = Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h.clone()));
            }
            match u.path.as_ref().map(|p| (p.kind, p.replace_full_path.as_deref(), p.replace_prefix_match.as_deref())) {
                Some((PathModifierType::ReplacePrefixMatch, _, Some(to))) => action.prefix_rewrite = to.to_owned(),
                Some((PathModifierType::ReplaceFullPath, Some(to), _)) => {
                    action.regex_rewrite =
                        Some(RegexMatchAndSubstitute { pattern: Some(regex("^/.*$")), substitution: to.to_owned() });
                }
                _ => {}
            }
        }
    }
}

fn route_action(rule: &HttpRouteRule) -> route::Action {
    if let Some(r) = rule.filters.iter().find_map(|f| f.request_redirect.as_ref()) {
        return route::Action::Redirect(redirect_action(r));
    }
    let specifier = if rule.backend_refs.len() == 1 {
        route_action::ClusterSpecifier::Cluster(rule.backend_refs[0].name.clone())
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: rule
                .backend_refs
                .iter()
                .filter(|b| b.weight > 0)
                .map(|b| weighted_cluster::ClusterWeight {
                    name: b.name.clone(),
                    weight: Some(UInt32Value { value: b.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    let timeout = rule.timeouts.as_ref().and_then(|t| t.effective()).filter(|t| !t.is_zero()).map(duration);
    route::Action::Route(RouteAction { cluster_specifier: Some(specifier), timeout, ..Default::default() })
}

fn redirect_action(r: &weft_api::resource::RequestRedirect) -> RedirectAction {
    use redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let code = match r.status_code.unwrap_or(302) {
        301 => RedirectResponseCode::MovedPermanently,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::Found,
    };
    let path = r.path.as_ref().and_then(|p| match p.kind {
        PathModifierType::ReplaceFullPath => p.replace_full_path.clone().map(PathRewriteSpecifier::PathRedirect),
        PathModifierType::ReplacePrefixMatch => p.replace_prefix_match.clone().map(PathRewriteSpecifier::PrefixRewrite),
    });
    RedirectAction {
        scheme_rewrite_specifier: r.scheme.clone().map(SchemeRewriteSpecifier::SchemeRedirect),
        host_redirect: r.hostname.clone().unwrap_or_default(),
        port_redirect: r.port.map_or(0, u32::from),
        path_rewrite_specifier: path,
        response_code: code as i32,
        ..Default::default()
    }
}

fn exact_header(value: &str) -> header_matcher::HeaderMatchSpecifier {
    header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_owned())),
        ..Default::default()
    })
}

fn default_route(cluster: &str) -> Route {
    Route {
        name: "default".to_owned(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_owned())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The routes of the rules given, in Gateway API precedence, then the service's default route.
fn routes(service: &str, rules: &[PolicedRule<'_>]) -> Vec<Route> {
    let mut matched: Vec<(&HttpRouteMatch, &HttpRouteRule, Option<&TrafficPolicySpec>, &str)> = Vec::new();
    let always = HttpRouteMatch::default();
    for (rule, policy, name) in rules {
        if rule.matches.is_empty() {
            matched.push((&always, rule, *policy, *name));
        }
        matched.extend(rule.matches.iter().map(|m| (m, *rule, *policy, *name)));
    }
    matched.sort_by_key(|(m, _, _, _)| precedence(m));
    let mut routes: Vec<Route> = matched
        .into_iter()
        .map(|(m, rule, policy, name)| {
            let path = match &m.path {
                Some(p) if p.kind == PathMatchType::Exact => route_match::PathSpecifier::Path(p.value.clone()),
                Some(p) if p.kind == PathMatchType::RegularExpression => {
                    route_match::PathSpecifier::SafeRegex(regex(&p.value))
                }
                Some(p) => route_match::PathSpecifier::Prefix(p.value.clone()),
                None => route_match::PathSpecifier::Prefix("/".to_owned()),
            };
            let mut headers: Vec<HeaderMatcher> = m
                .headers
                .iter()
                .map(|h| HeaderMatcher {
                    name: h.name.to_ascii_lowercase(),
                    header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(string_match(
                        h.kind, &h.value,
                    ))),
                    ..Default::default()
                })
                .collect();
            if let Some(method) = &m.method {
                headers.push(HeaderMatcher {
                    name: ":method".to_owned(),
                    header_match_specifier: Some(exact_header(method)),
                    ..Default::default()
                });
            }
            let query_parameters = m
                .query_params
                .iter()
                .map(|q| QueryParameterMatcher {
                    name: q.name.clone(),
                    query_parameter_match_specifier: Some(
                        query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_match(
                            q.kind, &q.value,
                        )),
                    ),
                })
                .collect();
            let mut route = Route {
                name: name.to_owned(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(path),
                    headers,
                    query_parameters,
                    ..Default::default()
                }),
                action: Some(route_action(rule)),
                ..Default::default()
            };
            apply_filters(&mut route, rule);
            if let Some(p) = policy {
                apply_policy(&mut route, p);
            }
            route
        })
        .collect();
    routes.push(default_route(service));
    routes
}

/// A TrafficPolicy's per-request settings on a route: retries and faults, where the route
/// has none yet (a policy for its HTTPRoute is applied before the service's).
fn apply_policy(route: &mut Route, p: &TrafficPolicySpec) {
    let Some(route::Action::Route(action)) = &mut route.action else { return };
    if action.retry_policy.is_none()
        && let Some(r) = &p.retry
    {
        action.retry_policy = Some(retry_policy(r));
        route.request_body_buffer_limit = r.max_body_bytes.map(|b| UInt64Value { value: u64::from(b) });
    }
    if let Some(f) = p.fault.as_deref()
        && !route.typed_per_filter_config.contains_key(FAULT_FILTER)
    {
        route.typed_per_filter_config.insert(FAULT_FILTER.to_owned(), envoy_types::util::pack_any(http_fault(f)));
    }
}

/// A service's route table: a virtual host per hostname that routes name (their rules, then
/// the rules of routes without hostnames), and a `*` host for every other request.
pub(super) fn route_config(
    service: &str,
    rules: &[HostRule<'_>],
    policy: Option<&TrafficPolicySpec>,
    hash: Option<&ConsistentHash>,
) -> RouteConfiguration {
    let mut hostnames: Vec<&String> = rules.iter().flat_map(|(h, _)| h.iter()).collect();
    hostnames.sort();
    hostnames.dedup();
    let any_host: Vec<PolicedRule<'_>> = rules.iter().filter(|(h, _)| h.is_empty()).map(|(_, r)| *r).collect();
    let mut virtual_hosts: Vec<VirtualHost> = hostnames
        .into_iter()
        .map(|host| {
            let named: Vec<PolicedRule<'_>> = rules
                .iter()
                .filter(|(h, _)| h.contains(host))
                .map(|(_, r)| *r)
                .chain(any_host.iter().copied())
                .collect();
            VirtualHost {
                name: format!("{service}|{host}"),
                domains: vec![host.clone()],
                routes: routes(service, &named),
                ..Default::default()
            }
        })
        .collect();
    virtual_hosts.push(VirtualHost {
        name: service.to_owned(),
        domains: vec!["*".to_owned()],
        routes: routes(service, &any_host),
        ..Default::default()
    });
    // Every request addressed to the service gets its retries and faults, whichever version
    // serves it, unless a policy for the rule's HTTPRoute set them.
    let hash_policy: Vec<route_action::HashPolicy> = hash.map(hash_policy).into_iter().collect();
    for route in virtual_hosts.iter_mut().flat_map(|v| v.routes.iter_mut()) {
        if let Some(p) = policy {
            apply_policy(route, p);
        }
        if let Some(route::Action::Route(action)) = &mut route.action {
            action.hash_policy.clone_from(&hash_policy);
        }
    }
    RouteConfiguration { name: service.to_owned(), virtual_hosts, ..Default::default() }
}

pub(super) fn inbound_route() -> RouteConfiguration {
    RouteConfiguration {
        name: names::INBOUND_ROUTE.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: names::INBOUND_ROUTE.to_owned(),
            domains: vec!["*".to_owned()],
            routes: vec![default_route(names::INBOUND_CLUSTER)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub(super) enum HttpRoutes<'a> {
    Rds(&'a str),
    Inline(Box<RouteConfiguration>),
}

fn http_connection_manager(stat_prefix: &str, routes: HttpRoutes<'_>) -> HttpConnectionManager {
    let route_specifier = match routes {
        HttpRoutes::Rds(name) => http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_owned(),
        }),
        HttpRoutes::Inline(rc) => http_connection_manager::RouteSpecifier::RouteConfig(*rc),
    };
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_owned(),
        route_specifier: Some(route_specifier),
        http_filters: vec![
            // Configured per route, where a TrafficPolicy injects faults.
            HttpFilter {
                name: FAULT_FILTER.to_owned(),
                config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(
                    HttpFault::default(),
                ))),
                ..Default::default()
            },
            HttpFilter {
                name: "envoy.filters.http.router".to_owned(),
                config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(Router::default()))),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

pub(super) fn api_listener(service: &str) -> Listener {
    let hcm = http_connection_manager(service, HttpRoutes::Rds(service));
    Listener {
        name: service.to_owned(),
        api_listener: Some(ApiListener { api_listener: Some(envoy_types::util::pack_any(hcm)) }),
        ..Default::default()
    }
}

/// A listener with protocol detection: an HTTP filter chain matched on the detected
/// application protocol, and an opaque TCP chain for everything else. A declared protocol
/// keeps only the chain that applies.
///
/// `service` is the service whose traffic the listener carries (the proxy's own for inbound):
/// it is the filters' `stat_prefix`, which proxies use to label metrics.
///
/// `inbound` (inbound listeners): the chains are matched on `transport_protocol: tls` and
/// terminate mutual TLS, and in permissive mode the plaintext chains follow them; the HTTP
/// chain checks JWTs, then every chain authorizes. A service that requires a JWT has no TCP
/// chain: a connection that is not HTTP could not carry one.
#[allow(clippy::too_many_arguments)]
pub(super) fn proxy_listener(
    name: &str,
    addr: &str,
    direction: TrafficDirection,
    service: &str,
    protocol: Protocol,
    slashes: EscapedSlashes,
    http: HttpRoutes<'_>,
    tcp_cluster: &str,
    inbound: Option<&InboundFilters>,
    telemetry: super::telemetry::HcmTelemetry,
) -> Listener {
    let mut plain = Vec::new();
    let rbac = inbound.map(|f| &f.rbac).filter(|r| !r.is_empty());
    let jwt = inbound.and_then(|f| f.jwt.as_ref());
    if protocol != Protocol::Tcp {
        let mut hcm = http_connection_manager(service, http);
        hcm.access_log = telemetry.access_log;
        hcm.tracing = telemetry.tracing;
        // Paths are normalised before routing and authorization, as Istio's default does.
        hcm.normalize_path = Some(BoolValue { value: true });
        hcm.merge_slashes = true;
        hcm.path_with_escaped_slashes_action = match slashes {
            EscapedSlashes::Keep => PathWithEscapedSlashesAction::KeepUnchanged,
            EscapedSlashes::Decode => PathWithEscapedSlashesAction::UnescapeAndForward,
            EscapedSlashes::Reject => PathWithEscapedSlashesAction::RejectRequest,
        } as i32;
        let jwt_filter = jwt.map(|j| HttpFilter {
            name: "envoy.filters.http.jwt_authn".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(j.filter.clone()))),
            ..Default::default()
        });
        let rbac_filters = rbac.map(|r| r.http()).unwrap_or_default().into_iter().map(|f| HttpFilter {
            name: "envoy.filters.http.rbac".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(f))),
            ..Default::default()
        });
        let rate_limit = inbound.and_then(|f| f.rate_limit.as_ref()).map(|r| HttpFilter {
            name: RATE_LIMIT_FILTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::util::pack_any(r.clone()))),
            ..Default::default()
        });
        hcm.http_filters.splice(0..0, jwt_filter.into_iter().chain(rbac_filters).chain(rate_limit));
        plain.push(FilterChain {
            name: "http".to_owned(),
            filter_chain_match: (protocol == Protocol::Auto).then(|| FilterChainMatch {
                application_protocols: vec!["http/1.1".to_owned(), "h2c".to_owned()],
                ..Default::default()
            }),
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(envoy_types::util::pack_any(hcm))),
            }],
            ..Default::default()
        });
    }
    if matches!(protocol, Protocol::Auto | Protocol::Tcp) && !jwt.is_some_and(|j| j.required) {
        let tcp = TcpProxy {
            stat_prefix: service.to_owned(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(tcp_cluster.to_owned())),
            ..Default::default()
        };
        let mut filters: Vec<Filter> = rbac
            .map(|r| r.network(service))
            .unwrap_or_default()
            .into_iter()
            .map(|f| Filter {
                name: "envoy.filters.network.rbac".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(envoy_types::util::pack_any(f))),
            })
            .collect();
        filters.push(Filter {
            name: "envoy.filters.network.tcp_proxy".to_owned(),
            config_type: Some(filter::ConfigType::TypedConfig(envoy_types::util::pack_any(tcp))),
        });
        plain.push(FilterChain { name: "tcp".to_owned(), filters, ..Default::default() });
    }
    let chains = match inbound.map(|f| f.mtls) {
        None => plain,
        Some(mode) => {
            let socket = tls_socket(&downstream_tls());
            let mut chains: Vec<FilterChain> = plain
                .iter()
                .map(|c| {
                    // Inside TLS the application protocol is the one ALPN negotiated.
                    let alpn = match c.name.as_str() {
                        "http" => vec!["h2".to_owned(), "http/1.1".to_owned()],
                        _ => vec![],
                    };
                    FilterChain {
                        name: format!("{}-mtls", c.name),
                        filter_chain_match: Some(FilterChainMatch {
                            transport_protocol: "tls".to_owned(),
                            application_protocols: alpn,
                            ..Default::default()
                        }),
                        transport_socket: Some(socket.clone()),
                        filters: c.filters.clone(),
                        ..Default::default()
                    }
                })
                .collect();
            if mode == MtlsMode::Permissive {
                chains.extend(plain);
            }
            chains
        }
    };
    Listener {
        name: name.to_owned(),
        address: Some(socket_address(addr)),
        filter_chains: chains,
        traffic_direction: direction as i32,
        ..Default::default()
    }
}

/// A transparent instance's capture listener (`use_original_dst`): each connection goes to the
/// listener of its original destination. One with none (out of the mesh) goes, under
/// `allow-any`, through the filter chain here, a tcp_proxy to the passthrough cluster; under
/// `registry-only` it matches no chain and is closed.
pub(super) fn capture_listener(addr: &str, egress: Egress) -> Listener {
    let tcp = TcpProxy {
        stat_prefix: "passthrough".to_owned(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(names::PASSTHROUGH_CLUSTER.to_owned())),
        ..Default::default()
    };
    let passthrough = FilterChain {
        name: "passthrough".to_owned(),
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".to_owned(),
            config_type: Some(filter::ConfigType::TypedConfig(envoy_types::util::pack_any(tcp))),
        }],
        ..Default::default()
    };
    Listener {
        name: names::CAPTURE_LISTENER.to_owned(),
        address: Some(socket_address(addr)),
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains: match egress {
            Egress::AllowAny => vec![passthrough],
            Egress::RegistryOnly => vec![],
        },
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

/// Connections to destinations outside the mesh: each goes where it was going
/// (`ORIGINAL_DST`).
pub(super) fn passthrough_cluster() -> Cluster {
    Cluster {
        name: names::PASSTHROUGH_CLUSTER.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::OriginalDst as i32)),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(duration(DEFAULT_CONNECT_TIMEOUT)),
        ..Default::default()
    }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig { name: name.to_owned(), sds_config: Some(ads()) }
}

/// TLS settings both sides share: the proxy's own certificate and the mesh's trust bundle;
/// on origination, the SPIFFE IDs the upstream may present.
fn common_tls(identities: &[String]) -> CommonTlsContext {
    let default_validation_context = (!identities.is_empty()).then(|| CertificateValidationContext {
        match_typed_subject_alt_names: identities
            .iter()
            .map(|id| SubjectAltNameMatcher {
                san_type: subject_alt_name_matcher::SanType::Uri as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(id.clone())),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(CERT_SECRET)],
        validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
            common_tls_context::CombinedCertificateValidationContext {
                default_validation_context,
                validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// Origination: the upstream must present a certificate for one of `identities` (a service's
/// own, and its peers' where they export it). `sni` names the service for a peer's mesh
/// gateway, which routes by it.
pub(super) fn upstream_tls(identities: &[String], sni: Option<String>) -> UpstreamTlsContext {
    UpstreamTlsContext {
        common_tls_context: Some(common_tls(identities)),
        sni: sni.unwrap_or_default(),
        ..Default::default()
    }
}

/// Termination: the client must present a certificate chaining to the bundle.
fn downstream_tls() -> DownstreamTlsContext {
    DownstreamTlsContext {
        common_tls_context: Some(common_tls(&[])),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    }
}

pub(super) fn tls_socket<M: Message + Name>(ctx: &M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
            type_url: M::type_url(),
            value: ctx.encode_to_vec(),
        })),
    }
}

/// The trust bundle: this mesh's roots (`trusted_ca`, the signing one first) and, once it is
/// peered, each trust domain's own roots (Envoy's SPIFFE certificate validator), so a peer's
/// roots are trusted for identities of the peer's trust domain only.
pub(super) fn root_secret(bundle: &str, trust_domain: &str, peers: &[(&str, &str)]) -> Secret {
    let inline = |pem: &str| DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(pem.as_bytes().to_vec())),
        ..Default::default()
    };
    let custom_validator_config = (!peers.is_empty()).then(|| {
        let domains = std::iter::once((trust_domain, bundle)).chain(peers.iter().copied());
        let spiffe = SpiffeCertValidatorConfig {
            trust_domains: domains
                .map(|(name, pem)| spiffe_cert_validator_config::TrustDomain {
                    name: name.to_owned(),
                    trust_bundle: Some(inline(pem)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        TypedExtensionConfig {
            name: SPIFFE_VALIDATOR.to_owned(),
            typed_config: Some(envoy_types::util::pack_any(spiffe)),
        }
    });
    Secret {
        name: ROOT_SECRET.to_owned(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(inline(bundle)),
            custom_validator_config,
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend of each route `routes` makes of the rules (one backend per rule), in order.
    fn order(rules: serde_json::Value) -> Vec<String> {
        let rules: Vec<HttpRouteRule> = serde_json::from_value(rules).unwrap();
        let policed: Vec<PolicedRule<'_>> = rules.iter().map(|r| (r, None, "r")).collect();
        routes("svc", &policed)
            .into_iter()
            .map(|r| match r.action {
                Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(c)),
                    ..
                })) => c,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn rule(backend: &str, m: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"matches": [m], "backendRefs": [{"name": backend}]})
    }

    /// The spec's criteria, each breaking a tie of the ones before it: an exact path, the
    /// longest prefix, a method match, the most header matches, the most query parameter
    /// matches; then the first rule. Rules are given in the reverse of that order.
    #[test]
    fn rules_are_ordered_by_gateway_api_precedence() {
        let rules = serde_json::json!([
            rule("first-of-equals", serde_json::json!({})),
            rule("second-of-equals", serde_json::json!({})),
            rule("query", serde_json::json!({"queryParams": [{"name": "q", "value": "1"}]})),
            rule(
                "two-queries",
                serde_json::json!({"queryParams": [{"name": "q", "value": "1"}, {"name": "r", "value": "1"}]})
            ),
            rule(
                "header",
                serde_json::json!({"headers": [{"name": "x-a", "value": "1"}], "queryParams": [{"name": "q", "value": "1"}, {"name": "r", "value": "1"}, {"name": "s", "value": "1"}]})
            ),
            rule(
                "two-headers",
                serde_json::json!({"headers": [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "1"}]})
            ),
            rule("method", serde_json::json!({"method": "DELETE"})),
            rule(
                "method-and-header",
                serde_json::json!({"method": "DELETE", "headers": [{"name": "x-a", "value": "1"}]})
            ),
            rule(
                "prefix",
                serde_json::json!({"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "1"}, {"name": "x-c", "value": "1"}], "method": "GET"})
            ),
            rule("longer-prefix", serde_json::json!({"path": {"type": "PathPrefix", "value": "/api/v1"}})),
            rule("exact", serde_json::json!({"path": {"type": "Exact", "value": "/"}})),
        ]);
        assert_eq!(
            order(rules),
            [
                "exact",
                "longer-prefix",
                "prefix",
                "method-and-header",
                "method",
                "two-headers",
                "header",
                "two-queries",
                "query",
                "first-of-equals",
                "second-of-equals",
                "svc",
            ]
        );
    }

    /// The issue's case: `DELETE` with a matching header goes to the method rule.
    #[test]
    fn a_method_match_outranks_a_header_match() {
        let rules = serde_json::json!([
            rule("by-header", serde_json::json!({"headers": [{"name": "x-canary", "value": "yes"}]})),
            rule("by-method", serde_json::json!({"method": "DELETE"})),
        ]);
        assert_eq!(order(rules), ["by-method", "by-header", "svc"]);
    }
}
