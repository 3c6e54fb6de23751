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
    /// The branch moved since the runner looked: it is no ancestor of the runner's commit.
    #[error("{branch} moved after the run (now at {tip})")]
    Moved { branch: String, tip: String },
    #[error("the branch {branch} is at {found}, not at the runner's commit {expected}")]
    Mismatch {
        branch: String,
        found: String,
        expected: String,
    },
}

/// Fetches the `HEAD` of `bundle` (the worker's private copy of the runner's bundle, or
/// `None` when the runner sent none) into `refs/heads/<branch>` of `repo` (a
/// fast-forward or a new branch) and checks that the branch is then at `commit`. A branch
/// that moved since the runner looked (no fast-forward to `commit`) is
/// [`DeliveryError::Moved`]; the bundle's objects are in `repo` then, for
/// [`keep_aside`].
pub async fn deliver(
    bundle: Option<&Path>,
    repo: &Path,
    branch: &str,
    commit: &str,
) -> Result<(), DeliveryError> {
    match fetch(bundle, repo, branch, false).await {
        Ok(()) => {}
        Err(e @ DeliveryError::Fetch { .. }) => {
            return Err(moved(repo, branch, commit).await.unwrap_or(e))
        }
        Err(e) => return Err(e),
    }
    let found = tip(repo, branch).await?.unwrap_or_default();
    if found != commit {
        return Err(DeliveryError::Mismatch {
            branch: branch.to_string(),
            found,
            expected: commit.to_string(),
        });
    }
    Ok(())
}

/// Writes the `HEAD` of `bundle` to the side branch `kept_at` of `repo` (made, or
/// overwritten: it is the one attempt's own), for work that cannot go onto its task
/// branch.
pub async fn keep_aside(
    bundle: Option<&Path>,
    repo: &Path,
    kept_at: &str,
) -> Result<(), DeliveryError> {
    fetch(bundle, repo, kept_at, true).await
}

/// [`DeliveryError::Moved`] when `branch` exists in `repo` and is no ancestor of
/// `commit` (whose objects the failed fetch left in `repo`).
async fn moved(repo: &Path, branch: &str, commit: &str) -> Option<DeliveryError> {
    let tip = tip(repo, branch).await.ok()??;
    let ancestor = git(repo)
        .args(["merge-base", "--is-ancestor", &tip, commit])
        .status()
        .await
        .ok()?;
    // 1: not an ancestor; anything else (a missing object) is no proof of a move.
    (ancestor.code() == Some(1)).then(|| DeliveryError::Moved {
        branch: branch.to_string(),
        tip,
    })
}

/// The commit `refs/heads/<branch>` of `repo` is at, if the branch exists.
async fn tip(repo: &Path, branch: &str) -> Result<Option<String>, DeliveryError> {
    let out = git(repo)
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("refs/heads/{branch}^{{commit}}"))
        .output()
        .await
        .map_err(|e| DeliveryError::Fetch {
            repo: repo.display().to_string(),
            detail: e.to_string(),
        })?;
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((out.status.success() && !found.is_empty()).then_some(found))
}

/// Fetches the `HEAD` of `bundle` into `refs/heads/<branch>` of `repo`: a fast-forward
/// or a new branch, or any update when `force`.
async fn fetch(
    bundle: Option<&Path>,
    repo: &Path,
    branch: &str,
    force: bool,
) -> Result<(), DeliveryError> {
    let bundle = bundle.ok_or_else(|| DeliveryError::Bundle("was not sent".into()))?;
    let fetch_error = |detail: String| DeliveryError::Fetch {
        repo: repo.display().to_string(),
        detail,
    };
    let refspec = format!("{}HEAD:refs/heads/{branch}", if force { "+" } else { "" });
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

    fn sh(dir: &Path, script: &str) -> String {
        let out = std::process::Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A branch that moves between the runner's look and the worker's fetch is
    /// [`DeliveryError::Moved`], not a retryable fetch failure, and the work then goes
    /// to the side branch whole; the task branch keeps the other change.
    #[tokio::test]
    async fn a_branch_that_moved_after_the_run_is_told_and_the_work_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        sh(
            d,
            "git init -q --bare -b main repo.git && git init -q -b main w && cd w && \
             echo a > a && git add a && git commit -qm base && git push -q ../repo.git main && \
             echo agent > b && git add b && git commit -qm agent && \
             git bundle create -q ../work.bundle HEAD ^HEAD~1",
        );
        let commit = sh(&d.join("w"), "git rev-parse HEAD");
        // Someone else pushes to main meanwhile.
        sh(
            d,
            "git clone -q repo.git other && cd other && echo other > c && git add c && \
             git commit -qm other && git push -q origin main",
        );
        let repo = d.join("repo.git");
        let bundle = d.join("work.bundle");
        let err = deliver(Some(&bundle), &repo, "main", &commit)
            .await
            .unwrap_err();
        assert!(matches!(err, DeliveryError::Moved { .. }), "{err}");
        keep_aside(Some(&bundle), &repo, "main-kept-1")
            .await
            .unwrap();
        assert_eq!(sh(&repo, "git rev-parse main-kept-1"), commit);
        assert_eq!(sh(&repo, "git log -1 --format=%s main"), "other");
    }
}
