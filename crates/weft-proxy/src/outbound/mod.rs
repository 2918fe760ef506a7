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
use crate::http::replay::UpBody;
use crate::http::upgrade::{is_upgrade, upgrade_via};
use crate::path::normalize_request;
use crate::record::RequestRecord;
use crate::route::{MatchedRoute, RouteTable, decide, sampled};
use arc_swap::ArcSwap;
use futures::future::{BoxFuture, Either, Ready, ready};
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
    ) -> Either<Ready<Reply>, Either<impl Future<Output = Reply> + Send + 'a, BoxFuture<'a, Reply>>> {
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
        // Boxed: faults, edits, mirrors, the timer and retries live only in requests whose
        // route has them.
        route.rule.edit_request(&mut req);
        Either::Right(Either::Right(Box::pin(with_policy(route, req, rec))))
    }
}

/// The route's policy around forwarding, in order: injected faults (a delay, then perhaps the
/// proxy's own answer), the timeout around retries and forwarding, mirrors once the request
/// was sent, and the response edits.
async fn with_policy(route: MatchedRoute, req: Request<Incoming>, rec: &mut RequestRecord) -> Reply {
    let rule = route.rule.clone();
    if let Some(f) = &rule.policy.fault {
        if let Some(d) = &f.delay
            && sampled(d.per_million)
        {
            tokio::time::sleep(d.delay).await;
        }
        if let Some(a) = &f.abort
            && sampled(a.per_million)
        {
            let status =
                http::StatusCode::from_u16(a.http.unwrap_or(503)).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
            return Err(ProxyError::FaultAbort { route: rule.id.clone(), status, grpc: a.grpc });
        }
    }
    let mut mirror = None;
    let result = if is_upgrade(&req) {
        // Rare, with a large future: boxed.
        let deadline = rule.policy.timeout.map(Deadline::after);
        Box::pin(upgrade_via(&route, req, rec, deadline)).await
    } else {
        let mut req = req.map(UpBody::Streamed);
        let targets: SmallVec<[Arc<Cluster>; 1]> =
            rule.mirrors.iter().filter(|(_, share)| sampled(*share)).map(|(c, _)| c.clone()).collect();
        if !targets.is_empty() {
            // The mirrors get the body as it was sent (kept while sending, up to 64 KiB).
            let (kept, body) = Replay::keep(std::mem::replace(req.body_mut(), UpBody::Empty), rule.policy.replay_limit);
            *req.body_mut() = body;
            mirror = Some((RequestHead::of(&req), kept, targets, rec.conn.clone()));
        }
        forward_body(route, req, true, rec).await
    };
    if let Some((head, Some(kept), targets, conn)) = mirror {
        for target in targets {
            match kept.body() {
                Some(body) => drop(tokio::spawn(mirror::send(rule.clone(), target, head.request(body), conn.clone()))),
                None => tracing::debug!(route = %rule.id, "not mirrored: the body was not kept whole"),
            }
        }
    }
    let mut resp = result?;
    rule.edit_response(&mut resp);
    Ok(resp)
}

mod mirror;
#[cfg(test)]
mod tests;
