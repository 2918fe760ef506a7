//! The mesh's certificate authority. It signs proxies' CSRs with short-lived certificates whose
//! only name is a SPIFFE ID, and keeps the trust bundle the proxies verify each other with.
//!
//! By default the CA is its own root, created at first start; its key stays in the data
//! directory, readable by the owner only. An operator may instead give an intermediate CA
//! (`--ca-cert`, `--ca-key`) that chains to a root of their own.
//!
//! Invariants: the CA never sees a proxy's private key (it signs CSRs); it sets every name in
//! a certificate itself, so a CSR cannot ask for another identity; the trust bundle always
//! holds the root that signs, first, plus roots retired by `weft ca rotate` until their overlap
//! period ends.
use crate::files::write_private;
use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weft_api::identity::{CertificateResponse, spiffe_id};

/// Shortest certificate lifetime allowed (`--cert-ttl`).
pub const MIN_CERT_TTL: Duration = Duration::from_secs(60);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: String,
    /// The datacenter these identities live in: the name peers know this mesh by.
    pub datacenter: String,
    pub namespace: String,
    pub cert_ttl: Duration,
    /// An operator's intermediate CA: the certificate file (the CA first, then its chain up to
    /// and including the root) and its key.
    pub provided: Option<(PathBuf, PathBuf)>,
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not a valid PEM PKCS#10 request with a correct signature ({0})")]
    Invalid(rcgen::Error),
    #[error("cannot sign: {0}")]
    Sign(rcgen::Error),
}

struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The signing CA's certificate and intermediates (PEM), excluding the root.
    chain: String,
    root: Root,
}

#[derive(Clone)]
struct Root {
    pem: String,
    der: Vec<u8>,
}

/// A root kept in the bundle after a rotation, until `until` (Unix seconds).
#[derive(Clone, Serialize, Deserialize)]
struct Retired {
    pem: String,
    until: u64,
}

/// A rotation in progress, as `ca/rotation.json` records it beside `ca/next.key` and
/// `ca/next.pem`, so that a restart, or another replica, can finish it.
#[derive(Clone, Serialize, Deserialize)]
struct Rotation {
    /// The root being replaced, trusted until `retiring.until` once the new one signs.
    retiring: Retired,
    /// When the new root signs at the latest (Unix seconds), whoever is there to make it.
    activate_by: u64,
}

struct State {
    signer: Signer,
    /// A root created by a rotation in progress: trusted, not yet signing.
    next: Option<(Signer, Rotation)>,
    retired: Vec<Retired>,
}

impl State {
    /// What the bundle and signing depend on: the roots' certificates, in order, and the
    /// retired ones' ends.
    fn shape(&self) -> Vec<String> {
        let mut v = vec![self.signer.root.pem.clone()];
        v.extend(self.next.iter().map(|(n, _)| n.root.pem.clone()));
        v.extend(self.retired.iter().map(|r| format!("{}{}", r.pem, r.until)));
        v
    }
}

pub struct Ca {
    cfg: CaConfig,
    dir: PathBuf,
    state: RwLock<State>,
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// First 16 hex digits of the SHA-256 of a DER certificate: how roots are shown.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn pem_blocks(text: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

fn to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn new_root(trust_domain: &str) -> anyhow::Result<(Signer, KeyPair)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, format!("weft mesh root {trust_domain} {}", unix(SystemTime::now())));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    params.serial_number = Some(serial());
    let cert = params.self_signed(&key)?;
    let root = Root { pem: cert.pem(), der: cert.der().to_vec() };
    let signer = Signer {
        issuer: Issuer::from_ca_cert_der(cert.der(), KeyPair::from_pem(&key.serialize_pem())?)?,
        chain: String::new(),
        root,
    };
    Ok((signer, key))
}

/// `N` bytes from the operating system's CSPRNG (for serials, ids and secrets).
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // getrandom fails only where the OS has no randomness at all, where no key is safe either.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the operating system's random number generator is available");
    b
}

/// A certificate serial: 16 bytes from the CSPRNG, positive and without a leading zero byte,
/// so at least 120 random bits (CA/Browser Forum practice asks for 64).
fn serial() -> SerialNumber {
    let mut b: [u8; 16] = random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and without a leading zero byte
    SerialNumber::from_slice(&b)
}

/// A root of the CA's own: `NAME.pem` and `NAME.key` in `dir` (`root`, or `next` during a
/// rotation).
fn load_managed(dir: &Path, name: &str) -> anyhow::Result<Signer> {
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    let pem = std::fs::read_to_string(&cert_path).with_context(|| format!("cannot read {}", cert_path.display()))?;
    let key = std::fs::read_to_string(&key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key).with_context(|| format!("{} is not a valid private key", key_path.display()))?;
    let der =
        pem_blocks(&pem).into_iter().next().with_context(|| format!("{} holds no certificate", cert_path.display()))?;
    Ok(Signer {
        issuer: Issuer::from_ca_cert_der(&der.clone().into(), key)?,
        chain: String::new(),
        root: Root { pem: to_pem(&der), der },
    })
}

fn load_provided(cert_path: &Path, key_path: &Path) -> anyhow::Result<Signer> {
    let text =
        std::fs::read_to_string(cert_path).with_context(|| format!("cannot read --ca-cert {}", cert_path.display()))?;
    let certs = pem_blocks(&text);
    anyhow::ensure!(
        !certs.is_empty(),
        "--ca-cert {} holds no PEM certificate; give the intermediate CA first, then its chain up to the root",
        cert_path.display()
    );
    let key_text =
        std::fs::read_to_string(key_path).with_context(|| format!("cannot read --ca-key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_text)
        .with_context(|| format!("--ca-key {} is not a PEM private key rcgen can use", key_path.display()))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&certs[0]).map_err(|e| {
        anyhow::anyhow!("--ca-cert {}: the first certificate cannot be parsed: {e}", cert_path.display())
    })?;
    use rcgen::PublicKeyData;
    anyhow::ensure!(
        ca.public_key().raw == key.subject_public_key_info().as_slice(),
        "--ca-key {} does not belong to the first certificate in --ca-cert {}",
        key_path.display(),
        cert_path.display()
    );
    anyhow::ensure!(
        ca.is_ca(),
        "--ca-cert {}: the first certificate is not a CA (basicConstraints CA:FALSE)",
        cert_path.display()
    );
    let root_der = certs.last().expect("not empty").clone();
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).map_err(|e| {
        anyhow::anyhow!("--ca-cert {}: the last certificate cannot be parsed: {e}", cert_path.display())
    })?;
    anyhow::ensure!(
        root.subject() == root.issuer(),
        "--ca-cert {}: the last certificate is not a self-signed root; append the chain up to the root",
        cert_path.display()
    );
    let chain: String = certs[..certs.len() - 1].iter().map(|d| to_pem(d)).collect();
    Ok(Signer {
        issuer: Issuer::from_ca_cert_der(&certs[0].clone().into(), key)?,
        chain,
        root: Root { pem: to_pem(&root_der), der: root_der },
    })
}

impl Ca {
    /// Loads the CA from `data_dir/ca`, creating a root at first start (or uses the operator's).
    pub fn open(data_dir: &Path, cfg: CaConfig) -> anyhow::Result<Ca> {
        let dir = data_dir.join("ca");
        crate::files::private_dir(&dir)?;
        if cfg.provided.is_none() && !dir.join("root.key").exists() {
            let (signer, key) = new_root(&cfg.trust_domain)?;
            write_private(&dir.join("root.key"), &key.serialize_pem())?;
            write_private(&dir.join("root.pem"), &signer.root.pem)?;
            tracing::info!(root = %fingerprint(&signer.root.der), dir = %dir.display(), "created the mesh root CA");
        }
        let state = read_state(&dir, &cfg)?;
        let ca = Ca { cfg, dir, state: RwLock::new(state) };
        ca.expire_retired();
        Ok(ca)
    }

    /// Reads the CA's files again (another replica changed them: a rotation); true if the
    /// bundle or the signing root changed.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let fresh = read_state(&self.dir, &self.cfg)?;
        let mut s = self.write();
        let changed = s.shape() != fresh.shape();
        *s = fresh;
        Ok(changed)
    }

    /// Whether a rotation in progress is due to finish ([`Ca::activate_next`]): its time has
    /// come, and the replica that started it did not finish it (it may be gone).
    pub fn rotation_due(&self) -> bool {
        self.read().next.as_ref().is_some_and(|(_, r)| r.activate_by <= unix(SystemTime::now()))
    }

    pub fn config(&self) -> &CaConfig {
        &self.cfg
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Every root proxies must trust, the signing one first (PEM).
    pub fn bundle(&self) -> String {
        let s = self.read();
        let mut out = s.signer.root.pem.clone();
        if let Some((next, _)) = &s.next {
            out.push_str(&next.root.pem);
        }
        for r in &s.retired {
            out.push_str(&r.pem);
        }
        out
    }

    /// The signing root (PEM): what clients of the control plane verify it with.
    pub fn root_pem(&self) -> String {
        self.read().signer.root.pem.clone()
    }

    pub fn root_fingerprint(&self) -> String {
        fingerprint(&self.read().signer.root.der)
    }

    pub fn identity(&self, service: &str) -> String {
        spiffe_id(&self.cfg.trust_domain, &self.cfg.namespace, service)
    }

    /// Signs `csr_pem` for `service`, whatever names the CSR asks for.
    pub fn sign(&self, csr_pem: &str, service: &str) -> Result<CertificateResponse, CsrError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CsrError::Invalid)?;
        let identity = self.identity(service);
        let now = SystemTime::now();
        let not_after = now + self.cfg.cert_ttl;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.clone().try_into().map_err(CsrError::Sign)?)];
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let serial = serial();
        params.serial_number = Some(serial.clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let s = self.read();
        let cert = csr.signed_by(&s.signer.issuer).map_err(CsrError::Sign)?;
        Ok(CertificateResponse {
            identity,
            chain: format!("{}{}", cert.pem(), s.signer.chain),
            root: s.signer.root.pem.clone(),
            serial: serial.to_bytes().iter().map(|b| format!("{b:02x}")).collect(),
            not_after: unix(not_after),
        })
    }

    /// A server certificate for the control plane itself, with its own fresh key, valid for
    /// `names` (DNS names or IP addresses). Returns (chain PEM, key PEM).
    pub fn server_certificate(&self, names: &[String]) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.subject_alt_names.push(SanType::URI(self.identity("weft-control").try_into()?));
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_VALIDITY / 10).into();
        params.serial_number = Some(serial());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let s = self.read();
        let cert = params.signed_by(&key, &s.signer.issuer)?;
        Ok((format!("{}{}", cert.pem(), s.signer.chain), key.serialize_pem()))
    }

    /// Starts a rotation: a new root is trusted (put in the bundle) but does not sign yet.
    /// [`Ca::activate_next`] makes it sign once every proxy has the new bundle, or after
    /// `wait` at the latest.
    pub fn begin_rotation(&self, overlap: Duration, wait: Duration) -> anyhow::Result<String> {
        anyhow::ensure!(
            self.cfg.provided.is_none(),
            "this control plane signs with an intermediate given by --ca-cert; to rotate, restart it with the new intermediate (add the new root to the old chain's trust first)"
        );
        let mut s = self.write();
        anyhow::ensure!(s.next.is_none(), "a rotation is already in progress; wait for it to finish");
        let (next, key) = new_root(&self.cfg.trust_domain)?;
        let fp = fingerprint(&next.root.der);
        let now = SystemTime::now();
        let rotation = Rotation {
            retiring: Retired { pem: s.signer.root.pem.clone(), until: unix(now + overlap) },
            activate_by: unix(now + wait),
        };
        // The new key is written before it signs anything, so a restart keeps what was issued.
        write_private(&self.dir.join("next.key"), &key.serialize_pem())?;
        write_private(&self.dir.join("next.pem"), &next.root.pem)?;
        write_private(&self.dir.join("rotation.json"), &serde_json::to_string(&rotation)?)?;
        s.next = Some((next, rotation));
        Ok(fp)
    }

    /// Finishes a rotation: the new root signs from now on; the old one stays trusted until its
    /// overlap period ends.
    pub fn activate_next(&self) -> anyhow::Result<()> {
        let mut s = self.write();
        let Some((next, rotation)) = s.next.take() else { return Ok(()) };
        let mut retired = s.retired.clone();
        retired.push(rotation.retiring);
        write_private(&self.dir.join("retired.json"), &serde_json::to_string(&retired)?)?;
        std::fs::rename(self.dir.join("next.key"), self.dir.join("root.key"))?;
        std::fs::rename(self.dir.join("next.pem"), self.dir.join("root.pem"))?;
        std::fs::remove_file(self.dir.join("rotation.json"))?;
        s.signer = next;
        s.retired = retired;
        tracing::info!(root = %fingerprint(&s.signer.root.der), "new root CA is signing");
        Ok(())
    }

    /// Drops retired roots whose overlap has ended; true if the bundle changed.
    pub fn expire_retired(&self) -> bool {
        let now = unix(SystemTime::now());
        let mut s = self.write();
        let before = s.retired.len();
        s.retired.retain(|r| r.until > now);
        if s.retired.len() == before {
            return false;
        }
        let json = serde_json::to_string(&s.retired).unwrap_or_else(|_| "[]".into());
        if let Err(e) = write_private(&self.dir.join("retired.json"), &json) {
            tracing::warn!(error = %e, "cannot record the retired roots");
        }
        tracing::info!("a retired root CA left the trust bundle");
        true
    }

    /// The earliest time a retired root leaves the bundle.
    pub fn next_expiry(&self) -> Option<u64> {
        self.read().retired.iter().map(|r| r.until).min()
    }
}

/// The CA's state as its files in `dir` hold it (the operator's intermediate if given).
fn read_state(dir: &Path, cfg: &CaConfig) -> anyhow::Result<State> {
    let signer = match &cfg.provided {
        Some((cert, key)) => load_provided(cert, key)?,
        None => load_managed(dir, "root")?,
    };
    let next = match std::fs::read_to_string(dir.join("rotation.json")) {
        Ok(text) if cfg.provided.is_none() => {
            let rotation: Rotation = serde_json::from_str(&text).context("ca/rotation.json is corrupt")?;
            Some((load_managed(dir, "next")?, rotation))
        }
        _ => None,
    };
    let retired = match std::fs::read_to_string(dir.join("retired.json")) {
        Ok(text) => serde_json::from_str(&text).context("ca/retired.json is corrupt")?,
        Err(_) => Vec::new(),
    };
    Ok(State { signer, next, retired })
}

/// The root (PEM) a chain was issued under, as the fingerprint `weft get certs` shows.
pub fn root_of(root_pem: &str) -> String {
    pem_blocks(root_pem).first().map(|d| fingerprint(d)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CaConfig {
        CaConfig {
            trust_domain: "example.org".into(),
            datacenter: "dc1".into(),
            namespace: "prod".into(),
            cert_ttl: Duration::from_secs(3600),
            provided: None,
        }
    }

    fn csr(names: Vec<String>) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        CertificateParams::new(names).unwrap().serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn serials_are_positive_16_bytes_and_every_free_bit_varies() {
        let dir = std::env::temp_dir().join(format!("weft-ca-test-{}", fastrand::u64(..)));
        let ca = Ca::open(&dir, cfg()).unwrap();
        let req = csr(vec![]);
        let serials: std::collections::BTreeSet<Vec<u8>> = (0..200)
            .map(|_| {
                let hex = ca.sign(&req, "backend").unwrap().serial;
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
            })
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(serials.len(), 200, "serials repeat");
        let (mut ones, mut zeros) = ([0u8; 16], [0u8; 16]);
        for s in &serials {
            assert_eq!(s.len(), 16, "{s:02x?}");
            assert!(s[0] & 0x80 == 0 && s[0] != 0, "not positive or with a leading zero: {s:02x?}");
            for (i, b) in s.iter().enumerate() {
                ones[i] |= b;
                zeros[i] |= !b;
            }
        }
        // Only the sign bit and the low bit of the first byte are fixed: 126 bits vary.
        let varying: u32 = ones.iter().zip(&zeros).map(|(o, z)| (o & z).count_ones()).sum();
        assert_eq!(varying, 126);
    }

    #[test]
    fn signs_only_the_identity_the_ca_chooses() {
        let dir = std::env::temp_dir().join(format!("weft-ca-test-{}", fastrand::u64(..)));
        let ca = Ca::open(&dir, cfg()).unwrap();
        let resp = ca.sign(&csr(vec!["evil.example".into()]), "backend").unwrap();
        let der = pem_blocks(&resp.chain).remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, ["URI(spiffe://example.org/ns/prod/sa/backend)"]);
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60);
        // The key stays owner-only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca/root.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second start uses the same root.
        let root = ca.root_fingerprint();
        drop(ca);
        assert_eq!(Ca::open(&dir, cfg()).unwrap().root_fingerprint(), root);
        assert!(matches!(ca_sign_garbage(&dir), Err(CsrError::Invalid(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn ca_sign_garbage(dir: &Path) -> Result<CertificateResponse, CsrError> {
        Ca::open(dir, cfg())
            .unwrap()
            .sign("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "x")
    }

    #[test]
    fn rotation_trusts_both_roots_then_signs_with_the_new_one() {
        let dir = std::env::temp_dir().join(format!("weft-ca-test-{}", fastrand::u64(..)));
        let ca = Ca::open(&dir, cfg()).unwrap();
        let old = ca.root_fingerprint();
        let new = ca.begin_rotation(Duration::from_secs(3600), Duration::from_secs(10)).unwrap();
        assert_eq!(pem_blocks(&ca.bundle()).len(), 2);
        assert_eq!(ca.root_fingerprint(), old, "the new root does not sign before activation");
        ca.activate_next().unwrap();
        assert_eq!(ca.root_fingerprint(), new);
        let bundle = pem_blocks(&ca.bundle());
        assert_eq!(bundle.iter().map(|d| fingerprint(d)).collect::<Vec<_>>(), [new.clone(), old]);
        drop(ca);
        let reopened = Ca::open(&dir, cfg()).unwrap();
        assert_eq!(reopened.root_fingerprint(), new);
        assert_eq!(pem_blocks(&reopened.bundle()).len(), 2, "the retired root stays trusted across a restart");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
