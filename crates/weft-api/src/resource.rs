//! Configuration resources users apply: Kubernetes-style documents with `apiVersion`, `kind`,
//! `metadata` and `spec`. Parsing and validation happen here, once, at apply time; a document
//! that passes [`parse_documents`] and the control plane's reference check is always translatable.
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub const WEFT_API_VERSION: &str = "weft.dev/v1alpha1";
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// The kinds of resource `weft apply` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Service,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    AuthorizationPolicy,
    RequestAuthentication,
    TrafficPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::TrafficPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::TrafficPolicy => "TrafficPolicy",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::AuthorizationPolicy | Kind::RequestAuthentication | Kind::TrafficPolicy => {
                WEFT_API_VERSION
            }
            Kind::HttpRoute | Kind::GrpcRoute => GATEWAY_API_VERSION,
        }
    }

    /// Accepts the kind as written in a document (`HTTPRoute`) or on the command line
    /// (`httproutes`, `httproute`, `services`, `svc`).
    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Some(Kind::Service),
            "httproute" | "httproutes" => Some(Kind::HttpRoute),
            "grpcroute" | "grpcroutes" => Some(Kind::GrpcRoute),
            "authorizationpolicy" | "authorizationpolicies" | "authz" => Some(Kind::AuthorizationPolicy),
            "requestauthentication" | "requestauthentications" | "jwt" => Some(Kind::RequestAuthentication),
            "trafficpolicy" | "trafficpolicies" => Some(Kind::TrafficPolicy),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A document of one kind: the common envelope around a kind-specific `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    pub api_version: String,
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: S,
}

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

/// `kind: HTTPRoute` (Gateway API v1, GAMMA style: the parent is a Service).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// `timeouts` of a rule. Without retries a request makes one attempt (plus failover on connect
/// errors), so the effective limit is the smaller of the two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// From the request's arrival to the response head.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// For one attempt at a backend.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Duration>,
}

impl HttpRouteTimeouts {
    pub fn effective(&self) -> Option<Duration> {
        match (self.request, self.backend_request) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpRouteFilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestRedirect,
    RequestMirror,
    ExtensionRef,
}

/// One filter of a rule: `type` and the field of that type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: HttpRouteFilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, rename = "urlRewrite", skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<serde_json::Value>,
}

/// `RequestRedirect`: the sidecar answers with a redirect instead of forwarding. Unset parts
/// of the location are the request's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

/// `RequestMirror`: a copy of each request (or of `percent` / `fraction` of them) goes to
/// another service too; its answers are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: MirrorBackendRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorBackendRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "default_denominator")]
    pub denominator: u32,
}

fn default_denominator() -> u32 {
    100
}

impl RequestMirror {
    /// The share of requests mirrored, in parts per million.
    pub fn per_million(&self) -> u32 {
        match (&self.fraction, self.percent) {
            (Some(f), _) => (u64::from(f.numerator) * 1_000_000 / u64::from(f.denominator.max(1))) as u32,
            (None, Some(p)) => p * 10_000,
            (None, None) => 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Replace (or add) these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    /// Add these values, keeping any already there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UrlRewrite {
    /// The `Host` (`:authority`) the backend sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    #[default]
    PathPrefix,
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeaderMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    #[serde(default, rename = "type")]
    pub kind: HeaderMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

fn default_weight() -> u32 {
    1
}

/// `kind: GRPCRoute` (Gateway API v1, GAMMA style): routes gRPC calls to a service by their
/// service and method. Translated into the same routes as an HTTPRoute (a call's path is
/// `/SERVICE/METHOD`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A call's gRPC service (`package.Service`) and/or method; at least one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub kind: HeaderMatchType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl GrpcRouteSpec {
    /// The route as HTTPRoute rules: a method match becomes a path match on `/SERVICE/METHOD`
    /// (exact for both, a prefix for a service alone, a regular expression otherwise).
    pub fn http_rules(&self) -> Vec<HttpRouteRule> {
        self.rules
            .iter()
            .map(|r| HttpRouteRule {
                matches: r
                    .matches
                    .iter()
                    .map(|m| HttpRouteMatch {
                        path: m.method.as_ref().map(grpc_path),
                        headers: m.headers.clone(),
                        ..Default::default()
                    })
                    .collect(),
                filters: r.filters.clone(),
                backend_refs: r.backend_refs.clone(),
                timeouts: None,
            })
            .collect()
    }

    pub fn as_http(&self) -> HttpRouteSpec {
        HttpRouteSpec {
            parent_refs: self.parent_refs.clone(),
            hostnames: self.hostnames.clone(),
            rules: self.http_rules(),
        }
    }
}

fn grpc_path(m: &GrpcMethodMatch) -> PathMatch {
    match (m.kind, m.service.as_deref(), m.method.as_deref()) {
        (HeaderMatchType::Exact, Some(s), Some(me)) => {
            PathMatch { kind: PathMatchType::Exact, value: format!("/{s}/{me}") }
        }
        (HeaderMatchType::Exact, Some(s), None) => {
            PathMatch { kind: PathMatchType::PathPrefix, value: format!("/{s}") }
        }
        (HeaderMatchType::Exact, None, me) => PathMatch {
            kind: PathMatchType::RegularExpression,
            value: format!("/[^/]+/{}", regex::escape(me.unwrap_or_default())),
        },
        // Each part grouped, so an alternation in one stays inside it.
        (HeaderMatchType::RegularExpression, s, me) => PathMatch {
            kind: PathMatchType::RegularExpression,
            value: format!("/(?:{})/(?:{})", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+")),
        },
    }
}

/// One validated resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Resource {
    Service(Object<ServiceSpec>),
    HttpRoute(Object<HttpRouteSpec>),
    GrpcRoute(Object<GrpcRouteSpec>),
    AuthorizationPolicy(Object<AuthorizationPolicySpec>),
    RequestAuthentication(Object<RequestAuthenticationSpec>),
    TrafficPolicy(Object<TrafficPolicySpec>),
}

/// `kind: TrafficPolicy` — how callers' sidecars treat traffic to a service (Gateway API
/// policy attachment: `targetRef` names the Service). Applies to every caller, each sidecar
/// enforcing it on its own traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target_ref: PolicyTargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Box<OutlierDetection>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Box<FaultInjection>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Box<RateLimitPolicy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<ActiveHealthCheck>>,
}

/// Active health checks: each calling sidecar probes every instance of the service (through
/// the instance's sidecar) and stops sending to one that fails, on top of the registry's
/// health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ActiveHealthCheck {
    /// Between probes of one instance (default 5s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// For one probe (default 1s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Failed probes in a row that take an instance out (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Passed probes in a row that bring it back (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    /// `GET path` answered 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    /// A connection to the instance's sidecar succeeds (mutual TLS included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHealthCheck {
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheck {}

pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Local rate limits, enforced by each of the service's own sidecars on the requests it
/// receives (each instance counts alone): token buckets for the whole service and/or for each
/// caller (its SPIFFE identity under mutual TLS, its source address otherwise). A refused
/// request gets `429` with `Retry-After` (gRPC: RESOURCE_EXHAUSTED).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitPolicy {
    /// For all callers together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<TokenBucket>,
    /// For each caller apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_caller: Option<TokenBucket>,
}

/// `requests` per `interval` (default 1s), with bursts of up to `burst` (default `requests`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenBucket {
    pub requests: u32,
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Faults the callers' sidecars inject into requests to the service, for testing how the
/// system copes: a delay before forwarding, or an answer the proxy makes itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(with = "crate::duration")]
    pub fixed_delay: Duration,
    /// Share of requests delayed, 0 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

/// Answered by the proxy with `httpStatus`, or for gRPC requests `grpcStatus`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// Share of requests aborted, 0 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

/// A percentage (0 to 100, fractions allowed) in parts per million.
pub fn percent_per_million(p: Option<f64>) -> u32 {
    (p.unwrap_or(100.0).clamp(0.0, 100.0) * 10_000.0).round() as u32
}

/// Passive health checking by each calling sidecar: an instance that fails several requests in
/// a row is ejected (not picked) for a while, longer each time it is ejected again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or connect failures, resets) that eject an instance; default 5,
    /// 0 turns this check off.
    #[serde(default, rename = "consecutive5xx", skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502, 503 or 504 answers (or connect failures, resets) that eject an
    /// instance; off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How long the first ejection lasts (default 30s); the n-th ejection in a row lasts n
    /// times as long.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// The longest an ejection lasts (default 300s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<Duration>,
    /// The share of instances that may be ejected at once (default 10); one may always be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// When fewer than this percentage of the instances are left un-ejected, ejections are
    /// ignored and every instance is used (default 50; 0 never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
}

pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// Retries of requests to the service, by the caller's sidecar. Only idempotent requests are
/// retried after they reached an app; a request that never did (connect failure) is retried
/// whatever its method. A body is kept for a retry up to 64 KiB.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first attempt (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Time allowed for each attempt (default: only the route's timeout).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// When to retry (default `[gateway-error, connect-failure, reset]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<RetryBackoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// The largest request body kept, while first sent, for a retry (and for failover and
    /// mirrors on the same routes); default 65536, at most 16 MiB. A larger body is sent once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u32>,
}

pub const MAX_BODY_BYTES_LIMIT: u32 = 16 * 1024 * 1024;

pub const RETRY_ON: [&str; 9] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];
pub const DEFAULT_RETRY_ON: [&str; 3] = ["gateway-error", "connect-failure", "reset"];

/// Exponential backoff with full jitter between retries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBackoff {
    /// Default 25ms.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<Duration>,
    /// Default 10 × baseInterval.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<Duration>,
}

/// Retries in flight at once may be at most `percent` of the requests in flight to the
/// service, or `minRetryConcurrency`, whichever is more (Envoy's retry budget). Without a
/// budget, 20% or 10 (a retry counts while in flight, not while it waits out its backoff).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Envoy's budget: retries in flight at most this percent of the requests in flight...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// ...or this many (default 10), whichever is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retry_concurrency: Option<u32>,
    /// Linkerd's budget: retries over the last `ttl` at most this ratio of the requests sent
    /// in it (0.2: one retry for every five requests)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// ...plus this many per second (default 10), so a quiet service can still retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    /// The window the ratio is counted over (default 10s, 1s to 60s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
}

pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
pub const DEFAULT_RETRY_BUDGET_TTL: Duration = Duration::from_secs(10);

pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// What a TrafficPolicy attaches to: a Service (`kind` unset or `Service`), or one HTTPRoute
/// (`kind: HTTPRoute`), whose rules it then governs instead of the service's policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
}

impl PolicyTargetRef {
    pub fn targets_route(&self) -> bool {
        self.kind.as_deref() == Some("HTTPRoute")
    }

    /// `Service/NAME` or `HTTPRoute/NAME`: one TrafficPolicy per target.
    pub fn key(&self) -> String {
        let kind = if self.targets_route() { "HTTPRoute" } else { "Service" };
        format!("{kind}/{}", self.name)
    }
}

/// Limits each calling sidecar keeps towards the service; a request over a limit is answered
/// at once with 503 `x-weft-error: overflow`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Requests in flight to the service at once (until each response head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// HTTP/1.1 connections each calling sidecar keeps to each instance at most; a request that
    /// finds them all busy waits for one (see `maxPendingRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_instance: Option<u32>,
    /// Requests waiting for a connection at once, across the service's instances (default
    /// 1024); more are answered at once with 503 `overflow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests sent on one upstream connection before it is closed (HTTP/1.1 exchanges or
    /// HTTP/2 streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// A pooled connection unused this long is closed (default: the proxy's
    /// `--upstream-idle-timeout`).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// A connection this old takes no new requests (it closes once its last one is done).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Duration>,
}

/// `kind: AuthorizationPolicy` — who may call a service (or every service), checked by the
/// receiving sidecar. DENY policies win over ALLOW ones; once any ALLOW policy applies to a
/// service, a request must match one of its rules (an ALLOW policy without rules allows
/// nothing: a default deny).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The service whose inbound traffic the policy governs; unset: every service of the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default)]
    pub action: AuthzAction,
    /// A request matches the policy if it matches any rule.
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
}

/// A rule matches when its `from`, `to` and `when` all match (an empty list matches anything).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRule {
    /// Callers: any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzSource>,
    /// Operations: any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzOperation>,
    /// Further conditions: all of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<AuthzCondition>,
}

/// A caller, by its verified SPIFFE ID. The fields set must all match; a field matches if any
/// of its values does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzSource {
    /// Services of this mesh (their SPIFFE IDs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Exact SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Every identity in these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Every identity of these trust domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    /// Requests carrying a valid JWT (see `RequestAuthentication`) of these principals:
    /// `ISSUER/SUBJECT`, `ISSUER/*` (any subject of the issuer) or `*` (any valid token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
}

/// What is called. The fields set must all match; a field matches if any of its values does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzOperation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Exact paths, or prefixes written with a trailing `*` (`/api/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// The port the caller connected to (the sidecar's inbound port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// A request header, or a claim of the request's validated JWT, that must have one of
/// `values`. Set exactly one of `header` and `claim`. A claim is named by its path in the
/// token's payload (`groups`, `realm_access.roles`); it matches if it is a string equal to a
/// value, or a list holding one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzCondition {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub header: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub claim: String,
    pub values: Vec<String>,
}

/// `kind: RequestAuthentication` — JSON Web Tokens the receiving sidecar validates for a
/// service (or every service). A request carrying a token that is invalid (bad signature,
/// unknown key or issuer, expired, wrong audience) is refused with 401 whatever `required`
/// says; a request without a token is refused only if `required` is true. The claims of a
/// valid token can be used in AuthorizationPolicy (`requestPrincipals`, `when.claim`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// The service whose inbound requests are checked; unset: every service of the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Refuse requests without a token (401 `jwt-missing`). A service that requires tokens
    /// accepts only HTTP: opaque TCP connections to it are closed.
    #[serde(default)]
    pub required: bool,
    pub issuers: Vec<JwtIssuer>,
}

/// A token issuer and where its signing keys come from: exactly one of `jwksUri`, `jwksFile`
/// and `jwks`. The control plane reads the keys (at apply time, then every `refreshInterval`)
/// and hands them to the sidecars, so sidecars need no access to the issuer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtIssuer {
    /// The token's `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values (any one suffices); empty: the audience is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// An http(s) URL serving the issuer's JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// A JWKS file on the control plane's machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// The JWKS itself, as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// How often the control plane re-reads `jwksUri` or `jwksFile` (default 5m, at least 1s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<Duration>,
    /// Tolerance for `exp` and `nbf` (default 60s).
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub clock_skew: Option<Duration>,
    /// Where the token is read from (default: `Authorization: Bearer TOKEN`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Pass the token on to the app (default false: the sidecar removes it).
    #[serde(default)]
    pub forward_original_token: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtHeader {
    pub name: String,
    /// Text before the token in the header's value, e.g. `"Bearer "`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_JWT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Where an issuer's keys come from, once validated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JwksSource {
    Uri(String),
    File(String),
    Inline(String),
}

impl JwtIssuer {
    pub fn jwks_source(&self) -> Option<JwksSource> {
        match (&self.jwks_uri, &self.jwks_file, &self.jwks) {
            (Some(u), None, None) => Some(JwksSource::Uri(u.clone())),
            (None, Some(f), None) => Some(JwksSource::File(f.clone())),
            (None, None, Some(j)) => Some(JwksSource::Inline(j.clone())),
            _ => None,
        }
    }
}

/// Why a document was rejected, and where. `path` is the field path inside the document
/// (`spec.rules[0].backendRefs[1].weight`); `file` and `document` are filled in by whoever knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct ApplyError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Index of the document in a multi-document file, from 0.
    pub document: usize,
    pub path: String,
    pub reason: String,
}

impl ApplyError {
    pub fn new(document: usize, path: impl Into<String>, reason: impl Into<String>) -> Self {
        ApplyError { file: None, document, path: path.into(), reason: reason.into() }
    }
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        write!(f, "document {}", self.document + 1)?;
        if !self.path.is_empty() {
            write!(f, ", field {}", self.path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Service(_) => Kind::Service,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::GrpcRoute(_) => Kind::GrpcRoute,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::RequestAuthentication(_) => Kind::RequestAuthentication,
            Resource::TrafficPolicy(_) => Kind::TrafficPolicy,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::Service(o) => &o.metadata.name,
            Resource::HttpRoute(o) => &o.metadata.name,
            Resource::GrpcRoute(o) => &o.metadata.name,
            Resource::AuthorizationPolicy(o) => &o.metadata.name,
            Resource::RequestAuthentication(o) => &o.metadata.name,
            Resource::TrafficPolicy(o) => &o.metadata.name,
        }
    }

    /// Store key: `Kind/name`.
    pub fn key(&self) -> String {
        key(self.kind(), self.name())
    }

    /// Parses and validates one document already decoded into a generic tree (YAML or JSON).
    pub fn from_value<'de, D>(document: usize, value: D, kind: Option<&str>) -> Result<Self, ApplyError>
    where
        D: serde::Deserializer<'de>,
    {
        let kind_str = kind.ok_or_else(|| {
            ApplyError::new(document, "kind", "missing; every document needs a kind (Service or HTTPRoute)")
        })?;
        let kind = Kind::parse(kind_str).filter(|k| k.as_str() == kind_str).ok_or_else(|| {
            ApplyError::new(document, "kind", format!("unknown kind {kind_str:?}; weft accepts {}", kind_list()))
        })?;
        let resource = match kind {
            Kind::Service => Resource::Service(typed(document, value)?),
            Kind::HttpRoute => Resource::HttpRoute(typed(document, value)?),
            Kind::GrpcRoute => Resource::GrpcRoute(typed(document, value)?),
            Kind::AuthorizationPolicy => Resource::AuthorizationPolicy(typed(document, value)?),
            Kind::RequestAuthentication => Resource::RequestAuthentication(typed(document, value)?),
            Kind::TrafficPolicy => Resource::TrafficPolicy(typed(document, value)?),
        };
        resource.validate(document)?;
        Ok(resource)
    }

    pub fn from_json(document: usize, value: serde_json::Value) -> Result<Self, ApplyError> {
        let kind = value.get("kind").and_then(|k| k.as_str()).map(str::to_owned);
        Resource::from_value(document, value, kind.as_deref())
    }

    /// Checks that need no knowledge of other resources.
    fn validate(&self, doc: usize) -> Result<(), ApplyError> {
        let (api_version, kind, metadata) = match self {
            Resource::Service(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::HttpRoute(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::GrpcRoute(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::AuthorizationPolicy(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::RequestAuthentication(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::TrafficPolicy(o) => (&o.api_version, o.kind, &o.metadata),
        };
        if api_version != kind.api_version() {
            return Err(ApplyError::new(
                doc,
                "apiVersion",
                format!("{kind} has apiVersion {:?}, not {api_version:?}", kind.api_version()),
            ));
        }
        check_name(doc, "metadata.name", &metadata.name)?;
        match self {
            Resource::Service(o) => {
                match (&o.spec.consistent_hash, o.spec.load_balancer.is_consistent_hash()) {
                    (None, true) => {
                        return Err(ApplyError::new(
                            doc,
                            "spec.consistentHash",
                            format!(
                                "loadBalancer {} needs a key: set consistentHash.header, .cookie or .sourceIP",
                                o.spec.load_balancer.as_str()
                            ),
                        ));
                    }
                    (Some(_), false) => {
                        return Err(ApplyError::new(
                            doc,
                            "spec.consistentHash",
                            format!(
                                "is only used by loadBalancer ring-hash or maglev, not {}",
                                o.spec.load_balancer.as_str()
                            ),
                        ));
                    }
                    (Some(h), true) => {
                        let set = usize::from(h.header.is_some())
                            + usize::from(h.cookie.is_some())
                            + usize::from(h.source_ip);
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
                if o.spec.connect_timeout.is_some_and(|t| t.is_zero()) {
                    return Err(ApplyError::new(doc, "spec.connectTimeout", "must be greater than 0"));
                }
                if let Some(sel) = &o.spec.selector {
                    check_name(doc, "spec.selector.service", &sel.service)?;
                    if sel.service == o.metadata.name {
                        return Err(ApplyError::new(
                            doc,
                            "spec.selector.service",
                            "names this service itself; a selector picks instances of another service (e.g. backend-v2 selects backend's instances with version v2)",
                        ));
                    }
                }
            }
            Resource::HttpRoute(o) => validate_route(doc, &o.spec)?,
            Resource::GrpcRoute(o) => validate_grpc_route(doc, &o.spec)?,
            Resource::AuthorizationPolicy(o) => validate_authz(doc, &o.spec)?,
            Resource::RequestAuthentication(o) => validate_request_authn(doc, &o.spec)?,
            Resource::TrafficPolicy(o) => {
                if o.spec.target_ref.targets_route() {
                    if o.spec.target_ref.group.as_deref().is_some_and(|g| g != GATEWAY_API_GROUP) {
                        return Err(ApplyError::new(
                            doc,
                            "spec.targetRef.group",
                            format!("an HTTPRoute is in group {GATEWAY_API_GROUP}"),
                        ));
                    }
                    // Only what applies per request can be set for one route.
                    let service_wide = [
                        ("connectionPool", o.spec.connection_pool.is_some()),
                        ("outlierDetection", o.spec.outlier_detection.is_some()),
                        ("rateLimit", o.spec.rate_limit.is_some()),
                        ("healthCheck", o.spec.health_check.is_some()),
                    ];
                    if let Some((field, _)) = service_wide.iter().find(|(_, set)| *set) {
                        return Err(ApplyError::new(
                            doc,
                            format!("spec.{field}"),
                            "applies to a whole service: target the Service (a policy for an HTTPRoute takes retry and fault)",
                        ));
                    }
                } else {
                    check_service_ref(
                        doc,
                        "spec.targetRef",
                        o.spec.target_ref.kind.as_deref(),
                        o.spec.target_ref.group.as_deref(),
                    )
                    .map_err(|mut e| {
                        e.reason.push_str(" (or kind HTTPRoute, group gateway.networking.k8s.io)");
                        e
                    })?;
                }
                check_name(doc, "spec.targetRef.name", &o.spec.target_ref.name)?;
                if let Some(r) = &o.spec.retry {
                    validate_retry(doc, r)?;
                }
                if let Some(od) = &o.spec.outlier_detection {
                    validate_outlier(doc, od)?;
                }
                if let Some(f) = &o.spec.fault {
                    validate_fault(doc, f)?;
                }
                if let Some(r) = &o.spec.rate_limit {
                    validate_rate_limit(doc, r)?;
                }
                if let Some(h) = &o.spec.health_check {
                    validate_health_check(doc, h)?;
                }
                if let Some(pool) = &o.spec.connection_pool {
                    if pool.max_pending_requests.is_some() && pool.max_connections_per_instance.is_none() {
                        return Err(ApplyError::new(
                            doc,
                            "spec.connectionPool.maxPendingRequests",
                            "requests wait for a connection only under maxConnectionsPerInstance: set it too",
                        ));
                    }
                    if pool.max_connections_per_instance == Some(0) {
                        return Err(ApplyError::new(
                            doc,
                            "spec.connectionPool.maxConnectionsPerInstance",
                            "must be at least 1",
                        ));
                    }
                    if pool.max_requests_per_connection == Some(0) {
                        return Err(ApplyError::new(
                            doc,
                            "spec.connectionPool.maxRequestsPerConnection",
                            "must be at least 1",
                        ));
                    }
                    for (field, d) in
                        [("idleTimeout", pool.idle_timeout), ("maxConnectionDuration", pool.max_connection_duration)]
                    {
                        if d.is_some_and(|d| d < Duration::from_millis(100)) {
                            return Err(ApplyError::new(
                                doc,
                                format!("spec.connectionPool.{field}"),
                                "must be at least 100ms",
                            ));
                        }
                    }
                }
                if o.spec.connection_pool.as_ref().and_then(|p| p.max_requests) == Some(0) {
                    return Err(ApplyError::new(
                        doc,
                        "spec.connectionPool.maxRequests",
                        "must be at least 1 (0 would refuse every request)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Services this resource refers to, with the field path of each reference. The control
    /// plane rejects a document whose references name no known service.
    pub fn service_refs(&self) -> Vec<(String, &str)> {
        match self {
            Resource::Service(o) => {
                o.spec.selector.iter().map(|s| ("spec.selector.service".to_owned(), s.service.as_str())).collect()
            }
            Resource::AuthorizationPolicy(o) => {
                o.spec.service.as_deref().map(|s| ("spec.service".to_owned(), s)).into_iter().collect()
            }
            Resource::RequestAuthentication(o) => {
                o.spec.service.as_deref().map(|s| ("spec.service".to_owned(), s)).into_iter().collect()
            }
            Resource::TrafficPolicy(o) if o.spec.target_ref.targets_route() => Vec::new(),
            Resource::TrafficPolicy(o) => vec![("spec.targetRef.name".to_owned(), o.spec.target_ref.name.as_str())],
            Resource::GrpcRoute(o) => {
                let parents = o.spec.parent_refs.iter().enumerate();
                let parents = parents.map(|(i, p)| (format!("spec.parentRefs[{i}].name"), p.name.as_str()));
                let backends = o.spec.rules.iter().enumerate().flat_map(|(r, rule)| {
                    rule.backend_refs
                        .iter()
                        .enumerate()
                        .map(move |(b, br)| (format!("spec.rules[{r}].backendRefs[{b}].name"), br.name.as_str()))
                });
                let mirrors = o.spec.rules.iter().enumerate().flat_map(|(r, rule)| {
                    rule.filters.iter().enumerate().filter_map(move |(f, filter)| {
                        let m = filter.request_mirror.as_ref()?;
                        Some((
                            format!("spec.rules[{r}].filters[{f}].requestMirror.backendRef.name"),
                            m.backend_ref.name.as_str(),
                        ))
                    })
                });
                parents.chain(backends).chain(mirrors).collect()
            }
            Resource::HttpRoute(o) => {
                let parents = o.spec.parent_refs.iter().enumerate();
                let parents = parents.map(|(i, p)| (format!("spec.parentRefs[{i}].name"), p.name.as_str()));
                let backends = o.spec.rules.iter().enumerate().flat_map(|(r, rule)| {
                    rule.backend_refs
                        .iter()
                        .enumerate()
                        .map(move |(b, br)| (format!("spec.rules[{r}].backendRefs[{b}].name"), br.name.as_str()))
                });
                let mirrors = o.spec.rules.iter().enumerate().flat_map(|(r, rule)| {
                    rule.filters.iter().enumerate().filter_map(move |(f, filter)| {
                        let m = filter.request_mirror.as_ref()?;
                        Some((
                            format!("spec.rules[{r}].filters[{f}].requestMirror.backendRef.name"),
                            m.backend_ref.name.as_str(),
                        ))
                    })
                });
                parents.chain(backends).chain(mirrors).collect()
            }
        }
    }
}

pub fn key(kind: Kind, name: &str) -> String {
    format!("{kind}/{name}")
}

fn kind_list() -> String {
    Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

fn typed<'de, S: DeserializeOwned, D: serde::Deserializer<'de>>(doc: usize, value: D) -> Result<Object<S>, ApplyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ApplyError::new(doc, path, e.into_inner().to_string())
    })
}

/// Whether `name` is a DNS-1123 label, as Kubernetes requires for names; `Err` says why not.
pub fn valid_name(name: &str) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(
            "is not a valid name: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit",
        )
    }
}

fn check_name(doc: usize, path: &str, name: &str) -> Result<(), ApplyError> {
    valid_name(name).map_err(|why| ApplyError::new(doc, path, format!("{name:?} {why}")))
}

fn validate_authz(doc: usize, spec: &AuthorizationPolicySpec) -> Result<(), ApplyError> {
    if let Some(s) = &spec.service {
        check_name(doc, "spec.service", s)?;
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        for (i, src) in rule.from.iter().enumerate() {
            let at = format!("spec.rules[{r}].from[{i}]");
            if src.services.is_empty()
                && src.identities.is_empty()
                && src.namespaces.is_empty()
                && src.trust_domains.is_empty()
                && src.request_principals.is_empty()
            {
                return Err(ApplyError::new(
                    doc,
                    at,
                    "names no caller: set services, identities, namespaces, trustDomains or requestPrincipals (or leave `from` out to match any caller)",
                ));
            }
            for (j, p) in src.request_principals.iter().enumerate() {
                let ok = p == "*" || p.rsplit_once('/').is_some_and(|(iss, sub)| !iss.is_empty() && !sub.is_empty());
                if !ok {
                    return Err(ApplyError::new(
                        doc,
                        format!("{at}.requestPrincipals[{j}]"),
                        format!("{p:?} is not a request principal: write ISSUER/SUBJECT, ISSUER/* or *"),
                    ));
                }
            }
            for (j, s) in src.services.iter().enumerate() {
                check_name(doc, &format!("{at}.services[{j}]"), s)?;
            }
            for (j, id) in src.identities.iter().enumerate() {
                if !id.starts_with("spiffe://") || id.len() <= "spiffe://".len() {
                    return Err(ApplyError::new(
                        doc,
                        format!("{at}.identities[{j}]"),
                        format!("{id:?} is not a SPIFFE ID (spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE)"),
                    ));
                }
            }
            for (field, values) in [("namespaces", &src.namespaces), ("trustDomains", &src.trust_domains)] {
                for (j, v) in values.iter().enumerate() {
                    if v.is_empty() || v.contains('/') {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.{field}[{j}]"),
                            format!("{v:?} must be a single non-empty name without '/'"),
                        ));
                    }
                }
            }
        }
        for (i, op) in rule.to.iter().enumerate() {
            let at = format!("spec.rules[{r}].to[{i}]");
            for (j, m) in op.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(ApplyError::new(
                        doc,
                        format!("{at}.methods[{j}]"),
                        format!("{m:?} is not an HTTP method (GET, POST, …; upper case)"),
                    ));
                }
            }
            for (j, p) in op.paths.iter().enumerate() {
                if !p.starts_with('/') || p[..p.len() - 1].contains('*') {
                    return Err(ApplyError::new(
                        doc,
                        format!("{at}.paths[{j}]"),
                        format!("{p:?}: a path starts with '/' and may end with '*' (a prefix), nowhere else"),
                    ));
                }
            }
            if op.ports.contains(&0) {
                return Err(ApplyError::new(doc, format!("{at}.ports"), "port 0 is not a port"));
            }
        }
        for (i, c) in rule.when.iter().enumerate() {
            let at = format!("spec.rules[{r}].when[{i}]");
            if c.header.is_empty() == c.claim.is_empty() || c.values.is_empty() {
                return Err(ApplyError::new(
                    doc,
                    at,
                    "needs exactly one of `header` and `claim`, and at least one value",
                ));
            }
            if !c.claim.is_empty() && c.claim.split('.').any(str::is_empty) {
                return Err(ApplyError::new(
                    doc,
                    format!("{at}.claim"),
                    format!("{:?} is not a claim path (names separated by '.')", c.claim),
                ));
            }
        }
    }
    Ok(())
}

fn validate_health_check(doc: usize, h: &ActiveHealthCheck) -> Result<(), ApplyError> {
    let at = |f: &str| format!("spec.healthCheck.{f}");
    match (&h.http, &h.tcp) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ApplyError::new(doc, "spec.healthCheck", "set exactly one of http: {path} and tcp: {}"));
        }
        (Some(http), None) if !http.path.starts_with('/') || http.path.contains(char::is_whitespace) => {
            return Err(ApplyError::new(doc, at("http.path"), "must be a path starting with '/', without spaces"));
        }
        _ => {}
    }
    let interval = h.interval.unwrap_or(DEFAULT_HEALTH_CHECK_INTERVAL);
    let timeout = h.timeout.unwrap_or(DEFAULT_HEALTH_CHECK_TIMEOUT);
    if interval < Duration::from_millis(100) {
        return Err(ApplyError::new(doc, at("interval"), "must be at least 100ms"));
    }
    if timeout.is_zero() || timeout > interval {
        return Err(ApplyError::new(
            doc,
            at("timeout"),
            format!("must be above 0 and at most the interval ({interval:?})"),
        ));
    }
    for (field, v) in [("unhealthyThreshold", h.unhealthy_threshold), ("healthyThreshold", h.healthy_threshold)] {
        if v == Some(0) {
            return Err(ApplyError::new(doc, at(field), "must be at least 1"));
        }
    }
    Ok(())
}

fn validate_rate_limit(doc: usize, r: &RateLimitPolicy) -> Result<(), ApplyError> {
    if r.service.is_none() && r.per_caller.is_none() {
        return Err(ApplyError::new(doc, "spec.rateLimit", "sets neither service nor perCaller"));
    }
    for (field, b) in [("service", &r.service), ("perCaller", &r.per_caller)] {
        let Some(b) = b else { continue };
        let at = |f: &str| format!("spec.rateLimit.{field}.{f}");
        if b.requests == 0 {
            return Err(ApplyError::new(doc, at("requests"), "must be at least 1"));
        }
        let interval = b.interval.unwrap_or(Duration::from_secs(1));
        if interval < Duration::from_millis(10) {
            return Err(ApplyError::new(doc, at("interval"), "must be at least 10ms"));
        }
        if interval.as_nanos() / u128::from(b.requests) == 0 {
            return Err(ApplyError::new(doc, at("requests"), "more than one request per nanosecond"));
        }
        if b.burst == Some(0) {
            return Err(ApplyError::new(doc, at("burst"), "must be at least 1"));
        }
    }
    Ok(())
}

fn validate_fault(doc: usize, f: &FaultInjection) -> Result<(), ApplyError> {
    let at = |field: &str| format!("spec.fault.{field}");
    let percentage = |field: &str, p: Option<f64>| match p {
        Some(p) if !(0.0..=100.0).contains(&p) => {
            Err(ApplyError::new(doc, at(field), format!("{p} is not a percentage (0 to 100)")))
        }
        _ => Ok(()),
    };
    if f.delay.is_none() && f.abort.is_none() {
        return Err(ApplyError::new(doc, "spec.fault", "sets neither delay nor abort"));
    }
    if let Some(d) = &f.delay {
        if d.fixed_delay.is_zero() {
            return Err(ApplyError::new(doc, at("delay.fixedDelay"), "must be greater than 0"));
        }
        percentage("delay.percentage", d.percentage)?;
    }
    if let Some(a) = &f.abort {
        match (a.http_status, a.grpc_status) {
            (None, None) => {
                return Err(ApplyError::new(doc, at("abort"), "set httpStatus (200-599) or grpcStatus (1-16)"));
            }
            // Envoy's abort carries one status, which every request it aborts gets.
            (Some(_), Some(_)) => {
                return Err(ApplyError::new(
                    doc,
                    at("abort"),
                    "set httpStatus or grpcStatus, not both: an abort answers with one status (HTTP requests get a grpcStatus abort as 503, gRPC requests an httpStatus abort as its gRPC code)",
                ));
            }
            (Some(s), _) if !(200..=599).contains(&s) => {
                return Err(ApplyError::new(
                    doc,
                    at("abort.httpStatus"),
                    format!("{s} is not an HTTP status (200-599)"),
                ));
            }
            (_, Some(g)) if !(1..=16).contains(&g) => {
                return Err(ApplyError::new(
                    doc,
                    at("abort.grpcStatus"),
                    format!("{g} is not a gRPC error status (1-16)"),
                ));
            }
            _ => {}
        }
        percentage("abort.percentage", a.percentage)?;
    }
    Ok(())
}

fn validate_outlier(doc: usize, od: &OutlierDetection) -> Result<(), ApplyError> {
    let at = |f: &str| format!("spec.outlierDetection.{f}");
    if od.consecutive_5xx == Some(0) && od.consecutive_gateway_errors.is_none_or(|n| n == 0) {
        return Err(ApplyError::new(
            doc,
            at("consecutive5xx"),
            "is 0 and consecutiveGatewayErrors is not set: nothing would eject an instance (remove outlierDetection instead)",
        ));
    }
    if od.consecutive_gateway_errors == Some(0) {
        return Err(ApplyError::new(
            doc,
            at("consecutiveGatewayErrors"),
            "must be at least 1 (leave it out to turn it off)",
        ));
    }
    for (field, p) in [("maxEjectionPercent", od.max_ejection_percent), ("panicThreshold", od.panic_threshold)] {
        if p.is_some_and(|p| p > 100) {
            return Err(ApplyError::new(doc, at(field), format!("{} is not a percentage (0 to 100)", p.unwrap_or(0))));
        }
    }
    let base = od.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION_TIME);
    if base < Duration::from_millis(10) {
        return Err(ApplyError::new(doc, at("baseEjectionTime"), "must be at least 10ms"));
    }
    let max = od.max_ejection_time.unwrap_or(DEFAULT_MAX_EJECTION_TIME.max(base));
    if max < base {
        return Err(ApplyError::new(
            doc,
            at("maxEjectionTime"),
            format!("{max:?} is shorter than baseEjectionTime ({base:?})"),
        ));
    }
    Ok(())
}

fn validate_retry(doc: usize, r: &RetryPolicy) -> Result<(), ApplyError> {
    if r.max_body_bytes.is_some_and(|b| b > MAX_BODY_BYTES_LIMIT) {
        return Err(ApplyError::new(
            doc,
            "spec.retry.maxBodyBytes",
            format!("at most {MAX_BODY_BYTES_LIMIT} (16 MiB): each request in flight may hold this much"),
        ));
    }
    if r.attempts.is_some_and(|a| a > 10) {
        return Err(ApplyError::new(doc, "spec.retry.attempts", "at most 10 retries"));
    }
    if r.per_try_timeout.is_some_and(|t| t.is_zero()) {
        return Err(ApplyError::new(doc, "spec.retry.perTryTimeout", "must be greater than 0"));
    }
    for (i, on) in r.retry_on.iter().enumerate() {
        if !RETRY_ON.contains(&on.as_str()) {
            return Err(ApplyError::new(
                doc,
                format!("spec.retry.retryOn[{i}]"),
                format!("{on:?} is not a retry condition; use {}", RETRY_ON.join(", ")),
            ));
        }
    }
    if let Some(b) = &r.backoff {
        let base = b.base_interval.unwrap_or(Duration::from_millis(25));
        if base.is_zero() {
            return Err(ApplyError::new(doc, "spec.retry.backoff.baseInterval", "must be greater than 0"));
        }
        if b.max_interval.is_some_and(|m| m < base) {
            return Err(ApplyError::new(doc, "spec.retry.backoff.maxInterval", "must not be less than baseInterval"));
        }
    }
    if let Some(b) = &r.budget {
        let at = |f: &str| format!("spec.retry.budget.{f}");
        match (b.percent, b.ratio) {
            (Some(_), Some(_)) => {
                return Err(ApplyError::new(
                    doc,
                    "spec.retry.budget",
                    "set percent (retries in flight, as Envoy) or ratio (retries per request over a window, as Linkerd), not both",
                ));
            }
            (None, None) => {
                return Err(ApplyError::new(
                    doc,
                    "spec.retry.budget",
                    "sets neither percent (retries in flight, as Envoy) nor ratio (retries per request over a window, as Linkerd): set one",
                ));
            }
            (Some(p), None) => {
                if !(p > 0.0 && p <= 100.0) {
                    return Err(ApplyError::new(doc, at("percent"), "must be more than 0 and at most 100"));
                }
                if b.min_retries_per_second.is_some() || b.ttl.is_some() {
                    return Err(ApplyError::new(doc, at("percent"), "minRetriesPerSecond and ttl go with ratio"));
                }
            }
            (None, Some(ratio)) => {
                if !(ratio > 0.0 && ratio <= 10.0) {
                    return Err(ApplyError::new(doc, at("ratio"), "must be more than 0 and at most 10"));
                }
                if b.min_retry_concurrency.is_some() {
                    return Err(ApplyError::new(doc, at("minRetryConcurrency"), "goes with percent, not ratio"));
                }
                if b.ttl.is_some_and(|t| t < Duration::from_secs(1) || t > Duration::from_secs(60)) {
                    return Err(ApplyError::new(doc, at("ttl"), "must be between 1s and 60s"));
                }
            }
        }
    }
    Ok(())
}

fn validate_request_authn(doc: usize, spec: &RequestAuthenticationSpec) -> Result<(), ApplyError> {
    if let Some(s) = &spec.service {
        check_name(doc, "spec.service", s)?;
    }
    if spec.issuers.is_empty() {
        return Err(ApplyError::new(doc, "spec.issuers", "needs at least one issuer"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, iss) in spec.issuers.iter().enumerate() {
        let at = format!("spec.issuers[{i}]");
        if iss.issuer.is_empty() {
            return Err(ApplyError::new(doc, format!("{at}.issuer"), "must not be empty (the tokens' `iss` claim)"));
        }
        if !seen.insert(&iss.issuer) {
            return Err(ApplyError::new(doc, format!("{at}.issuer"), format!("{:?} is listed twice", iss.issuer)));
        }
        match iss.jwks_source() {
            None => {
                return Err(ApplyError::new(doc, at, "set exactly one of jwksUri, jwksFile and jwks"));
            }
            Some(JwksSource::Uri(u)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return Err(ApplyError::new(
                    doc,
                    format!("{at}.jwksUri"),
                    format!("{u:?} is not an http:// or https:// URL"),
                ));
            }
            Some(_) => {}
        }
        if iss.refresh_interval.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err(ApplyError::new(doc, format!("{at}.refreshInterval"), "must be at least 1s"));
        }
        if iss.clock_skew.is_some_and(|d| d > Duration::from_secs(3600)) {
            return Err(ApplyError::new(doc, format!("{at}.clockSkew"), "must be at most 1h"));
        }
        for (j, h) in iss.from_headers.iter().enumerate() {
            if http_header_name_invalid(&h.name) {
                return Err(ApplyError::new(
                    doc,
                    format!("{at}.fromHeaders[{j}].name"),
                    format!("{:?} is not a valid HTTP header name", h.name),
                ));
            }
        }
    }
    Ok(())
}

/// A regular expression as routes use it: the whole value must match (RE2 syntax, which the
/// `regex` crate implements with the same linear-time guarantee).
pub fn full_match_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("{pattern:?} is not a valid regular expression: {e}"))
}

fn valid_hostname(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
}

/// A path replacement of a URLRewrite or RequestRedirect filter at `at` in `rule`.
fn check_path_modifier(doc: usize, at: &str, p: &PathModifier, rule: &HttpRouteRule) -> Result<(), ApplyError> {
    let (value, field) = match p.kind {
        PathModifierType::ReplaceFullPath => (&p.replace_full_path, "replaceFullPath"),
        PathModifierType::ReplacePrefixMatch => (&p.replace_prefix_match, "replacePrefixMatch"),
    };
    if !value.as_deref().is_some_and(|v| v.starts_with('/')) {
        return Err(ApplyError::new(
            doc,
            format!("{at}.{field}"),
            "needs a path starting with '/' (set the field named by path.type)",
        ));
    }
    let prefix_matches = !rule.matches.is_empty()
        && rule.matches.iter().all(|m| m.path.as_ref().is_none_or(|p| p.kind == PathMatchType::PathPrefix));
    if p.kind == PathModifierType::ReplacePrefixMatch && !prefix_matches {
        return Err(ApplyError::new(
            doc,
            at.to_owned(),
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
        ));
    }
    Ok(())
}

fn validate_grpc_route(doc: usize, spec: &GrpcRouteSpec) -> Result<(), ApplyError> {
    let name_ok = |s: &str, dots: bool| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.'))
    };
    for (r, rule) in spec.rules.iter().enumerate() {
        for (i, m) in rule.matches.iter().enumerate() {
            let Some(mm) = &m.method else { continue };
            let at = format!("spec.rules[{r}].matches[{i}].method");
            if mm.service.is_none() && mm.method.is_none() {
                return Err(ApplyError::new(doc, at, "set service, method or both"));
            }
            for (field, value, dots) in [("service", &mm.service, true), ("method", &mm.method, false)] {
                let Some(v) = value else { continue };
                match mm.kind {
                    HeaderMatchType::Exact if !name_ok(v, dots) => {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.{field}"),
                            format!(
                                "{v:?} is not a gRPC {field} name (letters, digits and _{})",
                                if dots { ", dots between parts" } else { "" }
                            ),
                        ));
                    }
                    HeaderMatchType::RegularExpression => {
                        if v.contains('/') {
                            return Err(ApplyError::new(doc, format!("{at}.{field}"), "must not match '/'"));
                        }
                        full_match_regex(v).map_err(|e| ApplyError::new(doc, format!("{at}.{field}"), e))?;
                    }
                    _ => {}
                }
            }
        }
        for (f, filter) in rule.filters.iter().enumerate() {
            if !matches!(
                filter.kind,
                HttpRouteFilterType::RequestHeaderModifier
                    | HttpRouteFilterType::ResponseHeaderModifier
                    | HttpRouteFilterType::RequestMirror
            ) {
                return Err(ApplyError::new(
                    doc,
                    format!("spec.rules[{r}].filters[{f}].type"),
                    format!(
                        "{:?} is not a GRPCRoute filter weft supports; use RequestHeaderModifier, ResponseHeaderModifier or RequestMirror",
                        filter.kind
                    ),
                ));
            }
        }
    }
    // The rest is checked as the HTTPRoute it becomes (the field paths are the same).
    validate_route(doc, &spec.as_http())
}

fn validate_route(doc: usize, spec: &HttpRouteSpec) -> Result<(), ApplyError> {
    if spec.parent_refs.is_empty() {
        return Err(ApplyError::new(doc, "spec.parentRefs", "needs at least one Service the route attaches to"));
    }
    for (i, h) in spec.hostnames.iter().enumerate() {
        if !valid_hostname(h) {
            return Err(ApplyError::new(
                doc,
                format!("spec.hostnames[{i}]"),
                format!(
                    "{h:?} is not a hostname: lowercase DNS labels, optionally starting with \"*.\" (no port, no IP address)"
                ),
            ));
        }
    }
    for (i, p) in spec.parent_refs.iter().enumerate() {
        check_service_ref(doc, &format!("spec.parentRefs[{i}]"), p.kind.as_deref(), p.group.as_deref())?;
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let redirects = rule.filters.iter().any(|f| f.kind == HttpRouteFilterType::RequestRedirect);
        if redirects {
            if !rule.backend_refs.is_empty() {
                return Err(ApplyError::new(
                    doc,
                    format!("spec.rules[{r}].backendRefs"),
                    "a rule with a RequestRedirect sends nothing to backends: remove backendRefs",
                ));
            }
            if let Some((f, other)) =
                rule.filters.iter().enumerate().find(|(_, f)| f.kind != HttpRouteFilterType::RequestRedirect)
            {
                return Err(ApplyError::new(
                    doc,
                    format!("spec.rules[{r}].filters[{f}]"),
                    format!("{:?} cannot be combined with RequestRedirect (nothing is forwarded)", other.kind),
                ));
            }
            if rule.timeouts.is_some() {
                return Err(ApplyError::new(
                    doc,
                    format!("spec.rules[{r}].timeouts"),
                    "a rule with a RequestRedirect forwards nothing to time out",
                ));
            }
            if rule.filters.iter().filter(|f| f.kind == HttpRouteFilterType::RequestRedirect).count() > 1 {
                return Err(ApplyError::new(doc, format!("spec.rules[{r}].filters"), "at most one RequestRedirect"));
            }
        } else if rule.backend_refs.is_empty() {
            return Err(ApplyError::new(doc, format!("spec.rules[{r}].backendRefs"), "needs at least one backend"));
        }
        if !redirects && rule.backend_refs.iter().all(|b| b.weight == 0) {
            return Err(ApplyError::new(
                doc,
                format!("spec.rules[{r}].backendRefs"),
                "all weights are 0, so no backend could receive traffic",
            ));
        }
        for (b, br) in rule.backend_refs.iter().enumerate() {
            check_service_ref(
                doc,
                &format!("spec.rules[{r}].backendRefs[{b}]"),
                br.kind.as_deref(),
                br.group.as_deref(),
            )?;
        }
        for (m, mat) in rule.matches.iter().enumerate() {
            let at = format!("spec.rules[{r}].matches[{m}]");
            if let Some(p) = &mat.path {
                let path = format!("{at}.path.value");
                match p.kind {
                    PathMatchType::RegularExpression => {
                        full_match_regex(&p.value).map_err(|e| ApplyError::new(doc, &path, e))?;
                    }
                    _ if !p.value.starts_with('/') => {
                        return Err(ApplyError::new(doc, path, format!("{:?} must start with '/'", p.value)));
                    }
                    _ => {}
                }
            }
            for (field, list) in [("headers", &mat.headers), ("queryParams", &mat.query_params)] {
                for (h, hm) in list.iter().enumerate() {
                    if hm.name.is_empty() || (field == "headers" && http_header_name_invalid(&hm.name)) {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.{field}[{h}].name"),
                            format!("{:?} is not a valid name", hm.name),
                        ));
                    }
                    if hm.kind == HeaderMatchType::RegularExpression {
                        full_match_regex(&hm.value)
                            .map_err(|e| ApplyError::new(doc, format!("{at}.{field}[{h}].value"), e))?;
                    }
                }
            }
        }
        if let Some(t) = &rule.timeouts
            && let (Some(req), Some(backend)) = (t.request, t.backend_request)
            && backend > req
            && !req.is_zero()
        {
            return Err(ApplyError::new(
                doc,
                format!("spec.rules[{r}].timeouts.backendRequest"),
                "must not be longer than timeouts.request",
            ));
        }
        let mut rewrites = 0;
        for (f, filter) in rule.filters.iter().enumerate() {
            let at = format!("spec.rules[{r}].filters[{f}]");
            let set = [
                (HttpRouteFilterType::RequestHeaderModifier, filter.request_header_modifier.is_some()),
                (HttpRouteFilterType::ResponseHeaderModifier, filter.response_header_modifier.is_some()),
                (HttpRouteFilterType::UrlRewrite, filter.url_rewrite.is_some()),
                (HttpRouteFilterType::RequestRedirect, filter.request_redirect.is_some()),
                (HttpRouteFilterType::RequestMirror, filter.request_mirror.is_some()),
                (HttpRouteFilterType::ExtensionRef, filter.extension_ref.is_some()),
            ];
            if set.iter().any(|(k, on)| *on != (*k == filter.kind)) {
                return Err(ApplyError::new(
                    doc,
                    at,
                    "set exactly the field of the filter's type (e.g. type: RequestHeaderModifier with requestHeaderModifier)",
                ));
            }
            match filter.kind {
                HttpRouteFilterType::RequestHeaderModifier | HttpRouteFilterType::ResponseHeaderModifier => {
                    let m = filter.request_header_modifier.as_ref().or(filter.response_header_modifier.as_ref());
                    let m = m.expect("checked above");
                    let names = m.set.iter().chain(&m.add).map(|h| &h.name).chain(&m.remove);
                    for name in names {
                        if http_header_name_invalid(name) {
                            return Err(ApplyError::new(doc, at, format!("{name:?} is not a valid HTTP header name")));
                        }
                    }
                    if let Some(h) = m.set.iter().chain(&m.add).find(|h| h.value.contains(['\r', '\n'])) {
                        return Err(ApplyError::new(
                            doc,
                            at,
                            format!("the value of {:?} contains a line break", h.name),
                        ));
                    }
                }
                HttpRouteFilterType::UrlRewrite => {
                    rewrites += 1;
                    let u = filter.url_rewrite.as_ref().expect("checked above");
                    if u.hostname.as_deref().is_some_and(|h| !valid_hostname(h) || h.starts_with("*.")) {
                        return Err(ApplyError::new(doc, format!("{at}.urlRewrite.hostname"), "is not a hostname"));
                    }
                    if let Some(p) = &u.path {
                        check_path_modifier(doc, &format!("{at}.urlRewrite.path"), p, rule)?;
                    }
                }
                HttpRouteFilterType::RequestRedirect => {
                    let rd = filter.request_redirect.as_ref().expect("checked above");
                    let at = format!("{at}.requestRedirect");
                    if rd.scheme.as_deref().is_some_and(|s| s != "http" && s != "https") {
                        return Err(ApplyError::new(doc, format!("{at}.scheme"), "must be http or https"));
                    }
                    if rd.hostname.as_deref().is_some_and(|h| !valid_hostname(h) || h.starts_with("*.")) {
                        return Err(ApplyError::new(doc, format!("{at}.hostname"), "is not a hostname"));
                    }
                    if rd.port == Some(0) {
                        return Err(ApplyError::new(doc, format!("{at}.port"), "must be 1-65535"));
                    }
                    if rd.status_code.is_some_and(|c| ![301, 302, 303, 307, 308].contains(&c)) {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.statusCode"),
                            "must be 301, 302, 303, 307 or 308",
                        ));
                    }
                    if let Some(p) = &rd.path {
                        check_path_modifier(doc, &format!("{at}.path"), p, rule)?;
                    }
                }
                HttpRouteFilterType::RequestMirror => {
                    let m = filter.request_mirror.as_ref().expect("checked above");
                    check_service_ref(
                        doc,
                        &format!("{at}.requestMirror.backendRef"),
                        m.backend_ref.kind.as_deref(),
                        m.backend_ref.group.as_deref(),
                    )?;
                    check_name(doc, &format!("{at}.requestMirror.backendRef.name"), &m.backend_ref.name)?;
                    if m.percent.is_some() && m.fraction.is_some() {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.requestMirror"),
                            "set percent or fraction, not both",
                        ));
                    }
                    if m.percent.is_some_and(|p| p > 100) {
                        return Err(ApplyError::new(doc, format!("{at}.requestMirror.percent"), "at most 100"));
                    }
                    if let Some(f) = &m.fraction
                        && (f.denominator == 0 || f.numerator > f.denominator)
                    {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.requestMirror.fraction"),
                            "needs 0 <= numerator <= denominator and a denominator above 0",
                        ));
                    }
                }
                other => {
                    return Err(ApplyError::new(
                        doc,
                        format!("{at}.type"),
                        format!(
                            "{other:?} is not supported yet; weft supports RequestHeaderModifier, ResponseHeaderModifier, URLRewrite and RequestMirror"
                        ),
                    ));
                }
            }
        }
        if rewrites > 1 {
            return Err(ApplyError::new(doc, format!("spec.rules[{r}].filters"), "at most one URLRewrite per rule"));
        }
    }
    Ok(())
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_service_ref(doc: usize, path: &str, kind: Option<&str>, group: Option<&str>) -> Result<(), ApplyError> {
    if kind.is_some_and(|k| k != "Service") {
        return Err(ApplyError::new(doc, format!("{path}.kind"), "only kind Service is supported"));
    }
    if group.is_some_and(|g| !g.is_empty() && g != "core") {
        return Err(ApplyError::new(doc, format!("{path}.group"), "only the core group (\"\") is supported"));
    }
    Ok(())
}

/// Parses every document of a YAML file. Nothing is partially accepted: any error fails the file.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ApplyError> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(doc).map_err(|e| {
            let at = e.location().map(|l| format!(" (line {}, column {})", l.line(), l.column())).unwrap_or_default();
            ApplyError::new(i, "", format!("invalid YAML{at}: {e}"))
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        if !value.is_mapping() {
            return Err(ApplyError::new(
                i,
                "",
                "a document must be a mapping with apiVersion, kind, metadata and spec",
            ));
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).map(str::to_owned);
        out.push(Resource::from_value(i, value, kind.as_deref())?);
    }
    if out.is_empty() {
        return Err(ApplyError::new(0, "", "the file holds no documents"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ApplyError {
        parse_documents(text).unwrap_err()
    }

    #[test]
    fn parses_service_and_route() {
        let text = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: backend}
spec: {protocol: http, loadBalancer: round-robin, connectTimeout: 250ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{name: backend}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: backend-v1, weight: 90}, {name: backend-v2, weight: 10}]
"#;
        let docs = parse_documents(text).unwrap();
        assert_eq!(docs.len(), 2);
        let Resource::Service(s) = &docs[0] else { panic!("not a service") };
        assert_eq!(s.spec.load_balancer, LoadBalancer::RoundRobin);
        assert_eq!(s.spec.connect_timeout, Some(Duration::from_millis(250)));
        assert_eq!(
            docs[1].service_refs().iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            vec!["backend", "backend-v1", "backend-v2"]
        );
        // JSON round trip (the CLI sends JSON to the control plane).
        let json = serde_json::to_value(&docs[1]).unwrap();
        assert_eq!(Resource::from_json(0, json).unwrap(), docs[1]);
    }

    #[test]
    fn grpc_method_matches_become_paths() {
        let m = |kind, service: Option<&str>, method: Option<&str>| {
            grpc_path(&GrpcMethodMatch { kind, service: service.map(str::to_owned), method: method.map(str::to_owned) })
        };
        let exact = m(HeaderMatchType::Exact, Some("pkg.Svc"), Some("Get"));
        assert_eq!((exact.kind, exact.value.as_str()), (PathMatchType::Exact, "/pkg.Svc/Get"));
        let service = m(HeaderMatchType::Exact, Some("pkg.Svc"), None);
        assert_eq!((service.kind, service.value.as_str()), (PathMatchType::PathPrefix, "/pkg.Svc"));
        let re = full_match_regex(&m(HeaderMatchType::RegularExpression, Some("a|b"), Some("Get")).value).unwrap();
        assert!(re.is_match("/a/Get") && re.is_match("/b/Get"));
        assert!(!re.is_match("/a") && !re.is_match("/c/Get"), "an alternation stays within its part");
        let method = full_match_regex(&m(HeaderMatchType::Exact, None, Some("Get")).value).unwrap();
        assert!(method.is_match("/any.Svc/Get") && !method.is_match("/any.Svc/GetAll"));
    }

    #[test]
    fn traffic_policy_values_are_checked() {
        let policy = |spec: &str| {
            err(&format!(
                "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: backend}}\n  {spec}\n"
            ))
        };
        let e = policy("outlierDetection: {consecutive5xx: 0}");
        assert_eq!(e.path, "spec.outlierDetection.consecutive5xx");
        let e = policy("outlierDetection: {maxEjectionPercent: 120}");
        assert_eq!(e.path, "spec.outlierDetection.maxEjectionPercent");
        let e = policy("outlierDetection: {baseEjectionTime: 1m, maxEjectionTime: 30s}");
        assert_eq!(e.path, "spec.outlierDetection.maxEjectionTime");
        assert!(e.reason.contains("shorter than baseEjectionTime"), "{e}");
        let e = policy("outlierDetection: {consecutiveGatewayErrors: 0}");
        assert_eq!(e.path, "spec.outlierDetection.consecutiveGatewayErrors");
        let e = policy("retry: {retryOn: [sometimes]}");
        assert_eq!(e.path, "spec.retry.retryOn[0]");
        let ok = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  targetRef: {name: backend}\n  outlierDetection: {consecutive5xx: 0, consecutiveGatewayErrors: 3}\n";
        assert!(parse_documents(ok).is_ok());
    }

    #[test]
    fn rejects_with_path_and_reason() {
        let e = err("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {protcol: http}\n");
        assert_eq!(e.path, "spec.protcol");
        assert!(e.reason.contains("unknown field `protcol`"), "{e}");

        let e = err("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {connectTimeout: [1]}\n");
        assert_eq!(e.path, "spec.connectTimeout");

        let e = err("apiVersion: weft.dev/v1alpha1\nkind: Gadget\nmetadata: {name: a}\n");
        assert_eq!(e.path, "kind");
        assert!(e.reason.contains("unknown kind \"Gadget\""), "{e}");

        let e = err("kind: Service\nmetadata: {name: a\n");
        assert!(e.reason.starts_with("invalid YAML (line"), "{e}");

        let e = err(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: a}]\n  rules: [{backendRefs: [{name: b, weight: x}]}]\n",
        );
        assert_eq!(e.path, "spec.rules[0].backendRefs[0].weight");

        let e = err("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: Bad_Name}\nspec: {}\n");
        assert_eq!(e.path, "metadata.name");

        let e =
            err("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {selector: {service: a}}\n");
        assert_eq!(e.path, "spec.selector.service");
        let ok = parse_documents(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: b-v2}\nspec: {selector: {service: b, labels: {version: v2}}}\n",
        )
        .unwrap();
        assert_eq!(ok[0].service_refs(), vec![("spec.selector.service".to_owned(), "b")]);
    }

    #[test]
    fn request_authentication_is_checked_field_by_field() {
        let doc = |spec: &str| {
            format!("apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: j}}\nspec: {spec}\n")
        };
        let ok =
            parse_documents(&doc("{issuers: [{issuer: a, jwksUri: \"https://a/jwks\", clockSkew: 10s}]}")).unwrap();
        let Resource::RequestAuthentication(r) = &ok[0] else { panic!("not a RequestAuthentication") };
        assert_eq!(r.spec.issuers[0].jwks_source(), Some(JwksSource::Uri("https://a/jwks".into())));
        for (spec, path, why) in [
            ("{issuers: []}", "spec.issuers", "at least one"),
            ("{issuers: [{issuer: a}]}", "spec.issuers[0]", "exactly one of jwksUri"),
            ("{issuers: [{issuer: a, jwksUri: x, jwksFile: y}]}", "spec.issuers[0]", "exactly one"),
            ("{issuers: [{issuer: a, jwksUri: \"ftp://x\"}]}", "spec.issuers[0].jwksUri", "not an http"),
            ("{issuers: [{issuer: a, jwksFile: f}, {issuer: a, jwksFile: g}]}", "spec.issuers[1].issuer", "twice"),
            (
                "{issuers: [{issuer: a, jwksFile: f, refreshInterval: 10ms}]}",
                "spec.issuers[0].refreshInterval",
                "at least 1s",
            ),
        ] {
            let e = err(&doc(spec));
            assert_eq!(e.path, path, "{spec}: {e}");
            assert!(e.reason.contains(why), "{spec}: {e}");
        }
        let policy = |rule: &str| {
            format!(
                "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n  rules: [{rule}]\n"
            )
        };
        let e = err(&policy("{from: [{requestPrincipals: [alice]}]}"));
        assert_eq!(e.path, "spec.rules[0].from[0].requestPrincipals[0]");
        let e = err(&policy("{when: [{header: x, claim: y, values: [z]}]}"));
        assert!(e.reason.contains("exactly one of `header` and `claim`"), "{e}");
        assert!(
            parse_documents(&policy(
                "{from: [{requestPrincipals: [\"https://i/*\"]}], when: [{claim: realm.roles, values: [a]}]}"
            ))
            .is_ok()
        );
    }
}
