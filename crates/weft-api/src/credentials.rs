//! The CLI's credentials file: for each control plane address, its admin credential and the
//! root certificate its API is verified with. A control plane writes its own entry at start,
//! so `weft get` works without flags on the machine that runs `weft up` or `weft control`.
//!
//! The file is `$WEFT_CONFIG`, else `$XDG_CONFIG_HOME/weft/credentials.json`, else
//! `~/.config/weft/credentials.json`; it is written owner-only.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub admin_token: String,
    /// PEM file of the mesh root the control plane's TLS certificate chains to.
    pub ca_file: PathBuf,
}

pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("weft").join("credentials.json"))
}

fn load_all() -> BTreeMap<String, Entry> {
    path().and_then(|p| std::fs::read_to_string(p).ok()).and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// The entry for the control plane at `address`, if this machine has one.
pub fn load(address: &str) -> Option<Entry> {
    load_all().remove(address)
}

/// Records (or replaces) the entry for `address`.
pub fn save(address: &str, entry: Entry) -> std::io::Result<PathBuf> {
    let mut all = load_all();
    all.insert(address.to_owned(), entry);
    store_all(&all)
}

/// Writes the whole file, owner-only, in one step (a reader sees the old or the new one).
fn store_all(all: &BTreeMap<String, Entry>) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = path().ok_or_else(|| std::io::Error::other("neither WEFT_CONFIG nor HOME is set"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(serde_json::to_string_pretty(all).map_err(std::io::Error::other)?.as_bytes())?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Removes the entry for `address` (a `weft up` mesh with a temporary data dir is gone).
pub fn forget(address: &str) {
    forget_where(|a, _| a == address);
}

/// Removes the entries whose root file is under `dir` (the data of a mesh that is gone).
pub fn forget_under(dir: &std::path::Path) {
    forget_where(|_, e| e.ca_file.starts_with(dir));
}

fn forget_where(gone: impl Fn(&str, &Entry) -> bool) {
    let mut all = load_all();
    let before = all.len();
    all.retain(|a, e| !gone(a, e));
    if all.len() != before {
        let _ = store_all(&all);
    }
}
