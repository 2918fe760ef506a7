//! The inbound stack: requests from other services to the local app. By the time a request is
//! here, mutual TLS termination has set the caller's verified identity on the connection
//! (`rec.conn.peer_identity`); every check that may refuse the request runs before anything
//! is sent to the app, in this order: authorization → route → forward.
use crate::authz::{Denied, LiveAuthz, Subject};
use crate::error::ProxyError;
use crate::metrics::TrafficMetrics;
use crate::record::RequestRecord;
use crate::route::{RouteTable, decide};
use crate::stack::Reply;
use arc_swap::ArcSwap;
use futures::future::{Either, Ready, ready};
use http::Request;
use hyper::body::Incoming;
use std::sync::Arc;

pub struct Inbound {
    /// Routes to the local app's cluster.
    routes: Arc<ArcSwap<RouteTable>>,
    /// The listener's authorization; replaced in place by LDS updates, so a change applies to
    /// connections already open.
    authz: LiveAuthz,
    metrics: Arc<TrafficMetrics>,
}

impl Inbound {
    pub fn new(routes: Arc<ArcSwap<RouteTable>>, authz: LiveAuthz, metrics: Arc<TrafficMetrics>) -> Inbound {
        Inbound { routes, authz, metrics }
    }

    /// Decides at once; the future returned only forwards. (Not an `async fn`: each async
    /// layer would keep its own copy of the request in the per-connection request future.)
    pub fn call<'a>(
        &self,
        mut req: Request<Incoming>,
        rec: &'a mut RequestRecord,
    ) -> Either<Ready<Reply>, impl Future<Output = Reply> + Send + 'a> {
        if let Some(authz) = &*self.authz.load() {
            let (parts, body) = req.into_parts();
            let subject = Subject {
                identity: rec.conn.peer_identity.as_ref().map(|p| &*p.0),
                port: rec.conn.local.port(),
                http: Some(&parts),
            };
            let decision = authz.check(&subject);
            self.metrics.authz(&decision);
            if let Err(Denied { policy }) = decision {
                return Either::Left(ready(Err(ProxyError::Denied { policy })));
            }
            req = Request::from_parts(parts, body);
        }
        match decide(&self.routes, &req, rec) {
            Ok(route) => Either::Right(crate::http::forward(route, req, rec)),
            Err(e) => Either::Left(ready(Err(e))),
        }
    }
}
