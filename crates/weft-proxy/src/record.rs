//! Per-request and per-connection records. Every step of a request writes what it decided and
//! what happened into one [`RequestRecord`]; when the request is answered, metrics (and later
//! access logs and traces) read the record once. No step reports on its own.
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

/// The story of one HTTP request, from arrival to answer. While it lives, the request counts
/// as work in flight for the proxy's drain.
#[derive(Debug)]
pub struct RequestRecord {
    /// The connection the request came on: who is calling, on which listener.
    pub conn: Arc<ConnCtx>,
    pub started: Instant,
    /// The matched route (`<route table>/<rule index>`), once routing has decided.
    pub route: Option<Arc<str>>,
    /// The cluster the route chose.
    pub cluster: Option<Arc<str>>,
    pub attempts: Attempts,
    /// The status the client got.
    pub status: u16,
    /// Set when the proxy answered the request itself: why.
    pub error: Option<&'static str>,
}

impl RequestRecord {
    pub fn start(conn: Arc<ConnCtx>) -> RequestRecord {
        conn.listener.drain.begin();
        RequestRecord {
            conn,
            started: Instant::now(),
            route: None,
            cluster: None,
            attempts: Attempts::new(),
            status: 0,
            error: None,
        }
    }

    pub fn attempt(&mut self, endpoint: SocketAddr, outcome: Outcome) {
        self.attempts.push(Attempt { endpoint, outcome });
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.conn.listener.drain.end();
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
