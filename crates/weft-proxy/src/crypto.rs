//! The one cryptography provider every TLS configuration of the proxy is built with (ring, as
//! rustls's), and the secure random source for secrets and unguessable names.
use rustls::crypto::CryptoProvider;
use std::sync::Arc;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `bytes` random bytes from the OS's CSPRNG, in hex: for secrets and unguessable names.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // getrandom fails only where the OS has no randomness at all, where no key is safe either.
    provider().secure_random.fill(&mut b).expect("the operating system's random number generator is available");
    b.iter().map(|b| format!("{b:02x}")).collect()
}
