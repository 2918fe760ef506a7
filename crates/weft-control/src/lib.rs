//! The weft control plane: a service registry fed by the proxies' own xDS streams, a store of
//! user configuration, a certificate authority, and an xDS v3 server (ADS, state-of-the-world
//! and delta) that turns all of it into standard Envoy resources. One TLS port serves gRPC
//! (xDS) and the JSON admin API; its certificate chains to the mesh root.
#![forbid(unsafe_code)]

mod api;
pub mod args;
mod authn;
mod authz;
pub mod backup;
pub mod ca;
mod check;
mod files;
mod jwks;
mod peering;
mod peers;
mod report;
mod security;
mod state;
mod store;
mod tls;
mod token;
mod traffic;
mod translate;
mod xds;

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
pub use translate::Defaults;

pub use ca::CaConfig;
pub use state::Mesh;
pub use store::Backend;

/// What the fuzz targets and their seed generator (fuzz/) use besides the public API:
/// internals, exposed only with the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::token::{Claims, TokenKey, id_of};
    pub use crate::translate::Type;
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Where the mesh's state lives: the embedded store in `data_dir`, or etcd.
    pub store: store::Backend,
    /// Address for xDS (gRPC) and the admin API (HTTP/JSON), both over TLS.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// After a restart, how long instances found in the store keep their endpoints while
    /// their proxies reconnect.
    pub reconnect_grace: Duration,
    pub ca: CaConfig,
    /// What services that set none get: mutual TLS mode, egress.
    pub defaults: Defaults,
    /// Names (DNS or IP) the control plane's certificate is valid for, besides `localhost`,
    /// 127.0.0.1 and the listen address.
    pub server_names: Vec<String>,
    /// An extra plaintext xDS listener for proxyless gRPC clients; loopback only.
    pub plaintext_xds: Option<SocketAddr>,
}

/// Files a control plane leaves in its data directory for clients on the same machine.
pub fn root_file(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("ca").join("root.pem")
}

/// The repository's deploy/prometheus.yml, which the control plane fills in for itself.
const PROMETHEUS_CONFIG: &str = include_str!("../../../deploy/prometheus.yml");

/// Where the control plane writes a Prometheus configuration that scrapes its mesh.
pub fn prometheus_config_file(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("prometheus.yml")
}

/// Writes deploy/prometheus.yml with this control plane's address (loopback when it listens
/// on every address) and data directory.
fn write_prometheus_config(data_dir: &std::path::Path, mut listen: SocketAddr) -> anyhow::Result<()> {
    if listen.ip().is_unspecified() {
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let dir = std::path::absolute(data_dir).with_context(|| format!("cannot resolve {}", data_dir.display()))?;
    let text = PROMETHEUS_CONFIG
        .replace(weft_api::names::DEFAULT_CONTROL, &listen.to_string())
        .replace("/var/lib/weft/control", &dir.display().to_string());
    // Owner-only like everything in the data directory (it names the credential's file).
    files::write_private(&prometheus_config_file(data_dir), &text)
}

/// Runs the control plane until `shutdown` resolves, after recording its root and admin
/// credential in this machine's credentials file for the CLI.
pub async fn run(cfg: ControlConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let control = bind(cfg).await?;
    match weft_api::credentials::save(
        &control.cfg.listen.to_string(),
        weft_api::credentials::Entry {
            admin_token: control.admin_token().to_owned(),
            ca_file: control.trust_bundle_file().to_owned(),
        },
    ) {
        Ok(path) => tracing::info!(file = %path.display(), "CLI credentials written"),
        Err(e) => tracing::warn!(error = %e, "cannot write the CLI credentials file; pass WEFT_ADMIN_TOKEN to the CLI"),
    }
    control.serve(shutdown).await
}

/// A control plane with its ports bound, its store open and its CA ready, not yet serving.
pub struct Bound {
    cfg: ControlConfig,
    listener: tokio::net::TcpListener,
    plaintext: Option<tokio::net::TcpListener>,
    mesh: Arc<Mesh>,
    serving: Arc<tls::ServingCert>,
    bundle_path: PathBuf,
}

/// Binds the control plane's ports (port 0 picks a free one; [`Bound::local_addr`] tells which)
/// and opens its store and CA.
pub async fn bind(mut cfg: ControlConfig) -> anyhow::Result<Bound> {
    if let Some(addr) = cfg.plaintext_xds {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "--plaintext-xds {addr}: a plaintext xDS listener may only listen on loopback (127.0.0.0/8 or ::1)"
        );
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| {
        format!("cannot listen on {} (is another control plane running? pick another with --listen)", cfg.listen)
    })?;
    cfg.listen = listener.local_addr()?;
    let plaintext = match cfg.plaintext_xds {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for --plaintext-xds"))?,
        ),
        None => None,
    };
    let mesh = Arc::new(match &cfg.store {
        store::Backend::Embedded => Mesh::open(&cfg.data_dir, cfg.reconnect_grace, cfg.ca.clone(), cfg.defaults)?,
        store::Backend::Etcd(etcd, key) => {
            // Replicas of one mesh share its state, and its CA and credentials, in etcd.
            let opened = store::etcd::Etcd::open(etcd, key.clone(), cfg.reconnect_grace).await?;
            let store = Arc::new(store::Store::Etcd(Box::new(opened)));
            let store::Store::Etcd(shared) = &*store else { unreachable!("made above") };
            shared
                .share_secrets(&cfg.data_dir, || {
                    files::private_dir(&cfg.data_dir)?;
                    Mesh::with_store(store.clone(), &cfg.data_dir, cfg.reconnect_grace, cfg.ca.clone(), cfg.defaults)
                })
                .await?
        }
    });
    // The trust bundle, for clients verifying this control plane (the CLI, `weft run`).
    let bundle_path = cfg.data_dir.join("ca").join("trust-bundle.pem");
    files::write_private(&bundle_path, &mesh.security.ca.bundle())?;
    write_prometheus_config(&cfg.data_dir, cfg.listen)?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), cfg.listen.ip().to_string()];
    names.extend(cfg.server_names.iter().cloned());
    names.dedup();
    let serving = tls::ServingCert::new(&mesh.security.ca, names)?;
    // Its name among replicas: the address clients are given (a --server-name, else the
    // listen address, this host's name for an unspecified one).
    let host = match cfg.server_names.first() {
        Some(n) => n.clone(),
        None if cfg.listen.ip().is_unspecified() => {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
        }
        None => cfg.listen.ip().to_string(),
    };
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let _ = mesh.me.set((format!("{host}:{}", cfg.listen.port()), started));
    Ok(Bound { cfg, listener, plaintext, mesh, serving, bundle_path })
}

impl Bound {
    /// The address xDS and the API are served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.cfg.listen
    }

    /// The credential of the API's admin calls.
    pub fn admin_token(&self) -> &str {
        self.mesh.security.admin_token()
    }

    /// The mesh roots (PEM) clients verify this control plane with.
    pub fn trust_bundle_file(&self) -> &std::path::Path {
        &self.bundle_path
    }

    /// Serves xDS and the API until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Bound { cfg, listener, plaintext, mesh, serving, bundle_path } = self;
        let tls = tls::server_config(serving.clone())?;
        tokio::spawn(state::expire_stale(mesh.clone()));
        tokio::spawn(state::follow_store(mesh.clone()));
        tokio::spawn(mesh.clone().announce());
        tokio::spawn(tls::follow_rotations(mesh.clone(), serving, bundle_path));
        tokio::spawn(jwks::refresh(mesh.clone()));
        tokio::spawn(peering::run(mesh.clone()));
        // xDS streams never end on their own: after the stop signal they are ended (so their
        // connections close), in-flight API calls get a moment, then everything is closed.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let grpc = tonic::service::Routes::new(xds::server(mesh.clone(), stop_rx.clone()))
            .add_service(report::server(mesh.clone()))
            .prepare()
            .into_axum_router();
        // The gRPC router's fallback would answer any other path 200 with an empty gRPC body.
        let app = grpc.merge(api::router(mesh.clone())).fallback(api::unknown_path);
        tracing::info!(listen = %cfg.listen, data_dir = %cfg.data_dir.display(), root = %mesh.security.ca.root_fingerprint(), "control plane serving xDS and API over TLS");
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Some(plain) = plaintext {
            let grpc =
                tonic::service::Routes::new(xds::server(mesh.clone(), stop_rx.clone())).prepare().into_axum_router();
            tracing::warn!(listen = %plain.local_addr()?, "plaintext xDS listener for proxyless clients (no API, no registration without a token)");
            let plain = axum::serve(plain, grpc.into_make_service());
            tokio::spawn(plain.with_graceful_shutdown(stopped(stop_rx.clone())).into_future());
        }
        // The router as it is for every connection (axum's default turns its routes into
        // services again per connection: 9 KB kept for as long as a proxy stays connected).
        let serve = axum::serve(tls::TlsListener::new(listener, tls), app.into_make_service())
            .with_graceful_shutdown(stopped(stop_rx.clone()));
        tokio::select! {
            r = serve => r?,
            _ = async { stopped(stop_rx).await; tokio::time::sleep(std::time::Duration::from_millis(500)).await } => {}
        }
        tracing::info!("control plane stopped");
        Ok(())
    }
}
