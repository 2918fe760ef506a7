//! Executing a routed request: get a connection to an endpoint of the chosen backend (failing
//! over on connect errors), send the request, and send it again elsewhere when that is safe.
//!
//! What may be sent again: a request that never left (the pooled connection had closed) goes
//! to a fresh connection whatever its method; an idempotent request without a body whose
//! connection broke before the response is replayed on another endpoint. A request with a
//! body is never replayed: its body has been consumed.
use super::body::UpstreamBody;
use super::headers::strip_hop_by_hop;
use super::upgrade::{is_upgrade, upgrade_via};
use crate::endpoint::{Conn, Endpoint, UpBody};
use crate::error::ProxyError;
use crate::failover::{self, Tried};
use crate::record::{Outcome, RequestRecord};
use crate::route::MatchedRoute;
use http::{Request, Response, Version};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use std::sync::Arc;

pub async fn forward(
    route: MatchedRoute,
    mut req: Request<Incoming>,
    rec: &mut RequestRecord,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cluster = &route.backend;
    let failover = route.rule.policy.failover;
    let upgrade = is_upgrade(&req);
    if !upgrade && req.version() != Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut(), true);
    }
    let h2 = req.version() == Version::HTTP_2;
    if upgrade {
        // Rare and with large futures: boxed, so the common path's future stays small.
        return Box::pin(upgrade_via(&route, req, rec)).await;
    }
    // A bodiless idempotent request can be sent again when its endpoint dies before
    // answering (e.g. the instance was just killed): keep its head for that, unless there is
    // no other endpoint to send it to (the copy costs a header-map clone per request).
    let replay = (req.method().is_idempotent()
        && http_body::Body::is_end_stream(req.body())
        && failover.max_endpoints > 1
        && cluster.endpoints.load().ready.len() > 1)
        .then(|| RequestHead::of(&req));
    let mut req = req.map(|b| if replay.is_some() { Either::Right(Empty::new()) } else { Either::Left(b) });
    let mut tried = Tried::default();
    let mut unsent = 0;
    loop {
        let (endpoint, conn) =
            failover::connect(cluster, failover, &mut tried, &mut rec.attempts, async move |ep: &Endpoint, t| {
                ep.checkout(h2, t).await
            })
            .await?;
        let result = {
            let _in_flight = endpoint.start();
            send(&endpoint, conn, req).await
        };
        match (result, &replay) {
            (Ok(Sent::Answered(mut resp)), _) => {
                rec.attempt(endpoint.addr, Outcome::Answered);
                if !h2 {
                    strip_hop_by_hop(resp.headers_mut(), false);
                }
                return Ok(resp);
            }
            // The connection had closed before the request went out (e.g. the upstream closed
            // it while pooled, or the instance just died): check out again, which connects
            // anew or, if that fails, moves on to another endpoint. Any method: nothing was sent.
            (Ok(Sent::Unsent(back, error)), _) => {
                let e = ProxyError::exchange(endpoint.addr, error);
                rec.attempt(endpoint.addr, Outcome::Failed { reason: e.reason(), sent: false });
                unsent += 1;
                if unsent == failover.max_endpoints {
                    return Err(e);
                }
                endpoint.drop_idle_h1();
                req = back;
            }
            (Err(e), replay) => {
                rec.attempt(endpoint.addr, (&e).into());
                let set = cluster.endpoints.load();
                match replay {
                    Some(head)
                        if matches!(e, ProxyError::UpstreamReset { .. }) && tried.may_try_another(failover, &set) =>
                    {
                        tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e, "replaying on another endpoint");
                        tried.add(&endpoint);
                        req = head.request();
                    }
                    _ => return Err(e),
                }
            }
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
