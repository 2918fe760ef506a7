//! Route tables: an ordered list of matches, each leading to one or more weighted clusters.
//! Tables are built once per RDS update with their clusters resolved; matching a request
//! allocates nothing.
use crate::balance::{Cluster, ClusterManager};
use crate::config::{PathDef, RouteDef};
use std::sync::Arc;

pub struct RouteTable {
    rules: Vec<Rule>,
}

struct Rule {
    path: PathDef,
    headers: Vec<(http::HeaderName, String)>,
    method: Option<http::Method>,
    backends: Vec<(Arc<Cluster>, u32)>,
    total_weight: u32,
}

impl RouteTable {
    pub fn empty() -> RouteTable {
        RouteTable { rules: Vec::new() }
    }

    pub fn build(def: &RouteDef, clusters: &ClusterManager) -> RouteTable {
        let rules = def
            .rules
            .iter()
            .map(|r| {
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
                Rule { path: r.path.clone(), headers, method, backends, total_weight }
            })
            .collect();
        RouteTable { rules }
    }

    /// The cluster for a request: the first matching rule, then a weighted pick among its backends.
    pub fn route<B>(&self, req: &http::Request<B>) -> Option<&Arc<Cluster>> {
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
        if rule.backends.len() == 1 {
            return Some(&rule.backends[0].0);
        }
        let mut x = fastrand::u32(..rule.total_weight.max(1));
        for (c, w) in &rule.backends {
            if x < *w {
                return Some(c);
            }
            x -= w;
        }
        rule.backends.last().map(|(c, _)| c)
    }
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

    #[test]
    fn first_matching_rule_wins_and_weights_split() {
        let clusters = ClusterManager::default();
        let def = RouteDef {
            name: "r".into(),
            rules: vec![
                RuleDef { path: PathDef::Exact("/exact".into()), headers: vec![], backends: vec![("a".into(), 1)] },
                RuleDef {
                    path: PathDef::Prefix("/api".into()),
                    headers: vec![("x-canary".into(), "1".into())],
                    backends: vec![("b".into(), 1)],
                },
                RuleDef {
                    path: PathDef::Prefix("/".into()),
                    headers: vec![],
                    backends: vec![("c".into(), 3), ("d".into(), 1)],
                },
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
        assert_eq!(&*t.route(&req("/exact", false)).unwrap().name, "a");
        assert_eq!(&*t.route(&req("/api/x", true)).unwrap().name, "b");
        assert_ne!(&*t.route(&req("/apix", true)).unwrap().name, "b");
        let mut c = 0;
        for _ in 0..4000 {
            if &*t.route(&req("/other", false)).unwrap().name == "c" {
                c += 1;
            }
        }
        assert!((2700..3300).contains(&c), "weighted split off: {c}/4000 to c");
    }
}
