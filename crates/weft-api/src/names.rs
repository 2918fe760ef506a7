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
