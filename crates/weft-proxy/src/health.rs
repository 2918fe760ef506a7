//! Health of the local application: probed on an interval, reported to the control plane
//! whenever it changes (and again until the report gets through).
use crate::Proxy;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum HealthCheck {
    /// GET this path on the app; 2xx and 3xx are healthy.
    Http { addr: SocketAddr, path: String },
    /// A TCP connect to the app succeeds.
    Tcp { addr: SocketAddr },
}

/// Consecutive failed probes before an instance is reported unhealthy.
const UNHEALTHY_AFTER: u32 = 2;

/// The control plane's HTTP API, as the proxy uses it.
pub struct ControlApi {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ControlApi {
    pub fn new(control: &str) -> ControlApi {
        ControlApi { base: format!("http://{control}"), client: Client::builder(TokioExecutor::new()).build_http() }
    }

    async fn call(&self, method: http::Method, path: &str, body: Option<String>) -> Result<(), String> {
        let mut req = http::Request::builder().method(method).uri(format!("{}{path}", self.base));
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(2), self.client.request(req))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if status.is_success() { Ok(()) } else { Err(format!("{status}: {}", String::from_utf8_lossy(&body))) }
    }

    async fn report(&self, id: &str, healthy: bool) -> Result<(), String> {
        let body = serde_json::json!({ "healthy": healthy }).to_string();
        self.call(http::Method::PUT, &format!("/api/v1/instances/{id}/health"), Some(body)).await
    }

    pub async fn deregister(&self, id: &str) {
        if let Err(e) = self.call(http::Method::DELETE, &format!("/api/v1/instances/{id}"), None).await {
            tracing::debug!(error = %e, "deregistration failed; the control plane will notice the closed stream");
        }
    }
}

async fn probe(check: &HealthCheck, client: &Client<HttpConnector, Full<Bytes>>, timeout: Duration) -> bool {
    let work = async {
        match check {
            HealthCheck::Tcp { addr } => tokio::net::TcpStream::connect(addr).await.is_ok(),
            HealthCheck::Http { addr, path } => {
                let Ok(uri) = format!("http://{addr}{path}").parse::<http::Uri>() else { return false };
                match client.get(uri).await {
                    Ok(r) => r.status().is_success() || r.status().is_redirection(),
                    Err(_) => false,
                }
            }
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(false)
}

/// How often an undelivered health report is retried, whatever the probe interval.
const REPORT_RETRY: Duration = Duration::from_millis(200);

pub async fn run(check: HealthCheck, proxy: Arc<Proxy>, control: Arc<ControlApi>) {
    let interval = proxy.opts.health_interval;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut failures = 0u32;
    let mut reported: Option<bool> = None;
    let mut next_probe = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_probe {
            next_probe += interval;
            let ok = probe(&check, &client, interval.clamp(Duration::from_millis(200), Duration::from_secs(5))).await;
            failures = if ok { 0 } else { failures + 1 };
            let was = proxy.healthy.load(Ordering::Relaxed);
            let now = if ok {
                true
            } else if failures >= UNHEALTHY_AFTER {
                false
            } else {
                was
            };
            if now != was {
                proxy.healthy.store(now, Ordering::Relaxed);
                tracing::info!(healthy = now, check = ?check, "application health changed");
            }
        }
        let now = proxy.healthy.load(Ordering::Relaxed);
        if reported != Some(now) {
            match control.report(&proxy.opts.id, now).await {
                Ok(()) => reported = Some(now),
                // Not registered yet (stream still opening) or control plane away: retry soon.
                Err(e) => tracing::debug!(error = %e, "health report not delivered"),
            }
        }
        let wake =
            if reported == Some(now) { next_probe } else { next_probe.min(tokio::time::Instant::now() + REPORT_RETRY) };
        tokio::time::sleep_until(wake).await;
    }
}
