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
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another control plane running? pick another with --listen)", cfg.listen))?;
    let mesh = Arc::new(Mesh::open(&cfg.data_dir, cfg.reconnect_grace)?);
    tokio::spawn(state::expire_stale(mesh.clone()));
    let grpc = tonic::service::Routes::new(xds::server(mesh.clone())).prepare().into_axum_router();
    let app = grpc.merge(api::router(mesh.clone()));
    tracing::info!(listen = %cfg.listen, data_dir = %cfg.data_dir.display(), "control plane serving xDS and API");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
