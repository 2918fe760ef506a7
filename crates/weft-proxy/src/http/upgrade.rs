//! `Upgrade` (e.g. WebSocket): the handshake goes on a dedicated connection and, on
//! `101 Switching Protocols`, the two upgraded connections are spliced together.
use super::body::UpstreamBody;
use super::headers::strip_hop_by_hop;
use super::replay::ClientBody;
use crate::attempt::{self, Attempted, Deadline, Exchange, Plan};
use crate::cluster::endpoint::{Endpoint, UpBody};
use crate::error::ProxyError;
use crate::record::RequestRecord;
use crate::route::MatchedRoute;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// Whether an HTTP/1.1 request asks to upgrade: it carries `Upgrade` and its `Connection`
/// lists `upgrade` (RFC 9110 §7.8), and not to h2c. hyper's server has already looked for
/// `Upgrade`: it gives exactly such requests (and `CONNECT`s) an `OnUpgrade`, so a request
/// without extensions is answered without hashing a header name.
///
/// h2c is never upgraded to: a client speaks HTTP/2 to the proxy with prior knowledge, and a
/// spliced h2c connection would carry requests no route or policy has seen. Such a request,
/// or one whose `Upgrade` is not in `Connection`, is forwarded as a plain request, without
/// `Upgrade` and `HTTP2-Settings` (as nginx and Envoy do).
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() != Method::CONNECT
        && req.extensions().get::<hyper::upgrade::OnUpgrade>().is_some()
        && lists(req.headers(), CONNECTION, "upgrade")
        && !lists(req.headers(), UPGRADE, "h2c")
}

/// Whether any of the header's comma-separated values is `token` (ignoring case).
fn lists(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes())))
}

/// An upgrade request's hop-by-hop headers stay on their hop like a plain request's (the ones
/// `Connection` names, `Keep-Alive`, …); only `Connection: upgrade` and `Upgrade` go on.
fn upgrade_headers(headers: &mut HeaderMap) {
    let protocols: Vec<HeaderValue> = headers.get_all(UPGRADE).iter().cloned().collect();
    strip_hop_by_hop(headers, true);
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    for p in protocols {
        headers.append(UPGRADE, p);
    }
}

/// Sends an upgrade request through the attempt engine: it may fail over while no endpoint
/// was reached; once sent, the client's connection is committed to that endpoint. The
/// `deadline` (the route's request timeout, on the policy path) bounds it up to the answer.
pub async fn upgrade_via(
    route: &MatchedRoute,
    req: Request<Incoming>,
    rec: &mut RequestRecord,
    deadline: Option<Deadline>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let view = route.backend.view();
    let plan = Plan {
        failover: route.rule.policy.failover,
        retry: None,
        route: &route.rule.id,
        idempotent: false,
        mesh: route.backend.is_mesh(),
        admit: false,
        deadline,
    };
    let mut exchange = UpgradeExchange { req: Some(req) };
    let resp = attempt::run(&mut exchange, &view, route.hash, &plan, &mut rec.attempts).await?;
    Ok(resp.map(|b| UpstreamBody::new(b, None)))
}

/// One attempt of an upgrade: a dedicated connection, the handshake on it, and on
/// `101 Switching Protocols` the splice.
struct UpgradeExchange {
    /// The client's request, until it is sent (it cannot be sent twice).
    req: Option<Request<Incoming>>,
}

impl Exchange for UpgradeExchange {
    type Output = Response<Incoming>;

    async fn attempt(&mut self, ep: &Arc<Endpoint>, connect_timeout: Duration) -> Attempted<Self::Output> {
        let conn = match ep.new_h1_upgradable(connect_timeout).await {
            Ok(conn) => conn,
            Err(e) => return Attempted::Failed(e),
        };
        let req = self.req.take().expect("an upgrade is sent once");
        let _in_flight = ep.start();
        match tunnel(ep, conn, req).await {
            Ok(resp) => Attempted::Answered(resp),
            Err(e) => Attempted::Failed(e),
        }
    }

    fn head(resp: &Self::Output) -> Option<(u16, &HeaderMap)> {
        Some((resp.status().as_u16(), resp.headers()))
    }

    fn rearm(&mut self) -> bool {
        self.req.is_some()
    }
}

async fn tunnel(
    ep: &Endpoint,
    mut s: hyper::client::conn::http1::SendRequest<UpBody>,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, ProxyError> {
    let downstream = hyper::upgrade::on(&mut req);
    upgrade_headers(req.headers_mut());
    let mut resp = s
        .send_request(req.map(|b| UpBody::Streamed(ClientBody::new(b, None))))
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

    /// An upgrade keeps `Connection: upgrade` and `Upgrade`, and loses the other hop-by-hop
    /// headers: the ones its `Connection` names, `Keep-Alive`, `HTTP2-Settings`.
    #[test]
    fn an_upgrades_hop_by_hop_headers_stay_on_their_hop() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("connection", "Upgrade, X-Hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ] {
            h.append(k, v.parse().unwrap());
        }
        super::upgrade_headers(&mut h);
        let mut left: Vec<String> = h.iter().map(|(k, v)| format!("{k}: {}", v.to_str().unwrap())).collect();
        left.sort();
        assert_eq!(left, ["connection: upgrade", "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==", "upgrade: websocket"]);
    }
    use hyper_util::rt::TokioIo;

    /// `is_upgrade` reads what hyper's server found in the head: an HTTP/1.1 request with
    /// `Upgrade` listed in `Connection` is one; a plain request, an HTTP/1.0 one, a `CONNECT`,
    /// one whose `Connection` does not list `upgrade` and an h2c upgrade are not.
    #[tokio::test]
    async fn upgrade_requests_are_recognised() {
        let cases = [
            ("GET", "/", http::Version::HTTP_11, None, "upgrade", "plain"),
            ("GET", "/chat", http::Version::HTTP_11, Some("websocket"), "upgrade", "upgrade"),
            ("GET", "/chat", http::Version::HTTP_11, Some("websocket"), "keep-alive, Upgrade", "upgrade"),
            ("GET", "/", http::Version::HTTP_10, Some("websocket"), "upgrade", "plain"),
            ("CONNECT", "example.com:443", http::Version::HTTP_11, None, "upgrade", "plain"),
            ("GET", "/chat", http::Version::HTTP_11, Some("websocket"), "keep-alive", "plain"),
            ("GET", "/", http::Version::HTTP_11, Some("h2c"), "Upgrade, HTTP2-Settings", "plain"),
            ("GET", "/", http::Version::HTTP_11, Some("websocket, h2c"), "upgrade", "plain"),
        ];
        for (method, uri, version, upgrade, connection, expected) in cases {
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
                req = req.header("connection", connection).header("upgrade", protocol);
            }
            let resp =
                send.send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
            assert_eq!(resp.headers()["x-seen"], expected, "{method} {uri} {version:?} upgrade={upgrade:?}");
        }
    }
}
