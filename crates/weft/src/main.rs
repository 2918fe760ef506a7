//! `weft`: the control plane, the CLI and the demo of the weft service mesh. The sidecar is a
//! binary of its own, `weft-proxy` (crates/weft-proxy/src/main.rs), which `weft proxy` and
//! `weft run` become.
#![deny(unsafe_code)]

mod api_client;
mod check;
mod cli;
mod dashboard;
mod mesh_file;
mod netns;
mod redirect;
mod run;
mod sidecar;
mod up;
mod viz;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // One TLS implementation for everything (xDS, API, mTLS): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let workers = cli.workers();
    weft_proxy::init_logging(cli.default_log_level());
    // One worker: a current-thread runtime, which skips the work-stealing machinery entirely.
    let mut rt = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command the command line names.
async fn dispatch(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        cli::Command::Control(a) => weft_control::run(a.config()?, weft_proxy::supervise::stop_signal()).await?,
        cli::Command::Proxy(a) => return Err(sidecar::exec(&a, &[])),
        cli::Command::Run(a) => return run::run(a).await,
        cli::Command::Up(a) => up::up(a).await?,
        cli::Command::Apply { file, control } => api_client::apply(&control, &file).await?,
        cli::Command::Get { kind, name, output, expiring_within, control } => {
            api_client::get(&control, &kind, name.as_deref(), &output, expiring_within).await?
        }
        cli::Command::Delete { kind, name, control } => api_client::delete(&control, &kind, &name).await?,
        cli::Command::Dashboard { listen, control } => dashboard::run(&control, listen).await?,
        cli::Command::Stat { kind, name, window, output, control } => {
            viz::stat(&control, &kind, name.as_deref(), window, &output).await?
        }
        cli::Command::Tap { service, filter, headers, count, output, control } => {
            viz::tap(&control, &service, &filter, headers, count, &output).await?
        }
        cli::Command::Top { service, filter, interval, output, control } => {
            viz::top(&control, &service, &filter, interval, &output).await?
        }
        cli::Command::Check { output, control } => {
            if !check::run(&control, &output).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        cli::Command::Token { action: cli::TokenAction::Create { service, ttl }, control } => {
            api_client::token_create(&control, &service, ttl).await?
        }
        cli::Command::Token { action: cli::TokenAction::Revoke { token }, control } => {
            api_client::token_revoke(&control, &token).await?
        }
        cli::Command::Peer { action: cli::PeerAction::Create { name, ttl }, control } => {
            api_client::peer_create(&control, &name, ttl).await?
        }
        cli::Command::Peer { action: cli::PeerAction::Accept { name, token }, control } => {
            let token = if token == "-" { std::io::read_to_string(std::io::stdin())? } else { token };
            api_client::peer_accept(&control, &name, token.trim()).await?
        }
        cli::Command::Peer { action: cli::PeerAction::Delete { name }, control } => {
            api_client::peer_delete(&control, &name).await?
        }
        cli::Command::Ca { action: cli::CaAction::Show { output }, control } => {
            api_client::ca_show(&control, &output).await?
        }
        cli::Command::Ca { action: cli::CaAction::Rotate { overlap }, control } => {
            api_client::ca_rotate(&control, overlap).await?
        }
        cli::Command::Store { action: cli::StoreAction::Backup { output, data_dir, control } } => {
            let backup = match data_dir {
                Some(dir) => weft_control::backup::Backup::of_embedded(&dir)?,
                None => {
                    serde_json::from_value(api_client::Api::new(&control)?.get_json("/api/v1/store/backup").await?)?
                }
            };
            backup.write(&output)?;
            println!("wrote {} (owner-only: it holds the mesh's CA key and credentials)", output.display());
        }
        cli::Command::Store { action: cli::StoreAction::Restore { input, data_dir, store } } => {
            let backup = weft_control::backup::Backup::read(&input)?;
            let target = store.resolve()?;
            let dir = match (&target, data_dir) {
                (weft_control::Backend::Embedded, None) => {
                    anyhow::bail!("restore into which store? give --data-dir DIR (embedded) or --store etcd://…")
                }
                (_, dir) => dir.unwrap_or_default(),
            };
            println!("{}", backup.restore(&target, &dir).await?);
        }
        cli::Command::DemoApp(a) => {
            let listen = a.listen.unwrap_or_else(|| {
                let port = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
                std::net::SocketAddr::from(([127, 0, 0, 1], port))
            });
            let instance = a.instance.unwrap_or_else(|| format!("{}-{}", a.service, std::process::id()));
            let cfg = weft_demo::DemoConfig {
                listen,
                service: a.service,
                version: a.app_version,
                instance,
                upstream: a.upstream,
                fail_percent: a.fail_percent,
            };
            weft_demo::run(cfg, weft_proxy::supervise::stop_signal()).await?;
        }
        cli::Command::Cleanup => {
            for netns in netns::cleanup()? {
                println!("removed {netns}");
            }
        }
        cli::Command::DemoClient(a) => weft_demo::call(a.target, &a.name, a.stream).await?,
    }
    Ok(ExitCode::SUCCESS)
}
