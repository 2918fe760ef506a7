//! `Upgrade` (e.g. WebSocket): the handshake goes on a dedicated connection and, on
//! `101 Switching Protocols`, the two upgraded connections are spliced together.
use super::body::UpstreamBody;
use crate::endpoint::{Endpoint, UpBody};
use crate::error::ProxyError;
use crate::failover::{self, Tried};
use crate::record::{Outcome, RequestRecord};
use crate::route::MatchedRoute;
use http::{Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

pub async fn upgrade_via(
    route: &MatchedRoute,
    req: Request<Incoming>,
    rec: &mut RequestRecord,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let failover = route.rule.policy.failover;
    let (endpoint, conn) = failover::connect(
        &route.backend.view(),
        route.hash,
        failover,
        &mut Tried::default(),
        &mut rec.attempts,
        async |ep: &Endpoint, t| ep.new_h1_upgradable(t).await,
    )
    .await?;
    let _in_flight = endpoint.start();
    let result = tunnel(&endpoint, conn, req).await;
    rec.attempt(endpoint.addr, result.as_ref().map_or_else(Outcome::from, |_| Outcome::Answered));
    Ok(result?.map(|b| UpstreamBody::new(b, None)))
}

async fn tunnel(
    ep: &Endpoint,
    mut s: hyper::client::conn::http1::SendRequest<UpBody>,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, ProxyError> {
    let downstream = hyper::upgrade::on(&mut req);
    let mut resp = s
        .send_request(req.map(UpBody::Streamed))
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
