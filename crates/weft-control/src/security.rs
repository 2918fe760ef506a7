//! Admission and identity: join tokens, the certificates the CA issues against them, and the
//! admin credential that guards the API (and the metrics credential, which reads only the
//! scrape targets). Every refusal is counted by reason.
use crate::ca::{self, Ca, CaConfig, CsrError};
use crate::store::{Store, Write};
use crate::token::{Claims, TokenError, TokenKey};
use anyhow::Context;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use weft_api::identity::{CertificateRequest, CertificateResponse, IssuedCertificate, TokenInfo};

/// Why a certificate request was refused.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Csr(#[from] CsrError),
}

impl IssueError {
    pub fn reason(&self) -> &'static str {
        match self {
            IssueError::Token(e) => e.reason(),
            IssueError::Csr(_) => "bad-csr",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refusal {
    /// What the token was presented for: `certificate`, `xds` or `api`.
    purpose: &'static str,
    reason: &'static str,
}

pub struct Security {
    pub ca: Ca,
    key: TokenKey,
    store: Arc<Store>,
    tokens: Mutex<BTreeMap<String, TokenInfo>>,
    /// The latest certificate of each proxy instance.
    issued: Mutex<BTreeMap<String, IssuedCertificate>>,
    admin_token: String,
    /// Reads the scrape targets only (Prometheus' HTTP service discovery).
    metrics_token: String,
    refusals: Family<Refusal, Counter>,
    certificates: Counter,
    pub registry: Registry,
}

/// Where the metrics credential is kept in the data directory.
pub const METRICS_TOKEN_FILE: &str = "metrics.token";

/// The credential kept in `path` (owner-only), made from a CSPRNG the first time.
fn credential(path: &Path, prefix: &str) -> anyhow::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        return Ok(t.trim().to_owned());
    }
    let mut b = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("no randomness for the credential in {}", path.display()))?;
    let t = format!("{prefix}-{}", b.iter().map(|b| format!("{b:02x}")).collect::<String>());
    crate::files::write_private(path, &t)?;
    Ok(t)
}

/// Compares digests, so the time taken says nothing about the secret.
fn same_secret(bearer: Option<&str>, secret: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref().to_vec();
    bearer.is_some_and(|b| digest(b) == digest(secret))
}

fn now() -> u64 {
    ca::unix(SystemTime::now())
}

impl Security {
    pub fn open(data_dir: &Path, cfg: CaConfig, store: Arc<Store>) -> anyhow::Result<Security> {
        let ca = Ca::open(data_dir, cfg)?;
        let key = TokenKey::open(data_dir)?;
        let admin_token = credential(&data_dir.join("admin.token"), "weft-admin")?;
        let metrics_token = credential(&data_dir.join(METRICS_TOKEN_FILE), "weft-metrics")?;
        let mut tokens = BTreeMap::new();
        for (id, json) in store.load(crate::store::Table::Tokens)? {
            let info: TokenInfo =
                serde_json::from_str(&json).with_context(|| format!("stored token {id} is corrupt"))?;
            tokens.insert(id, info);
        }
        let mut registry = Registry::with_prefix("weft_control");
        let refusals = Family::<Refusal, Counter>::default();
        registry.register(
            "join_token_refusals",
            "Requests refused because of their join token, by purpose and reason",
            refusals.clone(),
        );
        let certificates = Counter::default();
        registry.register("certificates_issued", "Certificates signed for proxies", certificates.clone());
        Ok(Security {
            ca,
            key,
            store,
            tokens: Mutex::new(tokens),
            issued: Mutex::default(),
            admin_token,
            metrics_token,
            refusals,
            certificates,
            registry,
        })
    }

    pub fn is_admin(&self, bearer: Option<&str>) -> bool {
        same_secret(bearer, &self.admin_token)
    }

    /// Whether `bearer` may read the scrape targets: the metrics credential, or the admin one.
    pub fn is_metrics_reader(&self, bearer: Option<&str>) -> bool {
        same_secret(bearer, &self.metrics_token) || self.is_admin(bearer)
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn create_token(&self, service: &str, ttl: Duration) -> anyhow::Result<(TokenInfo, String)> {
        let (claims, token) = self.key.issue(service, now() + ttl.as_secs().max(1));
        let info = TokenInfo { id: claims.id.clone(), service: claims.service, expires: claims.exp, revoked: false };
        self.store.write(&[Write::PutToken(&info.id, &serde_json::to_string(&info)?)])?;
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(info.id.clone(), info.clone());
        Ok((info, token))
    }

    /// Revokes a token by id (or by the token itself); `None` if no such token was issued.
    pub fn revoke(&self, id_or_token: &str) -> anyhow::Result<Option<TokenInfo>> {
        let id = crate::token::id_of(id_or_token).unwrap_or_else(|| id_or_token.trim().to_owned());
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let Some(info) = tokens.get(&id) else { return Ok(None) };
        let mut info = info.clone();
        info.revoked = true;
        self.store.write(&[Write::PutToken(&info.id, &serde_json::to_string(&info)?)])?;
        tokens.insert(id, info.clone());
        Ok(Some(info))
    }

    /// A token issued, revoked or forgotten by another replica (or this one), as the shared
    /// store reports it.
    pub fn token_changed(&self, id: &str, json: Option<&str>) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        match json.map(serde_json::from_str::<TokenInfo>) {
            Some(Ok(info)) => drop(tokens.insert(id.to_owned(), info)),
            Some(Err(e)) => tracing::error!(token = id, error = %e, "a join token in etcd is invalid; ignored"),
            None => drop(tokens.remove(id)),
        }
    }

    /// Tokens issued and not yet expired.
    pub fn tokens(&self) -> Vec<TokenInfo> {
        let now = now();
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.values().filter(|t| t.expires > now).cloned().collect()
    }

    /// Forgets expired tokens, in the store too. Called where what must happen once is done
    /// (the only control plane, or the elected replica); other replicas drop them when the
    /// store says so.
    pub fn sweep_tokens(&self) {
        let now = now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let expired: Vec<String> = tokens.values().filter(|t| t.expires <= now).map(|t| t.id.clone()).collect();
        for id in &expired {
            match self.store.write(&[Write::DeleteToken(id)]) {
                Ok(()) => drop(tokens.remove(id)),
                Err(e) => tracing::warn!(token = %id, error = %e, "cannot forget an expired join token"),
            }
        }
    }

    /// Checks a join token presented for `purpose`: valid, not revoked, and (when `service` is
    /// given) for that service. Refusals are counted.
    pub fn check_token(
        &self,
        purpose: &'static str,
        bearer: Option<&str>,
        service: Option<&str>,
    ) -> Result<Claims, TokenError> {
        let result = self.key.verify(bearer, now()).and_then(|claims| {
            let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            if tokens.get(&claims.id).is_none_or(|t| t.revoked) {
                // A token this control plane signed but no longer lists was revoked and then
                // forgotten, or its store was lost: either way it is not valid.
                return Err(TokenError::Revoked { id: claims.id, service: claims.service });
            }
            match service {
                Some(s) if s != claims.service => Err(TokenError::WrongService {
                    id: claims.id,
                    token_service: claims.service,
                    requested: s.to_owned(),
                }),
                _ => Ok(claims),
            }
        });
        if let Err(e) = &result {
            self.refusals.get_or_create(&Refusal { purpose, reason: e.reason() }).inc();
            tracing::warn!(purpose, reason = e.reason(), error = %e, "join token refused");
        }
        result
    }

    /// Signs a proxy's CSR for the service its join token names.
    pub fn issue(&self, bearer: Option<&str>, req: &CertificateRequest) -> Result<CertificateResponse, IssueError> {
        let claims = self.check_token("certificate", bearer, req.service.as_deref())?;
        let resp = self.ca.sign(&req.csr, &claims.service).inspect_err(|e| {
            self.refusals.get_or_create(&Refusal { purpose: "certificate", reason: "bad-csr" }).inc();
            tracing::warn!(instance = %req.instance, error = %e, "CSR refused");
        })?;
        self.certificates.inc();
        let record = IssuedCertificate {
            instance: req.instance.clone(),
            identity: resp.identity.clone(),
            serial: resp.serial.clone(),
            not_before: now(),
            not_after: resp.not_after,
            root: ca::root_of(&resp.root),
        };
        tracing::info!(instance = %req.instance, identity = %resp.identity, serial = %resp.serial, "certificate issued");
        self.issued.lock().unwrap_or_else(|p| p.into_inner()).insert(req.instance.clone(), record);
        Ok(resp)
    }

    /// Each proxy's latest certificate.
    pub fn certificates(&self) -> Vec<IssuedCertificate> {
        self.issued.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Forgets certificates that have expired (their proxies are gone).
    pub fn forget_expired(&self) {
        let now = now();
        self.issued.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, c| c.not_after > now);
    }
}
