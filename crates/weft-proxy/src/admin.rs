//! The proxy's admin endpoint: `/live`, `/ready`, `/metrics`, `/config_dump`.
use crate::Proxy;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::sync::Arc;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn route(proxy: &Proxy, req: &http::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/live" => reply(StatusCode::OK, TEXT, "live\n"),
        "/ready" if *proxy.ready.borrow() => reply(StatusCode::OK, TEXT, "ready\n"),
        "/ready" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: waiting for the first full config from the control plane\n",
        ),
        "/metrics" => {
            let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
            if accept.contains("application/openmetrics-text") {
                let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                reply(StatusCode::OK, ct, proxy.metrics.encode(true))
            } else {
                reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", proxy.metrics.encode(false))
            }
        }
        "/config_dump" => {
            let dump = proxy.dump().clone();
            let mut json = serde_json::to_value(&dump).unwrap_or_default();
            json["node"] = serde_json::json!({ "id": proxy.opts.id, "registration": proxy.registration() });
            let body = serde_json::to_vec_pretty(&json).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found; try /live, /ready, /metrics or /config_dump\n"),
    }
}

pub async fn serve(listener: tokio::net::TcpListener, proxy: Arc<Proxy>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let resp = route(&proxy, &req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
