//! TLS for the control plane's own port. Handshakes run in tasks of their own, so a slow or
//! silent client never holds up the accept loop.
use crate::ca::Ca;
use crate::state::Mesh;
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The control plane's own certificate: re-issued when the CA signs with another root (a
/// rotation), so that clients, which trust the live trust bundle, can still verify it after the
/// old root leaves the bundle.
pub struct ServingCert {
    names: Vec<String>,
    /// The fingerprint of the root that issued the certificate, and the certificate.
    current: ArcSwap<(String, Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert").field("names", &self.names).field("root", &self.current.load().0).finish()
    }
}

impl ServingCert {
    /// A fresh certificate from the mesh CA for `names`.
    pub fn new(ca: &Ca, names: Vec<String>) -> anyhow::Result<Arc<ServingCert>> {
        let current = ArcSwap::from_pointee(issue(ca, &names)?);
        Ok(Arc::new(ServingCert { names, current }))
    }

    /// Re-issues the certificate if the CA's signing root is not the one that issued it.
    pub fn follow(&self, ca: &Ca) {
        if self.current.load().0 == ca.root_fingerprint() {
            return;
        }
        match issue(ca, &self.names) {
            Ok(c) => {
                tracing::info!(root = %c.0, "control plane certificate re-issued from the new signing root");
                self.current.store(Arc::new(c));
            }
            Err(e) => tracing::error!(error = %e, "cannot re-issue the control plane's certificate"),
        }
    }
}

fn issue(ca: &Ca, names: &[String]) -> anyhow::Result<(String, Arc<CertifiedKey>)> {
    let root = ca.root_fingerprint();
    let (chain, key) = ca.server_certificate(names)?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok((root, Arc::new(CertifiedKey::new(certs, signing))))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().1.clone())
    }
}

/// A server configuration presenting `cert`.
pub fn server_config(cert: Arc<ServingCert>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Keeps what clients verify the control plane with in step with the CA: on every change of
/// the trust bundle, rewrites `bundle_file` (read by the CLI and by proxies at start) and
/// re-issues the control plane's certificate if the signing root changed.
pub async fn follow_rotations(mesh: Arc<Mesh>, cert: Arc<ServingCert>, bundle_file: PathBuf) {
    let mut snapshots = mesh.subscribe();
    let mut bundle = mesh.security.ca.bundle();
    while snapshots.changed().await.is_ok() {
        let now = mesh.security.ca.bundle();
        if now == bundle {
            continue;
        }
        if let Err(e) = crate::files::write_private(&bundle_file, &now) {
            tracing::warn!(error = %e, "cannot rewrite the trust bundle file");
        }
        bundle = now;
        cert.follow(&mesh.security.ca);
    }
}

/// Accepts TCP connections and hands over those whose TLS handshake completed.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, cfg: Arc<rustls::ServerConfig>) -> TlsListener {
        let local = listener.local_addr().expect("a bound listener has an address");
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(cfg);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "control plane accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, handed) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    dead_peer_detection(&tcp);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => drop(handed.send((tls, peer)).await),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake with a control plane client failed (a plaintext client, or one that does not trust the mesh root?)")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { local, ready }
    }
}

/// A client whose host drops off the network sends nothing more, and TCP would notice only
/// after about 15 minutes of retransmissions: its proxy's xDS stream would stay open and its
/// instance registered. Keepalive probes after 10 s of silence (3, 5 s apart) and a 20 s
/// limit on unacknowledged data end such a connection within about 25 s, and with it the
/// stream and the registration.
fn dead_peer_detection(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(10))
        .with_interval(std::time::Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = sock
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| sock.set_tcp_user_timeout(Some(std::time::Duration::from_secs(20))))
    {
        tracing::debug!(error = %e, "cannot set TCP keepalive on a control plane connection");
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
