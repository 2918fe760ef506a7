//! Files only their owner may read: the data directory, the CA's and the token signer's keys,
//! the credentials, backups.
use anyhow::Context;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

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

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
