//! In-process tests of the outbound stack: a real HTTP/1.1 client and real hyper servers,
//! connected through in-memory streams, with tokio's clock paused. Time only moves when every
//! task waits on a timer, so timeouts fire at exactly their configured time, with no sleeps.
use crate::Limits;
use crate::config::{PathDef, RetryDef, RetryOn, RouteDef, RuleDef};
use crate::context::{ConnCtx, Direction, ListenerInfo};
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::stack::HttpStack;
use crate::testing::{Behaviour, ClientStream, Counts, FakeEndpoints, addr, one_cluster};
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
        let fakes = Arc::new(FakeEndpoints::default());
        let counts = endpoints.iter().map(|(a, b)| fakes.add(*a, *b)).collect();
        let addrs: Vec<_> = endpoints.iter().map(|(a, _)| *a).collect();
        let clusters = one_cluster(fakes, "backend", &addrs);
        let rule = RuleDef { path: PathDef::Prefix("/".into()), backends: vec![("backend".into(), 1)], ..rule };
        let table = RouteTable::build(&RouteDef::any_host("backend", vec![rule]), &clusters);
        let metrics = Metrics::new().traffic(Direction::outbound, "backend");
        let stack = Arc::new(HttpStack::new(
            Direction::outbound,
            Arc::new(ArcSwap::from_pointee(table)),
            Default::default(),
            Default::default(),
            metrics,
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
