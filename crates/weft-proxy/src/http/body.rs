//! What the proxy reads from an upstream, and what a stack answers.
use crate::cluster::endpoint::{Endpoint, H1Conn};
use crate::error::ProxyError;
use bytes::Bytes;
use hyper::body::Incoming;
use std::sync::Arc;

/// What a stack answers: the upstream's response, or why the proxy answers itself.
pub type Reply = Result<http::Response<UpstreamBody>, ProxyError>;

/// A response body from an upstream. On a pooled HTTP/1.1 connection it drives the connection
/// as the client reads (see [`H1Conn`]) and puts it back in the pool once the body has been read
/// to the end, so every pooled connection is idle and ready (a body dropped half-read closes
/// its connection).
pub struct UpstreamBody {
    inner: Incoming,
    h1: Option<(Arc<Endpoint>, Box<H1Conn>)>,
}

impl UpstreamBody {
    pub(super) fn new(inner: Incoming, h1: Option<(Arc<Endpoint>, Box<H1Conn>)>) -> Self {
        let mut body = UpstreamBody { inner, h1 };
        if http_body::Body::is_end_stream(&body.inner) {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some((ep, conn)) = self.h1.take() {
            ep.checkin_h1(conn);
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        // Asking for a frame told the connection it may read on: let it, then look again.
        if polled.is_pending()
            && let Some((_, conn)) = &mut this.h1
            && conn.poll_connection(cx)
        {
            polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        }
        match &polled {
            std::task::Poll::Ready(None) => this.release(),
            std::task::Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
