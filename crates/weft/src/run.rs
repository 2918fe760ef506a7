//! `weft run`: an app and its sidecar as one unit, in one process of the sidecar binary, which
//! `weft run` becomes (see crates/weft-proxy/src/main.rs for how it supervises the app).
use crate::cli::RunArgs;

/// Runs the sidecar for the app in place of this process; returns only if it cannot.
pub fn exec(a: RunArgs) -> anyhow::Error {
    let mut args = a.proxy;
    args.app_port = Some(a.port);
    crate::sidecar::exec(&args, &a.command)
}
