//! In-process tests of the outbound stack: a real HTTP/1.1 client and real hyper servers,
//! connected through in-memory streams, with tokio's clock paused. Time only moves when every
//! task waits on a timer, so timeouts fire at exactly their configured time, with no sleeps.
use crate::Limits;
use crate::balance::ClusterManager;
use crate::config::{ClusterDef, EndpointDef, PathDef, RouteDef, RuleDef};
use crate::context::{ConnCtx, Direction};
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::stack::HttpStack;
use crate::transport::{BoxedIo, Connect, ConnectFuture, Transport};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream, ReadBuf};
use tokio::time::Instant;
use weft_api::resource::LoadBalancer;

/// How a fake endpoint behaves.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Refuses connections.
    Refuse,
    /// Accepts the connection but never completes the connect.
    Hang,
    /// Answers every request `200` with its name, after `delay`.
    Answer { delay: Duration },
    /// Reads a request head, then closes the connection without answering.
    Reset,
}

#[derive(Default)]
struct Counts {
    connects: AtomicUsize,
    requests: AtomicUsize,
}

/// Upstream endpoints in memory, by address.
#[derive(Default)]
struct FakeEndpoints {
    endpoints: Mutex<HashMap<SocketAddr, (Behaviour, Arc<Counts>)>>,
}

impl FakeEndpoints {
    fn add(&self, addr: SocketAddr, behaviour: Behaviour) -> Arc<Counts> {
        let counts = Arc::new(Counts::default());
        self.endpoints.lock().unwrap().insert(addr, (behaviour, counts.clone()));
        counts
    }
}

impl Connect for FakeEndpoints {
    fn connect(&self, addr: SocketAddr) -> ConnectFuture {
        let (behaviour, counts) = self.endpoints.lock().unwrap()[&addr].clone();
        counts.connects.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let (proxy_side, mut app_side) = tokio::io::duplex(64 * 1024);
            match behaviour {
                Behaviour::Refuse => return Err(std::io::ErrorKind::ConnectionRefused.into()),
                Behaviour::Hang => std::future::pending::<()>().await,
                Behaviour::Reset => drop(tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut buf = [0u8; 1024];
                        match app_side.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                })),
                Behaviour::Answer { delay } => drop(tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let counts = counts.clone();
                        async move {
                            counts.requests.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(addr.to_string()))))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(app_side), svc).await;
                })),
            }
            Ok(Box::new(proxy_side) as BoxedIo)
        })
    }
}

/// The client's side of the proxy: an in-memory stream that can be peeked at.
struct ClientStream {
    inner: DuplexStream,
    /// Bytes read ahead by `peek`/`readable`, handed out first.
    ahead: Vec<u8>,
}

impl ClientStream {
    async fn fill(&mut self) -> std::io::Result<()> {
        if self.ahead.is_empty() {
            self.inner.read_buf(&mut self.ahead).await?;
        }
        Ok(())
    }
}

impl Transport for ClientStream {
    async fn peek(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.fill().await?;
        let n = buf.len().min(self.ahead.len());
        buf[..n].copy_from_slice(&self.ahead[..n]);
        Ok(n)
    }

    async fn readable(&mut self) -> std::io::Result<()> {
        self.fill().await
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.ahead.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = buf.remaining().min(self.ahead.len());
        buf.put_slice(&self.ahead[..n]);
        self.ahead.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], n))
}

/// An outbound stack for one route to cluster `backend`, whose endpoints are `endpoints` in
/// that order (picked round robin, so the first request starts at the first endpoint).
struct Mesh {
    stack: Arc<HttpStack>,
}

impl Mesh {
    fn new(endpoints: &[(SocketAddr, Behaviour)], timeout: Option<Duration>) -> (Mesh, Vec<Arc<Counts>>) {
        let fakes = Arc::new(FakeEndpoints::default());
        let counts = endpoints.iter().map(|(a, b)| fakes.add(*a, *b)).collect();
        let clusters = ClusterManager::new(fakes.clone());
        let eps = endpoints
            .iter()
            .map(|(a, _)| EndpointDef { address: *a, healthy: true, zone: String::new(), labels: Default::default() })
            .collect();
        clusters.update(&[ClusterDef {
            name: "backend".into(),
            load_balancer: LoadBalancer::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            static_endpoints: Some(eps),
        }]);
        let rule = RuleDef {
            path: PathDef::Prefix("/".into()),
            headers: vec![],
            backends: vec![("backend".into(), 1)],
            timeout,
        };
        let table = RouteTable::build(&RouteDef { name: "backend".into(), rules: vec![rule] }, &clusters);
        let metrics = Metrics::new().traffic(Direction::outbound, "backend");
        let stack = Arc::new(HttpStack::new(Direction::outbound, Arc::new(ArcSwap::from_pointee(table)), metrics));
        (Mesh { stack }, counts)
    }

    /// A client connection through the proxy.
    async fn client(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let (client_side, proxy_side) = tokio::io::duplex(64 * 1024);
        let conn = Arc::new(ConnCtx {
            peer: addr(1),
            local: addr(2),
            direction: Direction::outbound,
            listener: "test".into(),
            service: "backend".into(),
            peer_identity: None,
        });
        let stack = self.stack.clone();
        tokio::spawn(async move {
            let stream = ClientStream { inner: proxy_side, ahead: Vec::new() };
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
async fn request_with_a_body_or_not_idempotent_is_not_replayed() {
    let (mesh, counts) =
        Mesh::new(&[(addr(10), Behaviour::Reset), (addr(11), Behaviour::Answer { delay: Duration::ZERO })], None);
    for (method, body) in [("POST", "payload"), ("POST", ""), ("PUT", "payload")] {
        let (status, reason, _) = send(&mesh, method, body).await;
        assert_eq!((status, reason.as_str()), (StatusCode::BAD_GATEWAY, "upstream-reset"), "{method} {body:?}");
        // Round robin: the next request would start at the answering endpoint; move it back.
        let (status, _, _) = send(&mesh, "GET", "").await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(counts[0].requests.load(Ordering::Relaxed), 3, "each refused request reached it once, and only once");
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
