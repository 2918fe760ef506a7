//! Outlier detection (passive health checking): each endpoint counts its failures in a row;
//! when a streak reaches the cluster's limit the cluster ejects the endpoint, so the balancer
//! passes it over until the ejection ends. The n-th ejection in a row lasts n times the base
//! time (up to the maximum); each base time spent back in without being ejected again takes
//! one off n.
//!
//! Invariants: an endpoint is ejected while `now < ejected_until`; nothing has to run for an
//! ejection to end. Counting costs a request two relaxed atomics, and only in clusters with
//! outlier detection.
use crate::config::OutlierDef;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// What one attempt at an endpoint came to, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The endpoint answered with this status.
    Status(u16),
    /// The proxy could not connect, the connection broke, or the callee's sidecar could not
    /// reach its app: a gateway error that no app answered.
    LocalFailure,
}

#[derive(Default)]
pub struct OutlierState {
    five_xx: AtomicU32,
    gateway: AtomicU32,
    /// Clock (ns, see [`crate::clock::now`]) when the current or last ejection ends; 0
    /// if never ejected.
    ejected_until: AtomicU64,
    /// Ejections in a row (the multiplier of the next one).
    ejections: AtomicU32,
}

impl OutlierState {
    /// Counts one result; true when a streak reached its limit (the cluster decides whether
    /// to eject).
    pub fn record(&self, def: &OutlierDef, what: Observed) -> bool {
        let (server_error, gateway) = match what {
            Observed::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Observed::LocalFailure => (true, true),
        };
        let bump = |count: &AtomicU32, failed: bool| {
            if failed {
                count.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                if count.load(Ordering::Relaxed) != 0 {
                    count.store(0, Ordering::Relaxed);
                }
                0
            }
        };
        let five_xx = bump(&self.five_xx, server_error);
        let gateway = bump(&self.gateway, gateway);
        def.consecutive_5xx.is_some_and(|limit| five_xx >= limit)
            || def.consecutive_gateway.is_some_and(|limit| gateway >= limit)
    }

    pub fn ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Ejects from `now`; returns for how long.
    pub fn eject(&self, def: &OutlierDef, now: u64) -> Duration {
        let base = def.base_ejection.as_nanos().max(1) as u64;
        let last_until = self.ejected_until.load(Ordering::Relaxed);
        // Each base time back in without an ejection forgives one earlier ejection.
        let forgiven = (now.saturating_sub(last_until) / base).min(u64::from(u32::MAX)) as u32;
        let n = self.ejections.load(Ordering::Relaxed).saturating_sub(forgiven) + 1;
        self.ejections.store(n, Ordering::Relaxed);
        let time = def.base_ejection.saturating_mul(n).min(def.max_ejection);
        self.ejected_until.store(now + time.as_nanos() as u64, Ordering::Relaxed);
        self.five_xx.store(0, Ordering::Relaxed);
        self.gateway.store(0, Ordering::Relaxed);
        time
    }

    /// Clears the streaks without ejecting (the cluster may not eject more endpoints).
    pub fn forgive(&self) {
        self.five_xx.store(0, Ordering::Relaxed);
        self.gateway.store(0, Ordering::Relaxed);
    }
}

/// How many of `n` endpoints may be ejected at once: `percent` of them, and at least one.
pub fn max_ejected(n: usize, percent: u32) -> usize {
    (n * percent as usize / 100).max(1)
}

/// Whether ejections are to be ignored: fewer than `threshold` percent of the `n` endpoints
/// would be left.
pub fn panicking(n: usize, ejected: usize, threshold: f64) -> bool {
    n > 0 && ((n - ejected.min(n)) as f64 * 100.0 / n as f64) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn def() -> OutlierDef {
        OutlierDef {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejection_percent: 10,
            panic_threshold: 50.0,
        }
    }

    #[test]
    fn a_streak_of_failures_reaches_the_limit_and_a_success_resets_it() {
        let (d, o) = (def(), OutlierState::default());
        assert!(!o.record(&d, Observed::Status(503)));
        assert!(!o.record(&d, Observed::LocalFailure));
        assert!(!o.record(&d, Observed::Status(200)));
        assert!(!o.record(&d, Observed::Status(500)));
        assert!(!o.record(&d, Observed::Status(404)), "4xx is not a server error and ends the streak");
        assert!(!o.record(&d, Observed::Status(500)));
        assert!(!o.record(&d, Observed::Status(502)));
        assert!(o.record(&d, Observed::Status(504)));
    }

    #[test]
    fn gateway_errors_are_counted_apart() {
        let d = OutlierDef { consecutive_5xx: None, consecutive_gateway: Some(2), ..def() };
        let o = OutlierState::default();
        assert!(!o.record(&d, Observed::Status(503)));
        assert!(!o.record(&d, Observed::Status(500)), "500 is no gateway error");
        assert!(!o.record(&d, Observed::Status(502)));
        assert!(o.record(&d, Observed::LocalFailure));
    }

    #[test]
    fn ejections_in_a_row_last_longer_and_are_forgiven_with_time() {
        let (d, o) = (def(), OutlierState::default());
        let t0 = 100 * S;
        assert_eq!(o.eject(&d, t0), Duration::from_secs(10));
        assert!(o.ejected(t0 + 9 * S) && !o.ejected(t0 + 10 * S));
        // Ejected again soon after coming back: twice as long, then capped at the maximum.
        assert_eq!(o.eject(&d, t0 + 11 * S), Duration::from_secs(20));
        assert_eq!(o.eject(&d, t0 + 32 * S), Duration::from_secs(25));
        // 25 s back in (two base times) forgives two of the three.
        let back = t0 + 57 * S;
        assert_eq!(o.eject(&d, back + 25 * S), Duration::from_secs(20));
    }

    #[test]
    fn at_least_one_may_be_ejected_and_panic_ignores_ejections() {
        assert_eq!(max_ejected(3, 10), 1);
        assert_eq!(max_ejected(20, 10), 2);
        assert!(!panicking(3, 1, 50.0));
        assert!(panicking(3, 2, 50.0));
        assert!(panicking(1, 1, 50.0));
        assert!(!panicking(1, 1, 0.0));
    }
}
