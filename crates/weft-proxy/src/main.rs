//! `weft-proxy`: the sidecar, a binary of its own with the proxy and nothing else (no control
//! plane, CLI or demo), so each instance's process keeps only proxy code resident. `weft proxy`
//! and `weft run` run it in place of themselves; `weft up` starts its gateway with it.
//!
//! Given an app's command line (after `--`), it starts the app once it serves and is the app's
//! supervisor: the app and its sidecar are one unit. When the app exits the sidecar leaves the
//! mesh and exits with the app's code; a stop signal takes the sidecar out of the mesh and
//! drains it, then stops the app (whose own calls still go through the sidecar meanwhile),
//! then the sidecar.
#![deny(unsafe_code)]

use clap::Parser;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;
use weft_proxy::args::ProxyArgs;
use weft_proxy::notify::{self, Notifier};
use weft_proxy::supervise::{self, StopSignals};
use weft_proxy::{ProxyOptions, RunningProxy};

#[derive(Parser)]
#[command(name = "weft-proxy", version, about = "weft's sidecar proxy, one per service instance")]
struct Cli {
    #[command(flatten)]
    proxy: ProxyArgs,
    /// The app's command line: started once the sidecar serves, stopped with it (--app-port
    /// is the port it listens on, given to it as $PORT).
    #[arg(last = true)]
    app: Vec<String>,
}

/// Credentials the sidecar may be given in its environment (the join token, the admin
/// credential, the credentials file's location), its supervisor's socket and what `weft run
/// --transparent` hands it: the app never needs them, so it never sees them.
const NOT_FOR_THE_APP: &[&str] =
    &["WEFT_TOKEN", "WEFT_ADMIN_TOKEN", "WEFT_CONFIG", notify::SOCKET_VAR, weft_proxy::capture::HANDOFF_VAR];

/// How long an app has to exit after SIGTERM before it is killed.
const APP_STOP_GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS implementation for everything (xDS, control-plane API, mTLS): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    weft_proxy::init_logging("info");
    // One worker: a current-thread runtime, which skips the work-stealing machinery entirely.
    let mut rt = match cli.proxy.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let result = rt.enable_all().build().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(serve(cli)));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until SIGTERM or SIGINT (or until the app exits), then leaves the mesh. Returns the
/// exit code: the app's, or 0.
async fn serve(cli: Cli) -> anyhow::Result<i32> {
    if !cli.app.is_empty() && cli.proxy.app_port.is_none() {
        anyhow::bail!("--app-port is required with an app's command line: the port the app listens on");
    }
    let opts = cli.proxy.options()?;
    let app_env = app_env(&opts);
    // A transparent app's cgroup, whose connections are redirected at connect().
    let app_cgroup = weft_proxy::capture::take_handoff()?;
    let mut stop = StopSignals::new()?;
    let notifier = Notifier::from_env();
    let mut running = weft_proxy::start(opts).await?;
    notifier.iter().for_each(|n| n.ready(running.admin(), running.inbound()));
    if cli.app.is_empty() {
        stop.next().await;
        leave(&mut running, &mut stop, notifier.as_ref()).await;
        running.stop().await;
        return Ok(0);
    }
    // A transparent app's every connection and name goes through the sidecar: it starts once
    // the sidecar knows the mesh (an app that resolves `backend` first thing must find it).
    if running.captures() {
        tokio::select! {
            _ = running.configured() => {}
            _ = stop.next() => {
                running.stop().await;
                return Ok(0);
            }
        }
    }
    let mut app =
        match supervise::spawn(&cli.app, &app_env, NOT_FOR_THE_APP, false, app_cgroup.as_ref().map(|f| f.as_fd())) {
            Ok(app) => app,
            Err(e) => {
                running.stop().await;
                return Err(e);
            }
        };
    let code = tokio::select! {
        status = app.wait() => {
            let code = status.map(|s| supervise::exit_code(&s)).unwrap_or(1);
            tracing::info!(code, "app exited; its sidecar stops");
            code
        }
        _ = stop.next() => {
            leave(&mut running, &mut stop, notifier.as_ref()).await;
            supervise::stop(&mut app, APP_STOP_GRACE).await.unwrap_or(0)
        }
    };
    running.stop().await;
    Ok(code)
}

/// Leaves the mesh and serves what is in flight for at most the drain timeout (a second stop
/// signal cuts the drain short).
async fn leave(running: &mut RunningProxy, stop: &mut StopSignals, notifier: Option<&Notifier>) {
    notifier.iter().for_each(|n| n.stopping());
    tokio::select! {
        _ = running.drain() => {}
        _ = stop.next() => {}
    }
}

/// Environment an app is started with, naming its port, identity and upstream listeners.
fn app_env(opts: &ProxyOptions) -> Vec<(String, String)> {
    let mut env = vec![("WEFT_INSTANCE".to_owned(), opts.id.clone())];
    if let Some(app) = opts.app {
        env.push(("PORT".to_owned(), app.port().to_string()));
    }
    if let Some(s) = &opts.service {
        env.push(("WEFT_SERVICE".to_owned(), s.clone()));
    }
    if let Some(v) = opts.labels.get("version") {
        env.push(("WEFT_VERSION".to_owned(), v.clone()));
    }
    if let Some((_, addr)) = opts.upstreams.first() {
        env.push(("WEFT_UPSTREAM".to_owned(), addr.to_string()));
    }
    for (svc, addr) in &opts.upstreams {
        let var = format!("WEFT_UPSTREAM_{}", svc.to_ascii_uppercase().replace('-', "_"));
        env.push((var, addr.to_string()));
    }
    env
}
