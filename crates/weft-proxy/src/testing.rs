//! Test doubles for in-process tests of the proxy: endpoints behind a fake [`Connect`] and a
//! client connection in memory. With tokio's clock paused, everything they do is
//! deterministic: time moves only when every task waits on a timer.
use crate::cluster::balance::ClusterManager;
use crate::config::{ClusterDef, EndpointDef, PathDef, RouteDef, RuleDef};
use crate::config::{Direction, EscapedSlashes};
use crate::context::Limits;
use crate::context::{ConnCtx, ListenerInfo};
use crate::inbound::LivePolicy;
use crate::listener::ListenerCtx;
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::stack::HttpStack;
use crate::tcp::TcpTarget;
use crate::transport::{BoxedIo, Connect, ConnectFuture, Peek, Transport};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use weft_api::resource::LoadBalancer;

/// How a fake endpoint behaves.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Refuses connections.
    Refuse,
    /// Accepts the connection but never completes the connect.
    Hang,
    /// Answers every request `200` with its name, after `delay`.
    Answer { delay: Duration },
    /// Reads a request head, then closes the connection without answering.
    Reset,
    /// Answers every request `503` at once.
    Unavailable,
    /// Sends back every byte it gets (opaque TCP).
    Echo,
    /// A callee's sidecar whose app failed: answers every request `502` with this
    /// `x-weft-error` (`connect-failed`, `upstream-reset`, ...).
    SidecarAnswers(&'static str),
}

#[derive(Default)]
pub struct Counts {
    pub connects: AtomicUsize,
    pub requests: AtomicUsize,
    /// The request bodies answered, in order.
    pub bodies: Mutex<Vec<String>>,
    /// The request targets answered (path and query), in order.
    pub targets: Mutex<Vec<String>>,
}

/// Upstream endpoints in memory, by address.
#[derive(Default)]
pub struct FakeEndpoints {
    endpoints: Mutex<HashMap<SocketAddr, (Behaviour, Arc<Counts>)>>,
}

impl FakeEndpoints {
    pub fn add(&self, addr: SocketAddr, behaviour: Behaviour) -> Arc<Counts> {
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
                Behaviour::Echo => drop(tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = app_side.read(&mut buf).await {
                        if app_side.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                })),
                Behaviour::Unavailable | Behaviour::SidecarAnswers(_) => drop(tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                        counts.requests.fetch_add(1, Ordering::Relaxed);
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"unavailable")));
                        *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        if let Behaviour::SidecarAnswers(reason) = behaviour {
                            *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
                            resp.headers_mut().insert(crate::ERROR_HEADER, http::HeaderValue::from_static(reason));
                        }
                        std::future::ready(Ok::<_, std::convert::Infallible>(resp))
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(app_side), svc).await;
                })),
                Behaviour::Answer { delay } => drop(tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let counts = counts.clone();
                        async move {
                            counts.requests.fetch_add(1, Ordering::Relaxed);
                            let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                            counts.targets.lock().unwrap_or_else(|p| p.into_inner()).push(target);
                            let body = http_body_util::BodyExt::collect(req.into_body()).await;
                            let body =
                                body.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned()).unwrap_or_default();
                            counts.bodies.lock().unwrap_or_else(|p| p.into_inner()).push(body);
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
pub struct ClientStream {
    inner: DuplexStream,
    /// Bytes read ahead by `peek`/`readable`, handed out first.
    ahead: Vec<u8>,
}

impl ClientStream {
    pub fn new(inner: DuplexStream) -> ClientStream {
        ClientStream { inner, ahead: Vec::new() }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.ahead.is_empty() {
            self.inner.read_buf(&mut self.ahead).await?;
        }
        Ok(())
    }
}

impl Transport for ClientStream {
    async fn readable(&mut self) -> std::io::Result<()> {
        self.fill().await
    }
}

impl Peek for ClientStream {
    async fn peek(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.fill().await?;
        let n = buf.len().min(self.ahead.len());
        buf[..n].copy_from_slice(&self.ahead[..n]);
        Ok(n)
    }
}

/// For clusters without TLS: tests that never configure origination.
fn no_tls(def: &crate::config::UpstreamTlsDef) -> Arc<crate::transport::UpstreamTls> {
    unreachable!("test cluster configured with TLS towards {}", def.identity)
}

/// A cluster manager over `fakes` holding one round-robin cluster `name` of healthy, static,
/// plaintext `endpoints`, defaults elsewhere: what in-process tests forward to.
pub fn one_cluster(fakes: Arc<FakeEndpoints>, name: &str, endpoints: &[SocketAddr]) -> ClusterManager {
    let clusters = ClusterManager::new(fakes);
    clusters.update(&[cluster_def(name, endpoints)], &no_tls);
    clusters
}

/// The definition [`one_cluster`] gives its cluster, for tests that change it.
pub fn cluster_def(name: &str, endpoints: &[SocketAddr]) -> ClusterDef {
    let endpoints = endpoints
        .iter()
        .map(|&address| EndpointDef {
            address,
            healthy: true,
            zone: String::new(),
            labels: Default::default(),
            priority: 0,
        })
        .collect();
    ClusterDef {
        name: name.into(),
        load_balancer: LoadBalancer::RoundRobin,
        connect_timeout: Duration::from_secs(1),
        static_endpoints: Some(endpoints),
        original_dst: false,
        tls: None,
        // Declared, so the fakes are not probed for the versions they speak (the probe's
        // answers would take their scripted delays).
        protocol: crate::config::UpstreamProtocol::Http1,
        max_requests: None,
        retry_limit: Default::default(),
        outlier: None,
        health_check: None,
        pool: Default::default(),
    }
}

/// A cluster manager over `fakes` holding `def`, plaintext (so `mesh` says whether its
/// endpoints are to be taken for sidecars, whose own answers the proxy reads).
pub fn cluster_of(fakes: Arc<FakeEndpoints>, def: ClusterDef, mesh: bool) -> ClusterManager {
    let clusters = ClusterManager::new(fakes);
    clusters.update(std::slice::from_ref(&def), &no_tls);
    if mesh {
        clusters.get(&def.name).pretend_mesh();
    }
    clusters
}

/// A listener of `direction` as the proxy builds one for a service: every HTTP request routed
/// to the cluster `app` of `clusters`, other bytes forwarded to it as opaque TCP, `policy`
/// checked on inbound requests, paths normalised with `slashes`.
pub fn app_listener(
    direction: Direction,
    clusters: &ClusterManager,
    policy: LivePolicy,
    slashes: EscapedSlashes,
) -> Arc<ListenerCtx> {
    let rule = RuleDef { path: PathDef::Prefix("/".into()), backends: vec![("app".into(), 1)], ..Default::default() };
    let table = RouteTable::build(&RouteDef::any_host("app", vec![rule]), clusters);
    let metrics = Metrics::new().traffic(direction, "app");
    let http = HttpStack::new(
        direction,
        Arc::new(ArcSwap::from_pointee(table)),
        slashes,
        policy.clone(),
        metrics.clone(),
        Default::default(),
    );
    Arc::new(ListenerCtx {
        info: ListenerInfo::new("app", direction, "app"),
        http: Some(Arc::new(http)),
        tcp: Some(TcpTarget { cluster: clusters.get("app"), failover: Default::default(), endpoint: None }),
        tls: None,
        policy,
        plaintext: true,
        metrics,
        capture: None,
        server_names: Default::default(),
    })
}

/// Serves an in-memory client connection as a listener serves an accepted one: detection,
/// then the HTTP stack or opaque TCP, with default limits.
pub fn serve(client: DuplexStream, ctx: Arc<ListenerCtx>) -> impl Future<Output = ()> + Send {
    let conn = Arc::new(ConnCtx { peer: addr(1), local: addr(2), listener: ctx.info.clone(), peer_identity: None });
    crate::listener::serve(ClientStream::new(client), conn, ctx, Arc::new(Limits::default()), ())
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

pub fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], n))
}
