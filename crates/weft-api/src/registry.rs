//! The registry's model: what a proxy tells the control plane about its instance, and what
//! the control plane reports back about services and endpoints.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a `weft proxy` announces about itself when it connects (sent as xDS node metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRegistration {
    /// Service this instance belongs to; `None` for a proxy with no application (an edge).
    pub service: Option<String>,
    /// Address other proxies reach this instance on: the proxy's inbound listener.
    pub inbound: Option<String>,
    /// Local address of the application behind the inbound listener.
    pub app: Option<String>,
    /// The proxy's admin endpoint (/metrics, /config_dump).
    #[serde(default)]
    pub admin: Option<String>,
    /// Labels such as `version` and `zone`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Upstream services the application reaches through local listeners.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// A transparent instance: where its capture listener is (the app's outbound TCP is
    /// redirected there), so it reaches every service by name or virtual IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    /// A mesh gateway's address for its own datacenter's sidecars: a connection to it goes
    /// on, still encrypted, to a peer datacenter's mesh gateway (`weft control
    /// --mesh-gateway-mode local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_gateway_local: Option<String>,
    /// Health of the application when the proxy connected.
    #[serde(default)]
    pub healthy: bool,
}

/// One explicit upstream: `service` is reachable on the local `listen` address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub service: String,
    pub listen: String,
}

/// One registered instance as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub id: String,
    pub registration: InstanceRegistration,
    pub healthy: bool,
    /// Whether the instance's proxy holds an open xDS stream right now.
    pub connected: bool,
}

impl Instance {
    /// Whether other proxies should send traffic here.
    pub fn serving(&self) -> bool {
        self.healthy && self.registration.inbound.is_some()
    }
}

/// A replica of the control plane, as `weft get replicas` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    /// Where proxies and the CLI reach it (HOST:PORT); also its name.
    pub address: String,
    /// When it started (Unix seconds).
    pub started: u64,
    /// Proxies with an xDS stream to it.
    pub proxies: usize,
    /// The replica that does what must happen once (finishing a CA rotation a replica left).
    #[serde(default)]
    pub leader: bool,
    /// Whether it reaches the store.
    #[serde(default)]
    pub healthy: bool,
}

/// A service as `weft get services` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSummary {
    pub name: String,
    /// Whether a `Service` resource configures it (otherwise it exists only by registration).
    pub declared: bool,
    pub instances: usize,
    pub healthy: usize,
    pub protocol: String,
    pub load_balancer: String,
    /// The service's virtual IP: what its mesh DNS names resolve to in transparent instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<std::net::Ipv4Addr>,
    /// Peer datacenters that export the service to this one (failover targets, in order),
    /// with how many of their instances serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imported: Vec<Imported>,
}

/// A service as a peer datacenter exports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Imported {
    /// The peering's name here.
    pub peer: String,
    pub datacenter: String,
    pub healthy: u32,
    pub instances: u32,
}

/// Body of `PUT /api/v1/instances/{id}/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthReport {
    pub healthy: bool,
}

/// A connected xDS client as `weft get proxies` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub node: String,
    pub service: Option<String>,
    pub delta: bool,
    /// Last NACK the proxy sent, if any.
    pub last_error: Option<String>,
    /// Type URL → version the proxy last acknowledged.
    pub acked: BTreeMap<String, String>,
    /// Whether the client is a weft proxy (it sent a registration).
    #[serde(default)]
    pub weft: bool,
    /// Version of the trust bundle (`ROOTCA` secret) the proxy last acknowledged.
    #[serde(default)]
    pub trust_bundle: Option<String>,
    /// The proxy's admin endpoint (/metrics), from its registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// The proxy's labels (`version`, `zone`), from its registration.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Type URL → why the proxy refuses that type's current config: its NACKs not yet
    /// followed by an ACK of the type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejecting: BTreeMap<String, String>,
}
