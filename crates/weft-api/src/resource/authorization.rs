//! `kind: AuthorizationPolicy`: who may call a service, checked by its sidecars, and its checks.
use super::common::{ApplyError, check_name};
use serde::{Deserialize, Serialize};

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

pub(super) fn validate_authz(doc: usize, spec: &AuthorizationPolicySpec) -> Result<(), ApplyError> {
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
