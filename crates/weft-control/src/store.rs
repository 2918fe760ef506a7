//! Durable state of the control plane in an embedded redb file: applied resources and the
//! registry of instances. Everything else is derived from these two tables at startup.
use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

const RESOURCES: TableDefinition<&str, &str> = TableDefinition::new("resources");
const INSTANCES: TableDefinition<&str, &str> = TableDefinition::new("instances");
/// Join tokens issued (id → [`weft_api::identity::TokenInfo`] JSON), revoked ones flagged.
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
/// Services' virtual IPs (service → address): allocated once, kept for good, so a name
/// resolves to the same address across restarts and however services come and go.
const VIPS: TableDefinition<&str, &str> = TableDefinition::new("vips");

/// Creates `dir` (owner-only), or takes an existing one over: it and everything in it become
/// owner-only (directories 0700, files 0600), whatever an older version or the umask left.
/// The data directory holds the CA's and the token signer's keys and the admin credential.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    owner_only(dir)
}

fn owner_only(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_symlink() {
        return Ok(());
    }
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    let mode = meta.permissions().mode() & 0o777;
    if mode != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want)).with_context(|| {
            format!(
                "{} is accessible to others (mode {mode:o}) and cannot be made owner-only (is it yours?)",
                path.display()
            )
        })?;
        tracing::warn!(path = %path.display(), was = format!("{mode:o}"), now = format!("{want:o}"), "made owner-only");
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))? {
            owner_only(&entry?.path())?;
        }
    }
    Ok(())
}

pub struct Store {
    db: Database,
}

/// A change to write atomically.
pub enum Write<'a> {
    PutResource(&'a str, &'a str),
    DeleteResource(&'a str),
    PutInstance(&'a str, &'a str),
    DeleteInstance(&'a str),
    PutToken(&'a str, &'a str),
    DeleteToken(&'a str),
    PutVip(&'a str, &'a str),
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        private_dir(dir)?;
        let path = dir.join("weft.redb");
        // Created owner-only before redb opens it (redb initialises an empty file).
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "data directory {} is in use by another weft control plane; stop it or pass a different --data-dir",
                dir.display()
            ),
            e => anyhow::anyhow!("cannot open {}: {e}", path.display()),
        })?;
        let txn = db.begin_write()?;
        txn.open_table(RESOURCES)?;
        txn.open_table(INSTANCES)?;
        txn.open_table(TOKENS)?;
        txn.open_table(VIPS)?;
        txn.commit()?;
        Ok(Store { db })
    }

    pub fn write(&self, writes: &[Write<'_>]) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut resources = txn.open_table(RESOURCES)?;
            let mut instances = txn.open_table(INSTANCES)?;
            let mut tokens = txn.open_table(TOKENS)?;
            let mut vips = txn.open_table(VIPS)?;
            for w in writes {
                match *w {
                    Write::PutResource(k, v) => drop(resources.insert(k, v)?),
                    Write::DeleteResource(k) => drop(resources.remove(k)?),
                    Write::PutInstance(k, v) => drop(instances.insert(k, v)?),
                    Write::DeleteInstance(k) => drop(instances.remove(k)?),
                    Write::PutToken(k, v) => drop(tokens.insert(k, v)?),
                    Write::DeleteToken(k) => drop(tokens.remove(k)?),
                    Write::PutVip(k, v) => drop(vips.insert(k, v)?),
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// All resources, as `(key, json)`.
    pub fn resources(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.load(RESOURCES)
    }

    /// All instances, as `(id, json)`.
    pub fn instances(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.load(INSTANCES)
    }

    /// All join tokens, as `(id, json)`.
    pub fn tokens(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.load(TOKENS)
    }

    /// Every service's virtual IP, as `(service, address)`.
    pub fn vips(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.load(VIPS)
    }

    fn load(&self, table: TableDefinition<&str, &str>) -> anyhow::Result<Vec<(String, String)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), v.value().to_owned()));
        }
        Ok(out)
    }
}
