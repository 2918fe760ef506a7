//! Durable state of the control plane: applied resources, the registry of instances, join
//! tokens and services' virtual IPs. Everything else is derived from these at startup.
//!
//! Two backends:
//! - embedded (the default): a redb file in the data directory, written synchronously; one
//!   control plane owns it;
//! - etcd (`--store etcd://HOST:PORT,…`): shared by every replica. A replica applies a change
//!   in memory, queues its write (written in order, batched, by one task), and follows every
//!   change in etcd, its own included, through a watch ([`Store::take_changes`]), so all
//!   replicas converge on etcd's order. Instances are written under the replica's lease: if
//!   the replica dies, they leave the registry when the lease expires, unless their proxies
//!   have reconnected to another replica by then, which writes them under its own. The
//!   mesh's secrets (CA, token signer, credentials) are kept there encrypted
//!   ([`etcd::Etcd::share_secrets`]).
mod embedded;
pub mod etcd;
mod table;

use std::path::Path;
pub use table::{Change, Table, Write, jwks_key, jwks_source};

/// Where the store is, resolved from `--store` and its options.
#[derive(Clone, Debug)]
pub enum Backend {
    Embedded,
    Etcd(etcd::EtcdConfig, etcd::StoreKey),
}

/// Where the store is: `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Embedded,
    Etcd(etcd::EtcdConfig),
}

impl std::str::FromStr for StoreUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<StoreUrl, String> {
        if s == "embedded" {
            return Ok(StoreUrl::Embedded);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(format!("{s:?}: expected `embedded` or etcd://HOST:PORT[,HOST:PORT...]"));
        };
        let endpoints: Vec<String> =
            rest.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
        if endpoints.is_empty() {
            return Err(format!("{s:?}: name at least one etcd endpoint, e.g. etcd://127.0.0.1:2379"));
        }
        for e in &endpoints {
            let ok = e.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("{s:?}: {e:?} is not HOST:PORT"));
            }
        }
        Ok(StoreUrl::Etcd(etcd::EtcdConfig { endpoints, ..Default::default() }))
    }
}

pub enum Store {
    Embedded(embedded::Embedded),
    Etcd(Box<etcd::Etcd>),
}

impl Store {
    /// The embedded store in `dir`.
    pub fn embedded(dir: &Path) -> anyhow::Result<Store> {
        Ok(Store::Embedded(embedded::Embedded::open(dir)?))
    }

    /// Writes `writes` atomically: at once in the embedded store (an error says it was not
    /// written); queued in etcd, in order (wait for it with [`Store::flushed`]).
    pub fn write(&self, writes: &[Write<'_>]) -> anyhow::Result<()> {
        match self {
            Store::Embedded(s) => s.write(writes),
            Store::Etcd(s) => {
                s.enqueue(writes);
                Ok(())
            }
        }
    }

    /// Waits until every write made so far is durable (in etcd: at most
    /// [`etcd::COMMIT_WAIT`]; the embedded store's are at once).
    pub async fn flushed(&self) -> anyhow::Result<()> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Etcd(s) => s.flushed().await,
        }
    }

    /// The mesh's secrets in `dir` changed here (a rotation's step): shared with the other
    /// replicas (etcd); nothing to do for the embedded store, whose secrets are those files.
    pub async fn secrets_changed(&self, dir: &Path, how: etcd::Push) -> anyhow::Result<()> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Etcd(s) => s.push_secrets(dir, how).await,
        }
    }

    /// Writes the shared secrets to `dir` (another replica changed them).
    pub async fn pull_secrets(&self, dir: &Path) -> anyhow::Result<()> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Etcd(s) => s.pull_secrets(dir).await.map(drop),
        }
    }

    /// Whether this control plane does what must happen once: the only one (embedded), or the
    /// elected replica.
    pub fn leads(&self) -> bool {
        match self {
            Store::Embedded(_) => true,
            Store::Etcd(s) => s.leading(),
        }
    }

    /// Whether replicas share it (etcd): instances then live by leases, not by this process.
    pub fn shared(&self) -> bool {
        matches!(self, Store::Etcd(_))
    }

    /// A table's rows, as `(key, value)`: what the store held when it was opened (etcd) or
    /// holds now (embedded).
    pub fn load(&self, table: Table) -> anyhow::Result<Vec<(String, String)>> {
        match self {
            Store::Embedded(s) => s.load(table),
            Store::Etcd(s) => Ok(s.loaded(table)),
        }
    }

    /// The changes other replicas (and this one) make, in the shared store's order; `None`
    /// for the embedded store, or once taken.
    pub fn take_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<etcd::Event>> {
        match self {
            Store::Embedded(_) => None,
            Store::Etcd(s) => s.take_changes(),
        }
    }

    /// Whether the store answers (the API's readiness).
    pub fn readable(&self) -> anyhow::Result<()> {
        match self {
            Store::Embedded(s) => s.load(Table::Tokens).map(drop),
            Store::Etcd(s) => s.healthy(),
        }
    }
}
