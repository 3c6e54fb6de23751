//! Git in the runner: a fresh clone on the task branch, and commit + push (or bundle) of
//! the agent's work. Every call is non-interactive, limited in time, and passes
//! user-supplied values after `--` or as refspecs that were validated at the API's edge.
//!
//! The agent can rewrite the working copy and its `.git` at will, so the runner's git
//! trusts nothing of it: the git directory and work tree are pinned (`GIT_DIR`,
//! `GIT_WORK_TREE`; no discovery, and `GIT_CEILING_DIRECTORIES` above the clone for the
//! clone itself), no system or global configuration is read, the repository's
//! configuration is put back from the copy taken right after the clone, the files that
//! would send git elsewhere (`commondir`, `config.worktree`, alternates) are removed, no
//! hook or fsmonitor runs, and the push goes to the URL of the run spec, never to a
//! remote URL read from the configuration.
//!
//! An attempt may run twice (its worker died after the push and before the report, and
//! the message came back). Every commit of the runner names its attempt (`Subtask: <id>
//! (attempt N)`), and before pushing the runner looks for that line on the remote
//! branch: when this attempt's commit is already there it is reported again, and
//! nothing is committed or pushed a second time.

use super::process::run_logged;
use crate::spec::{RunSpec, BUNDLE_FILE};
use ao_shared::task::FailureCause;
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

/// Files of a git directory that would make git read another directory's
/// configuration, objects or history; never made by the runner's clone.
const REDIRECTING_FILES: &[&str] = &[
    "commondir",
    "config.worktree",
    "gitdir",
    "objects/info/alternates",
    "objects/info/http-alternates",
    "info/grafts",
];

/// The runner's git, in the working copy `dir` when given (its git directory and work
/// tree pinned).
pub(super) fn git(dir: Option<&Path>) -> Command {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.current_dir(d)
            .env("GIT_DIR", d.join(".git"))
            .env("GIT_WORK_TREE", d);
        if let Some(parent) = d.parent() {
            cmd.env("GIT_CEILING_DIRECTORIES", parent);
        }
    } else {
        cmd.env_remove("GIT_DIR").env_remove("GIT_WORK_TREE");
    }
    if std::env::var_os(TOKEN_ENV).is_some_and(|t| !t.is_empty()) {
        cmd.args(["-c", "credential.helper=", "-c"])
            .arg(format!("credential.helper={CREDENTIAL_HELPER}"));
    }
    // No hook or fsmonitor runs for the runner: the agent could have written them. The
    // source repository of a local clone may belong to another user (seen through the
    // sandbox's user namespace): the runner names every repository it touches, so
    // git's ownership check has nothing to protect.
    cmd.args([
        "-c",
        "core.hooksPath=/dev/null",
        "-c",
        "core.fsmonitor=false",
        "-c",
        "safe.directory=*",
    ]);
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        // Nor the agent's replacement objects (`refs/replace/`), which would change what
        // the runner's log, diff and merge base see.
        .env("GIT_NO_REPLACE_OBJECTS", "1")
        .env("GIT_ALLOW_PROTOCOL", "file:http:https:ssh:git")
        .env("GIT_SSH_COMMAND", "ssh -oBatchMode=yes")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        // Nor the agent's ~/.gitconfig.
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_SYSTEM", "/dev/null")
        .env_remove("GIT_CONFIG_PARAMETERS")
        .env_remove("GIT_CONFIG_COUNT")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .env_remove("GIT_COMMON_DIR")
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

/// The working copy as [`prepare`] left it.
#[derive(Debug)]
pub struct Prepared {
    /// The commit work starts from ("" for an empty repository).
    pub start_commit: String,
    /// The tip of the base branch (or the default branch) as cloned, before anything of
    /// the agent ran: what the task branch's diff is taken against.
    pub base_tip: Option<String>,
    /// The repository had no commit at all (no branch): the run's commit is its first.
    pub empty_repository: bool,
    /// The working copy was made from the worker's mirror (a warm start).
    pub from_mirror: bool,
}

/// Why [`prepare`] could not make the working copy.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Another attempt may well succeed (the network, the git host).
    #[error("{0}")]
    Transient(String),
    /// The same clone fails every time: the base branch does not exist.
    #[error("{0}")]
    Unclonable(String),
}

impl From<String> for PrepareError {
    fn from(e: String) -> Self {
        Self::Transient(e)
    }
}

/// Clones the repository into `repo` and checks out the task branch: the existing remote
/// branch when there is one, else a new branch from the base (or the default branch).
/// The clone checks nothing out: the working tree is written once, by the checkout of the
/// task branch (a second checkout right after the first would hash every file again,
/// all of them written in the same second as the index, "racily clean").
/// An empty repository (no commit, an unborn default branch) gets the task branch
/// unborn, so the run's commit is its first; a base branch that does not exist in a
/// repository that has others is [`PrepareError::Unclonable`].
pub fn prepare(spec: &RunSpec, repo: &Path) -> Result<Prepared, PrepareError> {
    // git's ownership check in the source's upload-pack honours safe.directory only
    // from global configuration: a file of the runner's, used before anything of the
    // repository runs and removed right after.
    let config = repo.parent().unwrap_or(repo).join("clone.gitconfig");
    std::fs::write(&config, "[safe]\n\tdirectory = *\n")
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let prepared = prepare_with(spec, repo, &config);
    let _ = std::fs::remove_file(&config);
    prepared
}

fn prepare_with(spec: &RunSpec, repo: &Path, config: &Path) -> Result<Prepared, PrepareError> {
    let git = |dir: Option<&Path>| {
        let mut cmd = git(dir);
        cmd.env("GIT_CONFIG_GLOBAL", config);
        cmd
    };
    let output = |dir: &Path, args: &[&str]| -> Result<String, String> {
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
    };
    let mut empty_repository = false;
    // A warm start borrows the worker's mirror (see `warm.rs`); a cold one, or one whose
    // mirror fails, clones in full.
    let from_mirror = spec
        .warm
        .mirror
        .as_deref()
        .is_some_and(|m| super::warm_clone::from_mirror(spec, m, repo, config));
    if !from_mirror {
        let mut clone = git(None);
        clone.args(["clone", "--no-checkout", "--no-tags", "--quiet"]);
        if let Some(base) = &spec.base_branch {
            clone.args(["--branch", base]);
        }
        clone.arg("--").arg(&spec.repository).arg(repo);
        if let Err(failed) = run(&mut clone, "git clone") {
            let Some(base) = &spec.base_branch else {
                return Err(failed.into());
            };
            // Cloning a branch that is not there fails the same way every time; tell
            // that apart from a clone that failed for the network or the host.
            let mut list = git(None);
            list.args(["ls-remote", "--"]).arg(&spec.repository);
            let refs = run(&mut list, "git ls-remote").map_err(PrepareError::Transient)?;
            let _ = std::fs::remove_dir_all(repo);
            let has_branches = refs.iter().any(|l| l.contains("\trefs/heads/"));
            let has_base = refs
                .iter()
                .any(|l| l.ends_with(&format!("\trefs/heads/{base}")));
            if has_base {
                return Err(failed.into());
            }
            if has_branches {
                return Err(PrepareError::Unclonable(format!(
                    "the base branch {base:?} does not exist in {}; nothing to start from",
                    spec.repository
                )));
            }
            empty_repository = true;
            let mut clone = git(None);
            clone
                .args(["clone", "--no-tags", "--quiet", "--"])
                .arg(&spec.repository)
                .arg(repo);
            run(&mut clone, "git clone")?;
        }
    }
    // The clone's HEAD names the base (or the default) branch, checked out or not.
    let base_tip = output(repo, &["rev-parse", "--verify", "--quiet", "HEAD"])
        .ok()
        .filter(|tip| !tip.is_empty());
    // A remote branch fetched to `origin/<branch>`, when the remote has it.
    let fetch = |branch: &str| -> Result<Option<String>, String> {
        let remote_ref = format!("refs/heads/{branch}");
        if output(repo, &["ls-remote", "--heads", "origin", &remote_ref])?.is_empty() {
            return Ok(None);
        }
        let refspec = format!("+{remote_ref}:refs/remotes/origin/{branch}");
        run(
            git(Some(repo)).args(["fetch", "--quiet", "origin", &refspec]),
            "git fetch",
        )?;
        Ok(Some(format!("origin/{branch}")))
    };
    // The step branches a merge takes in, or the attempts a pick compares.
    match &spec.step {
        Some(ao_shared::task::Step::Integrate { branches })
        | Some(ao_shared::task::Step::Pick {
            candidates: branches,
            ..
        }) => {
            for b in branches {
                fetch(b)?;
            }
        }
        _ => {}
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
    } else if let Some(from) = match spec.start_from.as_deref() {
        Some(from) => fetch(from)?,
        None => None,
    } {
        // A step branch starts from the task branch, when there is one yet.
        run(
            git(Some(repo)).args(["checkout", "--quiet", "-b", &spec.branch, &from]),
            "git checkout",
        )?;
    } else {
        run(
            git(Some(repo)).args(["checkout", "--quiet", "-b", &spec.branch]),
            "git checkout",
        )?;
    }
    let start_commit =
        output(repo, &["rev-parse", "--verify", "--quiet", "HEAD"]).unwrap_or_default();
    // A clone without a base that finds no commit at all: an empty repository too.
    if start_commit.is_empty() && !exists {
        empty_repository = true;
    }
    Ok(Prepared {
        start_commit,
        base_tip,
        empty_repository,
        from_mirror,
    })
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
    /// `objects/info/alternates` as the runner's own clone made it (a warm start's
    /// `--shared` clone borrows the worker's read-only mirror), put back as it was.
    alternates: Option<Vec<u8>>,
}

/// Where a git directory lists the object stores it borrows from.
const ALTERNATES: &str = "objects/info/alternates";

impl Pristine {
    pub fn capture(repo: &Path) -> Result<Self, String> {
        let config = std::fs::read(repo.join(".git/config"))
            .map_err(|e| format!("cannot read .git/config: {e}"))?;
        let alternates = std::fs::read(repo.join(".git").join(ALTERNATES)).ok();
        Ok(Self { config, alternates })
    }

    /// Puts the configuration back, empties the hooks and removes what would redirect
    /// git to another directory; fails if `.git` is no longer a plain directory.
    pub fn restore(&self, repo: &Path) -> Result<(), String> {
        let git_dir = repo.join(".git");
        let meta = std::fs::symlink_metadata(&git_dir)
            .map_err(|e| format!("the working copy lost its .git: {e}"))?;
        if !meta.is_dir() {
            return Err("the agent replaced .git with a file or link; nothing is pushed".into());
        }
        if !std::fs::symlink_metadata(git_dir.join("HEAD")).is_ok_and(|m| m.is_file()) {
            return Err("the agent broke .git (its HEAD is gone); nothing is pushed".into());
        }
        for name in REDIRECTING_FILES {
            let path = git_dir.join(name);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
                Ok(_) => std::fs::remove_file(&path),
                Err(_) => Ok(()),
            }
            .map_err(|e| format!("cannot remove .git/{name}: {e}"))?;
        }
        if let Some(alternates) = &self.alternates {
            let path = git_dir.join(ALTERNATES);
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::write(&path, alternates)
                .map_err(|e| format!("cannot restore .git/{ALTERNATES}: {e}"))?;
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

/// What [`commit`] made.
#[derive(Debug, Default)]
pub struct Committed {
    /// The new head, or `None` when there is nothing new.
    pub head: Option<String>,
    /// Files left out of the commit for their size (path, bytes), over
    /// `agent.max_file_bytes`; they stay in the working copy only.
    pub left_out: Vec<(String, u64)>,
}

impl Committed {
    /// Plain words on what was left out, for the outcome; `None` when nothing was.
    pub fn note(&self, max_file_bytes: u64) -> Option<String> {
        if self.left_out.is_empty() {
            return None;
        }
        let listed: Vec<String> = self
            .left_out
            .iter()
            .take(20)
            .map(|(path, size)| format!("{path} ({size} bytes)"))
            .collect();
        let more = self.left_out.len().saturating_sub(listed.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        Some(format!(
            "Left out of the commit, over the {max_file_bytes}-byte file limit \
             (agent.max_file_bytes): {}{more}.",
            listed.join(", ")
        ))
    }
}

/// Files staged in `repo` that differ from `start_commit` (or all, for an unborn start)
/// and whose working-copy size is over `max` bytes, largest first.
fn oversized(repo: &Path, start_commit: &str, max: u64) -> Result<Vec<(String, u64)>, String> {
    if max == 0 {
        return Ok(Vec::new());
    }
    let mut cmd = git(Some(repo));
    cmd.args([
        "diff",
        "--cached",
        "--name-only",
        "-z",
        "--no-renames",
        "--diff-filter=AMT",
    ]);
    // The empty tree: an unborn start has every staged file new.
    cmd.arg(if start_commit.is_empty() {
        "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
    } else {
        start_commit
    });
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("git diff: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git diff --cached failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut found: Vec<(String, u64)> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let path = String::from_utf8_lossy(p).into_owned();
            // After `git add --all` the working copy holds what is staged; a link is
            // committed as its target's name, never followed.
            let size = std::fs::symlink_metadata(repo.join(&path))
                .ok()
                .filter(|m| m.is_file())?
                .len();
            (size > max).then_some((path, size))
        })
        .collect();
    found.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(found)
}

/// Commits what the agent changed (if it did not commit itself), leaving out files over
/// the run's `max_file_bytes` (the agent's own commits are folded into the runner's when
/// one of them holds such a file, so that no pushed commit carries it). The message's
/// summary (the agent's words) has the run's secrets redacted.
fn commit(
    spec: &RunSpec,
    repo: &Path,
    start_commit: &str,
    summary: &str,
) -> Result<Committed, String> {
    run(git(Some(repo)).args(["add", "--all"]), "git add")?;
    let left_out = oversized(repo, start_commit, spec.agent.max_file_bytes)?;
    if !left_out.is_empty() {
        let head = output(repo, &["rev-parse", "--verify", "--quiet", "HEAD"]).unwrap_or_default();
        if head != start_commit {
            // The agent committed itself, maybe the big file too: its commits become
            // the runner's one commit, their changes staged.
            if start_commit.is_empty() {
                run(
                    git(Some(repo)).args(["update-ref", "-d", "HEAD"]),
                    "git update-ref",
                )?;
            } else {
                run(
                    git(Some(repo)).args(["reset", "--quiet", "--soft", start_commit]),
                    "git reset",
                )?;
            }
        }
        let mut rm = git(Some(repo));
        rm.args(["rm", "--quiet", "--cached", "--"]);
        for (path, _) in &left_out {
            rm.arg(format!(":(literal){path}"));
        }
        run(&mut rm, "git rm --cached")?;
    }
    let committed = Committed {
        head: None,
        left_out,
    };
    let note = committed.note(spec.agent.max_file_bytes);
    if let Some(note) = &note {
        super::log(note.clone());
    }
    let staged = !git(Some(repo))
        .args(["diff", "--cached", "--quiet"])
        // The runner's standard input carries the worker's push permits: no child reads it.
        .stdin(std::process::Stdio::null())
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
        if let Some(note) = &note {
            message.push_str(note);
            message.push_str("\n\n");
        }
        message.push_str(&format!("Task: {}\n{}\n", spec.task_id, attempt_line(spec)));
        let message = super::redact(&message);
        run(
            git(Some(repo)).args(["commit", "--quiet", "--no-verify", "-m", &message]),
            "git commit",
        )?;
    }
    let head = output(repo, &["rev-parse", "--verify", "--quiet", "HEAD"]).unwrap_or_default();
    if head.is_empty() || head == start_commit {
        return Ok(committed);
    }
    Ok(Committed {
        head: Some(head),
        ..committed
    })
}

/// The line of a commit message that names the run's subtask and attempt.
pub(super) fn attempt_line(spec: &RunSpec) -> String {
    format!("Subtask: {} (attempt {})", spec.subtask_id, spec.attempt)
}

/// Where the runner fetches the remote task branch to look for this attempt's commit.
const REMOTE_HEAD_REF: &str = "refs/ao/remote-head";

/// The commit of this attempt already on the remote task branch, if any: a run of the
/// same attempt pushed it and died before its report. Looks at the branch as the remote
/// holds it now (fetched from the run spec's URL), by the [`attempt_line`] of the
/// runner's commit messages.
fn pushed_before(spec: &RunSpec, repo: &Path) -> Result<Option<String>, String> {
    let remote_ref = format!("refs/heads/{}", spec.branch);
    let listed = output(
        repo,
        &["ls-remote", "--heads", "--", &spec.repository, &remote_ref],
    )?;
    if listed.is_empty() {
        return Ok(None);
    }
    let refspec = format!("+{remote_ref}:{REMOTE_HEAD_REF}");
    run(
        git(Some(repo))
            .args(["fetch", "--quiet", "--no-tags", "--"])
            .arg(&spec.repository)
            .arg(&refspec),
        "git fetch",
    )?;
    let grep = format!("--grep={}", attempt_line(spec));
    let found = output(
        repo,
        &[
            "log",
            "-n",
            "1",
            "--format=%H",
            "--fixed-strings",
            &grep,
            REMOTE_HEAD_REF,
        ],
    )?;
    Ok((!found.is_empty()).then_some(found))
}

/// Why the work did not reach the task branch.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The git host refused the push for good (`cause`): its own words are in `reason`.
    #[error("{reason}")]
    Refused { cause: FailureCause, reason: String },
    /// The branch moved during the run and the agent's commits conflict with its new
    /// tip: they were pushed to the side branch `kept_at`.
    #[error(
        "branch moved, work kept at {kept_at}: {branch} moved during the run and the \
         agent's commits do not apply on its new tip ({detail})"
    )]
    Moved {
        branch: String,
        kept_at: String,
        detail: String,
    },
    /// Anything else (the network, the host, the working copy): another attempt may work.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for PushError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

/// What a delivery made: the commit that reached the task branch (or the bundle), if
/// any, and what the run should say about it.
#[derive(Debug, Default)]
pub struct Delivered {
    pub commit: Option<String>,
    /// Plain words for the outcome (files left out, a rebase onto a moved branch).
    pub notes: Vec<String>,
}

/// Times a push is tried again after its branch moved under it and the work was put
/// on the new tip (someone keeps pushing meanwhile).
const MOVED_ROUNDS: usize = 3;

/// Commits what the agent changed (if it did not commit itself) and pushes the branch to
/// the run spec's repository URL. When the remote branch already holds this attempt's
/// commit (pushed by an earlier run of the same attempt), returns that commit and neither
/// commits nor pushes. When the branch moved during the run, the agent's commits are
/// rebased onto its new tip and pushed; when they conflict, they go to a side branch
/// ([`PushError::Moved`]). A refusal git's answer shows to be permanent is
/// [`PushError::Refused`].
pub fn commit_and_push(
    spec: &RunSpec,
    repo: &Path,
    start_commit: &str,
    summary: &str,
) -> Result<Delivered, PushError> {
    if let Some(earlier) = pushed_before(spec, repo)? {
        super::log(format!(
            "{} already holds {earlier} of this attempt (an earlier run pushed it); \
             reporting it instead of pushing again",
            spec.branch
        ));
        return Ok(Delivered {
            commit: Some(earlier),
            notes: Vec::new(),
        });
    }
    let committed = commit(spec, repo, start_commit, summary)?;
    let mut notes: Vec<String> = committed
        .note(spec.agent.max_file_bytes)
        .into_iter()
        .collect();
    let Some(mut head) = committed.head else {
        return Ok(Delivered {
            commit: None,
            notes,
        });
    };
    let target = format!("refs/heads/{}", spec.branch);
    for _ in 0..MOVED_ROUNDS {
        match push(spec, repo, &head, &target, false)? {
            Pushed::Done => {
                return Ok(Delivered {
                    commit: Some(head),
                    notes,
                })
            }
            Pushed::NotFastForward => {}
        }
        let tip = fetch_remote_head(spec, repo)?;
        super::log(format!(
            "{} moved during the run (now at {tip}); putting the agent's commits on top",
            spec.branch
        ));
        match rebase(repo, start_commit, &head, &tip) {
            Ok(rebased) => {
                head = rebased;
                let note = format!(
                    "{} moved during the run; the agent's work was rebased onto its new tip {tip}.",
                    spec.branch
                );
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
            Err(detail) => {
                let kept_at = side_branch(spec);
                match push(spec, repo, &head, &format!("refs/heads/{kept_at}"), true)? {
                    Pushed::Done => {}
                    Pushed::NotFastForward => {
                        return Err(PushError::Failed(format!(
                            "{} moved during the run, the agent's commits conflict with it, \
                             and the side branch {kept_at} could not be written",
                            spec.branch
                        )))
                    }
                }
                return Err(PushError::Moved {
                    branch: spec.branch.clone(),
                    kept_at,
                    detail,
                });
            }
        }
    }
    Err(PushError::Failed(format!(
        "{} kept moving while the runner pushed ({MOVED_ROUNDS} tries)",
        spec.branch
    )))
}

/// The branch the work of a run goes to when its task branch moved under it and the
/// work conflicts: named after the task branch and the attempt, so a later attempt
/// never overwrites it.
pub fn side_branch(spec: &RunSpec) -> String {
    let subtask = spec.subtask_id.to_string();
    let short: String = subtask
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("{}-kept-{short}-{}", spec.branch, spec.attempt)
}

/// How a push the remote answered ended.
enum Pushed {
    Done,
    /// The remote branch is not an ancestor of what was pushed: it moved.
    NotFastForward,
}

/// Pushes `head` to `target` (forced when `force`) at the run spec's URL and reads git's
/// answer (`--porcelain`): a branch that moved is [`Pushed::NotFastForward`], a refusal
/// by the remote that will not change is [`PushError::Refused`] quoting its words,
/// anything else [`PushError::Failed`].
fn push(
    spec: &RunSpec,
    repo: &Path,
    head: &str,
    target: &str,
    force: bool,
) -> Result<Pushed, PushError> {
    let refspec = format!("{}{head}:{target}", if force { "+" } else { "" });
    let mut cmd = git(Some(repo));
    cmd.args(["push", "--porcelain", "--no-verify", "--"])
        .arg(&spec.repository)
        .arg(&refspec);
    let limits = super::process::Limits {
        timeout: GIT_TIMEOUT,
        idle: None,
        stdin: None,
        finish_grace: super::process::FINISH_GRACE,
    };
    let mut porcelain: Vec<String> = Vec::new();
    let finished = super::process::run_streaming(&mut cmd, &limits, &mut |line| {
        porcelain.push(line.to_string());
        super::process::Control::Continue
    })
    .map_err(|e| PushError::Failed(format!("git push: {e}")))?;
    let all = finished.lines.join("\n");
    let answer = read_push_answer(&porcelain, &all);
    match answer {
        PushAnswer::Accepted if finished.success => Ok(Pushed::Done),
        PushAnswer::NotFastForward => Ok(Pushed::NotFastForward),
        PushAnswer::Refused { cause, reason } => Err(PushError::Refused {
            cause,
            reason: format!("the git host refused the push to {target}: {reason}"),
        }),
        _ => Err(PushError::Failed(format!(
            "git push failed ({}): {}",
            finished.status,
            finished.tail()
        ))),
    }
}

/// git's answer to a push, read from its `--porcelain` lines and what the remote said.
#[derive(Debug, PartialEq)]
enum PushAnswer {
    Accepted,
    NotFastForward,
    Refused {
        cause: FailureCause,
        reason: String,
    },
    /// A failure another try may not see (a lock held, the network, no answer at all).
    Other,
}

/// Reasons of a `[remote rejected]` that another try may well not meet: git's own
/// receive-pack words for a lock held or a write that failed on the host.
const TRANSIENT_REJECTIONS: &[&str] = &[
    "failed to lock",
    "unable to lock",
    "unpacker error",
    "unpack failed",
    "failed to write",
    "missing necessary objects",
    "cannot lock",
];

/// Reads git's porcelain status lines of a push (`<flag>\t<from>:<to>\t<summary>
/// (<reason>)`, git-push(1) "OUTPUT") and its whole output `all` (for the remote's own
/// `remote:` lines, quoted in a refusal). A `[rejected]` for `fetch first`, `non-fast-
/// forward` or `stale info` means the branch moved; a `[remote rejected]` is a refusal
/// of the host's (a pre-receive hook, a protected branch, a file over its size limit, a
/// change to workflows without the permission), permanent unless its reason is one of
/// [`TRANSIENT_REJECTIONS`].
fn read_push_answer(porcelain: &[String], all: &str) -> PushAnswer {
    let mut accepted = false;
    for line in porcelain {
        let mut fields = line.splitn(3, '\t');
        let (Some(flag), Some(_refs), Some(summary)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if flag != "!" {
            accepted |= matches!(flag, " " | "+" | "*" | "=" | "-");
            continue;
        }
        let reason = summary
            .split_once('(')
            .map(|(_, r)| r.trim_end().trim_end_matches(')').to_string())
            .unwrap_or_default();
        if summary.starts_with("[rejected]") {
            if ["fetch first", "non-fast-forward", "stale info"]
                .iter()
                .any(|r| reason.contains(r))
            {
                return PushAnswer::NotFastForward;
            }
            return PushAnswer::Other;
        }
        if !summary.starts_with("[remote rejected]") {
            return PushAnswer::Other;
        }
        let lower = reason.to_ascii_lowercase();
        if TRANSIENT_REJECTIONS.iter().any(|t| lower.contains(t)) {
            return PushAnswer::Other;
        }
        let remote: Vec<&str> = all
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("remote:"))
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '-' || c == '='))
            .collect();
        let said = remote.join("\n");
        let cause = if refused_for_workflows(&reason) || refused_for_workflows(&said) {
            FailureCause::WorkflowsPermission
        } else {
            FailureCause::PushRefused
        };
        let reason = if said.is_empty() {
            format!("\"{reason}\"")
        } else {
            format!(
                "\"{reason}\"; the remote said:\n{}",
                ao_shared::bounded::truncate_bytes(&said, 4000)
            )
        };
        return PushAnswer::Refused { cause, reason };
    }
    if accepted {
        PushAnswer::Accepted
    } else {
        PushAnswer::Other
    }
}

/// Fetches the remote task branch as it is now into [`REMOTE_HEAD_REF`]; returns its tip.
fn fetch_remote_head(spec: &RunSpec, repo: &Path) -> Result<String, PushError> {
    let refspec = format!("+refs/heads/{}:{REMOTE_HEAD_REF}", spec.branch);
    run(
        git(Some(repo))
            .args(["fetch", "--quiet", "--no-tags", "--"])
            .arg(&spec.repository)
            .arg(&refspec),
        "git fetch",
    )?;
    Ok(output(
        repo,
        &["rev-parse", "--verify", "--quiet", REMOTE_HEAD_REF],
    )?)
}

/// Replays the commits `start..head` (all of `head` for an unborn start) onto `onto` in
/// the working copy; returns the new head, or why they do not apply (the rebase is then
/// undone and `head` is as it was).
fn rebase(repo: &Path, start: &str, head: &str, onto: &str) -> Result<String, String> {
    let mut cmd = git(Some(repo));
    cmd.args([
        "-c",
        "rebase.autoStash=false",
        "-c",
        "rebase.updateRefs=false",
        "rebase",
        "--quiet",
        "--no-verify",
        "--no-autosquash",
        "--onto",
        onto,
    ]);
    if start.is_empty() {
        cmd.args(["--root", head]);
    } else {
        cmd.args([start, head]);
    }
    match run(&mut cmd, "git rebase") {
        Ok(_) => output(repo, &["rev-parse", "--verify", "--quiet", "HEAD"]),
        Err(e) => {
            // Back to `head`; the side branch gets it by its id either way.
            let _ = run(
                git(Some(repo)).args(["rebase", "--abort"]),
                "git rebase --abort",
            );
            let conflicts: Vec<&str> = e
                .lines()
                .filter(|l| l.contains("CONFLICT") || l.contains("could not apply"))
                .take(10)
                .collect();
            Err(if conflicts.is_empty() {
                "they conflict with its new commits".to_string()
            } else {
                ao_shared::bounded::truncate_bytes(&conflicts.join("; "), 1000)
            })
        }
    }
}

/// Whether a failed push's error is the git host refusing a change to
/// `.github/workflows/` for want of the `workflows` permission. GitHub words it
/// "refusing to allow a GitHub App to create or update workflow `<path>` without
/// `workflows` permission" (an OAuth App or a token: "an OAuth App"); git shows it after
/// `remote:` or in the `[remote rejected]` line.
pub fn refused_for_workflows(error: &str) -> bool {
    error.contains("to create or update workflow") && error.contains("`workflows` permission")
}

/// Where a bundle delivery goes.
pub enum BundleOut {
    /// The bundle channel inherited from the worker (the bwrap driver's): nothing of
    /// it is a path the agent could write.
    Channel(std::fs::File),
    /// A file, [`BUNDLE_FILE`] in this directory.
    Dir(std::path::PathBuf),
}

/// Commits what the agent changed and writes the commits new since `start_commit` as a
/// bundle whose one ref `HEAD` is the new head: into the bundle channel, or as
/// [`BUNDLE_FILE`] in a directory (whatever the agent left at that path is removed
/// first).
pub fn commit_and_bundle(
    spec: &RunSpec,
    repo: &Path,
    start_commit: &str,
    summary: &str,
    out: BundleOut,
) -> Result<Delivered, PushError> {
    let committed = commit(spec, repo, start_commit, summary)?;
    let mut notes: Vec<String> = committed
        .note(spec.agent.max_file_bytes)
        .into_iter()
        .collect();
    let Some(mut head) = committed.head else {
        return Ok(Delivered {
            commit: None,
            notes,
        });
    };
    // The repository is readable here: a branch that moved during the run gets the
    // agent's commits on its new tip before they are bundled; when they conflict, the
    // bundle carries them as they are, for the worker to keep on the side branch.
    let mut moved = None;
    if let Some(tip) = moved_tip(spec, repo, start_commit)? {
        super::log(format!(
            "{} moved during the run (now at {tip}); putting the agent's commits on top",
            spec.branch
        ));
        match rebase(repo, start_commit, &head, &tip) {
            Ok(rebased) => {
                head = rebased;
                notes.push(format!(
                    "{} moved during the run; the agent's work was rebased onto its new tip {tip}.",
                    spec.branch
                ));
            }
            Err(detail) => {
                moved = Some(PushError::Moved {
                    branch: spec.branch.clone(),
                    kept_at: side_branch(spec),
                    detail,
                })
            }
        }
    }
    let delivered = bundle(repo, start_commit, out, head, notes)?;
    match moved {
        Some(moved) => Err(moved),
        None => Ok(delivered),
    }
}

/// The tip of the task branch in the run spec's (local) repository, fetched into the
/// working copy, when it moved since the run started from `start_commit` (it exists, and
/// is another commit); `None` when it did not.
fn moved_tip(spec: &RunSpec, repo: &Path, start_commit: &str) -> Result<Option<String>, String> {
    // As in `prepare`: the repository belongs to another user, and upload-pack honours
    // `safe.directory` only from global configuration. Every process of the agent is
    // gone by now; the file is made new (never through a link) and removed after.
    let dir = repo.parent().unwrap_or(repo);
    let config = dir.join(format!(".safe-{}.gitconfig", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&config)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"[safe]\n\tdirectory = *\n"))
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let git = || {
        let mut cmd = git(Some(repo));
        cmd.env("GIT_CONFIG_GLOBAL", &config);
        cmd
    };
    let target = format!("refs/heads/{}", spec.branch);
    let moved = (|| {
        let listed = run(
            git()
                .args(["ls-remote", "--"])
                .arg(&spec.repository)
                .arg(&target),
            "git ls-remote",
        )?;
        let Some(tip) = listed
            .iter()
            .find_map(|l| l.strip_suffix(target.as_str()).map(str::trim))
        else {
            return Ok(None);
        };
        if tip == start_commit {
            return Ok(None);
        }
        run(
            git()
                .args(["fetch", "--quiet", "--no-tags", "--"])
                .arg(&spec.repository)
                .arg(format!("+{target}:{REMOTE_HEAD_REF}")),
            "git fetch",
        )?;
        output(repo, &["rev-parse", "--verify", "--quiet", REMOTE_HEAD_REF]).map(Some)
    })();
    let _ = std::fs::remove_file(&config);
    moved
}

/// Writes the bundle of `start_commit..head` to `out` (the bundle channel, or a file in a
/// directory).
fn bundle(
    repo: &Path,
    start_commit: &str,
    out: BundleOut,
    head: String,
    notes: Vec<String>,
) -> Result<Delivered, String> {
    let work = match out {
        BundleOut::Channel(file) => {
            let mut create = git(Some(repo));
            create.args(["bundle", "create", "--quiet", "-", "HEAD"]);
            if !start_commit.is_empty() {
                create.arg(format!("^{start_commit}"));
            }
            let out = create
                .stdin(std::process::Stdio::null())
                .stdout(file)
                .output()
                .map_err(|e| format!("git bundle create: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "git bundle create failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            return Ok(Delivered {
                commit: Some(head),
                notes,
            });
        }
        BundleOut::Dir(dir) => dir,
    };
    let bundle = work.join(BUNDLE_FILE);
    match std::fs::symlink_metadata(&bundle) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&bundle),
        Ok(_) => std::fs::remove_file(&bundle),
        Err(_) => Ok(()),
    }
    .map_err(|e| format!("cannot clear {}: {e}", bundle.display()))?;
    let mut create = git(Some(repo));
    create
        .args(["bundle", "create", "--quiet"])
        .arg(&bundle)
        .arg("HEAD");
    if !start_commit.is_empty() {
        create.arg(format!("^{start_commit}"));
    }
    run(&mut create, "git bundle create")?;
    Ok(Delivered {
        commit: Some(head),
        notes,
    })
}

/// Most bytes of the patch text a [`DIFF_EVENT`] carries: under the event bound
/// (`ao_shared::bounded::MAX_EVENT_DATA_BYTES`, 24 KiB) with room for the file list.
const MAX_PATCH_BYTES: usize = 16 * 1024;
/// Most files a [`DIFF_EVENT`] lists (fewer when their paths do not fit the bound).
const MAX_DIFF_FILES: usize = 300;
/// The longest path a [`DIFF_EVENT`] lists whole, in bytes; a longer one keeps its end
/// (where the file's name is), marked with `…`.
const MAX_LISTED_PATH_BYTES: usize = 120;
/// The runner's event with what a run changed: data `{from, to, files: [{path, added,
/// deleted}], files_total, patch, patch_bytes, truncated}`. `patch` is git's unified diff
/// of `from..to`, cut at a file boundary (`patch_bytes` is the whole size); `added` /
/// `deleted` are line counts, `null` for a binary file. The file list comes first: the
/// patch gives way to it, so every changed file is named (up to [`MAX_DIFF_FILES`],
/// `files_total` counting all), whatever the patch shows; the event always fits the
/// event bound.
pub const DIFF_EVENT: &str = "diff";
/// The runner's event with the task branch's change against its base: the data of a
/// [`DIFF_EVENT`], `from` the fork point of the branch and the base as cloned.
pub const BRANCH_DIFF_EVENT: &str = "branch_diff";

/// Where `head` forked from `base_tip` (their merge base), if they share history.
pub fn fork_point(repo: &Path, base_tip: &str, head: &str) -> Option<String> {
    output(repo, &["merge-base", base_tip, head])
        .ok()
        .filter(|fork| !fork.is_empty())
}

/// `path` as listed: whole, or its last [`MAX_LISTED_PATH_BYTES`] bytes after `…`.
fn listed_path(path: &str) -> String {
    if path.len() <= MAX_LISTED_PATH_BYTES {
        return path.to_string();
    }
    let mut start = path.len() - MAX_LISTED_PATH_BYTES;
    while !path.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &path[start..])
}

/// The [`DIFF_EVENT`] data for `from..to` in the working copy (`from` empty: everything
/// of `to`), or `None` when git cannot tell. External diff drivers and text conversion are
/// off: nothing the repository names runs.
pub fn diff_event(repo: &Path, from: &str, to: &str) -> Option<serde_json::Value> {
    let from = if from.is_empty() {
        output(repo, &["hash-object", "-t", "tree", "/dev/null"]).ok()?
    } else {
        from.to_string()
    };
    let range = [from.as_str(), to];
    let diff = |extra: &[&str]| {
        let mut args = vec![
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--no-renames",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&range);
        output(repo, &args)
    };
    let numstat = diff(&["--numstat"]).ok()?;
    let all: Vec<serde_json::Value> = numstat
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, '\t');
            let (added, deleted, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "path": listed_path(path),
                "added": added.parse::<u64>().ok(),
                "deleted": deleted.parse::<u64>().ok(),
            }))
        })
        .collect();
    let patch = diff(&[]).ok()?;
    let files_total = all.len();
    let mut listed = all.len().min(MAX_DIFF_FILES);
    let mut limit = MAX_PATCH_BYTES;
    // Escaping grows the text: the patch is halved until the event fits its bound whole,
    // then, with no patch left, the file list.
    loop {
        let (shown, truncated) = cut_patch(&patch, limit);
        let data = serde_json::json!({
            "from": from,
            "to": to,
            "files_total": files_total,
            "files": all[..listed],
            "patch": shown,
            "patch_bytes": patch.len(),
            "truncated": truncated,
        });
        let fits = serde_json::to_string(&data)
            .is_ok_and(|t| t.len() <= ao_shared::bounded::MAX_EVENT_DATA_BYTES);
        if fits {
            return Some(data);
        }
        if limit > 0 {
            limit /= 2;
        } else if listed > 0 {
            listed /= 2;
        } else {
            return None;
        }
    }
}

/// `patch` cut to at most `limit` bytes at the start of a file's diff (or, when the
/// first file alone is larger, at a line end); whether anything was cut.
fn cut_patch(patch: &str, limit: usize) -> (&str, bool) {
    if patch.len() <= limit {
        return (patch, false);
    }
    let mut end = limit;
    while !patch.is_char_boundary(end) {
        end -= 1;
    }
    let head = &patch[..end];
    let cut = head
        .rfind("\ndiff --git ")
        .filter(|&at| at > 0)
        .or_else(|| head.rfind('\n'))
        .unwrap_or(0);
    (&patch[..cut], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_is_cut_at_a_file_boundary() {
        let patch = "diff --git a/x b/x\n+1\n+2\ndiff --git a/y b/y\n+3\n";
        assert_eq!(cut_patch(patch, 100), (patch, false));
        assert_eq!(cut_patch(patch, 30), ("diff --git a/x b/x\n+1\n+2", true));
        assert_eq!(cut_patch(patch, 22), ("diff --git a/x b/x\n+1", true));
        let wide = "diff --git a/é b/é\n+ééééé\n";
        let (cut, truncated) = cut_patch(wide, 24);
        assert!(truncated && wide.starts_with(cut));
    }

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn a_push_answer_is_read_from_the_porcelain_lines() {
        let ok = lines(&[
            "To /r.git",
            "*\tabc:refs/heads/agent/x\t[new branch]",
            "Done",
        ]);
        assert_eq!(read_push_answer(&ok, ""), PushAnswer::Accepted);
        for reason in ["fetch first", "non-fast-forward", "stale info"] {
            let moved = lines(&[&format!("!\tabc:refs/heads/agent/x\t[rejected] ({reason})")]);
            assert_eq!(read_push_answer(&moved, ""), PushAnswer::NotFastForward);
        }
        // GitHub's answer to a file over its size limit: a pre-receive hook declining,
        // its reasons after `remote:`.
        let big =
            lines(&["!\tabc:refs/heads/agent/x\t[remote rejected] (pre-receive hook declined)"]);
        let said = "remote: error: GH001: Large files detected.\n\
                    remote: error: File big.bin is 120.00 MB; this exceeds GitHub's file size limit of 100.00 MB\n\
                    remote: ----\nTo https://github.com/o/r.git";
        match read_push_answer(&big, said) {
            PushAnswer::Refused { cause, reason } => {
                assert_eq!(cause, FailureCause::PushRefused);
                assert!(reason.contains("pre-receive hook declined"), "{reason}");
                assert!(
                    reason.contains("exceeds GitHub's file size limit"),
                    "{reason}"
                );
                assert!(!reason.contains("----"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let workflows = lines(&["!\tabc:refs/heads/agent/x\t[remote rejected] (refusing to allow a GitHub App to create or update workflow `.github/workflows/ci.yml` without `workflows` permission)"]);
        assert!(matches!(
            read_push_answer(&workflows, ""),
            PushAnswer::Refused {
                cause: FailureCause::WorkflowsPermission,
                ..
            }
        ));
        // What another try may not meet, and no answer at all, are not refusals.
        let locked = lines(&["!\tabc:refs/heads/agent/x\t[remote rejected] (failed to lock)"]);
        assert_eq!(read_push_answer(&locked, ""), PushAnswer::Other);
        assert_eq!(
            read_push_answer(
                &[],
                "fatal: unable to access 'https://x/': Could not resolve host"
            ),
            PushAnswer::Other
        );
        // A `remote:` line cannot pass for a status line.
        let forged =
            lines(&["remote: !\tx:refs/heads/y\t[remote rejected] (pre-receive hook declined)"]);
        assert_eq!(read_push_answer(&forged, ""), PushAnswer::Other);
    }

    #[test]
    fn left_out_files_are_named_with_their_sizes() {
        let none = Committed::default();
        assert_eq!(none.note(100), None);
        let some = Committed {
            head: None,
            left_out: (0..25).map(|i| (format!("f{i}"), 200 + i)).collect(),
        };
        let note = some.note(100).unwrap();
        assert!(
            note.contains("100-byte file limit (agent.max_file_bytes)"),
            "{note}"
        );
        assert!(
            note.contains("f0 (200 bytes)") && note.ends_with("and 5 more."),
            "{note}"
        );
    }
}
