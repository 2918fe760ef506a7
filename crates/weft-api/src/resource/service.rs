//! `kind: Service`: how traffic to one service is balanced, secured and normalised, and its
//! checks.
use super::common::{ApplyError, check_name, http_header_name_invalid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Application protocol of a service. `auto` detects HTTP/1.1, HTTP/2 and falls back to TCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Auto,
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency × outstanding requests.
    #[default]
    #[serde(rename = "p2c-ewma")]
    P2cEwma,
    #[serde(rename = "round-robin")]
    RoundRobin,
    #[serde(rename = "random")]
    Random,
    /// Consistent hashing on a ring (the key from `Service.spec.consistentHash`).
    #[serde(rename = "ring-hash")]
    RingHash,
    /// Consistent hashing with Maglev's lookup table.
    #[serde(rename = "maglev")]
    Maglev,
}

impl LoadBalancer {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancer::P2cEwma => "p2c-ewma",
            LoadBalancer::RoundRobin => "round-robin",
            LoadBalancer::Random => "random",
            LoadBalancer::RingHash => "ring-hash",
            LoadBalancer::Maglev => "maglev",
        }
    }

    pub fn is_consistent_hash(self) -> bool {
        matches!(self, LoadBalancer::RingHash | LoadBalancer::Maglev)
    }
}

/// What a consistent-hash load balancer hashes: exactly one of a header, a cookie or the
/// caller's address. A request without the header or cookie goes to a random instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, rename = "sourceIP", skip_serializing_if = "std::ops::Not::not")]
    pub source_ip: bool,
}

/// `kind: Service` — settings for traffic to one service. Services also exist without this
/// resource as soon as an instance registers; the resource only changes the defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Time allowed for a TCP connect to one endpoint before trying another (default 1s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// `strict` or `permissive`; unset: the mesh-wide default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// Makes this service a version (a subset) of another: its instances are those registered
    /// as `selector.service` whose labels include all of `selector.labels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<ServiceSelector>,
    /// The key of `ring-hash` and `maglev` load balancing (required by them, refused otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<LocalityPolicy>,
    /// What the sidecars do with an encoded slash or backslash (`%2F`, `%5C`) in a request
    /// path to this service, before routing and authorization.
    #[serde(default, skip_serializing_if = "EscapedSlashes::is_keep")]
    pub escaped_slashes: EscapedSlashes,
    /// What the service's transparent instances may reach outside the mesh; default: the
    /// mesh's (`weft control --egress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    /// Peer datacenters (by datacenter name) the service's callers send to, in this order,
    /// when none of this datacenter's instances can take a request; default: every peer that
    /// exports the service, in the order of the peerings' names. `[]`: never another datacenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<Vec<String>>,
    /// How the service's callers reach its instances in peer datacenters: `remote` (straight to
    /// the peers' mesh gateways) or `local` (through their own datacenter's mesh gateway);
    /// default: the mesh's (`weft control --mesh-gateway-mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_gateway_mode: Option<crate::peering::MeshGatewayMode>,
}

/// `Service.egress` (Istio's `outboundTrafficPolicy`): where a transparent instance's
/// connections to destinations that are not the mesh's go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Egress {
    /// Out of the mesh, unchanged (counted as `passthrough`).
    #[default]
    AllowAny,
    /// Refused: the connection is closed, counted as `egress-refused`.
    RegistryOnly,
}

/// `Service.escapedSlashes` (Envoy's `path_with_escaped_slashes_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    /// Left encoded, as Istio's default normalisation does: `/a%2Fb` is one segment.
    #[default]
    Keep,
    /// Decoded to `/` before the path is normalised (for apps that decode them).
    Decode,
    /// The request is refused with 400 `invalid-path`.
    Reject,
}

impl EscapedSlashes {
    fn is_keep(&self) -> bool {
        *self == EscapedSlashes::Keep
    }
}

/// Locality-aware load balancing: a caller whose instance has a `zone` label sends to the
/// service's instances in the same zone while any of them can take the request, and to the
/// other zones otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalityPolicy {
    pub prefer_same_zone: bool,
}

/// The instances a versioned service is made of, as a Kubernetes Service's selector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSelector {
    /// The service the instances registered as.
    pub service: String,
    /// Labels every selected instance has (`version: v2`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ServiceSelector {
    pub fn selects(&self, service: Option<&str>, labels: &BTreeMap<String, String>) -> bool {
        service == Some(self.service.as_str()) && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Whether a service's sidecars accept plaintext from other proxies. Unset in a `Service`, the
/// mesh-wide default applies (`weft control --mtls`, strict unless changed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only mutual TLS from a proxy of the mesh; plaintext connections are closed.
    #[default]
    Strict,
    /// Mutual TLS and plaintext both accepted, for migrating clients into the mesh.
    Permissive,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        }
    }
}

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A Service's own checks: a consistent-hash key exactly when the load balancer hashes, a
/// connect timeout above zero, a selector naming another service.
pub(super) fn validate_service(doc: usize, service_name: &str, spec: &ServiceSpec) -> Result<(), ApplyError> {
    match (&spec.consistent_hash, spec.load_balancer.is_consistent_hash()) {
        (None, true) => {
            return Err(ApplyError::new(
                doc,
                "spec.consistentHash",
                format!(
                    "loadBalancer {} needs a key: set consistentHash.header, .cookie or .sourceIP",
                    spec.load_balancer.as_str()
                ),
            ));
        }
        (Some(_), false) => {
            return Err(ApplyError::new(
                doc,
                "spec.consistentHash",
                format!("is only used by loadBalancer ring-hash or maglev, not {}", spec.load_balancer.as_str()),
            ));
        }
        (Some(h), true) => {
            let set = usize::from(h.header.is_some()) + usize::from(h.cookie.is_some()) + usize::from(h.source_ip);
            if set != 1 {
                return Err(ApplyError::new(
                    doc,
                    "spec.consistentHash",
                    "set exactly one of header, cookie and sourceIP",
                ));
            }
            if let Some(name) = &h.header
                && http_header_name_invalid(name)
            {
                return Err(ApplyError::new(
                    doc,
                    "spec.consistentHash.header",
                    format!("{name:?} is not a valid HTTP header name"),
                ));
            }
            if h.cookie.as_deref().is_some_and(|c| c.is_empty() || c.contains([';', '=', ' ', ','])) {
                return Err(ApplyError::new(doc, "spec.consistentHash.cookie", "is not a cookie name"));
            }
        }
        (None, false) => {}
    }
    if spec.connect_timeout.is_some_and(|t| t.is_zero()) {
        return Err(ApplyError::new(doc, "spec.connectTimeout", "must be greater than 0"));
    }
    for (i, dc) in spec.failover.iter().flatten().enumerate() {
        check_name(doc, &format!("spec.failover[{i}]"), dc)?;
        if spec.failover.iter().flatten().take(i).any(|d| d == dc) {
            return Err(ApplyError::new(doc, format!("spec.failover[{i}]"), format!("{dc:?} is listed twice")));
        }
    }
    if let Some(sel) = &spec.selector {
        check_name(doc, "spec.selector.service", &sel.service)?;
        if sel.service == service_name {
            return Err(ApplyError::new(
                doc,
                "spec.selector.service",
                "names this service itself; a selector picks instances of another service (e.g. backend-v2 selects backend's instances with version v2)",
            ));
        }
    }
    Ok(())
}
