//! Micro-benchmarks of the per-request hot path: route matching, endpoint pick, header
//! handling and metrics recording. Run with `cargo bench -p weft-proxy`.
use std::sync::Arc;
use std::time::Duration;
use weft_api::resource::LoadBalancer;
use weft_proxy::cluster::balance::ClusterManager;
use weft_proxy::config::{ClusterDef, EndpointDef, PathDef, RouteDef, RuleDef, StrMatch};
use weft_proxy::metrics::{Direction, Metrics};
use weft_proxy::route::RouteTable;

fn main() {
    divan::main();
}

fn table() -> (ClusterManager, RouteTable) {
    let clusters = ClusterManager::default();
    let mut rules: Vec<RuleDef> = (0..10)
        .map(|i| RuleDef {
            path: PathDef::Prefix(format!("/api/v{i}")),
            headers: vec![("x-tenant".into(), StrMatch::Exact(format!("t{i}")))],
            backends: vec![(format!("svc-{i}"), 1)],
            ..Default::default()
        })
        .collect();
    rules.push(RuleDef {
        path: PathDef::Prefix("/".into()),
        backends: vec![("a".into(), 90), ("b".into(), 10)],
        ..Default::default()
    });
    let t = RouteTable::build(&RouteDef::any_host("r", rules), &clusters);
    (clusters, t)
}

#[divan::bench]
fn route_match_last_rule(b: divan::Bencher) {
    let (_c, t) = table();
    let req = http::Request::builder().uri("/other/path").header("x-tenant", "t3").body(()).unwrap();
    b.bench_local(|| divan::black_box(t.route(divan::black_box(&req))).is_some());
}

#[divan::bench]
fn route_match_header_rule(b: divan::Bencher) {
    let (_c, t) = table();
    let req = http::Request::builder().uri("/api/v7/items").header("x-tenant", "t7").body(()).unwrap();
    b.bench_local(|| divan::black_box(t.route(divan::black_box(&req))).is_some());
}

fn cluster(n: usize, lb: LoadBalancer) -> Arc<weft_proxy::cluster::balance::Cluster> {
    let m = ClusterManager::default();
    let eps: Vec<EndpointDef> = (0..n)
        .map(|i| EndpointDef {
            address: format!("127.0.0.1:{}", 10000 + i).parse().unwrap(),
            healthy: true,
            zone: String::new(),
            priority: 0,
            labels: Default::default(),
        })
        .collect();
    m.update(
        &[ClusterDef {
            name: "c".into(),
            load_balancer: lb,
            connect_timeout: Duration::from_secs(1),
            static_endpoints: Some(eps),
            original_dst: false,
            tls: None,
            protocol: Default::default(),
            max_requests: None,
            retry_limit: Default::default(),
            outlier: None,
            health_check: None,
            pool: Default::default(),
        }],
        &|_| unreachable!("the benchmark clusters have no TLS"),
    );
    m.get("c")
}

#[divan::bench(args = [2, 10, 100])]
fn pick_p2c_ewma(b: divan::Bencher, n: usize) {
    let c = cluster(n, LoadBalancer::P2cEwma);
    let view = c.view();
    b.bench_local(|| divan::black_box(view.pick(&[], None)).is_some());
}

#[divan::bench(args = [2, 10, 100])]
fn pick_round_robin(b: divan::Bencher, n: usize) {
    let c = cluster(n, LoadBalancer::RoundRobin);
    let view = c.view();
    b.bench_local(|| divan::black_box(view.pick(&[], None)).is_some());
}

#[divan::bench]
fn strip_hop_by_hop_headers(b: divan::Bencher) {
    let mut base = http::HeaderMap::new();
    for (k, v) in [
        ("host", "backend"),
        ("user-agent", "curl/8"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
    ] {
        base.insert(k, v.parse().unwrap());
    }
    b.with_inputs(|| base.clone()).bench_local_refs(|h| weft_proxy::http::strip_hop_by_hop(h, true));
}

#[divan::bench]
fn record_request_metrics(b: divan::Bencher) {
    let m = Metrics::new();
    let t = m.traffic(Direction::outbound, "backend");
    let conn = Arc::new(weft_proxy::context::ConnCtx {
        peer: "127.0.0.1:40000".parse().unwrap(),
        local: "127.0.0.1:9000".parse().unwrap(),
        listener: weft_proxy::context::ListenerInfo::new("l", Direction::outbound, "backend"),
        peer_identity: None,
    });
    let mut rec = weft_proxy::record::RequestRecord::start(conn);
    rec.status = 200;
    rec.route = Some("backend/0".into());
    rec.cluster = Some("backend".into());
    rec.upstream_identity = Some("spiffe://weft.local/ns/default/sa/backend".into());
    b.bench_local(|| t.request(divan::black_box(&rec)));
}
