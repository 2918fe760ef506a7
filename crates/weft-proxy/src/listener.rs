//! Listeners: sockets bound from the proxy's flags or from xDS, each running an accept loop
//! that hands every connection to protocol detection and then to the HTTP or TCP path.
//! A listener's behaviour can change under it (an LDS update swaps its [`ListenerCtx`]);
//! its socket stays bound, so an update drops no connection.
use crate::config::{ConfigError, ListenerDef};
use crate::context::Limits;
use crate::context::{ConnCtx, ListenerInfo, PeerIdentity};
use crate::detect::{self, Protocol};
use crate::identity::ALPN_MESH;
use crate::metrics::TrafficMetrics;
use crate::stack::HttpStack;
use crate::tcp::TcpTarget;
use crate::transport::{Peek, Transport};
use arc_swap::ArcSwap;
use futures::future::Either;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// What a listener does with a connection.
pub struct ListenerCtx {
    pub info: Arc<ListenerInfo>,
    pub http: Option<Arc<HttpStack>>,
    pub tcp: Option<TcpTarget>,
    /// Mutual TLS termination (inbound listeners of the mesh).
    pub tls: Option<TlsAcceptor>,
    /// Authorization of opaque TCP connections (HTTP requests are authorized in the stack).
    /// The inbound listener's policy (of which TCP connections need the authorization).
    pub policy: crate::inbound::LivePolicy,
    /// Whether plaintext clients are served; false on a strict inbound listener.
    pub plaintext: bool,
    pub metrics: Arc<TrafficMetrics>,
    /// A transparent instance's capture listener: hands each connection to the listener of
    /// where it was going ([`crate::capture`]).
    pub capture: Option<Arc<Capture>>,
    /// A mesh gateway's routes: by TLS server name, where a connection goes, still encrypted.
    pub server_names: HashMap<Box<str>, TcpTarget>,
}

/// A listener's context, which an LDS update swaps under its connections.
pub type SharedCtx = Arc<ArcSwap<ListenerCtx>>;

struct Running {
    address: SocketAddr,
    ctx: SharedCtx,
    /// One accept loop per socket: the address's, and its aliases'.
    tasks: Vec<JoinHandle<()>>,
}

pub struct Listeners {
    limits: Arc<Limits>,
    /// Accept loops wait for the first full config, so no connection meets a listener whose
    /// clusters or routes have not arrived yet (the kernel queues them meanwhile).
    ready: tokio::sync::watch::Receiver<bool>,
    /// Sockets bound at startup from the command line, waiting for their xDS listener.
    prebound: Mutex<HashMap<SocketAddr, std::net::TcpListener>>,
    /// More addresses a listener listens on ([`Listeners::prebind_alias`]), by its address.
    aliases: Mutex<HashMap<SocketAddr, Vec<SocketAddr>>>,
    running: Mutex<HashMap<String, Running>>,
    /// Listeners bound to no socket (`bind_to_port: false`): what a capture listener hands
    /// connections to, by their address's IP.
    unbound: Mutex<HashMap<String, (SocketAddr, SharedCtx)>>,
    pub virtuals: Arc<Virtuals>,
}

impl Listeners {
    pub fn new(limits: Arc<Limits>, ready: tokio::sync::watch::Receiver<bool>) -> Listeners {
        Listeners {
            limits,
            ready,
            prebound: Mutex::default(),
            aliases: Mutex::default(),
            running: Mutex::default(),
            unbound: Mutex::default(),
            virtuals: Arc::default(),
        }
    }

    /// Binds `addr` now, so a port conflict is reported at startup rather than at first config.
    /// Returns the bound address (port 0 resolves to the port the kernel chose).
    pub fn prebind(&self, addr: SocketAddr, what: &str) -> anyhow::Result<SocketAddr> {
        let l = bind_std(addr).map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))?;
        let bound = l.local_addr()?;
        self.prebound.lock().unwrap_or_else(|p| p.into_inner()).insert(bound, l);
        Ok(bound)
    }

    /// Binds `alias` now, as [`Listeners::prebind`] does, as one more address of the listener
    /// at `primary` (e.g. its IPv6 one): its connections are that listener's.
    pub fn prebind_alias(&self, primary: SocketAddr, alias: SocketAddr, what: &str) -> anyhow::Result<()> {
        let bound = self.prebind(alias, what)?;
        self.aliases.lock().unwrap_or_else(|p| p.into_inner()).entry(primary).or_default().push(bound);
        Ok(())
    }

    /// The sockets of a listener at `addr`: its own, then its aliases'.
    fn bind(&self, addr: SocketAddr) -> std::io::Result<Vec<TcpListener>> {
        let aliases = self.aliases.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).cloned().unwrap_or_default();
        let mut prebound = self.prebound.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::once(addr)
            .chain(aliases)
            .map(|a| match prebound.remove(&a) {
                Some(l) => TcpListener::from_std(l),
                None => TcpListener::from_std(bind_std(a)?),
            })
            .collect()
    }

    /// Applies a full LDS update. Every new listener is bound before anything changes, so a
    /// bind failure rejects the whole update and leaves the running listeners as they were.
    pub fn update(&self, defs: Vec<(ListenerDef, ListenerCtx)>) -> Result<(), ConfigError> {
        let (defs, unbound): (Vec<_>, Vec<_>) = defs.into_iter().partition(|(d, _)| d.bind_to_port);
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = HashMap::new();
        for (def, _) in &defs {
            let keep = running.get(&def.name).is_some_and(|r| r.address == def.address);
            if !keep {
                let l = self.bind(def.address).map_err(|source| ConfigError::Bind {
                    name: def.name.clone(),
                    address: def.address,
                    source,
                })?;
                fresh.insert(def.name.clone(), l);
            }
        }
        running.retain(|name, r| {
            let keep = defs.iter().any(|(d, _)| &d.name == name) && !fresh.contains_key(name);
            if !keep {
                r.tasks.iter().for_each(JoinHandle::abort);
                tracing::info!(listener = %name, "listener removed");
            }
            keep
        });
        for (def, ctx) in defs {
            let ctx = Arc::new(ctx);
            match fresh.remove(&def.name) {
                Some(sockets) => {
                    let shared = Arc::new(ArcSwap::new(ctx));
                    let tasks = sockets
                        .into_iter()
                        .map(|socket| {
                            let address =
                                socket.local_addr().map_or_else(|_| def.address.to_string(), |a| a.to_string());
                            tracing::info!(listener = %def.name, %address, "listening");
                            tokio::spawn(accept(socket, shared.clone(), self.limits.clone(), self.ready.clone()))
                        })
                        .collect();
                    running.insert(def.name.clone(), Running { address: def.address, ctx: shared, tasks });
                }
                None => running[&def.name].ctx.store(ctx),
            }
        }
        // Unbound listeners keep their shared context across updates, as bound ones do.
        let mut kept = self.unbound.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|name, _| unbound.iter().any(|(d, _)| &d.name == name));
        for (def, ctx) in unbound {
            match kept.get(&def.name) {
                Some((address, shared)) if *address == def.address => shared.store(Arc::new(ctx)),
                _ => drop(kept.insert(def.name.clone(), (def.address, Arc::new(ArcSwap::from_pointee(ctx))))),
            }
        }
        self.virtuals.replace(kept.values().map(|(a, c)| (a.ip(), c.clone())).collect());
        Ok(())
    }
}

/// A listening socket at `addr`, as `TcpListener::bind` makes one (address reuse), but an IPv6
/// one listens on IPv6 alone, so `[::]:PORT` and an IPv4 address of the same port can be
/// bound side by side.
fn bind_std(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The outbound listeners a captured connection can be handed to, by virtual IP.
#[derive(Default)]
pub struct Virtuals {
    by_ip: ArcSwap<HashMap<IpAddr, SharedCtx>>,
}

impl Virtuals {
    pub fn replace(&self, by_ip: HashMap<IpAddr, SharedCtx>) {
        self.by_ip.store(Arc::new(by_ip));
    }

    pub fn get(&self, ip: IpAddr) -> Option<Arc<ListenerCtx>> {
        self.by_ip.load().get(&ip).map(|c| c.load_full())
    }

    /// The listener of `service`, if it has a virtual IP.
    pub fn of_service(&self, service: &str) -> Option<Arc<ListenerCtx>> {
        self.by_ip.load().values().map(|c| c.load_full()).find(|c| &*c.info.service == service)
    }
}

/// What a capture listener needs to hand connections on.
pub struct Capture {
    pub virtuals: Arc<Virtuals>,
    pub clusters: Arc<crate::cluster::balance::ClusterManager>,
}

impl Capture {
    /// The listener that serves `stream` from `peer` (accepted by the capture listener `own`),
    /// and where it was going; `None` closes it: it was not redirected (a client called the
    /// capture listener itself, which would loop).
    pub fn route(
        &self,
        stream: &tokio::net::TcpStream,
        peer: SocketAddr,
        own: &Arc<ListenerCtx>,
    ) -> Option<(Arc<ListenerCtx>, SocketAddr)> {
        let dst = match crate::capture::original_dst(stream, peer) {
            Ok(dst) if Some(dst) != stream.local_addr().ok() => dst,
            _ => {
                own.metrics.proxy_error("not-redirected");
                return None;
            }
        };
        // A virtual IP or an instance's address, in either form (IPv6's embeds IPv4's).
        let mesh = weft_api::names::mesh_ipv4(dst.ip()).map(|v4| SocketAddr::new(v4.into(), dst.port()));
        if let Some(mesh) = mesh
            && let Some(to) = self.virtuals.get(mesh.ip())
        {
            return Some((to, mesh));
        }
        // An instance's own address: to that instance, through its sidecar, as its service's
        // listener would (metrics under that service).
        if let Some(mesh) = mesh
            && let Some((service, endpoint)) = self.clusters.endpoint_at(mesh.ip())
        {
            let base = self.virtuals.of_service(&service).unwrap_or_else(|| own.clone());
            let cluster = self.clusters.get(&service);
            let pinned = ListenerCtx {
                info: base.info.clone(),
                http: None,
                tcp: Some(crate::tcp::TcpTarget { cluster, failover: Default::default(), endpoint: Some(endpoint) }),
                tls: None,
                policy: base.policy.clone(),
                plaintext: true,
                metrics: base.metrics.clone(),
                capture: None,
                server_names: HashMap::new(),
            };
            return Some((Arc::new(pinned), mesh));
        }
        if own.tcp.is_none() && own.http.is_none() {
            own.metrics.proxy_error("egress-refused");
            if let Some(left_out) = crate::log_limit::allow("egress-refused") {
                tracing::info!(destination = %dst, like_it_since_last_line = left_out, "connection to a destination outside the mesh refused: this service's egress is registry-only (one line per 10 s)");
            }
            return None;
        }
        Some((own.clone(), dst))
    }
}

async fn accept(
    listener: TcpListener,
    ctx: SharedCtx,
    limits: Arc<Limits>,
    mut ready: tokio::sync::watch::Receiver<bool>,
) {
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut ctx = ctx.load_full();
        let mut local = stream.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        if let Some(capture) = &ctx.capture {
            match capture.route(&stream, peer, &ctx) {
                Some((to, original)) => (ctx, local) = (to, original),
                None => continue,
            }
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            ctx.metrics.proxy_error("connection-limit");
            if let Some(left_out) = crate::log_limit::allow("connection-limit") {
                tracing::warn!(%peer, listener = %ctx.info.name, limit = limits.max_connections, like_it_since_last_line = left_out, "connection limit reached; closing the new connection (one line per 10 s)");
            }
            continue;
        };
        tokio::spawn(connection(stream, peer, local, ctx, limits.clone(), permit));
    }
}

/// One client connection, from protocol detection to its end. Its future is what the
/// connection's task holds for its whole life, idle or not, so its size is checked in a test.
/// (Not an `async fn`: it only builds the connection's context and hands over, so the task
/// holds [`serve`]'s state and nothing besides.)
fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: Arc<ListenerCtx>,
    limits: Arc<Limits>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    let _ = stream.set_nodelay(true);
    let conn = Arc::new(ConnCtx { peer, local, listener: ctx.info.clone(), peer_identity: None });
    serve(stream, conn, ctx, limits, permit)
}

/// Serves a connection on any transport: protocol detection, then mutual TLS termination or
/// the listener's HTTP stack or its TCP target, with the connection's [`ConnCtx`] shared by
/// all that follows. `held` (e.g. the connection's permit under the connection limit) is kept
/// until the connection ends.
///
/// Written as an `async move` block rather than an `async fn`: an `async fn` keeps its
/// arguments twice in its state (as captured and as moved into its body), and this state is
/// part of every connection's task for the connection's whole life.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve<T: Peek>(
    mut stream: T,
    conn: Arc<ConnCtx>,
    ctx: Arc<ListenerCtx>,
    limits: Arc<Limits>,
    held: impl Send,
) -> impl Future<Output = ()> + Send {
    async move {
        let _held = &held;
        let _open = ctx.metrics.connection();
        // A strict listener takes nothing but TLS, so there is no opaque TCP to fall back to:
        // a client slow to send its ClientHello (a busy caller) gets the handshake's time, not
        // detection's.
        let strict = ctx.tls.is_some() && !ctx.plaintext;
        let wait = if strict { limits.header_read_timeout } else { limits.detect_timeout };
        let protocol = match ctx.http.is_some() || ctx.tls.is_some() || !ctx.server_names.is_empty() {
            true => match detect::detect(&mut stream, wait).await {
                Ok(p) => p,
                Err(e) => return tracing::debug!(peer = %conn.peer, error = %e, "connection failed during detection"),
            },
            false => Protocol::Tcp,
        };
        if !ctx.server_names.is_empty() {
            return Box::pin(pass_through(stream, protocol, conn, &ctx)).await;
        }
        if let Some(acceptor) = &ctx.tls {
            let mesh = matches!(&protocol, Protocol::Tls(h) if h.alpn.iter().any(|p| p.as_bytes() == ALPN_MESH));
            // A strict listener terminates every TLS client (and refuses plaintext); a permissive
            // one terminates the mesh's mTLS and passes anything else through to the app.
            match (&protocol, ctx.plaintext) {
                (Protocol::Tls(_), false) => return Box::pin(terminate(stream, conn, &ctx, acceptor, &limits)).await,
                (Protocol::Tls(_), true) if mesh => {
                    return Box::pin(terminate(stream, conn, &ctx, acceptor, &limits)).await;
                }
                (_, false) => {
                    ctx.metrics.proxy_error("plaintext-refused");
                    if let Some(left_out) = crate::log_limit::allow("plaintext-refused") {
                        tracing::info!(peer = %conn.peer, listener = %ctx.info.name, like_it_since_last_line = left_out, "plaintext connection refused: this service requires mutual TLS (mtls: strict); call it through a sidecar of the mesh (one line per 10 s)");
                    }
                    return;
                }
                _ => {}
            }
        }
        dispatch(stream, protocol, conn, &ctx, &limits).await
    }
}

/// Any path but the HTTP stack's: boxed, so its state stays out of the (far more common)
/// HTTP connection's.
type OtherPath<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// After detection (or inside TLS): decides, before any I/O, which path serves the connection
/// and returns that path's future, so an HTTP connection's task holds the HTTP server's state
/// and nothing of this step: the HTTP stack, or the TCP target once authorization allows it.
fn dispatch<'a, T: Transport>(
    stream: T,
    protocol: Protocol,
    conn: Arc<ConnCtx>,
    ctx: &'a Arc<ListenerCtx>,
    limits: &'a Limits,
) -> impl Future<Output = ()> + Send + 'a {
    let peer = conn.peer;
    let closed = || -> OtherPath<'a> { Box::pin(std::future::ready(())) };
    match (protocol, &ctx.http, &ctx.tcp) {
        (p @ (Protocol::Http1 | Protocol::Http2), Some(http), _) => {
            Either::Left(crate::http::serve(stream, p == Protocol::Http2, conn, http.clone(), limits))
        }
        (p, _, Some(tcp)) => {
            if let Some(authz) = &ctx.policy.load().authz {
                let subject = crate::authz::Subject {
                    identity: conn.peer_identity.as_ref().map(|p| &*p.0),
                    port: conn.local.port(),
                    http: None,
                    claims: None,
                };
                let decision = authz.check(&subject);
                ctx.metrics.authz(&decision);
                if let Err(denied) = decision {
                    if let Some(left_out) = crate::log_limit::allow("tcp-denied") {
                        tracing::info!(%peer, identity = ?conn.peer_identity, policy = %denied.policy, like_it_since_last_line = left_out, "TCP connection denied by authorization policy; closing (one line per 10 s)");
                    }
                    return Either::Right(closed());
                }
            }
            if let Protocol::Tls(hello) = &p {
                tracing::debug!(%peer, listener = %ctx.info.name, sni = ?hello.server_name, alpn = ?hello.alpn, "TLS from the client; forwarding it as opaque TCP");
            }
            let forward: OtherPath<'a> =
                Box::pin(async move { crate::tcp::forward(stream, &conn, tcp, &ctx.metrics).await });
            Either::Right(forward)
        }
        // A listener that carries only HTTP (a service declared `protocol: http`, or one that
        // requires JWTs) has its HTTP server answer whatever came: a client gets `400`, never
        // the app's bytes.
        (Protocol::Tcp | Protocol::Tls(_), Some(http), None) => {
            tracing::debug!(%peer, listener = %ctx.info.name, "not HTTP on an HTTP-only listener; the HTTP server answers it");
            Either::Left(crate::http::serve(stream, false, conn, http.clone(), limits))
        }
        (_, None, None) => {
            tracing::debug!(%peer, listener = %ctx.info.name, "not HTTP and the listener has no TCP route; closing");
            Either::Right(closed())
        }
    }
}

/// A mesh gateway: a TLS connection goes, still encrypted, to the cluster of the service its
/// server name names (the caller's sidecar and the callee's hold the only keys); any other
/// connection is closed, and counted.
async fn pass_through<T: Peek>(stream: T, protocol: Protocol, conn: Arc<ConnCtx>, ctx: &ListenerCtx) {
    let name = match &protocol {
        Protocol::Tls(hello) => hello.server_name.as_deref(),
        _ => None,
    };
    let Some(target) = name.and_then(|n| ctx.server_names.get(n)) else {
        ctx.metrics.proxy_error("unknown-server-name");
        if let Some(left_out) = crate::log_limit::allow("unknown-server-name") {
            tracing::info!(peer = %conn.peer, server_name = ?name, like_it_since_last_line = left_out, "mesh gateway connection closed: it is not TLS for a service this datacenter exports (one line per 10 s)");
        }
        return;
    };
    tracing::debug!(peer = %conn.peer, server_name = ?name, cluster = %target.cluster.name, "mesh gateway passing TLS through");
    crate::tcp::forward(stream, &conn, target, &ctx.metrics).await
}

/// Mutual TLS termination: the handshake verifies the client's certificate against the trust
/// bundle; its SPIFFE ID becomes the connection's peer identity; ALPN says what is inside.
async fn terminate<T: Peek>(
    stream: T,
    conn: Arc<ConnCtx>,
    ctx: &Arc<ListenerCtx>,
    acceptor: &TlsAcceptor,
    limits: &Limits,
) {
    let peer = conn.peer;
    let handshake = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ctx.metrics.proxy_error("tls-handshake-failed");
            if let Some(left_out) = crate::log_limit::allow("tls-handshake-failed") {
                tracing::info!(%peer, listener = %ctx.info.name, error = %e, like_it_since_last_line = left_out, "mutual TLS handshake failed: the client needs a certificate from this mesh's CA (one line per 10 s)");
            }
            return;
        }
        Err(_) => {
            ctx.metrics.proxy_error("tls-handshake-timeout");
            return tracing::debug!(%peer, listener = %ctx.info.name, "mutual TLS handshake timed out");
        }
    };
    let (_, session) = tls.get_ref();
    let identity = session.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::identity::spiffe_id(c));
    let protocol = match session.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        Some(b"http/1.1") => Protocol::Http1,
        _ => Protocol::Tcp,
    };
    let mut conn = Arc::unwrap_or_clone(conn);
    conn.peer_identity = identity.map(|id| PeerIdentity(id.into()));
    tracing::trace!(%peer, identity = ?conn.peer_identity, ?protocol, "mutual TLS established");
    dispatch(tls, protocol, Arc::new(conn), ctx, limits).await
}

#[cfg(test)]
mod tests {
    /// The connection future is allocated per client connection and kept while it idles.
    #[test]
    fn connection_future_stays_small() {
        fn future_size<A, B, C, D, E, G, F>(_: fn(A, B, C, D, E, G) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = future_size(super::connection);
        // 568 bytes with Rust 1.95 (936 before `serve`, `dispatch` and `http::serve` stopped
        // keeping their arguments twice and the HTTP/1 builder between sessions).
        assert!(size <= 640, "connection() future is {size} bytes");
    }
}
