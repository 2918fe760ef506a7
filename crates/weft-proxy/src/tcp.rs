//! Opaque TCP forwarding: pick an endpoint (trying others when a connect fails), then copy
//! bytes both ways until either side closes.
use crate::balance::Cluster;
use crate::error::ProxyError;
use crate::metrics::TrafficMetrics;
use std::sync::Arc;
use tokio::net::TcpStream;

const ATTEMPTS: usize = 3;
const BUF: usize = 64 * 1024;

/// Connects to an endpoint of `cluster`, trying up to [`ATTEMPTS`] different ones.
pub async fn connect(cluster: &Cluster) -> Result<TcpStream, ProxyError> {
    let set = cluster.endpoints.load_full();
    let timeout = cluster.settings.load().connect_timeout;
    let mut tried = Vec::new();
    loop {
        let ep = cluster.pick(&set, &tried).ok_or_else(|| ProxyError::NoEndpoints(cluster.name.to_string()))?;
        match ep.connect_tcp(timeout).await {
            Ok(s) => return Ok(s),
            Err(e) if tried.len() + 1 < ATTEMPTS => {
                tracing::debug!(cluster = %cluster.name, error = %e, "connect failed, trying another endpoint");
                tried.push(Arc::as_ptr(&ep) as usize);
            }
            Err(e) => return Err(e),
        }
    }
}

pub async fn forward(mut client: TcpStream, cluster: Arc<Cluster>, metrics: Arc<TrafficMetrics>) {
    let mut upstream = match connect(&cluster).await {
        Ok(s) => s,
        Err(e) => {
            metrics.proxy_error(e.reason());
            tracing::warn!(cluster = %cluster.name, error = %e, reason = e.reason(), "closing TCP connection");
            return;
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await {
        Ok((rx, tx)) => metrics.tcp_bytes(rx, tx),
        Err(e) => tracing::debug!(cluster = %cluster.name, error = %e, "TCP stream ended with an error"),
    }
}
