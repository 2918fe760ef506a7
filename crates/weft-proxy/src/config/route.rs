//! Route tables: virtual hosts and their rules (matches, backends, timeouts, header edits,
//! rewrites, redirects, retries, mirrors, faults, hashing).
use super::decode::{InvalidResource, decode, duration, invalid, per_million, ser_duration, ser_opt_duration};
use super::schema;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as CoreHeaderValue, HeaderValueOption, header_value_option,
};
use envoy_types::pb::envoy::config::route::v3::{
    RedirectAction, RouteConfiguration, header_matcher, query_parameter_matcher, redirect_action, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteDef {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHostDef>,
}

impl RouteDef {
    /// A table with one virtual host for every domain.
    pub fn any_host(name: &str, rules: Vec<RuleDef>) -> RouteDef {
        RouteDef { name: name.into(), virtual_hosts: vec![VirtualHostDef { domains: vec!["*".into()], rules }] }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VirtualHostDef {
    /// `*`, an exact host, `*.suffix` or `prefix*`; the request's host without its port.
    pub domains: Vec<String>,
    pub rules: Vec<RuleDef>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RuleDef {
    /// `Route.name`: the HTTPRoute (or GRPCRoute) the rule came from, `default` for a
    /// service's fallback route; metrics' `route` label. Empty if the control plane set none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub path: PathDef,
    /// `:method` for the method.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, StrMatch)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<(String, StrMatch)>,
    /// (cluster, weight)
    pub backends: Vec<(String, u32)>,
    /// `RouteAction.timeout`: the time allowed from the request's arrival until the response
    /// head; `None` (unset or zero) for no limit.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_duration")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    #[serde(skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
    #[serde(skip_serializing_if = "Rewrite::is_empty")]
    pub rewrite: Rewrite,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryDef>,
    /// From `request_mirror_policies`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorDef>,
    /// From the route's `typed_per_filter_config` for the fault filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultDef>,
    /// From `hash_policy`: what consistent-hash load balancing hashes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hash: Vec<HashDef>,
    /// From `request_body_buffer_limit`: the largest request body kept for a retry, a
    /// failover or a mirror (default 64 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_limit: Option<u32>,
    /// A redirect route (Envoy's `redirect` action) answers instead of forwarding; it has no
    /// backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectDef>,
}

/// Where a redirect points; unset parts are the request's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedirectDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Replaces the whole path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_path: Option<String>,
    /// Replaces the matched prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    pub status: u16,
}

/// One source of a request's consistent-hash key; several combine (Envoy's rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashDef {
    Header(String),
    Cookie(String),
    SourceIp,
}

/// A copy of a share of the rule's requests goes to `cluster`; its answers are dropped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MirrorDef {
    pub cluster: String,
    pub per_million: u32,
}

/// Faults injected into a share of the rule's requests (each share in parts per million).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelayDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbortDef>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDelayDef {
    #[serde(serialize_with = "ser_duration")]
    pub delay: Duration,
    pub per_million: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultAbortDef {
    /// The HTTP status answered (gRPC requests get `grpc` if set, else the status's gRPC code).
    pub http: Option<u16>,
    pub grpc: Option<u8>,
    pub per_million: u32,
}

/// From `RouteAction.retry_policy`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryDef {
    /// Retries after the first attempt.
    pub retries: u32,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_duration")]
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    #[serde(serialize_with = "ser_duration")]
    pub base_interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub max_interval: Duration,
}

/// The conditions of `retry_on` weft honours.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx answer, a reset, a connect failure or a per-try timeout.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504 or a per-try timeout.
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    /// gRPC status codes from `cancelled`, `deadline-exceeded`, `internal`,
    /// `resource-exhausted`, `unavailable`.
    pub grpc: Vec<u8>,
}

impl RetryOn {
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for c in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match c {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                other => return Err(format!("retry_on {other:?} is not supported")),
            }
        }
        Ok(on)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathDef {
    Prefix(String),
    Exact(String),
    Regex(String),
}

impl Default for PathDef {
    fn default() -> Self {
        PathDef::Prefix("/".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StrMatch {
    Exact(String),
    /// RE2 syntax, matching the whole value.
    Regex(String),
}

/// Headers a route sets (replacing), adds (appending) and removes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HeaderEdits {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// What a route changes in the request's target before forwarding it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rewrite {
    /// Replaces the matched path prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Replaces the whole path (the query stays).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl Rewrite {
    pub fn is_empty(&self) -> bool {
        self.prefix.is_none() && self.full_path.is_none() && self.host.is_none()
    }
}

pub fn route(any: &Any) -> Result<RouteDef, InvalidResource> {
    let rc: RouteConfiguration = decode(any, "RouteConfiguration")?;
    schema::check(&any.value, &schema::ROUTE_CONFIGURATION, "")
        .map_err(|reason| invalid("RouteConfiguration", &rc.name, reason))?;
    route_config(&rc)
}

fn string_match(sm: &StringMatcher, what: &str) -> Result<StrMatch, String> {
    if sm.ignore_case {
        return Err(format!("{what}: ignore_case is not supported"));
    }
    match &sm.match_pattern {
        Some(string_matcher::MatchPattern::Exact(v)) => Ok(StrMatch::Exact(v.clone())),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => {
            weft_api::resource::full_match_regex(&r.regex).map_err(|e| format!("{what}: {e}"))?;
            Ok(StrMatch::Regex(r.regex.clone()))
        }
        _ => Err(format!("{what}: only exact and safe_regex matches are supported")),
    }
}

/// A header match the route table honours: a valid header name, or `:method` with an exact
/// method; other pseudo-headers (`:authority`, `:path`, `:scheme`) and a `:method` regex are
/// refused rather than ignored, which would widen the route to every request.
fn check_header_match(name: &str, value: &StrMatch) -> Result<(), String> {
    match (name, value) {
        (":method", StrMatch::Exact(m)) => {
            http::Method::from_bytes(m.as_bytes()).map(drop).map_err(|_| format!("{m:?} is not an HTTP method"))
        }
        (":method", StrMatch::Regex(_)) => Err("only an exact :method match is supported".into()),
        (pseudo, _) if pseudo.starts_with(':') => {
            Err("pseudo-header matches other than an exact :method are not supported".into())
        }
        (name, _) => {
            http::HeaderName::from_bytes(name.as_bytes()).map(drop).map_err(|_| "not a valid header name".into())
        }
    }
}

fn header_edits(add: &[HeaderValueOption], remove: &[String], what: &str) -> Result<HeaderEdits, String> {
    let mut edits =
        HeaderEdits { remove: remove.iter().map(|n| n.to_ascii_lowercase()).collect(), ..Default::default() };
    for o in add {
        let h = o.header.as_ref().ok_or_else(|| format!("{what}: a header value option without a header"))?;
        let honoured = HeaderValueOption {
            header: Some(CoreHeaderValue { key: h.key.clone(), value: h.value.clone(), ..Default::default() }),
            append_action: o.append_action,
            ..Default::default()
        };
        if *o != honoured {
            return Err(format!("{what}: header {:?}: only key, value and append_action are supported", h.key));
        }
        http::HeaderName::from_bytes(h.key.as_bytes())
            .map_err(|_| format!("{what}: {:?} is not a header name", h.key))?;
        http::HeaderValue::from_str(&h.value).map_err(|_| format!("{what}: the value of {:?} is not valid", h.key))?;
        let pair = (h.key.to_ascii_lowercase(), h.value.clone());
        match header_value_option::HeaderAppendAction::try_from(o.append_action) {
            Ok(header_value_option::HeaderAppendAction::AppendIfExistsOrAdd) => edits.add.push(pair),
            Ok(header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd) => edits.set.push(pair),
            _ => {
                return Err(format!(
                    "{what}: header {:?}: append_action must be APPEND_IF_EXISTS_OR_ADD or OVERWRITE_IF_EXISTS_OR_ADD",
                    h.key
                ));
            }
        }
    }
    Ok(edits)
}

fn redirect_def(rd: &RedirectAction, path: &PathDef) -> Result<RedirectDef, String> {
    use redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let scheme = match &rd.scheme_rewrite_specifier {
        None => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_owned()),
        Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) if s == "http" || s == "https" => Some(s.clone()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => {
            return Err(format!("redirect: scheme {s:?} is not http or https"));
        }
    };
    let (full_path, prefix) = match &rd.path_rewrite_specifier {
        None => (None, None),
        Some(PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
        Some(PathRewriteSpecifier::PrefixRewrite(p)) if matches!(path, PathDef::Prefix(_)) => (None, Some(p.clone())),
        Some(PathRewriteSpecifier::PrefixRewrite(_)) => {
            return Err("redirect: prefix_rewrite needs a prefix match".into());
        }
        Some(_) => return Err("redirect: only path_redirect and prefix_rewrite are supported".into()),
    };
    let status = match RedirectResponseCode::try_from(rd.response_code) {
        Ok(RedirectResponseCode::MovedPermanently) => 301,
        Ok(RedirectResponseCode::Found) => 302,
        Ok(RedirectResponseCode::SeeOther) => 303,
        Ok(RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(RedirectResponseCode::PermanentRedirect) => 308,
        Err(_) => return Err(format!("redirect: unknown response_code {}", rd.response_code)),
    };
    let port = match u16::try_from(rd.port_redirect) {
        Ok(0) => None,
        Ok(p) => Some(p),
        Err(_) => return Err(format!("redirect: port {} is out of range", rd.port_redirect)),
    };
    let host = (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone());
    Ok(RedirectDef { scheme, host, port, full_path, prefix, status })
}

/// The fault filter's per-route config. As in Envoy, a fault without a percentage applies to
/// no request.
fn fault_def(f: &HttpFault) -> Result<FaultDef, String> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
    let share = |p: &Option<FractionalPercent>| p.as_ref().map_or(0, per_million);
    let delay = match &f.delay {
        None => None,
        Some(d) => match &d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(t)) => {
                Some(FaultDelayDef { delay: duration(t), per_million: share(&d.percentage) })
            }
            _ => return Err("only a fixed_delay is supported (not a header-controlled one)".into()),
        },
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let (http, grpc) = match a.error_type {
                Some(ErrorType::HttpStatus(s)) if (200..600).contains(&s) => (Some(s as u16), None),
                Some(ErrorType::GrpcStatus(g)) if (1..=16).contains(&g) => (None, Some(g as u8)),
                _ => return Err("abort needs an http_status (200-599) or a grpc_status (1-16)".into()),
            };
            Some(FaultAbortDef { http, grpc, per_million: share(&a.percentage) })
        }
    };
    Ok(FaultDef { delay, abort })
}

fn retry_def(p: &envoy_types::pb::envoy::config::route::v3::RetryPolicy) -> Result<RetryDef, String> {
    let base = p.retry_back_off.as_ref().and_then(|b| b.base_interval.as_ref()).map(duration);
    let base = base.filter(|d| !d.is_zero()).unwrap_or(Duration::from_millis(25));
    let max = p.retry_back_off.as_ref().and_then(|b| b.max_interval.as_ref()).map(duration).unwrap_or(base * 10);
    Ok(RetryDef {
        retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: p.per_try_timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
        on: RetryOn::parse(&p.retry_on).map_err(|e| format!("retry_policy: {e}"))?,
        base_interval: base,
        max_interval: max.max(base),
    })
}

/// The one regex rewrite weft honours: the whole path replaced (`^/.*$` → a literal path).
const FULL_PATH_PATTERN: &str = "^/.*$";

pub(super) fn route_config(rc: &RouteConfiguration) -> Result<RouteDef, InvalidResource> {
    let bad = |reason: String| invalid("RouteConfiguration", &rc.name, reason);
    let mut virtual_hosts = Vec::new();
    for vh in &rc.virtual_hosts {
        let bad = |reason: String| bad(format!("virtual host {:?}: {reason}", vh.name));
        if vh.domains.is_empty() {
            return Err(bad("has no domains".into()));
        }
        for d in &vh.domains {
            let stars = d.matches('*').count();
            let ok = d == "*" || stars == 0 || (stars == 1 && d.len() > 1 && (d.starts_with('*') || d.ends_with('*')));
            if !ok {
                return Err(bad(format!(
                    "domain {d:?}: weft supports \"*\", exact hosts, \"*.suffix\" and \"prefix*\""
                )));
            }
        }
        let mut rules = Vec::new();
        for (i, r) in vh.routes.iter().enumerate() {
            let bad = |reason: String| bad(format!("route {i} {:?}: {reason}", r.name));
            let m = r.r#match.as_ref().ok_or_else(|| bad("route without match".into()))?;
            let path = match &m.path_specifier {
                Some(route_match::PathSpecifier::Prefix(p)) => PathDef::Prefix(p.clone()),
                Some(route_match::PathSpecifier::Path(p)) => PathDef::Exact(p.clone()),
                Some(route_match::PathSpecifier::SafeRegex(re)) => {
                    weft_api::resource::full_match_regex(&re.regex).map_err(bad)?;
                    PathDef::Regex(re.regex.clone())
                }
                None => PathDef::Prefix("/".into()),
                Some(other) => return Err(bad(format!("unsupported path match {other:?}"))),
            };
            let mut headers = Vec::new();
            for h in &m.headers {
                let sm = match &h.header_match_specifier {
                    Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => sm,
                    _ => return Err(bad(format!("header {:?}: only string matches are supported", h.name))),
                };
                let name = h.name.to_ascii_lowercase();
                let value = string_match(sm, &format!("header {:?}", h.name)).map_err(bad)?;
                check_header_match(&name, &value).map_err(|e| bad(format!("header {:?}: {e}", h.name)))?;
                headers.push((name, value));
            }
            let mut query = Vec::new();
            for q in &m.query_parameters {
                let sm = match &q.query_parameter_match_specifier {
                    Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm)) => sm,
                    _ => return Err(bad(format!("query parameter {:?}: only string matches are supported", q.name))),
                };
                query.push((q.name.clone(), string_match(sm, &format!("query parameter {:?}", q.name)).map_err(bad)?));
            }
            let action = match &r.action {
                Some(route::Action::Route(action)) => action,
                Some(route::Action::Redirect(rd)) => {
                    if !r.typed_per_filter_config.is_empty() {
                        return Err(bad("a redirect route takes no typed_per_filter_config".into()));
                    }
                    let edits = !(r.request_headers_to_add.is_empty()
                        && r.request_headers_to_remove.is_empty()
                        && r.response_headers_to_add.is_empty()
                        && r.response_headers_to_remove.is_empty());
                    if edits {
                        return Err(bad("a redirect route takes no header edits".into()));
                    }
                    let redirect = redirect_def(rd, &path).map_err(bad)?;
                    rules.push(RuleDef {
                        name: r.name.clone(),
                        path,
                        headers,
                        query,
                        redirect: Some(redirect),
                        ..Default::default()
                    });
                    continue;
                }
                _ => return Err(bad("only route and redirect actions are supported".into())),
            };
            let backends = match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                    let mut out = Vec::new();
                    for c in &w.clusters {
                        out.push((c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)));
                    }
                    out
                }
                _ => return Err(bad("route action needs a cluster or weighted_clusters".into())),
            };
            if backends.iter().all(|(_, w)| *w == 0) {
                return Err(bad("weighted clusters all have weight 0".into()));
            }
            let timeout = action.timeout.as_ref().map(duration).filter(|d| !d.is_zero());
            let full_path = match &action.regex_rewrite {
                None => None,
                Some(rw)
                    if rw.pattern.as_ref().is_some_and(|p| p.regex == FULL_PATH_PATTERN)
                        && rw.substitution.starts_with('/')
                        && !rw.substitution.contains('\\') =>
                {
                    Some(rw.substitution.clone())
                }
                Some(_) => {
                    return Err(bad(format!(
                        "regex_rewrite: weft supports only pattern {FULL_PATH_PATTERN:?} with a literal path (a full path replacement)"
                    )));
                }
            };
            let prefix = (!action.prefix_rewrite.is_empty()).then(|| action.prefix_rewrite.clone());
            if prefix.is_some() && !matches!(path, PathDef::Prefix(_)) {
                return Err(bad("prefix_rewrite needs a prefix match".into()));
            }
            let host = match &action.host_rewrite_specifier {
                None => None,
                Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
                Some(_) => return Err(bad("only host_rewrite_literal is supported".into())),
            };
            let retry = action.retry_policy.as_ref().map(retry_def).transpose().map_err(bad)?;
            let mirrors = action
                .request_mirror_policies
                .iter()
                .map(|m| {
                    if m.cluster.is_empty() {
                        return Err(bad("request_mirror_policies: a mirror needs a cluster".into()));
                    }
                    let fraction = m.runtime_fraction.as_ref().and_then(|f| f.default_value.as_ref());
                    Ok(MirrorDef { cluster: m.cluster.clone(), per_million: fraction.map_or(1_000_000, per_million) })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut fault = None;
            for (name, any) in &r.typed_per_filter_config {
                if any.type_url != HttpFault::type_url() {
                    return Err(bad(format!(
                        "typed_per_filter_config {name:?} ({}) is not supported; weft would have to ignore it",
                        any.type_url
                    )));
                }
                schema::check(&any.value, &schema::HTTP_FAULT, &format!("typed_per_filter_config {name:?}"))
                    .map_err(bad)?;
                let f = HttpFault::decode(any.value.as_slice()).map_err(|e| bad(format!("{name:?}: {e}")))?;
                fault = Some(fault_def(&f).map_err(|e| bad(format!("typed_per_filter_config {name:?}: {e}")))?);
            }
            let mut hash = Vec::new();
            for h in &action.hash_policy {
                use route_action::hash_policy::PolicySpecifier;
                if h.terminal {
                    return Err(bad("hash_policy: terminal is not supported".into()));
                }
                hash.push(match &h.policy_specifier {
                    Some(PolicySpecifier::Header(hd)) if hd.regex_rewrite.is_none() => {
                        HashDef::Header(hd.header_name.to_ascii_lowercase())
                    }
                    Some(PolicySpecifier::Cookie(c)) if c.ttl.is_none() && c.path.is_empty() && c.attributes.is_empty() => {
                        HashDef::Cookie(c.name.clone())
                    }
                    Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => HashDef::SourceIp,
                    _ => {
                        return Err(bad(
                            "hash_policy: weft hashes a header, a cookie (without ttl, path or attributes) or the source IP"
                                .into(),
                        ));
                    }
                });
            }
            rules.push(RuleDef {
                name: r.name.clone(),
                buffer_limit: r.request_body_buffer_limit.map(|b| u32::try_from(b.value).unwrap_or(u32::MAX)),
                redirect: None,
                hash,
                mirrors,
                fault,
                retry,
                path,
                headers,
                query,
                backends,
                timeout,
                request_headers: header_edits(
                    &r.request_headers_to_add,
                    &r.request_headers_to_remove,
                    "request_headers_to_add",
                )
                .map_err(bad)?,
                response_headers: header_edits(
                    &r.response_headers_to_add,
                    &r.response_headers_to_remove,
                    "response_headers_to_add",
                )
                .map_err(bad)?,
                rewrite: Rewrite { prefix, full_path, host },
            });
        }
        virtual_hosts.push(VirtualHostDef { domains: vh.domains.clone(), rules });
    }
    Ok(RouteDef { name: rc.name.clone(), virtual_hosts })
}
