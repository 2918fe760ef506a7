//! JWT authentication: the inbound stack's check of the end-user tokens requests carry, from
//! an Envoy `jwt_authn` HTTP filter (which the control plane makes of RequestAuthentication
//! resources). It runs before authorization, which may then match the token's claims.
//!
//! Semantics, as Envoy's for the shape weft honours (one rule for every path requiring any of
//! the providers, optionally `allow_missing`): a token is looked for in the providers' headers;
//! none found is fine only if missing tokens are allowed; a token found must be valid for the
//! provider named by its `iss`, whatever else is configured. Keys are parsed once per config.
use base64::Engine;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::{RouteMatch, route_match};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtHeader, JwtProvider, JwtRequirement, RequirementRule, jwt_provider, jwt_requirement,
    requirement_rule,
};
use http::HeaderName;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use serde::Serialize;
use std::sync::Arc;
use weft_api::jwks::Key;

/// Where the claims of a validated token are published for RBAC metadata matchers:
/// filter `envoy.filters.http.jwt_authn`, first path segment `payload`.
pub const METADATA_FILTER: &str = "envoy.filters.http.jwt_authn";
pub const PAYLOAD_KEY: &str = "payload";

/// Why a request's token was refused; each is its own `x-weft-error` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the request carries no token, and this service requires one")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's issuer is not one this service accepts")]
    UnknownIssuer,
    #[error("no key of the issuer's JWKS matches the token's key id and algorithm")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's audience is not one this service accepts")]
    WrongAudience,
}

impl JwtError {
    pub fn reason(self) -> &'static str {
        match self {
            JwtError::Missing => "jwt-missing",
            JwtError::Malformed => "jwt-malformed",
            JwtError::UnknownIssuer => "jwt-unknown-issuer",
            JwtError::UnknownKey => "jwt-unknown-key",
            JwtError::BadSignature => "jwt-bad-signature",
            JwtError::Expired => "jwt-expired",
            JwtError::NotYetValid => "jwt-not-yet-valid",
            JwtError::WrongAudience => "jwt-wrong-audience",
        }
    }
}

#[derive(Serialize)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub clock_skew_secs: u32,
    /// Header name and the text before the token.
    #[serde(serialize_with = "ser_headers")]
    pub headers: Vec<(HeaderName, String)>,
    /// Keep the token on the request forwarded to the app.
    pub forward: bool,
    /// Key ids (or `-` for keys without one), for the config dump.
    pub keys: Vec<String>,
    #[serde(skip)]
    decoding: Vec<Key>,
    #[serde(skip)]
    jwks: String,
}

fn ser_headers<S: serde::Serializer>(h: &[(HeaderName, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(h.iter().map(|(n, p)| format!("{n}: {p}TOKEN")))
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider").field("name", &self.name).field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

impl PartialEq for Provider {
    /// The decoded keys follow from the JWKS text, so comparing the text compares them.
    fn eq(&self, o: &Provider) -> bool {
        (&self.name, &self.issuer, &self.audiences, self.clock_skew_secs, &self.headers, self.forward, &self.jwks)
            == (&o.name, &o.issuer, &o.audiences, o.clock_skew_secs, &o.headers, o.forward, &o.jwks)
    }
}

/// A listener's JWT authentication.
#[derive(Debug, PartialEq, Serialize)]
pub struct JwtAuthn {
    pub providers: Vec<Provider>,
    /// Whether a request without a token passes (unauthenticated).
    pub allow_missing: bool,
}

/// A validated token's claims (its payload), for authorization.
pub type Claims = serde_json::Value;

impl JwtAuthn {
    /// Checks the request's token, removing it from the request unless the provider forwards
    /// it. `Ok(None)`: no token, and none is required.
    pub fn authenticate(&self, parts: &mut http::request::Parts) -> Result<Option<Claims>, JwtError> {
        let Some((header, token)) = self.find_token(&parts.headers) else {
            return if self.allow_missing { Ok(None) } else { Err(JwtError::Missing) };
        };
        let issuer = unverified_issuer(&token)?;
        let provider = self.providers.iter().find(|p| p.issuer == issuer).ok_or(JwtError::UnknownIssuer)?;
        let claims = provider.verify(&token)?;
        if !provider.forward {
            parts.headers.remove(&header);
        }
        Ok(Some(claims))
    }

    fn find_token(&self, headers: &http::HeaderMap) -> Option<(HeaderName, String)> {
        self.providers.iter().flat_map(|p| p.headers.iter()).find_map(|(name, prefix)| {
            let v = headers.get(name)?.to_str().ok()?;
            let token = v.strip_prefix(prefix.as_str())?.trim();
            (!token.is_empty()).then(|| (name.clone(), token.to_owned()))
        })
    }
}

/// The `iss` claim, read before verification only to pick the provider whose keys verify it.
fn unverified_issuer(token: &str) -> Result<String, JwtError> {
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: String,
    }
    let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).map_err(|_| JwtError::Malformed)?;
    let iss: Iss = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    Ok(iss.iss)
}

impl Provider {
    fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let candidates: Vec<&Key> = self
            .decoding
            .iter()
            .filter(|k| header.kid.is_none() || k.id == header.kid)
            .filter(|k| k.alg.is_none_or(|a| a == header.alg))
            .collect();
        if candidates.is_empty() {
            return Err(JwtError::UnknownKey);
        }
        let mut v = Validation::new(header.alg);
        v.leeway = u64::from(self.clock_skew_secs);
        v.required_spec_claims.clear();
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            // A token without `aud` must not pass a provider that names audiences (found by
            // the jwt fuzz target: jsonwebtoken checks `aud` only when it is present).
            v.set_audience(&self.audiences);
            v.required_spec_claims.insert("aud".to_owned());
        }
        let mut last = JwtError::UnknownKey;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => return self.check_times(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => return Err(JwtError::Expired),
                        ErrorKind::ImmatureSignature => return Err(JwtError::NotYetValid),
                        ErrorKind::InvalidAudience => return Err(JwtError::WrongAudience),
                        ErrorKind::MissingRequiredClaim(c) if c == "aud" => return Err(JwtError::WrongAudience),
                        ErrorKind::InvalidIssuer => return Err(JwtError::UnknownIssuer),
                        // A key of another family (an EC key for an RS256 token): not this key.
                        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => JwtError::UnknownKey,
                        // Keys without an id: another may verify it.
                        ErrorKind::InvalidSignature => JwtError::BadSignature,
                        _ => return Err(JwtError::Malformed),
                    }
                }
            }
        }
        Err(last)
    }

    /// `exp` and `nbf` as RFC 7519 NumericDates: any JSON number, fractions and negative values
    /// included. jsonwebtoken checks them only when they parse as unsigned integers and treats
    /// any other value as absent, so a token with `"exp": -1` or `"exp": 1.5e9` would never
    /// expire (found by the jwt fuzz target); another type is malformed.
    fn check_times(&self, claims: Claims) -> Result<Claims, JwtError> {
        let at = |name: &str| match claims.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().filter(|t| t.is_finite()).map(Some).ok_or(JwtError::Malformed),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let skew = f64::from(self.clock_skew_secs);
        if at("exp")?.is_some_and(|exp| exp + skew < now) {
            return Err(JwtError::Expired);
        }
        if at("nbf")?.is_some_and(|nbf| nbf - skew > now) {
            return Err(JwtError::NotYetValid);
        }
        Ok(claims)
    }
}

// ---- decoding from Envoy jwt_authn ----

fn jwks_text(ds: Option<&DataSource>, at: &str) -> Result<String, String> {
    match ds.and_then(|d| (d.watched_directory.is_none()).then_some(d.specifier.as_ref()).flatten()) {
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
        Some(data_source::Specifier::InlineBytes(b)) => {
            String::from_utf8(b.clone()).map_err(|_| format!("{at}: local_jwks is not UTF-8"))
        }
        Some(data_source::Specifier::Filename(f)) => {
            std::fs::read_to_string(f).map_err(|e| format!("{at}: cannot read local_jwks file {f:?}: {e}"))
        }
        _ => Err(format!("{at}: local_jwks must be an inline string or bytes, or a file name")),
    }
}

fn provider(name: &str, p: &JwtProvider, at: &str) -> Result<Provider, String> {
    let honoured = JwtProvider {
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        forward: p.forward,
        from_headers: p.from_headers.clone(),
        payload_in_metadata: p.payload_in_metadata.clone(),
        clock_skew_seconds: p.clock_skew_seconds,
        jwks_source_specifier: p.jwks_source_specifier.clone(),
        ..Default::default()
    };
    if &honoured != p {
        return Err(format!(
            "{at}: sets fields weft does not support (it honours issuer, audiences, forward, from_headers, payload_in_metadata, clock_skew_seconds, local_jwks)"
        ));
    }
    if p.issuer.is_empty() {
        return Err(format!("{at}: needs an issuer"));
    }
    if !p.payload_in_metadata.is_empty() && p.payload_in_metadata != PAYLOAD_KEY {
        return Err(format!("{at}: weft publishes claims under payload_in_metadata {PAYLOAD_KEY:?} only"));
    }
    let jwks = match &p.jwks_source_specifier {
        Some(jwt_provider::JwksSourceSpecifier::LocalJwks(ds)) => jwks_text(Some(ds), at)?,
        Some(jwt_provider::JwksSourceSpecifier::RemoteJwks(_)) => {
            return Err(format!(
                "{at}: remote_jwks is not supported; weft's control plane fetches JWKS and sends them as local_jwks"
            ));
        }
        None => return Err(format!("{at}: needs local_jwks")),
    };
    let decoding = weft_api::jwks::parse(&jwks).map_err(|e| format!("{at}: {e}"))?;
    let from: Vec<JwtHeader> = if p.from_headers.is_empty() {
        vec![JwtHeader { name: "authorization".into(), value_prefix: "Bearer ".into() }]
    } else {
        p.from_headers.clone()
    };
    let headers = from
        .iter()
        .map(|h| {
            HeaderName::from_bytes(h.name.as_bytes())
                .map(|n| (n, h.value_prefix.clone()))
                .map_err(|_| format!("{at}: {:?} is not a header name", h.name))
        })
        .collect::<Result<_, _>>()?;
    Ok(Provider {
        name: name.to_owned(),
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        clock_skew_secs: p.clock_skew_seconds,
        headers,
        forward: p.forward,
        keys: decoding.iter().map(|k| k.id.clone().unwrap_or_else(|| "-".into())).collect(),
        decoding,
        jwks,
    })
}

/// Provider names a requirement accepts, and whether it allows a missing token.
fn requirement(r: &JwtRequirement, at: &str) -> Result<(Vec<String>, bool), String> {
    let unsupported = || {
        format!(
            "{at}: weft supports a requirement of provider_name, or requires_any of provider names and allow_missing"
        )
    };
    match &r.requires_type {
        Some(jwt_requirement::RequiresType::ProviderName(p)) => Ok((vec![p.clone()], false)),
        Some(jwt_requirement::RequiresType::RequiresAny(any)) => {
            let (mut names, mut allow_missing) = (Vec::new(), false);
            for r in &any.requirements {
                match &r.requires_type {
                    Some(jwt_requirement::RequiresType::ProviderName(p)) => names.push(p.clone()),
                    Some(jwt_requirement::RequiresType::AllowMissing(_)) => allow_missing = true,
                    _ => return Err(unsupported()),
                }
            }
            Ok((names, allow_missing))
        }
        _ => Err(unsupported()),
    }
}

/// Decodes a `jwt_authn` filter of the shape weft honours: providers, and one rule for every
/// path (`prefix: "/"`).
pub fn decode(f: &JwtAuthentication, filter: &str) -> Result<Arc<JwtAuthn>, String> {
    let honoured = JwtAuthentication { providers: f.providers.clone(), rules: f.rules.clone(), ..Default::default() };
    if &honoured != f {
        return Err(format!("{filter}: jwt_authn sets fields weft does not support (it honours providers and rules)"));
    }
    let [rule] = f.rules.as_slice() else {
        return Err(format!("{filter}: weft supports exactly one requirement rule (for prefix \"/\")"));
    };
    let every_path =
        RouteMatch { path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())), ..Default::default() };
    let requires = match rule {
        RequirementRule {
            r#match: Some(m),
            requirement_type: Some(requirement_rule::RequirementType::Requires(r)),
        } if *m == every_path => r,
        _ => return Err(format!("{filter}: the requirement rule must match prefix \"/\" and name its requirement")),
    };
    let (names, allow_missing) = requirement(requires, filter)?;
    let mut providers = Vec::with_capacity(names.len());
    for name in &names {
        let p =
            f.providers.get(name).ok_or_else(|| format!("{filter}: requirement names unknown provider {name:?}"))?;
        providers.push(provider(name, p, &format!("{filter}: provider {name:?}"))?);
    }
    if providers.is_empty() {
        return Err(format!("{filter}: the requirement names no provider"));
    }
    Ok(Arc::new(JwtAuthn { providers, allow_missing }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    // An HMAC JWKS keeps the unit test free of key generation; the end-to-end test signs
    // with RSA and EC keys.
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn jwks() -> String {
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
        format!(r#"{{"keys":[{{"kty":"oct","kid":"k1","alg":"HS256","k":"{k}"}}]}}"#)
    }

    fn authn(allow_missing: bool) -> JwtAuthn {
        let p = JwtProvider {
            issuer: "https://issuer.test".into(),
            audiences: vec!["backend".into()],
            clock_skew_seconds: 5,
            payload_in_metadata: PAYLOAD_KEY.into(),
            jwks_source_specifier: Some(jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
                specifier: Some(data_source::Specifier::InlineString(jwks())),
                ..Default::default()
            })),
            ..Default::default()
        };
        JwtAuthn { providers: vec![provider("p", &p, "test").unwrap()], allow_missing }
    }

    fn token(kid: &str, claims: serde_json::Value, secret: &[u8]) -> String {
        let header = Header { kid: Some(kid.into()), ..Header::new(Algorithm::HS256) };
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn request(token: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::builder().uri("/");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(()).unwrap().into_parts().0
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn each_way_a_token_fails_has_its_reason() {
        let a = authn(false);
        let claims =
            |iss: &str, aud: &str, exp: u64| serde_json::json!({"iss": iss, "aud": aud, "sub": "alice", "exp": exp});
        let good = token("k1", claims("https://issuer.test", "backend", now() + 60), SECRET);
        let mut req = request(Some(&good));
        let c = a.authenticate(&mut req).unwrap().unwrap();
        assert_eq!(c["sub"], "alice");
        assert!(req.headers.get("authorization").is_none(), "the token is not forwarded by default");
        let cases = [
            (None, JwtError::Missing),
            (Some("not.a.jwt".to_owned()), JwtError::Malformed),
            (Some(token("k1", claims("https://other.test", "backend", now() + 60), SECRET)), JwtError::UnknownIssuer),
            (Some(token("k9", claims("https://issuer.test", "backend", now() + 60), SECRET)), JwtError::UnknownKey),
            (
                Some(token(
                    "k1",
                    claims("https://issuer.test", "backend", now() + 60),
                    b"another secret, 32 bytes long!!",
                )),
                JwtError::BadSignature,
            ),
            // Within the 5 s clock skew it still passes; beyond it, it has expired.
            (Some(token("k1", claims("https://issuer.test", "backend", now() - 60), SECRET)), JwtError::Expired),
            (Some(token("k1", claims("https://issuer.test", "frontend", now() + 60), SECRET)), JwtError::WrongAudience),
            // No audience at all, where the provider names one.
            (
                Some(token("k1", serde_json::json!({"iss": "https://issuer.test", "exp": now() + 60}), SECRET)),
                JwtError::WrongAudience,
            ),
        ];
        for (t, want) in cases {
            assert_eq!(a.authenticate(&mut request(t.as_deref())).unwrap_err(), want, "{t:?}");
        }
        // NumericDates that are not unsigned integers count too: negative or fractional
        // (a negative `exp` passed before, as if the token never expired); a string is malformed.
        let with = |extra: serde_json::Value| {
            let mut c = claims("https://issuer.test", "backend", 0);
            c.as_object_mut().unwrap().remove("exp");
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            a.authenticate(&mut request(Some(&token("k1", c, SECRET))))
        };
        assert_eq!(with(serde_json::json!({"exp": -102444800})).unwrap_err(), JwtError::Expired);
        assert_eq!(with(serde_json::json!({"exp": 1.5e9})).unwrap_err(), JwtError::Expired);
        assert_eq!(with(serde_json::json!({"exp": "2999999999"})).unwrap_err(), JwtError::Malformed);
        assert_eq!(with(serde_json::json!({"nbf": 4.0e9})).unwrap_err(), JwtError::NotYetValid);
        assert_eq!(with(serde_json::json!({"nbf": [1]})).unwrap_err(), JwtError::Malformed);
        assert!(with(serde_json::json!({"exp": now() as f64 + 60.5, "nbf": -5})).is_ok());
        let skewed = token("k1", claims("https://issuer.test", "backend", now() - 2), SECRET);
        assert!(a.authenticate(&mut request(Some(&skewed))).is_ok());
        // allow_missing: no token passes, a bad one still does not.
        let lenient = authn(true);
        assert_eq!(lenient.authenticate(&mut request(None)), Ok(None));
        assert_eq!(lenient.authenticate(&mut request(Some("x.y.z"))).unwrap_err(), JwtError::Malformed);
    }
}
