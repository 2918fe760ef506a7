//! Active health checks of a cluster's endpoints by this proxy, on top of the registry's
//! health: every interval each registry-healthy endpoint is probed (an HTTP `GET` through the
//! endpoint's sidecar to its app, 2xx healthy; or a connection, TLS handshake included); after
//! `unhealthy_threshold` failures in a row the endpoint leaves the balancer's set, after
//! `healthy_threshold` passes in a row it is back. Endpoints start healthy.
use crate::balance::Cluster;
use crate::config::HealthCheckDef;
use crate::endpoint::Endpoint;
use crate::http::replay::UpBody;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// One endpoint's active health.
#[derive(Default)]
pub struct HealthState {
    failed: AtomicBool,
    /// Passes in a row (> 0) or failures in a row (< 0).
    streak: AtomicI32,
}

impl HealthState {
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Back to healthy, with no streak (the checks stopped).
    pub fn reset(&self) {
        self.failed.store(false, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
    }

    /// Counts a probe's result; true if the endpoint's state changed.
    pub fn record(&self, def: &HealthCheckDef, passed: bool) -> bool {
        let s = self.streak.load(Ordering::Relaxed);
        let s = match (passed, s > 0) {
            (true, true) => s.saturating_add(1),
            (true, false) => 1,
            (false, false) => s.saturating_sub(1),
            (false, true) => -1,
        };
        self.streak.store(s, Ordering::Relaxed);
        let failed = self.failed();
        let now_failed = if failed { s < def.healthy_threshold as i32 } else { -s >= def.unhealthy_threshold as i32 };
        self.failed.store(now_failed, Ordering::Relaxed);
        now_failed != failed
    }
}

async fn probe(ep: &Endpoint, def: &HealthCheckDef, authority: &str) -> bool {
    let work = async {
        match &def.http_path {
            None => ep.connect_tcp(def.timeout).await.is_ok(),
            Some(path) => {
                let Ok(mut send) = ep.new_h1_upgradable(def.timeout).await else { return false };
                let req = http::Request::get(path.as_str())
                    .header(http::header::HOST, authority)
                    .header(http::header::USER_AGENT, "weft-health-check")
                    .header(http::header::CONNECTION, "close")
                    .body(UpBody::Empty);
                let Ok(req) = req else { return false };
                send.send_request(req).await.is_ok_and(|r| r.status().is_success())
            }
        }
    };
    tokio::time::timeout(def.timeout, work).await.unwrap_or(false)
}

/// Probes `cluster`'s endpoints until the task is aborted (the cluster's check changed or
/// went) or the cluster is gone.
pub async fn run(cluster: Weak<Cluster>, def: HealthCheckDef) {
    let mut tick = tokio::time::interval(def.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else { return };
        let set = cluster.endpoints();
        let checked = set.all.iter().filter(|e| e.healthy.load(Ordering::Relaxed));
        let probes = checked.map(|e| async { (e.clone(), probe(e, &def, &cluster.name).await) });
        let mut changed = false;
        for (ep, passed) in futures::future::join_all(probes).await {
            if ep.health_check.record(&def, passed) {
                changed = true;
                if passed {
                    tracing::info!(cluster = %cluster.name, endpoint = %ep.addr, "endpoint passes its health checks again");
                } else {
                    tracing::warn!(cluster = %cluster.name, endpoint = %ep.addr, path = ?def.http_path, "endpoint failed its health checks; not sending to it");
                }
            }
        }
        if changed {
            cluster.refresh();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn thresholds_take_an_endpoint_out_and_bring_it_back() {
        let def = HealthCheckDef {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            http_path: None,
        };
        let h = HealthState::default();
        assert!(!h.record(&def, false) && !h.failed(), "one failure is not enough");
        assert!(!h.record(&def, true));
        assert!(!h.record(&def, false));
        assert!(h.record(&def, false) && h.failed(), "two in a row");
        assert!(!h.record(&def, true) && h.failed(), "one pass is not enough");
        assert!(h.record(&def, true) && !h.failed());
    }
}
