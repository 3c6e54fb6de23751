//! Local repositories (an absolute path or a `file://` URL) under the `bwrap` driver.
//!
//! The sandbox sees such a repository read-only: the runner clones from it, and the agent
//! can write nothing into it (no hook, no setuid file, no ref). The runner hands its
//! commits back as a git bundle ([`Delivery::Bundle`]), written once every other process
//! of the sandbox is gone, over the bundle channel (see [`super::result_channel`]): the
//! worker keeps it, at most [`BUNDLE_LIMIT`] bytes, in a private file, and after the
//! sandbox ended fetches its one ref into the task branch of the repository through
//! git's transport: only a fast-forward of that one branch, never a deletion and never
//! another ref.
//!
//! [`Delivery::Bundle`]: crate::spec::Delivery::Bundle
//! [`BUNDLE_LIMIT`]: super::result_channel::BUNDLE_LIMIT

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

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
    #[error("git fetch into {repo} failed: {detail}")]
    Fetch { repo: String, detail: String },
    #[error("the branch {branch} is at {found}, not at the runner's commit {expected}")]
    Mismatch {
        branch: String,
        found: String,
        expected: String,
    },
}

/// Fetches the `HEAD` of `bundle` (the worker's private copy of the runner's bundle, or
/// `None` when the runner sent none) into `refs/heads/<branch>` of `repo` (a
/// fast-forward or a new branch) and checks that the branch is then at `commit`.
pub async fn deliver(
    bundle: Option<&Path>,
    repo: &Path,
    branch: &str,
    commit: &str,
) -> Result<(), DeliveryError> {
    let bundle = bundle.ok_or_else(|| DeliveryError::Bundle("was not sent".into()))?;
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
        .arg(bundle)
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
}
