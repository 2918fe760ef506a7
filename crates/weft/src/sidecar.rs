//! The sidecar is a binary of its own, `weft-proxy`, beside `weft`: `weft proxy` and `weft run`
//! run it in place of themselves (so an instance is one lean process), and `weft up` starts its
//! gateway with it, learning where it serves by systemd's notify protocol
//! ([`weft_proxy::notify`]).
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::process::Child;
use weft_proxy::args::ProxyArgs;
use weft_proxy::{notify, supervise};

pub const BINARY: &str = "weft-proxy";

/// How long a sidecar may take to bind its listeners and get its first certificate.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a sidecar may take to exit once its drain has ended.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// The sidecar binary: `weft-proxy` in the directory `weft` runs from.
pub fn binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the weft binary")?;
    let sidecar = exe.with_file_name(BINARY);
    anyhow::ensure!(
        sidecar.is_file(),
        "the sidecar binary {} is missing: it is built and installed with weft \
         (`cargo build --release --bin weft --bin weft-proxy`)",
        sidecar.display()
    );
    Ok(sidecar)
}

/// The sidecar's command: `cmd` (which runs the sidecar binary, directly or inside a
/// namespace) with `args` (the join token in its environment, not on its command line, where
/// `ps` would show it), then the app's command line if there is one.
pub fn command(mut cmd: std::process::Command, args: &ProxyArgs, app: &[String]) -> std::process::Command {
    cmd.args(args.to_args());
    if let Some(token) = &args.token {
        cmd.env("WEFT_TOKEN", token);
    }
    if !app.is_empty() {
        cmd.arg("--").args(app);
    }
    cmd
}

/// Runs the sidecar with `args` (and the app, if any) in place of this process; returns only
/// if it cannot.
pub fn exec(args: &ProxyArgs, app: &[String]) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    match binary() {
        Ok(sidecar) => {
            let e = command(std::process::Command::new(&sidecar), args, app).exec();
            anyhow::anyhow!("cannot run {}: {e}", sidecar.display())
        }
        Err(e) => e,
    }
}

/// A sidecar running as a child process (`weft up`'s gateway).
pub struct Sidecar {
    child: Child,
    pub admin: SocketAddr,
    drain_timeout: Duration,
}

impl Sidecar {
    /// Starts the sidecar with `args` (plus `env`) and waits until it serves: its listeners
    /// are bound and it holds a certificate.
    pub async fn start(args: &ProxyArgs, env: &[(String, String)]) -> anyhow::Result<Sidecar> {
        let notices = notify::Listener::bind().context("cannot open the socket the sidecar reports on")?;
        let sidecar = binary()?;
        let mut cmd = tokio::process::Command::from(command(std::process::Command::new(&sidecar), args, &[]));
        cmd.envs(env.iter().map(|(k, v)| (k, v))).env(notify::SOCKET_VAR, notices.address());
        let mut child =
            supervise::spawn_command(cmd).with_context(|| format!("cannot start the sidecar {}", sidecar.display()))?;
        let started = tokio::time::timeout(START_TIMEOUT, async {
            tokio::select! {
                ready = notices.ready() => ready.map_err(anyhow::Error::from),
                status = child.wait() => Err(match status {
                    Ok(status) => anyhow::anyhow!("the sidecar could not start ({status}); its reason is above"),
                    Err(e) => anyhow::anyhow!("the sidecar could not start: {e}"),
                }),
            }
        })
        .await;
        match started {
            Ok(Ok(ready)) => Ok(Sidecar { child, admin: ready.admin, drain_timeout: args.drain_timeout }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let _ = child.kill().await;
                anyhow::bail!("the sidecar did not start within {START_TIMEOUT:?}");
            }
        }
    }

    /// Stops the sidecar: it leaves the mesh and drains, then exits (or is killed).
    pub async fn stop(mut self) {
        supervise::stop(&mut self.child, self.drain_timeout + EXIT_GRACE).await;
    }
}
