//! CSR parsing and signing in the control plane's CA (crates/weft-control/src/ca.rs), as it
//! signs what a proxy sends. An input that starts with `-----BEGIN` is the PEM text itself;
//! anything else is taken as DER and wrapped in a PEM `CERTIFICATE REQUEST` block (where
//! mutations of a real CSR do better). Property: whatever the CSR asks for, a certificate
//! the CA signs names exactly the identity the CA chose (one URI SAN, no other name, not a
//! CA).
#![no_main]
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use std::time::Duration;
use weft_control::ca::{Ca, CaConfig};
use x509_parser::extensions::GeneralName;

static CA: LazyLock<Ca> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("weft-fuzz-csr-{}", std::process::id()));
    let cfg = CaConfig {
        trust_domain: "weft.local".into(),
        datacenter: "dc1".into(),
        namespace: "default".into(),
        cert_ttl: Duration::from_secs(3600),
        provided: None,
    };
    let ca = Ca::open(&dir, cfg).expect("CA");
    let _ = std::fs::remove_dir_all(&dir);
    ca
});

fuzz_target!(|data: &[u8]| {
    let pem = if data.starts_with(b"-----BEGIN") {
        String::from_utf8_lossy(data).into_owned()
    } else {
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
    };
    let Ok(signed) = CA.sign(&pem, "backend") else { return };
    let leaf = x509_parser::pem::Pem::iter_from_buffer(signed.chain.as_bytes()).next().unwrap().unwrap();
    let cert = leaf.parse_x509().expect("the CA signs parsable certificates");
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| san.value.general_names.iter().map(|n| format!("{n:?}")).collect())
        .unwrap_or_default();
    let identity = CA.identity("backend");
    assert_eq!(names, [format!("{:?}", GeneralName::URI(&identity))], "names of a signed certificate");
    assert_eq!(cert.subject().iter().count(), 0, "a signed certificate's subject: {}", cert.subject());
    assert!(!cert.is_ca(), "the CA signed a CA certificate");
    assert_eq!(signed.identity, identity);
});
