//! How anything talks to the control plane: TLS verified against the mesh's roots (the CLI: the
//! roots file; a proxy: its live trust bundle), and a bearer credential (a proxy's join token,
//! or the CLI's admin credential). Shared by the proxy (xDS, certificates, health reports) and
//! the `weft` CLI.
#![forbid(unsafe_code)]
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a client finds what it needs to reach a control plane.
#[derive(Debug, Clone)]
pub struct ControlEndpoint {
    /// host:port, or several comma-separated: replicas of one control plane, tried in turn
    /// (each one's certificate names its host).
    pub address: String,
    /// PEM file with the mesh root(s) the control plane's certificate chains to.
    pub ca_file: PathBuf,
    /// Bearer credential sent with every call.
    pub credential: Option<String>,
}

impl ControlEndpoint {
    /// `ca_file` given, or the one recorded for `address` in the credentials file (written by a
    /// control plane on this machine).
    pub fn resolve(
        address: &str,
        ca_file: Option<&Path>,
        credential: Option<String>,
    ) -> anyhow::Result<ControlEndpoint> {
        let recorded = address.split(',').find_map(|a| weft_api::credentials::load(a.trim()));
        let ca_file = match (ca_file, &recorded) {
            (Some(f), _) => f.to_owned(),
            (None, Some(e)) => e.ca_file.clone(),
            (None, None) => anyhow::bail!(
                "no mesh root to verify the control plane at {address} with: pass --ca-file FILE (the control plane writes DATA_DIR/ca/trust-bundle.pem) or set WEFT_CA_FILE"
            ),
        };
        Ok(ControlEndpoint { address: address.to_owned(), ca_file, credential })
    }

    /// The replicas' addresses (host:port), in the order given.
    pub fn addresses(&self) -> Vec<&str> {
        self.address.split(',').map(str::trim).filter(|a| !a.is_empty()).collect()
    }

    fn root_pem(&self) -> anyhow::Result<Vec<u8>> {
        std::fs::read(&self.ca_file).map_err(|e| {
            anyhow::anyhow!("cannot read the mesh root {} (--ca-file / WEFT_CA_FILE): {e}", self.ca_file.display())
        })
    }

    /// The roots in `ca_file`.
    pub fn roots(&self) -> anyhow::Result<rustls::RootCertStore> {
        let pem = self.root_pem()?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| anyhow::anyhow!("{} is not valid PEM: {e}", self.ca_file.display()))?;
            roots.add(cert).map_err(|e| anyhow::anyhow!("{}: unusable root: {e}", self.ca_file.display()))?;
        }
        anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", self.ca_file.display());
        Ok(roots)
    }

    /// TLS trusting the roots in `ca_file`: for short-lived clients (the CLI). A proxy trusts
    /// its live trust bundle instead (`weft_proxy::identity::Credentials::control_plane_config`).
    pub fn tls_config(&self, alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
        let mut cfg =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(self.roots()?)
                .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }
}

/// The host part of a control plane's address (host:port), which its certificate must name.
pub fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// How long a connection to one replica may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The control plane's JSON API over HTTPS. With several replicas, a call goes to the one that
/// answered last, and to the next ones in turn while it cannot be reached.
pub struct ControlApi {
    pub endpoint: ControlEndpoint,
    client: Client<Https, Full<Bytes>>,
    /// The replica that answered last (an index into the endpoint's addresses).
    preferred: std::sync::atomic::AtomicUsize,
}

/// An API call's failure: the status (if the control plane answered) and its message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: Option<http::StatusCode>,
    pub message: String,
}

impl ControlApi {
    pub fn new(endpoint: ControlEndpoint) -> anyhow::Result<ControlApi> {
        let tls = endpoint.tls_config(&[])?;
        Ok(ControlApi::with_tls(endpoint, tls))
    }

    /// With a TLS configuration of the caller's (no ALPN: the API speaks HTTP/1.1).
    pub fn with_tls(endpoint: ControlEndpoint, tls: rustls::ClientConfig) -> ControlApi {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        ControlApi {
            endpoint,
            client: Client::builder(TokioExecutor::new()).build(https),
            preferred: Default::default(),
        }
    }

    /// Sends a request; returns the status and the body.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<String>,
        timeout: Duration,
    ) -> Result<(http::StatusCode, Bytes), ApiError> {
        let resp = tokio::time::timeout(timeout, self.send(method, path, body)).await.map_err(|_| ApiError {
            status: None,
            message: format!("the control plane at {} did not answer within {timeout:?}", self.endpoint.address),
        })??;
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Ok((status, body))
    }

    /// A GET whose answer is read as it comes (a live stream); its head must come within
    /// `timeout`. A non-2xx answer is an error carrying the control plane's message.
    pub async fn stream(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
        let resp =
            tokio::time::timeout(timeout, self.send(http::Method::GET, path, None)).await.map_err(|_| ApiError {
                status: None,
                message: format!("the control plane at {} did not answer within {timeout:?}", self.endpoint.address),
            })??;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Err(ApiError { status: Some(status), message: error_message(status, &bytes) })
    }

    /// Sends to the preferred replica, then to the others in turn while one cannot be reached.
    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
        use std::sync::atomic::Ordering;
        let addresses = self.endpoint.addresses();
        let first = self.preferred.load(Ordering::Relaxed);
        for i in 0..addresses.len() {
            let at = (first + i) % addresses.len();
            match self.send_to(addresses[at], method.clone(), path, body.clone()).await {
                Ok(resp) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok(resp);
                }
                // Unreachable: the next replica.
                Err(e) if e.status.is_none() && i + 1 < addresses.len() => {
                    tracing::debug!(control = addresses[at], error = %e.message, "control plane replica unreachable");
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError { status: None, message: format!("no control plane address given ({:?})", self.endpoint.address) })
    }

    async fn send_to(
        &self,
        address: &str,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
        let failed = |message: String| ApiError { status: None, message };
        let uri = format!("https://{address}{path}");
        let mut req = http::Request::builder().method(method).uri(&uri);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(c) = &self.endpoint.credential {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {c}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| failed(format!("invalid control plane address {address:?}: {e}")))?;
        self.client.request(req).await.map_err(|e| {
                let mut cause = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    cause = s.to_string();
                    src = s.source();
                }
                failed(format!(
                    "cannot reach the control plane at {} ({cause}); is `weft control` or `weft up` running, and is {} its root?",
                    self.endpoint.address,
                    self.endpoint.ca_file.display()
                ))
            })
    }

    /// A call whose non-2xx answer is an error carrying the control plane's message.
    pub async fn call_ok(&self, method: http::Method, path: &str, body: Option<String>) -> Result<Bytes, ApiError> {
        let (status, bytes) = self.call(method, path, body, Duration::from_secs(5)).await?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(ApiError { status: Some(status), message: error_message(status, &bytes) })
    }

    pub async fn request_certificate(
        &self,
        req: &weft_api::identity::CertificateRequest,
    ) -> Result<weft_api::identity::CertificateResponse, ApiError> {
        let body = serde_json::to_string(req).expect("requests serialize");
        let bytes = self.call_ok(http::Method::POST, "/api/v1/certificates", Some(body)).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError { status: None, message: format!("malformed certificate response: {e}") })
    }

    pub async fn report_health(&self, id: &str, healthy: bool) -> Result<(), ApiError> {
        let body = serde_json::json!({ "healthy": healthy }).to_string();
        self.call_ok(http::Method::PUT, &format!("/api/v1/instances/{id}/health"), Some(body)).await.map(drop)
    }

    pub async fn deregister(&self, id: &str) {
        if let Err(e) = self.call_ok(http::Method::DELETE, &format!("/api/v1/instances/{id}"), None).await {
            tracing::debug!(error = %e, "deregistration failed; the control plane will notice the closed stream");
        }
    }
}

/// The control plane's message in an error answer (`{"error": ...}`), or the answer itself.
fn error_message(status: http::StatusCode, bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{status}: {}", String::from_utf8_lossy(bytes)))
}
