//! Mirroring: a copy of a request goes to another service, and its answer is dropped. The
//! client's response never waits for a mirror, and a mirror's failure is only logged.
use crate::cluster::balance::Cluster;
use crate::context::ConnCtx;
use crate::http::forward::forward_body;
use crate::http::replay::UpBody;
use crate::record::RequestRecord;
use crate::route::{MatchedRoute, Rule};
use http::Request;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a mirrored exchange may take, response body included, when the route sets no
/// timeout.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn send(rule: Arc<Rule>, backend: Arc<Cluster>, mut req: Request<UpBody>, conn: Arc<ConnCtx>) {
    if !backend.defined.load(Ordering::Relaxed) {
        tracing::debug!(route = %rule.id, cluster = %backend.name, "not mirrored: the cluster is not configured");
        return;
    }
    shadow_host(&mut req);
    let timeout = rule.policy.timeout.unwrap_or(MIRROR_TIMEOUT);
    let (route_id, cluster) = (rule.id.clone(), backend.name.clone());
    let mut rec = RequestRecord::start(conn);
    let exchange = async {
        let resp = forward_body(MatchedRoute { rule, backend, hash: None }, req, false, &mut rec).await?;
        // Read to the end, so a pooled HTTP/1.1 connection can be used again.
        let _ = resp.into_body().collect().await;
        Ok::<_, crate::error::ProxyError>(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(route = %route_id, %cluster, error = %e, "mirrored request failed"),
        Err(_) => tracing::debug!(route = %route_id, %cluster, ?timeout, "mirrored request timed out"),
    }
}

/// As Envoy does, the mirror sees the host with `-shadow` appended (before any port), so the
/// receiving app can tell mirrored traffic.
fn shadow_host<B>(req: &mut Request<B>) {
    let shadow = |authority: &str| match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    };
    if let Some(h) = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok())
        && let Ok(v) = http::HeaderValue::from_str(&shadow(h))
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
    if let Some(a) = req.uri().authority().map(|a| shadow(a.as_str())) {
        let mut parts = req.uri().clone().into_parts();
        parts.authority = a.parse().ok();
        if let Ok(u) = http::Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_sees_a_shadow_host() {
        let mut r = Request::builder().uri("/x").header("host", "backend:8080").body(()).unwrap();
        shadow_host(&mut r);
        assert_eq!(r.headers()["host"], "backend-shadow:8080");
        let mut r = Request::builder().uri("http://backend/x").body(()).unwrap();
        shadow_host(&mut r);
        assert_eq!(r.uri().authority().unwrap().as_str(), "backend-shadow");
    }
}
