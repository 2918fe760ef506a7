//! What a listener records of its requests beyond metrics, switched by the control plane:
//! access logs ([`crate::access_log`]) and traces ([`crate::trace`]) by `Telemetry`, and the
//! proxy's taps ([`crate::report`]) by `weft tap`. All are swapped in place, so open
//! connections follow a change at once; a listener with none reads one flag per request for
//! each and notes nothing.
use crate::access_log::AccessLog;
use crate::report::Taps;
use crate::trace::Tracer;
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A listener's access logs and tracer, as its connections see them, and the proxy's taps.
pub struct ListenerTelemetry {
    pub access_log: Live<AccessLog>,
    pub tracer: Live<Tracer>,
    pub taps: Arc<Taps>,
}

/// A listener alone: taps of its own (tests build stacks so).
impl Default for ListenerTelemetry {
    fn default() -> Self {
        ListenerTelemetry::new(Arc::default())
    }
}

impl ListenerTelemetry {
    pub fn new(taps: Arc<Taps>) -> ListenerTelemetry {
        ListenerTelemetry { access_log: Live::default(), tracer: Live::default(), taps }
    }
}

/// One thing a listener may record, swapped in place.
pub struct Live<T> {
    on: AtomicBool,
    value: ArcSwapOption<T>,
}

impl<T> Default for Live<T> {
    fn default() -> Self {
        Live { on: AtomicBool::new(false), value: ArcSwapOption::empty() }
    }
}

impl<T> Live<T> {
    /// What is in force, if anything (one flag read when nothing is).
    pub fn get(&self) -> Option<Arc<T>> {
        if !self.on.load(Ordering::Acquire) {
            return None;
        }
        self.value.load_full()
    }

    pub fn set(&self, value: Option<Arc<T>>) {
        match value {
            Some(v) => {
                self.value.store(Some(v));
                self.on.store(true, Ordering::Release);
            }
            None => {
                self.on.store(false, Ordering::Release);
                self.value.store(None);
            }
        }
    }
}
