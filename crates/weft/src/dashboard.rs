//! The dashboard: a page embedded in this binary (crates/weft/dashboard, no CDN), served on a
//! loopback address by `weft dashboard` and by `weft up`. The page reads the control plane's
//! API through this server, which adds the CLI's admin credential (as `linkerd viz dashboard`
//! does through a port-forward): the browser never holds it. Only reads pass (GET); requests
//! naming another host are refused, so a web page elsewhere cannot use a DNS name pointing at
//! loopback to reach it.
use crate::api_client::Api;
use crate::cli::ControlAddr;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;

const INDEX: &str = include_str!("../dashboard/index.html");
const SCRIPT: &str = include_str!("../dashboard/dashboard.js");
const STYLE: &str = include_str!("../dashboard/dashboard.css");

/// `weft dashboard`: serves until Ctrl-C.
pub async fn run(control: &ControlAddr, listen: SocketAddr) -> anyhow::Result<()> {
    let api = Api::new(control)?;
    // Fail now, with the reason, rather than in the browser.
    api.get_json("/api/v1/services").await?;
    let listener = bind(listen).await?;
    println!("weft dashboard: http://{}/   (Ctrl-C stops it)", listener.local_addr()?);
    tokio::select! {
        served = serve(listener, api) => served,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// A loopback listener on `listen`: the dashboard acts with the admin credential, so it is
/// never served beyond this machine.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    if !listen.ip().is_loopback() {
        anyhow::bail!("the dashboard serves only on a loopback address (it acts with the admin credential): {listen}");
    }
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for the dashboard (--listen): {e}"))
}

pub async fn serve(listener: tokio::net::TcpListener, api: Api) -> anyhow::Result<()> {
    let port = listener.local_addr()?.port();
    let app = Router::new()
        .route("/", get(|| async { page(INDEX, "text/html; charset=utf-8") }))
        .route("/dashboard.js", get(|| async { page(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/dashboard.css", get(|| async { page(STYLE, "text/css; charset=utf-8") }))
        .route("/api/v1/{*path}", get(relay))
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| same_host(port, req, next)))
        .with_state(Arc::new(api));
    axum::serve(listener, app).await?;
    Ok(())
}

fn page(text: &'static str, content_type: &'static str) -> Response {
    let mut r = text.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Refuses requests whose `Host` is not this server's loopback address.
async fn same_host(port: u16, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let allowed = [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")];
    if !allowed.iter().any(|a| a == host) {
        return (StatusCode::FORBIDDEN, format!("host {host:?} is not this dashboard's address\n")).into_response();
    }
    next.run(req).await
}

/// A read of the control plane's API, with the CLI's credential, passed back as it comes (a
/// tap streams).
async fn relay(State(api): State<Arc<Api>>, req: Request) -> Response {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    match api.stream(&path).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let mut r = Response::new(Body::new(body));
            *r.status_mut() = parts.status;
            if let Some(t) = parts.headers.get(header::CONTENT_TYPE) {
                r.headers_mut().insert(header::CONTENT_TYPE, t.clone());
            }
            r
        }
        Err(e) => {
            let status =
                e.downcast_ref::<weft_client::ApiError>().and_then(|e| e.status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, axum::Json(serde_json::json!({"error": e.to_string()}))).into_response()
        }
    }
}
