//! Listeners: the address, the direction, and the filter chains (HTTP connection manager or
//! tcp_proxy, TLS termination, and the inbound policy: JWT, RBAC, local rate limits).
use super::access_log::{AccessLogDef, access_logs};
use super::decode::{InvalidResource, decode, duration, invalid, per_million, ser_duration, socket_addr};
use super::route::{RouteDef, route_config};
use super::schema;
use super::tls::{self, DownstreamTlsDef};
use super::tracing::{TracingDef, tracing};
use crate::authz::{self, Authz};
use crate::jwt::JwtAuthn;
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter, listener_filter};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::JwtAuthentication;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_connection_manager::PathWithEscapedSlashesAction, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::Any;
use prost::Name;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use weft_api::names;
use weft_api::resource::EscapedSlashes;

/// Which way a listener's traffic flows, from `Listener.traffic_direction`: inbound traffic
/// comes from other services to the local app, outbound traffic from the local app to others.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue, Serialize)]
#[allow(non_camel_case_types)] // label values are written as-is
pub enum Direction {
    inbound,
    outbound,
}

/// How many endpoints a request may be tried on when they fail without it being processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failover {
    /// Endpoints tried per request or connection, the first one included.
    pub max_endpoints: usize,
}

impl Default for Failover {
    /// The first endpoint plus two others.
    fn default() -> Self {
        Failover { max_endpoints: 3 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListenerDef {
    pub name: String,
    pub address: SocketAddr,
    /// From `bind_to_port` (default true). An unbound listener is a transparent instance's
    /// listener for one virtual IP: the capture listener hands it the connections addressed to
    /// that IP, on any port (its address's port is 0).
    pub bind_to_port: bool,
    /// From `use_original_dst`: a capture listener ([`crate::capture`]).
    pub use_original_dst: bool,
    /// From `Listener.traffic_direction`, which must be set.
    pub direction: Direction,
    /// The service whose traffic this listener carries: the `stat_prefix` of its HTTP
    /// connection manager or tcp_proxy (for metrics and logs).
    pub service: String,
    pub http: Option<HttpDef>,
    /// From the HTTP connection manager's `path_with_escaped_slashes_action`. Paths are
    /// always normalised (`normalize_path` and `merge_slashes` are taken as set).
    pub escaped_slashes: EscapedSlashes,
    pub tcp_cluster: Option<String>,
    /// From tcp_proxy's `max_connect_attempts`: endpoints tried per connection.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_failover")]
    pub tcp_failover: Option<Failover>,
    /// TLS termination for chains matched on `transport_protocol: tls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<DownstreamTlsDef>,
    /// Whether plaintext connections have a chain (false: a TLS-only listener closes them).
    pub plaintext: bool,
    /// JWT authentication (HTTP chains) and authorization (the RBAC filters, the same on
    /// every chain).
    #[serde(flatten)]
    pub policy: Arc<InboundPolicyDef>,
    /// From the HTTP connection manager's `access_log` (the same on every HTTP chain).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access_log: Vec<AccessLogDef>,
    /// From the HTTP connection manager's `tracing` (the same on every HTTP chain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingDef>,
    /// A mesh gateway's routes (a `tls_inspector` listener whose chains match `server_names`):
    /// by TLS server name, the cluster a connection is handed to, still encrypted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<(String, String)>,
}

/// What an inbound listener checks before a request or connection reaches the app, as
/// decoded; the runtime puts a [`crate::inbound::InboundPolicy`] built from it in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InboundPolicyDef {
    /// From the HTTP connection manager's `jwt_authn` filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Arc<JwtAuthn>>,
    /// From the RBAC filters (the same on every chain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
    /// From the `local_ratelimit` HTTP filter (after JWT and RBAC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitDef>,
}

/// Envoy's token bucket: up to `max_tokens`, refilled with `tokens_per_fill` every
/// `fill_interval` (here continuously, at the same rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BucketDef {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    #[serde(serialize_with = "ser_duration")]
    pub fill_interval: Duration,
}

impl BucketDef {
    /// The time one token takes to come back (more than zero).
    pub fn period(&self) -> Result<Duration, String> {
        let period = self.fill_interval / self.tokens_per_fill.max(1);
        if period.is_zero() {
            return Err(format!("token_bucket: fill_interval {:?} is too short", self.fill_interval));
        }
        Ok(period)
    }

    /// The most tokens the bucket holds (at least one).
    pub fn burst(&self) -> Result<std::num::NonZeroU32, String> {
        std::num::NonZeroU32::new(self.max_tokens).ok_or_else(|| "token_bucket: max_tokens must be at least 1".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimitDef {
    /// The listener's bucket, consumed by every request when `always_consume_service` (or
    /// when there is no per-caller bucket).
    pub service: BucketDef,
    pub always_consume_service: bool,
    pub per_caller: Option<BucketDef>,
    /// gRPC requests refused get RESOURCE_EXHAUSTED (else UNAVAILABLE).
    pub grpc_resource_exhausted: bool,
}

fn ser_failover<S: serde::Serializer>(f: &Option<Failover>, s: S) -> Result<S::Ok, S::Error> {
    match f {
        Some(f) => s.serialize_u64(f.max_endpoints as u64),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpDef {
    Rds(String),
    Inline(RouteDef),
}

pub fn listener(any: &Any) -> Result<ListenerDef, InvalidResource> {
    let l: Listener = decode(any, "Listener")?;
    let bad = |reason: String| invalid("Listener", &l.name, reason);
    schema::check(&any.value, &schema::LISTENER, "").map_err(bad)?;
    let inspects_tls = match l.listener_filters.as_slice() {
        [] => false,
        [lf] if lf.name == names::TLS_INSPECTOR => {
            if let Some(listener_filter::ConfigType::TypedConfig(cfg)) = &lf.config_type {
                let inspector: TlsInspector = decode(cfg, "Listener")?;
                if inspector != TlsInspector::default() {
                    return Err(bad("tls_inspector fields are not supported".into()));
                }
            }
            true
        }
        [lf, ..] => {
            return Err(bad(format!(
                "listener filter {:?} is not supported (weft supports {} alone, on a mesh gateway's listener)",
                lf.name,
                names::TLS_INSPECTOR
            )));
        }
    };
    let address = socket_addr("Listener", &l.name, l.address.as_ref())?;
    let direction = match TrafficDirection::try_from(l.traffic_direction) {
        Ok(TrafficDirection::Inbound) => Direction::inbound,
        Ok(TrafficDirection::Outbound) => Direction::outbound,
        _ => return Err(bad("traffic_direction must be INBOUND or OUTBOUND".into())),
    };
    let bind_to_port = l.bind_to_port.is_none_or(|b| b.value);
    if !bind_to_port && address.ip().is_unspecified() {
        return Err(bad(
            "bind_to_port false needs the virtual IP the capture listener hands connections to as its address, not an unspecified one".into(),
        ));
    }
    let mut def = ListenerDef {
        name: l.name.clone(),
        address,
        bind_to_port,
        use_original_dst: l.use_original_dst.is_some_and(|b| b.value),
        direction,
        service: String::new(),
        http: None,
        escaped_slashes: EscapedSlashes::Keep,
        tcp_cluster: None,
        tcp_failover: None,
        tls: None,
        plaintext: false,
        policy: Arc::default(),
        access_log: Vec::new(),
        tracing: None,
        server_names: Vec::new(),
    };
    if inspects_tls {
        def.server_names = server_name_routes(&l).map_err(bad)?;
        def.service = def.name.clone();
        return Ok(def);
    }
    let mut policy: Option<InboundPolicyDef> = None;
    for chain in &l.filter_chains {
        let p =
            filter_chain(chain, &mut def).map_err(|reason| bad(format!("filter chain {:?}: {reason}", chain.name)))?;
        let Some(before) = &mut policy else {
            policy = Some(p);
            continue;
        };
        if p.authz != before.authz {
            return Err(bad(format!(
                "filter chain {:?} has other RBAC filters than the chains before it; weft applies one authorization per listener",
                chain.name
            )));
        }
        // JWT filters live in HTTP connection managers: HTTP chains must agree; TCP chains
        // carry none.
        match (&before.jwt, p.jwt) {
            (Some(a), Some(b)) if *a != b => {
                return Err(bad(format!(
                    "filter chain {:?} has another jwt_authn filter than the chains before it; weft applies one per listener",
                    chain.name
                )));
            }
            (None, Some(b)) => before.jwt = Some(b),
            _ => {}
        }
        // So do rate limits.
        match (&before.rate_limit, p.rate_limit) {
            (Some(a), Some(b)) if *a != b => {
                return Err(bad(format!(
                    "filter chain {:?} has another local_ratelimit filter than the chains before it; weft applies one per listener",
                    chain.name
                )));
            }
            (None, Some(b)) => before.rate_limit = Some(b),
            _ => {}
        }
    }
    def.policy = Arc::new(policy.unwrap_or_default());
    // A capture listener without chains closes what is not the mesh's (`registry-only`).
    if def.http.is_none() && def.tcp_cluster.is_none() && !(def.use_original_dst && l.filter_chains.is_empty()) {
        return Err(bad("has neither an HTTP connection manager nor a tcp_proxy filter".into()));
    }
    if def.service.is_empty() {
        def.service = def.name.clone();
    }
    Ok(def)
}

/// A mesh gateway's chains: each matches `server_names` and hands the connection, still
/// encrypted, to a tcp_proxy's cluster; nothing else.
fn server_name_routes(l: &Listener) -> Result<Vec<(String, String)>, String> {
    let mut routes = Vec::new();
    for chain in &l.filter_chains {
        let at = format!("filter chain {:?}", chain.name);
        let m = chain.filter_chain_match.clone().unwrap_or_default();
        if m.server_names.is_empty() || !m.application_protocols.is_empty() || !m.transport_protocol.is_empty() {
            return Err(format!("{at}: a tls_inspector listener's chains match server_names, and nothing else"));
        }
        if chain.transport_socket.is_some() {
            return Err(format!("{at}: a mesh gateway passes TLS through; its chains have no transport socket"));
        }
        let [f] = chain.filters.as_slice() else {
            return Err(format!("{at}: a tls_inspector listener's chains have one filter, a tcp_proxy"));
        };
        let tcp = match &f.config_type {
            Some(filter::ConfigType::TypedConfig(cfg)) if cfg.type_url == TcpProxy::type_url() => {
                schema::check(&cfg.value, &schema::TCP_PROXY, "tcp_proxy")?;
                decode::<TcpProxy>(cfg, "Listener").map_err(|e| e.reason)?
            }
            _ => return Err(format!("{at}: filter {:?} is not a tcp_proxy", f.name)),
        };
        let Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)) = tcp.cluster_specifier else {
            return Err(format!("{at}: the tcp_proxy names no cluster"));
        };
        for name in m.server_names {
            if name.starts_with("*.") || name.is_empty() {
                return Err(format!("{at}: server name {name:?}: weft matches exact server names only"));
            }
            if routes.iter().any(|(n, _)| *n == name) {
                return Err(format!("{at}: server name {name:?} is matched by an earlier chain too"));
            }
            routes.push((name, cluster.clone()));
        }
    }
    Ok(routes)
}

/// Application protocols the proxy's own detection (or ALPN, inside TLS) recognises; a chain
/// may be matched on them.
const DETECTED_PROTOCOLS: [&str; 3] = ["http/1.1", "h2c", "h2"];

/// A listener's chains are one set of filters reached in plaintext, through TLS, or both: the
/// TLS chains (matched on `transport_protocol: tls`) must carry the same transport socket, and
/// every chain the same filters as the others of its kind (HTTP or TCP).
fn filter_chain(chain: &FilterChain, def: &mut ListenerDef) -> Result<InboundPolicyDef, String> {
    let m = chain.filter_chain_match.clone().unwrap_or_default();
    if !m.server_names.is_empty() {
        return Err("filter_chain_match on server_names needs the tls_inspector listener filter".into());
    }
    if let Some(p) = m.application_protocols.iter().find(|p| !DETECTED_PROTOCOLS.contains(&p.as_str())) {
        return Err(format!("filter_chain_match on application protocol {p:?} is not supported"));
    }
    match (m.transport_protocol.as_str(), &chain.transport_socket) {
        ("tls", Some(ts)) => {
            let tls = tls::downstream(ts)?;
            if def.tls.as_ref().is_some_and(|t| *t != tls) {
                return Err("TLS chains with different transport sockets are not supported".into());
            }
            def.tls = Some(tls);
        }
        ("tls", None) => return Err(
            "a chain matched on transport_protocol tls needs a TLS transport socket (TLS passthrough is not supported)"
                .into(),
        ),
        ("" | "raw_buffer", None) => def.plaintext = true,
        ("" | "raw_buffer", Some(ts)) => {
            return Err(format!(
                "transport socket {:?} on a chain not matched on transport_protocol tls is not supported",
                ts.name
            ));
        }
        (other, _) => return Err(format!("filter_chain_match on transport protocol {other:?} is not supported")),
    }
    let (http_before, tcp_before) = (def.http.take(), def.tcp_cluster.take());
    // RBAC filters (network, or HTTP inside the connection manager) come before the terminal
    // filter, DENY before ALLOW.
    let mut authz: Option<Authz> = None;
    let mut jwt = None;
    let mut rate_limit = None;
    for f in &chain.filters {
        let Some(filter::ConfigType::TypedConfig(cfg)) = &f.config_type else {
            return Err(format!("filter {:?} has no typed_config", f.name));
        };
        if cfg.type_url == HttpConnectionManager::type_url() {
            let hcm: HttpConnectionManager = decode(cfg, "Listener").map_err(|e| e.reason)?;
            schema::check(&cfg.value, &schema::HTTP_CONNECTION_MANAGER, "http_connection_manager")?;
            for (i, hf) in hcm.http_filters.iter().enumerate() {
                if rate_limit.is_some()
                    && let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && (c.type_url == HttpRbac::type_url() || c.type_url == JwtAuthentication::type_url())
                {
                    return Err(format!(
                        "HTTP filter {:?} comes after local_ratelimit; weft limits the rate after JWT and RBAC checks",
                        hf.name
                    ));
                }
                if let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && c.type_url == LocalRateLimit::type_url()
                {
                    let at = format!("HTTP filter {:?}", hf.name);
                    if rate_limit.is_some() {
                        return Err(format!("{at}: weft supports one local_ratelimit filter"));
                    }
                    schema::check(&c.value, &schema::LOCAL_RATE_LIMIT, "local_ratelimit")?;
                    let f: LocalRateLimit = decode(c, "Listener").map_err(|e| e.reason)?;
                    rate_limit = Some(local_rate_limit(&f).map_err(|e| format!("{at}: {e}"))?);
                    continue;
                }
                if let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && c.type_url == HttpRbac::type_url()
                {
                    let rbac: HttpRbac = decode(c, "Listener").map_err(|e| e.reason)?;
                    let at = format!("HTTP filter {:?}", hf.name);
                    let rules = rbac.rules.clone().ok_or_else(|| format!("{at}: RBAC without rules"))?;
                    if rbac != (HttpRbac { rules: Some(rules.clone()), ..Default::default() }) {
                        return Err(format!("{at}: RBAC filter fields other than rules are not supported"));
                    }
                    authz::add_rbac(authz.get_or_insert_default(), &rules, &at)?;
                    continue;
                }
                if let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && c.type_url == JwtAuthentication::type_url()
                {
                    let at = format!("HTTP filter {:?}", hf.name);
                    if jwt.is_some() || authz.is_some() {
                        return Err(format!("{at}: weft supports one jwt_authn filter, before any RBAC filter"));
                    }
                    let f: JwtAuthentication = decode(c, "Listener").map_err(|e| e.reason)?;
                    jwt = Some(crate::jwt::decode(&f, &at)?);
                    continue;
                }
                // The fault filter is configured per route; here it must be empty.
                if let Some(http_filter::ConfigType::TypedConfig(c)) = &hf.config_type
                    && c.type_url == HttpFault::type_url()
                {
                    if !c.value.is_empty() {
                        return Err(format!(
                            "HTTP filter {:?}: weft takes fault settings per route (typed_per_filter_config), not on the filter",
                            hf.name
                        ));
                    }
                    continue;
                }
                let router = match &hf.config_type {
                    Some(http_filter::ConfigType::TypedConfig(c)) if c.type_url == Router::type_url() => c,
                    config => {
                        let url = match config {
                            Some(http_filter::ConfigType::TypedConfig(c)) => c.type_url.as_str(),
                            _ => "no typed_config",
                        };
                        return Err(format!(
                            "HTTP filter {:?} ({url}) is not supported; weft would have to ignore it",
                            hf.name
                        ));
                    }
                };
                if i + 1 != hcm.http_filters.len() {
                    return Err(format!("HTTP filter {:?} (the router) must be the last one", hf.name));
                }
                schema::check(&router.value, &schema::ROUTER, "router")?;
            }
            def.service.clone_from(&hcm.stat_prefix);
            let slashes = escaped_slashes(hcm.path_with_escaped_slashes_action())?;
            if http_before.is_some() && slashes != def.escaped_slashes {
                return Err("path_with_escaped_slashes_action differs from the HTTP chains before it".into());
            }
            def.escaped_slashes = slashes;
            let logs = access_logs(&hcm.access_log)?;
            if http_before.is_some() && logs != def.access_log {
                return Err("access_log differs from the HTTP chains before it".into());
            }
            def.access_log = logs;
            let traced = hcm.tracing.as_ref().map(tracing).transpose()?;
            if http_before.is_some() && traced != def.tracing {
                return Err("tracing differs from the HTTP chains before it".into());
            }
            def.tracing = traced;
            def.http = Some(match hcm.route_specifier {
                Some(http_connection_manager::RouteSpecifier::Rds(rds)) => HttpDef::Rds(rds.route_config_name),
                Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                    HttpDef::Inline(route_config(&rc).map_err(|e| e.to_string())?)
                }
                _ => return Err("HTTP connection manager needs rds or route_config".into()),
            });
        } else if cfg.type_url == TcpProxy::type_url() {
            let tcp: TcpProxy = decode(cfg, "Listener").map_err(|e| e.reason)?;
            schema::check(&cfg.value, &schema::TCP_PROXY, "tcp_proxy")?;
            def.tcp_failover = match tcp.max_connect_attempts.map(|a| a.value) {
                Some(0) => return Err("tcp_proxy max_connect_attempts must be at least 1".into()),
                Some(n) => Some(Failover { max_endpoints: n as usize }),
                None => None,
            };
            match tcp.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => def.tcp_cluster = Some(c),
                _ => return Err("tcp_proxy needs a cluster".into()),
            }
            if def.service.is_empty() {
                def.service = tcp.stat_prefix;
            }
        } else if cfg.type_url == NetworkRbac::type_url() {
            let rbac: NetworkRbac = decode(cfg, "Listener").map_err(|e| e.reason)?;
            let at = format!("network filter {:?}", f.name);
            let rules = rbac.rules.clone().ok_or_else(|| format!("{at}: RBAC without rules"))?;
            let honoured =
                NetworkRbac { rules: Some(rules.clone()), stat_prefix: rbac.stat_prefix.clone(), ..Default::default() };
            if rbac != honoured {
                return Err(format!("{at}: RBAC filter fields other than rules and stat_prefix are not supported"));
            }
            authz::add_rbac(authz.get_or_insert_default(), &rules, &at)?;
        } else {
            return Err(format!("unsupported network filter {}", cfg.type_url));
        }
    }
    // A kind of chain seen before must carry what it carried then.
    for (before, now, what) in [
        (http_before.as_ref().map(|h| format!("{h:?}")), def.http.as_ref().map(|h| format!("{h:?}")), "HTTP"),
        (tcp_before.clone(), def.tcp_cluster.clone(), "TCP"),
    ] {
        if let (Some(b), Some(n)) = (&before, &now)
            && b != n
        {
            return Err(format!("the {what} filters differ between chains; weft applies one set per listener"));
        }
    }
    if def.http.is_none() {
        def.http = http_before;
    }
    if def.tcp_cluster.is_none() {
        def.tcp_cluster = tcp_before;
    }
    Ok(InboundPolicyDef { jwt, authz, rate_limit })
}

/// Envoy's escaped-slash actions weft takes; a redirect to the decoded path is not one.
fn escaped_slashes(action: PathWithEscapedSlashesAction) -> Result<EscapedSlashes, String> {
    Ok(match action {
        PathWithEscapedSlashesAction::ImplementationSpecificDefault | PathWithEscapedSlashesAction::KeepUnchanged => {
            EscapedSlashes::Keep
        }
        PathWithEscapedSlashesAction::UnescapeAndForward => EscapedSlashes::Decode,
        PathWithEscapedSlashesAction::RejectRequest => EscapedSlashes::Reject,
        PathWithEscapedSlashesAction::UnescapeAndRedirect => {
            return Err(
                "path_with_escaped_slashes_action UNESCAPE_AND_REDIRECT is not supported; use UNESCAPE_AND_FORWARD"
                    .into(),
            );
        }
    })
}

/// The local rate limit filter as weft enforces it: always on and enforced, a bucket for the
/// listener and at most one per-caller descriptor (entry `weft.caller` with an empty value).
fn local_rate_limit(f: &LocalRateLimit) -> Result<RateLimitDef, String> {
    let bucket = |b: &Option<envoy_types::pb::envoy::r#type::v3::TokenBucket>, what: &str| {
        let b = b.as_ref().ok_or_else(|| format!("{what} has no token_bucket"))?;
        let fill = b.fill_interval.as_ref().map(duration).filter(|d| !d.is_zero());
        let def = BucketDef {
            max_tokens: b.max_tokens,
            tokens_per_fill: b.tokens_per_fill.as_ref().map_or(1, |t| t.value),
            fill_interval: fill.ok_or_else(|| format!("{what}: token_bucket needs a fill_interval"))?,
        };
        def.period()?;
        def.burst()?;
        Ok::<_, String>(def)
    };
    for (what, p) in [("filter_enabled", &f.filter_enabled), ("filter_enforced", &f.filter_enforced)] {
        let share = p.as_ref().and_then(|p| p.default_value.as_ref()).map_or(0, per_million);
        if share != 1_000_000 {
            return Err(format!("{what} must be 100% (weft enforces a rate limit on every request, or not at all)"));
        }
    }
    let per_caller = match f.descriptors.as_slice() {
        [] => None,
        [d] if d.entries.len() == 1
            && d.entries[0].key == names::CALLER_DESCRIPTOR
            && d.entries[0].value.is_empty()
            && !d.shadow_mode =>
        {
            Some(bucket(&d.token_bucket, "the descriptor")?)
        }
        _ => {
            return Err(format!(
                "descriptors: weft supports one, with the single entry {{key: {:?}, value: \"\"}} (a bucket per caller)",
                names::CALLER_DESCRIPTOR
            ));
        }
    };
    Ok(RateLimitDef {
        service: bucket(&f.token_bucket, "the filter")?,
        always_consume_service: f.always_consume_default_token_bucket.as_ref().is_none_or(|b| b.value),
        per_caller,
        grpc_resource_exhausted: f.rate_limited_as_resource_exhausted,
    })
}
