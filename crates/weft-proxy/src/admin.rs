//! The proxy's admin endpoint: `/live`, `/ready`, `/metrics`, `/config_dump`, `/certs`.
use crate::identity::CertStatus;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::sync::Arc;

/// What the admin endpoint shows of the proxy.
pub trait View: Send + Sync + 'static {
    /// The proxy's certificate.
    fn cert(&self) -> CertStatus;
    /// The metrics in the Prometheus text format, or OpenMetrics.
    fn metrics(&self, openmetrics: bool) -> String;
    /// The configuration in force and the node it was given to.
    fn config_dump(&self) -> serde_json::Value;
    /// Whether the first full config is applied.
    fn synced(&self) -> bool;
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn route(proxy: &impl View, req: &http::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/live" => reply(StatusCode::OK, TEXT, "live\n"),
        "/ready" => ready(proxy),
        "/certs" => {
            let body = serde_json::to_vec_pretty(&proxy.cert()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        "/metrics" => {
            let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
            if accept.contains("application/openmetrics-text") {
                let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                reply(StatusCode::OK, ct, proxy.metrics(true))
            } else {
                reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", proxy.metrics(false))
            }
        }
        "/config_dump" => {
            let body = serde_json::to_vec_pretty(&proxy.config_dump()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found; try /live, /ready, /metrics, /config_dump or /certs\n"),
    }
}

/// Ready once the first full config is applied and a certificate is held. The detail names
/// what is missing, and warns while renewals fail (before the certificate expires).
fn ready(proxy: &impl View) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let cert = proxy.cert();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let left = cert.not_after.map(|t| t.saturating_sub(now));
    let renewal = match (&cert.renewal_error, left) {
        (Some(e), Some(left)) => {
            format!("; WARNING: certificate renewal failing ({e}); current certificate expires in {left}s")
        }
        _ => String::new(),
    };
    if !proxy.synced() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: waiting for the first full config from the control plane\n",
        );
    }
    match (left, &cert.renewal_error) {
        (Some(0) | None, Some(e)) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("not ready: no valid certificate from the control plane's CA: {e}\n"),
        ),
        (Some(0) | None, None) => {
            reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready: waiting for a certificate\n")
        }
        (Some(left), _) => reply(
            StatusCode::OK,
            TEXT,
            format!("ready: certificate {} expires in {left}s{renewal}\n", cert.identity.unwrap_or_default()),
        ),
    }
}

pub async fn serve(listener: tokio::net::TcpListener, proxy: Arc<impl View>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let resp = route(&*proxy, &req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
