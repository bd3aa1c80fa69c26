//! The stored provider key: provider mode enabled through the API survives a restart. The key
//! file lives in the data directory with mode 0600 and is never logged; disabling provider
//! mode deletes it. A key Birdeye refuses (401 or 403) is set aside, not deleted: it moves to
//! `provider.key.rejected` (same mode), which the node never loads, so that an operator can
//! look at it, and restore it if Birdeye's refusal was a mistake of theirs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use mesh_protocol::identity::{sync_dir, write_private_file_atomically};
use mesh_provider::ApiKey;

/// Where the provider key is kept.
#[derive(Debug, Clone)]
pub struct ProviderKeyStore {
    path: PathBuf,
}

impl ProviderKeyStore {
    /// A store at `path` (usually `<MESH_DATA_DIR>/provider.key`).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored key, if provider mode was on.
    pub fn load(&self) -> io::Result<Option<ApiKey>> {
        match fs::read_to_string(&self.path) {
            Ok(text) => {
                let key = text.trim();
                Ok((!key.is_empty()).then(|| ApiKey::new(key)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores `key` (replacing any earlier one) readable by the owner only. Atomic: a crash
    /// leaves the old key or the new one, never an empty file
    /// ([`write_private_file_atomically`]).
    pub fn save(&self, key: &ApiKey) -> io::Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        write_private_file_atomically(&self.path, key.expose().as_bytes(), true)
    }

    /// Where a refused key is set aside ([`ProviderKeyStore::quarantine`]).
    pub fn rejected_path(&self) -> PathBuf {
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".rejected");
        self.path.with_file_name(name)
    }

    /// Sets the stored key aside after Birdeye refused it: renamed to
    /// [`rejected_path`](Self::rejected_path) (replacing an earlier one), durably. Returns that
    /// path when there was a key to move.
    pub fn quarantine(&self) -> io::Result<Option<PathBuf>> {
        let rejected = self.rejected_path();
        match fs::rename(&self.path, &rejected) {
            Ok(()) => {
                match self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    Some(dir) => sync_dir(dir)?,
                    None => sync_dir(Path::new("."))?,
                }
                Ok(Some(rejected))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets the key (provider mode disabled), durably: after a power loss provider mode
    /// does not come back.
    pub fn clear(&self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Ok(()) => match self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) => sync_dir(dir),
                None => sync_dir(Path::new(".")),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_clear_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProviderKeyStore::new(dir.path().join("state/provider.key"));
        assert!(store.load().unwrap().is_none());
        store.save(&ApiKey::new("k-123")).unwrap();
        store.save(&ApiKey::new("k-456")).unwrap();
        assert_eq!(store.load().unwrap().unwrap().expose(), "k-456");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        store.clear().unwrap();
        store.clear().unwrap();
        assert!(store.load().unwrap().is_none());
    }

    #[test]
    fn a_refused_key_is_set_aside_not_loaded_and_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProviderKeyStore::new(dir.path().join("provider.key"));
        assert_eq!(store.quarantine().unwrap(), None, "nothing to set aside");
        store.save(&ApiKey::new("k-bad")).unwrap();
        let aside = store.quarantine().unwrap().unwrap();
        assert_eq!(aside, dir.path().join("provider.key.rejected"));
        assert!(store.load().unwrap().is_none(), "a refused key is not loaded again");
        assert_eq!(fs::read_to_string(&aside).unwrap(), "k-bad");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&aside).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn leftover_temporary_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProviderKeyStore::new(dir.path().join("provider.key"));
        // A crash while saving leaves an empty or truncated temporary file, never the key file.
        fs::write(dir.path().join(".provider.key.tmp-1-0000000000000001"), b"").unwrap();
        fs::write(dir.path().join(".provider.key.tmp-2-0000000000000002"), b"k-").unwrap();
        assert!(store.load().unwrap().is_none());
        store.save(&ApiKey::new("k-789")).unwrap();
        assert_eq!(store.load().unwrap().unwrap().expose(), "k-789");
    }
}
