//! Errors the proxy answers for itself. Each maps to a status code and a reason that the
//! response carries in the `x-weft-error` header, so a client can tell the proxy's own
//! answers from the application's.
use http::HeaderName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Header names as `HeaderName`s, not strings: a lookup by string parses the name first, and
/// the inbound stack looks both up in every response.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-weft-error");
/// On a `denied` response: the authorization policy that refused the request.
pub const POLICY_HEADER: HeaderName = HeaderName::from_static("x-weft-policy");

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("invalid request path: {0}")]
    InvalidPath(#[from] crate::path::Reject),
    #[error("authorization policy {policy:?} does not allow this request")]
    Denied { policy: Arc<str> },
    #[error("JWT authentication failed: {0}")]
    Unauthenticated(#[from] crate::jwt::JwtError),
    #[error(
        "service {cluster:?} already has {limit} requests in flight from this sidecar (its TrafficPolicy's connectionPool.maxRequests); try again later"
    )]
    Overflow { cluster: Arc<str>, limit: u32 },
    #[error(
        "{limit} requests already wait for a connection to this service (its TrafficPolicy's connectionPool.maxPendingRequests; {addr} has all the connections maxConnectionsPerInstance allows); try again later"
    )]
    PendingOverflow { addr: SocketAddr, limit: u32 },
    #[error("cluster {0:?} is not configured (yet)")]
    UnknownCluster(String),
    #[error(
        "route {route} sends to service {service:?}, which does not exist (yet): an unresolved backendRef (see weft get httproutes)"
    )]
    InvalidBackend { route: Arc<str>, service: Arc<str> },
    #[error("service {0:?} has no healthy endpoints")]
    NoEndpoints(String),
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error(
        "mutual TLS with {addr} failed: {source} (does the upstream sidecar have a certificate from this mesh's CA for the service?)"
    )]
    UpstreamTls { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
    #[error("upstream {addr} reset or closed the connection: {source}")]
    UpstreamReset { addr: SocketAddr, source: hyper::Error },
    #[error("route {route} timed out after {timeout:?} without a response from the upstream")]
    RouteTimeout { route: Arc<str>, timeout: Duration },
    /// Not a failure: the route answers with a redirect (`Location`, no `x-weft-error`).
    #[error("redirected to {location}")]
    Redirect { location: String, status: u16 },
    #[error("rate limit of this service reached (its TrafficPolicy's rateLimit); retry after {:?}", .0.retry_after)]
    RateLimited(Limited),
    #[error("fault injected by the TrafficPolicy of route {route}")]
    FaultAbort { route: Arc<str>, status: http::StatusCode, grpc: Option<u8> },
    #[error("bad request: {0}")]
    BadRequest(#[from] crate::http::head::BadRequest),
    /// The client's request body broke off or was malformed (e.g. bad chunked framing) while
    /// it was being forwarded: the client's fault, not the upstream's.
    #[error("the request body could not be read: {source}")]
    BadRequestBody { source: hyper::Error },
    #[error(
        "upstream {addr} sent a response weft cannot forward: {source} (an HTTP/1.1 response head may be at most 16 KiB)"
    )]
    UpstreamBadResponse { addr: SocketAddr, source: hyper::Error },
}

/// A refused request: when the caller may try again.
#[derive(Debug)]
pub struct Limited {
    pub retry_after: Duration,
    pub grpc_resource_exhausted: bool,
}

impl ProxyError {
    /// Short machine-readable reason for the `x-weft-error` header and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no-route",
            ProxyError::InvalidPath(_) => "invalid-path",
            ProxyError::Denied { .. } => "denied",
            ProxyError::Unauthenticated(e) => e.reason(),
            ProxyError::UnknownCluster(_) => "unknown-cluster",
            ProxyError::InvalidBackend { .. } => "invalid-backend",
            ProxyError::Overflow { .. } | ProxyError::PendingOverflow { .. } => "overflow",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::Connect { .. } => "connect-failed",
            ProxyError::ConnectTimeout { .. } => "connect-timeout",
            ProxyError::UpstreamTls { .. } => "upstream-tls-failed",
            ProxyError::Handshake { .. } => "upstream-handshake-failed",
            ProxyError::UpstreamReset { .. } => "upstream-reset",
            ProxyError::UpstreamBadResponse { .. } => "upstream-bad-response",
            ProxyError::RouteTimeout { .. } => "route-timeout",
            ProxyError::FaultAbort { .. } => "fault-injected",
            ProxyError::RateLimited(_) => "rate-limited",
            ProxyError::Redirect { .. } => "redirect",
            ProxyError::BadRequest(_) | ProxyError::BadRequestBody { .. } => "bad-request",
        }
    }

    pub fn status(&self) -> http::StatusCode {
        match self {
            ProxyError::NoRoute => http::StatusCode::NOT_FOUND,
            ProxyError::InvalidPath(_) => http::StatusCode::BAD_REQUEST,
            ProxyError::FaultAbort { status, .. } => *status,
            ProxyError::RateLimited(_) => http::StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Redirect { status, .. } => {
                http::StatusCode::from_u16(*status).unwrap_or(http::StatusCode::FOUND)
            }
            ProxyError::Denied { .. } => http::StatusCode::FORBIDDEN,
            // Gateway API: requests for an invalid backendRef get 500.
            ProxyError::InvalidBackend { .. } => http::StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Unauthenticated(_) => http::StatusCode::UNAUTHORIZED,
            ProxyError::BadRequest(_) | ProxyError::BadRequestBody { .. } => http::StatusCode::BAD_REQUEST,
            ProxyError::UnknownCluster(_)
            | ProxyError::NoEndpoints(_)
            | ProxyError::Overflow { .. }
            | ProxyError::PendingOverflow { .. } => http::StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectTimeout { .. } | ProxyError::RouteTimeout { .. } => http::StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. }
            | ProxyError::UpstreamTls { .. }
            | ProxyError::Handshake { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamBadResponse { .. } => http::StatusCode::BAD_GATEWAY,
        }
    }

    /// The `grpc-status` a gRPC client gets: DEADLINE_EXCEEDED (4) for a route timeout,
    /// PERMISSION_DENIED (7) for an authorization refusal, UNAUTHENTICATED (16) for a refused
    /// JWT, RESOURCE_EXHAUSTED (8) for a rate limit, an injected fault's own code, otherwise
    /// UNAVAILABLE (14), which gRPC clients may retry.
    pub fn grpc_status(&self) -> &'static str {
        const CODES: [&str; 17] =
            ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
        match self {
            ProxyError::FaultAbort { grpc: Some(code), .. } => CODES[usize::from(*code).min(16)],
            ProxyError::RateLimited(l) if l.grpc_resource_exhausted => "8",
            ProxyError::RouteTimeout { .. } => "4",
            ProxyError::Denied { .. } => "7",
            ProxyError::Unauthenticated(_) => "16",
            _ => "14",
        }
    }

    /// A failed exchange: the client's request body failed while it was sent, the upstream's
    /// response could not be parsed (e.g. a head too large), or the connection broke.
    pub fn exchange(addr: SocketAddr, source: hyper::Error) -> ProxyError {
        // hyper wraps an error of the body it was sending (the client's) as its source.
        if source.is_user() && std::error::Error::source(&source).is_some_and(|s| s.is::<hyper::Error>()) {
            ProxyError::BadRequestBody { source }
        } else if source.is_parse() || source.is_parse_too_large() {
            ProxyError::UpstreamBadResponse { addr, source }
        } else {
            ProxyError::UpstreamReset { addr, source }
        }
    }

    /// Whether the proxy refused the request by policy or a limit (rather than failing to get
    /// an answer upstream).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ProxyError::NoRoute
                | ProxyError::Denied { .. }
                | ProxyError::Unauthenticated(_)
                | ProxyError::Overflow { .. }
                | ProxyError::PendingOverflow { .. }
                | ProxyError::RateLimited(_)
                | ProxyError::FaultAbort { .. }
                | ProxyError::Redirect { .. }
        )
    }

    /// Whether the request never reached the endpoint, so another endpoint may take it.
    pub fn before_send(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. }
                | ProxyError::ConnectTimeout { .. }
                | ProxyError::UpstreamTls { .. }
                | ProxyError::Handshake { .. }
        )
    }
}
