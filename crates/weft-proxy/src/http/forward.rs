//! Executing a routed request: get a connection to an endpoint of the chosen backend (failing
//! over on connect errors), send the request, and send it again elsewhere when that is safe.
//!
//! What may be sent again, on another endpoint: a request that never left (the pooled
//! connection had closed) whatever its method; a request the callee's sidecar answered with its
//! own connect failure to its app (`x-weft-error: connect-failed` or `connect-timeout` from a
//! mesh sidecar: the app never saw it) whatever its method; an idempotent request whose
//! connection broke before the response, here or between the callee's sidecar and its app (its
//! `upstream-reset`: the app died holding it, as when an instance is killed). A request with a
//! body is replayed only if its body was sent to the end and kept ([`super::replay`], at most
//! 64 KiB).
use super::body::UpstreamBody;
use super::headers::strip_hop_by_hop;
use super::replay::{BodyCopy, UpBody};
use super::upgrade::{is_upgrade, upgrade_via};
use crate::app_protocol::Speaks;
use crate::config::UpstreamProtocol;
use crate::endpoint::{Conn, Endpoint};
use crate::error::{ERROR_HEADER, ProxyError};
use crate::failover::{self, Tried};
use crate::outlier::Observed;
use crate::record::{Outcome, RequestRecord};
use crate::route::MatchedRoute;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use std::sync::Arc;

/// Not an `async fn`: the common path's future is [`forward_body`]'s, not one wrapping it.
pub fn forward<'a>(
    route: MatchedRoute,
    req: Request<Incoming>,
    rec: &'a mut RequestRecord,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'a {
    if is_upgrade(&req) {
        // Rare and with large futures: boxed, so the common path's future stays small.
        return futures::future::Either::Left(Box::pin(async move { upgrade_via(&route, req, rec).await }));
    }
    futures::future::Either::Right(forward_body(route, req.map(UpBody::Streamed), &[], rec))
}

/// Forwards a request that is not an upgrade, whose body may be the client's, a copy being
/// kept (by a retry), or a replay. Endpoints at `avoid` (where a retried request failed) are
/// not picked while another is ready.
pub async fn forward_body(
    route: MatchedRoute,
    mut req: Request<UpBody>,
    avoid: &[std::net::SocketAddr],
    rec: &mut RequestRecord,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cluster = &route.backend;
    let failover = route.rule.policy.failover;
    let downstream = req.version();
    if downstream != Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut(), true);
    }
    // Settings and endpoints as this request sees them, through every attempt.
    let view = cluster.view();
    let (settings, set) = (&view.settings, &view.set);
    // Counted until the response head (or the failure) is returned.
    // A retry's attempt comes with the earlier attempts in the record.
    let _admitted = cluster.admit(settings, rec.attempts.is_empty())?;
    let outlier = settings.outlier.as_ref();
    // The cluster may speak another HTTP version than the client (an HTTP/1.1-only app
    // behind an HTTP/2 client, or the reverse): the head is translated once, here.
    let h2 = match settings.protocol {
        UpstreamProtocol::Downstream => {
            // Not yet known (the app was still starting when last probed): asked now, before
            // the request is sent in a version the app may not speak. Boxed: rare.
            if cluster.learned.get() == Speaks::Unknown {
                Box::pin(cluster.learn_protocol()).await;
            }
            cluster.learned.h2_for(downstream == Version::HTTP_2)
        }
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::Http2 => true,
    };
    if h2 != (downstream == Version::HTTP_2) {
        to_version(&mut req, h2);
    }
    // Keep what a replay needs, unless there is no other endpoint to send it to (the head's
    // copy costs a header-map clone per request; a body's copy only references its buffers).
    let idempotent = req.method().is_idempotent();
    let replay = (failover.max_endpoints > 1 && set.ready.len() > 1).then(|| {
        let (keep, body) =
            Replay::keep(std::mem::replace(req.body_mut(), UpBody::Empty), route.rule.policy.replay_limit);
        *req.body_mut() = body;
        (RequestHead::of(&req), keep)
    });
    let again = |replay: &Option<(RequestHead, Option<Replay>)>| {
        let (head, keep) = replay.as_ref()?;
        Some(head.request(keep.as_ref()?.body()?))
    };
    let mut tried = Tried::default();
    if !avoid.is_empty() && set.ready.iter().any(|e| !avoid.contains(&e.addr)) {
        set.ready.iter().filter(|e| avoid.contains(&e.addr)).for_each(|e| tried.add(e));
    }
    let mut unsent = 0;
    loop {
        // Each step's future is pinned where it is made (awaiting one by value copies it).
        let (endpoint, conn) = {
            let connect = std::pin::pin!(failover::connect(
                &view,
                route.hash,
                failover,
                &mut tried,
                &mut rec.attempts,
                async move |ep: &Endpoint, t| ep.checkout(h2, t).await,
            ));
            connect.await?
        };
        // The callee's sidecar's own answer, when it could not reach its app (the arm below);
        // read after the attempt's result is gone, so the request's future holds the two at
        // different times.
        let sidecar_answer = {
            let result = {
                let _in_flight = endpoint.start();
                std::pin::pin!(send(&endpoint, conn, req)).await
            };
            match result {
                // The callee's sidecar failed to get an answer from its app: another instance
                // may take the request (whatever the method if the app never saw it).
                Ok(Sent::Answered(resp))
                    if cluster.is_mesh()
                        && let Some(failed) = app_failed(&resp, idempotent)
                        && tried.may_try_another(failover, set)
                        && let Some(r) = again(&replay) =>
                {
                    tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, reason = failed.reason, "the callee's sidecar got no answer from its app; trying another endpoint");
                    rec.attempt(endpoint.addr, Outcome::Failed { reason: failed.reason, sent: failed.sent });
                    cluster.observe(outlier, &endpoint, Observed::LocalFailure);
                    endpoint.attempt_failed();
                    endpoint.mark_failing();
                    tried.add(&endpoint);
                    req = r;
                    resp.into_body()
                }
                Ok(Sent::Answered(mut resp)) => {
                    rec.attempt(endpoint.addr, Outcome::Answered);
                    cluster.observe(outlier, &endpoint, Observed::Status(resp.status().as_u16()));
                    if resp.status().is_server_error() {
                        endpoint.attempt_failed();
                    }
                    if !h2 {
                        strip_hop_by_hop(resp.headers_mut(), false);
                    }
                    *resp.version_mut() = downstream;
                    return Ok(resp);
                }
                // The connection had closed before the request went out (e.g. the upstream
                // closed it while pooled, or the instance just died): check out again, which
                // connects anew or, if that fails, moves on to another endpoint. Any method:
                // nothing was sent.
                Ok(Sent::Unsent(back, error)) => {
                    let e = ProxyError::exchange(endpoint.addr, error);
                    rec.attempt(endpoint.addr, Outcome::Failed { reason: e.reason(), sent: false });
                    unsent += 1;
                    if unsent == failover.max_endpoints {
                        return Err(e);
                    }
                    endpoint.drop_idle_h1();
                    req = back;
                    continue;
                }
                Err(e) => {
                    rec.attempt(endpoint.addr, (&e).into());
                    // The client's body failed: nothing to hold against the endpoint.
                    if let ProxyError::BadRequestBody { .. } = e {
                        return Err(e);
                    }
                    cluster.observe(outlier, &endpoint, Observed::LocalFailure);
                    endpoint.attempt_failed();
                    let retry = (idempotent
                        && matches!(e, ProxyError::UpstreamReset { .. })
                        && tried.may_try_another(failover, set))
                    .then(|| again(&replay))
                    .flatten();
                    let Some(r) = retry else { return Err(e) };
                    tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e, "replaying on another endpoint");
                    tried.add(&endpoint);
                    req = r;
                    continue;
                }
            }
        };
        // Boxed: rare, and its future would take room in every request's.
        Box::pin(drain(sidecar_answer)).await;
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

/// Reads a sidecar's short answer to its end, so its HTTP/1.1 connection goes back to the pool:
/// one dropped with its body unread is closed, and while an app is down every request its
/// sidecar turns away would otherwise cost a new connection and mutual TLS handshake to that
/// sidecar. (A larger body is dropped unread; sidecars' own answers are a line of text.)
async fn drain(body: UpstreamBody) {
    const SHORT: u64 = 4096;
    if http_body::Body::size_hint(&body).upper().is_some_and(|n| n <= SHORT) {
        let _ = http_body_util::BodyExt::collect(body).await;
    }
}

/// How the callee's app failed a request, by its sidecar's own answer.
struct AppFailed {
    reason: &'static str,
    /// Whether the app may have seen the request.
    sent: bool,
}

/// The callee sidecar's own answer that its app failed the request before answering, if the
/// request may go to another instance: the app could not be reached (any method), or it reset
/// the connection before its response began (idempotent methods only: it may have acted on the
/// request). Only sidecars set `x-weft-error` (the inbound stack removes it from apps'
/// responses).
fn app_failed(resp: &Response<UpstreamBody>, idempotent: bool) -> Option<AppFailed> {
    let why = resp.headers().get(ERROR_HEADER)?;
    if why == "connect-failed" || why == "connect-timeout" {
        Some(AppFailed { reason: "app-not-reached", sent: false })
    } else if why == "upstream-reset" && idempotent {
        Some(AppFailed { reason: "app-reset", sent: true })
    } else {
        None
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
