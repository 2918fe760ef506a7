//! The weft sidecar proxy.
//!
//! The request path, top-down, one module per step:
//! [`listener`] (accept; a [`context::ConnCtx`] per connection) → [`detect`] (HTTP/1, HTTP/2,
//! TLS or opaque TCP) → [`stack`]: the [`inbound`] or [`outbound`] stack, by the listener's
//! direction, over the shared [`http`] code, or [`tcp`] → [`route`] (a [`route::MatchedRoute`]:
//! rule, backend, policy) → [`attempt`] (every re-send) + [`cluster`] (balancing, endpoint pick,
//! pooled connections over a [`transport`]). Each request's [`record`] feeds [`metrics`] and
//! [`access_log`] once.
//! Configuration arrives over xDS ([`xds`], decoded and checked by [`config`]) and is applied
//! by [`Proxy`]; [`health`] probes the local app and [`admin`] serves /live, /ready, /metrics
//! and /config_dump.
#![deny(unsafe_code)] // allowed in: idle::trim (an FFI call), supervise::spawn_in (pre_exec), capture::bpf::call (a system call)

mod access_log;
mod admin;
pub mod app_protocol;
pub mod args;
mod attempt;
pub mod authz;
pub mod capture;
mod clock;
pub mod cluster;
pub mod config;
pub mod context;
pub mod crypto;
mod detect;
pub mod dns;
mod drain;
mod error;
mod health;
pub mod http;
pub mod identity;
mod idle;
pub mod inbound;
pub mod jwt;
mod listener;
mod log_limit;
pub mod metrics;
pub mod notify;
mod outbound;
pub mod path;
mod proxy;
pub mod ratelimit;
pub mod record;
mod report;
pub mod route;
mod shared;
pub mod stack;
pub mod supervise;
mod tcp;
mod telemetry;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
mod trace;
pub mod transport;
mod xds;

pub use error::ERROR_HEADER;

/// What the fuzz targets (fuzz/) drive besides the public API: internals, exposed only with
/// the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::detect::Protocol;

    /// Protocol detection on a connection's first bytes: `None` while it needs more.
    pub fn detect(buf: &[u8]) -> Option<Protocol> {
        crate::detect::known(buf)
    }
}
pub use context::Limits;
pub use health::HealthCheck;
pub use proxy::{DEFAULT_DRAIN_TIMEOUT, ProxyOptions, RunningProxy, start};

/// Logs to stderr at `WEFT_LOG`'s levels (else `default_level`), as every weft binary does;
/// in colour only on a terminal, so a log file or journald gets plain text.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}
