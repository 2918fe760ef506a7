//! The outbound stack: requests from the local app to other services. Routing decides first
//! (rule, backend, policy) without I/O; the policy then wraps the forwarding: the rule's
//! request edits (headers, path and host rewrites) apply first, the route's timeout bounds
//! everything up to the response head, failover moves a request between endpoints of the
//! backend as [`crate::route::RoutePolicy`] allows, and the rule's response edits apply last.
use crate::error::ProxyError;
use crate::record::RequestRecord;
use crate::route::{RouteTable, decide};
use crate::stack::Reply;
use arc_swap::ArcSwap;
use futures::future::{BoxFuture, Either, Ready, ready};
use http::Request;
use hyper::body::Incoming;
use std::sync::Arc;

pub struct Outbound {
    routes: Arc<ArcSwap<RouteTable>>,
}

impl Outbound {
    pub fn new(routes: Arc<ArcSwap<RouteTable>>) -> Outbound {
        Outbound { routes }
    }

    /// Decides at once; the future returned runs the policy around forwarding. (Not an
    /// `async fn`: each async layer would keep its own copy of the request in the
    /// per-connection request future.)
    pub fn call<'a>(
        &self,
        mut req: Request<Incoming>,
        rec: &'a mut RequestRecord,
    ) -> Either<Ready<Reply>, Either<impl Future<Output = Reply> + Send + 'a, BoxFuture<'a, Reply>>> {
        let route = match decide(&self.routes, &req, rec) {
            Ok(route) => route,
            Err(e) => return Either::Left(ready(Err(e))),
        };
        let timeout = route.rule.policy.timeout;
        let retry = route.rule.policy.retry.is_some() && !crate::http::upgrade::is_upgrade(&req);
        if timeout.is_none() && route.rule.edits.is_none() && !retry {
            return Either::Right(Either::Left(crate::http::forward(route, req, rec)));
        }
        // Boxed: the timer, the rule's edits and retries live only in requests whose route has them.
        route.rule.edit_request(&mut req);
        let rule = route.rule.clone();
        let forward: BoxFuture<'a, Reply> = match &rule.policy.retry {
            Some(_) if retry => {
                let policy = rule.clone();
                Box::pin(async move {
                    let retry = policy.policy.retry.as_ref().expect("checked");
                    retry::with_retries(route, req, retry, rec).await
                })
            }
            _ => Box::pin(crate::http::forward(route, req, rec)),
        };
        Either::Right(Either::Right(Box::pin(async move {
            let mut resp = match timeout {
                Some(t) => tokio::time::timeout(t, forward)
                    .await
                    .map_err(|_| ProxyError::RouteTimeout { route: rule.id.clone(), timeout: t })??,
                None => forward.await?,
            };
            rule.edit_response(&mut resp);
            Ok(resp)
        })))
    }
}

mod retry;
#[cfg(test)]
mod tests;
