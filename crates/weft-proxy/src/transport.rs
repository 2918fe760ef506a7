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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A client connection as the proxy serves it.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Copies bytes the client has sent into `buf` without consuming them; waits for at least
    /// one. 0 means the client closed the connection.
    fn peek(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;

    /// Waits until the client has sent something (or closed), without reading it.
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

impl Transport for TcpStream {
    async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::peek(self, buf).await
    }

    async fn readable(&mut self) -> io::Result<()> {
        TcpStream::readable(self).await
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

/// Plain TCP, with Nagle off (requests and responses are written whole).
pub struct TcpConnect;

impl Connect for TcpConnect {
    fn connect(&self, addr: SocketAddr) -> ConnectFuture {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}
