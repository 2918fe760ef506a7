//! AuthorizationPolicy → Envoy RBAC, for a service's inbound listeners: one DENY RBAC filter
//! (if any DENY policy applies) before one ALLOW filter (if any ALLOW policy applies), on the
//! HTTP connection manager and, as network filters, on the TCP chain. Each RBAC policy is named
//! after the AuthorizationPolicy it comes from, so a refusal names it.
use crate::authn::{METADATA_FILTER, PAYLOAD_KEY};
use envoy_types::pb::envoy::config::rbac::v3::{
    MetadataSource, Permission, Policy, Principal, Rbac, SourcedMetadata, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    ListMatcher, MetadataMatcher, PathMatcher, StringMatcher, ValueMatcher, list_matcher, metadata_matcher,
    path_matcher, string_matcher, value_matcher,
};
use std::collections::HashMap;
use weft_api::identity::spiffe_id;
use weft_api::resource::{AuthorizationPolicySpec, AuthzAction, AuthzRule, Object};

/// The policies of one service, split by action; `None` when no policy of that action applies.
pub struct ServiceRbac {
    pub deny: Option<Rbac>,
    pub allow: Option<Rbac>,
}

impl ServiceRbac {
    pub fn is_empty(&self) -> bool {
        self.deny.is_none() && self.allow.is_none()
    }

    /// The HTTP filters, DENY first.
    pub fn http(&self) -> Vec<HttpRbac> {
        [&self.deny, &self.allow]
            .into_iter()
            .flatten()
            .map(|r| HttpRbac { rules: Some(r.clone()), ..Default::default() })
            .collect()
    }

    /// The network filters, DENY first.
    pub fn network(&self, stat_prefix: &str) -> Vec<NetworkRbac> {
        [&self.deny, &self.allow]
            .into_iter()
            .flatten()
            .map(|r| NetworkRbac { rules: Some(r.clone()), stat_prefix: stat_prefix.to_owned(), ..Default::default() })
            .collect()
    }
}

fn exact(s: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(string_matcher::MatchPattern::Exact(s.to_owned())), ..Default::default() }
}

fn string(pattern: string_matcher::MatchPattern) -> StringMatcher {
    StringMatcher { match_pattern: Some(pattern), ..Default::default() }
}

fn any_principal() -> Principal {
    Principal { identifier: Some(principal::Identifier::Any(true)) }
}

fn any_permission() -> Permission {
    Permission { rule: Some(permission::Rule::Any(true)) }
}

fn authenticated(m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated { principal_name: Some(m) })),
    }
}

fn or_ids(ids: Vec<Principal>) -> Principal {
    Principal { identifier: Some(principal::Identifier::OrIds(principal::Set { ids })) }
}

fn or_rules(rules: Vec<Permission>) -> Permission {
    Permission { rule: Some(permission::Rule::OrRules(permission::Set { rules })) }
}

fn header(name: &str, value: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::Header(HeaderMatcher {
            name: name.to_owned(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(exact(value))),
            ..Default::default()
        })),
    }
}

/// A matcher on a claim of the request's validated JWT (as the jwt_authn filter publishes it).
fn claim(path: &str, value: value_matcher::MatchPattern) -> SourcedMetadata {
    let segments = std::iter::once(PAYLOAD_KEY)
        .chain(path.split('.'))
        .map(|k| metadata_matcher::PathSegment {
            segment: Some(metadata_matcher::path_segment::Segment::Key(k.to_owned())),
        })
        .collect();
    SourcedMetadata {
        metadata_matcher: Some(MetadataMatcher {
            filter: METADATA_FILTER.to_owned(),
            path: segments,
            value: Some(ValueMatcher { match_pattern: Some(value) }),
            invert: false,
        }),
        metadata_source: MetadataSource::Dynamic as i32,
    }
}

fn claim_is(path: &str, value: &str) -> SourcedMetadata {
    claim(path, value_matcher::MatchPattern::StringMatch(exact(value)))
}

/// A claim that is the value, or a list holding it (`groups: [a, b]`).
fn claim_has(path: &str, value: &str) -> Permission {
    let one_of = ValueMatcher { match_pattern: Some(value_matcher::MatchPattern::StringMatch(exact(value))) };
    let list = ListMatcher { match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(one_of))) };
    or_rules(vec![
        Permission { rule: Some(permission::Rule::SourcedMetadata(claim_is(path, value))) },
        Permission {
            rule: Some(permission::Rule::SourcedMetadata(claim(
                path,
                value_matcher::MatchPattern::ListMatch(Box::new(list)),
            ))),
        },
    ])
}

/// `ISSUER/SUBJECT`, `ISSUER/*` or `*` as a principal on the token's `iss` and `sub`.
fn request_principal(p: &str) -> Principal {
    let by = |m: SourcedMetadata| Principal { identifier: Some(principal::Identifier::SourcedMetadata(m)) };
    if p == "*" {
        return by(claim("iss", value_matcher::MatchPattern::PresentMatch(true)));
    }
    let (iss, sub) = p.rsplit_once('/').unwrap_or((p, "*"));
    if sub == "*" {
        return by(claim_is("iss", iss));
    }
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set {
            ids: vec![by(claim_is("iss", iss)), by(claim_is("sub", sub))],
        })),
    }
}

fn path(p: &str) -> Permission {
    let m = match p.strip_suffix('*') {
        Some(prefix) => string(string_matcher::MatchPattern::Prefix(prefix.to_owned())),
        None => exact(p),
    };
    Permission { rule: Some(permission::Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(m)) })) }
}

/// One rule as an RBAC policy: callers (principals) × operations and conditions (permissions).
fn policy(rule: &AuthzRule, trust_domain: &str, namespace: &str) -> Policy {
    let principals = if rule.from.is_empty() {
        vec![any_principal()]
    } else {
        rule.from
            .iter()
            .map(|src| {
                // Each field set must match (any of its values): services and identities
                // are two conditions, not one list.
                let mut all = Vec::new();
                if !src.services.is_empty() {
                    let ids = src.services.iter().map(|s| authenticated(exact(&spiffe_id(trust_domain, namespace, s))));
                    all.push(or_ids(ids.collect()));
                }
                if !src.identities.is_empty() {
                    all.push(or_ids(src.identities.iter().map(|id| authenticated(exact(id))).collect()));
                }
                if !src.namespaces.is_empty() {
                    let ns = src
                        .namespaces
                        .iter()
                        .map(|n| authenticated(string(string_matcher::MatchPattern::Contains(format!("/ns/{n}/sa/")))));
                    all.push(or_ids(ns.collect()));
                }
                if !src.request_principals.is_empty() {
                    all.push(or_ids(src.request_principals.iter().map(|p| request_principal(p)).collect()));
                }
                if !src.trust_domains.is_empty() {
                    let tds = src
                        .trust_domains
                        .iter()
                        .map(|t| authenticated(string(string_matcher::MatchPattern::Prefix(format!("spiffe://{t}/")))));
                    all.push(or_ids(tds.collect()));
                }
                Principal { identifier: Some(principal::Identifier::AndIds(principal::Set { ids: all })) }
            })
            .collect()
    };
    let mut conditions = Vec::new();
    if !rule.to.is_empty() {
        let ops = rule.to.iter().map(|op| {
            let mut all = Vec::new();
            if !op.methods.is_empty() {
                all.push(or_rules(op.methods.iter().map(|m| header(":method", m)).collect()));
            }
            if !op.paths.is_empty() {
                all.push(or_rules(op.paths.iter().map(|p| path(p)).collect()));
            }
            if !op.ports.is_empty() {
                let ports = op
                    .ports
                    .iter()
                    .map(|p| Permission { rule: Some(permission::Rule::DestinationPort(u32::from(*p))) });
                all.push(or_rules(ports.collect()));
            }
            if all.is_empty() {
                any_permission()
            } else {
                Permission { rule: Some(permission::Rule::AndRules(permission::Set { rules: all })) }
            }
        });
        conditions.push(or_rules(ops.collect()));
    }
    for c in &rule.when {
        if c.claim.is_empty() {
            let name = c.header.to_ascii_lowercase();
            conditions.push(or_rules(c.values.iter().map(|v| header(&name, v)).collect()));
        } else {
            conditions.push(or_rules(c.values.iter().map(|v| claim_has(&c.claim, v)).collect()));
        }
    }
    let permissions = if conditions.is_empty() {
        vec![any_permission()]
    } else {
        vec![Permission { rule: Some(permission::Rule::AndRules(permission::Set { rules: conditions })) }]
    };
    Policy { permissions, principals, ..Default::default() }
}

/// RBAC for `service` from the policies that target it or the whole mesh.
pub fn for_service(
    service: &str,
    policies: &[&Object<AuthorizationPolicySpec>],
    trust_domain: &str,
    namespace: &str,
) -> ServiceRbac {
    let mut deny: HashMap<String, Policy> = HashMap::new();
    let mut allow: Option<HashMap<String, Policy>> = None;
    for p in policies.iter().filter(|p| p.spec.service.as_deref().is_none_or(|s| s == service)) {
        let name = &p.metadata.name;
        // RBAC matches a policy if any permission and any principal match, so each rule of an
        // AuthorizationPolicy is its own RBAC policy, `NAME` or `NAME#i`.
        let rules: Vec<(String, Policy)> = p
            .spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (if i == 0 { name.clone() } else { format!("{name}#{i}") }, policy(r, trust_domain, namespace))
            })
            .collect();
        match p.spec.action {
            AuthzAction::Deny => deny.extend(rules),
            AuthzAction::Allow => allow.get_or_insert_default().extend(rules),
        }
    }
    let rbac = |action: rbac::Action, policies: HashMap<String, Policy>| Rbac {
        action: action as i32,
        policies,
        ..Default::default()
    };
    ServiceRbac {
        deny: (!deny.is_empty()).then(|| rbac(rbac::Action::Deny, deny)),
        allow: allow.map(|a| rbac(rbac::Action::Allow, a)),
    }
}
