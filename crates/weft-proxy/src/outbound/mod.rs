//! The outbound stack: requests from the local app to other services. Routing decides first
//! (rule, backend, policy) without I/O; the policy then wraps the forwarding: the rule's
//! request edits (headers, path and host rewrites) apply first, then injected faults; the
//! route's timeout bounds retries and forwarding up to the response head (a deadline the
//! attempt engine keeps, [`crate::attempt::Deadline`]); failover moves a
//! request between endpoints of the backend as [`crate::route::RoutePolicy`] allows; copies
//! go to the mirrors once the request was sent; the rule's response edits apply last.
use crate::attempt::Deadline;
use crate::cluster::balance::Cluster;
use crate::config::EscapedSlashes;
use crate::error::ProxyError;
use crate::http::body::Reply;
use crate::http::forward::{Replay, RequestHead, forward_body};
use crate::http::replay::{ClientBody, UpBody};
use crate::http::upgrade::is_upgrade;
use crate::path::normalize_request;
use crate::record::RequestRecord;
use crate::route::{MatchedRoute, RouteTable, Rule, decide, sampled};
use arc_swap::ArcSwap;
use futures::future::{Either, Ready, ready};
use http::Request;
use hyper::body::Incoming;
use smallvec::SmallVec;
use std::sync::Arc;

pub struct Outbound {
    routes: Arc<ArcSwap<RouteTable>>,
    slashes: EscapedSlashes,
}

impl Outbound {
    pub fn new(routes: Arc<ArcSwap<RouteTable>>, slashes: EscapedSlashes) -> Outbound {
        Outbound { routes, slashes }
    }

    /// Decides at once; the future returned runs the policy around forwarding. (Not an
    /// `async fn`: each async layer would keep its own copy of the request in the
    /// per-connection request future.)
    pub fn call<'a>(
        &self,
        mut req: Request<Incoming>,
        rec: &'a mut RequestRecord,
    ) -> Either<Ready<Reply>, Either<impl Future<Output = Reply> + Send + 'a, impl Future<Output = Reply> + Send + 'a>>
    {
        if let Err(e) = normalize_request(&mut req, self.slashes) {
            return Either::Left(ready(Err(e.into())));
        }
        let route = match decide(&self.routes, &req, rec) {
            Ok(route) => route,
            Err(e) => return Either::Left(ready(Err(e))),
        };
        if !route.rule.has_policy() {
            return Either::Right(Either::Left(crate::http::forward(route, req, rec)));
        }
        route.rule.edit_request(&mut req);
        Either::Right(Either::Right(with_policy(route, req, rec)))
    }
}

/// What a mirrored request needs once the original was sent (boxed: mirrors are rare).
struct Mirror {
    head: RequestHead,
    kept: Option<Replay>,
    targets: SmallVec<[Arc<Cluster>; 1]>,
    conn: Arc<crate::context::ConnCtx>,
}

/// The route's policy around forwarding, in order: injected faults (a delay, then perhaps the
/// proxy's own answer), forwarding with retries under the route's timeout, mirrors once the
/// request was sent, and the response edits. Decided and built here, before the future runs;
/// the future ([`WithPolicy`]) is the forwarding future and a few words besides, so a request
/// with policy costs no allocation of its own.
fn with_policy<'a>(
    route: MatchedRoute,
    req: Request<Incoming>,
    rec: &'a mut RequestRecord,
) -> WithPolicy<impl Future<Output = Reply> + Send + 'a> {
    let rule = route.rule.clone();
    let fault = rule.policy.fault.as_ref();
    let delay = fault.and_then(|f| f.delay.as_ref()).filter(|d| sampled(d.per_million));
    let abort = fault.and_then(|f| f.abort.as_ref()).filter(|a| sampled(a.per_million));
    let mut mirror = None;
    let forward = if let Some(a) = abort {
        let status = http::StatusCode::from_u16(a.http.unwrap_or(503)).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
        Either::Left(ready(Err(ProxyError::FaultAbort { route: rule.id.clone(), status, grpc: a.grpc })))
    } else if is_upgrade(&req) {
        // Rare, with a large future: boxed. The route's timeout starts when it runs.
        let timeout = rule.policy.timeout;
        Either::Right(Either::Left(Box::pin(async move {
            crate::http::upgrade::upgrade_via(&route, req, rec, timeout.map(Deadline::after)).await
        })))
    } else {
        let received = rec.received();
        let mut req = req.map(|b| UpBody::Streamed(ClientBody::new(b, received)));
        let targets: SmallVec<[Arc<Cluster>; 1]> =
            rule.mirrors.iter().filter(|(_, share)| sampled(*share)).map(|(c, _)| c.clone()).collect();
        if !targets.is_empty() {
            // The mirrors get the body as it was sent (kept while sending, up to 64 KiB).
            let (kept, body) = Replay::keep(std::mem::replace(req.body_mut(), UpBody::Empty), rule.policy.replay_limit);
            *req.body_mut() = body;
            mirror = Some(Box::new(Mirror { head: RequestHead::of(&req), kept, targets, conn: rec.conn.clone() }));
        }
        Either::Right(Either::Right(forward_body(route, req, true, rec)))
    };
    WithPolicy { forward, delay: delay.map(|d| Box::pin(tokio::time::sleep(d.delay))), mirror, rule }
}

pin_project_lite::pin_project! {
    /// A request with policy in flight: see [`with_policy`]. A hand-written future rather than
    /// an `async` block, which would hold the forwarding future twice (once captured, once
    /// awaited).
    pub struct WithPolicy<F> {
        #[pin]
        forward: F,
        // Boxed: the timer's room only in the requests delayed.
        delay: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        mirror: Option<Box<Mirror>>,
        rule: Arc<Rule>,
    }
}

impl<F: Future<Output = Reply>> Future for WithPolicy<F> {
    type Output = Reply;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Reply> {
        let this = self.project();
        if let Some(delay) = this.delay {
            std::task::ready!(delay.as_mut().poll(cx));
            *this.delay = None;
        }
        let result = std::task::ready!(this.forward.poll(cx));
        if let Some(m) = this.mirror.take()
            && let Some(kept) = &m.kept
        {
            for target in m.targets {
                match kept.body() {
                    Some(body) => drop(tokio::spawn(mirror::send(
                        this.rule.clone(),
                        target,
                        m.head.request(body),
                        m.conn.clone(),
                    ))),
                    None => tracing::debug!(route = %this.rule.id, "not mirrored: the body was not kept whole"),
                }
            }
        }
        let mut resp = result?;
        this.rule.edit_response(&mut resp);
        std::task::Poll::Ready(Ok(resp))
    }
}

mod mirror;
#[cfg(test)]
mod tests;
