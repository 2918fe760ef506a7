//! Transport sockets: the TLS contexts the control plane puts on inbound filter chains
//! (termination) and on clusters (origination), and the trust bundle secret.
//!
//! A weft proxy makes its own certificate (the `default` secret) and takes the trust bundle
//! from the `ROOTCA` secret. A context is accepted only if it says exactly that (plus, for
//! origination, the SPIFFE IDs the upstream may present and the server name to send); anything
//! else in it is refused, because the proxy would have to ignore it.
use super::decode::{InvalidResource, decode, invalid};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SpiffeCertValidatorConfig, UpstreamTlsContext, common_tls_context, secret, spiffe_cert_validator_config,
    subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use envoy_types::pb::google::protobuf::Any;
use prost::Name;
use serde::Serialize;
use weft_api::identity::{CERT_SECRET, ROOT_SECRET};
use weft_api::names::SPIFFE_VALIDATOR;

pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";

/// Termination on an inbound listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DownstreamTlsDef {
    pub require_client_certificate: bool,
}

/// Origination towards a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTlsDef {
    /// The SPIFFE ID every endpoint must present: the service's own.
    pub identity: String,
    /// Others an endpoint may present instead: the service's in peer datacenters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer_identities: Vec<String>,
    /// The server name sent (a peer's mesh gateway routes by it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

/// A trust bundle: this mesh's roots, and each peer trust domain's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BundleDef {
    /// PEM, the signing root first.
    pub own: Vec<u8>,
    /// By trust domain (never this mesh's own): PEM roots trusted for its identities only.
    pub peers: Vec<(String, Vec<u8>)>,
    /// This mesh's trust domain, when the bundle names it (a peered mesh's does).
    pub trust_domain: Option<String>,
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
    let mut identities = Vec::new();
    for m in &validation.match_typed_subject_alt_names {
        match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
            Some(string_matcher::MatchPattern::Exact(id))
                if m.san_type == subject_alt_name_matcher::SanType::Uri as i32 && id.starts_with("spiffe://") =>
            {
                identities.push(id.clone())
            }
            _ => return Err(format!("{what}: every URI SAN must be matched exactly against a spiffe:// ID")),
        }
    }
    if identities.is_empty() {
        return Err(format!("{what}: weft needs a URI SAN matcher: the SPIFFE ID (or IDs) upstreams must present"));
    }
    let honoured_validation = CertificateValidationContext {
        match_typed_subject_alt_names: validation.match_typed_subject_alt_names.clone(),
        ..Default::default()
    };
    let honoured = UpstreamTlsContext {
        common_tls_context: ctx.common_tls_context.clone(),
        sni: ctx.sni.clone(),
        ..Default::default()
    };
    if honoured != ctx || honoured_validation != validation {
        return Err(format!("{what} sets fields weft does not support (it honours exact URI SAN matches and sni)"));
    }
    let sni = match ctx.sni.as_str() {
        "" => None,
        name => {
            rustls::pki_types::ServerName::try_from(name)
                .map_err(|_| format!("{what}: sni {name:?} is not a valid DNS name"))?;
            Some(name.to_owned())
        }
    };
    let identity = identities.remove(0);
    Ok(UpstreamTlsDef { identity, peer_identities: identities, sni })
}

/// The trust bundle from the `ROOTCA` secret: `trusted_ca` (this mesh's roots) and, in a
/// peered mesh, Envoy's SPIFFE certificate validator with each trust domain's roots.
pub fn bundle(any: &Any) -> Result<(String, BundleDef), InvalidResource> {
    let s: Secret = decode(any, "Secret")?;
    let bad = |reason: String| invalid("Secret", &s.name, reason);
    if s.name != ROOT_SECRET {
        return Err(bad(
            "weft proxies take only the trust bundle (ROOTCA) over SDS; their own certificate never leaves them".into(),
        ));
    }
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        return Err(bad("the trust bundle must be a validation_context".into()));
    };
    let own = inline(v.trusted_ca.as_ref()).map_err(|e| bad(format!("trusted_ca {e}")))?;
    let honoured = CertificateValidationContext {
        trusted_ca: v.trusted_ca.clone(),
        custom_validator_config: v.custom_validator_config.clone(),
        ..Default::default()
    };
    if &honoured != v {
        return Err(bad(
            "the validation context sets fields weft does not support (it honours trusted_ca and the SPIFFE validator)"
                .into(),
        ));
    }
    let mut def = BundleDef { own, ..Default::default() };
    if let Some(custom) = &v.custom_validator_config {
        let config = custom.typed_config.as_ref().filter(|_| custom.name == SPIFFE_VALIDATOR).ok_or_else(|| {
            bad(format!("custom_validator_config {:?} is not supported (only {SPIFFE_VALIDATOR})", custom.name))
        })?;
        let spiffe: SpiffeCertValidatorConfig = decode(config, "Secret")?;
        if spiffe.trust_bundles.is_some() {
            return Err(bad(
                "the SPIFFE validator's trust_bundles (a bundle map file) is not supported; list trust_domains".into(),
            ));
        }
        for (i, td) in spiffe.trust_domains.iter().enumerate() {
            let at = format!("custom_validator_config trust_domains[{i}] ({:?})", td.name);
            if td.name.is_empty() || td.name.contains('/') || td.name.starts_with("spiffe:") {
                return Err(bad(format!("{at}: a trust domain name is a bare domain (no spiffe://, no path)")));
            }
            let honoured = spiffe_cert_validator_config::TrustDomain {
                name: td.name.clone(),
                trust_bundle: td.trust_bundle.clone(),
                ..Default::default()
            };
            if honoured != *td {
                return Err(bad(format!("{at} sets fields weft does not support (it honours name and trust_bundle)")));
            }
            let pem = inline(td.trust_bundle.as_ref()).map_err(|e| bad(format!("{at}: trust_bundle {e}")))?;
            if def.peers.iter().any(|(n, _)| *n == td.name) || def.trust_domain.as_deref() == Some(&td.name) {
                return Err(bad(format!("{at}: the trust domain is listed twice")));
            }
            // This mesh's own domain is the one whose roots are trusted_ca's.
            if pem == def.own && def.trust_domain.is_none() {
                def.trust_domain = Some(td.name.clone());
            } else {
                def.peers.push((td.name.clone(), pem));
            }
        }
        if def.trust_domain.is_none() {
            return Err(bad(
                "the SPIFFE validator lists no trust domain with the roots of trusted_ca (this mesh's own)".into(),
            ));
        }
    }
    Ok((s.name.clone(), def))
}

/// An inline data source's bytes.
fn inline(d: Option<&envoy_types::pb::envoy::config::core::v3::DataSource>) -> Result<Vec<u8>, &'static str> {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        _ => Err("must be inline bytes or an inline string"),
    }
}

pub fn secret_type_url() -> String {
    Secret::type_url()
}
