//! Serving one client connection: HTTP/2 as one hyper session for the connection's life;
//! HTTP/1.1 in sessions, parked between them with only its socket once it goes idle (see
//! [`crate::idle`]). Each request goes through the listener's [`HttpStack`] with a fresh
//! [`RequestRecord`], which metrics read when the response head is sent, or, when something
//! needs the response's end (gRPC's status, access logs, traces, taps), the response body
//! carries and hands on when the response has ended.
use super::body::UpstreamBody;
use super::respond::error_response;
use crate::context::ConnCtx;
use crate::context::Limits;
use crate::idle::{Exchange, IdleIo, Session};
use crate::record::{RequestInfo, RequestRecord};
use crate::stack::HttpStack;
use crate::trace::Tracer;
use crate::transport::Transport;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;

/// Serves one client connection. Written as an `async move` block rather than an `async fn`,
/// which would keep its arguments twice in its state; this state is part of the connection's
/// task for the connection's whole life.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve<T: Transport>(
    mut stream: T,
    h2: bool,
    conn: Arc<ConnCtx>,
    stack: Arc<HttpStack>,
    limits: &Limits,
) -> impl Future<Output = ()> + Send + '_ {
    async move {
        if h2 {
            let drain = conn.listener.drain.clone();
            let svc = hyper::service::service_fn(move |req| handle(stack.clone(), conn.clone(), None, req));
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(limits.max_header_bytes)
                .adaptive_window(true)
                .serve_connection(TokioIo::new(stream), svc);
            let mut served = Box::pin(served);
            // Draining: GOAWAY, so the client opens no new stream here; those in flight finish.
            let ended = tokio::select! {
                ended = served.as_mut() => ended,
                _ = drain.started() => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "downstream HTTP/2 connection ended with an error");
            }
            return;
        }
        let session = Arc::new(Session::default());
        loop {
            let svc = {
                let (stack, conn, session) = (stack.clone(), conn.clone(), session.clone());
                hyper::service::service_fn(move |req| {
                    handle(stack.clone(), conn.clone(), Some(session.exchange()), req)
                })
            };
            let io = TokioIo::new(IdleIo::new(stream, session.clone(), limits.header_read_timeout));
            // Boxed: while the connection is parked, its task holds no hyper state at all (the
            // builder is made per session for the same reason).
            let served = Box::pin(
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(None) // enforced by IdleIo, without a timer per request
                    // Exact: the request line and header fields as received, and the same bound
                    // for chunked trailers. (The read buffer's own bound is approximate: one read
                    // may bring more, and a head that arrived whole would pass.)
                    .max_header_size(limits.max_header_bytes as usize)
                    .max_buf_size((limits.max_header_bytes as usize).max(MIN_BUF_SIZE))
                    .serve_connection(io, svc)
                    .with_upgrades(),
            );
            if let Err(e) = served.await {
                // A head hyper could not parse was answered by hyper itself (400, or 431 for
                // one over the limit) before the connection closed: count it.
                match malformed(&e) {
                    Some(reason) => {
                        stack.metrics.proxy_error(reason);
                        if let Some(left_out) = crate::log_limit::allow(reason) {
                            tracing::info!(peer = %conn.peer, listener = %conn.listener.name, error = %e, reason, like_it_since_last_line = left_out, "malformed HTTP/1 request answered by the HTTP parser (one line per 10 s)");
                        }
                    }
                    None => {
                        tracing::debug!(peer = %conn.peer, error = %e, "downstream HTTP/1 connection ended with an error")
                    }
                }
                return;
            }
            let Some(mut parked) = session.take_parked() else { return };
            crate::idle::trim_soon();
            // An idle keep-alive connection is closed after the header read timeout, as before,
            // and at once when the proxy drains. Boxed: a connection parks after a second
            // without requests, and this wait would otherwise take room in every connection's
            // future.
            let drain = &conn.listener.drain;
            let next_request = Box::pin(async {
                tokio::select! {
                    read = tokio::time::timeout(limits.header_read_timeout, parked.readable()) => {
                        matches!(read, Ok(Ok(())))
                    }
                    _ = drain.started() => false,
                }
            });
            if drain.is_draining() || !next_request.await {
                return;
            }
            stream = parked;
        }
    }
}

/// hyper's smallest read buffer (it panics below it); `--max-header-bytes` may be smaller.
const MIN_BUF_SIZE: usize = 8192;

/// The reason for a request head hyper refused to parse, which hyper answered itself.
fn malformed(e: &hyper::Error) -> Option<&'static str> {
    if e.is_parse_too_large() {
        Some("header-too-large")
    } else if e.is_parse() {
        Some("bad-request")
    } else {
        None
    }
}

async fn handle(
    stack: Arc<HttpStack>,
    conn: Arc<ConnCtx>,
    exchange: Option<Exchange>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut rec = RequestRecord::start(conn);
    let h1 = req.version() != Version::HTTP_2;
    // gRPC runs over HTTP/2 only, so HTTP/1 requests skip the header lookup.
    let grpc =
        !h1 && req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    rec.grpc = grpc;
    // An HTTP/1 head is checked before anything routes or authorizes it (HTTP/2's pseudo-headers
    // leave no such ambiguity, and h2 has refused what is malformed).
    let checked = if h1 { super::head::check(&mut req) } else { Ok(()) };
    let log = stack.telemetry.access_log.get();
    // The trace context is continued (or started) on every request of a listener that traces;
    // only a sampled request keeps the tracer, for its span.
    let tracer = stack.telemetry.tracer.get().filter(|t| {
        let ctx = t.start(req.headers_mut());
        rec.trace = Some(ctx);
        ctx.sampled
    });
    let taps = &stack.telemetry.taps;
    if log.is_some() || tracer.is_some() || taps.active() {
        rec.request = Some(Box::new(RequestInfo::of(&req, rec.trace.as_ref(), taps.want_headers())));
    }
    let reply = match checked {
        // Pinned where it is made: awaiting the stack's future by value would copy the whole
        // (large) future into the request future's state, and then once more.
        Ok(()) => {
            let call = std::pin::pin!(stack.call(req, &mut rec));
            call.await
        }
        Err(e) => Err(e.into()),
    };
    let resp = match reply {
        Ok(resp) => resp.map(Either::Left),
        // A redirect route's answer: no failure, nothing to log.
        Err(e @ crate::error::ProxyError::Redirect { .. }) => error_response(&e, grpc),
        Err(e) => {
            rec.error = Some(e.reason());
            log_answered(&e, &rec);
            error_response(&e, grpc)
        }
    };
    rec.status = resp.status().as_u16();
    rec.head_latency = rec.started.elapsed();
    if grpc {
        rec.grpc_status_from(resp.headers());
    }
    let mut resp = resp;
    // Draining: an HTTP/1.1 client is told to close the connection after this response (and
    // connects elsewhere for its next request).
    if h1 && rec.conn.listener.drain.is_draining() {
        resp.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    if rec.attempts.len() > 1 {
        tracing::debug!(peer = %rec.conn.peer, route = ?rec.route, status = rec.status, attempts = ?rec.attempts, "request needed more than one attempt");
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(exchange) = &exchange
    {
        exchange.upgraded();
    }
    // What only the response's end can tell (bytes sent, a gRPC status in its trailers) is
    // waited for when something reads it: a gRPC request's metrics, an access log, a span, a
    // tap. Otherwise the request is counted now, and its body only keeps it in the drain.
    let end = if grpc || rec.request.is_some() {
        BodyEnd::Recorded(Box::new(Recorded { rec, stack, log, tracer }))
    } else {
        stack.metrics.request(&rec);
        BodyEnd::Counted { _in_drain: rec.conn }
    };
    Ok(resp.map(|inner| Body { inner, _exchange: exchange, end }))
}

/// The body of a response to the client. It holds the request's [`Exchange`], so the
/// connection counts as busy until hyper has written the body out and dropped it, and keeps
/// the request in the drain until then. A recorded request's record it completes (bytes sent,
/// a gRPC status in the trailers) and hands to metrics, the listener's access logs, its tracer
/// (a sampled request's span) and the proxy's taps when it is dropped: after its end was
/// written, or when the client went away.
pub struct Body {
    inner: Either<UpstreamBody, Full<Bytes>>,
    _exchange: Option<Exchange>,
    end: BodyEnd,
}

/// What a response body keeps until it ends.
enum BodyEnd {
    /// Boxed: hyper moves the body several times on its way out.
    Recorded(Box<Recorded>),
    /// A request already counted: only its place in the drain.
    Counted { _in_drain: crate::record::Counted },
}

/// A request's record and those it is handed to when its response ends.
struct Recorded {
    rec: RequestRecord,
    stack: Arc<HttpStack>,
    log: Option<Arc<crate::access_log::AccessLog>>,
    tracer: Option<Arc<Tracer>>,
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.stack.metrics.request(&self.rec);
        if let Some(log) = &self.log {
            log.record(&self.rec);
        }
        if let Some(tracer) = &self.tracer {
            tracer.finish(&self.rec);
        }
        let taps = &self.stack.telemetry.taps;
        if taps.active() {
            taps.offer(&self.rec);
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    #[inline]
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let BodyEnd::Recorded(end) = &mut this.end
            && let std::task::Poll::Ready(Some(Ok(frame))) = &polled
        {
            if let Some(data) = frame.data_ref() {
                end.rec.bytes_out += data.len() as u64;
            } else if let Some(trailers) = frame.trailers_ref()
                && end.rec.grpc
            {
                end.rec.grpc_status_from(trailers);
            }
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Logs a response the proxy made itself, one line per reason per
/// [`crate::log_limit::INTERVAL`] (every one is counted in `weft_proxy_errors_total`): a
/// refusal by policy or a limit at info, a failure to reach the upstream at warn.
fn log_answered(e: &crate::error::ProxyError, rec: &RequestRecord) {
    let Some(left_out) = crate::log_limit::allow(e.reason()) else { return };
    macro_rules! answered {
        ($level:ident) => {
            tracing::$level!(
                error = %e,
                reason = e.reason(),
                peer = %rec.conn.peer,
                listener = %rec.conn.listener.name,
                route = ?rec.route,
                attempts = ?rec.attempts,
                like_it_since_last_line = left_out,
                "proxy answered a request itself (one line per reason per 10 s; all are counted in weft_proxy_errors_total)"
            )
        };
    }
    if e.is_refusal() {
        answered!(info);
    } else {
        answered!(warn);
    }
}

#[cfg(test)]
mod tests {
    /// hyper keeps one request future allocated per client connection, so its size is paid
    /// per idle keep-alive connection. Rare paths (connecting, upgrades, reading a sidecar's
    /// refusal) are boxed to keep it small; this fails if a change makes the common path's
    /// future balloon.
    #[test]
    fn request_future_stays_small() {
        fn future_size<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = future_size(super::handle);
        assert!(size <= 2560, "handle() future is {size} bytes");
    }
}
