//! The weft control plane: a service registry fed by the proxies' own xDS streams, a store of
//! user configuration, and an xDS v3 server (ADS, state-of-the-world and delta) that turns both
//! into standard Envoy resources. One port serves gRPC (xDS) and the JSON admin API.
#![forbid(unsafe_code)]

mod api;
mod state;
mod store;
mod translate;
mod xds;

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use state::Mesh;

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Address for xDS (gRPC) and the admin API (HTTP/JSON).
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// After a restart, how long instances found in the store keep their endpoints while
    /// their proxies reconnect.
    pub reconnect_grace: Duration,
}

/// Runs the control plane until `shutdown` resolves.
pub async fn run(cfg: ControlConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| {
        format!("cannot listen on {} (is another control plane running? pick another with --listen)", cfg.listen)
    })?;
    let mesh = Arc::new(Mesh::open(&cfg.data_dir, cfg.reconnect_grace)?);
    tokio::spawn(state::expire_stale(mesh.clone()));
    let grpc = tonic::service::Routes::new(xds::server(mesh.clone())).prepare().into_axum_router();
    let app = grpc.merge(api::router(mesh.clone()));
    tracing::info!(listen = %cfg.listen, data_dir = %cfg.data_dir.display(), "control plane serving xDS and API");
    // xDS streams never end on their own: after the stop signal, give in-flight API calls a
    // moment, then close everything.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let serve = axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx.clone()));
    tokio::select! {
        r = serve => r?,
        _ = async { stopped(stop_rx).await; tokio::time::sleep(std::time::Duration::from_millis(500)).await } => {}
    }
    tracing::info!("control plane stopped");
    Ok(())
}
