//! What the proxy knows about a client connection. A [`ConnCtx`] is created when the
//! connection is accepted and is read, never changed, by every step after it: protocol
//! detection, the HTTP or TCP path, and each request's [`crate::record::RequestRecord`].
use crate::config::Direction;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The verified identity of the peer at the other end of a connection (a SPIFFE ID once mTLS
/// exists). `None` in [`ConnCtx::peer_identity`] means the peer is unauthenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<str>);

/// A TLS ClientHello seen by protocol detection: what the client asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// Server Name Indication, if the client sent one.
    pub server_name: Option<String>,
    /// ALPN protocols offered, in the client's order.
    pub alpn: Vec<String>,
}

/// The listener that accepted a connection, as its connections see it: one shared value per
/// listener, so each connection's context holds a pointer to it rather than copies.
#[derive(Debug)]
pub struct ListenerInfo {
    pub name: Arc<str>,
    pub direction: Direction,
    /// The service whose traffic this is (the local one for inbound, the called one for
    /// outbound).
    pub service: Arc<str>,
    /// The proxy's own service (the source of what it sends), if it knows it.
    pub own_service: Option<Arc<str>>,
    /// The proxy's own SPIFFE ID, once it has a certificate.
    pub own_identity: Option<Arc<str>>,
    /// The proxy's drain, which every request and TCP connection counts in.
    pub drain: Arc<crate::drain::Drain>,
}

impl ListenerInfo {
    /// A listener of a proxy that never drains (in-process tests).
    pub fn new(name: &str, direction: Direction, service: &str) -> Arc<ListenerInfo> {
        Arc::new(ListenerInfo {
            name: name.into(),
            direction,
            service: service.into(),
            own_service: None,
            own_identity: None,
            drain: Default::default(),
        })
    }
}

/// One accepted client connection. It is allocated once per connection and kept while the
/// connection idles, so it holds only what differs between connections (88 bytes; 104 with
/// the `Arc`'s counts).
#[derive(Debug, Clone)]
pub struct ConnCtx {
    pub peer: SocketAddr,
    /// The address the client connected to (the listener's, or the original destination once
    /// traffic is intercepted transparently).
    pub local: SocketAddr,
    pub listener: Arc<ListenerInfo>,
    /// Set only by mutual TLS termination, from the verified client certificate's SPIFFE ID.
    pub peer_identity: Option<PeerIdentity>,
}

/// Limits that protect the proxy; all have safe defaults and command-line flags.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long to wait for a client's first bytes before treating the connection as opaque TCP.
    pub detect_timeout: Duration,
    /// Largest request head (HTTP/1) or header list (HTTP/2) accepted.
    pub max_header_bytes: u32,
    /// Time allowed for an HTTP/1 client to send its request head.
    pub header_read_timeout: Duration,
    /// Open client connections per listener; new ones beyond it are closed at once.
    pub max_connections: usize,
    /// How long a pooled upstream HTTP/1.1 connection may sit unused before it is closed.
    pub upstream_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            detect_timeout: Duration::from_secs(1),
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            upstream_idle_timeout: Duration::from_secs(90),
        }
    }
}
