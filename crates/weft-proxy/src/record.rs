//! Per-request and per-connection records. Every step of a request writes what it decided and
//! what happened into one [`RequestRecord`]; metrics, access logs, traces and taps read the
//! record once, when the response's head has been sent or, for those that need its end, when
//! its body has been written out or given up. No step reports on its own.
use crate::config::Direction;
use crate::context::ConnCtx;
use crate::error::ProxyError;
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// What became of one attempt to use an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered (HTTP: a response head; TCP: the connection was established).
    Answered,
    /// The attempt failed with this reason (see [`ProxyError::reason`]); `sent` tells whether
    /// any of the request may have reached the endpoint.
    Failed { reason: &'static str, sent: bool },
}

/// One attempt of a request on one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub endpoint: SocketAddr,
    pub outcome: Outcome,
}

/// Attempts of one request. The usual single attempt is kept inline (no allocation per
/// request; the record lives in every in-flight request's future); failover spills to the heap.
pub type Attempts = SmallVec<[Attempt; 1]>;

impl From<&ProxyError> for Outcome {
    fn from(e: &ProxyError) -> Outcome {
        Outcome::Failed { reason: e.reason(), sent: !e.before_send() }
    }
}

/// The story of one HTTP request, from arrival to the end of its response. While it lives, the
/// request counts as work in flight for the proxy's drain.
pub struct RequestRecord {
    /// The connection the request came on: who is calling, on which listener.
    pub conn: Counted,
    pub started: Instant,
    /// The matched rule's route name, once routing has decided.
    pub route: Option<Arc<str>>,
    /// The cluster the route chose.
    pub cluster: Option<Arc<str>>,
    /// The identity the chosen cluster's endpoints prove with mutual TLS (mesh services).
    pub upstream_identity: Option<Arc<str>>,
    pub attempts: Attempts,
    /// The status the client got.
    pub status: u16,
    /// Set when the proxy answered the request itself: why.
    pub error: Option<&'static str>,
    /// Whether the request is gRPC (HTTP/2 with an `application/grpc` content type).
    pub grpc: bool,
    /// The response's `grpc-status`, from its head (trailers-only) or its trailers.
    pub grpc_status: Option<u16>,
    /// From arrival until the response head was sent.
    pub head_latency: std::time::Duration,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// What an access log says of the request itself: noted at arrival, only on a listener
    /// that logs.
    pub request: Option<Box<RequestInfo>>,
    /// The request's place in its trace, on a listener that traces.
    pub trace: Option<TraceContext>,
}

/// A request as it arrived, for its access log line.
#[derive(Debug)]
pub struct RequestInfo {
    pub time: std::time::SystemTime,
    pub method: http::Method,
    pub authority: Option<http::uri::Authority>,
    /// The path as received, without the query (which may carry credentials).
    pub path: String,
    pub version: http::Version,
    /// The request's trace id: from its context on a listener that traces, else from the W3C
    /// `traceparent` it came with.
    pub trace_id: Option<String>,
    /// The request's headers, only for a tap that asked for them.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Request body bytes received from the client, counted as they are forwarded.
    pub bytes_in: Arc<std::sync::atomic::AtomicU64>,
}

impl RequestInfo {
    pub fn of<B>(req: &http::Request<B>, trace: Option<&TraceContext>, headers: bool) -> RequestInfo {
        let authority = req.uri().authority().cloned().or_else(|| {
            let host = req.headers().get(http::header::HOST)?;
            http::uri::Authority::try_from(host.as_bytes()).ok()
        });
        let trace_id = trace.map(TraceContext::trace_id_hex).or_else(|| {
            req.headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split('-').nth(1))
                .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_owned)
        });
        RequestInfo {
            time: std::time::SystemTime::now(),
            method: req.method().clone(),
            authority,
            path: req.uri().path().to_owned(),
            version: req.version(),
            trace_id,
            bytes_in: Arc::default(),
            headers: if headers {
                req.headers().iter().map(|(n, v)| (n.clone(), v.clone())).collect()
            } else {
                Vec::new()
            },
        }
    }
}

impl std::fmt::Debug for RequestRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestRecord")
            .field("peer", &self.conn.peer)
            .field("route", &self.route)
            .field("cluster", &self.cluster)
            .field("attempts", &self.attempts)
            .field("status", &self.status)
            .field("error", &self.error)
            .field("grpc_status", &self.grpc_status)
            .finish_non_exhaustive()
    }
}

impl RequestRecord {
    pub fn start(conn: Arc<ConnCtx>) -> RequestRecord {
        conn.listener.drain.begin();
        RequestRecord {
            conn: Counted(conn),
            started: Instant::now(),
            route: None,
            cluster: None,
            upstream_identity: None,
            attempts: Attempts::new(),
            status: 0,
            error: None,
            grpc: false,
            grpc_status: None,
            head_latency: std::time::Duration::ZERO,
            bytes_out: 0,
            request: None,
            trace: None,
        }
    }

    pub fn attempt(&mut self, endpoint: SocketAddr, outcome: Outcome) {
        self.attempts.push(Attempt { endpoint, outcome });
    }

    /// Where the client's request body counts its bytes, when the request is recorded.
    pub fn received(&self) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        self.request.as_ref().map(|i| i.bytes_in.clone())
    }

    /// Notes the response's `grpc-status` if `headers` (a head or trailers) carry one.
    pub fn grpc_status_from(&mut self, headers: &http::HeaderMap) {
        if let Some(v) = headers.get("grpc-status") {
            self.grpc_status = std::str::from_utf8(v.as_bytes()).ok().and_then(|s| s.parse().ok());
        }
    }

    /// The service that sent the request: this proxy's (outbound), or the one named by the
    /// SPIFFE ID the caller proved (inbound).
    pub fn src_service(&self) -> Option<&str> {
        match self.conn.listener.direction {
            Direction::outbound => self.conn.listener.own_service.as_deref(),
            Direction::inbound => service_of(self.peer_identity()?),
        }
    }

    /// The service the request went to: the route's backend (outbound), or this proxy's.
    pub fn dst_service(&self) -> &Arc<str> {
        match (&self.cluster, self.conn.listener.direction) {
            (Some(c), Direction::outbound) => c,
            _ => &self.conn.listener.service,
        }
    }

    /// The SPIFFE ID mutual TLS proved of the other side: the caller (inbound), or the called
    /// instance (outbound).
    pub fn peer_identity(&self) -> Option<&Arc<str>> {
        match self.conn.listener.direction {
            Direction::inbound => self.conn.peer_identity.as_ref().map(|p| &p.0),
            Direction::outbound => self.upstream_identity.as_ref(),
        }
    }

    /// Whether the request failed, as success rates count it: the proxy or the app answered
    /// 5xx, gRPC answered anything but OK, or the client never got an answer.
    pub fn failed(&self) -> bool {
        self.status == 0 || self.status >= 500 || (self.grpc && self.grpc_status.is_some_and(|s| s != 0))
    }
}

/// One request's place in its trace (see [`crate::trace`]): the trace, this hop's span, the
/// span it continues (the caller's), and whether the trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
}

impl TraceContext {
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// Bytes in lowercase hex.
pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 15)] as char);
    }
    s
}

/// The service a SPIFFE ID (`spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE`) names.
pub fn service_of(identity: &str) -> Option<&str> {
    Some(identity.rsplit_once("/sa/")?.1)
}

/// A request's connection, counting the request as work in flight in its listener's drain until
/// dropped: held by the request's record, then by its response body until the body has ended.
pub struct Counted(Arc<ConnCtx>);

impl std::ops::Deref for Counted {
    type Target = Arc<ConnCtx>;
    fn deref(&self) -> &Arc<ConnCtx> {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.listener.drain.end();
    }
}

impl TcpRecord {
    pub fn attempt(&mut self, endpoint: SocketAddr, outcome: Outcome) {
        self.attempts.push(Attempt { endpoint, outcome });
    }
}

/// The story of one opaque TCP connection.
#[derive(Debug, Default)]
pub struct TcpRecord {
    pub attempts: Attempts,
    /// Why the connection was closed without reaching an endpoint.
    pub error: Option<&'static str>,
    /// Bytes from the client, and to it.
    pub rx: u64,
    pub tx: u64,
}
