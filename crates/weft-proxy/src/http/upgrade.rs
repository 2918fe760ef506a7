//! `Upgrade` (e.g. WebSocket): the handshake goes on a dedicated connection and, on
//! `101 Switching Protocols`, the two upgraded connections are spliced together.
use super::body::UpstreamBody;
use crate::endpoint::{Endpoint, UpBody};
use crate::error::ProxyError;
use crate::failover::{self, Tried};
use crate::record::{Outcome, RequestRecord};
use crate::route::MatchedRoute;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Whether an HTTP/1.1 request asks to upgrade (carries `Upgrade`). hyper's server has already
/// looked: it gives exactly such requests (and `CONNECT`s) an `OnUpgrade`, and a request
/// without extensions is answered without hashing a header name.
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() != Method::CONNECT
        && req.extensions().get::<hyper::upgrade::OnUpgrade>().is_some()
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

#[cfg(test)]
mod tests {
    use super::is_upgrade;
    use hyper_util::rt::TokioIo;

    /// `is_upgrade` reads what hyper's server found in the head: an HTTP/1.1 request with
    /// `Upgrade` is one; a plain request, an HTTP/1.0 one and a `CONNECT` are not.
    #[tokio::test]
    async fn upgrade_requests_are_recognised() {
        let cases = [
            ("GET", "/", http::Version::HTTP_11, None, "plain"),
            ("GET", "/chat", http::Version::HTTP_11, Some("websocket"), "upgrade"),
            ("GET", "/", http::Version::HTTP_10, Some("websocket"), "plain"),
            ("CONNECT", "example.com:443", http::Version::HTTP_11, None, "plain"),
        ];
        for (method, uri, version, upgrade, expected) in cases {
            // A connection each: HTTP/1.0 and CONNECT end theirs.
            let (client, server) = tokio::io::duplex(64 * 1024);
            let svc = hyper::service::service_fn(|req| async move {
                let seen = if is_upgrade(&req) { "upgrade" } else { "plain" };
                // In a header: a `CONNECT`'s answer has no body (the tunnel follows).
                let resp =
                    http::Response::builder().header("x-seen", seen).body(http_body_util::Empty::<bytes::Bytes>::new());
                Ok::<_, std::convert::Infallible>(resp.unwrap())
            });
            let server = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), svc);
            tokio::spawn(server.with_upgrades());
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.unwrap();
            tokio::spawn(conn);
            let mut req =
                http::Request::builder().method(method).uri(uri).version(version).header("host", "example.com");
            if let Some(protocol) = upgrade {
                req = req.header("connection", "upgrade").header("upgrade", protocol);
            }
            let resp =
                send.send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
            assert_eq!(resp.headers()["x-seen"], expected, "{method} {uri} {version:?} upgrade={upgrade:?}");
        }
    }
}
