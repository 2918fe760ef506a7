//! Transport sockets: the TLS contexts the control plane puts on inbound filter chains
//! (termination) and on clusters (origination), and the trust bundle secret.
//!
//! A weft proxy makes its own certificate (the `default` secret) and takes the trust bundle
//! from the `ROOTCA` secret. A context is accepted only if it says exactly that (plus, for
//! origination, the one SPIFFE ID the upstream must present); anything else in it is refused,
//! because the proxy would have to ignore it.
use super::decode::{InvalidResource, decode, invalid};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, UpstreamTlsContext,
    common_tls_context, secret, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use envoy_types::pb::google::protobuf::Any;
use prost::Name;
use serde::Serialize;
use weft_api::identity::{CERT_SECRET, ROOT_SECRET};

pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";

/// Termination on an inbound listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DownstreamTlsDef {
    pub require_client_certificate: bool,
}

/// Origination towards a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTlsDef {
    /// The SPIFFE ID every endpoint must present.
    pub identity: String,
}

fn typed(ts: &TransportSocket) -> Result<&Any, String> {
    if ts.name != TLS_SOCKET {
        return Err(format!("transport socket {:?} is not supported (only {TLS_SOCKET})", ts.name));
    }
    match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => Ok(any),
        None => Err(format!("transport socket {:?} has no typed_config", ts.name)),
    }
}

fn secret_name(c: &SdsSecretConfig) -> &str {
    &c.name
}

/// The parts of a CommonTlsContext weft honours; `Err` if it sets anything else.
fn common(ctx: Option<&CommonTlsContext>, what: &str) -> Result<Option<CertificateValidationContext>, String> {
    let ctx = ctx.ok_or_else(|| format!("{what} has no common_tls_context"))?;
    let certs: Vec<&str> = ctx.tls_certificate_sds_secret_configs.iter().map(secret_name).collect();
    if certs != [CERT_SECRET] {
        return Err(format!(
            "{what}: weft proxies present only their own certificate, the SDS secret {CERT_SECRET:?} (got {certs:?})"
        ));
    }
    let (default_ctx, root) = match &ctx.validation_context_type {
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            (c.default_validation_context.clone(), c.validation_context_sds_secret_config.as_ref().map(secret_name))
        }
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            (None, Some(secret_name(s)))
        }
        _ => (None, None),
    };
    if root != Some(ROOT_SECRET) {
        return Err(format!("{what}: peers are verified against the SDS secret {ROOT_SECRET:?} only (got {root:?})"));
    }
    let honoured = CommonTlsContext {
        tls_certificate_sds_secret_configs: ctx.tls_certificate_sds_secret_configs.clone(),
        validation_context_type: ctx.validation_context_type.clone(),
        alpn_protocols: ctx.alpn_protocols.clone(),
        ..Default::default()
    };
    if &honoured != ctx {
        return Err(format!(
            "{what} sets common_tls_context fields weft does not support (it honours the SDS secrets {CERT_SECRET:?} and {ROOT_SECRET:?} and alpn_protocols)"
        ));
    }
    Ok(default_ctx)
}

pub fn downstream(ts: &TransportSocket) -> Result<DownstreamTlsDef, String> {
    let any = typed(ts)?;
    let ctx: DownstreamTlsContext = decode(any, "Listener").map_err(|e| e.reason)?;
    let what = "DownstreamTlsContext";
    if common(ctx.common_tls_context.as_ref(), what)?.is_some_and(|v| v != CertificateValidationContext::default()) {
        return Err(format!("{what}: matching client certificates is done by authorization policy, not here"));
    }
    let honoured = DownstreamTlsContext {
        common_tls_context: ctx.common_tls_context.clone(),
        require_client_certificate: ctx.require_client_certificate,
        ..Default::default()
    };
    if honoured != ctx {
        return Err(format!("{what} sets fields weft does not support (it honours require_client_certificate)"));
    }
    if !ctx.require_client_certificate.is_some_and(|b| b.value) {
        return Err(format!("{what}: weft terminates mutual TLS only; require_client_certificate must be true"));
    }
    Ok(DownstreamTlsDef { require_client_certificate: true })
}

pub fn upstream(ts: &TransportSocket) -> Result<UpstreamTlsDef, String> {
    let any = typed(ts)?;
    let ctx: UpstreamTlsContext = decode(any, "Cluster").map_err(|e| e.reason)?;
    let what = "UpstreamTlsContext";
    let validation = common(ctx.common_tls_context.as_ref(), what)?.unwrap_or_default();
    let identity = match validation.match_typed_subject_alt_names.as_slice() {
        [m] if m.san_type == subject_alt_name_matcher::SanType::Uri as i32 => {
            match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
                Some(string_matcher::MatchPattern::Exact(id)) if id.starts_with("spiffe://") => id.clone(),
                _ => return Err(format!("{what}: the URI SAN must be matched exactly against a spiffe:// ID")),
            }
        }
        _ => {
            return Err(format!(
                "{what}: weft needs exactly one URI SAN matcher: the SPIFFE ID upstreams must present"
            ));
        }
    };
    let honoured_validation = CertificateValidationContext {
        match_typed_subject_alt_names: validation.match_typed_subject_alt_names.clone(),
        ..Default::default()
    };
    let honoured = UpstreamTlsContext { common_tls_context: ctx.common_tls_context.clone(), ..Default::default() };
    if honoured != ctx || honoured_validation != validation {
        return Err(format!("{what} sets fields weft does not support (it honours one exact URI SAN match)"));
    }
    Ok(UpstreamTlsDef { identity })
}

/// The trust bundle from the `ROOTCA` secret (PEM bytes).
pub fn bundle(any: &Any) -> Result<(String, Vec<u8>), InvalidResource> {
    let s: Secret = decode(any, "Secret")?;
    let bad = |reason: &str| invalid("Secret", &s.name, reason);
    if s.name != ROOT_SECRET {
        return Err(bad(
            "weft proxies take only the trust bundle (ROOTCA) over SDS; their own certificate never leaves them",
        ));
    }
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        return Err(bad("the trust bundle must be a validation_context"));
    };
    let pem = match v.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => b.clone(),
        Some(data_source::Specifier::InlineString(s)) => s.clone().into_bytes(),
        _ => return Err(bad("trusted_ca must be inline bytes or an inline string")),
    };
    let honoured = CertificateValidationContext { trusted_ca: v.trusted_ca.clone(), ..Default::default() };
    if &honoured != v {
        return Err(bad("the validation context sets fields weft does not support (it honours trusted_ca)"));
    }
    Ok((s.name.clone(), pem))
}

pub fn secret_type_url() -> String {
    Secret::type_url()
}
