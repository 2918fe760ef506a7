//! `kind: HTTPRoute`: the rules that route a service's HTTP requests (matches, filters,
//! backends, timeouts), and their checks.
use super::common::{ApplyError, check_name, check_service_ref, full_match_regex, http_header_name_invalid};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `kind: HTTPRoute` (Gateway API v1, GAMMA style: the parent is a Service).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// `timeouts` of a rule. Without retries a request makes one attempt (plus failover on connect
/// errors), so the effective limit is the smaller of the two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// From the request's arrival to the response head.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// For one attempt at a backend.
    #[serde(default, with = "crate::duration::opt", skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Duration>,
}

impl HttpRouteTimeouts {
    pub fn effective(&self) -> Option<Duration> {
        match (self.request, self.backend_request) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpRouteFilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestRedirect,
    RequestMirror,
    ExtensionRef,
}

/// One filter of a rule: `type` and the field of that type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: HttpRouteFilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, rename = "urlRewrite", skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<serde_json::Value>,
}

/// `RequestRedirect`: the sidecar answers with a redirect instead of forwarding. Unset parts
/// of the location are the request's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

/// `RequestMirror`: a copy of each request (or of `percent` / `fraction` of them) goes to
/// another service too; its answers are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: MirrorBackendRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorBackendRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "default_denominator")]
    pub denominator: u32,
}

fn default_denominator() -> u32 {
    100
}

impl RequestMirror {
    /// The share of requests mirrored, in parts per million.
    pub fn per_million(&self) -> u32 {
        match (&self.fraction, self.percent) {
            (Some(f), _) => (u64::from(f.numerator) * 1_000_000 / u64::from(f.denominator.max(1))) as u32,
            (None, Some(p)) => p * 10_000,
            (None, None) => 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Replace (or add) these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    /// Add these values, keeping any already there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UrlRewrite {
    /// The `Host` (`:authority`) the backend sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    #[default]
    PathPrefix,
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeaderMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    #[serde(default, rename = "type")]
    pub kind: HeaderMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

fn default_weight() -> u32 {
    1
}

fn valid_hostname(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
}

/// A path replacement of a URLRewrite or RequestRedirect filter at `at` in `rule`.
fn check_path_modifier(doc: usize, at: &str, p: &PathModifier, rule: &HttpRouteRule) -> Result<(), ApplyError> {
    let (value, field) = match p.kind {
        PathModifierType::ReplaceFullPath => (&p.replace_full_path, "replaceFullPath"),
        PathModifierType::ReplacePrefixMatch => (&p.replace_prefix_match, "replacePrefixMatch"),
    };
    if !value.as_deref().is_some_and(|v| v.starts_with('/')) {
        return Err(ApplyError::new(
            doc,
            format!("{at}.{field}"),
            "needs a path starting with '/' (set the field named by path.type)",
        ));
    }
    let prefix_matches = !rule.matches.is_empty()
        && rule.matches.iter().all(|m| m.path.as_ref().is_none_or(|p| p.kind == PathMatchType::PathPrefix));
    if p.kind == PathModifierType::ReplacePrefixMatch && !prefix_matches {
        return Err(ApplyError::new(
            doc,
            at.to_owned(),
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
        ));
    }
    Ok(())
}

pub(super) fn validate_route(doc: usize, spec: &HttpRouteSpec) -> Result<(), ApplyError> {
    if spec.parent_refs.is_empty() {
        return Err(ApplyError::new(doc, "spec.parentRefs", "needs at least one Service the route attaches to"));
    }
    for (i, h) in spec.hostnames.iter().enumerate() {
        if !valid_hostname(h) {
            return Err(ApplyError::new(
                doc,
                format!("spec.hostnames[{i}]"),
                format!(
                    "{h:?} is not a hostname: lowercase DNS labels, optionally starting with \"*.\" (no port, no IP address)"
                ),
            ));
        }
    }
    for (i, p) in spec.parent_refs.iter().enumerate() {
        check_service_ref(doc, &format!("spec.parentRefs[{i}]"), p.kind.as_deref(), p.group.as_deref())?;
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let redirects = rule.filters.iter().any(|f| f.kind == HttpRouteFilterType::RequestRedirect);
        if redirects {
            if !rule.backend_refs.is_empty() {
                return Err(ApplyError::new(
                    doc,
                    format!("spec.rules[{r}].backendRefs"),
                    "a rule with a RequestRedirect sends nothing to backends: remove backendRefs",
                ));
            }
            if let Some((f, other)) =
                rule.filters.iter().enumerate().find(|(_, f)| f.kind != HttpRouteFilterType::RequestRedirect)
            {
                return Err(ApplyError::new(
                    doc,
                    format!("spec.rules[{r}].filters[{f}]"),
                    format!("{:?} cannot be combined with RequestRedirect (nothing is forwarded)", other.kind),
                ));
            }
            if rule.timeouts.is_some() {
                return Err(ApplyError::new(
                    doc,
                    format!("spec.rules[{r}].timeouts"),
                    "a rule with a RequestRedirect forwards nothing to time out",
                ));
            }
            if rule.filters.iter().filter(|f| f.kind == HttpRouteFilterType::RequestRedirect).count() > 1 {
                return Err(ApplyError::new(doc, format!("spec.rules[{r}].filters"), "at most one RequestRedirect"));
            }
        } else if rule.backend_refs.is_empty() {
            return Err(ApplyError::new(doc, format!("spec.rules[{r}].backendRefs"), "needs at least one backend"));
        }
        if !redirects && rule.backend_refs.iter().all(|b| b.weight == 0) {
            return Err(ApplyError::new(
                doc,
                format!("spec.rules[{r}].backendRefs"),
                "all weights are 0, so no backend could receive traffic",
            ));
        }
        for (b, br) in rule.backend_refs.iter().enumerate() {
            check_service_ref(
                doc,
                &format!("spec.rules[{r}].backendRefs[{b}]"),
                br.kind.as_deref(),
                br.group.as_deref(),
            )?;
        }
        for (m, mat) in rule.matches.iter().enumerate() {
            let at = format!("spec.rules[{r}].matches[{m}]");
            if let Some(p) = &mat.path {
                let path = format!("{at}.path.value");
                match p.kind {
                    PathMatchType::RegularExpression => {
                        full_match_regex(&p.value).map_err(|e| ApplyError::new(doc, &path, e))?;
                    }
                    _ if !p.value.starts_with('/') => {
                        return Err(ApplyError::new(doc, path, format!("{:?} must start with '/'", p.value)));
                    }
                    _ => {}
                }
            }
            for (field, list) in [("headers", &mat.headers), ("queryParams", &mat.query_params)] {
                for (h, hm) in list.iter().enumerate() {
                    if hm.name.is_empty() || (field == "headers" && http_header_name_invalid(&hm.name)) {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.{field}[{h}].name"),
                            format!("{:?} is not a valid name", hm.name),
                        ));
                    }
                    if hm.kind == HeaderMatchType::RegularExpression {
                        full_match_regex(&hm.value)
                            .map_err(|e| ApplyError::new(doc, format!("{at}.{field}[{h}].value"), e))?;
                    }
                }
            }
        }
        if let Some(t) = &rule.timeouts
            && let (Some(req), Some(backend)) = (t.request, t.backend_request)
            && backend > req
            && !req.is_zero()
        {
            return Err(ApplyError::new(
                doc,
                format!("spec.rules[{r}].timeouts.backendRequest"),
                "must not be longer than timeouts.request",
            ));
        }
        let mut rewrites = 0;
        for (f, filter) in rule.filters.iter().enumerate() {
            let at = format!("spec.rules[{r}].filters[{f}]");
            let set = [
                (HttpRouteFilterType::RequestHeaderModifier, filter.request_header_modifier.is_some()),
                (HttpRouteFilterType::ResponseHeaderModifier, filter.response_header_modifier.is_some()),
                (HttpRouteFilterType::UrlRewrite, filter.url_rewrite.is_some()),
                (HttpRouteFilterType::RequestRedirect, filter.request_redirect.is_some()),
                (HttpRouteFilterType::RequestMirror, filter.request_mirror.is_some()),
                (HttpRouteFilterType::ExtensionRef, filter.extension_ref.is_some()),
            ];
            if set.iter().any(|(k, on)| *on != (*k == filter.kind)) {
                return Err(ApplyError::new(
                    doc,
                    at,
                    "set exactly the field of the filter's type (e.g. type: RequestHeaderModifier with requestHeaderModifier)",
                ));
            }
            match filter.kind {
                HttpRouteFilterType::RequestHeaderModifier | HttpRouteFilterType::ResponseHeaderModifier => {
                    let m = filter.request_header_modifier.as_ref().or(filter.response_header_modifier.as_ref());
                    let m = m.expect("checked above");
                    let names = m.set.iter().chain(&m.add).map(|h| &h.name).chain(&m.remove);
                    for name in names {
                        if http_header_name_invalid(name) {
                            return Err(ApplyError::new(doc, at, format!("{name:?} is not a valid HTTP header name")));
                        }
                    }
                    if let Some(h) = m.set.iter().chain(&m.add).find(|h| h.value.contains(['\r', '\n'])) {
                        return Err(ApplyError::new(
                            doc,
                            at,
                            format!("the value of {:?} contains a line break", h.name),
                        ));
                    }
                }
                HttpRouteFilterType::UrlRewrite => {
                    rewrites += 1;
                    let u = filter.url_rewrite.as_ref().expect("checked above");
                    if u.hostname.as_deref().is_some_and(|h| !valid_hostname(h) || h.starts_with("*.")) {
                        return Err(ApplyError::new(doc, format!("{at}.urlRewrite.hostname"), "is not a hostname"));
                    }
                    if let Some(p) = &u.path {
                        check_path_modifier(doc, &format!("{at}.urlRewrite.path"), p, rule)?;
                    }
                }
                HttpRouteFilterType::RequestRedirect => {
                    let rd = filter.request_redirect.as_ref().expect("checked above");
                    let at = format!("{at}.requestRedirect");
                    if rd.scheme.as_deref().is_some_and(|s| s != "http" && s != "https") {
                        return Err(ApplyError::new(doc, format!("{at}.scheme"), "must be http or https"));
                    }
                    if rd.hostname.as_deref().is_some_and(|h| !valid_hostname(h) || h.starts_with("*.")) {
                        return Err(ApplyError::new(doc, format!("{at}.hostname"), "is not a hostname"));
                    }
                    if rd.port == Some(0) {
                        return Err(ApplyError::new(doc, format!("{at}.port"), "must be 1-65535"));
                    }
                    if rd.status_code.is_some_and(|c| ![301, 302, 303, 307, 308].contains(&c)) {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.statusCode"),
                            "must be 301, 302, 303, 307 or 308",
                        ));
                    }
                    if let Some(p) = &rd.path {
                        check_path_modifier(doc, &format!("{at}.path"), p, rule)?;
                    }
                }
                HttpRouteFilterType::RequestMirror => {
                    let m = filter.request_mirror.as_ref().expect("checked above");
                    check_service_ref(
                        doc,
                        &format!("{at}.requestMirror.backendRef"),
                        m.backend_ref.kind.as_deref(),
                        m.backend_ref.group.as_deref(),
                    )?;
                    check_name(doc, &format!("{at}.requestMirror.backendRef.name"), &m.backend_ref.name)?;
                    if m.percent.is_some() && m.fraction.is_some() {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.requestMirror"),
                            "set percent or fraction, not both",
                        ));
                    }
                    if m.percent.is_some_and(|p| p > 100) {
                        return Err(ApplyError::new(doc, format!("{at}.requestMirror.percent"), "at most 100"));
                    }
                    if let Some(f) = &m.fraction
                        && (f.denominator == 0 || f.numerator > f.denominator)
                    {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.requestMirror.fraction"),
                            "needs 0 <= numerator <= denominator and a denominator above 0",
                        ));
                    }
                }
                other => {
                    return Err(ApplyError::new(
                        doc,
                        format!("{at}.type"),
                        format!(
                            "{other:?} is not supported yet; weft supports RequestHeaderModifier, ResponseHeaderModifier, URLRewrite and RequestMirror"
                        ),
                    ));
                }
            }
        }
        if rewrites > 1 {
            return Err(ApplyError::new(doc, format!("spec.rules[{r}].filters"), "at most one URLRewrite per rule"));
        }
    }
    Ok(())
}
