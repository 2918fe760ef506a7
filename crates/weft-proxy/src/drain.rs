//! Draining: how a proxy leaves the mesh without cutting a request. After it deregisters, it
//! keeps accepting and serving for the drain period (callers learn of its leaving a moment
//! later), tells HTTP/1.1 clients to close their connections (`Connection: close` on every
//! response) and closes idle keep-alive connections, and ends the period early once no
//! request or TCP connection is in flight. Only then is the app stopped and the proxy exits.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// How long callers are given to learn that the proxy left before an idle proxy stops: the
/// control plane pushes the change to every caller at once, in milliseconds.
const PROPAGATION: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct Drain {
    draining: AtomicBool,
    /// Requests and opaque TCP connections being served.
    in_flight: AtomicUsize,
    /// Woken when draining starts and when the last work in flight ends while draining.
    changed: Notify,
}

/// A TCP connection in flight, counted until dropped. (A request's
/// [`crate::record::RequestRecord`] counts it likewise.)
pub struct Work<'a>(&'a Drain);

impl Drop for Work<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl Drain {
    pub fn work(&self) -> Work<'_> {
        self.begin();
        Work(self)
    }

    /// Counts work in flight until [`Drain::end`].
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.is_draining() {
            self.changed.notify_waiters();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        loop {
            let notified = std::pin::pin!(self.changed.notified());
            let mut notified = notified;
            notified.as_mut().enable();
            if self.is_draining() {
                return;
            }
            notified.await;
        }
    }

    /// Starts draining and returns once nothing is in flight (after callers had
    /// [`PROPAGATION`] to stop sending), or after `period` at the latest.
    pub async fn run(&self, period: Duration) {
        let deadline = tokio::time::Instant::now() + period;
        self.draining.store(true, Ordering::Relaxed);
        self.changed.notify_waiters();
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + PROPAGATION)).await;
        loop {
            let notified = std::pin::pin!(self.changed.notified());
            let mut notified = notified;
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let left = self.in_flight.load(Ordering::Acquire);
                return tracing::warn!(in_flight = left, ?period, "drain period over; closing what is still in flight");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_for_work_in_flight_and_no_longer_than_its_period() {
        let drain = std::sync::Arc::new(Drain::default());
        // Idle: over once callers had time to learn of the leaving.
        let started = tokio::time::Instant::now();
        drain.run(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), PROPAGATION);

        // A request that ends after 2 s: the drain ends with it.
        let drain = std::sync::Arc::new(Drain::default());
        let d = drain.clone();
        tokio::spawn(async move {
            let _work = d.work();
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        drain.run(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        // One that never ends: the period bounds the drain.
        let stuck = drain.work();
        let started = tokio::time::Instant::now();
        drain.run(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        drop(stuck);
        // Waiters for the start are woken by it.
        drain.started().await;
    }
}
