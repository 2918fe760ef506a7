//! The HTTP path of a listener: serve HTTP/1.1 or HTTP/2 to the client, route each request to
//! a cluster, pick an endpoint, and forward over a pooled connection of the same HTTP version.
//! Bodies stream through in both directions; nothing is buffered whole.
use crate::Limits;
use crate::balance::Cluster;
use crate::endpoint::{Conn, Endpoint, H1Conn, UpBody};
use crate::error::{ERROR_HEADER, ProxyError};
use crate::idle::{Exchange, IdleIo, Session};
use crate::metrics::TrafficMetrics;
use crate::route::RouteTable;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;

/// The body of a response to the client. It holds the request's [`Exchange`], so the
/// connection counts as busy until hyper has written the body out and dropped it.
pub struct Body {
    inner: Either<UpstreamBody, Full<Bytes>>,
    _exchange: Option<Exchange>,
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body from an upstream. On a pooled HTTP/1.1 connection it drives the connection
/// as the client reads (see [`H1Conn`]) and puts it back in the pool once the body has been read
/// to the end, so every pooled connection is idle and ready (a body dropped half-read closes
/// its connection).
pub struct UpstreamBody {
    inner: Incoming,
    h1: Option<(Arc<Endpoint>, Box<H1Conn>)>,
}

impl UpstreamBody {
    fn new(inner: Incoming, h1: Option<(Arc<Endpoint>, Box<H1Conn>)>) -> Self {
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

/// Connect attempts per request: the first endpoint plus two others.
const ATTEMPTS: usize = 3;

/// What an HTTP listener needs per request.
pub struct HttpTarget {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<TrafficMetrics>,
}

/// Serves one client connection. HTTP/2 is one hyper session for the connection's life; an
/// HTTP/1.1 connection is served in sessions, parked between them with only its socket once it
/// goes idle (see [`crate::idle`]).
pub async fn serve(stream: TcpStream, h2: bool, target: Arc<HttpTarget>, limits: &Limits) {
    if h2 {
        let svc = hyper::service::service_fn(move |req| handle(target.clone(), None, req));
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes)
            .adaptive_window(true)
            .serve_connection(TokioIo::new(stream), svc);
        if let Err(e) = Box::pin(conn).await {
            tracing::debug!(error = %e, "downstream HTTP/2 connection ended with an error");
        }
        return;
    }
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(None) // enforced by IdleIo, without a timer per request
        .max_buf_size(limits.max_header_bytes as usize);
    let session = Arc::new(Session::default());
    let mut stream = stream;
    loop {
        let svc = {
            let (target, session) = (target.clone(), session.clone());
            hyper::service::service_fn(move |req| handle(target.clone(), Some(session.exchange()), req))
        };
        let io = TokioIo::new(IdleIo::new(stream, session.clone(), limits.header_read_timeout));
        // Boxed: while the connection is parked, its task holds no hyper state at all.
        if let Err(e) = Box::pin(http1.serve_connection(io, svc).with_upgrades()).await {
            tracing::debug!(error = %e, "downstream HTTP/1 connection ended with an error");
            return;
        }
        let Some(parked) = session.take_parked() else { return };
        crate::idle::trim_soon();
        // An idle keep-alive connection is closed after the header read timeout, as before.
        match tokio::time::timeout(limits.header_read_timeout, parked.readable()).await {
            Ok(Ok(())) => stream = parked,
            _ => return,
        }
    }
}

async fn handle(
    target: Arc<HttpTarget>,
    exchange: Option<Exchange>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    // gRPC runs over HTTP/2 only, so HTTP/1 requests skip the header lookup.
    let grpc = req.version() == Version::HTTP_2
        && req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let resp = match forward(&target, req).await {
        Ok(resp) => resp.map(Either::Left),
        Err(e) => {
            target.metrics.proxy_error(e.reason());
            tracing::warn!(error = %e, reason = e.reason(), "proxy answered the request itself");
            error_response(&e, grpc)
        }
    };
    target.metrics.request(resp.status().as_u16(), started.elapsed());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(exchange) = &exchange
    {
        exchange.upgraded();
    }
    Ok(resp.map(|inner| Body { inner, _exchange: exchange }))
}

fn error_response(e: &ProxyError, grpc: bool) -> Response<Either<UpstreamBody, Full<Bytes>>> {
    let mut resp = if grpc {
        // gRPC clients read the status from grpc-status; UNAVAILABLE (14) lets them retry.
        let mut r = Response::new(Either::Right(Full::default()));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert("grpc-status", HeaderValue::from_static("14"));
        if let Ok(v) = HeaderValue::from_str(&e.to_string()) {
            r.headers_mut().insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!("weft: {e}\n")))));
        *r.status_mut() = e.status();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    resp.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static(e.reason()));
    resp
}

const HOP_BY_HOP_NAMES: [&str; 5] = ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding"];

/// Pre-parsed, so stripping them does not parse names per request. A `static`, not a `const`:
/// a const array would be built and dropped at every use.
static HOP_BY_HOP: [http::HeaderName; 5] = [
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[0]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[1]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[2]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[3]),
    http::HeaderName::from_static(HOP_BY_HOP_NAMES[4]),
];

/// Bit n is set if a hop-by-hop name is n bytes long: a header whose name length is not in
/// the set is passed over without comparing names (most are, e.g. `host`, `content-type`).
const HOP_BY_HOP_LENGTHS: u32 = {
    let (mut mask, mut i) = (0u32, 0);
    while i < HOP_BY_HOP_NAMES.len() {
        mask |= 1 << HOP_BY_HOP_NAMES[i].len();
        i += 1;
    }
    mask
};

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed set above, and any header the
/// message's `Connection` names. `request` also drops `te` and `transfer-encoding`, which hyper
/// re-derives for the upstream hop. Most messages carry none or one of them, so the names
/// present are found in one pass over the map and only those are removed (each removal hashes);
/// `Connection` is parsed only when it holds more than a lone `keep-alive` or `close`.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap, request: bool) {
    let names = if request { &HOP_BY_HOP[..] } else { &HOP_BY_HOP[..3] };
    // `close` and `keep-alive` are connection options; any other token in `Connection` names a
    // header meant for this hop only. Almost every `Connection` is just one option, recognised
    // without parsing.
    let option = |t: &[u8]| t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close");
    let mut present = 0u8;
    for key in headers.keys() {
        let len = key.as_str().len();
        if len < 32
            && HOP_BY_HOP_LENGTHS & (1 << len) != 0
            && let Some(i) = names.iter().position(|n| n == key)
        {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 && headers.get_all(header::CONNECTION).iter().any(|v| !option(v.as_bytes())) {
        let named: Vec<http::HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty() && !option(t))
            .filter_map(|t| http::HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in names.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

async fn forward(target: &HttpTarget, mut req: Request<Incoming>) -> Result<Response<UpstreamBody>, ProxyError> {
    let cluster = target.routes.load().route(&req).cloned().ok_or(ProxyError::NoRoute)?;
    if !cluster.defined.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ProxyError::UnknownCluster(cluster.name.to_string()));
    }
    let upgrade = is_upgrade(&req);
    if !upgrade && req.version() != Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut(), true);
    }
    let h2 = req.version() == Version::HTTP_2;
    if upgrade {
        // Rare and with large futures: boxed, so the common path's future stays small.
        return Box::pin(upgrade_via(&cluster, req)).await;
    }
    // A bodiless idempotent request can be sent again when its endpoint dies before
    // answering (e.g. the instance was just killed): keep its head for that, unless there is
    // no other endpoint to send it to (the copy costs a header-map clone per request).
    let replay = (req.method().is_idempotent()
        && http_body::Body::is_end_stream(req.body())
        && cluster.endpoints.load().ready.len() > 1)
        .then(|| RequestHead::of(&req));
    let mut req = req.map(|b| if replay.is_some() { Either::Right(Empty::new()) } else { Either::Left(b) });
    let mut tried = Vec::new();
    let mut unsent = 0;
    loop {
        let (endpoint, conn) =
            checkout(&cluster, &mut tried, async move |ep: &Endpoint, t| ep.checkout(h2, t).await).await?;
        let result = {
            let _in_flight = endpoint.start();
            send(&endpoint, conn, req).await
        };
        match (result, &replay) {
            (Ok(Sent::Answered(mut resp)), _) => {
                if !h2 {
                    strip_hop_by_hop(resp.headers_mut(), false);
                }
                return Ok(resp);
            }
            // The connection had closed before the request went out (e.g. the upstream closed
            // it while pooled, or the instance just died): check out again, which connects
            // anew or, if that fails, moves on to another endpoint. Any method: nothing was sent.
            (Ok(Sent::Unsent(back, error)), _) => {
                unsent += 1;
                if unsent == ATTEMPTS {
                    return Err(ProxyError::exchange(endpoint.addr, error));
                }
                endpoint.drop_idle_h1();
                req = back;
            }
            (Err(e @ ProxyError::UpstreamReset { .. }), Some(head))
                if tried.len() + 1 < ATTEMPTS.min(cluster.endpoints.load().ready.len()) =>
            {
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e, "replaying on another endpoint");
                tried.push(Arc::as_ptr(&endpoint) as usize);
                req = head.request();
            }
            (Err(e), _) => return Err(e),
        }
    }
}

/// The head of a bodiless request, kept so the request can be sent again.
struct RequestHead {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    headers: http::HeaderMap,
}

impl RequestHead {
    fn of<B>(req: &Request<B>) -> RequestHead {
        RequestHead {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    fn request(&self) -> Request<UpBody> {
        let mut r = Request::new(Either::Right(Empty::new()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

async fn upgrade_via(cluster: &Cluster, req: Request<Incoming>) -> Result<Response<UpstreamBody>, ProxyError> {
    let (endpoint, conn) =
        checkout(cluster, &mut Vec::new(), async |ep: &Endpoint, t| ep.new_h1_upgradable(t).await).await?;
    let _in_flight = endpoint.start();
    let resp = tunnel(&endpoint, conn, req).await?;
    Ok(resp.map(|b| UpstreamBody::new(b, None)))
}

/// Picks an endpoint not in `tried` and gets a connection to it, moving on to another
/// endpoint when a connect fails. The request has not been touched yet, so any request may
/// be retried here. At most [`ATTEMPTS`] endpoints are tried per request, all reasons counted.
async fn checkout<C>(
    cluster: &Cluster,
    tried: &mut Vec<usize>,
    connect: impl AsyncFn(&Endpoint, std::time::Duration) -> Result<C, ProxyError>,
) -> Result<(Arc<Endpoint>, C), ProxyError> {
    let set = cluster.endpoints.load_full();
    let timeout = cluster.settings.load().connect_timeout;
    loop {
        let ep = cluster.pick(&set, tried).ok_or_else(|| ProxyError::NoEndpoints(cluster.name.to_string()))?;
        match connect(&ep, timeout).await {
            Ok(c) => return Ok((ep, c)),
            Err(e) if e.before_send() && tried.len() + 1 < ATTEMPTS.min(set.ready.len()) => {
                tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, error = %e, "trying another endpoint");
                tried.push(Arc::as_ptr(&ep) as usize);
            }
            Err(e) => return Err(e),
        }
    }
}

/// What became of a request sent on a connection.
enum Sent {
    Answered(Response<UpstreamBody>),
    /// The connection had closed before the request was written: it comes back untouched.
    Unsent(Request<UpBody>, hyper::Error),
}

async fn send(ep: &Arc<Endpoint>, conn: Conn, req: Request<UpBody>) -> Result<Sent, ProxyError> {
    let failed = |source| ProxyError::exchange(ep.addr, source);
    let (resp, conn) = match conn {
        Conn::H2(mut s) => (s.send_request(req).await.map_err(failed)?, None),
        Conn::H1(mut c) => match c.exchange(req).await {
            Ok(resp) => (resp, Some(c)),
            Err(mut e) => match e.take_message() {
                Some(req) => return Ok(Sent::Unsent(req, e.into_error())),
                None => return Err(failed(e.into_error())),
            },
        },
    };
    Ok(Sent::Answered(resp.map(|body| UpstreamBody::new(body, conn.map(|c| (ep.clone(), c))))))
}

/// `Upgrade` (e.g. WebSocket): forward the handshake on a dedicated connection and, on
/// `101 Switching Protocols`, splice the two upgraded connections together.
async fn tunnel(
    ep: &Endpoint,
    mut s: hyper::client::conn::http1::SendRequest<UpBody>,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, ProxyError> {
    let downstream = hyper::upgrade::on(&mut req);
    let mut resp = s
        .send_request(req.map(Either::Left))
        .await
        .map_err(|source| ProxyError::UpstreamReset { addr: ep.addr, source })?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(d), Ok(u)) = tokio::join!(downstream, upstream) else {
                tracing::debug!("upgrade failed on one side");
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
        });
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    fn future_size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// hyper keeps one request future allocated per client connection, so its size is paid
    /// per idle keep-alive connection. Rare paths (connecting, upgrades) are boxed to keep
    /// it small; this fails if a change makes the common path's future balloon.
    #[test]
    fn request_future_stays_small() {
        let size = future_size(super::handle);
        assert!(size <= 3 * 1024, "handle() future is {size} bytes");
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("connection", "close, X-Hop"),
            ("connection", "x-other"),
            ("x-hop", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-end-to-end", "3"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        let mut response = h.clone();
        super::strip_hop_by_hop(&mut response, false);
        let left: Vec<&str> = response.keys().map(|k| k.as_str()).collect();
        // transfer-encoding stays on a response: hyper frames the body from it.
        assert_eq!(left, ["transfer-encoding", "x-end-to-end"]);
        super::strip_hop_by_hop(&mut h, true);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-end-to-end"]);
    }
}
