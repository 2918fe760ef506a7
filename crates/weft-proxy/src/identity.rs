//! The proxy's workload identity: its own key and certificate, and the mesh's trust bundle.
//!
//! The key is made here (ECDSA P-256) and never leaves the process: the proxy sends a CSR with
//! its join token and gets back a short-lived certificate whose URI SAN is its SPIFFE ID. It
//! renews at half the lifetime with a fresh key, and at once when the trust bundle's signing
//! root changes (`weft ca rotate`). If the CA cannot be reached it keeps the certificate it
//! has, retries with backoff, and says so in the log, in metrics and in `/ready`.
//!
//! Invariant: TLS configurations are built once and read the current certificate and bundle
//! at each handshake, so renewals and rotations apply to new connections without a restart and
//! without touching open ones.
use crate::config::BundleDef;
use crate::crypto::provider;
use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weft_api::identity::{CertificateRequest, CertificateResponse};
use weft_client::ControlApi;

/// Renewal retries back off up to this.
const MAX_RETRY: Duration = Duration::from_secs(15);

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The proxy's certificate as `/ready`, `/config_dump` and metrics show it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CertStatus {
    pub identity: Option<String>,
    pub serial: Option<String>,
    /// Unix seconds.
    pub not_after: Option<u64>,
    /// The last renewal error, until a renewal succeeds.
    pub renewal_error: Option<String>,
    pub renewals: u64,
}

/// The certificate and trust bundle in force, read by every handshake.
pub struct Credentials {
    cert: ArcSwapOption<CertifiedKey>,
    /// The root that signed `cert` (DER).
    cert_root: ArcSwapOption<Vec<u8>>,
    roots: ArcSwap<RootCertStore>,
    /// In a peered mesh: its own trust domain, and each peer trust domain's roots.
    peers: ArcSwap<PeerTrust>,
    /// The first root of the bundle: the one the CA signs with now.
    signing_root: ArcSwapOption<Vec<u8>>,
    client_verifier: ArcSwapOption<Arc<dyn ClientCertVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
    pub status: Mutex<CertStatus>,
    /// Woken when the certificate should be renewed now (the signing root changed).
    renew_now: tokio::sync::Notify,
}

impl Credentials {
    pub fn new() -> Arc<Credentials> {
        Arc::new(Credentials {
            cert: ArcSwapOption::empty(),
            cert_root: ArcSwapOption::empty(),
            roots: ArcSwap::from_pointee(RootCertStore::empty()),
            peers: ArcSwap::from_pointee(PeerTrust::default()),
            signing_root: ArcSwapOption::empty(),
            client_verifier: ArcSwapOption::empty(),
            algorithms: provider().signature_verification_algorithms,
            status: Mutex::default(),
            renew_now: tokio::sync::Notify::new(),
        })
    }

    pub fn status(&self) -> CertStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether both a certificate and a trust bundle are in place.
    pub fn ready(&self) -> bool {
        self.cert.load().is_some() && self.signing_root.load().is_some()
    }

    /// Installs a trust bundle: this mesh's roots (PEM, signing root first) and each peer trust
    /// domain's. Fails without changing anything if any of it holds no usable certificate.
    pub fn set_bundle(&self, bundle: &BundleDef) -> Result<usize, String> {
        let (roots, verifier) = trust_from(&bundle.own).map_err(|e| format!("the trust bundle {e}"))?;
        let mut peers = PeerTrust { own_domain: bundle.trust_domain.clone(), domains: Vec::new() };
        for (domain, pem) in &bundle.peers {
            let (roots, verifier) = trust_from(pem).map_err(|e| format!("the roots of trust domain {domain:?} {e}"))?;
            peers.domains.push((domain.clone(), roots, verifier));
        }
        let first = CertificateDer::pem_slice_iter(&bundle.own)
            .next()
            .and_then(Result::ok)
            .map(|c| c.to_vec())
            .ok_or("the trust bundle holds no certificate")?;
        let added = roots.roots.len();
        self.client_verifier.store(Some(Arc::new(verifier)));
        self.roots.store(roots);
        self.peers.store(Arc::new(peers));
        self.signing_root.store(Some(Arc::new(first.clone())));
        // A new signing root (a rotation): get a certificate from it now.
        if self.cert_root.load().as_deref().is_some_and(|r| **r != first) {
            self.renew_now.notify_one();
        }
        Ok(added)
    }

    /// The roots (and client verifier) a certificate naming `id` must chain to: a peer trust
    /// domain's for its identities; this mesh's for the others, and in a peered mesh only for
    /// its own trust domain's, so no CA vouches for another domain's identities.
    fn trust_for(&self, id: Option<&str>) -> Result<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>), rustls::Error> {
        let domain = id.and_then(weft_api::identity::spiffe_parts).map(|(td, _, _)| td);
        let peers = self.peers.load();
        if let Some(d) = domain
            && let Some((_, roots, verifier)) = peers.domains.iter().find(|(name, _, _)| name == d)
        {
            return Ok((roots.clone(), verifier.clone()));
        }
        if let Some(own) = &peers.own_domain
            && domain != Some(own.as_str())
        {
            return Err(rustls::Error::General(format!(
                "the certificate's identity {} is of no trust domain this mesh trusts (its own is {own})",
                id.unwrap_or("(none)")
            )));
        }
        let verifier =
            self.client_verifier.load_full().ok_or_else(|| rustls::Error::General("no trust bundle yet".into()))?;
        Ok((self.roots.load_full(), (*verifier).clone()))
    }

    fn install(&self, resp: &CertificateResponse, key: PrivateKeyDer<'static>) -> Result<(), String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(resp.chain.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the CA sent an invalid chain: {e}"))?;
        let root = CertificateDer::pem_slice_iter(resp.root.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or("the CA sent no root")?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
        self.cert.store(Some(Arc::new(CertifiedKey::new(chain, signing))));
        self.cert_root.store(Some(Arc::new(root.to_vec())));
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.identity = Some(resp.identity.clone());
        st.serial = Some(resp.serial.clone());
        st.not_after = Some(resp.not_after);
        st.renewal_error = None;
        st.renewals += 1;
        Ok(())
    }

    /// Server side of mutual TLS: presents the current certificate, requires a client
    /// certificate that chains to the bundle. ALPN: what the client's sidecar carries inside.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(MeshClientVerifier(self.clone())))
            .with_cert_resolver(Arc::new(OwnCert(self.clone())));
        cfg.alpn_protocols = [b"h2".as_slice(), b"http/1.1", weft_api::identity::ALPN_TCP.as_bytes(), ALPN_MESH]
            .iter()
            .map(|p| p.to_vec())
            .collect();
        Arc::new(cfg)
    }

    /// Client side of mutual TLS towards a sidecar that must prove one of `expected` (SPIFFE IDs).
    pub fn client_config(self: &Arc<Self>, expected: &[String], alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
                creds: self.clone(),
                expected: expected.iter().map(|e| e.as_str().into()).collect(),
            }))
            .with_client_cert_resolver(Arc::new(OwnCert(self.clone())));
        cfg.alpn_protocols = vec![alpn.to_vec(), ALPN_MESH.to_vec()];
        Arc::new(cfg)
    }

    /// Client side of TLS to the control plane (certificates, xDS, health reports): the control
    /// plane's certificate must name `host` and chain to the trust bundle in force, so a root
    /// rotation reaches these clients as it reaches sidecar-to-sidecar TLS. Until the first bundle
    /// arrives (the first certificate is requested before xDS connects), `bootstrap` (the roots
    /// given by `--ca-file`) is trusted instead; from then on, only the bundle.
    pub fn control_plane_config(self: &Arc<Self>, bootstrap: RootCertStore, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ControlPlaneVerifier {
                creds: self.clone(),
                bootstrap: Arc::new(bootstrap),
            }))
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg
    }
}

/// What a peered mesh trusts besides its own roots.
#[derive(Default)]
struct PeerTrust {
    /// This mesh's trust domain: its roots vouch for its identities only.
    own_domain: Option<String>,
    /// Each peer trust domain's roots, and a client verifier of them.
    domains: Vec<(String, Arc<RootCertStore>, Arc<dyn ClientCertVerifier>)>,
}

/// Roots from PEM, and a client verifier of them.
fn trust_from(pem: &[u8]) -> Result<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>), String> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| format!("is not valid PEM: {e}"))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs.iter().cloned());
    if added == 0 || added != certs.len() {
        return Err(format!("holds {} certificates, {added} of them usable roots", certs.len()));
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| format!("cannot verify clients: {e}"))?;
    Ok((roots, verifier))
}

/// ALPN every weft sidecar adds to what it offers, so a permissive inbound listener can tell
/// mesh mTLS from an app's own TLS (which it passes through untouched).
pub const ALPN_MESH: &[u8] = b"weft";

/// The SPIFFE ID (URI SAN) of a DER certificate.
pub fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_owned()),
        _ => None,
    })
}

#[derive(Debug)]
struct OwnCert(Arc<Credentials>);

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.cert.load_full()
    }
}

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.cert.load_full()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("status", &self.status()).finish()
    }
}

/// Verifies a client certificate against the bundle in force at the handshake (in a peered
/// mesh, against the roots of the trust domain its identity names).
#[derive(Debug)]
struct MeshClientVerifier(Arc<Credentials>);

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = spiffe_id(end_entity);
        let (_, verifier) = self.0.trust_for(id.as_deref())?;
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

/// Verifies a server certificate: its URI SAN is one of `expected`, and it chains to the
/// roots of that identity's trust domain. (A SPIFFE certificate has no DNS name, so the usual
/// hostname check does not apply.)
#[derive(Debug)]
struct SpiffeVerifier {
    creds: Arc<Credentials>,
    expected: Box<[Box<str>]>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = spiffe_id(end_entity);
        if !id.as_deref().is_some_and(|id| self.expected.iter().any(|e| **e == *id)) {
            return Err(rustls::Error::General(format!(
                "the upstream presented identity {} but {} was expected",
                id.as_deref().unwrap_or("(none)"),
                self.expected.join(" or ")
            )));
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let (roots, _) = self.creds.trust_for(id.as_deref())?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.creds.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.creds.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.creds.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.creds.algorithms.supported_schemes()
    }
}

/// Verifies the control plane's certificate: it names the host dialled and chains to the live
/// trust bundle (or, before there is one, to the bootstrap roots).
#[derive(Debug)]
struct ControlPlaneVerifier {
    creds: Arc<Credentials>,
    bootstrap: Arc<RootCertStore>,
}

impl ServerCertVerifier for ControlPlaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let roots = match self.creds.signing_root.load().is_some() {
            true => self.creds.roots.load_full(),
            false => self.bootstrap.clone(),
        };
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.creds.algorithms.all,
        )?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.creds.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.creds.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.creds.algorithms.supported_schemes()
    }
}

/// The proxy's first certificate. Only a refusal (the control plane answered 4xx: a bad join
/// token) is an error; if the control plane cannot be reached, [`run`] keeps trying.
pub async fn first_certificate(creds: &Credentials, api: &ControlApi, req: &CertificateRequest) -> Result<(), String> {
    match renew(creds, api, req).await {
        Err(Renewal::Refused(e)) => Err(e),
        _ => Ok(()),
    }
}

enum Renewal {
    /// The control plane answered and said no.
    Refused(String),
    Failed(String),
}

impl std::fmt::Display for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Renewal::Refused(e) | Renewal::Failed(e) => f.write_str(e),
        }
    }
}

/// One CSR round trip: a fresh key, a CSR, the CA's answer installed.
async fn renew(creds: &Credentials, api: &ControlApi, req: &CertificateRequest) -> Result<u64, Renewal> {
    let failed = |e: String| Renewal::Failed(e);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| failed(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| failed(e.to_string()))?;
    let req = CertificateRequest { csr, ..req.clone() };
    let resp: CertificateResponse = api.request_certificate(&req).await.map_err(|e| match e.status {
        Some(s) if s.is_client_error() => Renewal::Refused(e.message),
        _ => Renewal::Failed(e.message),
    })?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| failed(e.to_string()))?;
    creds.install(&resp, der).map_err(failed)?;
    Ok(resp.not_after)
}

/// Keeps the proxy's certificate fresh for as long as the proxy runs.
pub async fn run(
    creds: Arc<Credentials>,
    api: Arc<ControlApi>,
    req: CertificateRequest,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut retry = Duration::from_millis(200);
    // The certificate `first_certificate` got, if it got one.
    let mut current = creds.status().not_after;
    loop {
        let result = match current.take() {
            Some(not_after) => Ok(not_after),
            None => renew(&creds, &api, &req).await,
        };
        let wait = match result {
            Ok(not_after) => {
                retry = Duration::from_millis(200);
                metrics.certificate(not_after, true);
                let st = creds.status();
                tracing::info!(identity = ?st.identity, serial = ?st.serial, expires_in_s = not_after.saturating_sub(now_unix()), "certificate renewed");
                // Half the remaining lifetime, with a little jitter so a mesh does not renew at once.
                let left = not_after.saturating_sub(now_unix());
                Duration::from_millis(left * 500 + fastrand::u64(0..=left * 50))
            }
            Err(e) => {
                metrics.certificate(0, false);
                let left = creds.status().not_after.map(|t| t.saturating_sub(now_unix()));
                match left {
                    Some(left) => {
                        tracing::warn!(error = %e, expires_in_s = left, retry_in_ms = retry.as_millis() as u64, "certificate renewal failed; keeping the current certificate")
                    }
                    None => {
                        tracing::warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "cannot get a certificate from the control plane; not ready until one is issued")
                    }
                }
                creds.status.lock().unwrap_or_else(|p| p.into_inner()).renewal_error = Some(e.to_string());
                let r = retry;
                retry = (retry * 2).min(MAX_RETRY);
                r
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
            _ = creds.renew_now.notified() => {
                // Spread a rotation's renewals over a moment.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..500))).await;
                tracing::info!("the mesh has a new signing root; renewing the certificate");
            }
        }
    }
}
