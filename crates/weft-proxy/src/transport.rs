//! The transport seam: what the proxy's connection code needs of a byte stream, so the HTTP
//! path, the idle-connection machinery and the pools work the same over plain TCP, TLS (next:
//! mTLS between sidecars) or an in-memory stream in tests.
//!
//! Downstream, a client connection is any [`Transport`]. Upstream, connections come from the
//! cluster manager's [`Connect`]: plain TCP in production ([`TcpConnect`]); TLS origination
//! wraps it; tests put in-memory endpoints behind it.
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A client connection as the proxy serves it.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Waits until the client has sent something (or closed), without reading it.
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// A client connection whose first bytes can be looked at before they are consumed, for
/// protocol detection (a socket; not TLS, whose bytes are read by rustls).
pub trait Peek: Transport {
    /// Copies bytes the client has sent into `buf` without consuming them; waits for at least
    /// one. 0 means the client closed the connection.
    fn peek(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
}

impl Transport for TcpStream {
    async fn readable(&mut self) -> io::Result<()> {
        TcpStream::readable(self).await
    }
}

impl Peek for TcpStream {
    async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::peek(self, buf).await
    }
}

/// A terminated TLS connection. Plaintext rustls has already decrypted counts as sent.
impl<T: Transport> Transport for tokio_rustls::server::TlsStream<T> {
    async fn readable(&mut self) -> io::Result<()> {
        let (io, session) = self.get_mut();
        match session.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => io.readable().await,
            // Data to read, the peer's close, or an error the next read will report.
            _ => Ok(()),
        }
    }
}

/// A connection to an upstream endpoint.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpstreamIo for T {}

/// Upstream connections are boxed: one allocation per connection (not per request) buys
/// pools that do not care what the stream is.
pub type BoxedIo = Box<dyn UpstreamIo>;

pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<BoxedIo>> + Send>>;

/// Opens connections to upstream endpoints.
pub trait Connect: Send + Sync + 'static {
    fn connect(&self, addr: SocketAddr) -> ConnectFuture;
}

/// What an upstream connection will carry: the ALPN it offers inside mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    Http1,
    Http2,
    Tcp,
}

/// TLS origination towards a cluster's endpoints, which must prove `identity` (or, in a peer
/// datacenter, one of the cluster's peer identities): one client configuration per protocol
/// (ALPN is set per configuration).
pub struct UpstreamTls {
    pub identity: Arc<str>,
    /// What it was made of: another cluster setting makes another origination.
    pub def: crate::config::UpstreamTlsDef,
    /// The server name sent, if the cluster names one (a peer's mesh gateway routes by it).
    sni: Option<rustls::pki_types::ServerName<'static>>,
    http1: tokio_rustls::TlsConnector,
    http2: tokio_rustls::TlsConnector,
    tcp: tokio_rustls::TlsConnector,
}

impl UpstreamTls {
    pub fn new(
        creds: &std::sync::Arc<crate::identity::Credentials>,
        def: &crate::config::UpstreamTlsDef,
    ) -> UpstreamTls {
        let mut accepted = vec![def.identity.clone()];
        accepted.extend(def.peer_identities.iter().cloned());
        let connector = |alpn: &[u8]| tokio_rustls::TlsConnector::from(creds.client_config(&accepted, alpn));
        UpstreamTls {
            identity: def.identity.as_str().into(),
            def: def.clone(),
            // Checked when the cluster was decoded.
            sni: def.sni.as_ref().and_then(|n| rustls::pki_types::ServerName::try_from(n.clone()).ok()),
            http1: connector(b"http/1.1"),
            http2: connector(b"h2"),
            tcp: connector(weft_api::identity::ALPN_TCP.as_bytes()),
        }
    }

    /// Runs the TLS handshake over `io`. The server name is the cluster's (sent as SNI), or the
    /// endpoint's address (no SNI is sent for an IP); the certificate is checked against the
    /// expected identities, not a host name.
    pub async fn handshake(&self, io: BoxedIo, addr: SocketAddr, carries: Carries) -> io::Result<BoxedIo> {
        let connector = match carries {
            Carries::Http1 => &self.http1,
            Carries::Http2 => &self.http2,
            Carries::Tcp => &self.tcp,
        };
        let name = match &self.sni {
            Some(n) => n.clone(),
            None => rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
        };
        Ok(Box::new(connector.connect(name, io).await?))
    }
}

/// The socket mark of the proxy's own connections; 0 (none) unless it is a transparent
/// instance's sidecar, whose namespace's capture rules let marked connections through
/// ([`weft_api::names::CAPTURE_MARK`]). Set once at startup.
static MARK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Marks every connection the proxy makes from now on with `mark` (needs CAP_NET_ADMIN).
pub fn set_mark(mark: u32) {
    MARK.store(mark, std::sync::atomic::Ordering::Relaxed);
}

/// Marks `socket` as the proxy's own, if the proxy marks its connections.
pub fn mark<S: std::os::fd::AsFd>(socket: &S) {
    let m = MARK.load(std::sync::atomic::Ordering::Relaxed);
    if m != 0
        && let Err(e) = socket2::SockRef::from(socket).set_mark(m)
    {
        tracing::warn!(error = %e, "cannot mark a connection of the sidecar; the capture rules will send it back to the sidecar");
    }
}

/// A TCP connection of the proxy's own (marked: see [`mark`]).
pub async fn connect_marked(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    mark(&socket);
    socket.connect(addr).await
}

/// Plain TCP, with Nagle off (requests and responses are written whole).
pub struct TcpConnect;

impl Connect for TcpConnect {
    fn connect(&self, addr: SocketAddr) -> ConnectFuture {
        Box::pin(async move {
            let stream = connect_marked(addr).await?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}
