//! In-process tests of the outbound stack: a real HTTP/1.1 client and real hyper servers,
//! connected through in-memory streams, with tokio's clock paused. Time only moves when every
//! task waits on a timer, so timeouts fire at exactly their configured time, with no sleeps.
use crate::config::Direction;
use crate::config::{ClusterDef, PathDef, RetryDef, RetryLimit, RetryOn, RouteDef, RuleDef};
use crate::context::Limits;
use crate::context::{ConnCtx, ListenerInfo};
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::stack::HttpStack;
use crate::testing::{Behaviour, ClientStream, Counts, FakeEndpoints, addr, cluster_def, cluster_of};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// An outbound stack for one route to cluster `backend`, whose endpoints are `endpoints` in
/// that order (picked round robin, so the first request starts at the first endpoint).
struct Mesh {
    stack: Arc<HttpStack>,
}

impl Mesh {
    fn new(endpoints: &[(SocketAddr, Behaviour)], timeout: Option<Duration>) -> (Mesh, Vec<Arc<Counts>>) {
        Mesh::with_rule(endpoints, RuleDef { timeout, ..Default::default() })
    }

    /// As [`Mesh::new`], the route's one rule being `rule` (its path and backend set here).
    fn with_rule(endpoints: &[(SocketAddr, Behaviour)], rule: RuleDef) -> (Mesh, Vec<Arc<Counts>>) {
        Mesh::build(endpoints, rule, |_| {}, false)
    }

    /// As [`Mesh::with_rule`], the cluster's definition changed by `edit`, its endpoints taken
    /// for mesh sidecars if `mesh`.
    fn build(
        endpoints: &[(SocketAddr, Behaviour)],
        rule: RuleDef,
        edit: impl FnOnce(&mut ClusterDef),
        mesh: bool,
    ) -> (Mesh, Vec<Arc<Counts>>) {
        let fakes = Arc::new(FakeEndpoints::default());
        let counts = endpoints.iter().map(|(a, b)| fakes.add(*a, *b)).collect();
        let addrs: Vec<_> = endpoints.iter().map(|(a, _)| *a).collect();
        let mut def = cluster_def("backend", &addrs);
        edit(&mut def);
        let clusters = cluster_of(fakes, def, mesh);
        let rule = RuleDef { path: PathDef::Prefix("/".into()), backends: vec![("backend".into(), 1)], ..rule };
        let table = RouteTable::build(&RouteDef::any_host("backend", vec![rule]), &clusters);
        let metrics = Metrics::new().traffic(Direction::outbound, "backend");
        let stack = Arc::new(HttpStack::new(
            Direction::outbound,
            Arc::new(ArcSwap::from_pointee(table)),
            Default::default(),
            Default::default(),
            metrics,
            Default::default(),
        ));
        (Mesh { stack }, counts)
    }

    /// A client connection through the proxy.
    async fn client(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let (client_side, proxy_side) = tokio::io::duplex(64 * 1024);
        let conn = Arc::new(ConnCtx {
            peer: addr(1),
            local: addr(2),
            listener: ListenerInfo::new("test", Direction::outbound, "backend"),
            peer_identity: None,
        });
        let stack = self.stack.clone();
        tokio::spawn(async move {
            let stream = ClientStream::new(proxy_side);
            crate::http::serve(stream, false, conn, stack, &Limits::default()).await
        });
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_side)).await.unwrap();
        tokio::spawn(conn);
        send
    }
}

/// Sends one request on a fresh connection: (status, x-weft-error, body).
async fn send(mesh: &Mesh, method: &str, body: &'static str) -> (StatusCode, String, String) {
    let mut client = mesh.client().await;
    let req = Request::builder().method(method).uri("/").header("host", "backend").body(Full::new(Bytes::from(body)));
    let resp = client.send_request(req.unwrap()).await.unwrap();
    let status = resp.status();
    let reason = resp.headers().get(crate::ERROR_HEADER).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, reason, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(start_paused = true)]
async fn connect_refused_fails_over_to_another_endpoint() {
    let (mesh, counts) =
        Mesh::new(&[(addr(10), Behaviour::Refuse), (addr(11), Behaviour::Answer { delay: Duration::ZERO })], None);
    for method in ["GET", "POST"] {
        let (status, reason, body) = send(&mesh, method, "").await;
        assert_eq!((status, reason.as_str(), body), (StatusCode::OK, "", addr(11).to_string()), "{method}");
    }
    assert_eq!(counts[0].connects.load(Ordering::Relaxed), 1, "the refusing endpoint is avoided after its failure");
    assert_eq!(counts[1].requests.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn connect_timeout_fails_over_after_exactly_the_timeout() {
    let (mesh, counts) =
        Mesh::new(&[(addr(10), Behaviour::Hang), (addr(11), Behaviour::Answer { delay: Duration::ZERO })], None);
    let started = Instant::now();
    let (status, _, body) = send(&mesh, "GET", "").await;
    assert_eq!((status, body), (StatusCode::OK, addr(11).to_string()));
    assert_eq!(started.elapsed(), Duration::from_secs(1), "the cluster's connect timeout");
    assert_eq!(counts[1].requests.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn bodiless_get_is_replayed_after_a_reset_before_the_response() {
    let (mesh, counts) =
        Mesh::new(&[(addr(10), Behaviour::Reset), (addr(11), Behaviour::Answer { delay: Duration::ZERO })], None);
    let (status, _, body) = send(&mesh, "GET", "").await;
    assert_eq!((status, body), (StatusCode::OK, addr(11).to_string()));
    assert_eq!(counts[0].requests.load(Ordering::Relaxed), 1, "the first endpoint saw the request");
    assert_eq!(counts[1].requests.load(Ordering::Relaxed), 1, "and the second answered it");
}

#[tokio::test(start_paused = true)]
async fn after_a_reset_only_idempotent_requests_are_replayed_bodies_included() {
    let (mesh, counts) =
        Mesh::new(&[(addr(10), Behaviour::Reset), (addr(11), Behaviour::Answer { delay: Duration::ZERO })], None);
    for (method, body) in [("POST", "payload"), ("POST", "")] {
        let (status, reason, _) = send(&mesh, method, body).await;
        assert_eq!((status, reason.as_str()), (StatusCode::BAD_GATEWAY, "upstream-reset"), "{method} {body:?}");
        // Round robin: the next request would start at the answering endpoint; move it back.
        let (status, _, _) = send(&mesh, "GET", "").await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(counts[0].requests.load(Ordering::Relaxed), 2, "each refused POST reached it once, and only once");
    // A PUT is idempotent: its body was kept, so it is sent again, whole, to the other endpoint.
    let (status, reason, _) = send(&mesh, "PUT", "payload").await;
    assert_eq!((status, reason.as_str()), (StatusCode::OK, ""));
    assert_eq!(counts[0].requests.load(Ordering::Relaxed), 3);
    assert_eq!(counts[1].bodies.lock().unwrap().last().map(String::as_str), Some("payload"));
}

#[tokio::test(start_paused = true)]
async fn reset_with_no_other_endpoint_is_a_typed_error() {
    let (mesh, counts) = Mesh::new(&[(addr(10), Behaviour::Reset)], None);
    let (status, reason, body) = send(&mesh, "GET", "").await;
    assert_eq!((status, reason.as_str()), (StatusCode::BAD_GATEWAY, "upstream-reset"));
    assert!(body.contains("reset or closed the connection"), "{body}");
    assert_eq!(counts[0].requests.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn route_timeout_answers_504_at_exactly_the_timeout() {
    let slow = Behaviour::Answer { delay: Duration::from_secs(10) };
    let (mesh, _) = Mesh::new(&[(addr(10), slow)], Some(Duration::from_millis(1500)));
    let started = Instant::now();
    let (status, reason, body) = send(&mesh, "GET", "").await;
    assert_eq!((status, reason.as_str()), (StatusCode::GATEWAY_TIMEOUT, "route-timeout"));
    assert!(body.contains("route backend/0 timed out after 1.5s"), "{body}");
    assert_eq!(started.elapsed(), Duration::from_millis(1500));
    // Within the timeout the response goes through.
    let quick = Behaviour::Answer { delay: Duration::from_millis(1400) };
    let (mesh, _) = Mesh::new(&[(addr(10), quick)], Some(Duration::from_millis(1500)));
    assert_eq!(send(&mesh, "GET", "").await.0, StatusCode::OK);
}

/// A retry counts against the cluster's retries in flight (here the default without a budget,
/// 3) while it is sent, not while it waits out its backoff: twelve clients, half of whose first
/// attempts fail at once, all get their answer.
#[tokio::test(start_paused = true)]
async fn retries_waiting_out_their_backoff_do_not_use_up_the_retry_limit() {
    let retry = RetryDef {
        retries: 2,
        per_try_timeout: None,
        on: RetryOn::parse("5xx").unwrap(),
        base_interval: Duration::from_millis(25),
        max_interval: Duration::from_millis(250),
    };
    let endpoints = [(addr(10), Behaviour::Unavailable), (addr(11), Behaviour::Answer { delay: Duration::ZERO })];
    let (mesh, counts) = Mesh::with_rule(&endpoints, RuleDef { retry: Some(retry), ..Default::default() });
    let mesh = Arc::new(mesh);
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let mesh = mesh.clone();
            tokio::spawn(async move { send(&mesh, "GET", "").await })
        })
        .collect();
    for c in clients {
        let (status, reason, _) = c.await.unwrap();
        assert_eq!((status, reason.as_str()), (StatusCode::OK, ""));
    }
    assert!(counts[0].requests.load(Ordering::Relaxed) >= 4, "the retries were needed");
}

fn retry_on(on: &str, retries: u32, per_try_timeout: Option<Duration>) -> RetryDef {
    RetryDef {
        retries,
        per_try_timeout,
        on: RetryOn::parse(on).unwrap(),
        base_interval: Duration::from_millis(25),
        max_interval: Duration::from_millis(250),
    }
}

fn requests(counts: &Counts) -> usize {
    counts.requests.load(Ordering::Relaxed)
}

const OK: Behaviour = Behaviour::Answer { delay: Duration::ZERO };

/// A callee's sidecar that could not reach its app (`connect-failed`): the app never saw the
/// request, so it goes to another instance whatever its method, body included. Its
/// `upstream-reset` (the app reset the request) moves only idempotent requests.
#[tokio::test(start_paused = true)]
async fn a_callee_sidecars_connect_failed_moves_any_request_and_its_upstream_reset_only_idempotent_ones() {
    let endpoints = [(addr(10), Behaviour::SidecarAnswers("connect-failed")), (addr(11), OK)];
    let (mesh, counts) = Mesh::build(&endpoints, RuleDef::default(), |_| {}, true);
    let (status, reason, body) = send(&mesh, "POST", "payload").await;
    assert_eq!((status, reason.as_str(), body), (StatusCode::OK, "", addr(11).to_string()));
    assert_eq!(counts[1].bodies.lock().unwrap().as_slice(), ["payload"], "the body went whole to the other instance");

    let endpoints = [(addr(10), Behaviour::SidecarAnswers("upstream-reset")), (addr(11), OK)];
    let (mesh, counts) = Mesh::build(&endpoints, RuleDef::default(), |_| {}, true);
    let (status, reason, _) = send(&mesh, "POST", "payload").await;
    assert_eq!((status, reason.as_str()), (StatusCode::BAD_GATEWAY, "upstream-reset"), "a POST the app may have seen");
    assert_eq!(requests(&counts[1]), 0);
    let endpoints = [(addr(10), Behaviour::SidecarAnswers("upstream-reset")), (addr(11), OK)];
    let (mesh, counts) = Mesh::build(&endpoints, RuleDef::default(), |_| {}, true);
    let (status, _, body) = send(&mesh, "GET", "").await;
    assert_eq!((status, body), (StatusCode::OK, addr(11).to_string()), "a GET is sent again elsewhere");
    assert_eq!(requests(&counts[0]), 1);

    // Outside the mesh the header is an app's own: nothing is read into it.
    let endpoints = [(addr(10), Behaviour::SidecarAnswers("connect-failed")), (addr(11), OK)];
    let (mesh, counts) = Mesh::build(&endpoints, RuleDef::default(), |_| {}, false);
    assert_eq!(send(&mesh, "GET", "").await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(requests(&counts[1]), 0);
}

/// The route's retry policy: an idempotent request answered with a status it names is sent
/// again after a backoff (elsewhere while another endpoint is untried); a POST is not, once
/// an app may have seen it.
#[tokio::test(start_paused = true)]
async fn the_retry_policy_resends_idempotent_requests_after_a_backoff() {
    fastrand::seed(18);
    let rule = RuleDef { retry: Some(retry_on("5xx", 2, None)), ..Default::default() };
    let (mesh, counts) = Mesh::with_rule(&[(addr(10), Behaviour::Unavailable), (addr(11), OK)], rule);
    let started = Instant::now();
    let (status, _, body) = send(&mesh, "GET", "").await;
    assert_eq!((status, body), (StatusCode::OK, addr(11).to_string()));
    let waited = started.elapsed();
    assert!(waited > Duration::ZERO && waited <= Duration::from_millis(25), "one backoff of at most 25 ms: {waited:?}");
    assert_eq!((requests(&counts[0]), requests(&counts[1])), (1, 1));

    // One endpoint: a GET is retried on it twice; a POST is not retried.
    let rule = RuleDef { retry: Some(retry_on("5xx", 2, None)), ..Default::default() };
    let (mesh, counts) = Mesh::with_rule(&[(addr(10), Behaviour::Unavailable)], rule);
    assert_eq!(send(&mesh, "POST", "x").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(requests(&counts[0]), 1);
    assert_eq!(send(&mesh, "GET", "").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(requests(&counts[0]), 4);
}

/// With the cluster's retry limit used up (here none allowed), the failure stands: the
/// request is not sent again.
#[tokio::test(start_paused = true)]
async fn a_spent_retry_budget_lets_the_failure_stand() {
    let rule = RuleDef { retry: Some(retry_on("5xx", 2, None)), ..Default::default() };
    let no_retries = |def: &mut ClusterDef| def.retry_limit = RetryLimit::Fixed(0);
    let (mesh, counts) = Mesh::build(&[(addr(10), Behaviour::Unavailable), (addr(11), OK)], rule, no_retries, false);
    assert_eq!(send(&mesh, "GET", "").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!((requests(&counts[0]), requests(&counts[1])), (1, 0));
}

/// A per-try timeout ends an attempt at exactly its time; the retry goes to another endpoint.
#[tokio::test(start_paused = true)]
async fn a_per_try_timeout_moves_the_request_on_at_exactly_its_time() {
    fastrand::seed(19);
    let slow = Behaviour::Answer { delay: Duration::from_secs(10) };
    let rule = RuleDef { retry: Some(retry_on("5xx", 1, Some(Duration::from_secs(1)))), ..Default::default() };
    let (mesh, counts) = Mesh::with_rule(&[(addr(10), slow), (addr(11), OK)], rule);
    let started = Instant::now();
    let (status, _, body) = send(&mesh, "GET", "").await;
    assert_eq!((status, body), (StatusCode::OK, addr(11).to_string()));
    let waited = started.elapsed();
    assert!(waited > Duration::from_secs(1) && waited <= Duration::from_millis(1025), "{waited:?}");
    assert_eq!(requests(&counts[1]), 1);

    // Out of retries, the timeout is the answer: 504 route-timeout.
    let rule = RuleDef { retry: Some(retry_on("5xx", 1, Some(Duration::from_secs(1)))), ..Default::default() };
    let (mesh, _) = Mesh::with_rule(&[(addr(10), slow), (addr(11), slow)], rule);
    let (status, reason, _) = send(&mesh, "GET", "").await;
    assert_eq!((status, reason.as_str()), (StatusCode::GATEWAY_TIMEOUT, "route-timeout"));
}

/// A body is sent again only if it was kept whole: within the route's buffer limit.
#[tokio::test(start_paused = true)]
async fn a_body_over_the_replay_limit_is_not_sent_again() {
    let endpoints = [(addr(10), Behaviour::Reset), (addr(11), OK)];
    let rule = RuleDef { buffer_limit: Some(8), ..Default::default() };
    let (mesh, counts) = Mesh::with_rule(&endpoints, rule);
    let (status, reason, _) = send(&mesh, "PUT", "more than eight bytes").await;
    assert_eq!((status, reason.as_str()), (StatusCode::BAD_GATEWAY, "upstream-reset"));
    assert_eq!(requests(&counts[1]), 0);
    // Round robin starts the next request at the other endpoint: send one there first.
    assert_eq!(send(&mesh, "GET", "").await.0, StatusCode::OK);
    let (status, _, _) = send(&mesh, "PUT", "8 bytes!").await;
    assert_eq!(status, StatusCode::OK, "a body within the limit is replayed");
    assert_eq!(counts[1].bodies.lock().unwrap().last().map(String::as_str), Some("8 bytes!"));
}

/// The route's request timeout bounds the attempts and the backoffs between them: with
/// per-try timeouts of 1 s, retries left and a short backoff, a route timeout of 2.5 s answers
/// 504 at exactly 2.5 s (in the third attempt); with a backoff of seconds, one of 1.01 s
/// answers at exactly 1.01 s (in the first retry's backoff). Both name the route's timeout,
/// not the per-try one.
#[tokio::test(start_paused = true)]
async fn the_route_timeout_bounds_every_attempt_and_backoff() {
    fastrand::seed(19);
    let slow = Behaviour::Answer { delay: Duration::from_secs(10) };
    for (route_timeout, backoff, attempts) in [
        (Duration::from_millis(2500), Duration::from_millis(25), 3),
        (Duration::from_millis(1010), Duration::from_secs(10), 1),
    ] {
        let retry = RetryDef {
            base_interval: backoff,
            max_interval: backoff,
            ..retry_on("5xx", 5, Some(Duration::from_secs(1)))
        };
        let rule = RuleDef { retry: Some(retry), timeout: Some(route_timeout), ..Default::default() };
        let (mesh, counts) = Mesh::with_rule(&[(addr(10), slow), (addr(11), slow)], rule);
        let started = Instant::now();
        let (status, reason, body) = send(&mesh, "GET", "").await;
        assert_eq!((status, reason.as_str()), (StatusCode::GATEWAY_TIMEOUT, "route-timeout"));
        assert!(body.contains(&format!("timed out after {route_timeout:?}")), "{body}");
        assert_eq!(started.elapsed(), route_timeout);
        assert_eq!(requests(&counts[0]) + requests(&counts[1]), attempts, "attempts within {route_timeout:?}");
    }
}
