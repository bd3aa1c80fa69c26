//! Node identity: the ed25519 keypair, its libp2p [`PeerId`] and the UUID [`NodeId`].
//!
//! The `node_id` the guide shows and the tables store as `source_node_id` is derived from the
//! public key (ARCHITECTURE section 3): the first 16 bytes of SHA-256(public key) with the UUID
//! version 8 / RFC 4122 variant bits set. Anyone holding a message can therefore check that its
//! `origin` belongs to the key that signed it.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Length of an ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an ed25519 signature in bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Length of the key file: the 32-byte ed25519 secret seed, nothing else.
const KEY_FILE_LEN: usize = 32;

/// The UUID that names a node: derived from its public key, never chosen.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(Uuid);

impl NodeId {
    /// Derives the node id of an ed25519 public key.
    pub fn from_public_key(public_key: &[u8; PUBLIC_KEY_LEN]) -> Self {
        Self(uuid_from_sha256(public_key))
    }

    /// Wraps a UUID read back from storage or an API. It is not checked against any key.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID form, as stored in `source_node_id`.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

impl FromStr for NodeId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::from_str(s).map(Self)
    }
}

/// First 16 bytes of SHA-256(`bytes`) as a version 8 UUID.
fn uuid_from_sha256(bytes: &[u8]) -> Uuid {
    uuid_from_digest(&Sha256::digest(bytes).into())
}

/// First 16 bytes of a SHA-256 digest as a version 8 UUID.
pub(crate) fn uuid_from_digest(digest: &[u8; 32]) -> Uuid {
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(first).into_uuid()
}

/// Errors of loading or creating a node key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read, created or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The key file exists but does not hold a 32-byte ed25519 seed.
    #[error(
        "key file {path} holds {len} bytes; a node key file holds exactly 32 (restore it from a \
         backup, or move it aside to start with a new identity)"
    )]
    BadLength {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The key file can be read by users other than its owner.
    #[error(
        "key file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// A node's ed25519 keypair with the identifiers derived from it.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    public: [u8; PUBLIC_KEY_LEN],
    node_id: NodeId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret key is deliberately left out.
        f.debug_struct("Identity").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh random identity (OS randomness).
    pub fn generate() -> Self {
        Self::from_seed(rand::random())
    }

    /// The identity of a 32-byte ed25519 seed (deterministic; tests and key files).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&seed);
        let public = signing.verifying_key().to_bytes();
        Self { signing, public, node_id: NodeId::from_public_key(&public) }
    }

    /// Loads the key at `path`, or creates it (mode 0600, parent directories as needed) when
    /// the file does not exist yet. A file that others can read is refused, as ssh does. The
    /// key is written atomically ([`write_private_file_atomically`]): a crash while creating
    /// it leaves no key file (a new one is made on the next start), never an empty one.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io_err = |source| IdentityError::Io { path: path.to_path_buf(), source };
        match fs::read(path) {
            Ok(bytes) => Self::from_key_file(path, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let identity = Self::generate();
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs::create_dir_all(parent).map_err(io_err)?;
                }
                match write_private_file(path, &identity.signing.to_bytes()) {
                    Ok(()) => Ok(identity),
                    // Another process created the key between our read and our write: use its.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::load_existing(path),
                    Err(e) => Err(io_err(e)),
                }
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// Loads the key at `path`, which must exist.
    fn load_existing(path: &Path) -> Result<Self, IdentityError> {
        let bytes = fs::read(path)
            .map_err(|source| IdentityError::Io { path: path.to_path_buf(), source })?;
        Self::from_key_file(path, &bytes)
    }

    /// The identity of the key file `path` holding `bytes`.
    fn from_key_file(path: &Path, bytes: &[u8]) -> Result<Self, IdentityError> {
        check_private_mode(path)?;
        let seed: [u8; KEY_FILE_LEN] = bytes
            .try_into()
            .map_err(|_| IdentityError::BadLength { path: path.to_path_buf(), len: bytes.len() })?;
        Ok(Self::from_seed(seed))
    }

    /// The node id derived from the public key.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The raw ed25519 public key, as carried in `Body::origin_key`.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.public
    }

    /// The libp2p PeerId of the same key.
    pub fn peer_id(&self) -> PeerId {
        self.libp2p_keypair().public().to_peer_id()
    }

    /// The same key as a libp2p keypair, for the swarm's transport security.
    pub fn libp2p_keypair(&self) -> libp2p_identity::Keypair {
        let mut seed = self.signing.to_bytes();
        // `ed25519_from_bytes` only fails for a slice that is not 32 bytes long.
        #[allow(clippy::expect_used)]
        libp2p_identity::Keypair::ed25519_from_bytes(&mut seed).expect("32-byte ed25519 seed")
    }

    /// Signs `message` as it is (plain ed25519).
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.signing.sign(message).to_bytes()
    }

    /// The envelope signature of encoded body bytes: a signature of
    /// [`BodyDigest::signing_input`](crate::message::BodyDigest::signing_input).
    pub fn sign_body(&self, body: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.sign(&crate::message::BodyDigest::of(body).signing_input())
    }

    /// The verifying half of the key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }
}

#[cfg(unix)]
fn check_private_mode(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path)
        .map_err(|source| IdentityError::Io { path: path.to_path_buf(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::TooOpen { path: path.to_path_buf(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_path: &Path) -> Result<(), IdentityError> {
    Ok(())
}

/// Writes `bytes` to a new file readable by its owner only. Fails with `AlreadyExists` if the
/// file already exists, so that two processes starting at once cannot both write a different
/// key. Atomic: see [`write_private_file_atomically`].
pub fn write_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_private_file_atomically(path, bytes, false)
}

/// Writes `bytes` to `path`, readable by its owner only (mode 0600), so that a crash or power
/// loss at any moment leaves either the old state or the whole new file, never an empty or
/// half-written one: the bytes go to a temporary file in the same directory, which is synced,
/// then moved into place, and the directory is synced so that the new name is durable too.
///
/// With `replace == false` an existing file is kept and `AlreadyExists` is returned (the move
/// is a hard link, which fails atomically when the name is taken: of two processes creating
/// the same key at once, exactly one wins). A temporary file left by a crash
/// (`.<name>.tmp-<pid>-<random>`) is never read; leftovers older than a minute are removed.
pub fn write_private_file_atomically(path: &Path, bytes: &[u8], replace: bool) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "a key file path must end in a file name")
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(".{name}.tmp-");
    let tmp = dir.join(format!("{prefix}{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let result = write_synced(&tmp, bytes).and_then(|()| {
        if replace {
            fs::rename(&tmp, path)
        } else {
            let linked = fs::hard_link(&tmp, path);
            let _ = fs::remove_file(&tmp);
            linked
        }
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&dir)?;
    remove_stale_temporaries(&dir, &prefix);
    Ok(())
}

/// Creates `path` (it must not exist) with mode 0600 and writes and syncs `bytes`.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes a rename, link or removal in `dir` durable.
#[cfg(unix)]
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Makes a rename, link or removal in `dir` durable (a no-op where directories cannot be
/// opened).
#[cfg(not(unix))]
pub fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Best effort: removes temporary files named `<prefix>...` older than a minute (left by a
/// crash; a younger one may belong to a process writing right now).
fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten().take(1_000) {
        let stale = entry.file_name().to_str().is_some_and(|n| n.starts_with(prefix))
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(60));
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_a_version_8_uuid_derived_from_the_key() {
        let id = Identity::from_seed([7; 32]);
        let again = Identity::from_seed([7; 32]);
        let other = Identity::from_seed([8; 32]);
        assert_eq!(id.node_id(), again.node_id());
        assert_ne!(id.node_id(), other.node_id());
        assert_eq!(id.node_id().as_uuid().get_version_num(), 8);
        assert_eq!(id.node_id(), NodeId::from_public_key(&id.public_key()));
        let parsed: NodeId = id.node_id().to_string().parse().unwrap();
        assert_eq!(parsed, id.node_id());
    }

    #[test]
    fn peer_id_comes_from_the_same_key() {
        let id = Identity::from_seed([1; 32]);
        let kp = id.libp2p_keypair();
        let ed = kp.clone().try_into_ed25519().unwrap();
        assert_eq!(ed.public().to_bytes(), id.public_key());
        assert_eq!(id.peer_id(), kp.public().to_peer_id());
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let first = Identity::load_or_create(&path).unwrap();
        let second = Identity::load_or_create(&path).unwrap();
        assert_eq!(first.node_id(), second.node_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[cfg(unix)]
    #[test]
    fn readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        Identity::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Identity::load_or_create(&path), Err(IdentityError::TooOpen { .. })));
    }

    #[test]
    fn leftover_temporary_files_do_not_stop_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        // What a crash while writing the key leaves: temporary files, empty or truncated.
        fs::write(dir.path().join(".node.key.tmp-1-0000000000000001"), b"").unwrap();
        fs::write(dir.path().join(".node.key.tmp-2-0000000000000002"), [9u8; 7]).unwrap();
        let first = Identity::load_or_create(&path).unwrap();
        assert_eq!(fs::read(&path).unwrap().len(), KEY_FILE_LEN);
        assert_eq!(Identity::load_or_create(&path).unwrap().node_id(), first.node_id());
        // Our own temporary file is gone; the young leftovers are left to their owners.
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".node.key.tmp-"))
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn an_empty_key_file_is_a_clear_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_private_file(&path, &[]).unwrap();
        let err = Identity::load_or_create(&path).unwrap_err();
        assert!(matches!(err, IdentityError::BadLength { len: 0, .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("holds 0 bytes"), "{message}");
    }

    #[test]
    fn atomic_writes_replace_or_keep_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.key");
        write_private_file_atomically(&path, b"one", false).unwrap();
        let err = write_private_file_atomically(&path, b"two", false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_private_file_atomically(&path, b"three", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Nothing else is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn truncated_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_private_file(&path, &[1, 2, 3]).unwrap();
        assert!(matches!(
            Identity::load_or_create(&path),
            Err(IdentityError::BadLength { len: 3, .. })
        ));
    }
}
