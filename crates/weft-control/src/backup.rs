//! Backups of the mesh (`weft store backup`, `weft store restore`): its resources, join tokens
//! and services' virtual IPs, and its secrets (the CA's keys and roots, the token signer's key,
//! the credentials). Not the registry: instances register again when their proxies connect.
//!
//! Taken from a running control plane (its API), or from an embedded store whose control plane
//! is stopped; restored into an empty embedded store or an empty etcd, which is how a mesh
//! moves from one machine's store to etcd's replicas.
use crate::store::etcd::{Etcd, Push, SECRET_FILES};
use crate::store::{Backend, Store, Table, Write};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The format of backups this version writes and reads.
pub const FORMAT: u32 = 1;
/// The tables a backup holds.
const KEPT: [Table; 4] = [Table::Resources, Table::Tokens, Table::Vips, Table::Peers];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    /// The format's version ([`FORMAT`]).
    pub weft_backup: u32,
    /// When it was taken (Unix seconds).
    pub taken: u64,
    /// Table → key → value, as the store keeps them.
    pub tables: BTreeMap<String, BTreeMap<String, String>>,
    /// Data-directory path → contents: in the clear, so the file is as secret as the data
    /// directory (it is written owner-only).
    pub secrets: BTreeMap<String, String>,
}

impl Backup {
    /// A backup of `tables` and the secret files in `dir`.
    pub fn new(tables: BTreeMap<String, BTreeMap<String, String>>, dir: &Path) -> Backup {
        let secrets = SECRET_FILES
            .iter()
            .filter_map(|name| Some((name.to_string(), std::fs::read_to_string(dir.join(name)).ok()?)))
            .collect();
        let taken =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Backup { weft_backup: FORMAT, taken, tables, secrets }
    }

    /// A backup of the embedded store in `dir` (its control plane stopped).
    pub fn of_embedded(dir: &Path) -> anyhow::Result<Backup> {
        anyhow::ensure!(
            dir.join("weft.redb").exists(),
            "{} holds no weft store (weft.redb); give the data directory of a control plane",
            dir.display()
        );
        let store = Store::embedded(dir).map_err(|e| {
            anyhow::anyhow!(
                "{e:#} (to back up a running control plane, leave out --data-dir: the backup is taken through its API)"
            )
        })?;
        let mut tables = BTreeMap::new();
        for t in KEPT {
            tables.insert(t.name().to_owned(), store.load(t)?.into_iter().collect());
        }
        Ok(Backup::new(tables, dir))
    }

    /// Reads and checks a backup file.
    pub fn read(path: &Path) -> anyhow::Result<Backup> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let b: Backup = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a weft backup (weft store backup writes one)", path.display()))?;
        anyhow::ensure!(
            b.weft_backup == FORMAT,
            "{}: backup format {} is not this version's ({FORMAT})",
            path.display(),
            b.weft_backup
        );
        for name in b.secrets.keys() {
            anyhow::ensure!(SECRET_FILES.contains(&name.as_str()), "{}: unknown secret {name:?}", path.display());
        }
        for name in b.tables.keys() {
            anyhow::ensure!(KEPT.iter().any(|t| t.name() == name), "{}: unknown table {name:?}", path.display());
        }
        Ok(b)
    }

    /// Writes it to `path`, owner-only (it holds the CA's key).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        crate::files::write_private(path, &serde_json::to_string_pretty(self)?)
    }

    fn writes(&self) -> Vec<(Table, &str, &str)> {
        KEPT.iter()
            .flat_map(|t| {
                self.tables.get(t.name()).into_iter().flatten().map(move |(k, v)| (*t, k.as_str(), v.as_str()))
            })
            .collect()
    }

    /// Restores it into `target`, which must hold no mesh: the embedded store in `data_dir`,
    /// or etcd. Returns what was restored, in words.
    pub async fn restore(&self, target: &Backend, data_dir: &Path) -> anyhow::Result<String> {
        let rows = self.writes();
        let writes: Vec<Write<'_>> = rows.iter().map(|(t, k, v)| Write::put(*t, k, v)).collect();
        match target {
            Backend::Embedded => {
                let occupied = SECRET_FILES.iter().find(|f| data_dir.join(f).exists());
                anyhow::ensure!(
                    occupied.is_none() && !data_dir.join("weft.redb").exists(),
                    "{} already holds a mesh ({}); restore into an empty data directory",
                    data_dir.display(),
                    occupied.copied().unwrap_or("weft.redb")
                );
                let store = Store::embedded(data_dir)?;
                store.write(&writes)?;
                self.write_secrets(data_dir)?;
            }
            Backend::Etcd(cfg, key) => {
                let etcd = Etcd::open(cfg, key.clone(), Duration::from_secs(10)).await?;
                let held: usize = Table::ALL.iter().map(|t| etcd.loaded(*t).len()).sum();
                let scratch = tempdir()?;
                let secrets = etcd.pull_secrets(&scratch).await;
                let _ = std::fs::remove_dir_all(&scratch);
                anyhow::ensure!(
                    held == 0 && secrets? == 0,
                    "etcd already holds a mesh (under /weft/v1/); restore into an empty one"
                );
                let store = Store::Etcd(Box::new(etcd));
                store.write(&writes)?;
                store.flushed().await?;
                let Store::Etcd(etcd) = &store else { unreachable!("made above") };
                let scratch = tempdir()?;
                let pushed = async {
                    self.write_secrets(&scratch)?;
                    etcd.push_secrets(&scratch, Push::All).await
                };
                let result = pushed.await;
                let _ = std::fs::remove_dir_all(&scratch);
                result?;
            }
        }
        Ok(format!(
            "restored {} resources, {} join tokens, {} virtual IPs, {} peerings and {} secrets (the CA and credentials)",
            self.tables.get("resources").map_or(0, BTreeMap::len),
            self.tables.get("tokens").map_or(0, BTreeMap::len),
            self.tables.get("vips").map_or(0, BTreeMap::len),
            self.tables.get("peers").map_or(0, BTreeMap::len),
            self.secrets.len()
        ))
    }

    fn write_secrets(&self, dir: &Path) -> anyhow::Result<()> {
        for (name, text) in &self.secrets {
            let path = dir.join(name);
            crate::files::private_dir(path.parent().expect("under the directory"))?;
            crate::files::write_private(&path, text)?;
        }
        Ok(())
    }
}

/// An owner-only scratch directory for secrets on their way to etcd.
fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("weft-restore-{}-{}", std::process::id(), crate::ca::random::<4>()[0]));
    crate::files::private_dir(&dir)?;
    Ok(dir)
}
