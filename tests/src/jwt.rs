//! Issuers for JWT tests: ECDSA P-256 keys that sign tokens, their JWKS, and a JWKS served
//! over HTTP on loopback (its keys can change, its reads are counted).
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// An ECDSA P-256 signing key and its public JWK.
pub struct SigningKey {
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    pub fn new(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate().unwrap();
        let raw = pair.public_key_raw(); // 0x04 || X || Y
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        });
        SigningKey { encoding: EncodingKey::from_ec_der(&pair.serialize_der()), jwk }
    }

    /// A token with `claims`, its header naming key id `kid`.
    pub fn sign(&self, kid: &str, claims: serde_json::Value) -> String {
        let header = Header { kid: Some(kid.into()), ..Header::new(Algorithm::ES256) };
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }
}

/// The JWKS document listing `keys`.
pub fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

/// Seconds since the Unix epoch, for `exp` claims.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A JWKS served to every HTTP request on a loopback port, until the test process ends.
pub struct JwksServer {
    pub port: u16,
    body: Arc<Mutex<String>>,
    reads: Arc<AtomicUsize>,
}

impl JwksServer {
    pub fn start(body: String) -> JwksServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (body, reads) = (Arc::new(Mutex::new(body)), Arc::new(AtomicUsize::new(0)));
        let (served, counted) = (body.clone(), reads.clone());
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                counted.fetch_add(1, Ordering::Relaxed);
                let body = served.lock().unwrap().clone();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(body.as_bytes());
            }
        });
        JwksServer { port, body, reads }
    }

    /// Serves `body` from now on.
    pub fn set(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    /// How many times it was read.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }
}
