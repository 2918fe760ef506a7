//! `kind: GRPCRoute`: gRPC calls routed by service and method, as the HTTPRoute rules they
//! become, and their checks.
use super::common::{ApplyError, full_match_regex};
use super::route::{
    BackendRef, HeaderMatch, HeaderMatchType, HttpRouteFilter, HttpRouteFilterType, HttpRouteMatch, HttpRouteRule,
    HttpRouteSpec, ParentRef, PathMatch, PathMatchType, validate_route,
};
use serde::{Deserialize, Serialize};

/// `kind: GRPCRoute` (Gateway API v1, GAMMA style): routes gRPC calls to a service by their
/// service and method. Translated into the same routes as an HTTPRoute (a call's path is
/// `/SERVICE/METHOD`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A call's gRPC service (`package.Service`) and/or method; at least one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub kind: HeaderMatchType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl GrpcRouteSpec {
    /// The route as HTTPRoute rules: a method match becomes a path match on `/SERVICE/METHOD`
    /// (exact for both, a prefix for a service alone, a regular expression otherwise).
    pub fn http_rules(&self) -> Vec<HttpRouteRule> {
        self.rules
            .iter()
            .map(|r| HttpRouteRule {
                matches: r
                    .matches
                    .iter()
                    .map(|m| HttpRouteMatch {
                        path: m.method.as_ref().map(grpc_path),
                        headers: m.headers.clone(),
                        ..Default::default()
                    })
                    .collect(),
                filters: r.filters.clone(),
                backend_refs: r.backend_refs.clone(),
                timeouts: None,
            })
            .collect()
    }

    pub fn as_http(&self) -> HttpRouteSpec {
        HttpRouteSpec {
            parent_refs: self.parent_refs.clone(),
            hostnames: self.hostnames.clone(),
            rules: self.http_rules(),
        }
    }
}

fn grpc_path(m: &GrpcMethodMatch) -> PathMatch {
    match (m.kind, m.service.as_deref(), m.method.as_deref()) {
        (HeaderMatchType::Exact, Some(s), Some(me)) => {
            PathMatch { kind: PathMatchType::Exact, value: format!("/{s}/{me}") }
        }
        (HeaderMatchType::Exact, Some(s), None) => {
            PathMatch { kind: PathMatchType::PathPrefix, value: format!("/{s}") }
        }
        (HeaderMatchType::Exact, None, me) => PathMatch {
            kind: PathMatchType::RegularExpression,
            value: format!("/[^/]+/{}", regex::escape(me.unwrap_or_default())),
        },
        // Each part grouped, so an alternation in one stays inside it.
        (HeaderMatchType::RegularExpression, s, me) => PathMatch {
            kind: PathMatchType::RegularExpression,
            value: format!("/(?:{})/(?:{})", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+")),
        },
    }
}

pub(super) fn validate_grpc_route(doc: usize, spec: &GrpcRouteSpec) -> Result<(), ApplyError> {
    let name_ok = |s: &str, dots: bool| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.'))
    };
    for (r, rule) in spec.rules.iter().enumerate() {
        for (i, m) in rule.matches.iter().enumerate() {
            let Some(mm) = &m.method else { continue };
            let at = format!("spec.rules[{r}].matches[{i}].method");
            if mm.service.is_none() && mm.method.is_none() {
                return Err(ApplyError::new(doc, at, "set service, method or both"));
            }
            for (field, value, dots) in [("service", &mm.service, true), ("method", &mm.method, false)] {
                let Some(v) = value else { continue };
                match mm.kind {
                    HeaderMatchType::Exact if !name_ok(v, dots) => {
                        return Err(ApplyError::new(
                            doc,
                            format!("{at}.{field}"),
                            format!(
                                "{v:?} is not a gRPC {field} name (letters, digits and _{})",
                                if dots { ", dots between parts" } else { "" }
                            ),
                        ));
                    }
                    HeaderMatchType::RegularExpression => {
                        if v.contains('/') {
                            return Err(ApplyError::new(doc, format!("{at}.{field}"), "must not match '/'"));
                        }
                        full_match_regex(v).map_err(|e| ApplyError::new(doc, format!("{at}.{field}"), e))?;
                    }
                    _ => {}
                }
            }
        }
        for (f, filter) in rule.filters.iter().enumerate() {
            if !matches!(
                filter.kind,
                HttpRouteFilterType::RequestHeaderModifier
                    | HttpRouteFilterType::ResponseHeaderModifier
                    | HttpRouteFilterType::RequestMirror
            ) {
                return Err(ApplyError::new(
                    doc,
                    format!("spec.rules[{r}].filters[{f}].type"),
                    format!(
                        "{:?} is not a GRPCRoute filter weft supports; use RequestHeaderModifier, ResponseHeaderModifier or RequestMirror",
                        filter.kind
                    ),
                ));
            }
        }
    }
    // The rest is checked as the HTTPRoute it becomes (the field paths are the same).
    validate_route(doc, &spec.as_http())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_method_matches_become_paths() {
        let m = |kind, service: Option<&str>, method: Option<&str>| {
            grpc_path(&GrpcMethodMatch { kind, service: service.map(str::to_owned), method: method.map(str::to_owned) })
        };
        let exact = m(HeaderMatchType::Exact, Some("pkg.Svc"), Some("Get"));
        assert_eq!((exact.kind, exact.value.as_str()), (PathMatchType::Exact, "/pkg.Svc/Get"));
        let service = m(HeaderMatchType::Exact, Some("pkg.Svc"), None);
        assert_eq!((service.kind, service.value.as_str()), (PathMatchType::PathPrefix, "/pkg.Svc"));
        let re = full_match_regex(&m(HeaderMatchType::RegularExpression, Some("a|b"), Some("Get")).value).unwrap();
        assert!(re.is_match("/a/Get") && re.is_match("/b/Get"));
        assert!(!re.is_match("/a") && !re.is_match("/c/Get"), "an alternation stays within its part");
        let method = full_match_regex(&m(HeaderMatchType::Exact, None, Some("Get")).value).unwrap();
        assert!(method.is_match("/any.Svc/Get") && !method.is_match("/any.Svc/GetAll"));
    }
}
