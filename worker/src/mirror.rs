//! The worker's git mirrors: one bare mirror per repository under
//! `<local.data_dir>/mirrors`, brought up to date with one `git fetch` before each run and
//! handed to the sandbox read-only, so that the runner makes its working copy with
//! `git clone --shared` (no object is copied) and fetches only what is newer upstream.
//!
//! Who writes: only the worker, outside any sandbox. A sandbox sees a mirror through a
//! read-only bind mount; nothing the agent does reaches it. The worker's git runs with
//! the runner's hardening (no system or global config, no hooks, no prompt) and gets
//! credentials the same way: the token in the `AO_GIT_TOKEN` variable of that one git
//! process, read by a credential helper, never in a URL or an argument.
//!
//! Concurrency (several runs of one or more worker processes on one data dir), with two
//! `flock` locks per mirror, kept beside it so that removing the mirror keeps them:
//! - `<id>.update.lock`, exclusive, while the mirror is fetched, built or rebuilt: two
//!   runs on one repository fetch one after the other (the second fetch is then cheap);
//! - `<id>.use.lock`, shared by every run whose working copy borrows the mirror's objects
//!   (a `--shared` clone reads them for its whole life); exclusive only to remove the
//!   mirror (rebuild, eviction), taken without waiting, so a mirror in use is never
//!   removed. A fetch only adds objects and moves refs, and automatic `gc` is off, so
//!   fetching under readers is safe.
//!
//! Force-pushes: the mirror fetches `+refs/heads/*:refs/heads/*` with `--prune`, so it
//! follows any rewrite or deletion upstream; the objects the old history used stay (no
//! `gc`) until the mirror is evicted.
//!
//! Corruption: a mirror whose fetch fails or whose `HEAD` commit cannot be read is
//! removed and cloned again before the run; a full `git fsck --connectivity-only` runs
//! after each run (off the way to the next start) and marks a damaged mirror for
//! rebuilding at its next use. If a rebuild cannot be done (in use, or the upstream
//! unreachable) the run goes on without a mirror, and a runner whose clone from the
//! mirror fails clones in full.
//!
//! Size: past `warm.mirror_max_mb` the least recently used mirrors not in use are removed;
//! what an interrupted clone left (`<id>.partial`) is removed at every eviction.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use secrecy::{ExposeSecret, SecretString};

/// The variable the credential helper reads (the runner's, see `runner::git`).
use crate::runner::git::{CREDENTIAL_HELPER, TOKEN_ENV};

/// Limit of one fetch or clone into a mirror.
const GIT_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a mirror could not be used for a run (the run then goes on without one).
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {errno}")]
    Lock { path: PathBuf, errno: nix::Error },
    #[error("{what} failed: {detail}")]
    Git { what: &'static str, detail: String },
    #[error("the mirror is damaged and in use by another run; not rebuilt now")]
    InUse,
}

/// The mirrors of one worker (or of every worker sharing a data dir).
#[derive(Clone, Debug)]
pub struct Mirrors {
    root: PathBuf,
    max_bytes: u64,
}

/// A mirror a run uses: while this lives the mirror is neither removed nor rebuilt.
#[derive(Debug)]
pub struct MirrorLease {
    pub path: PathBuf,
    _use: Flock<File>,
}

/// How a mirror was made ready, for logs and the warm-start metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Made from nothing (first use, or after eviction).
    Cloned,
    /// Brought up to date with one fetch.
    Fetched,
    /// Found damaged, removed and cloned again.
    Rebuilt,
}

impl Readiness {
    pub fn as_str(self) -> &'static str {
        match self {
            Readiness::Cloned => "cloned",
            Readiness::Fetched => "fetched",
            Readiness::Rebuilt => "rebuilt",
        }
    }
}

impl Mirrors {
    /// Mirrors under `root`, at most `max_bytes` together.
    pub fn new(root: PathBuf, max_bytes: u64) -> Self {
        Self { root, max_bytes }
    }

    /// The name of a repository's mirror: a hash of how the repository is named, so any
    /// URL gives a plain file name.
    pub fn id(repository: &str) -> String {
        let digest = Sha256::digest(repository.as_bytes());
        hex::encode(&digest[..16])
    }

    /// Where `repository`'s mirror lives.
    pub fn path(&self, repository: &str) -> PathBuf {
        self.root.join(format!("{}.git", Self::id(repository)))
    }

    fn lock_path(&self, id: &str, which: &str) -> PathBuf {
        self.root.join(format!("{id}.{which}.lock"))
    }

    /// Makes `repository`'s mirror current and leases it for one run. Blocking (git and
    /// file locks): call it from `spawn_blocking`. `token` is the run's git token, if any.
    pub fn prepare(
        &self,
        repository: &str,
        token: Option<&SecretString>,
    ) -> Result<(MirrorLease, Readiness), MirrorError> {
        std::fs::create_dir_all(&self.root).map_err(|source| MirrorError::Io {
            path: self.root.clone(),
            source,
        })?;
        let id = Self::id(repository);
        let mirror = self.path(repository);
        let update = lock(&self.lock_path(&id, "update"), FlockArg::LockExclusive)?;
        let damaged = self.root.join(format!("{id}.damaged"));
        let readiness = if !mirror.join("HEAD").is_file() {
            // Nothing, or the leftover of an interrupted build.
            self.remove_unused(&id, &mirror)?;
            clone(repository, &mirror, token)?;
            Readiness::Cloned
        } else if damaged.exists() {
            tracing::warn!(mirror = %mirror.display(),
                "the mirror failed its check after an earlier run; rebuilding it");
            self.remove_unused(&id, &mirror)?;
            clone(repository, &mirror, token)?;
            let _ = std::fs::remove_file(&damaged);
            Readiness::Rebuilt
        } else {
            // Checked before the fetch, which could otherwise paper over missing objects
            // for a while.
            match head_resolves(&mirror).and_then(|_| fetch(&mirror, token)) {
                Ok(()) => Readiness::Fetched,
                Err(e) => {
                    tracing::warn!(error = %e, mirror = %mirror.display(),
                        "the mirror is damaged or cannot be updated; rebuilding it");
                    self.remove_unused(&id, &mirror)?;
                    clone(repository, &mirror, token)?;
                    Readiness::Rebuilt
                }
            }
        };
        let use_lock = self.lock_path(&id, "use");
        let lease = lock(&use_lock, FlockArg::LockShared)?;
        drop(update);
        // The lock file's time is the mirror's last use, for eviction.
        let _ = File::options()
            .write(true)
            .open(&use_lock)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        Ok((
            MirrorLease {
                path: mirror,
                _use: lease,
            },
            readiness,
        ))
    }

    /// Checks the whole leased mirror (`git fsck --connectivity-only`, too slow for the
    /// way to a run's start, so done after it); a damaged one is marked, and the next
    /// [`Mirrors::prepare`] rebuilds it. Blocking.
    pub fn check(&self, lease: &MirrorLease) {
        if let Err(e) = verify(&lease.path) {
            tracing::warn!(error = %e, mirror = %lease.path.display(),
                "the mirror failed its check; it is rebuilt before its next use");
            if let Some(id) = lease.path.file_stem().and_then(|s| s.to_str()) {
                let _ = File::create(self.root.join(format!("{id}.damaged")));
            }
        }
    }

    /// Removes `mirror` if no run uses it (the caller holds its update lock).
    fn remove_unused(&self, id: &str, mirror: &Path) -> Result<(), MirrorError> {
        if !mirror.exists() {
            return Ok(());
        }
        let path = self.lock_path(id, "use");
        let _exclusive = match try_lock(&path, FlockArg::LockExclusiveNonblock)? {
            Some(l) => l,
            None => return Err(MirrorError::InUse),
        };
        std::fs::remove_dir_all(mirror).map_err(|source| MirrorError::Io {
            path: mirror.to_path_buf(),
            source,
        })
    }

    /// Removes least recently used mirrors, never `keep` nor one in use or being
    /// updated, until all together fit in the bound. Returns the ids removed.
    pub fn evict(&self, keep: &str) -> Vec<String> {
        self.remove_leftovers();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut mirrors: Vec<(std::time::SystemTime, String, PathBuf, u64)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let id = name.strip_suffix(".git")?.to_string();
                let used = std::fs::metadata(self.lock_path(&id, "use"))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                Some((used, id, e.path(), dir_size(&e.path())))
            })
            .collect();
        let mut total: u64 = mirrors.iter().map(|m| m.3).sum();
        mirrors.sort();
        let mut removed = Vec::new();
        for (_, id, path, size) in mirrors {
            if total <= self.max_bytes {
                break;
            }
            if id == keep {
                continue;
            }
            let Ok(Some(_update)) = try_lock(
                &self.lock_path(&id, "update"),
                FlockArg::LockExclusiveNonblock,
            ) else {
                continue;
            };
            let Ok(Some(_use)) =
                try_lock(&self.lock_path(&id, "use"), FlockArg::LockExclusiveNonblock)
            else {
                continue;
            };
            if std::fs::remove_dir_all(&path).is_ok() {
                total = total.saturating_sub(size);
                tracing::info!(mirror = %path.display(), bytes = size, "least recently used mirror removed");
                removed.push(id);
            }
        }
        removed
    }

    /// Removes what clones killed partway left (`<id>.partial`), whatever the bound: each
    /// one whose repository's update lock is free (a clone writes under it).
    fn remove_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".partial")) else {
                continue;
            };
            let Ok(Some(_update)) = try_lock(
                &self.lock_path(id, "update"),
                FlockArg::LockExclusiveNonblock,
            ) else {
                continue;
            };
            let size = dir_size(&entry.path());
            if std::fs::remove_dir_all(entry.path()).is_ok() {
                tracing::info!(leftover = %entry.path().display(), bytes = size,
                    "the leftover of an interrupted mirror clone removed");
            }
        }
    }
}

fn open_lock(path: &Path) -> Result<File, MirrorError> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| MirrorError::Io {
            path: path.to_path_buf(),
            source,
        })
}

fn lock(path: &Path, arg: FlockArg) -> Result<Flock<File>, MirrorError> {
    Flock::lock(open_lock(path)?, arg).map_err(|(_, errno)| MirrorError::Lock {
        path: path.to_path_buf(),
        errno,
    })
}

/// `None` when another holder has it.
fn try_lock(path: &Path, arg: FlockArg) -> Result<Option<Flock<File>>, MirrorError> {
    match Flock::lock(open_lock(path)?, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(MirrorError::Lock {
            path: path.to_path_buf(),
            errno,
        }),
    }
}

/// Bytes of the files under `dir` (not following links).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// git with the runner's hardening, and the token (when given) for the credential
/// helper in this one process's environment.
pub(crate) fn git(token: Option<&SecretString>) -> Command {
    let mut cmd = Command::new("git");
    if let Some(t) = token {
        cmd.args(["-c", "credential.helper=", "-c"])
            .arg(format!("credential.helper={CREDENTIAL_HELPER}"))
            .env(TOKEN_ENV, t.expose_secret());
    } else {
        cmd.env_remove(TOKEN_ENV);
    }
    cmd.args(["-c", "core.hooksPath=/dev/null", "-c", "gc.auto=0"])
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "file:http:https:ssh:git")
        .env("GIT_SSH_COMMAND", "ssh -oBatchMode=yes")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null());
    cmd
}

/// Runs a git command to its end within [`GIT_TIMEOUT`].
fn run(mut cmd: Command, what: &'static str) -> Result<Vec<u8>, MirrorError> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| MirrorError::Git {
            what,
            detail: e.to_string(),
        })?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(out) => break out,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if started.elapsed() < GIT_TIMEOUT => {}
            Err(_) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                return Err(MirrorError::Git {
                    what,
                    detail: format!("no answer within {} s", GIT_TIMEOUT.as_secs()),
                });
            }
        }
    };
    let out = out.map_err(|e| MirrorError::Git {
        what,
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let tail: String = text.trim().chars().rev().take(500).collect();
        return Err(MirrorError::Git {
            what,
            detail: format!("{}: {}", out.status, tail.chars().rev().collect::<String>()),
        });
    }
    Ok(out.stdout)
}

/// Whether `rev` names a commit in `mirror`.
pub fn has_commit(mirror: &Path, rev: &str) -> bool {
    git(None)
        .arg("--git-dir")
        .arg(mirror)
        .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Clones `repository` as a bare mirror of its branches into `mirror`, built beside it
/// and renamed into place so that a half-made mirror is never used.
fn clone(repository: &str, mirror: &Path, token: Option<&SecretString>) -> Result<(), MirrorError> {
    let partial = mirror.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let mut cmd = git(token);
    // `--no-local`: a local upstream's object files are copied through git's transport,
    // never hard-linked, so damage to one never reaches the other.
    cmd.args([
        "clone",
        "--bare",
        "--no-local",
        "--no-tags",
        "--quiet",
        "--",
    ])
    .arg(repository)
    .arg(&partial);
    if let Err(e) = run(cmd, "git clone --bare") {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    let mut config = git(None);
    config.arg("--git-dir").arg(&partial).args([
        "config",
        "remote.origin.fetch",
        "+refs/heads/*:refs/heads/*",
    ]);
    run(config, "git config")?;
    std::fs::rename(&partial, mirror).map_err(|source| MirrorError::Io {
        path: mirror.to_path_buf(),
        source,
    })
}

/// One fetch of every branch, following force-pushes and deletions.
fn fetch(mirror: &Path, token: Option<&SecretString>) -> Result<(), MirrorError> {
    let mut cmd = git(token);
    cmd.arg("--git-dir")
        .arg(mirror)
        .args(["fetch", "--prune", "--no-tags", "--quiet", "origin"]);
    run(cmd, "git fetch").map(drop)
}

/// Checks that every object reachable from the mirror's refs is there.
fn verify(mirror: &Path) -> Result<(), MirrorError> {
    head_resolves(mirror)?;
    let mut fsck = git(None);
    fsck.arg("--git-dir").arg(mirror).args([
        "fsck",
        "--connectivity-only",
        "--no-dangling",
        "--no-progress",
    ]);
    run(fsck, "git fsck").map(drop)
}

/// Checks, cheaply, that the mirror's `HEAD` commit can be read (or that it has no
/// branch at all: an empty repository). One git process when all is well.
fn head_resolves(mirror: &Path) -> Result<(), MirrorError> {
    let mut head = git(None);
    head.arg("--git-dir")
        .arg(mirror)
        .args(["rev-parse", "--verify", "--quiet", "HEAD^{tree}"]);
    let failed = match run(head, "git rev-parse HEAD") {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let mut refs = git(None);
    refs.arg("--git-dir")
        .arg(mirror)
        .args(["for-each-ref", "--count=1", "refs/heads/"]);
    if run(refs, "git for-each-ref")?.is_empty() {
        return Ok(());
    }
    Err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, script: &str) {
        let ok = Command::new("bash")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .status()
            .unwrap()
            .success();
        assert!(ok, "{script}");
    }

    /// An upstream bare repository `up.git` with one commit on `main`, and its seed.
    fn upstream(dir: &Path) -> String {
        sh(
            dir,
            "git init -q -b main seed && cd seed && echo one > f && git add f && \
             git commit -qm one && git clone -q --bare . ../up.git",
        );
        format!("file://{}", dir.join("up.git").display())
    }

    fn rev(git_dir: &Path, name: &str) -> String {
        let out = git(None)
            .arg("--git-dir")
            .arg(git_dir)
            .args(["rev-parse", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn follows_a_force_push() {
        let dir = tempfile::tempdir().unwrap();
        let repo = upstream(dir.path());
        let mirrors = Mirrors::new(dir.path().join("mirrors"), u64::MAX);
        let (lease, how) = mirrors.prepare(&repo, None).unwrap();
        assert_eq!(how, Readiness::Cloned);
        let first = rev(&lease.path, "main");
        drop(lease);
        sh(
            &dir.path().join("seed"),
            "echo rewritten > f && git commit -qa --amend -m rewritten && \
             git push -qf ../up.git main && git push -q ../up.git main:gone && \
             git push -q ../up.git :gone",
        );
        let (lease, how) = mirrors.prepare(&repo, None).unwrap();
        assert_eq!(how, Readiness::Fetched);
        let now = rev(&lease.path, "main");
        assert_ne!(now, first, "the mirror kept the overwritten history");
        assert_eq!(now, rev(&dir.path().join("up.git"), "main"));
    }

    #[test]
    fn a_damaged_mirror_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let repo = upstream(dir.path());
        let mirrors = Mirrors::new(dir.path().join("mirrors"), u64::MAX);
        let (lease, _) = mirrors.prepare(&repo, None).unwrap();
        let path = lease.path.clone();
        drop(lease);
        // Every pack overwritten, its index left: git believes it has the objects.
        for e in std::fs::read_dir(path.join("objects/pack")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "pack") {
                std::fs::write(&p, b"damaged").unwrap();
            }
        }
        let (lease, how) = mirrors.prepare(&repo, None).unwrap();
        assert_eq!(how, Readiness::Rebuilt);
        assert_eq!(
            rev(&lease.path, "main"),
            rev(&dir.path().join("up.git"), "main")
        );
    }

    #[test]
    fn a_mirror_failing_its_check_is_rebuilt_at_next_use() {
        let dir = tempfile::tempdir().unwrap();
        let repo = upstream(dir.path());
        let mirrors = Mirrors::new(dir.path().join("mirrors"), u64::MAX);
        let (lease, _) = mirrors.prepare(&repo, None).unwrap();
        std::fs::remove_dir_all(lease.path.join("objects")).unwrap();
        std::fs::create_dir_all(lease.path.join("objects/pack")).unwrap();
        mirrors.check(&lease);
        drop(lease);
        assert!(dir
            .path()
            .join("mirrors")
            .join(format!("{}.damaged", Mirrors::id(&repo)))
            .exists());
        let (_, how) = mirrors.prepare(&repo, None).unwrap();
        assert_eq!(how, Readiness::Rebuilt);
    }

    /// A clone killed partway leaves `<id>.partial`; the next eviction removes it, unless
    /// a clone is still writing it (under the repository's update lock). Before: it
    /// stayed until that repository's next clone, outside the size bound.
    #[test]
    fn a_killed_clone_s_leftover_is_removed_at_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mirrors");
        let mirrors = Mirrors::new(root.clone(), u64::MAX);
        let left = root.join("0123abcd.partial");
        std::fs::create_dir_all(left.join("objects")).unwrap();
        std::fs::write(left.join("objects").join("pack"), vec![7u8; 4096]).unwrap();
        let busy = root.join("4567ef01.partial");
        std::fs::create_dir_all(&busy).unwrap();
        let update = lock(
            &mirrors.lock_path("4567ef01", "update"),
            FlockArg::LockExclusive,
        )
        .unwrap();
        mirrors.evict("other");
        assert!(!left.exists(), "the leftover stays");
        assert!(busy.exists(), "a clone in progress lost its directory");
        drop(update);
        mirrors.evict("other");
        assert!(!busy.exists());
    }

    #[test]
    fn a_mirror_in_use_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let repo = upstream(dir.path());
        let mirrors = Mirrors::new(dir.path().join("mirrors"), 0);
        let (lease, _) = mirrors.prepare(&repo, None).unwrap();
        // Bound 0: everything is over it, but the mirror is leased.
        assert!(mirrors.evict("other").is_empty());
        assert!(lease.path.join("HEAD").is_file());
        drop(lease);
        assert_eq!(mirrors.evict("other"), vec![Mirrors::id(&repo)]);
        assert!(!mirrors.path(&repo).exists());
    }
}
