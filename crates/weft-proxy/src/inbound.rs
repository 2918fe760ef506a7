//! The inbound stack: requests from other services to the local app. By the time a request is
//! here, TLS termination has set the caller's verified identity on the connection
//! (`rec.conn.peer_identity`); every check that may refuse the request runs before anything
//! is sent to the app, in this order: authorization → route → forward.
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
}

impl Inbound {
    pub fn new(routes: Arc<ArcSwap<RouteTable>>) -> Inbound {
        Inbound { routes }
    }

    /// Decides at once; the future returned only forwards. (Not an `async fn`: each async
    /// layer would keep its own copy of the request in the per-connection request future.)
    pub fn call<'a>(
        &self,
        req: Request<Incoming>,
        rec: &'a mut RequestRecord,
    ) -> Either<Ready<Reply>, impl Future<Output = Reply> + Send + 'a> {
        match decide(&self.routes, &req, rec) {
            Ok(route) => Either::Right(crate::http::forward(route, req, rec)),
            Err(e) => Either::Left(ready(Err(e))),
        }
    }
}
