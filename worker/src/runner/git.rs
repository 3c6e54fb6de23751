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

/// Clones the repository into `repo` and checks out the task branch: the existing remote
/// branch when there is one, else a new branch from the base (or the default branch).
/// Returns the commit work starts from ("" for an empty repository).
pub fn prepare(spec: &RunSpec, repo: &Path) -> Result<String, String> {
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

fn prepare_with(spec: &RunSpec, repo: &Path, config: &Path) -> Result<String, String> {
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
    // A warm start borrows the worker's mirror (see `warm.rs`); a cold one, or one whose
    // mirror fails, clones in full.
    if !spec
        .warm
        .mirror
        .as_deref()
        .is_some_and(|m| super::warm_clone::from_mirror(spec, m, repo, config))
    {
        let mut clone = git(None);
        clone.args(["clone", "--no-tags", "--quiet"]);
        if let Some(base) = &spec.base_branch {
            clone.args(["--branch", base]);
        }
        clone.arg("--").arg(&spec.repository).arg(repo);
        run(&mut clone, "git clone")?;
    }
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
    // The step branches a merge takes in.
    if let Some(ao_shared::task::Step::Integrate { branches }) = &spec.step {
        for b in branches {
            fetch(b)?;
        }
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

/// Commits what the agent changed (if it did not commit itself). Returns the new head,
/// or `None` when there is nothing new. The message's summary (the agent's words) has
/// the run's secrets redacted.
fn commit(
    spec: &RunSpec,
    repo: &Path,
    start_commit: &str,
    summary: &str,
) -> Result<Option<String>, String> {
    run(git(Some(repo)).args(["add", "--all"]), "git add")?;
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
        message.push_str(&format!("Task: {}\n{}\n", spec.task_id, attempt_line(spec)));
        let message = super::redact(&message);
        run(
            git(Some(repo)).args(["commit", "--quiet", "--no-verify", "-m", &message]),
            "git commit",
        )?;
    }
    let head = output(repo, &["rev-parse", "--verify", "--quiet", "HEAD"]).unwrap_or_default();
    if head.is_empty() || head == start_commit {
        return Ok(None);
    }
    Ok(Some(head))
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

/// Commits what the agent changed (if it did not commit itself) and pushes the branch to
/// the run spec's repository URL. Returns the pushed commit, or `None` when there is
/// nothing new. When the remote branch already holds this attempt's commit (pushed by an
/// earlier run of the same attempt), returns that commit and neither commits nor pushes.
pub fn commit_and_push(
    spec: &RunSpec,
    repo: &Path,
    start_commit: &str,
    summary: &str,
) -> Result<Option<String>, String> {
    if let Some(earlier) = pushed_before(spec, repo)? {
        super::log(format!(
            "{} already holds {earlier} of this attempt (an earlier run pushed it); \
             reporting it instead of pushing again",
            spec.branch
        ));
        return Ok(Some(earlier));
    }
    let Some(head) = commit(spec, repo, start_commit, summary)? else {
        return Ok(None);
    };
    let refspec = format!("{head}:refs/heads/{}", spec.branch);
    run(
        git(Some(repo))
            .args(["push", "--quiet", "--no-verify", "--"])
            .arg(&spec.repository)
            .arg(&refspec),
        "git push",
    )?;
    Ok(Some(head))
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
) -> Result<Option<String>, String> {
    let Some(head) = commit(spec, repo, start_commit, summary)? else {
        return Ok(None);
    };
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
            return Ok(Some(head));
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
    Ok(Some(head))
}
