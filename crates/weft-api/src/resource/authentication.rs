//! `kind: RequestAuthentication`: the JSON Web Tokens a service's sidecars validate, and its
//! checks.
use super::common::{ApplyError, check_name, http_header_name_invalid};
use serde::{Deserialize, Serialize};
use std::time::Duration;

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

pub(super) fn validate_request_authn(doc: usize, spec: &RequestAuthenticationSpec) -> Result<(), ApplyError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Resource, parse_documents};

    fn err(text: &str) -> ApplyError {
        parse_documents(text).unwrap_err()
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
