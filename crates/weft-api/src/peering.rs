//! Peering between datacenters: the token one datacenter's control plane makes for another,
//! and the messages the two exchange for as long as the peering lasts (what each exports, its
//! trust domain and roots, where its mesh gateways are). Each datacenter keeps its own CA and
//! trust domain; a peer's roots are trusted for identities of the peer's trust domain only.
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The datacenter a control plane is in unless told otherwise (`weft control --datacenter`).
pub const DEFAULT_DATACENTER: &str = "dc1";

/// The service a mesh gateway's join token names (and so its identity).
pub const MESH_GATEWAY: &str = "mesh-gateway";

/// The TLS server name a sidecar sends for `service` in `namespace`: a mesh gateway routes a
/// connection by it, without decrypting it, to an instance of that service of its own
/// datacenter (`SERVICE.NAMESPACE.mesh`).
pub fn server_name(service: &str, namespace: &str) -> String {
    format!("{service}.{namespace}.mesh")
}

/// How a datacenter's sidecars reach the instances of a peer datacenter (`weft control
/// --mesh-gateway-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshGatewayMode {
    /// Straight to the peer's mesh gateways.
    #[default]
    Remote,
    /// Through this datacenter's own mesh gateway (its `--mesh-gateway-local` address), which
    /// passes each connection on, still encrypted, to the peer's: for sidecars that cannot
    /// reach the peer themselves.
    Local,
}

impl MeshGatewayMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MeshGatewayMode::Remote => "remote",
            MeshGatewayMode::Local => "local",
        }
    }
}

/// What `weft peer create` hands to the other datacenter: how to reach this control plane
/// and a one-time secret to establish the peering with. Shown once; useless once used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeeringToken {
    /// The name the creating datacenter gave the peering (its name for the acceptor).
    pub peer_name: String,
    /// The creating datacenter's name and trust domain.
    pub datacenter: String,
    pub trust_domain: String,
    /// The creating control plane's API addresses (`host:port`), tried in order.
    pub control: Vec<String>,
    /// The roots its API's TLS certificate chains to (PEM).
    pub ca: String,
    /// The one-time establishment secret.
    pub secret: String,
    /// Unix seconds after which the token is refused.
    pub expires: u64,
}

impl PeeringToken {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("tokens always serialize");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    pub fn decode(text: &str) -> Result<PeeringToken, String> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| "the peering token is not what `weft peer create` prints (not base64url)".to_owned())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("the peering token is damaged or from another version: {e}"))
    }
}

/// The acceptor's first call (`POST /api/v1/peering/establish`): the token's secret, traded
/// for the secret of the peering's exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EstablishRequest {
    pub secret: String,
    pub datacenter: String,
    pub trust_domain: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EstablishResponse {
    /// The bearer secret of every exchange from now on.
    pub stream_secret: String,
}

/// What a datacenter tells a peer about itself: sent at every change, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerState {
    pub datacenter: String,
    pub trust_domain: String,
    pub namespace: String,
    /// The roots its CA signs identities with (PEM), the signing one first.
    pub roots: String,
    /// Its mesh gateways' addresses (`host:port`) that serve.
    pub gateways: Vec<String>,
    /// The services it exports to this peer.
    pub services: Vec<ExportedState>,
}

/// An exported service as a peer sees it: no instance addresses, only how many serve.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportedState {
    pub name: String,
    pub healthy: u32,
    pub instances: u32,
}

impl PeerState {
    /// A digest of the state, so each side asks only for what it has not seen.
    pub fn digest(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        format!("{:016x}", h.finish())
    }
}

/// One exchange (`POST /api/v1/peering/exchange`, the stream secret as bearer): the caller's
/// state, and the digest of the callee's state it holds. The callee answers when its own
/// state differs from that digest, or after [`EXCHANGE_WAIT_SECS`] with the same state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeRequest {
    pub state: PeerState,
    #[serde(default)]
    pub seen: Option<String>,
}

/// How long the callee of an exchange holds it open while nothing changes.
pub const EXCHANGE_WAIT_SECS: u64 = 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeResponse {
    pub state: PeerState,
}

/// `weft peer create NAME` (`POST /api/v1/peers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatePeer {
    pub name: String,
}

/// `weft peer accept --name NAME TOKEN` (`POST /api/v1/peers/accept`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptPeer {
    pub name: String,
    pub token: String,
}

/// A peering as `weft get peers` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerSummary {
    pub name: String,
    /// `pending` (token made, not yet accepted), `active`, `unreachable` (the last exchange
    /// failed; the last imported state stays in force) or `terminated` (the peer deleted it).
    pub state: String,
    /// `creator` or `acceptor`.
    pub role: String,
    pub datacenter: Option<String>,
    pub trust_domain: Option<String>,
    /// Unix seconds of the last exchange, either way.
    pub last_sync: Option<u64>,
    pub error: Option<String>,
    pub exported: Vec<String>,
    pub imported: Vec<ExportedState>,
    pub gateways: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_damage_is_named() {
        let t = PeeringToken {
            peer_name: "dc2".into(),
            datacenter: "dc1".into(),
            trust_domain: "dc1.weft".into(),
            control: vec!["127.0.0.1:15010".into()],
            ca: "-----BEGIN CERTIFICATE-----\n".into(),
            secret: "s".into(),
            expires: 1,
        };
        assert_eq!(PeeringToken::decode(&t.encode()).unwrap(), t);
        assert!(PeeringToken::decode("not a token!").unwrap_err().contains("not base64url"));
        assert!(PeeringToken::decode("e30").unwrap_err().contains("damaged"));
    }
}
