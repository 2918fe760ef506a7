//! Opaque TCP forwarding: connect to an endpoint of the listener's cluster (failing over as
//! the policy allows), then copy bytes both ways until either side closes. The connection's
//! [`TcpRecord`] feeds metrics once it ends.
use crate::attempt::{self, Attempted, Exchange, Plan};
use crate::cluster::balance::Cluster;
use crate::cluster::endpoint::Endpoint;
use crate::config::Failover;
use crate::context::ConnCtx;
use crate::error::ProxyError;
use crate::metrics::TrafficMetrics;
use crate::record::{Outcome, TcpRecord};
use crate::transport::{BoxedIo, Transport};
use std::sync::Arc;
use std::time::Duration;

const BUF: usize = 64 * 1024;

/// Where a TCP listener sends its connections.
pub struct TcpTarget {
    pub cluster: Arc<Cluster>,
    pub failover: Failover,
    /// An instance a transparent app addressed itself: connected to alone (over its cluster's
    /// mutual TLS), never balanced away from.
    pub endpoint: Option<Arc<Endpoint>>,
}

pub async fn forward<T: Transport>(mut client: T, conn: &ConnCtx, target: &TcpTarget, metrics: &TrafficMetrics) {
    let _work = conn.listener.drain.work();
    let cluster = &target.cluster;
    let mut rec = TcpRecord::default();
    let plan = Plan {
        failover: target.failover,
        retry: None,
        route: &cluster.name,
        idempotent: false,
        mesh: false,
        admit: false,
        deadline: None,
    };
    let connected = if let Some(ep) = &target.endpoint {
        let r = ep.connect_tcp(cluster.connect_timeout()).await;
        rec.attempt(ep.addr, r.as_ref().err().map(Outcome::from).unwrap_or(Outcome::Answered));
        r
    } else if cluster.original_dst() {
        // Out of the mesh: where the client was going, from the proxy's own (marked) socket.
        let (addr, timeout) = (conn.local, cluster.connect_timeout());
        let r = match tokio::time::timeout(timeout, crate::transport::connect_marked(addr)).await {
            Ok(Ok(s)) => Ok(Box::new(s) as BoxedIo),
            Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
            Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
        };
        rec.attempt(conn.local, r.as_ref().err().map(Outcome::from).unwrap_or(Outcome::Answered));
        r
    } else {
        attempt::run(&mut TcpConnect, &cluster.view(), None, &plan, &mut rec.attempts).await
    };
    match connected {
        Ok(mut upstream) => {
            match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await {
                Ok((rx, tx)) => (rec.rx, rec.tx) = (rx, tx),
                Err(e) => tracing::debug!(cluster = %cluster.name, error = %e, "TCP stream ended with an error"),
            }
        }
        Err(e) => {
            rec.error = Some(e.reason());
            if let Some(left_out) = crate::log_limit::allow(e.reason()) {
                tracing::warn!(cluster = %cluster.name, peer = %conn.peer, error = %e, reason = e.reason(), like_it_since_last_line = left_out, "closing a TCP connection (one line per reason per 10 s; all are counted in weft_proxy_errors_total)");
            }
        }
    }
    metrics.tcp(&rec);
}

/// One attempt of an opaque TCP connection: connect to the endpoint.
struct TcpConnect;

impl Exchange for TcpConnect {
    type Output = BoxedIo;

    async fn attempt(&mut self, ep: &Arc<Endpoint>, connect_timeout: Duration) -> Attempted<BoxedIo> {
        match ep.connect_tcp(connect_timeout).await {
            Ok(io) => Attempted::Answered(io),
            Err(e) => Attempted::Failed(e),
        }
    }

    fn head(_: &BoxedIo) -> Option<(u16, &http::HeaderMap)> {
        None
    }

    /// Nothing was sent: the connection can always be tried elsewhere.
    fn rearm(&mut self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;
    use crate::context::ListenerInfo;
    use crate::metrics::Metrics;
    use crate::testing::{Behaviour, ClientStream, FakeEndpoints, addr, one_cluster};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Opaque TCP fails over through the attempt engine, as HTTP does: a refused endpoint is passed
    /// over for the next, and the bytes then flow both ways.
    #[tokio::test(start_paused = true)]
    async fn connect_refused_fails_over_and_bytes_flow() {
        let fakes = Arc::new(FakeEndpoints::default());
        let refused = fakes.add(addr(10), Behaviour::Refuse);
        let echo = fakes.add(addr(11), Behaviour::Echo);
        let clusters = one_cluster(fakes, "db", &[addr(10), addr(11)]);
        let target = TcpTarget { cluster: clusters.get("db"), failover: Failover::default(), endpoint: None };
        let metrics = Metrics::new().traffic(Direction::outbound, "db");
        let conn = ConnCtx {
            peer: addr(1),
            local: addr(2),
            listener: ListenerInfo::new("db", Direction::outbound, "db"),
            peer_identity: None,
        };
        let (mut client, proxy_side) = tokio::io::duplex(1024);
        let forwarding =
            tokio::spawn(async move { forward(ClientStream::new(proxy_side), &conn, &target, &metrics).await });
        client.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
        drop(client);
        forwarding.await.unwrap();
        assert_eq!(refused.connects.load(Ordering::Relaxed), 1);
        assert_eq!(echo.connects.load(Ordering::Relaxed), 1);
    }
}
