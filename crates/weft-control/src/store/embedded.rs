//! The embedded store: a redb file in the data directory, one table per [`Table`].
use super::{Table, Write};
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

pub struct Embedded {
    db: Database,
}

impl Embedded {
    pub fn open(dir: &Path) -> anyhow::Result<Embedded> {
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
        for table in Table::ALL {
            txn.open_table(definition(table))?;
        }
        txn.commit()?;
        Ok(Embedded { db })
    }

    pub fn write(&self, writes: &[Write<'_>]) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        for w in writes {
            let (table, key, value) = w.parts();
            let mut t = txn.open_table(definition(table))?;
            match value {
                Some(v) => drop(t.insert(key, v)?),
                None => drop(t.remove(key)?),
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn load(&self, table: Table) -> anyhow::Result<Vec<(String, String)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(definition(table))?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), v.value().to_owned()));
        }
        Ok(out)
    }
}

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static str> {
    match table {
        Table::Resources => RESOURCES,
        Table::Instances => INSTANCES,
        Table::Tokens => TOKENS,
        Table::Vips => VIPS,
    }
}
