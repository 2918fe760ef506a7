//! JSON Web Key Sets, as RFC 7517 writes them: parsed the same way where the control plane
//! accepts one (at apply time) and where a sidecar verifies tokens with it.
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use std::str::FromStr;

/// One key of a JWKS, ready to verify with.
pub struct Key {
    pub id: Option<String>,
    /// The algorithm the JWK names, if any; otherwise any algorithm of the key's family.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

/// Parses a JWKS; keys weft cannot verify with (encryption keys, unknown algorithms) are
/// refused rather than skipped, so a typo does not silently remove a key.
pub fn parse(text: &str) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    set.keys
        .iter()
        .enumerate()
        .map(|(i, jwk)| {
            let alg = match &jwk.common.key_algorithm {
                None => None,
                Some(a) => Some(
                    Algorithm::from_str(&format!("{a:?}"))
                        .map_err(|_| format!("key {i}: algorithm {a:?} is not a signature algorithm"))?,
                ),
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
            Ok(Key { id: jwk.common.key_id.clone(), alg, key })
        })
        .collect()
}
