//! Configuration resources users apply: Kubernetes-style documents with `apiVersion`, `kind`,
//! `metadata` and `spec`. Parsing and validation happen here, once, at apply time; a document
//! that passes [`parse_documents`] and the control plane's reference check is always translatable.
//! Each kind's types and checks are in a module of their own (`resource/service.rs`, ...);
//! what the checks share is in `resource/common.rs`.
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

mod authentication;
mod authorization;
mod common;
mod exported;
mod grpc_route;
mod route;
mod service;
mod telemetry;
mod traffic_policy;

// Every public item of the kinds' modules, so that each keeps its path `weft_api::resource::X`.
pub use authentication::{
    DEFAULT_JWKS_REFRESH, DEFAULT_JWT_CLOCK_SKEW, JwksSource, JwtHeader, JwtIssuer, RequestAuthenticationSpec,
};
pub use authorization::{AuthorizationPolicySpec, AuthzAction, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource};
pub use common::{ApplyError, full_match_regex, valid_name};
pub use exported::{Consumer, ExportedService, ExportedServicesSpec};
pub use grpc_route::{GrpcMethodMatch, GrpcRouteMatch, GrpcRouteRule, GrpcRouteSpec};
pub use route::{
    BackendRef, Fraction, HeaderMatch, HeaderMatchType, HeaderModifier, HeaderValue, HttpRouteFilter,
    HttpRouteFilterType, HttpRouteMatch, HttpRouteRule, HttpRouteSpec, HttpRouteTimeouts, MirrorBackendRef, ParentRef,
    PathMatch, PathMatchType, PathModifier, PathModifierType, RequestMirror, RequestRedirect, UrlRewrite,
};
pub use service::{
    ConsistentHash, DEFAULT_CONNECT_TIMEOUT, Egress, EscapedSlashes, LoadBalancer, LocalityPolicy, MtlsMode, Protocol,
    ServiceSelector, ServiceSpec,
};
pub use telemetry::{AccessLogSpec, DEFAULT_TRACE_SAMPLING_PERCENT, TelemetrySpec, TracingSpec};
pub use traffic_policy::{
    ActiveHealthCheck, ConnectionPool, DEFAULT_BASE_EJECTION_TIME, DEFAULT_CONSECUTIVE_5XX,
    DEFAULT_HEALTH_CHECK_INTERVAL, DEFAULT_HEALTH_CHECK_TIMEOUT, DEFAULT_MAX_EJECTION_PERCENT,
    DEFAULT_MAX_EJECTION_TIME, DEFAULT_MIN_RETRIES_PER_SECOND, DEFAULT_PANIC_THRESHOLD, DEFAULT_RETRY_BUDGET_TTL,
    DEFAULT_RETRY_ON, FaultAbort, FaultDelay, FaultInjection, GATEWAY_API_GROUP, HttpHealthCheck, MAX_BODY_BYTES_LIMIT,
    OutlierDetection, PolicyTargetRef, RETRY_ON, RateLimitPolicy, RetryBackoff, RetryBudget, RetryPolicy,
    TcpHealthCheck, TokenBucket, TrafficPolicySpec, percent_per_million,
};

use authentication::validate_request_authn;
use authorization::validate_authz;
use common::check_name;
use exported::validate_exported;
use grpc_route::validate_grpc_route;
use route::validate_route;
use service::validate_service;
use telemetry::validate_telemetry;
use traffic_policy::validate_traffic_policy;

pub const WEFT_API_VERSION: &str = "weft.dev/v1alpha1";
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// The kinds of resource `weft apply` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Service,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    AuthorizationPolicy,
    RequestAuthentication,
    TrafficPolicy,
    Telemetry,
    ExportedServices,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Service,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::TrafficPolicy,
        Kind::Telemetry,
        Kind::ExportedServices,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::Telemetry => "Telemetry",
            Kind::ExportedServices => "ExportedServices",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service
            | Kind::AuthorizationPolicy
            | Kind::RequestAuthentication
            | Kind::TrafficPolicy
            | Kind::Telemetry
            | Kind::ExportedServices => WEFT_API_VERSION,
            Kind::HttpRoute | Kind::GrpcRoute => GATEWAY_API_VERSION,
        }
    }

    /// Accepts the kind as written in a document (`HTTPRoute`) or on the command line
    /// (`httproutes`, `httproute`, `services`, `svc`).
    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Some(Kind::Service),
            "httproute" | "httproutes" => Some(Kind::HttpRoute),
            "grpcroute" | "grpcroutes" => Some(Kind::GrpcRoute),
            "authorizationpolicy" | "authorizationpolicies" | "authz" => Some(Kind::AuthorizationPolicy),
            "requestauthentication" | "requestauthentications" | "jwt" => Some(Kind::RequestAuthentication),
            "trafficpolicy" | "trafficpolicies" => Some(Kind::TrafficPolicy),
            "telemetry" | "telemetries" => Some(Kind::Telemetry),
            "exportedservices" | "exports" => Some(Kind::ExportedServices),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A document of one kind: the common envelope around a kind-specific `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    pub api_version: String,
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: S,
}

/// One validated resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Resource {
    Service(Object<ServiceSpec>),
    HttpRoute(Object<HttpRouteSpec>),
    GrpcRoute(Object<GrpcRouteSpec>),
    AuthorizationPolicy(Object<AuthorizationPolicySpec>),
    RequestAuthentication(Object<RequestAuthenticationSpec>),
    TrafficPolicy(Object<TrafficPolicySpec>),
    Telemetry(Object<TelemetrySpec>),
    ExportedServices(Object<ExportedServicesSpec>),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Service(_) => Kind::Service,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::GrpcRoute(_) => Kind::GrpcRoute,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::RequestAuthentication(_) => Kind::RequestAuthentication,
            Resource::TrafficPolicy(_) => Kind::TrafficPolicy,
            Resource::Telemetry(_) => Kind::Telemetry,
            Resource::ExportedServices(_) => Kind::ExportedServices,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::Service(o) => &o.metadata.name,
            Resource::HttpRoute(o) => &o.metadata.name,
            Resource::GrpcRoute(o) => &o.metadata.name,
            Resource::AuthorizationPolicy(o) => &o.metadata.name,
            Resource::RequestAuthentication(o) => &o.metadata.name,
            Resource::TrafficPolicy(o) => &o.metadata.name,
            Resource::Telemetry(o) => &o.metadata.name,
            Resource::ExportedServices(o) => &o.metadata.name,
        }
    }

    /// Store key: `Kind/name`.
    pub fn key(&self) -> String {
        key(self.kind(), self.name())
    }

    /// Parses and validates one document already decoded into a generic tree (YAML or JSON).
    pub fn from_value<'de, D>(document: usize, value: D, kind: Option<&str>) -> Result<Self, ApplyError>
    where
        D: serde::Deserializer<'de>,
    {
        let kind_str = kind.ok_or_else(|| {
            ApplyError::new(document, "kind", "missing; every document needs a kind (Service or HTTPRoute)")
        })?;
        let kind = Kind::parse(kind_str).filter(|k| k.as_str() == kind_str).ok_or_else(|| {
            ApplyError::new(document, "kind", format!("unknown kind {kind_str:?}; weft accepts {}", kind_list()))
        })?;
        let resource = match kind {
            Kind::Service => Resource::Service(typed(document, value)?),
            Kind::HttpRoute => Resource::HttpRoute(typed(document, value)?),
            Kind::GrpcRoute => Resource::GrpcRoute(typed(document, value)?),
            Kind::AuthorizationPolicy => Resource::AuthorizationPolicy(typed(document, value)?),
            Kind::RequestAuthentication => Resource::RequestAuthentication(typed(document, value)?),
            Kind::TrafficPolicy => Resource::TrafficPolicy(typed(document, value)?),
            Kind::Telemetry => Resource::Telemetry(typed(document, value)?),
            Kind::ExportedServices => Resource::ExportedServices(typed(document, value)?),
        };
        resource.validate(document)?;
        Ok(resource)
    }

    pub fn from_json(document: usize, value: serde_json::Value) -> Result<Self, ApplyError> {
        let kind = value.get("kind").and_then(|k| k.as_str()).map(str::to_owned);
        Resource::from_value(document, value, kind.as_deref())
    }

    /// Checks that need no knowledge of other resources.
    fn validate(&self, doc: usize) -> Result<(), ApplyError> {
        let (api_version, kind, metadata) = match self {
            Resource::Service(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::HttpRoute(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::GrpcRoute(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::AuthorizationPolicy(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::RequestAuthentication(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::TrafficPolicy(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::Telemetry(o) => (&o.api_version, o.kind, &o.metadata),
            Resource::ExportedServices(o) => (&o.api_version, o.kind, &o.metadata),
        };
        if api_version != kind.api_version() {
            return Err(ApplyError::new(
                doc,
                "apiVersion",
                format!("{kind} has apiVersion {:?}, not {api_version:?}", kind.api_version()),
            ));
        }
        check_name(doc, "metadata.name", &metadata.name)?;
        match self {
            Resource::Service(o) => validate_service(doc, &o.metadata.name, &o.spec)?,
            Resource::HttpRoute(o) => validate_route(doc, &o.spec)?,
            Resource::GrpcRoute(o) => validate_grpc_route(doc, &o.spec)?,
            Resource::AuthorizationPolicy(o) => validate_authz(doc, &o.spec)?,
            Resource::RequestAuthentication(o) => validate_request_authn(doc, &o.spec)?,
            Resource::TrafficPolicy(o) => validate_traffic_policy(doc, &o.spec)?,
            Resource::Telemetry(o) => validate_telemetry(doc, &o.spec)?,
            Resource::ExportedServices(o) => validate_exported(doc, &o.spec)?,
        }
        Ok(())
    }

    /// Services this resource refers to, with the field path of each reference. The control
    /// plane rejects a document whose references name no known service.
    pub fn service_refs(&self) -> Vec<(String, &str)> {
        match self {
            Resource::Service(o) => {
                o.spec.selector.iter().map(|s| ("spec.selector.service".to_owned(), s.service.as_str())).collect()
            }
            Resource::AuthorizationPolicy(o) => {
                o.spec.service.as_deref().map(|s| ("spec.service".to_owned(), s)).into_iter().collect()
            }
            Resource::RequestAuthentication(o) => {
                o.spec.service.as_deref().map(|s| ("spec.service".to_owned(), s)).into_iter().collect()
            }
            Resource::TrafficPolicy(o) if o.spec.target_ref.targets_route() => Vec::new(),
            Resource::TrafficPolicy(o) => vec![("spec.targetRef.name".to_owned(), o.spec.target_ref.name.as_str())],
            Resource::Telemetry(o) => {
                o.spec.service().map(|s| ("spec.targetRef.name".to_owned(), s)).into_iter().collect()
            }
            Resource::ExportedServices(o) => o
                .spec
                .services
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("spec.services[{i}].name"), s.name.as_str()))
                .collect(),
            Resource::GrpcRoute(o) => {
                let parents = o.spec.parent_refs.iter().enumerate();
                let parents = parents.map(|(i, p)| (format!("spec.parentRefs[{i}].name"), p.name.as_str()));
                let backends = o.spec.rules.iter().enumerate().flat_map(|(r, rule)| {
                    rule.backend_refs
                        .iter()
                        .enumerate()
                        .map(move |(b, br)| (format!("spec.rules[{r}].backendRefs[{b}].name"), br.name.as_str()))
                });
                let mirrors = o.spec.rules.iter().enumerate().flat_map(|(r, rule)| {
                    rule.filters.iter().enumerate().filter_map(move |(f, filter)| {
                        let m = filter.request_mirror.as_ref()?;
                        Some((
                            format!("spec.rules[{r}].filters[{f}].requestMirror.backendRef.name"),
                            m.backend_ref.name.as_str(),
                        ))
                    })
                });
                parents.chain(backends).chain(mirrors).collect()
            }
            Resource::HttpRoute(o) => {
                let parents = o.spec.parent_refs.iter().enumerate();
                let parents = parents.map(|(i, p)| (format!("spec.parentRefs[{i}].name"), p.name.as_str()));
                let backends = o.spec.rules.iter().enumerate().flat_map(|(r, rule)| {
                    rule.backend_refs
                        .iter()
                        .enumerate()
                        .map(move |(b, br)| (format!("spec.rules[{r}].backendRefs[{b}].name"), br.name.as_str()))
                });
                let mirrors = o.spec.rules.iter().enumerate().flat_map(|(r, rule)| {
                    rule.filters.iter().enumerate().filter_map(move |(f, filter)| {
                        let m = filter.request_mirror.as_ref()?;
                        Some((
                            format!("spec.rules[{r}].filters[{f}].requestMirror.backendRef.name"),
                            m.backend_ref.name.as_str(),
                        ))
                    })
                });
                parents.chain(backends).chain(mirrors).collect()
            }
        }
    }
}

pub fn key(kind: Kind, name: &str) -> String {
    format!("{kind}/{name}")
}

fn kind_list() -> String {
    Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

fn typed<'de, S: DeserializeOwned, D: serde::Deserializer<'de>>(doc: usize, value: D) -> Result<Object<S>, ApplyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ApplyError::new(doc, path, e.into_inner().to_string())
    })
}

/// Parses every document of a YAML file. Nothing is partially accepted: any error fails the file.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ApplyError> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(doc).map_err(|e| {
            let at = e.location().map(|l| format!(" (line {}, column {})", l.line(), l.column())).unwrap_or_default();
            ApplyError::new(i, "", format!("invalid YAML{at}: {e}"))
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        if !value.is_mapping() {
            return Err(ApplyError::new(
                i,
                "",
                "a document must be a mapping with apiVersion, kind, metadata and spec",
            ));
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).map(str::to_owned);
        out.push(Resource::from_value(i, value, kind.as_deref())?);
    }
    if out.is_empty() {
        return Err(ApplyError::new(0, "", "the file holds no documents"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn err(text: &str) -> ApplyError {
        parse_documents(text).unwrap_err()
    }

    #[test]
    fn parses_service_and_route() {
        let text = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: backend}
spec: {protocol: http, loadBalancer: round-robin, connectTimeout: 250ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{name: backend}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: backend-v1, weight: 90}, {name: backend-v2, weight: 10}]
"#;
        let docs = parse_documents(text).unwrap();
        assert_eq!(docs.len(), 2);
        let Resource::Service(s) = &docs[0] else { panic!("not a service") };
        assert_eq!(s.spec.load_balancer, LoadBalancer::RoundRobin);
        assert_eq!(s.spec.connect_timeout, Some(Duration::from_millis(250)));
        assert_eq!(
            docs[1].service_refs().iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            vec!["backend", "backend-v1", "backend-v2"]
        );
        // JSON round trip (the CLI sends JSON to the control plane).
        let json = serde_json::to_value(&docs[1]).unwrap();
        assert_eq!(Resource::from_json(0, json).unwrap(), docs[1]);
    }

    #[test]
    fn rejects_with_path_and_reason() {
        let e = err("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {protcol: http}\n");
        assert_eq!(e.path, "spec.protcol");
        assert!(e.reason.contains("unknown field `protcol`"), "{e}");

        let e = err("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {connectTimeout: [1]}\n");
        assert_eq!(e.path, "spec.connectTimeout");

        let e = err("apiVersion: weft.dev/v1alpha1\nkind: Gadget\nmetadata: {name: a}\n");
        assert_eq!(e.path, "kind");
        assert!(e.reason.contains("unknown kind \"Gadget\""), "{e}");

        let e = err("kind: Service\nmetadata: {name: a\n");
        assert!(e.reason.starts_with("invalid YAML (line"), "{e}");

        let e = err(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: a}]\n  rules: [{backendRefs: [{name: b, weight: x}]}]\n",
        );
        assert_eq!(e.path, "spec.rules[0].backendRefs[0].weight");

        let e = err("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: Bad_Name}\nspec: {}\n");
        assert_eq!(e.path, "metadata.name");

        let e =
            err("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {selector: {service: a}}\n");
        assert_eq!(e.path, "spec.selector.service");
        let ok = parse_documents(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: b-v2}\nspec: {selector: {service: b, labels: {version: v2}}}\n",
        )
        .unwrap();
        assert_eq!(ok[0].service_refs(), vec![("spec.selector.service".to_owned(), "b")]);
    }
}
