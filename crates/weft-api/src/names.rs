//! Names of the xDS resources weft generates. The control plane builds resources under these
//! names and the proxy recognises them, so both sides use these functions and nothing else.

/// Where the control plane listens (xDS and API), and where proxies and the CLI look for it,
/// unless told otherwise.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:15010";

/// Node metadata key under which a weft proxy sends its [`crate::InstanceRegistration`] (JSON).
pub const NODE_METADATA_KEY: &str = "weft.registration";

/// Node metadata key under which a weft proxy sends its instance key: a random secret made at
/// start and kept for the process's life. The control plane binds a registered instance id to
/// it, so only the proxy that registered an id may register it again (after a reconnect).
pub const NODE_INSTANCE_KEY: &str = "weft.instance-key";

/// The service a gateway's join token names, and so its identity (`spiffe://…/sa/gateway`),
/// the caller authorization rules see for what it sends into the mesh: `weft up`'s gateway.
pub const GATEWAY: &str = "gateway";

/// The listener filter of a mesh gateway's listener: it reads each connection's TLS server
/// name, by which the connection is routed without being decrypted.
pub const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";

/// The certificate validator of a peered mesh's trust bundle: each trust domain's roots.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// A mesh gateway's listener at `addr`.
pub fn mesh_gateway_listener(addr: &str) -> String {
    format!("mesh-gateway|{addr}")
}

/// A mesh gateway's cluster of `service`'s instances in its own datacenter (and the endpoint
/// resource of them).
pub fn local_cluster(service: &str) -> String {
    format!("local|{service}")
}

/// A mesh gateway's cluster of the peer datacenters' gateways standing for `service`, in its
/// failover order (and the endpoint resource of them): where its own datacenter's sidecars'
/// connections to the service go on to.
pub fn remote_cluster(service: &str) -> String {
    format!("remote|{service}")
}

/// Filter-metadata namespace on each LbEndpoint carrying the instance id and labels.
pub const ENDPOINT_METADATA_NAMESPACE: &str = "weft";

/// Outbound listener for `service`, bound at `addr` on the proxy.
pub fn outbound_listener(service: &str, addr: &str) -> String {
    format!("outbound|{service}|{addr}")
}

/// The proxy's inbound listener, in front of its application.
pub fn inbound_listener(addr: &str) -> String {
    format!("inbound|{addr}")
}

/// The static cluster for the proxy's local application.
pub const INBOUND_CLUSTER: &str = "inbound|app";

/// The inline route configuration of the inbound listener.
pub const INBOUND_ROUTE: &str = "inbound";

/// The descriptor entry key of a per-caller bucket in the local rate limit filter: with an
/// empty value, each caller (SPIFFE identity, or source address without mutual TLS) gets a
/// bucket of its own.
pub const CALLER_DESCRIPTOR: &str = "weft.caller";

/// The tracer weft proxies implement, by its Envoy extension name: OpenTelemetry over OTLP/gRPC.
pub const OTEL_TRACER: &str = "envoy.tracers.opentelemetry";

/// The capture listener of a transparent instance: every TCP connection its app opens arrives
/// here (Envoy's `use_original_dst` listener) and is handed to the listener of where it was
/// going.
pub const CAPTURE_LISTENER: &str = "outbound|capture";

/// The cluster of connections to destinations outside the mesh, sent on unchanged (Envoy's
/// `ORIGINAL_DST` type: the connection's own original destination).
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// The outbound listener a captured connection to `service`'s virtual IP is handed to. It
/// binds no socket (`bind_to_port: false`); its address is `VIP:0`, port 0 meaning any port.
pub fn virtual_listener(service: &str, vip: std::net::Ipv4Addr) -> String {
    format!("outbound|{service}|{vip}")
}

/// The range services' virtual IPs come from (as Istio's auto-allocated ones): class E,
/// never routed, so a virtual IP cannot be mistaken for a real address.
pub const VIP_RANGE: (std::net::Ipv4Addr, u8) = (std::net::Ipv4Addr::new(240, 240, 0, 0), 16);

/// IPv6 in transparent instances: an instance's address and a service's virtual IP have an
/// IPv6 form, the IPv4 one within this /96 (a unique local prefix, `fd77:6566:7400::/96`), so
/// the two forms name the same instance or service (as NAT64's well-known prefix embeds IPv4).
pub const MESH_IPV6_PREFIX: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd77, 0x6566, 0x7400, 0, 0, 0, 0, 0);

/// The IPv6 form of a mesh address (see [`MESH_IPV6_PREFIX`]).
pub fn mesh_ipv6(v4: std::net::Ipv4Addr) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(u128::from(MESH_IPV6_PREFIX) | u128::from(u32::from(v4)))
}

/// The IPv4 form of an address: itself, or the IPv4 address an IPv6 one of [`MESH_IPV6_PREFIX`]
/// embeds; `None` for any other IPv6 address.
pub fn mesh_ipv4(ip: std::net::IpAddr) -> Option<std::net::Ipv4Addr> {
    match ip {
        std::net::IpAddr::V4(v4) => Some(v4),
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            (bits >> 32 == u128::from(MESH_IPV6_PREFIX) >> 32).then(|| std::net::Ipv4Addr::from(bits as u32))
        }
    }
}

/// The socket mark of a transparent sidecar's own connections, which its namespace's capture
/// rules let through (Istio's in-pod mark).
pub const CAPTURE_MARK: u32 = 0x1337;

/// The ports a transparent instance's sidecar listens on inside its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturePorts {
    /// Every TCP connection the app opens is redirected here (loopback).
    pub outbound: u16,
    /// Every TCP connection that arrives is redirected here: the inbound listener.
    pub inbound: u16,
    /// The resolver (loopback, UDP and TCP); DNS the app sends anywhere is redirected here.
    pub dns: u16,
    /// The admin endpoint (/metrics), reachable on the instance's address.
    pub admin: u16,
}

pub const fn capture_ports() -> CapturePorts {
    CapturePorts { outbound: 15001, inbound: 15006, dns: 15053, admin: 15020 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_addresses_have_one_ipv6_form_and_back() {
        let vip = std::net::Ipv4Addr::new(240, 240, 0, 9);
        let v6 = mesh_ipv6(vip);
        assert_eq!(v6.to_string(), "fd77:6566:7400::f0f0:9");
        assert_eq!(mesh_ipv4(v6.into()), Some(vip));
        assert_eq!(mesh_ipv4(vip.into()), Some(vip));
        for other in ["fd77:6566:7401::f0f0:9", "::ffff:240.240.0.9", "2001:db8::1"] {
            assert_eq!(mesh_ipv4(other.parse().unwrap()), None, "{other}");
        }
    }
}
