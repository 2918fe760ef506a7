//! Opaque TCP forwarding: connect to an endpoint of the listener's cluster (failing over as
//! the policy allows), then copy bytes both ways until either side closes. The connection's
//! [`TcpRecord`] feeds metrics once it ends.
use crate::balance::Cluster;
use crate::context::ConnCtx;
use crate::failover::{self, Tried};
use crate::metrics::TrafficMetrics;
use crate::record::{Outcome, TcpRecord};
use crate::route::Failover;
use crate::transport::Transport;

const BUF: usize = 64 * 1024;

/// Where a TCP listener sends its connections.
pub struct TcpTarget {
    pub cluster: std::sync::Arc<Cluster>,
    pub failover: Failover,
}

pub async fn forward<T: Transport>(mut client: T, conn: &ConnCtx, target: &TcpTarget, metrics: &TrafficMetrics) {
    let cluster = &target.cluster;
    let mut rec = TcpRecord::default();
    let connected =
        failover::connect(cluster, target.failover, &mut Tried::default(), &mut rec.attempts, async |ep, t| {
            ep.connect_tcp(t).await
        })
        .await;
    match connected {
        Ok((endpoint, mut upstream)) => {
            rec.attempt(endpoint.addr, Outcome::Answered);
            match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await {
                Ok((rx, tx)) => (rec.rx, rec.tx) = (rx, tx),
                Err(e) => tracing::debug!(cluster = %cluster.name, error = %e, "TCP stream ended with an error"),
            }
        }
        Err(e) => {
            rec.error = Some(e.reason());
            tracing::warn!(cluster = %cluster.name, peer = %conn.peer, error = %e, reason = e.reason(), "closing TCP connection");
        }
    }
    metrics.tcp(&rec);
}
