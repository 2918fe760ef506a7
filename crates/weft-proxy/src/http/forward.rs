//! Executing a routed HTTP request: translate its head for the version the backend speaks,
//! keep what a re-send needs, and hand it to the attempt engine ([`crate::attempt`]), which
//! decides every re-send. [`HttpExchange`] is one attempt: check out a connection to the
//! endpoint the engine picked and send the request on it.
//!
//! A request with a body is sent again only if its body was sent to the end and kept
//! ([`super::replay`], at most the route's replay limit, 64 KiB by default).
use super::body::UpstreamBody;
use super::headers::strip_hop_by_hop;
use super::replay::{BodyCopy, ClientBody, UpBody};
use super::upgrade::{is_upgrade, upgrade_via};
use crate::app_protocol::Speaks;
use crate::attempt::{self, Attempted, Deadline, Exchange, Plan};
use crate::cluster::endpoint::{Conn, Endpoint};
use crate::config::UpstreamProtocol;
use crate::error::ProxyError;
use crate::record::RequestRecord;
use crate::route::MatchedRoute;
use http::header::HOST;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;

/// Forwards a request without the route's retry policy (inbound, and outbound routes without
/// policy). Not an `async fn`: the common path's future is [`forward_body`]'s, not one
/// wrapping it.
pub fn forward<'a>(
    route: MatchedRoute,
    req: Request<Incoming>,
    rec: &'a mut RequestRecord,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'a {
    if is_upgrade(&req) {
        // Rare and with large futures: boxed, so the common path's future stays small.
        return futures::future::Either::Left(Box::pin(async move { upgrade_via(&route, req, rec, None).await }));
    }
    let received = rec.received();
    futures::future::Either::Right(forward_body(
        route,
        req.map(|b| UpBody::Streamed(ClientBody::new(b, received))),
        false,
        rec,
    ))
}

/// Forwards a request that is not an upgrade, with the route's retry policy and request
/// timeout if `policy`.
pub fn forward_body<'a>(
    route: MatchedRoute,
    mut req: Request<UpBody>,
    policy: bool,
    rec: &'a mut RequestRecord,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'a {
    let downstream = req.version();
    if downstream != Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut(), true);
    }
    let idempotent = req.method().is_idempotent();
    let mut exchange = HttpExchange { req: Some(req), replay: None, h2: false };
    // An async block, not an `async fn`: the request is kept once, in `exchange` (an `async
    // fn` would keep its argument apart, in every request's future).
    async move {
        // From the first poll: a fault's delay before it does not count.
        let deadline = route.rule.policy.timeout.filter(|_| policy).map(Deadline::after);
        let cluster = &route.backend;
        let retry = route.rule.policy.retry.as_ref().filter(|_| policy);
        let policy = &route.rule.policy;
        // Settings and endpoints as this request sees them, through every attempt.
        let view = cluster.view();
        // The cluster may speak another HTTP version than the client (an HTTP/1.1-only app
        // behind an HTTP/2 client, or the reverse): the head is translated once, here.
        let h2 = match view.settings.protocol {
            UpstreamProtocol::Downstream => {
                // Not yet known (the app was still starting when last probed): asked now,
                // before the request is sent in a version the app may not speak. Boxed: rare.
                if cluster.learned.get() == Speaks::Unknown {
                    let learn = Box::pin(cluster.learn_protocol());
                    if let Some(d) = deadline {
                        tokio::time::timeout_at(d.at, learn).await.map_err(|_| ProxyError::RouteTimeout {
                            route: route.rule.id.clone(),
                            timeout: d.timeout,
                        })?;
                    } else {
                        learn.await;
                    }
                }
                cluster.learned.h2_for(downstream == Version::HTTP_2)
            }
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
        };
        let plan = Plan {
            failover: policy.failover,
            retry,
            route: &route.rule.id,
            idempotent,
            mesh: cluster.is_mesh(),
            admit: true,
            deadline,
        };
        // Keep what a re-send needs, unless none can happen (the head's copy costs a
        // header-map clone per request; a body's copy only references its buffers).
        let resend = retry.is_some() || (plan.failover.max_endpoints > 1 && view.set.ready.len() > 1);
        exchange.prepare(h2, downstream, resend.then_some(policy.replay_limit));
        let mut resp = std::pin::pin!(attempt::run(&mut exchange, &view, route.hash, &plan, &mut rec.attempts)).await?;
        // Answered by a peer datacenter's instance: its identity, not this datacenter's.
        if let Some(identity) = rec.attempts.last().and_then(|a| view.set.peer_identity(a.endpoint)) {
            rec.upstream_identity = Some(identity);
        }
        if !h2 {
            strip_hop_by_hop(resp.headers_mut(), false);
        }
        *resp.version_mut() = downstream;
        Ok(resp)
    }
}

/// One attempt of an HTTP request: a pooled (or new) connection to the endpoint, and the
/// request sent on it.
struct HttpExchange {
    /// The request for the next attempt: the client's until it is sent, the same one given
    /// back unsent, or a replay.
    req: Option<Request<UpBody>>,
    /// What a re-send needs, when one may happen: the head, and the body's copy if it is kept.
    replay: Option<(RequestHead, Option<Replay>)>,
    h2: bool,
}

impl HttpExchange {
    /// Readies the client's request to be sent in HTTP/2 if `h2` (else HTTP/1.1), and keeps
    /// what a re-send needs if one may happen (a body up to `keep` bytes).
    fn prepare(&mut self, h2: bool, downstream: Version, keep: Option<usize>) {
        self.h2 = h2;
        let Some(req) = self.req.as_mut() else { return };
        if h2 != (downstream == Version::HTTP_2) {
            to_version(req, h2);
        }
        if let Some(limit) = keep {
            let (kept, body) = Replay::keep(std::mem::replace(req.body_mut(), UpBody::Empty), limit);
            *req.body_mut() = body;
            self.replay = Some((RequestHead::of(req), kept));
        }
    }
}

impl Exchange for HttpExchange {
    type Output = Response<UpstreamBody>;

    async fn attempt(&mut self, ep: &Arc<Endpoint>, connect_timeout: Duration) -> Attempted<Self::Output> {
        let conn = match ep.checkout(self.h2, connect_timeout).await {
            Ok(conn) => conn,
            Err(e) => return Attempted::Failed(e),
        };
        let _in_flight = ep.start();
        let failed = |source| Attempted::Failed(ProxyError::exchange(ep.addr, source));
        // The request goes to the connection at once (hyper queues it), so the future of the
        // exchange does not hold it.
        let req = self.req.take().expect("the engine rearms the exchange before every attempt after the first");
        match conn {
            Conn::H2(mut s) => match s.send_request(req).await {
                Ok(resp) => Attempted::Answered(resp.map(|body| UpstreamBody::new(body, None))),
                Err(e) => failed(e),
            },
            Conn::H1(mut c) => match c.exchange(req).await {
                Ok(resp) => Attempted::Answered(resp.map(|body| UpstreamBody::new(body, Some((ep.clone(), c))))),
                // The connection had closed before the request was written: it comes back
                // untouched, for another connection.
                Err(mut e) => match e.take_message() {
                    Some(back) => {
                        self.req = Some(back);
                        Attempted::Unsent(ProxyError::exchange(ep.addr, e.into_error()))
                    }
                    None => failed(e.into_error()),
                },
            },
        }
    }

    fn head(resp: &Self::Output) -> Option<(u16, &HeaderMap)> {
        Some((resp.status().as_u16(), resp.headers()))
    }

    fn rearm(&mut self) -> bool {
        if self.req.is_none()
            && let Some((head, Some(keep))) = &self.replay
        {
            self.req = keep.body().map(|body| head.request(body));
        }
        self.req.is_some()
    }

    /// Reads a sidecar's short answer to its end in a task of its own, so its HTTP/1.1
    /// connection goes back to the pool: one dropped with its body unread is closed, and while
    /// an app is down every request its sidecar turns away would otherwise cost a new
    /// connection and mutual TLS handshake to that sidecar. (A larger body is dropped unread;
    /// sidecars' own answers are a line of text.)
    fn discard(resp: Self::Output) {
        const SHORT: u64 = 4096;
        let body = resp.into_body();
        if http_body::Body::size_hint(&body).upper().is_some_and(|n| n <= SHORT) {
            tokio::spawn(http_body_util::BodyExt::collect(body));
        }
    }
}

/// Rewrites a request's head for the other HTTP version: HTTP/1.1 takes an origin-form target
/// and a `Host` header, HTTP/2 the authority in the URI (`:authority`).
fn to_version<B>(req: &mut Request<B>, h2: bool) {
    let uri = req.uri().clone();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    if h2 {
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| req.headers_mut().remove(HOST).and_then(|h| h.to_str().ok().map(str::to_owned)))
            .unwrap_or_else(|| "localhost".to_owned());
        req.headers_mut().remove(HOST);
        if let Ok(u) = http::Uri::builder().scheme("http").authority(authority).path_and_query(path).build() {
            *req.uri_mut() = u;
        }
        *req.version_mut() = Version::HTTP_2;
    } else {
        if let Some(a) = uri.authority()
            && !req.headers().contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(HOST, v);
        }
        if let Ok(u) = path.parse() {
            *req.uri_mut() = u;
        }
        *req.version_mut() = Version::HTTP_11;
    }
}

/// How a request's body is kept for a replay.
pub enum Replay {
    Bodiless,
    Copied(BodyCopy),
    Chunks(std::collections::VecDeque<bytes::Bytes>),
}

impl Replay {
    /// What keeps `body` for a replay (if it can be kept), and the body to send first.
    pub fn keep(body: UpBody, limit: usize) -> (Option<Replay>, UpBody) {
        match body {
            UpBody::Empty => (Some(Replay::Bodiless), UpBody::Empty),
            UpBody::Copied { body, copy } => (Some(Replay::Copied(copy.clone())), UpBody::Copied { body, copy }),
            UpBody::Replayed(chunks) => (Some(Replay::Chunks(chunks.clone())), UpBody::Replayed(chunks)),
            UpBody::Streamed(b) if http_body::Body::is_end_stream(&b) => (Some(Replay::Bodiless), UpBody::Empty),
            UpBody::Streamed(b) if UpBody::fits(&http_body::Body::size_hint(&b), limit) => {
                let copy = BodyCopy::new(limit);
                (Some(Replay::Copied(copy.clone())), UpBody::Copied { body: b, copy })
            }
            streamed => (None, streamed),
        }
    }

    /// The body again, if it was kept whole.
    pub fn body(&self) -> Option<UpBody> {
        match self {
            Replay::Bodiless => Some(UpBody::Empty),
            Replay::Copied(copy) => copy.replay(),
            Replay::Chunks(chunks) => Some(UpBody::Replayed(chunks.clone())),
        }
    }
}

/// The head of a request, kept so the request can be sent again.
pub struct RequestHead {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    headers: http::HeaderMap,
}

impl RequestHead {
    pub fn of<B>(req: &Request<B>) -> RequestHead {
        RequestHead {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    pub fn request(&self, body: UpBody) -> Request<UpBody> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}
