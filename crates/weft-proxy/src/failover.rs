//! Connect, and fail over to another endpoint. The one place that decides whether a failed
//! attempt may move to another endpoint; the HTTP path (pooled and upgrade connections,
//! replays) and the TCP path both go through it.
use crate::balance::{ClusterView, EndpointSet};
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::outlier::Observed;
use crate::record::{Attempt, Attempts};
use crate::route::Failover;
use smallvec::SmallVec;
use std::sync::Arc;
use std::time::Duration;

/// Endpoints already tried for one request, by identity.
#[derive(Default)]
pub struct Tried(SmallVec<[usize; 3]>);

impl Tried {
    pub fn add(&mut self, ep: &Arc<Endpoint>) {
        self.0.push(Arc::as_ptr(ep) as usize);
    }

    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }

    /// Whether, after one more failed endpoint, another may be tried: within the policy's
    /// limit and while untried ready endpoints remain.
    pub fn may_try_another(&self, failover: Failover, set: &EndpointSet) -> bool {
        self.0.len() + 1 < failover.max_endpoints.min(set.ready.len())
    }
}

/// Picks an endpoint not yet tried and connects with `connect`, moving on to another endpoint
/// when the connect fails before anything was sent (refused, timed out, handshake failed).
/// Every failed attempt is recorded in `attempts`; the caller records the outcome of the one
/// that connected.
pub async fn connect<C>(
    view: &ClusterView<'_>,
    hash: Option<u64>,
    failover: Failover,
    tried: &mut Tried,
    attempts: &mut Attempts,
    connect: impl AsyncFn(&Endpoint, Duration) -> Result<C, ProxyError>,
) -> Result<(Arc<Endpoint>, C), ProxyError> {
    let (cluster, settings, set) = (view.cluster, &view.settings, &view.set);
    let (timeout, outlier) = (settings.connect_timeout, settings.outlier.as_ref());
    loop {
        let ep = view.pick(tried.as_slice(), hash).ok_or_else(|| ProxyError::NoEndpoints(cluster.name.to_string()))?;
        match connect(&ep, timeout).await {
            Ok(c) => return Ok((ep, c)),
            Err(e) => {
                attempts.push(Attempt { endpoint: ep.addr, outcome: (&e).into() });
                cluster.observe(outlier, &ep, Observed::LocalFailure);
                ep.attempt_failed();
                if !(e.before_send() && tried.may_try_another(failover, set)) {
                    return Err(e);
                }
                tracing::debug!(cluster = %cluster.name, endpoint = %ep.addr, error = %e, "trying another endpoint");
                tried.add(&ep);
            }
        }
    }
}
