//! The one clock every timed policy reads: tokio's, which is the system's monotonic clock in
//! the proxy and, in in-process tests, a paused clock the test moves by hand. Latency
//! estimates, failure penalties, outlier ejections, retry budgets, pool lifetimes and log
//! limits read [`now`]; rate limits read the same clock through governor
//! ([`crate::ratelimit::RuntimeClock`]); timers are tokio's.
use tokio::time::Instant;

/// Nanoseconds since the first call (never 0).
pub fn now() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}
