//! Authorization: the inbound stack's decision on who may call what, from Envoy RBAC filters
//! (a DENY filter, then an ALLOW filter) that the control plane makes of AuthorizationPolicy
//! resources.
//!
//! Semantics, as Envoy's: a DENY policy that matches refuses the request; then, if an ALLOW
//! filter exists, the request must match one of its policies (an empty ALLOW filter allows
//! nothing). On an opaque TCP connection HTTP attributes (headers, path) are unknown: a DENY
//! rule that depends on them is taken to match, an ALLOW rule not to, so TCP fails closed.
//! The same holds for the claims of a request's JWT (checked by [`crate::jwt`] first), which
//! RBAC reaches as `envoy.filters.http.jwt_authn` metadata.
use crate::jwt::{self, Claims};
use envoy_types::pb::envoy::config::rbac::v3::{
    MetadataSource, Permission, Principal, Rbac, SourcedMetadata, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    ListMatcher, MetadataMatcher, StringMatcher, ValueMatcher, list_matcher, metadata_matcher, path_matcher,
    string_matcher, value_matcher,
};
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Match {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl Match {
    fn matches(&self, s: &str) -> bool {
        match self {
            Match::Exact(v) => s == v,
            Match::Prefix(v) => s.starts_with(v.as_str()),
            Match::Suffix(v) => s.ends_with(v.as_str()),
            Match::Contains(v) => s.contains(v.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Who {
    Any,
    And(Vec<Who>),
    Or(Vec<Who>),
    Not(Box<Who>),
    /// The caller's verified SPIFFE ID.
    Identity(Match),
    /// A claim of the request's validated JWT; HTTP only.
    Claim(ClaimMatch),
}

/// A claim of the request's validated JWT, by its path in the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimMatch {
    pub path: Vec<String>,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueMatch {
    /// The claim is a string that matches.
    String(Match),
    /// The claim is a list with a string that matches.
    OneOf(Match),
    /// The claim exists.
    Present,
}

impl ClaimMatch {
    /// `None` without HTTP (opaque TCP carries no token); no token at all matches nothing.
    fn eval(&self, s: &Subject<'_>) -> Option<bool> {
        s.http?;
        let mut v = s.claims?;
        for key in &self.path {
            v = match v.get(key.as_str()) {
                Some(v) => v,
                None => return Some(false),
            };
        }
        Some(match &self.value {
            ValueMatch::Present => true,
            ValueMatch::String(m) => v.as_str().is_some_and(|s| m.matches(s)),
            ValueMatch::OneOf(m) => {
                v.as_array().is_some_and(|a| a.iter().any(|e| e.as_str().is_some_and(|s| m.matches(s))))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    Any,
    And(Vec<What>),
    Or(Vec<What>),
    Not(Box<What>),
    /// A request header (`:method` for the method); HTTP only.
    Header(String, Match),
    /// The path without the query; HTTP only.
    Path(Match),
    /// The port the caller connected to.
    Port(u16),
    /// A claim of the request's validated JWT; HTTP only.
    Claim(ClaimMatch),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDef {
    pub name: Arc<str>,
    /// Any of these callers…
    pub who: Vec<Who>,
    /// …doing any of these.
    pub what: Vec<What>,
}

/// The authorization of one listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Authz {
    pub deny: Vec<PolicyDef>,
    /// `None`: no ALLOW filter, everything not denied is allowed.
    pub allow: Option<Vec<PolicyDef>>,
}

/// What a decision is made on.
pub struct Subject<'a> {
    pub identity: Option<&'a str>,
    pub port: u16,
    /// Method, path and headers; `None` for opaque TCP.
    pub http: Option<&'a http::request::Parts>,
    /// The claims of the request's validated JWT, if it carried one.
    pub claims: Option<&'a Claims>,
}

/// A refusal, naming the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub policy: Arc<str>,
}

/// The name a refusal carries when no ALLOW policy matched.
pub const NO_ALLOW_MATCHED: &str = "default-deny";

// Three-valued: `None` when the answer depends on HTTP attributes a TCP connection lacks.
fn all(items: impl Iterator<Item = Option<bool>>) -> Option<bool> {
    let mut unknown = false;
    for i in items {
        match i {
            Some(false) => return Some(false),
            None => unknown = true,
            Some(true) => {}
        }
    }
    if unknown { None } else { Some(true) }
}

fn any(items: impl Iterator<Item = Option<bool>>) -> Option<bool> {
    let mut unknown = false;
    for i in items {
        match i {
            Some(true) => return Some(true),
            None => unknown = true,
            Some(false) => {}
        }
    }
    if unknown { None } else { Some(false) }
}

impl Who {
    fn eval(&self, s: &Subject<'_>) -> Option<bool> {
        match self {
            Who::Any => Some(true),
            Who::And(v) => all(v.iter().map(|w| w.eval(s))),
            Who::Or(v) => any(v.iter().map(|w| w.eval(s))),
            Who::Not(w) => w.eval(s).map(|b| !b),
            Who::Identity(m) => Some(s.identity.is_some_and(|id| m.matches(id))),
            Who::Claim(c) => c.eval(s),
        }
    }
}

impl What {
    fn eval(&self, s: &Subject<'_>) -> Option<bool> {
        match self {
            What::Any => Some(true),
            What::And(v) => all(v.iter().map(|w| w.eval(s))),
            What::Or(v) => any(v.iter().map(|w| w.eval(s))),
            What::Not(w) => w.eval(s).map(|b| !b),
            What::Port(p) => Some(s.port == *p),
            What::Claim(c) => c.eval(s),
            What::Path(m) => s.http.map(|h| m.matches(h.uri.path())),
            What::Header(name, m) => s.http.map(|h| {
                if name == ":method" {
                    m.matches(h.method.as_str())
                } else {
                    h.headers.get_all(name.as_str()).iter().any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
                }
            }),
        }
    }
}

impl PolicyDef {
    fn eval(&self, s: &Subject<'_>) -> Option<bool> {
        let who = any(self.who.iter().map(|w| w.eval(s)));
        if who == Some(false) {
            return Some(false);
        }
        all([who, any(self.what.iter().map(|w| w.eval(s)))].into_iter())
    }
}

impl Authz {
    /// Ok with the ALLOW policy that matched (if an ALLOW filter exists), or the refusal.
    pub fn check(&self, s: &Subject<'_>) -> Result<Option<Arc<str>>, Denied> {
        if let Some(p) = self.deny.iter().find(|p| p.eval(s) != Some(false)) {
            return Err(Denied { policy: p.name.clone() });
        }
        match &self.allow {
            None => Ok(None),
            Some(allow) => match allow.iter().find(|p| p.eval(s) == Some(true)) {
                Some(p) => Ok(Some(p.name.clone())),
                None => Err(Denied { policy: NO_ALLOW_MATCHED.into() }),
            },
        }
    }
}

// ---- decoding from Envoy RBAC ----

fn string_match(m: Option<&StringMatcher>, at: &str) -> Result<Match, String> {
    let m = m.ok_or_else(|| format!("{at}: no string matcher"))?;
    if m.ignore_case {
        return Err(format!("{at}: ignore_case is not supported"));
    }
    match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(v)) => Ok(Match::Exact(v.clone())),
        Some(string_matcher::MatchPattern::Prefix(v)) => Ok(Match::Prefix(v.clone())),
        Some(string_matcher::MatchPattern::Suffix(v)) => Ok(Match::Suffix(v.clone())),
        Some(string_matcher::MatchPattern::Contains(v)) => Ok(Match::Contains(v.clone())),
        _ => Err(format!("{at}: only exact, prefix, suffix and contains string matches are supported")),
    }
}

/// A metadata matcher on a JWT claim: filter `envoy.filters.http.jwt_authn`, path
/// `payload` then the claim's path.
fn claim(m: &MetadataMatcher, at: &str) -> Result<ClaimMatch, String> {
    if m.filter != jwt::METADATA_FILTER || m.invert {
        return Err(format!(
            "{at}: metadata matchers are supported on filter {:?} (JWT claims) without invert only",
            jwt::METADATA_FILTER
        ));
    }
    let mut path = Vec::with_capacity(m.path.len());
    for seg in &m.path {
        match &seg.segment {
            Some(metadata_matcher::path_segment::Segment::Key(k)) => path.push(k.clone()),
            None => return Err(format!("{at}: empty metadata path segment")),
        }
    }
    if path.first().map(String::as_str) != Some(jwt::PAYLOAD_KEY) || path.len() < 2 {
        return Err(format!("{at}: a JWT claim's metadata path must be {:?} then the claim", jwt::PAYLOAD_KEY));
    }
    path.remove(0);
    let unsupported = || {
        format!(
            "{at}: a claim value matcher must be a string match, present_match, or list_match one_of a string match"
        )
    };
    let value = match m.value.as_ref().and_then(|v| v.match_pattern.as_ref()) {
        Some(value_matcher::MatchPattern::StringMatch(sm)) => ValueMatch::String(string_match(Some(sm), at)?),
        Some(value_matcher::MatchPattern::PresentMatch(true)) => ValueMatch::Present,
        Some(value_matcher::MatchPattern::ListMatch(l)) => match &**l {
            ListMatcher { match_pattern: Some(list_matcher::MatchPattern::OneOf(v)) } => match &**v {
                ValueMatcher { match_pattern: Some(value_matcher::MatchPattern::StringMatch(sm)) } => {
                    ValueMatch::OneOf(string_match(Some(sm), at)?)
                }
                _ => return Err(unsupported()),
            },
            _ => return Err(unsupported()),
        },
        _ => return Err(unsupported()),
    };
    Ok(ClaimMatch { path, value })
}

fn sourced_claim(m: &SourcedMetadata, at: &str) -> Result<ClaimMatch, String> {
    if m.metadata_source != MetadataSource::Dynamic as i32 {
        return Err(format!("{at}: only dynamic metadata (JWT claims) can be matched"));
    }
    claim(m.metadata_matcher.as_ref().ok_or_else(|| format!("{at}: sourced_metadata without a matcher"))?, at)
}

fn header(h: &HeaderMatcher, at: &str) -> Result<What, String> {
    let honoured = HeaderMatcher {
        name: h.name.clone(),
        header_match_specifier: h.header_match_specifier.clone(),
        ..Default::default()
    };
    if &honoured != h {
        return Err(format!("{at}: header matcher {:?} sets fields weft does not support", h.name));
    }
    let m = match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)) => string_match(Some(m), at)?,
        _ => return Err(format!("{at}: header {:?} needs a string match", h.name)),
    };
    Ok(What::Header(h.name.to_ascii_lowercase(), m))
}

fn what(p: &Permission, at: &str) -> Result<What, String> {
    let set = |rules: &[Permission]| rules.iter().map(|r| what(r, at)).collect::<Result<Vec<_>, _>>();
    Ok(match &p.rule {
        Some(permission::Rule::Any(true)) => What::Any,
        Some(permission::Rule::AndRules(s)) => What::And(set(&s.rules)?),
        Some(permission::Rule::OrRules(s)) => What::Or(set(&s.rules)?),
        Some(permission::Rule::NotRule(r)) => What::Not(Box::new(what(r, at)?)),
        Some(permission::Rule::Header(h)) => header(h, at)?,
        Some(permission::Rule::UrlPath(pm)) => match &pm.rule {
            Some(path_matcher::Rule::Path(m)) => What::Path(string_match(Some(m), at)?),
            None => return Err(format!("{at}: url_path without a path matcher")),
        },
        Some(permission::Rule::SourcedMetadata(m)) => What::Claim(sourced_claim(m, at)?),
        Some(permission::Rule::DestinationPort(port)) => {
            What::Port(u16::try_from(*port).map_err(|_| format!("{at}: port {port} is out of range"))?)
        }
        _ => {
            return Err(format!(
                "{at}: a permission weft does not support (it honours any, and_rules, or_rules, not_rule, header, url_path, destination_port, sourced_metadata)"
            ));
        }
    })
}

fn who(p: &Principal, at: &str) -> Result<Who, String> {
    let set = |ids: &[Principal]| ids.iter().map(|i| who(i, at)).collect::<Result<Vec<_>, _>>();
    Ok(match &p.identifier {
        Some(principal::Identifier::Any(true)) => Who::Any,
        Some(principal::Identifier::AndIds(s)) => Who::And(set(&s.ids)?),
        Some(principal::Identifier::OrIds(s)) => Who::Or(set(&s.ids)?),
        Some(principal::Identifier::NotId(i)) => Who::Not(Box::new(who(i, at)?)),
        Some(principal::Identifier::Authenticated(a)) => match &a.principal_name {
            Some(m) => Who::Identity(string_match(Some(m), at)?),
            // Envoy: any authenticated peer.
            None => Who::Identity(Match::Prefix(String::new())),
        },
        Some(principal::Identifier::SourcedMetadata(m)) => Who::Claim(sourced_claim(m, at)?),
        _ => {
            return Err(format!(
                "{at}: a principal weft does not support (it honours any, and_ids, or_ids, not_id, authenticated, sourced_metadata)"
            ));
        }
    })
}

/// Adds one RBAC filter's rules (in filter order: DENY before ALLOW).
pub fn add_rbac(authz: &mut Authz, rules: &Rbac, filter: &str) -> Result<(), String> {
    let honoured = Rbac { action: rules.action, policies: rules.policies.clone(), ..Default::default() };
    if &honoured != rules {
        return Err(format!("{filter}: RBAC sets fields weft does not support (audit logging)"));
    }
    let mut policies = Vec::new();
    let mut names: Vec<&String> = rules.policies.keys().collect();
    names.sort();
    for name in names {
        let p = &rules.policies[name];
        let at = format!("{filter}: policy {name:?}");
        if p.condition.is_some() || p.checked_condition.is_some() {
            return Err(format!("{at}: CEL conditions are not supported"));
        }
        policies.push(PolicyDef {
            name: name.as_str().into(),
            who: p.principals.iter().map(|x| who(x, &at)).collect::<Result<_, _>>()?,
            what: p.permissions.iter().map(|x| what(x, &at)).collect::<Result<_, _>>()?,
        });
    }
    match rbac::Action::try_from(rules.action) {
        Ok(rbac::Action::Deny) if authz.allow.is_none() => authz.deny.extend(policies),
        Ok(rbac::Action::Deny) => {
            return Err(format!("{filter}: a DENY RBAC filter after an ALLOW one is not supported"));
        }
        Ok(rbac::Action::Allow) if authz.allow.is_none() => authz.allow = Some(policies),
        Ok(rbac::Action::Allow) => return Err(format!("{filter}: more than one ALLOW RBAC filter is not supported")),
        _ => return Err(format!("{filter}: RBAC action LOG is not supported")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, path: &str) -> http::request::Parts {
        http::Request::builder().method(method).uri(path).body(()).unwrap().into_parts().0
    }

    fn policy(name: &str, who: Vec<Who>, what: Vec<What>) -> PolicyDef {
        PolicyDef { name: name.into(), who, what }
    }

    const FRONTEND: &str = "spiffe://weft.local/ns/default/sa/frontend";

    #[test]
    fn deny_wins_allow_must_match_and_tcp_fails_closed() {
        let frontend = Who::Identity(Match::Exact(FRONTEND.into()));
        let get_admin = What::And(vec![
            What::Header(":method".into(), Match::Exact("GET".into())),
            What::Path(Match::Prefix("/admin".into())),
        ]);
        let authz = Authz {
            deny: vec![policy("no-admin", vec![Who::Any], vec![get_admin])],
            allow: Some(vec![policy("frontend-only", vec![frontend], vec![What::Any])]),
        };
        let get = |path| parts("GET", path);
        let (admin, root) = (get("/admin/x"), get("/"));
        let s = |identity, http| Subject { identity, port: 80, http, claims: None };
        assert_eq!(authz.check(&s(Some(FRONTEND), Some(&root))), Ok(Some("frontend-only".into())));
        assert_eq!(authz.check(&s(Some(FRONTEND), Some(&admin))), Err(Denied { policy: "no-admin".into() }));
        let other = "spiffe://weft.local/ns/default/sa/other";
        assert_eq!(authz.check(&s(Some(other), Some(&root))), Err(Denied { policy: NO_ALLOW_MATCHED.into() }));
        assert_eq!(authz.check(&s(None, Some(&root))), Err(Denied { policy: NO_ALLOW_MATCHED.into() }));
        // TCP: the DENY rule on a path cannot be ruled out, so it applies.
        assert_eq!(authz.check(&s(Some(FRONTEND), None)), Err(Denied { policy: "no-admin".into() }));
        // An empty ALLOW filter allows nothing.
        let nothing = Authz { deny: vec![], allow: Some(vec![]) };
        assert!(nothing.check(&s(Some(FRONTEND), Some(&root))).is_err());
        assert_eq!(Authz::default().check(&s(None, None)), Ok(None));
    }

    #[test]
    fn claims_match_strings_and_lists_and_tcp_cannot_carry_them() {
        let admins = What::Claim(ClaimMatch {
            path: vec!["groups".into()],
            value: ValueMatch::OneOf(Match::Exact("admin".into())),
        });
        let alice = Who::Claim(ClaimMatch {
            path: vec!["sub".into()],
            value: ValueMatch::String(Match::Exact("alice".into())),
        });
        let authz = Authz { deny: vec![], allow: Some(vec![policy("admins", vec![alice.clone()], vec![admins])]) };
        let root = parts("GET", "/");
        let claims = |v: serde_json::Value| v;
        let admin = claims(serde_json::json!({"sub": "alice", "groups": ["dev", "admin"]}));
        let dev = claims(serde_json::json!({"sub": "alice", "groups": ["dev"]}));
        let bob = claims(serde_json::json!({"sub": "bob", "groups": ["admin"]}));
        let s = |http, claims| Subject { identity: None, port: 80, http, claims };
        assert_eq!(authz.check(&s(Some(&root), Some(&admin))), Ok(Some("admins".into())));
        assert!(authz.check(&s(Some(&root), Some(&dev))).is_err());
        assert!(authz.check(&s(Some(&root), Some(&bob))).is_err());
        assert!(authz.check(&s(Some(&root), None)).is_err(), "no token matches no claim");
        // A DENY on a request principal applies to TCP, which cannot show it is someone else.
        let deny = Authz { deny: vec![policy("no-alice", vec![alice], vec![What::Any])], allow: None };
        assert!(deny.check(&s(None, None)).is_err());
        assert!(deny.check(&s(Some(&root), Some(&bob))).is_ok());
    }
}
