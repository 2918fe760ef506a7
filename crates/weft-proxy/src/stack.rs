//! The two request stacks, assembled here and nowhere else. Which one serves a listener
//! follows its `traffic_direction`.
//!
//! ```text
//! inbound   (other services → the local app)
//!   listener → detect → mTLS termination, peer identity (listener) → inbound::Inbound::call:
//!       path normalisation (path) → JWT authentication (jwt) → authorization (authz)
//!       → rate limit (ratelimit) → route → forward to the app (http::forward)
//!
//! outbound  (the local app → other services)
//!   listener → detect → outbound::Outbound::call:
//!       path normalisation (path) → route → request edits → faults → timeout (a deadline)
//!       → attempt engine (attempt::run: every re-send) → per attempt: one timer (per-try
//!       timeout or the deadline) → concurrency limit → balance (cluster::balance)
//!       → connect + mTLS origination (cluster::endpoint) → send → mirrors → response edits
//! ```
//! An inbound policy step is a call in [`crate::inbound::Inbound::call`] (as authorization
//! is), an outbound one in [`crate::outbound::Outbound::call`] (as faults are); whatever
//! decides whether to send again belongs to [`crate::attempt`]. Opaque TCP is authorized in
//! [`crate::listener`] (it carries no JWT) and connected through the same attempt engine
//! ([`crate::tcp`]). Each request's decisions and attempts go into its
//! [`crate::record::RequestRecord`], which [`crate::http::serve`] hands to metrics, the access
//! logs and the tracer once the response has ended (the tracer reads and rewrites the trace
//! context at arrival). Both stacks share the HTTP server and forwarding code
//! ([`crate::http`]), the pools ([`crate::cluster::endpoint`]), error rendering and metrics.
use crate::config::{Direction, EscapedSlashes};
use crate::http::body::Reply;
use crate::inbound::{Inbound, LivePolicy};
use crate::metrics::TrafficMetrics;
use crate::outbound::Outbound;
use crate::record::RequestRecord;
use crate::route::RouteTable;
use crate::telemetry::ListenerTelemetry;
use arc_swap::ArcSwap;
use futures::future::Either;
use http::Request;
use hyper::body::Incoming;
use std::sync::Arc;

/// What an HTTP listener runs each request through.
pub struct HttpStack {
    pub metrics: Arc<TrafficMetrics>,
    /// The listener's access logs and tracer (live: shared with the listener's later stacks).
    pub telemetry: Arc<ListenerTelemetry>,
    stack: Stack,
}

enum Stack {
    Inbound(Inbound),
    Outbound(Outbound),
}

impl HttpStack {
    pub fn new(
        direction: Direction,
        routes: Arc<ArcSwap<RouteTable>>,
        slashes: EscapedSlashes,
        policy: LivePolicy,
        metrics: Arc<TrafficMetrics>,
        telemetry: Arc<ListenerTelemetry>,
    ) -> HttpStack {
        let stack = match direction {
            Direction::inbound => Stack::Inbound(Inbound::new(routes, slashes, policy, metrics.clone())),
            Direction::outbound => Stack::Outbound(Outbound::new(routes, slashes)),
        };
        HttpStack { metrics, telemetry, stack }
    }

    /// Runs a request through the stack. Routing and every other decision happen before the
    /// future is returned; the future does the I/O.
    pub fn call<'a>(
        &self,
        req: Request<Incoming>,
        rec: &'a mut RequestRecord,
    ) -> impl Future<Output = Reply> + Send + 'a {
        match &self.stack {
            Stack::Inbound(s) => Either::Left(s.call(req, rec)),
            Stack::Outbound(s) => Either::Right(s.call(req, rec)),
        }
    }
}
