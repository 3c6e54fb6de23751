//! Local repositories (an absolute path or a `file://` URL) under the `bwrap` driver.
//!
//! The sandbox sees such a repository read-only: the runner clones from it, and the agent
//! can write nothing into it (no hook, no setuid file, no ref). The runner hands its
//! commits back as a git bundle ([`Delivery::Bundle`]), written once every other process
//! of the sandbox is gone; after the sandbox ended, the worker copies that bundle out of
//! the attempt directory (never following a link, never opening anything but a regular
//! file, at most [`BUNDLE_LIMIT`] bytes) and fetches its one ref into the task branch
//! of the repository through git's transport: only a fast-forward of that one branch,
//! never a deletion and never another ref.
//!
//! [`Delivery::Bundle`]: crate::spec::Delivery::Bundle

use crate::spec::BUNDLE_FILE;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// Largest bundle the worker accepts, in bytes.
pub const BUNDLE_LIMIT: u64 = 512 * 1024 * 1024;
/// Limit of the worker's fetch into the repository.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The directory of a repository given as a local path or `file://` URL.
pub fn local_repository(repository: &str) -> Option<PathBuf> {
    let path = repository.strip_prefix("file://").unwrap_or(repository);
    if !path.starts_with('/') {
        return None;
    }
    let real = Path::new(path).canonicalize().ok()?;
    real.is_dir().then_some(real)
}

/// Why the bundle did not reach the repository.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the runner's bundle {0}")]
    Bundle(String),
    #[error("cannot keep the bundle: {0}")]
    Copy(std::io::Error),
    #[error("git fetch into {repo} failed: {detail}")]
    Fetch { repo: String, detail: String },
    #[error("the branch {branch} is at {found}, not at the runner's commit {expected}")]
    Mismatch {
        branch: String,
        found: String,
        expected: String,
    },
}

/// Copies the runner's bundle out of `attempt_dir` into a private file in `private_dir`
/// (which the sandbox never sees), bounded and without following links or blocking.
fn copy_bundle(
    attempt_dir: &Path,
    private_dir: &Path,
) -> Result<tempfile::TempPath, DeliveryError> {
    let path = attempt_dir.join(BUNDLE_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| DeliveryError::Bundle(format!("cannot be opened: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| DeliveryError::Bundle(format!("cannot be read: {e}")))?;
    if !meta.is_file() {
        return Err(DeliveryError::Bundle("is not a regular file".into()));
    }
    if meta.len() > BUNDLE_LIMIT {
        return Err(DeliveryError::Bundle(format!(
            "is larger than {BUNDLE_LIMIT} bytes"
        )));
    }
    let mut copy = tempfile::Builder::new()
        .prefix(".bundle-")
        .tempfile_in(private_dir)
        .map_err(DeliveryError::Copy)?;
    let copied = std::io::copy(&mut (&mut file).take(BUNDLE_LIMIT + 1), copy.as_file_mut())
        .map_err(DeliveryError::Copy)?;
    if copied > BUNDLE_LIMIT {
        return Err(DeliveryError::Bundle(format!(
            "is larger than {BUNDLE_LIMIT} bytes"
        )));
    }
    copy.as_file_mut().flush().map_err(DeliveryError::Copy)?;
    Ok(copy.into_temp_path())
}

/// Fetches the bundle's `HEAD` into `refs/heads/<branch>` of `repo` (a fast-forward or
/// a new branch) and checks that the branch is then at `commit`.
pub async fn deliver(
    attempt_dir: &Path,
    private_dir: &Path,
    repo: &Path,
    branch: &str,
    commit: &str,
) -> Result<(), DeliveryError> {
    let (attempt_dir, private_dir) = (attempt_dir.to_path_buf(), private_dir.to_path_buf());
    let bundle = tokio::task::spawn_blocking(move || copy_bundle(&attempt_dir, &private_dir))
        .await
        .map_err(|e| DeliveryError::Copy(std::io::Error::other(e.to_string())))??;
    let fetch_error = |detail: String| DeliveryError::Fetch {
        repo: repo.display().to_string(),
        detail,
    };
    let refspec = format!("HEAD:refs/heads/{branch}");
    let mut fetch = git(repo);
    fetch
        .args([
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--",
        ])
        .arg(&*bundle)
        .arg(&refspec);
    let out = tokio::time::timeout(FETCH_TIMEOUT, fetch.output())
        .await
        .map_err(|_| fetch_error(format!("no answer in {} s", FETCH_TIMEOUT.as_secs())))?
        .map_err(|e| fetch_error(e.to_string()))?;
    if !out.status.success() {
        return Err(fetch_error(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let tip = git(repo)
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("refs/heads/{branch}^{{commit}}"))
        .output()
        .await
        .map_err(|e| fetch_error(e.to_string()))?;
    let found = String::from_utf8_lossy(&tip.stdout).trim().to_string();
    if found != commit {
        return Err(DeliveryError::Mismatch {
            branch: branch.to_string(),
            found,
            expected: commit.to_string(),
        });
    }
    Ok(())
}

/// The worker's git in `repo`: never interactive, and killed with the worker's task.
fn git(repo: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(repo)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_repositories_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let url = format!("file://{}", dir.path().display());
        assert_eq!(local_repository(&url), Some(real.clone()));
        assert_eq!(
            local_repository(&dir.path().display().to_string()),
            Some(real)
        );
        assert_eq!(local_repository("https://example.com/a/b.git"), None);
        assert_eq!(local_repository("git@example.com:a/b.git"), None);
        assert_eq!(local_repository("/nonexistent/repo.git"), None);
    }

    #[test]
    fn only_a_regular_bundle_is_taken() {
        let attempt = tempfile::tempdir().unwrap();
        let private = tempfile::tempdir().unwrap();
        let host = attempt.path().join("host-file");
        std::fs::write(&host, "host secret").unwrap();
        std::os::unix::fs::symlink(&host, attempt.path().join(BUNDLE_FILE)).unwrap();
        let err = copy_bundle(attempt.path(), private.path()).unwrap_err();
        assert!(err.to_string().contains("cannot be opened"), "{err}");
        std::fs::remove_file(attempt.path().join(BUNDLE_FILE)).unwrap();
        nix::unistd::mkfifo(
            &attempt.path().join(BUNDLE_FILE),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let err = copy_bundle(attempt.path(), private.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
