//! RequestAuthentication → an Envoy `jwt_authn` HTTP filter for a service's inbound listeners:
//! one provider per issuer (named `RESOURCE#i`), keys inline, and one rule for every path that
//! requires any of the providers (plus `allow_missing` unless a resource says `required`).
//! Claims are published as metadata `payload`, which the RBAC filters after it match on.
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::{RouteMatch, route_match};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtHeader, JwtProvider, JwtRequirement, JwtRequirementOrList, RequirementRule, jwt_provider,
    jwt_requirement, requirement_rule,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use weft_api::resource::{DEFAULT_JWT_CLOCK_SKEW, JwksSource, Object, RequestAuthenticationSpec};

/// Where the RBAC filters find a validated token's claims (as the proxy expects them).
pub const METADATA_FILTER: &str = "envoy.filters.http.jwt_authn";
pub const PAYLOAD_KEY: &str = "payload";

/// Keys of a source not read yet: every token of the issuer is refused (unknown key).
const NO_KEYS: &str = r#"{"keys":[]}"#;

/// The JWT filter of one service, and whether a token is required.
pub struct ServiceJwt {
    pub filter: JwtAuthentication,
    pub required: bool,
}

/// The filter for `service` from the resources that target it or the whole mesh; `None` when
/// none does.
pub fn for_service(
    service: &str,
    resources: &[Object<RequestAuthenticationSpec>],
    jwks: &BTreeMap<JwksSource, Arc<str>>,
) -> Option<ServiceJwt> {
    let mut providers = std::collections::HashMap::new();
    let mut names = Vec::new();
    let mut required = false;
    for r in resources.iter().filter(|r| r.spec.service.as_deref().is_none_or(|s| s == service)) {
        required |= r.spec.required;
        for (i, iss) in r.spec.issuers.iter().enumerate() {
            let keys = iss.jwks_source().and_then(|s| jwks.get(&s).cloned());
            let from_headers = if iss.from_headers.is_empty() {
                vec![JwtHeader { name: "authorization".into(), value_prefix: "Bearer ".into() }]
            } else {
                iss.from_headers
                    .iter()
                    .map(|h| JwtHeader { name: h.name.to_ascii_lowercase(), value_prefix: h.prefix.clone() })
                    .collect()
            };
            let provider = JwtProvider {
                issuer: iss.issuer.clone(),
                audiences: iss.audiences.clone(),
                forward: iss.forward_original_token,
                from_headers,
                payload_in_metadata: PAYLOAD_KEY.into(),
                clock_skew_seconds: iss.clock_skew.unwrap_or(DEFAULT_JWT_CLOCK_SKEW).as_secs() as u32,
                jwks_source_specifier: Some(jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(
                        keys.as_deref().unwrap_or(NO_KEYS).to_owned(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            };
            let name = format!("{}#{i}", r.metadata.name);
            names.push(name.clone());
            providers.insert(name, provider);
        }
    }
    if names.is_empty() {
        return None;
    }
    let mut any: Vec<JwtRequirement> = names
        .into_iter()
        .map(|n| JwtRequirement { requires_type: Some(jwt_requirement::RequiresType::ProviderName(n)) })
        .collect();
    if !required {
        any.push(JwtRequirement {
            requires_type: Some(jwt_requirement::RequiresType::AllowMissing(Default::default())),
        });
    }
    let rule = RequirementRule {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        requirement_type: Some(requirement_rule::RequirementType::Requires(JwtRequirement {
            requires_type: Some(jwt_requirement::RequiresType::RequiresAny(JwtRequirementOrList { requirements: any })),
        })),
    };
    Some(ServiceJwt { filter: JwtAuthentication { providers, rules: vec![rule], ..Default::default() }, required })
}
