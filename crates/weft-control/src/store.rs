//! Durable state of the control plane in an embedded redb file: applied resources and the
//! registry of instances. Everything else is derived from these two tables at startup.
use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const RESOURCES: TableDefinition<&str, &str> = TableDefinition::new("resources");
const INSTANCES: TableDefinition<&str, &str> = TableDefinition::new("instances");
/// Join tokens issued (id → [`weft_api::identity::TokenInfo`] JSON), revoked ones flagged.
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");

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
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
        let path = dir.join("weft.redb");
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
        txn.commit()?;
        Ok(Store { db })
    }

    pub fn write(&self, writes: &[Write<'_>]) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut resources = txn.open_table(RESOURCES)?;
            let mut instances = txn.open_table(INSTANCES)?;
            let mut tokens = txn.open_table(TOKENS)?;
            for w in writes {
                match *w {
                    Write::PutResource(k, v) => drop(resources.insert(k, v)?),
                    Write::DeleteResource(k) => drop(resources.remove(k)?),
                    Write::PutInstance(k, v) => drop(instances.insert(k, v)?),
                    Write::DeleteInstance(k) => drop(instances.remove(k)?),
                    Write::PutToken(k, v) => drop(tokens.insert(k, v)?),
                    Write::DeleteToken(k) => drop(tokens.remove(k)?),
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
