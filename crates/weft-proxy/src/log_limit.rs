//! Log lines about what the proxy refuses or fails, at most one per kind per [`INTERVAL`]: a
//! flood of refused requests (or connections) must not become a flood of log lines, which
//! would add work exactly when the proxy is busiest. Every occurrence is counted in the
//! metrics; a line says how many like it were left out since the last one.
use std::sync::Mutex;
use std::time::Duration;

pub const INTERVAL: Duration = Duration::from_secs(10);

/// When each kind of line may be written next, and how many were left out since the last.
#[derive(Default)]
pub struct LogLimiter {
    kinds: Mutex<Vec<Kind>>,
}

struct Kind {
    key: &'static str,
    next: u64,
    suppressed: u64,
}

impl LogLimiter {
    /// Whether a line of kind `key` may be written at `now` (nanoseconds of a monotonic
    /// clock): `Some(lines left out since the last one)`, or `None` (then it is counted as
    /// left out).
    pub fn allow_at(&self, key: &'static str, now: u64) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let kind = match kinds.iter().position(|k| k.key == key) {
            Some(i) => &mut kinds[i],
            None => {
                kinds.push(Kind { key, next: 0, suppressed: 0 });
                kinds.last_mut().expect("just pushed")
            }
        };
        if now < kind.next {
            kind.suppressed += 1;
            return None;
        }
        kind.next = now + INTERVAL.as_nanos() as u64;
        Some(std::mem::take(&mut kind.suppressed))
    }
}

/// The proxy's limiter, on the proxy's clock: `Some(left out since the last line)` if a line of
/// kind `key` may be written now.
pub fn allow(key: &'static str) -> Option<u64> {
    static LIMITER: std::sync::OnceLock<LogLimiter> = std::sync::OnceLock::new();
    LIMITER.get_or_init(LogLimiter::default).allow_at(key, crate::clock::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_saying_how_many_were_left_out() {
        let l = LogLimiter::default();
        let s = 1_000_000_000u64;
        assert_eq!(l.allow_at("denied", s), Some(0));
        // A flood of the same kind: left out, and counted.
        for i in 1..1000 {
            assert_eq!(l.allow_at("denied", s + i * 1000), None);
        }
        // Another kind has its own window.
        assert_eq!(l.allow_at("connect-failed", s + 1), Some(0));
        // The next interval: one line, which tells of the 999 left out.
        assert_eq!(l.allow_at("denied", s + 10 * s), Some(999));
        assert_eq!(l.allow_at("denied", s + 10 * s + 1), None);
    }
}
