//! The shared store on etcd (`--store etcd://…`): every replica of the control plane reads and
//! writes the same keys, under [`PREFIX`]:
//! - `resources/KEY`, `tokens/ID`, `vips/SERVICE`: as in the embedded store;
//! - `instances/ID`: under the lease of the replica the instance's proxy is connected to;
//! - `secrets/NAME`: the CA's and the token signer's keys and the credentials, encrypted
//!   (AES-256-GCM) under the store key every replica is given;
//! - `replicas/ADDRESS`: what each replica says of itself, under its lease;
//! - `election/leader/…` and `locks/…`: etcd's election and lock keys (the leader; the turns
//!   replicas take when they first share the secrets).
//!
//! Writes are queued and made in order by one task, batched into transactions; a watch of the
//! prefix feeds every change, this replica's own included, back to the mesh's state, so all
//! replicas converge on etcd's order. etcd's members are reached one at a time ([`Members`]),
//! the next one when an operation through the current one fails.
use super::table::{Change, Table, Write};
use anyhow::Context;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Every key weft keeps in etcd starts with this.
pub const PREFIX: &str = "/weft/v1/";
/// How long an operation that etcd answers at once may take before the next member is tried.
const SHORT: Duration = Duration::from_millis(1500);
/// The election of the replica that does what must happen once.
const LEADER: &str = "/weft/v1/election/leader";
/// How long [`Etcd::flushed`] waits for etcd to confirm a write.
pub const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// Operations in one transaction (etcd's default limit is 128).
const MAX_BATCH: usize = 100;
/// The mesh's secrets, as files in the data directory (paths relative to it).
pub const SECRET_FILES: [&str; 9] = [
    "ca/root.key",
    "ca/root.pem",
    "ca/next.key",
    "ca/next.pem",
    "ca/rotation.json",
    "ca/retired.json",
    "ca/token.key",
    "admin.token",
    "metrics.token",
];

/// How to reach etcd: `--store etcd://…` and the `--etcd-*` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// etcd's TLS: the CA that signed its certificate, and this client's certificate and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd's authentication: a user, and a file holding its password.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// How long to wait at start for etcd to answer.
    pub wait: Duration,
}

/// The key the secrets are encrypted with (32 bytes).
#[derive(Clone)]
pub struct StoreKey([u8; 32]);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(…)")
    }
}

impl StoreKey {
    /// Reads a key written as 64 hexadecimal digits (e.g. by `openssl rand -hex 32`).
    pub fn parse(text: &str, from: &str) -> anyhow::Result<StoreKey> {
        let hex = text.trim();
        let bytes: Option<Vec<u8>> = (hex.len() == 64)
            .then(|| (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect())
            .flatten();
        let bytes = bytes.with_context(|| {
            format!("{from}: the store key must be 64 hexadecimal digits (make one with `openssl rand -hex 32`)")
        })?;
        Ok(StoreKey(bytes.try_into().expect("32 bytes")))
    }

    fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key"));
        let nonce: [u8; 12] = crate::ca::random();
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(name.as_bytes()), &mut sealed)
            .expect("sealing cannot fail");
        [b"weft1".as_slice(), &nonce, &sealed].concat()
    }

    /// A row of a table that holds secrets ([`Table::sealed`]) as etcd keeps it: sealed under
    /// its etcd key, base64; any other row as it is.
    fn seal_row(&self, table: Table, key: &str, value: &str) -> String {
        use base64::Engine;
        if !table.sealed() {
            return value.to_owned();
        }
        base64::engine::general_purpose::STANDARD.encode(self.seal(&key_of(table, key), value.as_bytes()))
    }

    /// A row as etcd keeps it, opened ([`StoreKey::seal_row`]).
    fn open_row(&self, table: Table, key: &str, stored: &str) -> anyhow::Result<String> {
        use base64::Engine;
        if !table.sealed() {
            return Ok(stored.to_owned());
        }
        let name = key_of(table, key);
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(stored)
            .map_err(|_| anyhow::anyhow!("{name} in etcd is not sealed as weft seals it"))?;
        String::from_utf8(self.open(&name, &sealed)?).map_err(|_| anyhow::anyhow!("{name} in etcd is not text"))
    }

    fn open(&self, name: &str, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let body = sealed.strip_prefix(b"weft1").filter(|b| b.len() >= 12 + 16);
        let body = body.with_context(|| format!("secret {name} in etcd is not in weft's format"))?;
        let (nonce, ciphertext) = body.split_at(12);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key"));
        let mut buf = ciphertext.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).expect("12 bytes");
        let plain = key.open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf).map_err(|_| {
            anyhow::anyhow!(
                "cannot decrypt secret {name} from etcd: this replica's store key is not the one it was written with (give every replica the same --store-key-file)"
            )
        })?;
        Ok(plain.to_vec())
    }
}

struct Op {
    table: Table,
    key: String,
    value: Option<String>,
    /// Only where this replica holds the instance, or keeping whose lease it is:
    /// [`Write::UpdateInstance`], [`Write::ReleaseInstance`].
    if_held: bool,
}

struct Batch {
    seq: u64,
    ops: Vec<Op>,
}

/// What the watch of the prefix delivers to the mesh's state.
#[derive(Debug)]
pub enum Event {
    Changed(Change),
    /// This replica's lease was lost (etcd unreachable longer than its time to live) and a new
    /// one granted: the instances connected here must be written again, under it.
    LeaseRenewed,
    /// The mesh's secrets changed (a rotation's step, at any replica): to be read again.
    Secrets,
}

/// etcd's members, reached one at a time: operations go to the member in use; after one
/// fails, the next operation connects to the next member. (A client balancing over all of
/// them kept sending to one that had died.)
pub struct Members {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// The member in use, its client once connected, and how many times it changed.
    current: tokio::sync::Mutex<(usize, Option<Client>, u64)>,
}

impl Members {
    /// A client of the member in use (connecting to it, or to the next ones in turn), and the
    /// epoch to name in [`Members::failed`].
    async fn client(&self) -> Result<(Client, u64), etcd_client::Error> {
        let mut cur = self.current.lock().await;
        if let Some(c) = &cur.1 {
            return Ok((c.clone(), cur.2));
        }
        let mut last = None;
        for i in 0..self.endpoints.len() {
            let at = (cur.0 + i) % self.endpoints.len();
            match Client::connect([self.endpoints[at].as_str()], Some(self.options.clone())).await {
                Ok(c) => {
                    cur.0 = at;
                    cur.1 = Some(c.clone());
                    return Ok((c, cur.2));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// An operation through the client of `epoch` failed: the next one goes to the next member.
    async fn failed(&self, epoch: u64) {
        let mut cur = self.current.lock().await;
        if cur.2 == epoch && cur.1.take().is_some() {
            cur.0 = (cur.0 + 1) % self.endpoints.len();
            cur.2 += 1;
        }
    }

    /// Runs `op` through each member in turn until one answers (an operation that must not
    /// wait for a retry loop: a replica's start, an API call).
    async fn any<T, Fut>(&self, op: impl Fn(Client) -> Fut) -> Result<T, etcd_client::Error>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = None;
        for _ in 0..self.endpoints.len() {
            match self.within(SHORT, &op).await {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// Runs `op` with a client of the member in use; if it fails, the next operation goes to
    /// the next member.
    async fn with<T, Fut>(&self, op: impl FnOnce(Client) -> Fut) -> Result<T, etcd_client::Error>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let (client, epoch) = self.client().await?;
        let result = op(client).await;
        if result.is_err() {
            self.failed(epoch).await;
        }
        result
    }

    /// [`Members::with`] for an operation that answers at once when etcd is there: one that
    /// takes longer than `limit` failed (a request to a member that just died can hang).
    async fn within<T, Fut>(&self, limit: Duration, op: impl FnOnce(Client) -> Fut) -> Result<T, etcd_client::Error>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.with(|client| async move {
            tokio::time::timeout(limit, op(client))
                .await
                .unwrap_or_else(|_| Err(etcd_client::Error::Internal(format!("no answer from etcd within {limit:?}"))))
        })
        .await
    }
}

pub struct Etcd {
    members: Arc<Members>,
    /// The writer's queue, and the sequence number of the last batch queued (in the order
    /// the batches are queued, so under one lock).
    queue: Mutex<(mpsc::UnboundedSender<Batch>, u64)>,
    committed: watch::Receiver<u64>,
    lease: Arc<AtomicI64>,
    healthy: Arc<AtomicBool>,
    loaded: BTreeMap<&'static str, Vec<(String, String)>>,
    events: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    /// What the secrets are encrypted with.
    key: StoreKey,
    /// Whether this replica is the elected one ([`Etcd::campaign`]).
    leading: Arc<AtomicBool>,
}

fn key_of(table: Table, key: &str) -> String {
    format!("{PREFIX}{}/{key}", table.name())
}

/// `(table, key)` of an etcd key under [`PREFIX`]; `None` for keys that are not a table's.
fn parse_key(raw: &[u8]) -> Option<(Table, String)> {
    let s = std::str::from_utf8(raw).ok()?.strip_prefix(PREFIX)?;
    let (table, key) = s.split_once('/')?;
    Some((Table::of(table)?, key.to_owned()))
}

impl Etcd {
    /// Connects, takes a lease of `lease_ttl` (kept alive while this process runs), reads
    /// everything under [`PREFIX`], and starts following it from there.
    pub async fn open(cfg: &EtcdConfig, key: StoreKey, lease_ttl: Duration) -> anyhow::Result<Etcd> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if cfg.ca_file.is_some() || cfg.cert_file.is_some() {
            let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        if let Some(user) = &cfg.user {
            let path = cfg.password_file.as_ref().context("--etcd-user needs --etcd-password-file")?;
            let password = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            options = options.with_user(user.clone(), password.trim().to_owned());
        }
        let endpoints = cfg.endpoints.join(",");
        let members = Arc::new(Members {
            endpoints: cfg.endpoints.clone(),
            options,
            current: tokio::sync::Mutex::new((0, None, 0)),
        });
        let ttl = lease_ttl.as_secs().max(2) as i64;
        // etcd may be starting with this process (a host booting, its members coming up one
        // by one): waited for, once said.
        let (deadline, mut said) = (tokio::time::Instant::now() + cfg.wait, false);
        let lease = loop {
            match members.any(|mut c| async move { c.lease_grant(ttl, None).await }).await {
                Ok(granted) => break granted.id(),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    if !std::mem::replace(&mut said, true) {
                        tracing::warn!(etcd = %endpoints, error = %e, wait = ?cfg.wait, "etcd does not answer yet; waiting for it (--etcd-wait)");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot reach etcd at {endpoints} (waited {:?}, --etcd-wait)", cfg.wait)));
                }
            }
        };
        let all = members
            .any(|mut c| async move { c.get(PREFIX, Some(GetOptions::new().with_prefix())).await })
            .await
            .with_context(|| format!("cannot read {PREFIX} from etcd at {endpoints}"))?;
        let revision = all.header().map(|h| h.revision()).unwrap_or(0);
        let mut loaded: BTreeMap<&'static str, Vec<(String, String)>> = BTreeMap::new();
        for kv in all.kvs() {
            if let Some((table, row)) = parse_key(kv.key()) {
                let value = key.open_row(table, &row, kv.value_str()?)?;
                loaded.entry(table.name()).or_default().push((row, value));
            }
        }
        let lease = Arc::new(AtomicI64::new(lease));
        let healthy = Arc::new(AtomicBool::new(true));
        let (events_tx, events) = mpsc::unbounded_channel();
        let watch = members
            .any(|mut c| async move {
                c.watch(PREFIX, Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1))).await
            })
            .await
            .context("cannot watch etcd")?;
        tokio::spawn(follow(members.clone(), watch, revision + 1, lease.clone(), events_tx.clone(), key.clone()));
        tokio::spawn(keep_alive(members.clone(), lease.clone(), ttl, healthy.clone(), events_tx));
        let (queue, rx) = mpsc::unbounded_channel();
        let (done, committed) = watch::channel(0);
        tokio::spawn(commit(members.clone(), rx, done, lease.clone(), healthy.clone()));
        tracing::info!(etcd = %endpoints, revision, lease_ttl_s = ttl, "store: etcd");
        Ok(Etcd {
            members,
            queue: Mutex::new((queue, 0)),
            committed,
            lease,
            healthy,
            loaded,
            events: Mutex::new(Some(events)),
            key,
            leading: Default::default(),
        })
    }

    pub fn enqueue(&self, writes: &[Write<'_>]) {
        let ops = writes
            .iter()
            .map(|w| {
                let (table, key, value) = w.parts();
                let if_held = matches!(w, Write::UpdateInstance(..) | Write::ReleaseInstance(..));
                let value = value.map(|v| self.key.seal_row(table, key, v));
                Op { table, key: key.to_owned(), value, if_held }
            })
            .collect();
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.1 += 1;
        // The writer ends only with the process.
        let _ = queue.0.send(Batch { seq: queue.1, ops });
    }

    /// Waits until every write queued so far is in etcd.
    pub async fn flushed(&self) -> anyhow::Result<()> {
        let want = self.queue.lock().unwrap_or_else(|p| p.into_inner()).1;
        let mut rx = self.committed.clone();
        match tokio::time::timeout(COMMIT_WAIT, rx.wait_for(|done| *done >= want)).await {
            Ok(Ok(_)) => Ok(()),
            _ => anyhow::bail!(
                "etcd did not confirm the write within {}s (is it reachable?); it is kept and retried",
                COMMIT_WAIT.as_secs()
            ),
        }
    }

    pub fn loaded(&self, table: Table) -> Vec<(String, String)> {
        self.loaded.get(table.name()).cloned().unwrap_or_default()
    }

    pub fn take_changes(&self) -> Option<mpsc::UnboundedReceiver<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn healthy(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.healthy.load(Ordering::Relaxed), "etcd is not reachable");
        Ok(())
    }

    /// Whether this replica is the elected one.
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// Stands for election as `address`, for as long as the process runs: elected, it leads
    /// until its lease is lost (it stood with it), then stands again.
    pub async fn campaign(&self, address: String) {
        loop {
            let lease = self.lease();
            let value = address.clone();
            let elected = self.members.with(|mut c| async move { c.campaign(LEADER, value, lease).await }).await;
            match elected {
                Ok(_) => {
                    self.leading.store(true, Ordering::Relaxed);
                    tracing::info!(replica = %address, "this replica leads (finishes what must happen once)");
                    while self.lease() == lease {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    self.leading.store(false, Ordering::Relaxed);
                }
                // Another replica leads: a campaign waits in etcd until it is gone, and gives up
                // at the client's request timeout (etcd then withdraws it); this replica stands
                // again after a pause, without a warning: nothing is wrong.
                Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::Cancelled => {
                    tracing::debug!("another replica leads; standing for election again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot stand for election in etcd; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Says what this replica is, under its lease (gone with it).
    pub async fn announce(&self, me: &weft_api::registry::Replica) -> anyhow::Result<()> {
        let json = serde_json::to_string(me)?;
        let at = format!("{PREFIX}replicas/{}", me.address);
        let lease = self.lease();
        let (at, json) = (&at, &json);
        self.members
            .any(|mut c| async move { c.put(at.as_str(), json.as_str(), Some(PutOptions::new().with_lease(lease))).await })
            .await?;
        Ok(())
    }

    /// Every replica that announced itself and whose lease lives, the leader marked.
    pub async fn replicas(&self) -> anyhow::Result<Vec<weft_api::registry::Replica>> {
        let all = self
            .members
            .any(
                |mut c| async move { c.get(format!("{PREFIX}replicas/"), Some(GetOptions::new().with_prefix())).await },
            )
            .await?;
        let leader = match self.members.any(|mut c| async move { c.leader(LEADER).await }).await {
            Ok(l) => l.kv().and_then(|kv| kv.value_str().ok().map(str::to_owned)),
            Err(_) => None,
        };
        let mut out: Vec<weft_api::registry::Replica> =
            all.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
        for r in &mut out {
            r.leader = leader.as_deref() == Some(r.address.as_str());
        }
        Ok(out)
    }

    /// This replica's lease (instances connected here are written under it).
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// Makes the mesh's secrets the same on every replica, around `open` (which opens, or
    /// creates, the CA, the token signer and the credentials from the files in `dir`).
    /// Replicas take turns (an etcd lock): if etcd holds the secrets, they are written to
    /// `dir` first (see [`Etcd::pull_secrets`]); if it holds none, this is the first replica,
    /// and what `open` made is stored.
    pub async fn share_secrets<T>(&self, dir: &Path, open: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let lease = self.lease();
        let name = format!("{PREFIX}locks/secrets");
        let lock = self
            .members
            .any(|mut c| {
                let name = name.clone();
                async move { c.lock(name, Some(etcd_client::LockOptions::new().with_lease(lease))).await }
            })
            .await
            .context("cannot take the secrets lock in etcd")?;
        let result = async {
            let held = self.pull_secrets(dir).await?;
            let opened = open()?;
            if held == 0 {
                self.push_secrets(dir, Push::All).await?;
                tracing::info!("the mesh's CA and credentials stored in etcd, encrypted");
            } else {
                tracing::info!(secrets = held, "the mesh's CA and credentials taken from etcd");
            }
            Ok(opened)
        }
        .await;
        let key = lock.key().to_vec();
        let _ = self.members.within(SHORT, |mut c| async move { c.unlock(key).await }).await;
        result
    }

    /// Writes the secrets etcd holds to `dir`, and removes the ones it does not hold (etcd is
    /// the truth), unless it holds none; returns how many it holds.
    pub async fn pull_secrets(&self, dir: &Path) -> anyhow::Result<usize> {
        let prefix = format!("{PREFIX}secrets/");
        let held = self
            .members
            .any(|mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let held: BTreeMap<String, Vec<u8>> = held
            .kvs()
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?.strip_prefix(&prefix)?.to_owned(), kv.value().to_vec())))
            .collect();
        if held.is_empty() {
            return Ok(0);
        }
        for name in SECRET_FILES {
            let path = dir.join(name);
            match held.get(name) {
                Some(sealed) => {
                    let plain = self.key.open(name, sealed)?;
                    let text = String::from_utf8(plain).with_context(|| format!("secret {name} is not text"))?;
                    crate::files::private_dir(path.parent().expect("under the data directory"))?;
                    crate::files::write_private(&path, &text)?;
                }
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("cannot remove {}", path.display()));
                    }
                    _ => {}
                },
            }
        }
        Ok(held.len())
    }

    /// Stores the secrets in `dir` (encrypted), and deletes from etcd the ones `dir` does not
    /// hold, in one transaction. [`Push::NewRotation`] only if no rotation is in progress.
    pub async fn push_secrets(&self, dir: &Path, how: Push) -> anyhow::Result<()> {
        let prefix = format!("{PREFIX}secrets/");
        let mut ops = Vec::new();
        for name in SECRET_FILES {
            let key = format!("{prefix}{name}");
            match std::fs::read(dir.join(name)) {
                Ok(plain) => ops.push(TxnOp::put(key, self.key.seal(name, &plain), None)),
                Err(_) => ops.push(TxnOp::delete(key, None)),
            }
        }
        let mut txn = Txn::new();
        if how == Push::NewRotation {
            txn = txn.when([Compare::create_revision(format!("{prefix}ca/rotation.json"), CompareOp::Equal, 0)]);
        }
        let txn = txn.and_then(ops);
        let done = self
            .members
            .any(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .context("cannot store the mesh's secrets in etcd")?;
        anyhow::ensure!(
            done.succeeded(),
            "a rotation is already in progress (started at another replica); wait for it to finish"
        );
        Ok(())
    }
}

/// How [`Etcd::push_secrets`] stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    All,
    /// A rotation's start: only if no other is in progress.
    NewRotation,
}

/// Turns the watch of the prefix into the mesh's events, from revision `from` on; when the
/// watch breaks (the etcd member it went through died), it is made again, through another,
/// from the revision after the last one seen, so no change is missed.
async fn follow(
    members: Arc<Members>,
    mut stream: etcd_client::WatchStream,
    mut from: i64,
    lease: Arc<AtomicI64>,
    events: mpsc::UnboundedSender<Event>,
    sealing: StoreKey,
) {
    let secrets = format!("{PREFIX}secrets/");
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) if resp.canceled() => {
                if resp.compact_revision() > from {
                    tracing::error!(
                        missed_from = from,
                        compacted_to = resp.compact_revision(),
                        "etcd compacted changes this replica had not seen; restart it to read the mesh again"
                    );
                    from = resp.compact_revision();
                }
                Err(format!("canceled: {}", resp.cancel_reason()))
            }
            Ok(Some(resp)) => Ok(resp),
            Ok(None) => Err("ended".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        let resp = match resp {
            Ok(resp) => resp,
            Err(why) => {
                tracing::warn!(why, revision = from, "the etcd watch broke; watching again from where it was");
                // Through another member: this one may be gone.
                if let Ok((_, epoch)) = members.client().await {
                    members.failed(epoch).await;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let again = WatchOptions::new().with_prefix().with_start_revision(from);
                    match members.within(SHORT, |mut c| async move { c.watch(PREFIX, Some(again)).await }).await {
                        Ok(s) => break stream = s,
                        Err(e) => tracing::debug!(error = %e, "cannot watch etcd yet"),
                    }
                }
                continue;
            }
        };
        if resp.events().iter().any(|ev| ev.kv().is_some_and(|kv| kv.key().starts_with(secrets.as_bytes())))
            && events.send(Event::Secrets).is_err()
        {
            return;
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            from = from.max(kv.mod_revision() + 1);
            let Some((table, key)) = parse_key(kv.key()) else { continue };
            let value = match ev.event_type() {
                EventType::Put => {
                    match kv.value_str().map_err(anyhow::Error::from).and_then(|v| sealing.open_row(table, &key, v)) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            tracing::error!(key = %key, error = %e, "a row in etcd cannot be read; ignored");
                            continue;
                        }
                    }
                }
                EventType::Delete => None,
            };
            let ours = table == Table::Instances && kv.lease() == lease.load(Ordering::Relaxed) && kv.lease() != 0;
            if events.send(Event::Changed(Change { table, key, value, ours })).is_err() {
                return;
            }
        }
    }
}

/// Keeps this replica's lease alive (through another member when one goes away); if it
/// expired, takes a new one.
async fn keep_alive(
    members: Arc<Members>,
    lease: Arc<AtomicI64>,
    ttl: i64,
    healthy: Arc<AtomicBool>,
    events: mpsc::UnboundedSender<Event>,
) {
    let every = Duration::from_secs((ttl / 3).max(1) as u64);
    loop {
        let id = lease.load(Ordering::Relaxed);
        let healthy = &healthy;
        let alive = members.with(|mut c| async move {
            let (mut keeper, mut answers) = c.lease_keep_alive(id).await?;
            loop {
                keeper.keep_alive().await?;
                // A member that died may leave the answer hanging: then, through another.
                let answer = tokio::time::timeout(SHORT, answers.message()).await.map_err(|_| {
                    etcd_client::Error::LeaseKeepAliveError("no answer to a keep-alive within 1.5s".into())
                })?;
                match answer? {
                    Some(a) if a.ttl() > 0 => healthy.store(true, Ordering::Relaxed),
                    _ => return Ok::<(), etcd_client::Error>(()),
                }
                tokio::time::sleep(every).await;
            }
        });
        if let Err(e) = alive.await {
            // The member went away (or etcd is unreachable): the lease may well live; keep it
            // alive through another. Once it has expired, etcd says so (above).
            healthy.store(false, Ordering::Relaxed);
            tracing::debug!(lease = id, error = %e, "cannot keep the lease alive through this etcd member");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        healthy.store(false, Ordering::Relaxed);
        tracing::warn!(lease = id, "the etcd lease of this replica expired; taking a new one");
        loop {
            tokio::time::sleep(every).await;
            match members.within(SHORT, |mut c| async move { c.lease_grant(ttl, None).await }).await {
                Ok(granted) => {
                    lease.store(granted.id(), Ordering::Relaxed);
                    healthy.store(true, Ordering::Relaxed);
                    let _ = events.send(Event::LeaseRenewed);
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "etcd refused a new lease; trying again"),
            }
        }
    }
}

/// Writes the queued batches in order, several to a transaction, retrying until etcd takes
/// them. An instance is written under this replica's lease, and deleted only while it still
/// holds it (its proxy may have moved to another replica).
async fn commit(
    members: Arc<Members>,
    mut queue: mpsc::UnboundedReceiver<Batch>,
    done: watch::Sender<u64>,
    lease: Arc<AtomicI64>,
    healthy: Arc<AtomicBool>,
) {
    while let Some(first) = queue.recv().await {
        let mut last = first.seq;
        let mut ops = first.ops;
        while ops.len() < MAX_BATCH {
            let Ok(more) = queue.try_recv() else { break };
            last = more.seq;
            ops.extend(more.ops);
        }
        // One operation per key (etcd refuses a transaction naming a key twice): the last.
        let mut seen = std::collections::HashSet::new();
        let mut ops: Vec<Op> = ops.into_iter().rev().filter(|o| seen.insert((o.table, o.key.clone()))).collect();
        ops.reverse();
        let mut delay = Duration::from_millis(100);
        loop {
            let held = lease.load(Ordering::Relaxed);
            let ops = &ops;
            match members.within(SHORT, |mut c| async move { write(&mut c, ops, held).await }).await {
                Ok(()) => break,
                Err(e) => {
                    healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot write to etcd");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        let _ = done.send(last);
    }
}

/// One transaction for `ops` (one per [`MAX_BATCH`] of them): a conditional one is a
/// transaction nested in it, whose condition holds for that operation alone (so a batch of
/// instances' health reports is one write to etcd, not one each).
async fn write(client: &mut Client, ops: &[Op], lease: i64) -> Result<(), etcd_client::Error> {
    let when = |compare: Compare, op: TxnOp| TxnOp::txn(Txn::new().when([compare]).and_then([op]));
    let txn_op = |op: &Op| {
        let key = key_of(op.table, &op.key);
        match (&op.value, op.table) {
            (Some(v), Table::Instances) if op.if_held => when(
                Compare::create_revision(key.as_str(), CompareOp::Greater, 0),
                TxnOp::put(key, v.as_str(), Some(PutOptions::new().with_ignore_lease())),
            ),
            (Some(v), Table::Instances) => TxnOp::put(key, v.as_str(), Some(PutOptions::new().with_lease(lease))),
            (Some(v), _) => TxnOp::put(key, v.as_str(), None),
            // Only while this replica holds it: its proxy may be at another one now.
            (None, Table::Instances) if op.if_held => {
                when(Compare::lease(key.as_str(), CompareOp::Equal, lease), TxnOp::delete(key, None))
            }
            (None, _) => TxnOp::delete(key, None),
        }
    };
    // etcd refuses a transaction of more than 128 operations (its default --max-txn-ops).
    for batch in ops.chunks(MAX_BATCH) {
        client.txn(Txn::new().and_then(batch.iter().map(txn_op).collect::<Vec<_>>())).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An etcd member on loopback for one test (Debian's etcd-server), stopped when dropped.
    struct Member {
        child: std::process::Child,
        dir: PathBuf,
        url: String,
    }

    impl Member {
        fn start() -> Option<Member> {
            let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let (client, peer) = (port(), port());
            let dir = std::env::temp_dir().join(format!("weft-etcd-unit-{}-{client}", std::process::id()));
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = std::process::Command::new("etcd")
                .arg("--data-dir")
                .arg(&dir)
                .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}"), "--log-level", "error"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            match child {
                Ok(child) => Some(Member { child, dir, url }),
                Err(_) => {
                    eprintln!("SKIPPED: no etcd binary (apt-get install etcd-server)");
                    None
                }
            }
        }
    }

    impl Drop for Member {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A replica's conditional writes, batched as transactions nested in one: an instance's
    /// update is written only while the instance is there, its release only by the replica
    /// whose lease it is under (its proxy may have moved to another replica).
    #[tokio::test]
    async fn conditional_writes_hold_each_for_its_own_instance() {
        let Some(member) = Member::start() else { return };
        let cfg = EtcdConfig {
            endpoints: vec![member.url.clone()],
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            password_file: None,
            wait: Duration::from_secs(20),
        };
        let key = StoreKey([7; 32]);
        let a = Etcd::open(&cfg, key.clone(), Duration::from_secs(30)).await.unwrap();
        let b = Etcd::open(&cfg, key, Duration::from_secs(30)).await.unwrap();
        let there = |id: &'static str| {
            let members = a.members.clone();
            async move {
                let key = key_of(Table::Instances, id);
                let got = members
                    .any(|mut c| {
                        let key = key.clone();
                        async move { c.get(key, None).await }
                    })
                    .await
                    .unwrap();
                got.kvs().first().map(|kv| kv.value_str().unwrap().to_owned())
            }
        };
        a.enqueue(&[Write::PutInstance("moved", "{\"at\":\"a\"}"), Write::PutInstance("stays", "{}")]);
        a.flushed().await.unwrap();
        // B, in one batch: releases an instance A holds, updates one nobody wrote, and one A wrote.
        b.enqueue(&[
            Write::ReleaseInstance("moved"),
            Write::UpdateInstance("never", "{}"),
            Write::UpdateInstance("stays", "{\"healthy\":true}"),
        ]);
        b.flushed().await.unwrap();
        assert_eq!(there("moved").await.as_deref(), Some("{\"at\":\"a\"}"), "B does not release what A holds");
        assert_eq!(there("never").await, None, "an update does not make an instance");
        assert_eq!(there("stays").await.as_deref(), Some("{\"healthy\":true}"), "an update of one that is there");
        a.enqueue(&[Write::ReleaseInstance("moved")]);
        a.flushed().await.unwrap();
        assert_eq!(there("moved").await, None, "A releases what it holds");
        drop(member);
    }

    #[test]
    fn secrets_round_trip_and_a_wrong_key_is_named() {
        let key = StoreKey::parse(&"ab".repeat(32), "test").unwrap();
        let sealed = key.seal("ca/root.key", b"secret");
        assert!(!sealed.windows(6).any(|w| w == b"secret"), "stored in the clear");
        assert_eq!(key.open("ca/root.key", &sealed).unwrap(), b"secret");
        assert!(key.open("admin.token", &sealed).is_err(), "bound to its name");
        let other = StoreKey::parse(&"cd".repeat(32), "test").unwrap();
        let e = other.open("ca/root.key", &sealed).unwrap_err().to_string();
        assert!(e.contains("store key is not the one it was written with"), "{e}");
        let e = StoreKey::parse("abc", "key.hex").err().unwrap().to_string();
        assert!(e.starts_with("key.hex: the store key must be 64 hexadecimal digits"), "{e}");
    }

    #[test]
    fn peerings_are_sealed_in_etcd_and_other_rows_are_not() {
        let key = StoreKey::parse(&"ab".repeat(32), "test").unwrap();
        let row = r#"{"name":"dc2","streamSecret":"s3cr3t"}"#;
        let stored = key.seal_row(Table::Peers, "dc2", row);
        assert!(!stored.contains("s3cr3t") && !stored.contains("streamSecret"), "stored in the clear: {stored}");
        assert_eq!(key.open_row(Table::Peers, "dc2", &stored).unwrap(), row);
        assert!(key.open_row(Table::Peers, "dc3", &stored).is_err(), "bound to its row");
        let other = StoreKey::parse(&"cd".repeat(32), "test").unwrap();
        assert!(other.open_row(Table::Peers, "dc2", &stored).unwrap_err().to_string().contains("store key"));
        assert_eq!(key.seal_row(Table::Resources, "Service/a", "{}"), "{}", "only secret tables are sealed");
        assert_eq!(key.open_row(Table::Resources, "Service/a", "{}").unwrap(), "{}");
    }

    #[test]
    fn keys_name_their_table() {
        assert_eq!(key_of(Table::Instances, "web-0"), "/weft/v1/instances/web-0");
        assert_eq!(parse_key(b"/weft/v1/instances/web-0"), Some((Table::Instances, "web-0".into())));
        assert_eq!(parse_key(b"/weft/v1/resources/HTTPRoute/a/b"), Some((Table::Resources, "HTTPRoute/a/b".into())));
        assert_eq!(parse_key(b"/weft/v1/secrets/ca/root.key"), None);
        assert_eq!(parse_key(b"/other/instances/x"), None);
    }
}
