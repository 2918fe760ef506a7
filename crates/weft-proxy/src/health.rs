//! Health of the local application: probed on an interval, reported to the control plane
//! whenever it changes (and again until the report gets through).
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use weft_client::ControlApi;

#[derive(Debug, Clone)]
pub enum HealthCheck {
    /// GET this path on the app; 2xx and 3xx are healthy.
    Http { addr: SocketAddr, path: String },
    /// A TCP connect to the app succeeds.
    Tcp { addr: SocketAddr },
}

/// Consecutive failed probes before an instance is reported unhealthy.
const UNHEALTHY_AFTER: u32 = 2;

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

/// Probes the app every `interval`, keeps `healthy` up to date and reports each change of it
/// for instance `id`.
pub async fn run(
    check: HealthCheck,
    interval: Duration,
    id: String,
    healthy: Arc<AtomicBool>,
    control: Arc<ControlApi>,
) {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut failures = 0u32;
    let mut reported: Option<bool> = None;
    let mut next_probe = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_probe {
            next_probe += interval;
            let ok = probe(&check, &client, interval.clamp(Duration::from_millis(200), Duration::from_secs(5))).await;
            failures = if ok { 0 } else { failures + 1 };
            let was = healthy.load(Ordering::Relaxed);
            let now = if ok {
                true
            } else if failures >= UNHEALTHY_AFTER {
                false
            } else {
                was
            };
            if now != was {
                healthy.store(now, Ordering::Relaxed);
                tracing::info!(healthy = now, check = ?check, "application health changed");
            }
        }
        let now = healthy.load(Ordering::Relaxed);
        if reported != Some(now) {
            match control.report_health(&id, now).await {
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
