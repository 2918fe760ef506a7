//! Active health checks of a cluster's endpoints by this proxy, on top of the registry's
//! health: every interval each registry-healthy endpoint is probed (an HTTP `GET` through the
//! endpoint's sidecar to its app, 2xx healthy; or a connection, TLS handshake included); after
//! `unhealthy_threshold` failures in a row the endpoint leaves the balancer's set, after
//! `healthy_threshold` passes in a row it is back. Endpoints start healthy. This module
//! holds an endpoint's health as its probes leave it; one probe is
//! [`crate::cluster::endpoint::Endpoint::probe`], and each cluster's probing task is in
//! [`crate::cluster::balance`].
use crate::config::HealthCheckDef;
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
