//! A retry budget as Linkerd's: over a sliding window (`ttl`), retries may be at most `ratio`
//! times the requests sent, plus `min_per_second` for each second of the window, so a quiet
//! service can still retry while a failing one cannot multiply its load. Counted in ten slots
//! of a tenth of the window each; a slot is reset when the window moves past it.
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const SLOTS: u64 = 10;

#[derive(Default)]
struct Slot {
    /// The slot's number since the clock's start (`now / slot length`); stale slots are reset.
    epoch: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

#[derive(Default)]
pub struct RatioBudget {
    slots: [Slot; SLOTS as usize],
}

impl RatioBudget {
    fn slot(&self, now: u64, ttl: Duration) -> &Slot {
        let len = (ttl.as_nanos() as u64 / SLOTS).max(1);
        let epoch = now / len;
        let slot = &self.slots[(epoch % SLOTS) as usize];
        if slot.epoch.swap(epoch, Ordering::Relaxed) != epoch {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Counts a request sent (not a retry).
    pub fn deposit(&self, now: u64, ttl: Duration) {
        self.slot(now, ttl).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a retry from the budget, if the window has room for one.
    pub fn withdraw(&self, now: u64, ttl: Duration, ratio: f64, min_per_second: u32) -> bool {
        let len = (ttl.as_nanos() as u64 / SLOTS).max(1);
        let current = now / len;
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            if current.saturating_sub(s.epoch.load(Ordering::Relaxed)) < SLOTS {
                requests += u64::from(s.requests.load(Ordering::Relaxed));
                retries += u64::from(s.retries.load(Ordering::Relaxed));
            }
        }
        let allowed = requests as f64 * ratio + f64::from(min_per_second) * ttl.as_secs_f64();
        if (retries + 1) as f64 <= allowed {
            self.slot(now, ttl).retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn retries_stay_within_the_ratio_plus_the_minimum() {
        let (b, ttl) = (RatioBudget::default(), Duration::from_secs(10));
        let mut granted = 0;
        // 1,000 requests over 10 s, each failing and asking for a retry.
        for i in 0..1000u64 {
            let now = 100 * S + i * S / 100;
            b.deposit(now, ttl);
            if b.withdraw(now, ttl, 0.2, 1) {
                granted += 1;
            }
        }
        // 20% of 1,000, plus 1 per second over the 10 s window.
        assert!((200..=212).contains(&granted), "{granted} retries granted");
    }

    #[test]
    fn the_window_moves_on() {
        let (b, ttl) = (RatioBudget::default(), Duration::from_secs(1));
        let t0 = 50 * S;
        for _ in 0..10 {
            b.deposit(t0, ttl);
        }
        assert!(b.withdraw(t0, ttl, 0.1, 0));
        assert!(!b.withdraw(t0, ttl, 0.1, 0), "one retry for ten requests");
        // A window later the old requests no longer count, nor do the old retries.
        let t1 = t0 + 2 * S;
        assert!(!b.withdraw(t1, ttl, 0.1, 0), "no requests in the new window");
        b.deposit(t1, ttl);
        assert!(!b.withdraw(t1, ttl, 0.1, 0));
        assert!(b.withdraw(t1, ttl, 0.1, 1), "the per-second minimum still allows one");
    }
}
