//! Peerings as the store keeps them: one record per peer datacenter, by the name this
//! datacenter gave it. What the records say is turned into imports (the peers' states) for the
//! translation; the exchange with each peer is in `crate::peering`.
use serde::{Deserialize, Serialize};
use weft_api::peering::PeerState;

/// Which side of the peering this datacenter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Made the token (`weft peer create`); the peer calls it.
    Creator,
    /// Accepted the token (`weft peer accept`); calls the peer.
    Acceptor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Creator => "creator",
            Role::Acceptor => "acceptor",
        }
    }
}

/// One peering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRecord {
    pub name: String,
    pub role: Role,
    /// Creator: SHA-256 (hex) of the token's one-time secret, until it is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    /// Creator: when the token stops being accepted (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires: Option<u64>,
    /// Creator: SHA-256 (hex) of the exchange's secret, once established.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_secret_sha256: Option<String>,
    /// Acceptor: the peer's control plane addresses and the roots its API's certificate
    /// chains to (from the token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca: String,
    /// Acceptor: the exchange's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_secret: Option<String>,
    /// What the peer last told (kept while it cannot be reached: last good state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<PeerState>,
    /// The peer deleted the peering: nothing of it is imported any more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminated: bool,
}

impl PeerRecord {
    /// What this peering imports: the peer's last state, while the peering lasts.
    pub fn imports(&self) -> Option<&PeerState> {
        self.remote.as_ref().filter(|_| !self.terminated)
    }

    /// The peer deleted the peering: nothing of it is imported any more.
    pub fn end(&mut self) {
        self.terminated = true;
        self.remote = None;
    }

    pub fn established(&self) -> bool {
        self.stream_secret_sha256.is_some() || self.stream_secret.is_some()
    }
}

/// SHA-256 of a secret, hex: what is stored and compared (so the time a comparison takes
/// says nothing about the secret).
pub fn digest(secret: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new secret: 32 bytes from the CSPRNG, base64url.
pub fn new_secret() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::ca::random::<32>())
}
