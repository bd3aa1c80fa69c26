//! Who may use the node's socket: the kernel's word on the connecting process (`SO_PEERCRED`),
//! not the file's mode alone.
//!
//! The socket file is mode 0660 and its directory is made 0750 when the server creates it, but
//! an operator may put the socket in a directory others can enter, or loosen the file's mode.
//! So every accepted connection is checked against the credentials the kernel recorded for the
//! connecting process: only the node's own user, root, and members of one configured group
//! (`MESH_NODE_SOCKET_GROUP`) may talk to the node. Anyone else gets one error frame and a
//! closed connection, counted in `mesh_ipc_connections_refused_total{reason="peer_credentials"}`
//! and logged once per user id.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use tracing::{debug, warn};

use crate::{Error, Result};

/// Most user ids whose first refusal is remembered (so each is logged once); past it, refusals
/// are logged at debug level only.
const MAX_LOGGED_UIDS: usize = 1024;

/// The rule applied to every connection.
#[derive(Debug)]
pub(crate) struct Access {
    /// The node's effective user id.
    own_uid: u32,
    /// The configured group, if any.
    group: Option<u32>,
    /// User ids refused so far (each logged once).
    logged: Mutex<HashSet<u32>>,
}

/// The credentials of a connecting process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Access {
    pub(crate) fn new(group: Option<u32>) -> Self {
        Self { own_uid: nix::unistd::geteuid().as_raw(), group, logged: Mutex::default() }
    }

    /// Whether `peer` may use the socket: the node's user, root, or a member of the group
    /// (as its primary group or, read from `/proc/<pid>/status`, a supplementary one).
    pub(crate) fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == self.own_uid || peer.uid == 0 {
            return true;
        }
        let Some(group) = self.group else { return false };
        peer.gid == group || peer.pid.is_some_and(|pid| supplementary_groups(pid).contains(&group))
    }

    /// The text the refused process gets, and the log says.
    pub(crate) fn refusal(&self, peer: &Peer) -> String {
        let group = match self.group {
            Some(g) => format!("members of group {g}"),
            None => "a group set with MESH_NODE_SOCKET_GROUP".to_owned(),
        };
        let allowed = if self.own_uid == 0 {
            format!("only root and {group} may connect")
        } else {
            format!("only user id {}, root and {group} may connect", self.own_uid)
        };
        format!(
            "the node's socket refused user id {} (process {}): {allowed}",
            peer.uid,
            peer.pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
        )
    }

    /// Counts a refusal and logs it, once per user id.
    pub(crate) fn count_refusal(&self, peer: &Peer) {
        metrics::counter!("mesh_ipc_connections_refused_total", "reason" => "peer_credentials")
            .increment(1);
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            logged.len() < MAX_LOGGED_UIDS && logged.insert(peer.uid)
        };
        if first {
            warn!(
                uid = peer.uid,
                gid = peer.gid,
                "{}; further refusals of this user are only counted \
                 (mesh_ipc_connections_refused_total)",
                self.refusal(peer)
            );
        } else {
            debug!(uid = peer.uid, "node socket refused a connection again");
        }
    }
}

/// The supplementary groups of process `pid` (empty when it is gone or unreadable).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|groups| groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}

/// The group id of `name`: a group name (looked up through the system's group database) or a
/// number.
pub fn resolve_group(name: &str) -> Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(Error::Config(format!("MESH_NODE_SOCKET_GROUP: no group named {name:?}"))),
        Err(e) => Err(Error::Config(format!("MESH_NODE_SOCKET_GROUP: looking up {name:?}: {e}"))),
    }
}

/// Makes the socket's directory closed to other users: a directory this call creates is made
/// 0750 (owned by `group` when one is set, so its members can reach the socket); an existing
/// one that is ours, open to every user and not a shared sticky directory such as `/tmp`, loses
/// its "other" permissions. One that is not ours is left alone with a warning: the socket's
/// own mode and the credential check still hold.
pub(crate) fn prepare_dir(dir: &Path, group: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir)?;
        // The umask may have taken bits away, never added any: set the mode exactly.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
        if let Some(g) = group {
            std::os::unix::fs::chown(dir, None, Some(g))?;
        }
        return Ok(());
    }
    let meta = std::fs::metadata(dir)?;
    let mode = meta.mode();
    let open_to_others = mode & 0o007 != 0;
    let sticky = mode & 0o1000 != 0;
    if !open_to_others || sticky {
        return Ok(());
    }
    if meta.uid() == nix::unistd::geteuid().as_raw() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7770))?;
        tracing::info!(
            dir = %dir.display(),
            "the node socket's directory was open to every user; other users' permissions removed"
        );
    } else {
        warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o7777),
            "the node socket's directory is open to every user and not ours to change; \
             the socket's mode and the credential check still apply"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer { uid, gid, pid: None }
    }

    #[test]
    fn own_user_and_root_pass_others_only_through_the_group() {
        let own = nix::unistd::geteuid().as_raw();
        let stranger = own.wrapping_add(4242);
        let closed = Access::new(None);
        assert!(closed.allows(&peer(own, 1)));
        assert!(closed.allows(&peer(0, 1)));
        assert!(!closed.allows(&peer(stranger, 1)));
        let open = Access::new(Some(777));
        assert!(open.allows(&peer(stranger, 777)));
        assert!(!open.allows(&peer(stranger, 778)));
        assert!(closed.refusal(&peer(stranger, 1)).contains("MESH_NODE_SOCKET_GROUP"));
    }

    #[test]
    fn supplementary_groups_are_read_from_proc() {
        let me = std::process::id() as i32;
        let groups = supplementary_groups(me);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap_or("Groups:");
        assert_eq!(groups.len(), line.split_whitespace().count() - 1, "{line}");
        assert!(supplementary_groups(i32::MAX).is_empty());
    }

    #[test]
    fn groups_resolve_by_number_and_by_name() {
        assert_eq!(resolve_group("1234").ok(), Some(1234));
        assert_eq!(resolve_group("root").ok(), Some(0));
        let unknown = resolve_group("no-such-group-here").unwrap_err().to_string();
        assert!(unknown.contains("MESH_NODE_SOCKET_GROUP"), "{unknown}");
    }

    #[test]
    fn a_created_directory_is_closed_to_others_and_an_open_one_is_closed() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let created = base.path().join("a/b");
        prepare_dir(&created, None).unwrap_or_else(|e| panic!("{e}"));
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o7777).ok();
        assert_eq!(mode(&created), Some(0o750));
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        prepare_dir(&open, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&open), Some(0o750));
        let sticky = base.path().join("shared");
        std::fs::create_dir(&sticky).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777))
            .unwrap_or_else(|e| panic!("{e}"));
        prepare_dir(&sticky, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&sticky), Some(0o1777), "a shared sticky directory is left as it is");
    }
}
