//! Each `bwrap` sandbox's share of what Linux counts per user and per user namespace
//! ("ucounts") and bounds by the namespace's `/proc/sys/user` settings: inotify
//! instances and watches.
//!
//! The kernel charges such a count to the sandbox's user namespace and to every
//! namespace above it, each against its own limit (kernel/ucount.c, `inc_ucount`;
//! user_namespaces(7), "/proc/sys/user"). Left alone, a sandbox's namespace has no limit
//! of its own, and one agent can take the whole of the host user's allowance
//! (`fs.inotify.max_user_instances`, 128 by default), so that a concurrent run's file
//! watchers fail. Set in the sandbox's namespace, a share bounds that sandbox; the host
//! user's own limit still holds for all of them together.
//!
//! These are not resource limits a process sets on itself (as RLIMIT_NPROC is, see
//! [`super::limits`]): they are settings of the namespace, written by a process inside
//! it with `CAP_SYS_RESOURCE` there, and bubblewrap mounts `/proc/sys` read-only inside
//! the sandbox. So the worker writes them from outside, through a [`StartGate`]:
//! bubblewrap reports its child's pid on `--info-fd` and waits on `--block-fd` before it
//! starts the runner; a short-lived child of the worker (its own program, as
//! [`SUBCOMMAND`]) enters the sandbox's user namespace (`setns`: its owner holds every
//! capability in it) and writes the shares;
//! then the gate opens. Nothing of the host is handed into the sandbox.

use command_fds::FdMapping;
use nix::fcntl::OFlag;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

/// The runner-side descriptor bubblewrap writes its child's pid to (`--info-fd`).
pub const INFO_FD: i32 = 6;
/// The runner-side descriptor bubblewrap waits on before it starts the runner
/// (`--block-fd`).
pub const BLOCK_FD: i32 = 7;
/// The settings shared out, under `/proc/sys/user`.
const SETTINGS: &[&str] = &["max_inotify_instances", "max_inotify_watches"];
/// Where the settings of the current process's user namespace are.
const USER_SYSCTLS: &str = "/proc/sys/user";
/// The most bubblewrap's info may take (a few hundred bytes of JSON).
const INFO_LIMIT: u64 = 64 * 1024;
/// How long a sandbox may take to report its pid and have its shares written.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a sandbox's shares could not be set.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot make the sandbox's start gate: {0}")]
    Setup(nix::Error),
    #[error("bubblewrap reported no child pid: {0}")]
    Info(String),
    #[error("cannot enter the sandbox's user namespace to set {setting}: {source}")]
    Apply {
        setting: String,
        source: std::io::Error,
    },
    #[error("cannot open the sandbox's start gate: {0}")]
    Open(std::io::Error),
}

/// Each sandbox's share of the host user's allowances: seven eighths of the worker's
/// limit over `worker.concurrency`, at least 1; the eighth left is the worker's own (its
/// SQLite queue watches its directory) and the host user's other processes'.
#[derive(Clone, Debug, PartialEq)]
pub struct UcountShares {
    /// `(setting under /proc/sys/user, share)`.
    shares: Vec<(&'static str, u64)>,
}

impl UcountShares {
    /// The shares for `concurrency` sandboxes, of the settings this kernel has; `None`
    /// when it has none of them.
    pub fn claim(concurrency: usize) -> Option<Self> {
        Self::claim_from(Path::new(USER_SYSCTLS), concurrency)
    }

    fn claim_from(dir: &Path, concurrency: usize) -> Option<Self> {
        let shares: Vec<_> = SETTINGS
            .iter()
            .filter_map(|name| {
                let limit: u64 = std::fs::read_to_string(dir.join(name))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                let shared = limit - limit / 8;
                Some((*name, (shared / concurrency.max(1) as u64).max(1)))
            })
            .collect();
        (!shares.is_empty()).then_some(Self { shares })
    }

    /// The share of `setting` (`max_inotify_instances`, …), if set.
    #[cfg(test)]
    fn share(&self, setting: &str) -> Option<u64> {
        self.shares.iter().find(|(s, _)| *s == setting).map(|s| s.1)
    }

    /// Writes the shares into the user namespace of process `pid`, from a child process
    /// that enters it: the worker's own program, as [`SUBCOMMAND`] (a process must be
    /// single-threaded to enter a user namespace, which the worker's runtime is not).
    /// Blocking.
    pub fn apply(&self, pid: i32) -> Result<(), GateError> {
        let failed = |source| GateError::Apply {
            setting: SETTINGS.join(", "),
            source,
        };
        // The running program itself, even if its file was replaced since.
        let out = std::process::Command::new("/proc/self/exe")
            .arg(SUBCOMMAND)
            .arg("--pid")
            .arg(pid.to_string())
            .args(
                self.shares
                    .iter()
                    .map(|(name, share)| format!("{name}={share}")),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .env_clear()
            .output()
            .map_err(failed)?;
        if !out.status.success() {
            return Err(failed(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            )));
        }
        Ok(())
    }
}

/// The worker's hidden subcommand that writes shares into a sandbox's user namespace.
pub const SUBCOMMAND: &str = "share-ucounts";

/// Why [`enter_and_write`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{0:?} is not `setting=number` of a setting this worker shares out")]
    BadSetting(String),
    #[error("cannot open the user namespace of process {pid}: {source}")]
    Namespace { pid: i32, source: std::io::Error },
    #[error("cannot enter the user namespace of process {pid}: {source}")]
    Enter { pid: i32, source: nix::Error },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The body of [`SUBCOMMAND`]: enters the user namespace of process `pid` (the caller
/// must be single-threaded) and writes each `setting=value` of `sets` under
/// `/proc/sys/user`, where only the settings of [`SETTINGS`] are accepted.
pub fn enter_and_write(pid: i32, sets: &[String]) -> Result<(), ShareError> {
    let mut writes = Vec::new();
    for set in sets {
        let parsed = set
            .split_once('=')
            .filter(|(name, _)| SETTINGS.contains(name))
            .and_then(|(name, value)| Some((name, value.parse::<u64>().ok()?)));
        match parsed {
            Some(w) => writes.push(w),
            None => return Err(ShareError::BadSetting(set.clone())),
        }
    }
    let namespace = std::fs::File::open(format!("/proc/{pid}/ns/user"))
        .map_err(|source| ShareError::Namespace { pid, source })?;
    nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|source| ShareError::Enter { pid, source })?;
    for (name, value) in writes {
        let path = format!("{USER_SYSCTLS}/{name}");
        std::fs::write(&path, value.to_string())
            .map_err(|source| ShareError::Write { path, source })?;
    }
    Ok(())
}

/// Holds a bubblewrap sandbox between the making of its namespaces and the start of its
/// command, while the worker writes its shares (see the module documentation).
pub struct StartGate {
    info: std::fs::File,
    block: std::fs::File,
    shares: UcountShares,
}

impl StartGate {
    /// The gate and the descriptors bubblewrap inherits: [`INFO_FD`] and [`BLOCK_FD`],
    /// to be given as `--info-fd` and `--block-fd`.
    pub fn open(shares: &UcountShares) -> Result<(Self, [FdMapping; 2]), GateError> {
        let (info_read, info_write): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(GateError::Setup)?;
        let (block_read, block_write): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(GateError::Setup)?;
        Ok((
            Self {
                info: info_read.into(),
                block: block_write.into(),
                shares: shares.clone(),
            },
            [
                FdMapping {
                    parent_fd: info_write,
                    child_fd: INFO_FD,
                },
                FdMapping {
                    parent_fd: block_read,
                    child_fd: BLOCK_FD,
                },
            ],
        ))
    }

    /// Reads the sandbox's pid, writes its shares and lets its command start. Blocking;
    /// call once the command is spawned and the worker's copies of the mapped
    /// descriptors are closed (else the info never ends). On an error the gate is still
    /// shut: the caller must kill the sandbox before dropping it, since a dropped gate
    /// lets the sandbox start.
    pub fn release(&mut self) -> Result<(), GateError> {
        #[derive(serde::Deserialize)]
        struct Info {
            #[serde(rename = "child-pid")]
            child_pid: i32,
        }
        let mut info = Vec::new();
        (&mut self.info)
            .take(INFO_LIMIT)
            .read_to_end(&mut info)
            .map_err(|e| GateError::Info(e.to_string()))?;
        let pid = serde_json::from_slice::<Info>(&info)
            .map_err(|e| GateError::Info(e.to_string()))?
            .child_pid;
        self.shares.apply(pid)?;
        self.block.write_all(b"1").map_err(GateError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sandbox_gets_the_limit_over_the_concurrency_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("max_inotify_instances"), "128\n").unwrap();
        std::fs::write(dir.path().join("max_inotify_watches"), "3\n").unwrap();
        let shares = UcountShares::claim_from(dir.path(), 4).unwrap();
        assert_eq!(shares.share("max_inotify_instances"), Some(28));
        assert_eq!(shares.share("max_inotify_watches"), Some(1));
    }

    #[test]
    fn only_the_shared_settings_are_written() {
        for bad in [
            "max_user_namespaces=5",
            "../../fs/inotify/max_user_instances=1",
            "max_inotify_instances=-1",
            "max_inotify_instances",
        ] {
            assert!(
                matches!(
                    enter_and_write(std::process::id() as i32, &[bad.to_string()]),
                    Err(ShareError::BadSetting(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_kernel_without_the_settings_gets_no_shares() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(UcountShares::claim_from(dir.path(), 4), None);
        std::fs::write(dir.path().join("max_inotify_instances"), "not a number").unwrap();
        assert_eq!(UcountShares::claim_from(dir.path(), 4), None);
    }
}
