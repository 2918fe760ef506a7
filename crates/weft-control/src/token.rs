//! Join tokens: how a proxy proves which service it belongs to before the CA signs for it.
//!
//! A token is `weft1.CLAIMS.MAC`: the claims (id, service, expiry) in base64url JSON, and an
//! HMAC-SHA256 over them with a key only this control plane holds (`ca/token.key`, owner-only).
//! Tokens are checked in a fixed order, each failure with its own [`TokenError`]; a revoked
//! token's id is kept in the store until it would have expired anyway.
use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use std::path::Path;

const PREFIX: &str = "weft1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub id: String,
    #[serde(rename = "svc")]
    pub service: String,
    /// Unix seconds.
    pub exp: u64,
}

/// Why a join token was refused. Each names what the operator should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no join token was presented; give the proxy one with --token or WEFT_TOKEN (create it with `weft token create --service NAME`)"
    )]
    Missing,
    #[error("the join token is malformed ({0}); copy it whole from `weft token create`")]
    Malformed(&'static str),
    #[error(
        "the join token was not issued by this control plane (its signature does not verify); create one here with `weft token create`"
    )]
    ForeignSigned,
    #[error("the join token {id} expired {ago}s ago; create a new one with `weft token create --service {service}`")]
    Expired { id: String, service: String, ago: u64 },
    #[error("the join token {id} was revoked; create a new one with `weft token create --service {service}`")]
    Revoked { id: String, service: String },
    #[error(
        "the join token {id} is for service {token_service:?}, not {requested:?}; a proxy can only get a certificate for the service its token names"
    )]
    WrongService { id: String, token_service: String, requested: String },
}

impl TokenError {
    /// The metrics label of this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "no-token",
            TokenError::Malformed(_) => "malformed-token",
            TokenError::ForeignSigned => "foreign-token",
            TokenError::Expired { .. } => "expired-token",
            TokenError::Revoked { .. } => "revoked-token",
            TokenError::WrongService { .. } => "wrong-service",
        }
    }
}

pub struct TokenKey {
    key: ring::hmac::Key,
}

impl TokenKey {
    /// Loads `ca/token.key`, creating it at first start.
    pub fn open(data_dir: &Path) -> anyhow::Result<TokenKey> {
        let path = data_dir.join("ca").join("token.key");
        crate::files::private_dir(&data_dir.join("ca"))?;
        let secret = match std::fs::read_to_string(&path) {
            Ok(text) => B64.decode(text.trim()).with_context(|| format!("{} is corrupt", path.display()))?,
            Err(_) => {
                let mut secret = vec![0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                    .map_err(|_| anyhow::anyhow!("no randomness for the token key"))?;
                crate::files::write_private(&path, &B64.encode(&secret))?;
                secret
            }
        };
        Ok(TokenKey { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret) })
    }

    pub fn issue(&self, service: &str, exp: u64) -> (Claims, String) {
        // 128 bits from the CSPRNG: ids never collide, and none can be guessed.
        let id: [u8; 16] = crate::ca::random();
        let claims = Claims { id: id.iter().map(|b| format!("{b:02x}")).collect(), service: service.to_owned(), exp };
        let body = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let tag = ring::hmac::sign(&self.key, body.as_bytes());
        let token = format!("{PREFIX}.{body}.{}", B64.encode(tag.as_ref()));
        (claims, token)
    }

    /// Checks a token's form, signature and expiry (revocation and service are the caller's,
    /// who knows them).
    pub fn verify(&self, token: Option<&str>, now: u64) -> Result<Claims, TokenError> {
        let token = token.map(str::trim).filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        let mut parts = token.split('.');
        let (Some(prefix), Some(body), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        if prefix != PREFIX {
            return Err(TokenError::Malformed("it does not start with weft1."));
        }
        let tag = B64.decode(tag).map_err(|_| TokenError::Malformed("the signature is not base64url"))?;
        let claims: Claims = B64
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("the claims are not base64url JSON"))?;
        ring::hmac::verify(&self.key, body.as_bytes(), &tag).map_err(|_| TokenError::ForeignSigned)?;
        if claims.exp <= now {
            return Err(TokenError::Expired { id: claims.id, service: claims.service, ago: now - claims.exp });
        }
        Ok(claims)
    }
}

/// The token id inside a token string (for `weft token revoke TOKEN`), unverified.
pub fn id_of(token: &str) -> Option<String> {
    let body = token.trim().split('.').nth(1)?;
    let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
    Some(claims.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        let dir = std::env::temp_dir().join(format!("weft-token-test-{}", fastrand::u64(..)));
        let k = TokenKey::open(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        k
    }

    #[test]
    fn each_misuse_has_its_own_error() {
        let (ours, theirs) = (key(), key());
        let (claims, token) = ours.issue("backend", 1000);
        assert_eq!(ours.verify(Some(&token), 999), Ok(claims.clone()));
        assert_eq!(id_of(&token), Some(claims.id.clone()));
        assert_eq!(ours.verify(None, 0), Err(TokenError::Missing));
        assert!(matches!(ours.verify(Some("garbage"), 0), Err(TokenError::Malformed(_))));
        assert!(matches!(ours.verify(Some(&token.replace("weft1", "weft2")), 0), Err(TokenError::Malformed(_))));
        assert_eq!(theirs.verify(Some(&token), 0), Err(TokenError::ForeignSigned));
        assert!(matches!(ours.verify(Some(&token), 1000), Err(TokenError::Expired { ago: 0, .. })));
        // Changing the claims (here: the service) breaks the signature.
        let (_, other) = ours.issue("frontend", 1000);
        let forged = format!("{}.{}.{}", PREFIX, other.split('.').nth(1).unwrap(), token.split('.').nth(2).unwrap());
        assert_eq!(ours.verify(Some(&forged), 0), Err(TokenError::ForeignSigned));
    }

    #[test]
    fn token_ids_are_128_bits_and_distinct() {
        let k = key();
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| k.issue("backend", 1000).0.id).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit())), "{ids:?}");
    }
}
