//! JWT parsing and verification (crates/weft-proxy/src/jwt.rs), as the inbound stack checks
//! a request's token: providers decoded from a `jwt_authn` filter as the control plane
//! writes it (an HMAC key, an EC P-256 key, a key with no `kid`). An input is a token; its
//! first byte picks how it is presented:
//! - as the whole `Authorization` value: it must never pass (the fuzzer holds no key);
//! - signed here with a key the provider trusts (the rest is `HEADER.PAYLOAD` as JSON text,
//!   base64url-encoded here): whatever passes has the provider's issuer, its audience and an
//!   unexpired `exp` if it has one, and a header whose `alg` the key allows;
//! - signed with a key the provider does not trust: it must never pass.
#![no_main]
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::{RouteMatch, route_match};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtProvider, JwtRequirement, RequirementRule, jwt_provider, jwt_requirement, requirement_rule,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, LazyLock};
use weft_proxy::jwt::JwtAuthn;

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "backend";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const SKEW: u64 = 5;

struct Keys {
    authn: Arc<JwtAuthn>,
    ec: EncodingKey,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = ec.public_key_raw(); // 0x04 ‖ x ‖ y
    let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..]));
    let k = B64.encode(SECRET);
    let jwks = format!(
        r#"{{"keys":[{{"kty":"oct","kid":"hs","alg":"HS256","k":"{k}"}},
            {{"kty":"EC","kid":"ec","alg":"ES256","crv":"P-256","x":"{x}","y":"{y}"}},
            {{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}"}}]}}"#
    );
    let provider = JwtProvider {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        clock_skew_seconds: SKEW as u32,
        payload_in_metadata: "payload".into(),
        jwks_source_specifier: Some(jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(data_source::Specifier::InlineString(jwks)),
            ..Default::default()
        })),
        ..Default::default()
    };
    let filter = JwtAuthentication {
        providers: [("p".to_owned(), provider)].into(),
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(requirement_rule::RequirementType::Requires(JwtRequirement {
                requires_type: Some(jwt_requirement::RequiresType::ProviderName("p".into())),
            })),
        }],
        ..Default::default()
    };
    let authn = weft_proxy::jwt::decode(&filter, "fuzz").expect("the provider decodes");
    Keys { authn, ec: EncodingKey::from_ec_der(&ec.serialize_der()) }
});

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let keys = &*KEYS;
    let (value, trusted) = match how % 4 {
        0 => (text.into_owned(), None),
        n => {
            let Some((header, payload)) = text.split_once('.') else { return };
            let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
            let (key, alg) = match n {
                1 => (EncodingKey::from_secret(SECRET), Algorithm::HS256),
                2 => (keys.ec.clone(), Algorithm::ES256),
                _ => (EncodingKey::from_secret(b"not the provider's secret, 32 b"), Algorithm::HS256),
            };
            let Ok(sig) = jsonwebtoken::crypto::sign(input.as_bytes(), &key, alg) else { return };
            (format!("Bearer {input}.{sig}"), (n != 3).then_some((header.to_owned(), alg)))
        }
    };
    let Ok(req) = http::Request::builder().uri("/").header("authorization", value.as_str()).body(()) else { return };
    let mut parts = req.into_parts().0;
    let Ok(Some(claims)) = keys.authn.authenticate(&mut parts) else { return };
    let Some((header, alg)) = trusted else { panic!("a token not signed with a trusted key passed: {value:?}") };
    assert_eq!(claims["iss"], ISSUER, "{value:?}");
    let aud_ok = claims["aud"] == AUDIENCE || claims["aud"].as_array().is_some_and(|a| a.iter().any(|v| v == AUDIENCE));
    assert!(aud_ok, "audience {}", claims["aud"]);
    if let Some(exp) = claims.get("exp") {
        assert!(exp.as_f64().is_some_and(|e| e + SKEW as f64 >= now() as f64), "exp {exp}");
    }
    // Only `alg` is read: other members are skipped unchecked, as jsonwebtoken skips them (an
    // out-of-range number in one is no reason to refuse a token signed with a trusted key).
    #[derive(serde::Deserialize)]
    struct Alg {
        alg: String,
    }
    let header: Alg = serde_json::from_str(&header).expect("a passed token's header has an alg");
    assert_eq!(header.alg, format!("{alg:?}"), "the header's alg is the key's");
    assert!(parts.headers.get("authorization").is_none(), "the token is not forwarded");
});
