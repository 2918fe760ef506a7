//! Workload identity: SPIFFE IDs, the messages of the certificate API, and the names of the
//! SDS secrets the control plane and the proxy agree on.
use serde::{Deserialize, Serialize};

/// Trust domain of a mesh unless the operator picks another (`weft control --trust-domain`).
pub const DEFAULT_TRUST_DOMAIN: &str = "weft.local";
/// Namespace in every SPIFFE ID unless the operator picks another (`--namespace`).
pub const DEFAULT_NAMESPACE: &str = "default";

/// SDS secret of the proxy's own certificate and key. A weft proxy makes this secret itself
/// (its key never leaves it); the control plane only names it in transport sockets.
pub const CERT_SECRET: &str = "default";
/// SDS secret carrying the mesh's trust bundle (a validation context), served over xDS.
pub const ROOT_SECRET: &str = "ROOTCA";

/// ALPN a sidecar offers when it carries opaque TCP inside mutual TLS.
pub const ALPN_TCP: &str = "weft-tcp";

/// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE`
pub fn spiffe_id(trust_domain: &str, namespace: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service}")
}

/// The trust domain, namespace and service of a SPIFFE ID [`spiffe_id`] made.
pub fn spiffe_parts(id: &str) -> Option<(&str, &str, &str)> {
    match id.strip_prefix("spiffe://")?.split('/').collect::<Vec<_>>().as_slice() {
        [td, "ns", ns, "sa", service] => Some((td, ns, service)),
        _ => None,
    }
}

/// A proxy's request for a certificate (`POST /api/v1/certificates`, join token as bearer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The proxy's instance id, for `weft get certs`.
    pub instance: String,
    /// The service the proxy serves; must be the one its token names. `None` for a proxy
    /// without an app (an edge or gateway), which takes the token's service as its identity.
    pub service: Option<String>,
    /// PKCS#10 request, PEM. Only its public key is used; the CA sets every name itself.
    pub csr: String,
}

/// A certificate issued to a proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// The SPIFFE ID in the certificate's URI SAN.
    pub identity: String,
    /// The certificate, then any intermediates (PEM), without the root.
    pub chain: String,
    /// The root the chain leads to (PEM).
    pub root: String,
    pub serial: String,
    /// Unix seconds.
    pub not_after: u64,
}

/// One proxy's current certificate, as `weft get certs` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificate {
    pub instance: String,
    pub identity: String,
    pub serial: String,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
    /// SHA-256 of the issuing root (hex, first 16 characters).
    pub root: String,
}

/// A join token as the control plane lists it (the secret itself is shown only at creation).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub id: String,
    pub service: String,
    /// Unix seconds.
    pub expires: u64,
    pub revoked: bool,
}

#[cfg(test)]
mod tests {
    #[test]
    fn spiffe_ids_part_as_they_are_made() {
        let id = super::spiffe_id("weft.local", "default", "web");
        assert_eq!(super::spiffe_parts(&id), Some(("weft.local", "default", "web")));
        for bad in ["spiffe://weft.local/sa/web", "https://weft.local/ns/a/sa/b", "spiffe://td/ns/a/sa/b/c"] {
            assert_eq!(super::spiffe_parts(bad), None, "{bad}");
        }
    }
}
