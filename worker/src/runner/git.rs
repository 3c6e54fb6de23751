//! Git in the runner: a fresh clone on the task branch, and commit + push of the agent's
//! work. Every call is non-interactive, limited in time, and passes user-supplied values
//! after `--` or as refspecs that were validated at the API's edge.

use super::process::run_logged;
use crate::spec::RunSpec;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Limit of one network git operation.
const GIT_TIMEOUT: Duration = Duration::from_secs(600);
/// Commit identity of the agent.
const AUTHOR_NAME: &str = "agent-orchestrator";
const AUTHOR_EMAIL: &str = "agent-orchestrator@users.noreply.local";

/// The variable holding a GitHub installation token for this attempt (set by the worker,
/// see `credentials.rs`).
pub(crate) const TOKEN_ENV: &str = "AO_GIT_TOKEN";
/// A credential helper that answers git's `get` with the token from the environment, so
/// the token is never in a URL, an argument or a config file. Any helper configured
/// elsewhere is reset first (the empty value).
pub(crate) const CREDENTIAL_HELPER: &str = "!f() { test \"$1\" = get || exit 0; \
    echo username=x-access-token; printf 'password=%s\\n' \"$AO_GIT_TOKEN\"; }; f";

pub(super) fn git(dir: Option<&Path>) -> Command {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    if std::env::var_os(TOKEN_ENV).is_some_and(|t| !t.is_empty()) {
        cmd.args(["-c", "credential.helper=", "-c"])
            .arg(format!("credential.helper={CREDENTIAL_HELPER}"));
    }
    // No hook runs for the runner: the agent could have written them.
    cmd.args(["-c", "core.hooksPath=/dev/null"]);
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "file:http:https:ssh:git")
        .env("GIT_SSH_COMMAND", "ssh -oBatchMode=yes")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        // Nor the agent's ~/.gitconfig.
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", AUTHOR_NAME)
        .env("GIT_AUTHOR_EMAIL", AUTHOR_EMAIL)
        .env("GIT_COMMITTER_NAME", AUTHOR_NAME)
        .env("GIT_COMMITTER_EMAIL", AUTHOR_EMAIL);
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<String>, String> {
    match run_logged(cmd, GIT_TIMEOUT) {
        Ok(f) if f.success => Ok(f.lines),
        Ok(f) => Err(format!("{what} failed ({}): {}", f.status, f.tail())),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

fn output(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = git(Some(dir))
        .args(args)
        .output()
        .map_err(|e| format!("git {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Clones the repository into `repo` and checks out the task branch: the existing remote
/// branch when there is one, else a new branch from the base (or the default branch).
/// Returns the commit work starts from ("" for an empty repository).
pub fn prepare(spec: &RunSpec, repo: &Path) -> Result<String, String> {
    // A warm start borrows the worker's mirror (see `warm.rs`); a cold one, or one whose
    // mirror fails, clones in full.
    if !spec
        .warm
        .mirror
        .as_deref()
        .is_some_and(|m| super::warm_clone::from_mirror(spec, m, repo))
    {
        let mut clone = git(None);
        clone.args(["clone", "--no-tags", "--quiet"]);
        if let Some(base) = &spec.base_branch {
            clone.args(["--branch", base]);
        }
        clone.arg("--").arg(&spec.repository).arg(repo);
        run(&mut clone, "git clone")?;
    }
    let remote_ref = format!("refs/heads/{}", spec.branch);
    let exists = !output(repo, &["ls-remote", "--heads", "origin", &remote_ref])?.is_empty();
    if exists {
        let refspec = format!("+{remote_ref}:refs/remotes/origin/{}", spec.branch);
        run(
            git(Some(repo)).args(["fetch", "--quiet", "origin", &refspec]),
            "git fetch",
        )?;
        let tracking = format!("origin/{}", spec.branch);
        run(
            git(Some(repo)).args(["checkout", "--quiet", "-B", &spec.branch, &tracking]),
            "git checkout",
        )?;
    } else {
        run(
            git(Some(repo)).args(["checkout", "--quiet", "-b", &spec.branch]),
            "git checkout",
        )?;
    }
    Ok(output(repo, &["rev-parse", "--verify", "--quiet", "HEAD"]).unwrap_or_default())
}

/// The repository's own git configuration as the runner left it, before the agent ran.
///
/// The agent runs as the same user and can rewrite `.git`: a hook, `core.fsmonitor`, a
/// credential helper or another remote URL would make the runner's commit and push run
/// the agent's commands with the push credentials at hand, or send them elsewhere. So
/// the configuration is kept in the runner's memory and put back before the runner
/// touches the repository again, and hooks are never run.
pub struct Pristine {
    config: Vec<u8>,
}

impl Pristine {
    pub fn capture(repo: &Path) -> Result<Self, String> {
        let config = std::fs::read(repo.join(".git/config"))
            .map_err(|e| format!("cannot read .git/config: {e}"))?;
        Ok(Self { config })
    }

    /// Puts the configuration back and empties the hooks; fails if `.git` is no longer
    /// a plain directory.
    pub fn restore(&self, repo: &Path) -> Result<(), String> {
        let git_dir = repo.join(".git");
        let meta = std::fs::symlink_metadata(&git_dir)
            .map_err(|e| format!("the working copy lost its .git: {e}"))?;
        if !meta.is_dir() {
            return Err("the agent replaced .git with a file or link; nothing is pushed".into());
        }
        let config = git_dir.join("config");
        // Removed first: a symlink put there is replaced, not followed.
        let _ = std::fs::remove_file(&config);
        std::fs::write(&config, &self.config)
            .map_err(|e| format!("cannot restore .git/config: {e}"))?;
        let hooks = git_dir.join("hooks");
        if std::fs::symlink_metadata(&hooks).is_ok_and(|m| !m.is_dir()) {
            let _ = std::fs::remove_file(&hooks);
        } else {
            let _ = std::fs::remove_dir_all(&hooks);
        }
        Ok(())
    }
}

/// Commits what the agent changed (if it did not commit itself) and pushes the branch.
/// Returns the pushed commit, or `None` when there is nothing new.
pub fn commit_and_push(
    spec: &RunSpec,
    repo: &Path,
    start_commit: &str,
    summary: &str,
) -> Result<Option<String>, String> {
    run(git(Some(repo)).args(["add", "--all"]), "git add")?;
    let staged = !git(Some(repo))
        .args(["diff", "--cached", "--quiet"])
        .status()
        .map_err(|e| format!("git diff: {e}"))?
        .success();
    if staged {
        let mut message = format!("{}: {}\n\n", spec.capability, spec.title);
        let summary: String = summary.chars().take(2000).collect();
        if !summary.trim().is_empty() {
            message.push_str(summary.trim());
            message.push_str("\n\n");
        }
        message.push_str(&format!(
            "Task: {}\nSubtask: {} (attempt {})\n",
            spec.task_id, spec.subtask_id, spec.attempt
        ));
        run(
            git(Some(repo)).args(["commit", "--quiet", "--no-verify", "-m", &message]),
            "git commit",
        )?;
    }
    let head = output(repo, &["rev-parse", "--verify", "--quiet", "HEAD"]).unwrap_or_default();
    if head.is_empty() || head == start_commit {
        return Ok(None);
    }
    let refspec = format!("HEAD:refs/heads/{}", spec.branch);
    run(
        git(Some(repo)).args(["push", "--quiet", "origin", &refspec]),
        "git push",
    )?;
    Ok(Some(head))
}
