//! The round trip of every policy a `TrafficPolicy`, a `Service`, an `HTTPRoute` and an
//! `AuthorizationPolicy` carry: the resource as a
//! user applies it → the control plane's Envoy resources for a calling and a called proxy →
//! the proxy's own decoders (`weft_proxy::config`) → the policy the proxy enforces, compared
//! with what the README says the resource means. The encoders (translate.rs) and the decoders
//! (weft-proxy) are written apart; this keeps them saying the same thing. A property test
//! generates the resources, within what validation accepts.
use super::Type;
use crate::ca::CaConfig;
use crate::state::Mesh;
use proptest::prelude::*;
use std::time::Duration;
use weft_api::registry::{InstanceRegistration, Upstream};
use weft_api::resource::{
    ActiveHealthCheck, ConnectionPool, EscapedSlashes, FaultAbort, FaultDelay, FaultInjection, HttpHealthCheck,
    LoadBalancer, MtlsMode, OutlierDetection, RateLimitPolicy, Resource, RetryBackoff, RetryBudget, RetryPolicy,
    TcpHealthCheck, TokenBucket, TrafficPolicySpec,
};
use weft_proxy::config::{
    BucketDef, ClusterDef, FaultAbortDef, FaultDef, FaultDelayDef, HashDef, HealthCheckDef, ListenerDef, OutlierDef,
    PoolDef, RetryDef, RetryLimit, RetryOn, RuleDef,
};

/// What the proxies decode of service `b`'s policy: the caller's cluster and route rules for
/// `b`, and `b`'s own inbound listener.
#[derive(Debug)]
struct Decoded {
    cluster: ClusterDef,
    rules: Vec<RuleDef>,
    inbound: ListenerDef,
    /// The caller's outbound listener for `b`.
    outbound: ListenerDef,
}

fn registration(service: &str, port: u16, upstreams: Vec<Upstream>) -> InstanceRegistration {
    InstanceRegistration {
        service: Some(service.into()),
        inbound: Some(format!("127.0.0.1:{port}")),
        app: Some(format!("127.0.0.1:{}", port + 1)),
        admin: None,
        labels: Default::default(),
        upstreams,
        capture: None,
        mesh_gateway_local: None,
        healthy: true,
    }
}

/// Applies `docs` to a fresh mesh with an instance of `b` and one of `a` calling `b`, and
/// decodes what each proxy would get; or the control plane's refusal.
fn round_trip(docs: Vec<serde_json::Value>) -> Result<Decoded, String> {
    let dir = std::env::temp_dir().join(format!("weft-roundtrip-{}-{}", std::process::id(), fastrand::u64(..)));
    let ca = CaConfig {
        trust_domain: "test.local".into(),
        datacenter: "dc1".into(),
        namespace: "default".into(),
        cert_ttl: Duration::from_secs(3600),
        provided: None,
    };
    let mesh = Mesh::open(&dir, Duration::from_secs(60), ca, Default::default()).unwrap();
    let decoded = (|| {
        let resources = docs
            .into_iter()
            .enumerate()
            .map(|(i, d)| Resource::from_json(i, d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        // What `weft apply` would have read: inline key sets are their own text.
        let jwks = crate::jwks::sources(resources.iter())
            .into_keys()
            .filter_map(|source| match &source {
                weft_api::resource::JwksSource::Inline(text) => Some((source.clone(), text.as_str().into())),
                _ => None,
            })
            .collect();
        mesh.apply(resources, jwks).map_err(|e| e.to_string())?;
        let b = registration("b", 7000, vec![]);
        let a = registration("a", 7100, vec![Upstream { service: "b".into(), listen: "127.0.0.1:7200".into() }]);
        mesh.connect("b-1", b.clone(), 1, Some("key-b")).unwrap();
        mesh.connect("a-1", a.clone(), 2, Some("key-a")).unwrap();
        let snapshot = mesh.subscribe().borrow().clone();
        let get = |t: Type, node: &InstanceRegistration, name: &str| {
            let all = snapshot.available(t, Some(node));
            all.get(name).unwrap_or_else(|| panic!("no {t:?} {name} in {:?}", all.keys())).any.clone()
        };
        let cluster = weft_proxy::config::cluster(&get(Type::Cluster, &a, "b")).map_err(|e| e.to_string())?;
        let route = weft_proxy::config::route(&get(Type::Route, &a, "b")).map_err(|e| e.to_string())?;
        let inbound_name = weft_api::names::inbound_listener(b.inbound.as_deref().unwrap());
        let inbound =
            weft_proxy::config::listener(&get(Type::Listener, &b, &inbound_name)).map_err(|e| e.to_string())?;
        let outbound_name = weft_api::names::outbound_listener("b", "127.0.0.1:7200");
        let outbound =
            weft_proxy::config::listener(&get(Type::Listener, &a, &outbound_name)).map_err(|e| e.to_string())?;
        let rules = route.virtual_hosts.into_iter().flat_map(|v| v.rules).collect();
        Ok(Decoded { cluster, rules, inbound, outbound })
    })();
    drop(mesh);
    let _ = std::fs::remove_dir_all(&dir);
    decoded
}

fn policy_doc(spec: &TrafficPolicySpec) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "p"}, "spec": spec
    })
}

/// A `Service` resource's settings for `b`.
#[derive(Debug, Clone, Copy, Default)]
struct Svc {
    lb: LoadBalancer,
    connect_timeout: Option<Duration>,
    mtls: Option<MtlsMode>,
    slashes: EscapedSlashes,
}

fn service_doc(svc: Svc) -> serde_json::Value {
    let mut spec = serde_json::json!({"loadBalancer": svc.lb, "escapedSlashes": svc.slashes});
    if matches!(svc.lb, LoadBalancer::RingHash | LoadBalancer::Maglev) {
        spec["consistentHash"] = serde_json::json!({"header": "X-User"});
    }
    if let Some(t) = svc.connect_timeout {
        spec["connectTimeout"] = format!("{}ms", t.as_millis()).into();
    }
    if let Some(m) = svc.mtls {
        spec["mtls"] = serde_json::json!(m);
    }
    serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": "b"}, "spec": spec})
}

// What each field means, from the README's tables (written here apart from both translate.rs
// and weft-proxy's decoders).

fn retry_on(names: &[String]) -> RetryOn {
    let names: Vec<&str> = if names.is_empty() {
        vec!["gateway-error", "connect-failure", "reset"]
    } else {
        names.iter().map(String::as_str).collect()
    };
    let has = |n: &str| names.contains(&n);
    let grpc =
        [("cancelled", 1), ("deadline-exceeded", 4), ("resource-exhausted", 8), ("internal", 13), ("unavailable", 14)];
    RetryOn {
        server_error: has("5xx"),
        gateway_error: has("gateway-error"),
        reset: has("reset"),
        connect_failure: has("connect-failure"),
        grpc: grpc.iter().filter(|(n, _)| has(n)).map(|&(_, c)| c).collect(),
    }
}

fn expected_retry(r: &RetryPolicy) -> RetryDef {
    let base = r.backoff.as_ref().and_then(|b| b.base_interval).unwrap_or(Duration::from_millis(25));
    RetryDef {
        retries: r.attempts.unwrap_or(2),
        per_try_timeout: r.per_try_timeout,
        on: retry_on(&r.retry_on),
        base_interval: base,
        max_interval: r.backoff.as_ref().and_then(|b| b.max_interval).unwrap_or(base * 10),
    }
}

fn expected_retry_limit(r: Option<&RetryPolicy>) -> RetryLimit {
    let Some(r) = r else { return RetryLimit::Fixed(3) };
    let b = r.budget.clone().unwrap_or_default();
    match b.ratio {
        Some(ratio) => RetryLimit::Ratio {
            ratio,
            min_per_second: b.min_retries_per_second.unwrap_or(10),
            ttl: b.ttl.unwrap_or(Duration::from_secs(10)),
        },
        None => RetryLimit::Budget { percent: b.percent.unwrap_or(20.0), min: b.min_retry_concurrency.unwrap_or(10) },
    }
}

fn expected_outlier(od: &OutlierDetection) -> OutlierDef {
    let base = od.base_ejection_time.unwrap_or(Duration::from_secs(30));
    OutlierDef {
        consecutive_5xx: Some(od.consecutive_5xx.unwrap_or(5)).filter(|&n| n > 0),
        consecutive_gateway: od.consecutive_gateway_errors,
        base_ejection: base,
        max_ejection: od.max_ejection_time.unwrap_or(Duration::from_secs(300).max(base)),
        max_ejection_percent: od.max_ejection_percent.unwrap_or(10),
        panic_threshold: f64::from(od.panic_threshold.unwrap_or(50)),
    }
}

fn expected_health_check(h: &ActiveHealthCheck) -> HealthCheckDef {
    HealthCheckDef {
        interval: h.interval.unwrap_or(Duration::from_secs(5)),
        timeout: h.timeout.unwrap_or(Duration::from_secs(1)),
        unhealthy_threshold: h.unhealthy_threshold.unwrap_or(2),
        healthy_threshold: h.healthy_threshold.unwrap_or(1),
        http_path: h.http.as_ref().map(|h| h.path.clone()),
    }
}

fn expected_pool(p: Option<&ConnectionPool>) -> PoolDef {
    let p = p.cloned().unwrap_or_default();
    PoolDef {
        max_connections_per_endpoint: p.max_connections_per_instance,
        max_pending_requests: p.max_connections_per_instance.map(|_| p.max_pending_requests.unwrap_or(1024)),
        max_requests_per_connection: p.max_requests_per_connection,
        idle_timeout: p.idle_timeout,
        max_connection_duration: p.max_connection_duration,
    }
}

fn per_million(percentage: Option<f64>) -> u32 {
    (percentage.unwrap_or(100.0) * 10_000.0).round() as u32
}

fn expected_fault(f: &FaultInjection) -> FaultDef {
    FaultDef {
        delay: f.delay.as_ref().map(|d| FaultDelayDef { delay: d.fixed_delay, per_million: per_million(d.percentage) }),
        abort: f.abort.as_ref().map(|a| FaultAbortDef {
            http: a.http_status.or(a.grpc_status.is_none().then_some(503)),
            grpc: a.grpc_status.map(|g| g as u8),
            per_million: per_million(a.percentage),
        }),
    }
}

/// The buckets a request takes a token from: the service's (if one is consumed) and its
/// caller's.
fn expected_buckets(r: &RateLimitPolicy) -> (Option<BucketDef>, Option<BucketDef>) {
    let bucket = |b: &TokenBucket| BucketDef {
        max_tokens: b.burst.unwrap_or(b.requests),
        tokens_per_fill: b.requests,
        fill_interval: b.interval.unwrap_or(Duration::from_secs(1)),
    };
    (r.service.as_ref().map(bucket), r.per_caller.as_ref().map(bucket))
}

fn decoded_buckets(l: &ListenerDef) -> Option<(Option<BucketDef>, Option<BucketDef>)> {
    let r = l.policy.rate_limit.as_ref()?;
    Some((r.always_consume_service.then_some(r.service), r.per_caller))
}

/// Compares what the proxies decoded with what `spec` and the service's settings mean.
fn check(spec: &TrafficPolicySpec, svc: Svc, d: &Decoded) {
    let c = &d.cluster;
    assert_eq!(c.load_balancer, svc.lb);
    assert_eq!(c.connect_timeout, svc.connect_timeout.unwrap_or(Duration::from_secs(1)));
    // The mesh-wide default here is strict.
    assert_eq!(d.inbound.plaintext, svc.mtls == Some(MtlsMode::Permissive), "mtls");
    assert_eq!(format!("{:?}", d.inbound.escaped_slashes), format!("{:?}", svc.slashes), "escapedSlashes");
    let hash = match svc.lb {
        LoadBalancer::RingHash | LoadBalancer::Maglev => vec![HashDef::Header("x-user".into())],
        _ => vec![],
    };
    assert_eq!(c.retry_limit, expected_retry_limit(spec.retry.as_ref()), "retry budget");
    assert_eq!(c.outlier, spec.outlier_detection.as_deref().map(expected_outlier), "outlier detection");
    assert_eq!(c.health_check, spec.health_check.as_deref().map(expected_health_check), "health check");
    assert_eq!(c.max_requests, spec.connection_pool.as_ref().and_then(|p| p.max_requests), "maxRequests");
    assert_eq!(c.pool, expected_pool(spec.connection_pool.as_ref()), "connection pool");
    assert!(!d.rules.is_empty());
    for rule in &d.rules {
        let mut retry = rule.retry.clone();
        if let Some(r) = &mut retry {
            r.on.grpc.sort_unstable();
        }
        assert_eq!(retry, spec.retry.as_ref().map(expected_retry), "retry policy");
        assert_eq!(rule.buffer_limit, spec.retry.as_ref().and_then(|r| r.max_body_bytes), "maxBodyBytes");
        assert_eq!(rule.fault, spec.fault.as_deref().map(expected_fault), "fault");
        assert_eq!(rule.hash, hash, "consistentHash (header names are lowercased)");
    }
    assert_eq!(decoded_buckets(&d.inbound), spec.rate_limit.as_deref().map(expected_buckets), "rate limit");
}

fn target_b() -> weft_api::resource::PolicyTargetRef {
    weft_api::resource::PolicyTargetRef { group: None, kind: Some("Service".into()), name: "b".into() }
}

/// Every field of every policy kind set at once, and each left to its default.
#[test]
fn every_policy_field_survives_the_round_trip() {
    let ms = Duration::from_millis;
    let full = TrafficPolicySpec {
        target_ref: target_b(),
        connection_pool: Some(ConnectionPool {
            max_requests: Some(50),
            max_connections_per_instance: Some(4),
            max_pending_requests: Some(7),
            max_requests_per_connection: Some(100),
            idle_timeout: Some(ms(9000)),
            max_connection_duration: Some(ms(60_000)),
        }),
        retry: Some(RetryPolicy {
            attempts: Some(3),
            per_try_timeout: Some(ms(250)),
            retry_on: vec!["5xx".into(), "unavailable".into(), "cancelled".into()],
            backoff: Some(RetryBackoff { base_interval: Some(ms(10)), max_interval: Some(ms(70)) }),
            budget: Some(RetryBudget {
                ratio: Some(0.3),
                min_retries_per_second: Some(4),
                ttl: Some(ms(5000)),
                ..Default::default()
            }),
            max_body_bytes: Some(1000),
        }),
        outlier_detection: Some(Box::new(OutlierDetection {
            consecutive_5xx: Some(0),
            consecutive_gateway_errors: Some(3),
            base_ejection_time: Some(ms(500)),
            max_ejection_time: Some(ms(2000)),
            max_ejection_percent: Some(40),
            panic_threshold: Some(0),
        })),
        fault: Some(Box::new(FaultInjection {
            delay: Some(FaultDelay { fixed_delay: ms(30), percentage: Some(12.5) }),
            abort: Some(FaultAbort { http_status: None, grpc_status: Some(8), percentage: Some(0.0001) }),
        })),
        rate_limit: Some(Box::new(RateLimitPolicy {
            service: Some(TokenBucket { requests: 100, interval: Some(ms(60_000)), burst: Some(5) }),
            per_caller: Some(TokenBucket { requests: 3, interval: None, burst: None }),
        })),
        health_check: Some(Box::new(ActiveHealthCheck {
            interval: Some(ms(700)),
            timeout: Some(ms(700)),
            unhealthy_threshold: Some(4),
            healthy_threshold: Some(3),
            http: Some(HttpHealthCheck { path: "/healthz".into() }),
            tcp: None,
        })),
    };
    let svc = Svc {
        lb: LoadBalancer::Maglev,
        connect_timeout: Some(ms(2500)),
        mtls: Some(MtlsMode::Permissive),
        slashes: EscapedSlashes::Reject,
    };
    check(&full, svc, &round_trip(vec![service_doc(svc), policy_doc(&full)]).unwrap());

    // An abort with both statuses cannot be carried (it lost httpStatus on the way): refused.
    let both = TrafficPolicySpec {
        fault: Some(Box::new(FaultInjection {
            delay: None,
            abort: Some(FaultAbort { http_status: Some(418), grpc_status: Some(8), percentage: None }),
        })),
        ..full.clone()
    };
    let e = round_trip(vec![policy_doc(&both)]).err().unwrap();
    assert!(e.contains("spec.fault.abort") && e.contains("not both"), "{e}");

    let defaults = TrafficPolicySpec {
        target_ref: target_b(),
        connection_pool: Some(ConnectionPool::default()),
        retry: Some(RetryPolicy::default()),
        outlier_detection: Some(Box::default()),
        fault: Some(Box::new(FaultInjection {
            delay: Some(FaultDelay { fixed_delay: ms(1), percentage: None }),
            abort: Some(FaultAbort { http_status: None, grpc_status: None, percentage: None }),
        })),
        rate_limit: Some(Box::new(RateLimitPolicy {
            service: None,
            per_caller: Some(TokenBucket { requests: 1, interval: None, burst: None }),
        })),
        health_check: Some(Box::new(ActiveHealthCheck { tcp: Some(TcpHealthCheck {}), ..Default::default() })),
    };
    // An abort needs a status: the one default a user cannot leave out.
    let e = round_trip(vec![policy_doc(&defaults)]).err().unwrap();
    assert!(e.contains("spec.fault.abort"), "{e}");
    let defaults = TrafficPolicySpec {
        fault: Some(Box::new(FaultInjection {
            delay: Some(FaultDelay { fixed_delay: ms(1), percentage: None }),
            abort: Some(FaultAbort { http_status: Some(418), grpc_status: None, percentage: None }),
        })),
        ..defaults
    };
    check(&defaults, Svc::default(), &round_trip(vec![policy_doc(&defaults)]).unwrap());
}

fn ms_in(range: std::ops::RangeInclusive<u64>) -> impl Strategy<Value = Duration> {
    range.prop_map(Duration::from_millis)
}

fn retry_policy() -> impl Strategy<Value = RetryPolicy> {
    let names = prop::sample::subsequence(weft_api::resource::RETRY_ON.to_vec(), 0..=4);
    let budget = prop_oneof![
        Just(None),
        (0.1..=100.0f64, prop::option::of(0..50u32)).prop_map(|(percent, min)| Some(RetryBudget {
            percent: Some(percent),
            min_retry_concurrency: min,
            ..Default::default()
        })),
        (
            0.01..=10.0f64,
            prop::option::of(0..50u32),
            prop::option::of(ms_in(1000..=60_000).prop_map(|d| { Duration::from_secs(d.as_secs().max(1)) }))
        )
            .prop_map(|(ratio, min, ttl)| Some(RetryBudget {
                ratio: Some(ratio),
                min_retries_per_second: min,
                ttl,
                ..Default::default()
            })),
    ];
    (
        prop::option::of(0..=10u32),
        prop::option::of(ms_in(1..=10_000)),
        names,
        prop::option::of((ms_in(1..=100), 1..20u32)),
        budget,
        prop::option::of(0..=1_000_000u32),
    )
        .prop_map(|(attempts, per_try_timeout, names, backoff, budget, max_body_bytes)| RetryPolicy {
            attempts,
            per_try_timeout,
            retry_on: names.into_iter().map(str::to_owned).collect(),
            backoff: backoff
                .map(|(base, times)| RetryBackoff { base_interval: Some(base), max_interval: Some(base * times) }),
            budget,
            max_body_bytes,
        })
}

fn outlier() -> impl Strategy<Value = OutlierDetection> {
    (
        prop::option::of(1..20u32),
        prop::option::of(1..20u32),
        prop::option::of(ms_in(10..=60_000)),
        prop::option::of(0..=100u32),
        prop::option::of(0..=100u32),
    )
        .prop_map(|(five_xx, gateway, base, percent, panic)| OutlierDetection {
            consecutive_5xx: five_xx,
            consecutive_gateway_errors: gateway,
            base_ejection_time: base,
            max_ejection_time: base.map(|b| b * 3),
            max_ejection_percent: percent,
            panic_threshold: panic,
        })
}

fn fault() -> impl Strategy<Value = FaultInjection> {
    let share = || prop::option::of((0..=1_000_000u32).prop_map(|n| f64::from(n) / 10_000.0));
    let delay =
        prop::option::of((ms_in(1..=5000), share()).prop_map(|(d, p)| FaultDelay { fixed_delay: d, percentage: p }));
    let status = prop_oneof![(200..=599u16).prop_map(|s| (Some(s), None)), (1..=16u32).prop_map(|g| (None, Some(g))),];
    let abort = prop::option::of((status, share()).prop_map(|((http_status, grpc_status), percentage)| FaultAbort {
        http_status,
        grpc_status,
        percentage,
    }));
    (delay, abort)
        .prop_filter("a fault sets a delay or an abort", |(d, a)| d.is_some() || a.is_some())
        .prop_map(|(delay, abort)| FaultInjection { delay, abort })
}

fn bucket() -> impl Strategy<Value = TokenBucket> {
    (1..1000u32, prop::option::of(ms_in(1000..=60_000)), prop::option::of(1..1000u32))
        .prop_map(|(requests, interval, burst)| TokenBucket { requests, interval, burst })
}

fn rate_limit() -> impl Strategy<Value = RateLimitPolicy> {
    (prop::option::of(bucket()), prop::option::of(bucket()))
        .prop_filter("a rate limit sets a bucket", |(s, c)| s.is_some() || c.is_some())
        .prop_map(|(service, per_caller)| RateLimitPolicy { service, per_caller })
}

fn health_check() -> impl Strategy<Value = ActiveHealthCheck> {
    (ms_in(100..=10_000), 1..=100u32, prop::option::of(1..10u32), prop::option::of(1..10u32), any::<bool>()).prop_map(
        |(interval, timeout_share, unhealthy, healthy, http)| ActiveHealthCheck {
            interval: Some(interval),
            timeout: Some(Duration::from_millis((interval.as_millis() as u64 * u64::from(timeout_share) / 100).max(1))),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
            http: http.then(|| HttpHealthCheck { path: "/ready".into() }),
            tcp: (!http).then_some(TcpHealthCheck {}),
        },
    )
}

fn pool() -> impl Strategy<Value = ConnectionPool> {
    (
        prop::option::of(1..1000u32),
        prop::option::of(1..100u32),
        prop::option::of(1..1000u32),
        prop::option::of(1..1000u32),
        prop::option::of(ms_in(1000..=600_000)),
        prop::option::of(ms_in(1000..=600_000)),
    )
        .prop_map(|(max_requests, per_instance, pending, per_connection, idle, age)| ConnectionPool {
            max_requests,
            max_connections_per_instance: per_instance,
            max_pending_requests: per_instance.and(pending),
            max_requests_per_connection: per_connection,
            idle_timeout: idle,
            max_connection_duration: age,
        })
}

fn lb() -> impl Strategy<Value = LoadBalancer> {
    prop_oneof![
        Just(LoadBalancer::default()),
        Just(LoadBalancer::RoundRobin),
        Just(LoadBalancer::Random),
        Just(LoadBalancer::RingHash),
        Just(LoadBalancer::Maglev),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Generated policies, every kind at once, each field set or left out.
    #[test]
    fn generated_policies_survive_the_round_trip(
        retry in prop::option::of(retry_policy()),
        outlier in prop::option::of(outlier()),
        fault in prop::option::of(fault()),
        rate_limit in prop::option::of(rate_limit()),
        health_check in prop::option::of(health_check()),
        pool in prop::option::of(pool()),
        lb in lb(),
        connect_timeout in prop::option::of(ms_in(1..=10_000)),
        mtls in prop::option::of(prop_oneof![Just(MtlsMode::Strict), Just(MtlsMode::Permissive)]),
        slashes in prop_oneof![Just(EscapedSlashes::Keep), Just(EscapedSlashes::Decode), Just(EscapedSlashes::Reject)],
    ) {
        let spec = TrafficPolicySpec {
            target_ref: target_b(),
            connection_pool: pool,
            retry,
            outlier_detection: outlier.map(Box::new),
            fault: fault.map(Box::new),
            rate_limit: rate_limit.map(Box::new),
            health_check: health_check.map(Box::new),
        };
        let svc = Svc { lb, connect_timeout, mtls, slashes };
        let decoded = round_trip(vec![service_doc(svc), policy_doc(&spec)]);
        let decoded = decoded.unwrap_or_else(|e| panic!("refused: {e}\n{}", serde_json::to_string(&spec).unwrap()));
        check(&spec, svc, &decoded);
    }
}

/// An HTTPRoute with every kind of match and filter, as the calling proxy decodes its rules:
/// one rule per match, in precedence order, then the service's default rule. Header names
/// are matched without regard to case (lowercased); the effective timeout is the smaller of
/// `request` and `backendRequest`; a mirror's percent is parts per million.
#[test]
fn every_httproute_match_and_filter_survives_the_round_trip() {
    use weft_proxy::config::{HeaderEdits, MirrorDef, PathDef, RedirectDef, Rewrite, StrMatch};
    let route = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"},
        "spec": {"parentRefs": [{"name": "b"}], "rules": [
            {
                "matches": [{
                    "path": {"type": "Exact", "value": "/exact"},
                    "method": "POST",
                    "headers": [{"name": "X-A", "value": "1"}, {"type": "RegularExpression", "name": "x-b", "value": "v[0-9]+"}],
                    "queryParams": [{"name": "q", "value": "1"}]
                }],
                "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                        "set": [{"name": "x-set", "value": "s"}], "add": [{"name": "x-add", "value": "a"}], "remove": ["x-gone"]}},
                    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-resp", "value": "r"}]}},
                    {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "c"}, "percent": 25}}
                ],
                "backendRefs": [{"name": "b", "weight": 3}, {"name": "c", "weight": 1}],
                "timeouts": {"request": "2000ms", "backendRequest": "1500ms"}
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                "filters": [{"type": "URLRewrite", "urlRewrite": {
                    "hostname": "b.internal", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1"}}}],
                "backendRefs": [{"name": "b"}]
            },
            {
                "matches": [{"path": {"type": "RegularExpression", "value": "/old/.*"}}],
                "filters": [{"type": "RequestRedirect", "requestRedirect": {
                    "scheme": "https", "hostname": "new.example", "port": 8443,
                    "path": {"type": "ReplaceFullPath", "replaceFullPath": "/moved"}, "statusCode": 301}}]
            }
        ]}
    });
    let c = serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": "c"}, "spec": {}});
    let decoded = round_trip(vec![c, route]).unwrap();
    // Each rule carries its route's name (metrics' `route` label).
    let exact = RuleDef {
        name: "r".into(),
        path: PathDef::Exact("/exact".into()),
        headers: vec![
            ("x-a".into(), StrMatch::Exact("1".into())),
            ("x-b".into(), StrMatch::Regex("v[0-9]+".into())),
            (":method".into(), StrMatch::Exact("POST".into())),
        ],
        query: vec![("q".into(), StrMatch::Exact("1".into()))],
        backends: vec![("b".into(), 3), ("c".into(), 1)],
        timeout: Some(Duration::from_millis(1500)),
        request_headers: HeaderEdits {
            set: vec![("x-set".into(), "s".into())],
            add: vec![("x-add".into(), "a".into())],
            remove: vec!["x-gone".into()],
        },
        response_headers: HeaderEdits { set: vec![("x-resp".into(), "r".into())], ..Default::default() },
        mirrors: vec![MirrorDef { cluster: "c".into(), per_million: 250_000 }],
        ..Default::default()
    };
    let rewrite = RuleDef {
        name: "r".into(),
        path: PathDef::Prefix("/v2".into()),
        backends: vec![("b".into(), 1)],
        rewrite: Rewrite { prefix: Some("/v1".into()), full_path: None, host: Some("b.internal".into()) },
        ..Default::default()
    };
    let redirect = RuleDef {
        name: "r".into(),
        path: PathDef::Regex("/old/.*".into()),
        redirect: Some(RedirectDef {
            scheme: Some("https".into()),
            host: Some("new.example".into()),
            port: Some(8443),
            full_path: Some("/moved".into()),
            prefix: None,
            status: 301,
        }),
        ..Default::default()
    };
    let default = RuleDef { name: "default".into(), backends: vec![("b".into(), 1)], ..Default::default() };
    // Exact paths first, then regular expressions, then prefixes (translate.rs: precedence).
    assert_eq!(decoded.rules, vec![exact, redirect, rewrite, default]);
}

/// Telemetry for the mesh, a service and a route, as each listener logs it (README: "Access
/// logs").
#[test]
fn telemetry_access_logs_survive_the_round_trip() {
    use weft_proxy::config::{AccessLogDef, Comparison, LogFilter, LogOutput};
    let telemetry = |name: &str, target: serde_json::Value, log: serde_json::Value| {
        let mut spec = serde_json::json!({"accessLog": log});
        if !target.is_null() {
            spec["targetRef"] = target;
        }
        serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Telemetry", "metadata": {"name": name}, "spec": spec})
    };
    let route = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"},
        "spec": {"parentRefs": [{"name": "b"}], "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/r"}}],
                 "backendRefs": [{"name": "b"}]}]}
    });
    let errors = LogFilter::Any(vec![
        LogFilter::Status { op: Comparison::Ge, value: 500 },
        LogFilter::Grpc { statuses: vec![0], exclude: true },
    ]);
    // The mesh's alone: every listener, errors only.
    let mesh = telemetry("mesh", serde_json::Value::Null, serde_json::json!({"errorsOnly": true}));
    let d = round_trip(vec![mesh.clone()]).unwrap();
    let expected = vec![AccessLogDef { output: LogOutput::Stderr, filter: Some(errors.clone()) }];
    assert_eq!((&d.inbound.access_log, &d.outbound.access_log), (&expected, &expected));
    // The service's wins over the mesh's; the route's over the service's, on the callers'
    // listener, where routes are evaluated.
    let svc = telemetry(
        "svc",
        serde_json::json!({"kind": "Service", "name": "b"}),
        serde_json::json!({"output": "/var/log/weft.log", "percentage": 25}),
    );
    let on_route = telemetry(
        "on-route",
        serde_json::json!({"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}),
        serde_json::json!({"output": "stdout"}),
    );
    let d = round_trip(vec![mesh.clone(), svc.clone(), on_route, route.clone()]).unwrap();
    let sampled = LogFilter::Sampled { per_million: 250_000 };
    let file = LogOutput::File("/var/log/weft.log".into());
    assert_eq!(d.inbound.access_log, vec![AccessLogDef { output: file.clone(), filter: Some(sampled.clone()) }]);
    assert_eq!(
        d.outbound.access_log,
        vec![
            AccessLogDef { output: LogOutput::Stdout, filter: Some(LogFilter::RouteIn(vec!["r".into()])) },
            AccessLogDef {
                output: file,
                filter: Some(LogFilter::All(vec![sampled, LogFilter::RouteNotIn(vec!["r".into()])])),
            },
        ]
    );
    // Switched off for the service: nothing, though the mesh's is on.
    let off = telemetry("svc", serde_json::json!({"name": "b"}), serde_json::json!({"enabled": false}));
    let d = round_trip(vec![mesh, off, route]).unwrap();
    assert_eq!((d.inbound.access_log.len(), d.outbound.access_log.len()), (0, 0));
}

/// Tracing for the mesh and a service, as each listener traces (README: "Tracing").
#[test]
fn telemetry_tracing_survives_the_round_trip() {
    use weft_proxy::config::TracingDef;
    let telemetry = |name: &str, target: serde_json::Value, tracing: serde_json::Value| {
        let mut spec = serde_json::json!({"tracing": tracing});
        if !target.is_null() {
            spec["targetRef"] = target;
        }
        serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Telemetry", "metadata": {"name": name}, "spec": spec})
    };
    let def = |collector: &str, per_million: u32, service: &str| TracingDef {
        collector: collector.into(),
        sampling_per_million: per_million,
        service_name: service.into(),
        timeout: Duration::from_secs(5),
    };
    // The mesh's alone, at the default rate (1%): the callee's span is b's, the caller's a's.
    let mesh = telemetry("mesh", serde_json::Value::Null, serde_json::json!({"collector": "127.0.0.1:4317"}));
    let d = round_trip(vec![mesh.clone()]).unwrap();
    assert_eq!(d.inbound.tracing, Some(def("127.0.0.1:4317", 10_000, "b")));
    assert_eq!(d.outbound.tracing, Some(def("127.0.0.1:4317", 10_000, "a")));
    // A service's rate, with the mesh's collector; its listeners only.
    let svc = telemetry(
        "svc",
        serde_json::json!({"kind": "Service", "name": "b"}),
        serde_json::json!({"samplingPercentage": 12.5}),
    );
    let d = round_trip(vec![mesh.clone(), svc.clone()]).unwrap();
    assert_eq!(d.inbound.tracing, Some(def("127.0.0.1:4317", 125_000, "b")));
    assert_eq!(d.outbound.tracing, Some(def("127.0.0.1:4317", 125_000, "a")));
    // Without any collector there is nothing to export to: no tracing.
    assert_eq!(round_trip(vec![svc]).unwrap().inbound.tracing, None);
    // Switched off for the service.
    let off = telemetry("svc", serde_json::json!({"name": "b"}), serde_json::json!({"enabled": false}));
    let d = round_trip(vec![mesh, off]).unwrap();
    assert_eq!((d.inbound.tracing, d.outbound.tracing), (None, None));
    // Per route is refused, naming the field.
    let on_route = telemetry(
        "r",
        serde_json::json!({"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}),
        serde_json::json!({"collector": "127.0.0.1:4317"}),
    );
    assert!(round_trip(vec![on_route]).unwrap_err().contains("spec.tracing"));
    let bad = telemetry("m", serde_json::Value::Null, serde_json::json!({"collector": "http://x:4317/"}));
    assert!(round_trip(vec![bad]).unwrap_err().contains("spec.tracing.collector"));
}

mod authorization {
    //! AuthorizationPolicies through RBAC and back: the called proxy's decisions for a table of
    //! requests, against the README's meaning of the resources evaluated here directly.
    use super::*;
    use weft_api::resource::{
        AuthorizationPolicySpec, AuthzAction, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource,
    };

    const TD: &str = "test.local";

    fn id(td: &str, ns: &str, service: &str) -> String {
        weft_api::identity::spiffe_id(td, ns, service)
    }

    /// A request as policy sees it.
    #[derive(Debug, Clone)]
    struct Req {
        identity: Option<String>,
        method: &'static str,
        path: &'static str,
        port: u16,
        tenant: Option<&'static str>,
    }

    fn source_matches(s: &AuthzSource, identity: Option<&str>) -> bool {
        let Some(identity) = identity else {
            return s.services.is_empty()
                && s.identities.is_empty()
                && s.namespaces.is_empty()
                && s.trust_domains.is_empty();
        };
        let rest = identity.strip_prefix("spiffe://").unwrap_or_default();
        let (td, path) = rest.split_once('/').unwrap_or_default();
        let ns = path.strip_prefix("ns/").and_then(|p| p.split('/').next()).unwrap_or_default();
        (s.services.is_empty() || s.services.iter().any(|svc| id(TD, "default", svc) == identity))
            && (s.identities.is_empty() || s.identities.iter().any(|i| i == identity))
            && (s.namespaces.is_empty() || s.namespaces.iter().any(|n| n == ns))
            && (s.trust_domains.is_empty() || s.trust_domains.iter().any(|t| t == td))
    }

    fn operation_matches(o: &AuthzOperation, r: &Req) -> bool {
        let path = |p: &String| match p.strip_suffix('*') {
            Some(prefix) => r.path.starts_with(prefix),
            None => p == r.path,
        };
        (o.methods.is_empty() || o.methods.iter().any(|m| m == r.method))
            && (o.paths.is_empty() || o.paths.iter().any(path))
            && (o.ports.is_empty() || o.ports.contains(&r.port))
    }

    fn rule_matches(rule: &AuthzRule, r: &Req) -> bool {
        (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, r.identity.as_deref())))
            && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, r)))
            && rule.when.iter().all(|c| r.tenant.is_some_and(|t| c.values.iter().any(|v| v == t)))
    }

    /// The README's rule: a request matching any DENY policy is refused; if any ALLOW policy
    /// applies, the request must match one of their rules.
    fn allowed(policies: &[AuthorizationPolicySpec], r: &Req) -> bool {
        let matches = |p: &&AuthorizationPolicySpec| p.rules.iter().any(|rule| rule_matches(rule, r));
        let of = |a: AuthzAction| policies.iter().filter(move |p| p.action == a);
        if of(AuthzAction::Deny).any(|p| matches(&p)) {
            return false;
        }
        of(AuthzAction::Allow).next().is_none() || of(AuthzAction::Allow).any(|p| matches(&p))
    }

    fn requests() -> Vec<Req> {
        let identities =
            [None, Some(id(TD, "default", "a")), Some(id(TD, "default", "c")), Some(id("other.td", "other", "z"))];
        let mut all = Vec::new();
        for identity in identities {
            for method in ["GET", "POST"] {
                for path in ["/api/x", "/admin", "/admin/x", "/"] {
                    for tenant in [None, Some("blue")] {
                        for port in [7000, 9] {
                            all.push(Req { identity: identity.clone(), method, path, port, tenant });
                        }
                    }
                }
            }
        }
        all
    }

    fn decide(authz: &weft_proxy::authz::Authz, r: &Req) -> bool {
        let mut req = http::Request::builder().method(r.method).uri(r.path);
        if let Some(t) = r.tenant {
            req = req.header("x-tenant", t);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        let subject = weft_proxy::authz::Subject {
            identity: r.identity.as_deref(),
            port: r.port,
            http: Some(&parts),
            claims: None,
        };
        authz.check(&subject).is_ok()
    }

    fn subset(of: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
        prop::sample::subsequence(of.to_vec(), 0..=of.len()).prop_map(|v| v.into_iter().map(str::to_owned).collect())
    }

    fn source() -> impl Strategy<Value = AuthzSource> {
        let identities: &'static [&'static str] =
            &["spiffe://test.local/ns/default/sa/a", "spiffe://other.td/ns/other/sa/z"];
        (subset(&["a", "c"]), subset(identities), subset(&["default", "other"]), subset(&["test.local", "other.td"]))
            .prop_map(|(services, identities, namespaces, trust_domains)| AuthzSource {
                services,
                identities,
                namespaces,
                trust_domains,
                request_principals: vec![],
            })
    }

    fn operation() -> impl Strategy<Value = AuthzOperation> {
        (
            subset(&["GET", "POST"]),
            subset(&["/api/*", "/admin", "/"]),
            prop::sample::subsequence(vec![7000u16, 9], 0..=2),
        )
            .prop_map(|(methods, paths, ports)| AuthzOperation { methods, paths, ports })
    }

    fn rule() -> impl Strategy<Value = AuthzRule> {
        let when = prop::collection::vec(
            prop::sample::subsequence(vec!["blue", "red"], 1..=2).prop_map(|values| AuthzCondition {
                header: "x-tenant".into(),
                claim: String::new(),
                values: values.into_iter().map(str::to_owned).collect(),
            }),
            0..=1,
        );
        (prop::collection::vec(source(), 0..=2), prop::collection::vec(operation(), 0..=2), when)
            .prop_map(|(from, to, when)| AuthzRule { from, to, when })
    }

    fn policy() -> impl Strategy<Value = AuthorizationPolicySpec> {
        (any::<bool>(), any::<bool>(), prop::collection::vec(rule(), 0..=2)).prop_map(|(deny, everywhere, rules)| {
            AuthorizationPolicySpec {
                service: (!everywhere).then(|| "b".into()),
                action: if deny { AuthzAction::Deny } else { AuthzAction::Allow },
                rules,
            }
        })
    }

    fn doc(i: usize, spec: &AuthorizationPolicySpec) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": format!("p{i}")}, "spec": spec
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Generated policies decide every request of the table as the README says they do.
        #[test]
        fn generated_authorization_policies_decide_as_documented(policies in prop::collection::vec(policy(), 1..=3)) {
            let docs = policies.iter().enumerate().map(|(i, p)| doc(i, p)).collect();
            let decoded = match round_trip(docs) {
                Ok(d) => d,
                // Validation's business (e.g. an empty `from` entry); not a round trip.
                Err(e) if e.contains("document") => { prop_assume!(false, "refused: {}", e); unreachable!() }
                Err(e) => panic!("{e}"),
            };
            let authz = decoded.inbound.policy.authz.clone().unwrap_or_default();
            for r in requests() {
                prop_assert_eq!(decide(&authz, &r), allowed(&policies, &r), "{:?}\n{}", r, serde_json::to_string(&policies).unwrap());
            }
        }
    }
}

mod authentication {
    //! RequestAuthentication through `jwt_authn` and back: the called proxy's verdict on
    //! tokens, against the README's meaning of each field.
    use super::*;
    use base64::Engine;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn jwks() -> String {
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
        format!(r#"{{"keys":[{{"kty":"oct","kid":"k1","alg":"HS256","k":"{k}"}}]}}"#)
    }

    fn token(claims: serde_json::Value) -> String {
        let header = jsonwebtoken::Header {
            kid: Some("k1".into()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        };
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    /// The verdict on a request carrying `token` in `x-token` (or none): the failure's
    /// reason, or whether the token was passed on to the app.
    fn verdict(authn: &weft_proxy::jwt::JwtAuthn, token: Option<&str>) -> Result<bool, &'static str> {
        let mut req = http::Request::builder().uri("/");
        if let Some(t) = token {
            req = req.header("x-token", format!("T {t}"));
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        authn.authenticate(&mut parts).map_err(|e| e.reason())?;
        Ok(parts.headers.contains_key("x-token"))
    }

    fn doc(required: bool, forward: bool) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "RequestAuthentication", "metadata": {"name": "jwt"},
            "spec": {"service": "b", "required": required, "issuers": [{
                "issuer": "iss-a", "audiences": ["b", "b2"], "jwks": jwks(), "clockSkew": "10s",
                "fromHeaders": [{"name": "x-token", "prefix": "T "}], "forwardOriginalToken": forward
            }]}
        })
    }

    #[test]
    fn request_authentication_survives_the_round_trip() {
        let decoded = round_trip(vec![doc(true, false)]).unwrap();
        let authn = decoded.inbound.policy.jwt.clone().expect("a jwt_authn filter on b's inbound listener");
        let good = token(serde_json::json!({"iss": "iss-a", "aud": "b2", "sub": "u", "exp": now() + 60}));
        assert_eq!(verdict(&authn, Some(&good)), Ok(false), "verified, and removed before the app");
        let skewed = token(serde_json::json!({"iss": "iss-a", "aud": "b", "exp": now() - 5}));
        assert_eq!(verdict(&authn, Some(&skewed)), Ok(false), "within the clock skew");
        let expired = token(serde_json::json!({"iss": "iss-a", "aud": "b", "exp": now() - 30}));
        assert_eq!(verdict(&authn, Some(&expired)), Err("jwt-expired"));
        let other = token(serde_json::json!({"iss": "iss-a", "aud": "c", "exp": now() + 60}));
        assert_eq!(verdict(&authn, Some(&other)), Err("jwt-wrong-audience"));
        let foreign = token(serde_json::json!({"iss": "iss-x", "aud": "b", "exp": now() + 60}));
        assert!(verdict(&authn, Some(&foreign)).is_err());
        assert_eq!(verdict(&authn, None), Err("jwt-missing"), "required");

        let decoded = round_trip(vec![doc(false, true)]).unwrap();
        let authn = decoded.inbound.policy.jwt.clone().unwrap();
        assert_eq!(verdict(&authn, None), Ok(false), "not required: no token passes");
        assert_eq!(verdict(&authn, Some(&good)), Ok(true), "forwardOriginalToken");
        assert_eq!(verdict(&authn, Some(&expired)), Err("jwt-expired"), "a bad token never passes");
    }
}

/// A transparent instance gets its capture listener, a listener per service at the service's
/// virtual IP (bound to no socket) and the passthrough cluster, and its proxy decodes them as
/// such; an instance with explicit upstreams gets none of them. Virtual IPs survive a restart.
#[test]
fn a_transparent_instance_gets_the_capture_listener_virtual_listeners_and_passthrough() {
    let dir = std::env::temp_dir().join(format!("weft-roundtrip-capture-{}", std::process::id()));
    let ca = || CaConfig {
        trust_domain: "test.local".into(),
        datacenter: "dc1".into(),
        namespace: "default".into(),
        cert_ttl: Duration::from_secs(3600),
        provided: None,
    };
    let mesh = Mesh::open(&dir, Duration::from_secs(60), ca(), Default::default()).unwrap();
    let b = registration("b", 7000, vec![]);
    let mut t = registration("t", 7100, vec![]);
    t.capture = Some("127.0.0.1:15001".into());
    mesh.connect("b-1", b.clone(), 1, Some("key-b")).unwrap();
    mesh.connect("t-1", t.clone(), 2, Some("key-t")).unwrap();
    let snapshot = mesh.subscribe().borrow().clone();
    let vip = snapshot.services["b"].vip.expect("b has a virtual IP");
    assert_eq!(vip.octets()[..2], [240, 240]);
    assert_ne!(Some(vip), snapshot.services["t"].vip, "each service its own");
    let listeners = snapshot.available(Type::Listener, Some(&t));
    let capture = weft_proxy::config::listener(&listeners[weft_api::names::CAPTURE_LISTENER].any).unwrap();
    assert!(capture.use_original_dst && capture.bind_to_port);
    assert_eq!(capture.address.to_string(), "127.0.0.1:15001");
    assert_eq!(capture.tcp_cluster.as_deref(), Some(weft_api::names::PASSTHROUGH_CLUSTER));
    let virtual_b = weft_proxy::config::listener(&listeners[&weft_api::names::virtual_listener("b", vip)].any).unwrap();
    assert!(!virtual_b.bind_to_port && !virtual_b.use_original_dst);
    assert_eq!(virtual_b.address, std::net::SocketAddr::new(vip.into(), 0));
    assert_eq!(virtual_b.service, "b");
    assert!(virtual_b.http.is_some(), "the service's routes apply to captured calls");
    let clusters = snapshot.available(Type::Cluster, Some(&t));
    let passthrough = weft_proxy::config::cluster(&clusters[weft_api::names::PASSTHROUGH_CLUSTER].any).unwrap();
    assert!(passthrough.original_dst && passthrough.static_endpoints.is_none());
    assert!(clusters.contains_key("b"), "a transparent instance may call every service");
    // registry-only: the capture listener has no chain for what is not the mesh's.
    let doc = serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": "t"}, "spec": {"egress": "registry-only"}});
    mesh.apply(vec![Resource::from_json(0, doc).unwrap()], Default::default()).unwrap();
    let snapshot = mesh.subscribe().borrow().clone();
    let listeners = snapshot.available(Type::Listener, Some(&t));
    let closed = weft_proxy::config::listener(&listeners[weft_api::names::CAPTURE_LISTENER].any).unwrap();
    assert!(closed.use_original_dst && closed.tcp_cluster.is_none() && closed.http.is_none());
    // An instance with explicit upstreams (none here) gets nothing of it.
    assert!(!snapshot.available(Type::Listener, Some(&b)).keys().any(|k| k.starts_with("outbound|")));
    assert!(!snapshot.available(Type::Cluster, Some(&b)).contains_key(weft_api::names::PASSTHROUGH_CLUSTER));
    drop(mesh);
    let again = Mesh::open(&dir, Duration::from_secs(60), ca(), Default::default()).unwrap();
    assert_eq!(again.subscribe().borrow().services["b"].vip, Some(vip), "the same virtual IP after a restart");
    drop(again);
    // A mesh-wide registry-only (`weft control --egress registry-only`): services that set no
    // egress get it; one that says allow-any keeps its passthrough.
    let defaults = crate::Defaults { egress: weft_api::resource::Egress::RegistryOnly, ..Default::default() };
    let strict = Mesh::open(&dir, Duration::from_secs(60), ca(), defaults).unwrap();
    let mut u = registration("u", 7200, vec![]);
    u.capture = Some("127.0.0.1:15001".into());
    strict.connect("t-1", t.clone(), 3, Some("key-t")).unwrap();
    strict.connect("u-1", u.clone(), 4, Some("key-u")).unwrap();
    let doc = serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": "t"}, "spec": {"egress": "allow-any"}});
    strict.apply(vec![Resource::from_json(0, doc).unwrap()], Default::default()).unwrap();
    let snapshot = strict.subscribe().borrow().clone();
    let capture = |r: &InstanceRegistration| {
        let listeners = snapshot.available(Type::Listener, Some(r));
        weft_proxy::config::listener(&listeners[weft_api::names::CAPTURE_LISTENER].any).unwrap()
    };
    assert!(capture(&u).tcp_cluster.is_none(), "u sets no egress: the mesh's registry-only");
    assert_eq!(capture(&t).tcp_cluster.as_deref(), Some(weft_api::names::PASSTHROUGH_CLUSTER), "t's own allow-any");
    drop(strict);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two datacenters peered, as dc1 sees it: `b` runs here (127.0.0.1:7000) and in dc2, which
/// exports it (dc2's gateway at 127.0.0.2:15443); `a` calls `b`; dc1's mesh gateway at
/// 127.0.0.1:15443 (and for dc1's own sidecars at `gateway_local`) exports `b` to dc2.
struct Peered {
    dir: std::path::PathBuf,
    mesh: Mesh,
    a: InstanceRegistration,
    gateway: InstanceRegistration,
    remote: weft_api::peering::PeerState,
}

fn peered(defaults: crate::Defaults, gateway_local: Option<&str>) -> Peered {
    let dir = std::env::temp_dir().join(format!("weft-roundtrip-peer-{}-{}", std::process::id(), fastrand::u64(..)));
    let ca = CaConfig {
        trust_domain: "dc1.weft".into(),
        datacenter: "dc1".into(),
        namespace: "default".into(),
        cert_ttl: Duration::from_secs(3600),
        provided: None,
    };
    let mesh = Mesh::open(&dir, Duration::from_secs(60), ca, defaults).unwrap();
    let export = serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "ExportedServices",
        "metadata": {"name": "e"}, "spec": {"services": [{"name": "b", "consumers": [{"peer": "dc2"}]}]}});
    mesh.apply(vec![Resource::from_json(0, export).unwrap()], Default::default()).unwrap();
    let b = registration("b", 7000, vec![]);
    let a = registration("a", 7100, vec![Upstream { service: "b".into(), listen: "127.0.0.1:7200".into() }]);
    let gateway = InstanceRegistration {
        service: Some(weft_api::peering::MESH_GATEWAY.into()),
        inbound: Some("127.0.0.1:15443".into()),
        app: None,
        mesh_gateway_local: gateway_local.map(str::to_owned),
        ..registration("x", 1, vec![])
    };
    mesh.connect("b-1", b.clone(), 1, Some("key-b")).unwrap();
    mesh.connect("a-1", a.clone(), 2, Some("key-a")).unwrap();
    mesh.connect("gw-1", gateway.clone(), 3, Some("key-gw")).unwrap();
    // Any valid roots will do (the peer's own are another CA's).
    let peer_roots = mesh.security.ca.bundle();
    let remote = weft_api::peering::PeerState {
        datacenter: "dc2".into(),
        trust_domain: "dc2.weft".into(),
        namespace: "default".into(),
        roots: peer_roots,
        gateways: vec!["127.0.0.2:15443".into()],
        services: vec![weft_api::peering::ExportedState { name: "b".into(), healthy: 2, instances: 2 }],
    };
    mesh.put_peer(crate::peers::PeerRecord {
        name: "dc2".into(),
        role: crate::peers::Role::Acceptor,
        secret_sha256: None,
        token_expires: None,
        stream_secret_sha256: None,
        control: vec!["127.0.0.2:15010".into()],
        ca: String::new(),
        stream_secret: Some("s".into()),
        remote: Some(remote.clone()),
        terminated: false,
    })
    .unwrap();
    Peered { dir, mesh, a, gateway, remote }
}

/// Applies `Service b` with `spec`; then the endpoints of b that `a` holds, with their
/// priorities.
fn b_with(mesh: &Mesh, a: &InstanceRegistration, spec: serde_json::Value) -> Vec<(String, u32)> {
    let doc = serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": "b"}, "spec": spec});
    mesh.apply(vec![Resource::from_json(0, doc).unwrap()], Default::default()).unwrap();
    b_endpoints(mesh, a)
}

/// The endpoints of b that `a` holds, with their priorities.
fn b_endpoints(mesh: &Mesh, a: &InstanceRegistration) -> Vec<(String, u32)> {
    let snapshot = mesh.subscribe().borrow().clone();
    let (_, endpoints) =
        weft_proxy::config::load_assignment(&snapshot.available(Type::Endpoint, Some(a))["b"].any).unwrap();
    endpoints.iter().map(|e| (e.address.to_string(), e.priority)).collect()
}

/// `a` holds b's own instance alone (no way to dc2 but through a gateway there is not), and
/// `weft check` fails naming b.
fn cut_off_from_dc2(mesh: &Mesh, a: &InstanceRegistration) {
    assert_eq!(b_endpoints(mesh, a), [("127.0.0.1:7000".to_owned(), 0)]);
    let check = crate::check::run(mesh);
    let c = check.iter().find(|c| c.name.starts_with("peers are reachable")).expect("the local-mode check");
    assert_eq!(c.status, crate::check::Status::Fail, "{c:?}");
    assert!(c.detail.contains("imported services (b)"), "{}", c.detail);
}

/// A peered datacenter's resources, through the proxy's decoders: a caller's cluster accepts
/// the service's identity in the peer's trust domain and names the service for the peer's
/// gateway; its endpoints put the peer's gateway after the local instances; the trust bundle
/// keeps each trust domain's roots apart; this datacenter's mesh gateway routes an exported
/// service's server name to its own instances alone, without TLS of its own.
#[test]
fn a_peered_datacenter_round_trips() {
    let Peered { dir, mesh, a, gateway, remote } = peered(Default::default(), None);
    // What this datacenter tells dc2: b, with its own serving instance only.
    let told = mesh.state_for_peer("dc2");
    assert_eq!(told.services, vec![weft_api::peering::ExportedState { name: "b".into(), healthy: 1, instances: 1 }]);
    assert_eq!(told.gateways, vec!["127.0.0.1:15443".to_owned()]);
    assert!(mesh.state_for_peer("dc3").services.is_empty(), "b is exported to dc2 only");

    let snapshot = mesh.subscribe().borrow().clone();
    let get = |t: Type, node: &InstanceRegistration, name: &str| {
        let all = snapshot.available(t, Some(node));
        all.get(name).unwrap_or_else(|| panic!("no {t:?} {name} in {:?}", all.keys())).any.clone()
    };
    let cluster = weft_proxy::config::cluster(&get(Type::Cluster, &a, "b")).unwrap();
    let tls = cluster.tls.unwrap();
    assert_eq!(tls.identity, "spiffe://dc1.weft/ns/default/sa/b");
    assert_eq!(tls.peer_identities, vec!["spiffe://dc2.weft/ns/default/sa/b".to_owned()]);
    assert_eq!(tls.sni.as_deref(), Some("b.default.mesh"));
    let (_, endpoints) = weft_proxy::config::load_assignment(&get(Type::Endpoint, &a, "b")).unwrap();
    let found: Vec<(String, u32, Option<&str>)> = endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.priority, e.labels.get("datacenter").map(String::as_str)))
        .collect();
    assert_eq!(found, vec![("127.0.0.1:7000".into(), 0, None), ("127.0.0.2:15443".into(), 1, Some("dc2"))]);
    assert_eq!(
        endpoints[1].labels["identity"], "spiffe://dc2.weft/ns/default/sa/b",
        "what a call there is labelled with"
    );
    let (_, bundle) = weft_proxy::config::tls::bundle(&get(Type::Secret, &a, weft_api::identity::ROOT_SECRET)).unwrap();
    assert_eq!(bundle.trust_domain.as_deref(), Some("dc1.weft"));
    assert_eq!(bundle.peers.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>(), ["dc2.weft"]);

    // The mesh gateway: b's server name to its own instances, passed through.
    let listener = weft_api::names::mesh_gateway_listener("127.0.0.1:15443");
    let l = weft_proxy::config::listener(&get(Type::Listener, &gateway, &listener)).unwrap();
    assert_eq!(l.server_names, vec![("b.default.mesh".to_owned(), weft_api::names::local_cluster("b"))]);
    assert!(l.tls.is_none() && l.http.is_none());
    let local =
        weft_proxy::config::cluster(&get(Type::Cluster, &gateway, &weft_api::names::local_cluster("b"))).unwrap();
    assert!(local.tls.is_none(), "the gateway adds no TLS of its own");
    let (_, only_local) =
        weft_proxy::config::load_assignment(&get(Type::Endpoint, &gateway, &weft_api::names::local_cluster("b")))
            .unwrap();
    assert_eq!(only_local.iter().map(|e| e.address.to_string()).collect::<Vec<_>>(), ["127.0.0.1:7000"]);

    // A second peer exporting b: by default the peerings' order; a Service's failover list
    // orders them (and leaves out any it does not name).
    let dc3 = weft_api::peering::PeerState {
        datacenter: "dc3".into(),
        trust_domain: "dc3.weft".into(),
        gateways: vec!["127.0.0.3:15443".into()],
        ..remote.clone()
    };
    let record = mesh.peer("dc2").unwrap();
    mesh.put_peer(crate::peers::PeerRecord { name: "dc3".into(), remote: Some(dc3), ..record }).unwrap();
    let order = |failover: Option<serde_json::Value>| {
        let mut spec = serde_json::json!({});
        if let Some(f) = failover {
            spec["failover"] = f;
        }
        b_with(&mesh, &a, spec)
    };
    let ep = |a: &str, p: u32| (a.to_owned(), p);
    let local = ep("127.0.0.1:7000", 0);
    assert_eq!(order(None), [local.clone(), ep("127.0.0.2:15443", 1), ep("127.0.0.3:15443", 2)]);
    let reversed = order(Some(serde_json::json!(["dc3", "dc2"])));
    assert_eq!(reversed, [local.clone(), ep("127.0.0.3:15443", 1), ep("127.0.0.2:15443", 2)]);
    assert_eq!(order(Some(serde_json::json!(["dc3"]))), [local.clone(), ep("127.0.0.3:15443", 1)]);
    assert_eq!(order(Some(serde_json::json!([]))), [local], "failover: [] stays in this datacenter");
    assert!(mesh.delete_peer("dc3").unwrap());
    assert!(mesh.delete(weft_api::resource::Kind::Service, "b").unwrap());

    // b alone in local mode, with no gateway of this datacenter serving its sidecars: b's
    // callers have no way to dc2 (never around the gateway), and `weft check` names b.
    b_with(&mesh, &a, serde_json::json!({"meshGatewayMode": "local"}));
    cut_off_from_dc2(&mesh, &a);
    assert!(mesh.delete(weft_api::resource::Kind::Service, "b").unwrap());
    assert!(
        crate::check::run(&mesh).iter().all(|c| !c.name.starts_with("peers are reachable")),
        "remote mode: no such check"
    );

    // The peering deleted: nothing of dc2 is left.
    assert!(mesh.delete_peer("dc2").unwrap());
    let snapshot = mesh.subscribe().borrow().clone();
    let all = snapshot.available(Type::Endpoint, Some(&a));
    let (_, endpoints) = weft_proxy::config::load_assignment(&all["b"].any).unwrap();
    assert_eq!(endpoints.len(), 1);
    let (_, bundle) = weft_proxy::config::tls::bundle(
        &snapshot.available(Type::Secret, Some(&a))[weft_api::identity::ROOT_SECRET].any,
    )
    .unwrap();
    assert!(bundle.peers.is_empty() && bundle.trust_domain.is_none());
    drop(mesh);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Local mode: dc1's sidecars reach dc2's `b` through dc1's own mesh gateway, at its local
/// address; that gateway routes `b`'s server name, arriving there, on to dc2's gateway (still
/// encrypted), while peers' connections on its other address still go to dc1's own `b`.
#[test]
fn in_local_mode_peers_are_reached_through_the_datacenters_own_gateway() {
    let defaults = crate::Defaults { mesh_gateway: weft_api::peering::MeshGatewayMode::Local, ..Default::default() };
    let Peered { dir, mesh, a, gateway, remote: _ } = peered(defaults, Some("127.0.0.1:15444"));
    let snapshot = mesh.subscribe().borrow().clone();
    let get = |t: Type, node: &InstanceRegistration, name: &str| {
        let all = snapshot.available(t, Some(node));
        all.get(name).unwrap_or_else(|| panic!("no {t:?} {name} in {:?}", all.keys())).any.clone()
    };
    // The caller: dc2's level is dc1's gateway's local address, labelled as dc2's.
    let (_, endpoints) = weft_proxy::config::load_assignment(&get(Type::Endpoint, &a, "b")).unwrap();
    let found: Vec<(String, u32, Option<&str>)> = endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.priority, e.labels.get("datacenter").map(String::as_str)))
        .collect();
    assert_eq!(found, vec![("127.0.0.1:7000".into(), 0, None), ("127.0.0.1:15444".into(), 1, Some("dc2"))]);
    let tls = weft_proxy::config::cluster(&get(Type::Cluster, &a, "b")).unwrap().tls.unwrap();
    assert_eq!(tls.sni.as_deref(), Some("b.default.mesh"), "the same server name, passed on as it is");
    // The gateway: its local listener routes b's server name to dc2's gateways, plain TCP.
    let local = weft_api::names::mesh_gateway_listener("127.0.0.1:15444");
    let l = weft_proxy::config::listener(&get(Type::Listener, &gateway, &local)).unwrap();
    assert_eq!(l.address.to_string(), "127.0.0.1:15444");
    assert_eq!(l.server_names, vec![("b.default.mesh".to_owned(), weft_api::names::remote_cluster("b"))]);
    assert!(l.tls.is_none() && l.http.is_none());
    let remote_b = weft_api::names::remote_cluster("b");
    assert!(weft_proxy::config::cluster(&get(Type::Cluster, &gateway, &remote_b)).unwrap().tls.is_none());
    let (_, onward) = weft_proxy::config::load_assignment(&get(Type::Endpoint, &gateway, &remote_b)).unwrap();
    let onward: Vec<(String, u32)> = onward.iter().map(|e| (e.address.to_string(), e.priority)).collect();
    assert_eq!(onward, [("127.0.0.2:15443".to_owned(), 1)], "after the (empty) local level");
    // Its peers' listener is unchanged: b's name to dc1's own instances.
    let wan = weft_api::names::mesh_gateway_listener("127.0.0.1:15443");
    let l = weft_proxy::config::listener(&get(Type::Listener, &gateway, &wan)).unwrap();
    assert_eq!(l.server_names, vec![("b.default.mesh".to_owned(), weft_api::names::local_cluster("b"))]);
    // A Service's own mode wins over the mesh's: `remote` sends b's callers to dc2's gateway.
    let mode = |m: &str| {
        let all = b_with(&mesh, &a, serde_json::json!({"meshGatewayMode": m}));
        all.into_iter().filter(|(_, p)| *p > 0).map(|(addr, _)| addr).collect::<Vec<_>>()
    };
    assert_eq!(mode("remote"), ["127.0.0.2:15443"]);
    assert_eq!(mode("local"), ["127.0.0.1:15444"]);
    let bad = serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Service", "metadata": {"name": "b"},
        "spec": {"meshGatewayMode": "sideways"}});
    let e = Resource::from_json(0, bad).unwrap_err().to_string();
    assert!(e.contains("meshGatewayMode"), "{e}");
    assert!(mesh.delete(weft_api::resource::Kind::Service, "b").unwrap());
    // No gateway serving locally: nothing to reach dc2 by (and `weft check` says so).
    mesh.disconnect("gw-1", 3);
    cut_off_from_dc2(&mesh, &a);
    drop(mesh);
    let _ = std::fs::remove_dir_all(&dir);
}
