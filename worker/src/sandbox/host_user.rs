//! The host user a `bwrap` sandbox runs as. A worker running as an ordinary user runs
//! its sandboxes as itself (the user namespace maps the sandbox user to it). A worker
//! running as root never does: the sandbox would be host uid 0 with every root-only file
//! readable and no RLIMIT_NPROC. It runs bubblewrap as `sandbox.host_uid` /
//! `sandbox.host_gid` instead (through `setpriv`, which drops every capability, the
//! supplementary groups, and sets no-new-privs), gives that user the attempt directory,
//! and hides only what that user could reach at all (bubblewrap, running as that user,
//! cannot mount over a path it cannot reach, nor does it need to).

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why a root worker cannot run sandboxes.
#[derive(Debug, thiserror::Error)]
pub enum HostUserError {
    #[error(
        "the worker runs as root, and root is never a sandbox user: set sandbox.host_uid \
         and sandbox.host_gid (AO__SANDBOX__HOST_UID, AO__SANDBOX__HOST_GID) to an \
         unprivileged host user the sandboxes run as, e.g. one made with \
         `useradd --system --no-create-home ao-sandbox`, or an id of root's range in \
         /etc/subuid; or run the worker as an ordinary user"
    )]
    Required,
    #[error("sandbox.host_uid and sandbox.host_gid must not be 0")]
    Root,
    #[error("setpriv (util-linux) is needed to run the sandbox as sandbox.host_uid: {0}")]
    Setpriv(String),
}

/// The unprivileged host user of a root worker's sandboxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostUser {
    pub uid: u32,
    pub gid: u32,
}

impl HostUser {
    /// The host user for a worker whose effective uid is `worker_uid`: none for an
    /// ordinary worker, the configured one for root.
    pub fn for_worker(
        worker_uid: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<Option<Self>, HostUserError> {
        if worker_uid != 0 {
            return Ok(None);
        }
        match (uid, gid) {
            (Some(0), _) | (_, Some(0)) => Err(HostUserError::Root),
            (Some(uid), Some(gid)) => {
                let ok = std::process::Command::new("setpriv")
                    .arg("--version")
                    .output()
                    .map_err(|e| HostUserError::Setpriv(e.to_string()))?;
                if !ok.status.success() {
                    return Err(HostUserError::Setpriv(
                        String::from_utf8_lossy(&ok.stderr).trim().to_string(),
                    ));
                }
                Ok(Some(Self { uid, gid }))
            }
            _ => Err(HostUserError::Required),
        }
    }

    /// The command that runs what follows it as this user.
    pub fn setpriv(&self) -> Vec<OsString> {
        vec![
            "setpriv".into(),
            format!("--reuid={}", self.uid).into(),
            format!("--regid={}", self.gid).into(),
            "--clear-groups".into(),
            "--no-new-privs".into(),
            "--inh-caps=-all".into(),
            "--".into(),
        ]
    }

    /// Gives `dir` and everything in it to this user (the attempt directory: the worker
    /// made it; the sandbox writes the clone into it).
    pub fn own(&self, dir: &Path) -> std::io::Result<()> {
        std::os::unix::fs::lchown(dir, Some(self.uid), Some(self.gid))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                self.own(&path)?;
            } else {
                std::os::unix::fs::lchown(&path, Some(self.uid), Some(self.gid))?;
            }
        }
        Ok(())
    }

    /// Whether this user may reach `path`: every directory above it searchable by it.
    /// The bits that apply to it are judged: `u+x` when it owns the directory, `g+x` when
    /// the directory's group is its own (an ACL's mask shows there too), and otherwise
    /// `g+x` or `o+x` (an ACL entry for it shows in the group bits); so a path is judged
    /// unreachable only when some directory above it certainly shuts this user out.
    pub fn can_reach(&self, path: &Path) -> bool {
        path.ancestors().skip(1).all(|dir| match dir.metadata() {
            Ok(m) => {
                let mode = m.mode();
                if m.uid() == self.uid {
                    mode & 0o100 != 0
                } else if m.gid() == self.gid {
                    mode & 0o010 != 0
                } else {
                    mode & 0o011 != 0
                }
            }
            Err(_) => true,
        })
    }

    /// Whether this user may run the file at `path`: reach it, and read and execute it
    /// (by its owner, group or other bits, judged as in [`Self::can_reach`]).
    pub fn can_run(&self, path: &Path) -> bool {
        self.can_reach(path)
            && match path.metadata() {
                Ok(m) => {
                    let mode = m.mode();
                    let owner = m.uid() == self.uid && mode & 0o500 == 0o500;
                    owner || mode & 0o050 == 0o050 || mode & 0o005 == 0o005
                }
                Err(_) => false,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_root_worker_needs_an_unprivileged_host_user() {
        assert_eq!(HostUser::for_worker(1000, None, None).unwrap(), None);
        let err = HostUser::for_worker(0, None, None).unwrap_err();
        assert!(err.to_string().contains("sandbox.host_uid"), "{err}");
        assert!(matches!(
            HostUser::for_worker(0, Some(0), Some(5)),
            Err(HostUserError::Root)
        ));
    }

    #[test]
    fn closed_directories_make_paths_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        let user = HostUser {
            uid: 4242,
            gid: 4242,
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        assert!(user.can_reach(&dir.path().join("a")));
        assert!(!user.can_reach(&inner));
    }

    /// A directory open to others but shut to its group shuts out a member of that group:
    /// for it the group bits apply, not the others'. Before, `o+x` counted for it.
    #[test]
    fn a_directory_shut_to_its_group_is_shut_to_a_member() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o705))
            .unwrap();
        let gid = std::fs::metadata(dir.path().join("a")).unwrap().gid();
        let member = HostUser { uid: 4242, gid };
        let stranger = HostUser {
            uid: 4242,
            gid: gid.wrapping_add(1),
        };
        assert!(!member.can_reach(&inner));
        assert!(stranger.can_reach(&inner));
    }
}
