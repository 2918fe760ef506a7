//! The embedded store: a redb file in the data directory, one table per [`Table`].
use super::table::{Table, Write};
use crate::files::private_dir;
use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const RESOURCES: TableDefinition<&str, &str> = TableDefinition::new("resources");
const INSTANCES: TableDefinition<&str, &str> = TableDefinition::new("instances");
/// Join tokens issued (id → [`weft_api::identity::TokenInfo`] JSON), revoked ones flagged.
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
/// Services' virtual IPs (service → address): allocated once, kept for good, so a name
/// resolves to the same address across restarts and however services come and go.
const VIPS: TableDefinition<&str, &str> = TableDefinition::new("vips");
/// The keys last read from each JWKS source ([`super::table::jwks_key`] → JWKS JSON).
const JWKS: TableDefinition<&str, &str> = TableDefinition::new("jwks");
/// Peerings with other datacenters (name → JSON, see `crate::peering`).
const PEERS: TableDefinition<&str, &str> = TableDefinition::new("peers");

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
        Table::Jwks => JWKS,
        Table::Peers => PEERS,
    }
}
