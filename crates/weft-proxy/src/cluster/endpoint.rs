//! One upstream endpoint: its address, its load estimate for the balancer, and its pooled
//! connections. Endpoint objects outlive config updates (the cluster reuses them by address),
//! so pools and latency estimates survive EDS pushes.
use crate::clock;
use crate::config::{HealthCheckDef, PoolDef};
use crate::error::ProxyError;
use crate::transport::{BoxedIo, Carries, Connect, UpstreamTls};
use arc_swap::{ArcSwap, ArcSwapOption};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// Body of a request sent upstream: the client's body, or none for a request being replayed
/// on another endpoint.
pub use crate::http::replay::UpBody;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 128;
/// Read buffer of an upstream HTTP/1.1 connection, at most; also the largest response head
/// accepted from an upstream (nginx's default is 4–8 KiB). hyper grows the buffer for large
/// bodies and an idle pooled connection keeps what it grew to, so this bounds the memory a
/// pool holds after a burst of large responses.
const UPSTREAM_READ_BUFFER: usize = 16 * 1024;
/// How long an endpoint that refused a connection is avoided, unless nothing else is left.
const FAILURE_BACKOFF: Duration = Duration::from_secs(2);
/// Cost of an endpoint with no latency sample yet while it has requests outstanding: new
/// endpoints are tried at once (cost 0 when idle) but not flooded before their first answer.
const UNKNOWN_RTT_PENALTY: f64 = 1e9;
/// Decay window of the peak-EWMA estimate.
const DECAY: Duration = Duration::from_secs(10);
/// An endpoint without an answer for this long is probed with the next request it is a
/// candidate for (see [`Endpoint::cost`]).
const PROBE_AFTER: Duration = Duration::from_secs(2);
/// What a failed attempt adds to an endpoint's P2C cost, as if it had answered this slowly
/// (Finagle's and Linkerd's practice): an instance that fails fast would otherwise look the
/// fastest and draw the most requests. The penalty fades over [`FAILURE_DECAY`], so one
/// failure keeps an endpoint out of favour for a few seconds, not for the peak estimate's
/// tens of seconds; it is still probed after [`PROBE_AFTER`] without requests.
const FAILURE_PENALTY: f64 = 1e9;
const FAILURE_DECAY: Duration = Duration::from_secs(1);
/// Pool sweeps done so far (see [`crate::cluster::balance::ClusterManager::sweep_pools`]). A pooled
/// connection records the count when it is checked in, so the pool reads no clock per request.
pub(crate) static SWEEPS: AtomicU64 = AtomicU64::new(0);

pub struct Endpoint {
    pub addr: SocketAddr,
    pub healthy: AtomicBool,
    /// Its locality's priority (0 first).
    pub priority: u32,
    pub labels: BTreeMap<String, String>,
    /// The identity a peer datacenter's instances prove behind this endpoint (its mesh
    /// gateway; from the `identity` label), which a request sent here is labelled with.
    pub identity: Option<std::sync::Arc<str>>,
    connector: Arc<dyn Connect>,
    /// The cluster's TLS origination (shared with the cluster, which updates it).
    tls: Arc<ArcSwapOption<UpstreamTls>>,
    /// The cluster's connection limits (shared likewise).
    pool: Arc<PoolSettings>,
    /// Open HTTP/1.1 connections, and a wake-up for requests waiting for one.
    conns: Arc<ConnCount>,
    /// Requests waiting for a connection to any endpoint of the cluster (shared with it).
    waiting: Arc<AtomicU32>,
    pending: AtomicU32,
    /// Peak-EWMA round-trip time in nanoseconds (as f64 bits) and when it was last updated.
    rtt: AtomicU64,
    stamp: AtomicU64,
    failed_at: AtomicU64,
    /// When an attempt on it last failed ([`clock::now`]; 0: never), for [`FAILURE_PENALTY`].
    attempt_failed_at: AtomicU64,
    /// Failure streaks and ejection (see [`crate::cluster::outlier`]).
    pub outlier: crate::cluster::outlier::OutlierState,
    /// This proxy's active health checks of the endpoint (see [`crate::cluster::active_health`]).
    pub health_check: crate::cluster::active_health::HealthState,
    // Boxed in the pool too: a connection moves between pool, request and body as a pointer.
    #[allow(clippy::vec_box)]
    h1_idle: Mutex<Vec<Box<H1Conn>>>,
    h2: Mutex<Option<H2Conn>>,
}

/// The endpoint's HTTP/2 connection, shared by its requests.
struct H2Conn {
    send: http2::SendRequest<UpBody>,
    opened: u64,
    streams: u32,
}

/// An endpoint's open HTTP/1.1 connections (each holds a [`ConnSlot`]); waiters are woken when
/// one closes or goes back to the pool.
#[derive(Default)]
pub struct ConnCount {
    open: AtomicU32,
    freed: tokio::sync::Notify,
}

/// One open connection's place in its endpoint's count.
pub struct ConnSlot(Arc<ConnCount>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.freed.notify_one();
    }
}

impl ConnCount {
    /// A slot if fewer than `max` are open (always without a limit).
    fn reserve(self: &Arc<Self>, max: Option<u32>) -> Option<ConnSlot> {
        let taken = self.open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match max {
            Some(m) if n >= m => None,
            _ => Some(n + 1),
        });
        taken.is_ok().then(|| ConnSlot(self.clone()))
    }
}

/// What a request waiting for an HTTP/1.1 connection gets.
enum H1Turn {
    Idle(Box<H1Conn>),
    New(ConnSlot),
}

/// A connection checked out of the pool.
pub enum Conn {
    /// Boxed: the connection's state is large and moves between the pool, the request and the
    /// response body.
    H1(Box<H1Conn>),
    H2(http2::SendRequest<UpBody>),
}

/// A pooled HTTP/1.1 connection. It carries one exchange at a time, so instead of running in a
/// task of its own it is driven by whoever uses it: the request task while the request is sent
/// and the response awaited ([`H1Conn::exchange`]), then the response body as the client reads
/// it. That saves the hand-off between two tasks on every request and every body chunk.
pub struct H1Conn {
    send: http1::SendRequest<UpBody>,
    /// `None` once the connection has closed. It is dropped at once because hyper hands a
    /// request that was queued but never written back (inside the error) only when the
    /// connection is dropped: so an exchange on a connection the upstream closed while it sat in
    /// the pool ends with its request unsent, and `http::forward` checks out another.
    conn: Option<http1::Connection<TokioIo<BoxedIo>, UpBody>>,
    /// [`SWEEPS`] when the connection was last put in the pool.
    pooled_at: u64,
    /// [`clock::now`] when it was opened, and how many exchanges it carried.
    opened: u64,
    uses: u32,
    _slot: ConnSlot,
}

impl H1Conn {
    /// Drives the connection; returns whether it is still open.
    pub fn poll_connection(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(conn) = &mut self.conn
            && let Poll::Ready(result) = Pin::new(conn).poll(cx)
        {
            self.conn = None;
            if let Err(e) = result {
                tracing::debug!(error = %e, "upstream HTTP/1 connection failed");
            }
        }
        self.conn.is_some()
    }

    /// Sends a request and waits for the response head, driving the connection meanwhile.
    /// On a connection that turned out to be closed, the request comes back unsent. The
    /// request is handed to the connection at once, so the future does not keep it.
    pub fn exchange(
        &mut self,
        req: Request<UpBody>,
    ) -> Exchange<'_, impl Future<Output = Result<Response<Incoming>, TrySendError<Request<UpBody>>>> + use<>> {
        self.uses += 1;
        let response = self.send.try_send_request(req);
        Exchange { conn: self, response }
    }
}

pin_project_lite::pin_project! {
    /// An exchange on an [`H1Conn`]: waits for the response while driving the connection.
    pub struct Exchange<'a, F> {
        conn: &'a mut H1Conn,
        #[pin]
        response: F,
    }
}

impl<F: Future> Future for Exchange<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.conn.poll_connection(cx);
        this.response.poll(cx)
    }
}

/// One place in a counter (requests or retries in flight, requests waiting), given back when
/// dropped.
pub struct Admitted<'a>(&'a AtomicU32);

impl Admitted<'_> {
    /// Takes a place in `counter`; also returns how many were counted before.
    pub fn enter(counter: &AtomicU32) -> (u32, Admitted<'_>) {
        (counter.fetch_add(1, Ordering::Relaxed), Admitted(counter))
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cluster's connection pool settings, shared with its endpoints. Whether connections have a
/// limited life (requests or duration) is also kept apart, so that checking a connection out
/// and back in reads one flag when they do not (the default) instead of loading the settings.
#[derive(Default)]
pub struct PoolSettings {
    def: ArcSwap<PoolDef>,
    limited_life: AtomicBool,
}

impl PoolSettings {
    pub fn load(&self) -> arc_swap::Guard<Arc<PoolDef>> {
        self.def.load()
    }

    pub fn store(&self, def: PoolDef) {
        let limited = def.max_requests_per_connection.is_some() || def.max_connection_duration.is_some();
        self.def.store(Arc::new(def));
        self.limited_life.store(limited, Ordering::Relaxed);
    }

    /// Whether a connection opened at `opened` that carried `uses` requests may take no more.
    #[inline]
    pub fn spent(&self, opened: u64, uses: u32) -> bool {
        self.limited_life.load(Ordering::Relaxed) && self.spent_by_def(opened, uses)
    }

    /// Apart from [`PoolSettings::spent`], so that the flag check inlines at every call.
    fn spent_by_def(&self, opened: u64, uses: u32) -> bool {
        let def = self.def.load();
        def.max_requests_per_connection.is_some_and(|m| uses >= m)
            || def.max_connection_duration.is_some_and(|d| clock::now().saturating_sub(opened) >= d.as_nanos() as u64)
    }
}

/// What a cluster shares with each of its endpoints: how to connect, and settings and counts
/// it updates for all of them.
#[derive(Clone)]
pub struct ClusterShared {
    pub connector: Arc<dyn Connect>,
    pub tls: Arc<ArcSwapOption<UpstreamTls>>,
    pub pool: Arc<PoolSettings>,
    /// Requests waiting for a connection to any of the endpoints.
    pub waiting: Arc<AtomicU32>,
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        healthy: bool,
        labels: BTreeMap<String, String>,
        priority: u32,
        shared: ClusterShared,
    ) -> Endpoint {
        let ClusterShared { connector, tls, pool, waiting } = shared;
        Endpoint {
            addr,
            healthy: AtomicBool::new(healthy),
            priority,
            identity: labels.get("identity").map(|i| i.as_str().into()),
            labels,
            connector,
            tls,
            pool,
            conns: Default::default(),
            waiting,
            pending: AtomicU32::new(0),
            rtt: AtomicU64::new(0f64.to_bits()),
            stamp: AtomicU64::new(clock::now()),
            failed_at: AtomicU64::new(0),
            attempt_failed_at: AtomicU64::new(0),
            outlier: Default::default(),
            health_check: Default::default(),
            h1_idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    /// Whether the endpoint refused a connection recently.
    pub fn failing(&self) -> bool {
        let at = self.failed_at.load(Ordering::Relaxed);
        at != 0 && clock::now().saturating_sub(at) < FAILURE_BACKOFF.as_nanos() as u64
    }

    /// Cost for P2C at `now` ([`clock::now`]): estimated latency × (outstanding requests + 1), plus
    /// the fading penalty of a recent failed attempt. The estimate decays while an endpoint is
    /// not chosen; and an idle endpoint that has not answered for [`PROBE_AFTER`] costs
    /// nothing, so it gets the next request and a fresh sample: an endpoint that was slow (or
    /// failed) once is not shunned for the tens of seconds the decay alone would take.
    pub fn cost_at(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let pending = self.pending.load(Ordering::Relaxed);
        let load = if rtt == 0.0 {
            f64::from(pending) * UNKNOWN_RTT_PENALTY
        } else {
            let idle = now.saturating_sub(self.stamp.load(Ordering::Relaxed));
            if pending == 0 && idle >= PROBE_AFTER.as_nanos() as u64 {
                return 0.0;
            }
            rtt * (-(idle as f64) / DECAY.as_nanos() as f64).exp() * (f64::from(pending) + 1.0)
        };
        match self.attempt_failed_at.load(Ordering::Relaxed) {
            0 => load,
            at => {
                let age = now.saturating_sub(at) as f64;
                load + FAILURE_PENALTY * (-age / FAILURE_DECAY.as_nanos() as f64).exp()
            }
        }
    }

    /// Counts a failed attempt (an error, or a 5xx answer) against the endpoint's P2C cost.
    pub fn attempt_failed(&self) {
        self.attempt_failed_at.store(clock::now(), Ordering::Relaxed);
    }

    /// Marks a request as started; the returned guard records its latency when it ends.
    pub fn start(&self) -> InFlight<'_> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight { endpoint: self, started: Instant::now() }
    }

    pub(crate) fn observe(&self, rtt: Duration) {
        let now = clock::now();
        // At least 1 ns: 0 means "never measured" (an answer within the clock's resolution,
        // or on a paused clock, is still a measurement).
        let rtt = (rtt.as_nanos() as f64).max(1.0);
        let prev = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.stamp.swap(now, Ordering::Relaxed)) as f64;
        // Peak: jump up at once, decay down over DECAY. Races between updates only lose one sample.
        let next = if rtt > prev || prev == 0.0 {
            rtt
        } else {
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.rtt.store(next.to_bits(), Ordering::Relaxed);
    }

    /// A new connection; through mutual TLS when the cluster says so. The timeout covers the
    /// TCP connect and the TLS handshake.
    async fn connect(&self, timeout: Duration, carries: Carries) -> Result<BoxedIo, ProxyError> {
        let tls = self.tls.load_full();
        let connect = async {
            let tcp = self
                .connector
                .connect(self.addr)
                .await
                .map_err(|source| ProxyError::Connect { addr: self.addr, source })?;
            match &tls {
                Some(tls) => tls
                    .handshake(tcp, self.addr, carries)
                    .await
                    .map_err(|source| ProxyError::UpstreamTls { addr: self.addr, source }),
                None => Ok(tcp),
            }
        };
        let stream = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.failed(e)),
            Err(_) => return Err(self.failed(ProxyError::ConnectTimeout { addr: self.addr, timeout })),
        };
        self.failed_at.store(0, Ordering::Relaxed);
        Ok(stream)
    }

    fn failed(&self, e: ProxyError) -> ProxyError {
        self.mark_failing();
        e
    }

    /// Makes the balancer prefer other endpoints for a while (as after a refused connect).
    pub fn mark_failing(&self) {
        self.failed_at.store(clock::now(), Ordering::Relaxed);
    }

    /// One active health check of the endpoint (see [`crate::cluster::active_health`]): whether it
    /// passed within the check's timeout.
    pub async fn probe(&self, def: &HealthCheckDef, authority: &str) -> bool {
        let work = async {
            match &def.http_path {
                None => self.connect_tcp(def.timeout).await.is_ok(),
                Some(path) => {
                    let Ok(mut send) = self.new_h1_upgradable(def.timeout).await else { return false };
                    let req = http::Request::get(path.as_str())
                        .header(http::header::HOST, authority)
                        .header(http::header::USER_AGENT, "weft-health-check")
                        .header(http::header::CONNECTION, "close")
                        .body(UpBody::Empty);
                    let Ok(req) = req else { return false };
                    send.send_request(req).await.is_ok_and(|r| r.status().is_success())
                }
            }
        };
        tokio::time::timeout(def.timeout, work).await.unwrap_or(false)
    }

    /// A connection for opaque forwarding.
    pub async fn connect_tcp(&self, timeout: Duration) -> Result<BoxedIo, ProxyError> {
        self.connect(timeout, Carries::Tcp).await
    }

    /// An HTTP connection: a pooled one if one is free, otherwise a new one.
    pub async fn checkout(&self, h2: bool, timeout: Duration) -> Result<Conn, ProxyError> {
        // Connecting is rare and its futures are large; boxing them keeps the per-request
        // future (which hyper keeps allocated per client connection) small.
        if h2 {
            {
                let mut slot = self.h2.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(c) = slot.as_mut().filter(|c| !c.send.is_closed() && !self.pool.spent(c.opened, c.streams))
                {
                    c.streams += 1;
                    return Ok(Conn::H2(c.send.clone()));
                }
                // A spent connection finishes its streams and closes once they let go of it.
                slot.take();
            }
            let io = TokioIo::new(Box::pin(self.connect(timeout, Carries::Http2)).await?);
            let (send, conn) = Box::pin(http2::Builder::new(TokioExecutor::new()).adaptive_window(true).handshake(io))
                .await
                .map_err(|e| ProxyError::Handshake { addr: self.addr, source: e })?;
            tokio::spawn(conn);
            *self.h2.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(H2Conn { send: send.clone(), opened: clock::now(), streams: 1 });
            return Ok(Conn::H2(send));
        }
        // Pooled connections finished their last exchange and were open when last polled. One
        // the upstream has closed since is found out by the exchange before it writes anything.
        if let Some(c) = self.take_idle_h1() {
            return Ok(Conn::H1(c));
        }
        let max = self.pool.load().max_connections_per_endpoint;
        let slot = match self.conns.reserve(max) {
            Some(slot) => slot,
            None => match Box::pin(self.wait_for_h1()).await? {
                H1Turn::Idle(c) => return Ok(Conn::H1(c)),
                H1Turn::New(slot) => slot,
            },
        };
        Box::pin(self.new_h1(timeout, slot)).await.map(Conn::H1)
    }

    /// Waits, counted in the cluster's waiting requests, for a pooled connection or room for a
    /// new one (`max_connections_per_endpoint` are open); refuses at once when
    /// `max_pending_requests` already wait.
    async fn wait_for_h1(&self) -> Result<H1Turn, ProxyError> {
        let pool = **self.pool.load();
        let limit = pool.max_pending_requests.unwrap_or(1024);
        let (waiting, _waiting) = Admitted::enter(&self.waiting);
        if waiting >= limit {
            return Err(ProxyError::PendingOverflow { addr: self.addr, limit });
        }
        loop {
            let freed = self.conns.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if let Some(c) = self.take_idle_h1() {
                return Ok(H1Turn::Idle(c));
            }
            if let Some(slot) = self.conns.reserve(pool.max_connections_per_endpoint) {
                return Ok(H1Turn::New(slot));
            }
            freed.await;
        }
    }

    async fn handshake_h1(
        &self,
        timeout: Duration,
    ) -> Result<(http1::SendRequest<UpBody>, http1::Connection<TokioIo<BoxedIo>, UpBody>), ProxyError> {
        let io = TokioIo::new(self.connect(timeout, Carries::Http1).await?);
        http1::Builder::new()
            .max_buf_size(UPSTREAM_READ_BUFFER)
            .handshake(io)
            .await
            .map_err(|e| ProxyError::Handshake { addr: self.addr, source: e })
    }

    /// A fresh HTTP/1.1 connection in `slot`, to be pooled after its first exchange.
    async fn new_h1(&self, timeout: Duration, slot: ConnSlot) -> Result<Box<H1Conn>, ProxyError> {
        let (send, conn) = self.handshake_h1(timeout).await?;
        Ok(Box::new(H1Conn { send, conn: Some(conn), pooled_at: 0, opened: clock::now(), uses: 0, _slot: slot }))
    }

    /// A fresh HTTP/1.1 connection that supports `Upgrade`, in a task of its own (an upgraded
    /// connection outlives the request that set it up; never pooled).
    pub async fn new_h1_upgradable(&self, timeout: Duration) -> Result<http1::SendRequest<UpBody>, ProxyError> {
        let (send, conn) = self.handshake_h1(timeout).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(send)
    }

    /// A pooled connection; those past their maximum duration are closed on the way.
    fn take_idle_h1(&self) -> Option<Box<H1Conn>> {
        let mut idle = self.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if !self.pool.spent(c.opened, c.uses) {
                return Some(c);
            }
        }
        None
    }

    /// Closes every pooled connection; for when one turned out closed by the upstream. The
    /// pool is a stack, so the rest are older still: most likely closed too (the app's
    /// keep-alive timeout passed, or the app restarted).
    pub fn drop_idle_h1(&self) {
        // Taken out first, so the connections close after the lock is released.
        let idle = std::mem::take(&mut *self.h1_idle.lock().unwrap_or_else(|p| p.into_inner()));
        drop(idle);
    }

    /// The cluster's idle timeout for pooled connections, if it sets its own.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.pool.load().idle_timeout
    }

    /// Closes every pooled connection, HTTP/1.1 and HTTP/2 (the cluster's TLS changed).
    pub fn drop_pools(&self) {
        self.drop_idle_h1();
        let h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(h2);
    }

    /// Returns a connection whose exchange is complete (response body read to the end); a
    /// closed one (e.g. after `Connection: close`) is dropped.
    pub fn checkin_h1(&self, mut c: Box<H1Conn>) {
        if c.conn.is_none() || self.pool.spent(c.opened, c.uses) {
            return;
        }
        c.pooled_at = SWEEPS.load(Ordering::Relaxed);
        let mut idle = self.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_H1 {
            idle.push(c);
        }
        drop(idle);
        // A request may be waiting for a connection.
        self.conns.freed.notify_one();
    }

    /// Closes pooled connections that have sat idle for `max_sweeps` sweeps, and drops those
    /// the upstream has closed (nothing polls a pooled connection, so until its next use it
    /// would hold its socket in CLOSE_WAIT and its buffers).
    pub(crate) fn sweep_idle(&self, now: u64, max_sweeps: u64) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut idle = self.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain_mut(|c| now - c.pooled_at < max_sweeps && c.poll_connection(&mut cx));
    }
}

/// An outstanding request on an endpoint, counted in its load.
pub struct InFlight<'a> {
    endpoint: &'a Endpoint,
    started: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.observe(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TcpConnect;

    fn endpoint() -> Endpoint {
        Endpoint::new(
            "127.0.0.1:1".parse().unwrap(),
            true,
            Default::default(),
            0,
            ClusterShared {
                connector: Arc::new(TcpConnect),
                tls: Arc::new(ArcSwapOption::empty()),
                pool: Default::default(),
                waiting: Default::default(),
            },
        )
    }

    /// Latency and failure penalties read the runtime's clock (tokio's, which is the system's
    /// outside tests): with time paused, a request that took 300 ms is measured as exactly
    /// that, and a failing endpoint is preferred again exactly when its penalty runs out.
    #[tokio::test(start_paused = true)]
    async fn latency_and_failure_penalties_follow_the_runtime_clock() {
        let ep = endpoint();
        let request = ep.start();
        tokio::time::advance(Duration::from_millis(300)).await;
        drop(request);
        assert_eq!(f64::from_bits(ep.rtt.load(Ordering::Relaxed)), 300e6);
        ep.mark_failing();
        tokio::time::advance(FAILURE_BACKOFF - Duration::from_millis(1)).await;
        assert!(ep.failing());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!ep.failing());
    }

    /// An endpoint that answered slowly once is probed again after two seconds without
    /// answers, not after the tens of seconds its decaying estimate alone would take.
    #[test]
    fn a_once_slow_endpoint_is_probed_again() {
        let ep = endpoint();
        ep.observe(Duration::from_millis(500));
        let answered = ep.stamp.load(Ordering::Relaxed);
        let fast = 0.001e9; // 1 ms, in ns
        assert!(ep.cost_at(answered) > 100.0 * fast, "just measured slow: {}", ep.cost_at(answered));
        // 1.5 s later: still costly (the decay alone is slow)...
        assert!(ep.cost_at(answered + 1_500_000_000) > 50.0 * fast);
        // ...2 s later: it is probed.
        assert_eq!(ep.cost_at(answered + 2_000_000_000), 0.0);
        // Not while it has a request outstanding.
        let _busy = ep.start();
        assert!(ep.cost_at(answered + 2_000_000_000) > 0.0);
    }
}
