//! Route tables: an ordered list of rules, each leading to one or more weighted clusters, with
//! the policy that applies to requests it matches. Tables are built once per RDS update with
//! their clusters resolved. Routing decides everything about a request before any I/O: the
//! result is a plain [`MatchedRoute`], which the stacks then execute.
use crate::cluster::balance::key_hash;
use crate::cluster::balance::{Cluster, ClusterManager};
use crate::config::{
    Failover, FaultDef, HashDef, HeaderEdits, PathDef, RedirectDef, RetryDef, Rewrite, RouteDef, RuleDef, StrMatch,
};
use crate::error::ProxyError;
use crate::record::RequestRecord;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub struct RouteTable {
    /// Most specific domains first; a request takes the first host whose domain matches.
    hosts: Vec<VirtualHost>,
}

struct VirtualHost {
    domains: Vec<Domain>,
    rules: Vec<Arc<Rule>>,
}

/// Envoy's domain forms, in the order it prefers them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Domain {
    Exact(String),
    /// `*.example.com` (stored as `.example.com`): longer suffixes first.
    Suffix(std::cmp::Reverse<usize>, String),
    Prefix(std::cmp::Reverse<usize>, String),
    Any,
}

impl Domain {
    fn parse(d: &str) -> Domain {
        let d = d.to_ascii_lowercase();
        if d == "*" {
            Domain::Any
        } else if let Some(s) = d.strip_prefix('*') {
            Domain::Suffix(std::cmp::Reverse(s.len()), s.to_owned())
        } else if let Some(p) = d.strip_suffix('*') {
            Domain::Prefix(std::cmp::Reverse(p.len()), p.to_owned())
        } else {
            Domain::Exact(d)
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            Domain::Exact(h) => h == host,
            Domain::Suffix(_, s) => host.len() > s.len() && host.ends_with(s.as_str()),
            Domain::Prefix(_, p) => host.len() > p.len() && host.starts_with(p.as_str()),
            Domain::Any => true,
        }
    }
}

/// What applies to every request a rule matches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutePolicy {
    /// From the request's arrival to the response head; `None` for no limit.
    pub timeout: Option<Duration>,
    /// Connect failures move a request to another endpoint, as does a reset before the
    /// response for an idempotent request without a body (it can be sent again whole).
    pub failover: Failover,
    pub retry: Option<RetryDef>,
    pub fault: Option<Box<FaultDef>>,
    /// The largest request body kept for a retry, a failover or a mirror.
    pub replay_limit: usize,
}

enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(regex::Regex),
}

enum ValueMatch {
    Exact(String),
    Regex(regex::Regex),
}

impl ValueMatch {
    fn new(m: &StrMatch) -> Option<ValueMatch> {
        Some(match m {
            StrMatch::Exact(v) => ValueMatch::Exact(v.clone()),
            StrMatch::Regex(r) => ValueMatch::Regex(weft_api::resource::full_match_regex(r).ok()?),
        })
    }

    fn matches(&self, v: &[u8]) -> bool {
        match self {
            ValueMatch::Exact(e) => e.as_bytes() == v,
            ValueMatch::Regex(r) => std::str::from_utf8(v).is_ok_and(|v| r.is_match(v)),
        }
    }
}

/// What a rule changes in requests and responses; `None` on a rule that changes nothing, so
/// plain routes cost nothing.
pub struct Edits {
    request: HeaderEdits,
    response: HeaderEdits,
    rewrite: Rewrite,
}

pub struct Rule {
    /// `<route table>/<rule index>`, for errors and logs.
    pub id: Arc<str>,
    /// The route the rule came from (`Route.name`, or the id if it has none): the request
    /// record's and metrics' `route`.
    pub name: Arc<str>,
    /// The route table's name: the service whose routes these are. A backend of another name
    /// that is not defined is an unresolved reference of a route, not an unknown service.
    table: Arc<str>,
    path: PathMatch,
    headers: Vec<(http::HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
    method: Option<http::Method>,
    backends: Vec<(Arc<Cluster>, u32)>,
    total_weight: u32,
    pub policy: RoutePolicy,
    pub edits: Option<Box<Edits>>,
    /// Clusters a copy of a share (per million) of the requests goes to.
    pub mirrors: Vec<(Arc<Cluster>, u32)>,
    hash: Vec<HashDef>,
    /// A redirect rule answers with a redirect; it has no backends.
    redirect: Option<Box<RedirectDef>>,
}

/// The decision for one request: the rule it matched and the backend picked among the rule's
/// weighted clusters.
pub struct MatchedRoute {
    pub rule: Arc<Rule>,
    pub backend: Arc<Cluster>,
    /// The request's consistent-hash key, when the rule has a hash policy and the request
    /// carries what it hashes.
    pub hash: Option<u64>,
}

impl RouteTable {
    pub fn empty() -> RouteTable {
        RouteTable { hosts: Vec::new() }
    }

    pub fn build(def: &RouteDef, clusters: &ClusterManager) -> RouteTable {
        let mut n = 0;
        let table: Arc<str> = def.name.as_str().into();
        let mut hosts: Vec<VirtualHost> = def
            .virtual_hosts
            .iter()
            .map(|vh| {
                let mut domains: Vec<Domain> = vh.domains.iter().map(|d| Domain::parse(d)).collect();
                domains.sort();
                let rules = vh
                    .rules
                    .iter()
                    .map(|r| {
                        let id = format!("{}/{n}", def.name).into();
                        n += 1;
                        Arc::new(Rule::build(id, table.clone(), r, clusters))
                    })
                    .collect();
                VirtualHost { domains, rules }
            })
            .collect();
        hosts.sort_by(|a, b| a.domains.first().cmp(&b.domains.first()));
        RouteTable { hosts }
    }

    /// The first matching rule of the request's virtual host, then a weighted pick among its
    /// backends.
    pub fn route<B>(&self, req: &http::Request<B>) -> Option<MatchedRoute> {
        let rule = self.rule(req)?;
        let backend = rule.pick()?.clone();
        Some(MatchedRoute { rule: rule.clone(), backend, hash: None })
    }

    /// The first matching rule of the request's virtual host.
    fn rule<B>(&self, req: &http::Request<B>) -> Option<&Arc<Rule>> {
        let host = match self.hosts.as_slice() {
            // One host for every domain (the common case): no need to look at the request's.
            [only] if only.domains == [Domain::Any] => only,
            hosts => {
                let name = request_host(req);
                hosts.iter().find(|h| h.domains.iter().any(|d| d.matches(&name)))?
            }
        };
        let path = req.uri().path();
        host.rules.iter().find(|r| {
            let path_ok = match &r.path {
                PathMatch::Prefix(p) => prefix_matches(path, p),
                PathMatch::Exact(p) => path == p,
                PathMatch::Regex(re) => re.is_match(path),
            };
            path_ok
                && r.method.as_ref().is_none_or(|m| m == req.method())
                && r.headers.iter().all(|(n, v)| req.headers().get_all(n).iter().any(|h| v.matches(h.as_bytes())))
                && r.query
                    .iter()
                    .all(|(n, v)| query_value(req.uri().query(), n).is_some_and(|q| v.matches(q.as_bytes())))
        })
    }
}

/// The port the request's `:authority` or `Host` names, if any.
fn request_port<B>(req: &http::Request<B>) -> Option<u16> {
    if let Some(p) = req.uri().port_u16() {
        return Some(p);
    }
    let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
    let (_, port) = host.rsplit_once(':')?;
    port.parse().ok()
}

/// The request's host, lower case, without a port: `:authority` (HTTP/2) or `Host`.
fn request_host<B>(req: &http::Request<B>) -> String {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host())
        .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => {
            raw.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(raw, |(h, _)| h)
        }
    };
    host.to_ascii_lowercase()
}

/// The first value of query parameter `name`, as sent (not percent-decoded, as in Envoy).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

impl Rule {
    fn build(id: Arc<str>, table: Arc<str>, r: &RuleDef, clusters: &ClusterManager) -> Rule {
        // Matches are checked when the config is decoded; one that still cannot be honoured
        // makes the rule match nothing, never more.
        let mut honoured = true;
        let mut headers = Vec::new();
        let mut method = None;
        for (name, value) in &r.headers {
            match (name.as_str(), value) {
                (":method", StrMatch::Exact(m)) => match http::Method::from_bytes(m.as_bytes()) {
                    Ok(m) => method = Some(m),
                    Err(_) => honoured = false,
                },
                (name, value) => match (http::HeaderName::from_bytes(name.as_bytes()), ValueMatch::new(value)) {
                    (Ok(n), Some(v)) => headers.push((n, v)),
                    _ => honoured = false,
                },
            }
        }
        let mut query = Vec::new();
        for (n, v) in &r.query {
            match ValueMatch::new(v) {
                Some(v) => query.push((n.clone(), v)),
                None => honoured = false,
            }
        }
        let never = || regex::Regex::new("$^").expect("valid");
        let path = match &r.path {
            _ if !honoured => PathMatch::Regex(never()),
            PathDef::Prefix(p) => PathMatch::Prefix(p.clone()),
            PathDef::Exact(p) => PathMatch::Exact(p.clone()),
            PathDef::Regex(p) => PathMatch::Regex(weft_api::resource::full_match_regex(p).unwrap_or_else(|_| never())),
        };
        let backends: Vec<(Arc<Cluster>, u32)> =
            r.backends.iter().filter(|(_, w)| *w > 0).map(|(c, w)| (clusters.get(c), *w)).collect();
        let total_weight = backends.iter().map(|(_, w)| w).sum();
        let policy = RoutePolicy {
            timeout: r.timeout,
            failover: Failover::default(),
            retry: r.retry.clone(),
            fault: r.fault.clone().map(Box::new),
            replay_limit: r.buffer_limit.map_or(crate::http::replay::MAX_REPLAY_BODY, |b| b as usize),
        };
        let mirrors = r.mirrors.iter().map(|m| (clusters.get(&m.cluster), m.per_million)).collect();
        let edits =
            (!(r.request_headers.is_empty() && r.response_headers.is_empty() && r.rewrite.is_empty())).then(|| {
                Box::new(Edits {
                    request: r.request_headers.clone(),
                    response: r.response_headers.clone(),
                    rewrite: r.rewrite.clone(),
                })
            });
        Rule {
            name: if r.name.is_empty() { id.clone() } else { r.name.as_str().into() },
            id,
            table,
            path,
            headers,
            query,
            method,
            backends,
            total_weight,
            policy,
            edits,
            mirrors,
            hash: r.hash.clone(),
            redirect: r.redirect.clone().map(Box::new),
        }
    }

    /// Applies the rule's request edits: headers, then the path and host rewrites.
    pub fn edit_request<B>(&self, req: &mut http::Request<B>) {
        let Some(e) = &self.edits else { return };
        edit_headers(req.headers_mut(), &e.request);
        let rw = &e.rewrite;
        if rw.prefix.is_none() && rw.full_path.is_none() && rw.host.is_none() {
            return;
        }
        let uri = req.uri().clone();
        let new_path = self.rewritten_path(uri.path(), rw.full_path.as_deref(), rw.prefix.as_deref());
        let target = match uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let mut parts = uri.into_parts();
        if let Some(host) = &rw.host {
            if parts.authority.is_some() {
                parts.authority = host.parse().ok();
            }
            if let Ok(v) = http::HeaderValue::from_str(host) {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
        parts.path_and_query = target.parse().ok();
        if let Ok(u) = http::Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }

    /// `path` with its whole path or the matched prefix replaced (the query is not part of it).
    fn rewritten_path(&self, path: &str, full: Option<&str>, prefix: Option<&str>) -> String {
        match (full, prefix, &self.path) {
            (Some(full), _, _) => full.to_owned(),
            (None, Some(to), PathMatch::Prefix(from)) => {
                let rest = &path[from.trim_end_matches('/').len().min(path.len())..];
                let joined = format!("{}{rest}", to.trim_end_matches('/'));
                if joined.is_empty() { "/".to_owned() } else { joined }
            }
            _ => path.to_owned(),
        }
    }

    /// Where a redirect rule sends the request: its `Location`. A scheme change without a
    /// port drops the request's port (the new scheme's default applies).
    fn redirect_location<B>(&self, rd: &RedirectDef, req: &http::Request<B>) -> String {
        let scheme = rd.scheme.as_deref().or(req.uri().scheme_str()).unwrap_or("http");
        let host = rd.host.clone().unwrap_or_else(|| request_host(req));
        let port = rd.port.or_else(|| if rd.scheme.is_some() { None } else { request_port(req) });
        let port = port.filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
        let path = self.rewritten_path(req.uri().path(), rd.full_path.as_deref(), rd.prefix.as_deref());
        let mut location = format!("{scheme}://{host}");
        if let Some(p) = port {
            location.push_str(&format!(":{p}"));
        }
        location.push_str(&path);
        if let Some(q) = req.uri().query() {
            location.push('?');
            location.push_str(q);
        }
        location
    }

    /// Applies the rule's response header edits.
    pub fn edit_response<B>(&self, resp: &mut http::Response<B>) {
        if let Some(e) = &self.edits {
            edit_headers(resp.headers_mut(), &e.response);
        }
    }

    /// The request's consistent-hash key: each source that yields a value folds into it (as
    /// Envoy combines hash policies); `None` if none does.
    pub fn hash_of<B>(&self, req: &http::Request<B>, peer: std::net::SocketAddr) -> Option<u64> {
        let mut out: Option<u64> = None;
        for h in &self.hash {
            let key = match h {
                HashDef::Header(name) => req.headers().get(name.as_str()).map(|v| key_hash(v.as_bytes())),
                HashDef::Cookie(name) => cookie(req.headers(), name).map(|v| key_hash(v.as_bytes())),
                HashDef::SourceIp => Some(key_hash(peer.ip().to_string().as_bytes())),
            };
            if let Some(k) = key {
                out = Some(out.map_or(k, |h| h.rotate_left(1) ^ k));
            }
        }
        out
    }

    /// Whether the rule does anything beyond forwarding to its backend.
    pub fn has_policy(&self) -> bool {
        self.policy.timeout.is_some()
            || self.policy.retry.is_some()
            || self.policy.fault.is_some()
            || self.edits.is_some()
            || !self.mirrors.is_empty()
    }

    fn pick(&self) -> Option<&Arc<Cluster>> {
        if self.backends.len() == 1 {
            return Some(&self.backends[0].0);
        }
        let mut x = fastrand::u32(..self.total_weight.max(1));
        for (c, w) in &self.backends {
            if x < *w {
                return Some(c);
            }
            x -= w;
        }
        self.backends.last().map(|(c, _)| c)
    }
}

/// Routes a request with the table in force and notes the decision in its record; a request
/// no rule matches, or whose backend the control plane does not define, fails here.
pub fn decide<B>(
    table: &ArcSwap<RouteTable>,
    req: &http::Request<B>,
    rec: &mut RequestRecord,
) -> Result<MatchedRoute, ProxyError> {
    let table = table.load();
    let rule = table.rule(req).ok_or_else(|| ProxyError::NoRoute)?;
    if let Some(rd) = &rule.redirect {
        rec.route = Some(rule.name.clone());
        return Err(ProxyError::Redirect { location: rule.redirect_location(rd, req), status: rd.status });
    }
    let backend = rule.pick().ok_or_else(|| ProxyError::NoRoute)?.clone();
    let hash = if rule.hash.is_empty() { None } else { rule.hash_of(req, rec.conn.peer) };
    let route = MatchedRoute { rule: rule.clone(), backend, hash };
    rec.route = Some(route.rule.name.clone());
    rec.cluster = Some(route.backend.name.clone());
    rec.upstream_identity = route.backend.identity();
    if !route.backend.defined.load(Ordering::Relaxed) {
        if route.backend.name != route.rule.table {
            return Err(ProxyError::InvalidBackend {
                route: route.rule.id.clone(),
                service: route.backend.name.clone(),
            });
        }
        return Err(ProxyError::UnknownCluster(route.backend.name.to_string()));
    }
    Ok(route)
}

fn edit_headers(h: &mut http::HeaderMap, e: &HeaderEdits) {
    for name in &e.remove {
        h.remove(name.as_str());
    }
    for (name, value) in &e.set {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(value)) {
            h.insert(n, v);
        }
    }
    for (name, value) in &e.add {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(value)) {
            h.append(n, v);
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';').find_map(|pair| {
            let (k, val) = pair.trim().split_once('=')?;
            (k == name).then_some(val)
        })
    })
}

/// Gateway API path prefixes match whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
fn prefix_matches(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

/// True for a share of calls given in parts per million.
pub fn sampled(per_million: u32) -> bool {
    per_million >= 1_000_000 || (per_million > 0 && fastrand::u32(..1_000_000) < per_million)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn rule(path: PathDef, headers: Vec<(String, String)>, backends: Vec<(String, u32)>) -> RuleDef {
        let headers = headers.into_iter().map(|(n, v)| (n, StrMatch::Exact(v))).collect();
        RuleDef { path, headers, backends, ..Default::default() }
    }

    #[test]
    fn first_matching_rule_wins_and_weights_split() {
        let clusters = ClusterManager::default();
        let def = RouteDef::any_host(
            "r",
            vec![
                rule(PathDef::Exact("/exact".into()), vec![], vec![("a".into(), 1)]),
                rule(PathDef::Prefix("/api".into()), vec![("x-canary".into(), "1".into())], vec![("b".into(), 1)]),
                rule(PathDef::Prefix("/".into()), vec![], vec![("c".into(), 3), ("d".into(), 1)]),
            ],
        );
        let t = RouteTable::build(&def, &clusters);
        let req = |p: &str, canary: bool| {
            let mut b = http::Request::builder().uri(p);
            if canary {
                b = b.header("x-canary", "1");
            }
            b.body(()).unwrap()
        };
        let exact = t.route(&req("/exact", false)).unwrap();
        assert_eq!((&*exact.backend.name, &*exact.rule.id), ("a", "r/0"));
        assert_eq!(&*t.route(&req("/api/x", true)).unwrap().backend.name, "b");
        assert_ne!(&*t.route(&req("/apix", true)).unwrap().backend.name, "b");
        let mut c = 0;
        for _ in 0..4000 {
            if &*t.route(&req("/other", false)).unwrap().backend.name == "c" {
                c += 1;
            }
        }
        assert!((2700..3300).contains(&c), "weighted split off: {c}/4000 to c");
    }
}
