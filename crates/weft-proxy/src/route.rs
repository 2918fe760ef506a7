//! Route tables: an ordered list of rules, each leading to one or more weighted clusters, with
//! the policy that applies to requests it matches. Tables are built once per RDS update with
//! their clusters resolved. Routing decides everything about a request before any I/O: the
//! result is a plain [`MatchedRoute`], which the stacks then execute.
use crate::balance::{Cluster, ClusterManager};
use crate::config::{PathDef, RouteDef};
use crate::error::ProxyError;
use crate::record::RequestRecord;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub struct RouteTable {
    rules: Vec<Arc<Rule>>,
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

/// What applies to every request a rule matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePolicy {
    /// From the request's arrival to the response head; `None` for no limit.
    pub timeout: Option<Duration>,
    /// Connect failures move a request to another endpoint, as does a reset before the
    /// response for an idempotent request without a body (it can be sent again whole).
    pub failover: Failover,
}

pub struct Rule {
    /// `<route table>/<rule index>`, for records and logs.
    pub id: Arc<str>,
    path: PathDef,
    headers: Vec<(http::HeaderName, String)>,
    method: Option<http::Method>,
    backends: Vec<(Arc<Cluster>, u32)>,
    total_weight: u32,
    pub policy: RoutePolicy,
}

/// The decision for one request: the rule it matched and the backend picked among the rule's
/// weighted clusters.
pub struct MatchedRoute {
    pub rule: Arc<Rule>,
    pub backend: Arc<Cluster>,
}

impl RouteTable {
    pub fn empty() -> RouteTable {
        RouteTable { rules: Vec::new() }
    }

    pub fn build(def: &RouteDef, clusters: &ClusterManager) -> RouteTable {
        let rules = def
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut headers = Vec::new();
                let mut method = None;
                for (name, value) in &r.headers {
                    if name == ":method" {
                        method = http::Method::from_bytes(value.as_bytes()).ok();
                    } else if let Ok(n) = http::HeaderName::from_bytes(name.as_bytes()) {
                        headers.push((n, value.clone()));
                    }
                }
                let backends: Vec<(Arc<Cluster>, u32)> =
                    r.backends.iter().filter(|(_, w)| *w > 0).map(|(c, w)| (clusters.get(c), *w)).collect();
                let total_weight = backends.iter().map(|(_, w)| w).sum();
                let policy = RoutePolicy { timeout: r.timeout, failover: Failover::default() };
                let id = format!("{}/{i}", def.name).into();
                Arc::new(Rule { id, path: r.path.clone(), headers, method, backends, total_weight, policy })
            })
            .collect();
        RouteTable { rules }
    }

    /// The first matching rule, then a weighted pick among its backends.
    pub fn route<B>(&self, req: &http::Request<B>) -> Option<MatchedRoute> {
        let path = req.uri().path();
        let rule = self.rules.iter().find(|r| {
            let path_ok = match &r.path {
                PathDef::Prefix(p) => prefix_matches(path, p),
                PathDef::Exact(p) => path == p,
            };
            path_ok
                && r.method.as_ref().is_none_or(|m| m == req.method())
                && r.headers.iter().all(|(n, v)| req.headers().get(n).is_some_and(|h| h.as_bytes() == v.as_bytes()))
        })?;
        let backend = rule.pick()?.clone();
        Some(MatchedRoute { rule: rule.clone(), backend })
    }
}

impl Rule {
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
    let route = table.load().route(req).ok_or(ProxyError::NoRoute)?;
    rec.route = Some(route.rule.id.clone());
    rec.cluster = Some(route.backend.name.clone());
    if !route.backend.defined.load(Ordering::Relaxed) {
        return Err(ProxyError::UnknownCluster(route.backend.name.to_string()));
    }
    Ok(route)
}

/// Gateway API path prefixes match whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
fn prefix_matches(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleDef;

    fn rule(path: PathDef, headers: Vec<(String, String)>, backends: Vec<(String, u32)>) -> RuleDef {
        RuleDef { path, headers, backends, timeout: None }
    }

    #[test]
    fn first_matching_rule_wins_and_weights_split() {
        let clusters = ClusterManager::default();
        let def = RouteDef {
            name: "r".into(),
            rules: vec![
                rule(PathDef::Exact("/exact".into()), vec![], vec![("a".into(), 1)]),
                rule(PathDef::Prefix("/api".into()), vec![("x-canary".into(), "1".into())], vec![("b".into(), 1)]),
                rule(PathDef::Prefix("/".into()), vec![], vec![("c".into(), 3), ("d".into(), 1)]),
            ],
        };
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
