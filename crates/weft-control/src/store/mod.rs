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

pub use embedded::private_dir;
use std::path::Path;

/// A change to write atomically.
pub enum Write<'a> {
    PutResource(&'a str, &'a str),
    DeleteResource(&'a str),
    /// An instance whose proxy is connected to this control plane (in etcd: under its lease).
    PutInstance(&'a str, &'a str),
    /// An instance's record changed here (a health report) while its proxy's stream may be
    /// at another replica (in etcd: its lease stays whose it is; nothing if it is gone).
    UpdateInstance(&'a str, &'a str),
    /// An instance gone for good (its proxy deregistered).
    DeleteInstance(&'a str),
    /// An instance whose proxy's stream to this control plane ended (in etcd: deleted only
    /// while this replica holds it; its proxy may have moved to another).
    ReleaseInstance(&'a str),
    PutToken(&'a str, &'a str),
    DeleteToken(&'a str),
    PutVip(&'a str, &'a str),
}

/// The store's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Resources,
    Instances,
    Tokens,
    Vips,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Resources, Table::Instances, Table::Tokens, Table::Vips];

    pub fn name(self) -> &'static str {
        match self {
            Table::Resources => "resources",
            Table::Instances => "instances",
            Table::Tokens => "tokens",
            Table::Vips => "vips",
        }
    }

    fn of(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl<'a> Write<'a> {
    /// A row put into `table`.
    pub fn put(table: Table, key: &'a str, value: &'a str) -> Write<'a> {
        match table {
            Table::Resources => Write::PutResource(key, value),
            Table::Instances => Write::PutInstance(key, value),
            Table::Tokens => Write::PutToken(key, value),
            Table::Vips => Write::PutVip(key, value),
        }
    }

    /// The table, key and new value (`None`: deleted).
    fn parts(&self) -> (Table, &str, Option<&str>) {
        match *self {
            Write::PutResource(k, v) => (Table::Resources, k, Some(v)),
            Write::DeleteResource(k) => (Table::Resources, k, None),
            Write::PutInstance(k, v) | Write::UpdateInstance(k, v) => (Table::Instances, k, Some(v)),
            Write::DeleteInstance(k) | Write::ReleaseInstance(k) => (Table::Instances, k, None),
            Write::PutToken(k, v) => (Table::Tokens, k, Some(v)),
            Write::DeleteToken(k) => (Table::Tokens, k, None),
            Write::PutVip(k, v) => (Table::Vips, k, Some(v)),
        }
    }
}

/// A change found in the shared store (etcd), made by any replica, this one included.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: Table,
    pub key: String,
    /// The new value; `None`: deleted (or its holder's lease expired).
    pub value: Option<String>,
    /// For an instance: whether this replica holds it (wrote it under its own lease).
    pub ours: bool,
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
