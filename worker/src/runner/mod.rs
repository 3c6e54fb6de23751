//! The in-sandbox runner (`worker runner --spec F --result-fd N`): makes a fresh working
//! copy of the repository on the task branch, keeps its pristine git configuration, runs
//! `agent-setup.sh` if the repository has one (with no secret in its environment), runs
//! the agent with the prompt, commits what changed and pushes it (or, for a local
//! repository, leaves it as a bundle the worker pushes), then writes the outcome as JSON
//! to its result channel. Progress goes to standard output as JSON lines (one
//! [`RunnerEvent`] each), which the worker forwards live. Every byte it emits (events,
//! outcome, commit message) has the run's secret values redacted.

mod agent;
pub(crate) mod git;
mod integrate;
mod process;
pub mod relay;
mod setup;
mod warm_clone;

use crate::redact::Redactor;
use crate::spec::{Delivery, RunSpec, RunnerEvent};
use ao_shared::task::{FailureCause, Outcome, OutcomeKind};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the run spec comes from.
#[derive(Debug)]
pub enum SpecSource {
    /// A file the worker wrote (the local drivers).
    File(PathBuf),
    /// The worker's hand-over, claimed with the sandbox's Nomad workload identity (the
    /// nomad driver, see `sandbox/nomad/handover.rs`); it brings the secrets too.
    Handover,
}

/// Where the outcome goes.
#[derive(Debug)]
pub enum ResultSink {
    /// A file (the nomad driver reads it from the allocation).
    File(PathBuf),
    /// A file descriptor inherited from the worker: the write end of the local drivers'
    /// result channel.
    Fd(i32),
}

/// The opened result channel.
enum OpenSink {
    File(PathBuf),
    Channel(std::fs::File),
}

impl ResultSink {
    /// Takes the inherited descriptor out of reach of every program the runner starts:
    /// it is reopened close-on-exec and the inherited one is closed. Done before
    /// anything else runs.
    fn open(self) -> Result<OpenSink, String> {
        match self {
            ResultSink::File(path) => Ok(OpenSink::File(path)),
            ResultSink::Fd(fd) => take_inherited(fd, "result channel").map(OpenSink::Channel),
        }
    }
}

/// Reopens the inherited descriptor `fd` close-on-exec and closes `fd`, so that no
/// program the runner starts holds it.
fn take_inherited(fd: i32, what: &str) -> Result<std::fs::File, String> {
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{fd}"));
    // Closed whether or not it could be reopened: it must not reach a child.
    let _ = nix::unistd::close(fd);
    opened.map_err(|e| format!("cannot open the {what} (fd {fd}): {e}"))
}

impl OpenSink {
    fn write(self, text: &str) -> Result<(), String> {
        match self {
            OpenSink::Channel(mut file) => file
                .write_all(text.as_bytes())
                .map_err(|e| format!("cannot write the result: {e}")),
            OpenSink::File(path) => {
                // Written whole and renamed, so a reader never sees half a result.
                let tmp = path.with_extension("partial");
                std::fs::write(&tmp, text)
                    .and_then(|_| std::fs::rename(&tmp, &path))
                    .map_err(|e| format!("cannot write result {}: {e}", path.display()))
            }
        }
    }
}

/// The redactor of the runner's secret variables (named in `AO_SECRET_NAMES`), as they
/// are now: a git token replaced for the push (see `push_permit.rs`) is covered too.
fn redactor() -> Redactor {
    let values: Vec<String> = agent::secret_names()
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .collect();
    Redactor::new(values.iter().map(String::as_str))
}

/// `text` with the run's secret values replaced.
pub fn redact(text: &str) -> String {
    redactor().text(text)
}

/// Prints one event line on standard output, with any secret value of the runner's
/// environment replaced.
pub fn emit(kind: &str, data: serde_json::Value) {
    let line = serde_json::to_string(&RunnerEvent {
        kind: kind.into(),
        data: ao_shared::bounded::bound_event_data(data),
    })
    .unwrap_or_default();
    let line = redact(&line);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn log(message: impl Into<String>) {
    emit("log", serde_json::json!({ "message": message.into() }));
}

/// The run spec from its source. A hand-over's secrets are put into the runner's own
/// environment (with their names in `AO_SECRET_NAMES`), where the local drivers put them,
/// before any other thread or program exists and before anything is printed.
fn load_spec(source: &SpecSource) -> Result<RunSpec, String> {
    match source {
        SpecSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<RunSpec>(&t).map_err(|e| e.to_string()))
            .map_err(|e| format!("cannot read run spec {}: {e}", path.display())),
        SpecSource::Handover => {
            let handed = crate::sandbox::nomad::handover::fetch()?;
            let mut names: Vec<&str> = handed.env.keys().map(String::as_str).collect();
            for (name, value) in &handed.env {
                std::env::set_var(name, value);
            }
            // The attempt's proxy: the way out for the runner's git and the agent, and the
            // agent's model endpoint, with the proxy token as its key (a secret of the
            // run, redacted as one; the model key itself never comes here).
            if let Some(proxy) = &handed.proxy {
                let env = crate::sandbox::network::client_env(
                    &proxy.with_credentials(),
                    &proxy.url,
                    &proxy.token,
                );
                for (name, value) in env {
                    std::env::set_var(name, value);
                }
                names.push(crate::sandbox::network::MODEL_KEY_ENV);
            }
            names.sort_unstable();
            names.dedup();
            std::env::set_var(crate::spec::SECRET_NAMES_VAR, names.join(","));
            Ok(handed.spec)
        }
    }
}

/// Reads the spec, runs the attempt, writes the result. Returns the process exit code.
/// `bundle_fd`: the inherited descriptor a bundle delivery goes to (else a file beside
/// the spec); `setup_fd`: the one a setup result for the cache goes to (else a file in
/// the spec's store directory).
pub fn main(
    source: SpecSource,
    sink: ResultSink,
    work_dir: Option<PathBuf>,
    bundle_fd: Option<i32>,
    setup_fd: Option<i32>,
) -> i32 {
    let started = Instant::now();
    let sink = match sink.open() {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "runner: {e}");
            return 2;
        }
    };
    let mut inherited = Vec::new();
    for (fd, what) in [(bundle_fd, "bundle channel"), (setup_fd, "setup channel")] {
        match fd.map(|fd| take_inherited(fd, what)).transpose() {
            Ok(file) => inherited.push(file),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "runner: {e}");
                return 2;
            }
        }
    }
    let setup_out = inherited.pop().flatten();
    let bundle_out = inherited.pop().flatten();
    // The agent runs as the same user: without this it could read the runner's secrets
    // (a git token) from /proc/<runner>/environ, or attach to it.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        let _ = writeln!(
            std::io::stderr(),
            "runner: cannot make itself non-dumpable: {e}"
        );
    }
    process::exit_with_parent();
    process::become_subreaper();
    // Before the relay's threads: a hand-over sets the runner's environment.
    let loaded = load_spec(&source);
    relay::start_from_env();
    let spec_path = match &source {
        SpecSource::File(path) => path.clone(),
        // No spec file: the attempt directory is the working copy's.
        SpecSource::Handover => work_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .join("spec.json"),
    };
    let outcome = match loaded {
        Ok(spec) => {
            // The spec's directory is the attempt directory the worker sees; the working
            // copy may live elsewhere (the bwrap driver's size-limited tmpfs, which only the
            // sandbox sees), so what the worker reads back (the bundle) goes beside the spec.
            let attempt_dir = spec_path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(std::env::temp_dir);
            let work = work_dir.unwrap_or_else(|| attempt_dir.clone());
            let bundle = match bundle_out {
                Some(file) => git::BundleOut::Channel(file),
                None => git::BundleOut::Dir(attempt_dir),
            };
            run(&spec, &work, bundle, setup_out)
        }
        // An unreadable spec file will not get better; a failed hand-over (the worker
        // gone, the attempt ended) may on another attempt.
        Err(e) => Outcome::failed(
            OutcomeKind::Infrastructure,
            e,
            matches!(source, SpecSource::Handover),
        ),
    };
    let mut outcome = outcome.bounded();
    outcome.duration_ms = started.elapsed().as_millis() as u64;
    redactor().outcome(&mut outcome);
    let text = match serde_json::to_string(&outcome) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cannot encode outcome: {e}");
            return 2;
        }
    };
    if let Err(e) = sink.write(&text) {
        let _ = writeln!(std::io::stderr(), "runner: {e}");
        return 2;
    }
    0
}

/// Runs one attempt in `work` and says how it ended; a bundle delivery goes to `bundle`,
/// a setup result for the cache to `setup_out` (else into the spec's store directory).
pub fn run(
    spec: &RunSpec,
    work: &Path,
    bundle: git::BundleOut,
    setup_out: Option<std::fs::File>,
) -> Outcome {
    let repo = work.join("repo");
    if repo.exists() {
        let _ = std::fs::remove_dir_all(&repo);
    }
    log(format!(
        "cloning {} (branch {})",
        spec.repository, spec.branch
    ));
    let cloning = Instant::now();
    let prepared = match git::prepare(spec, &repo) {
        Ok(p) => {
            log(format!(
                "working copy ready in {} ms ({})",
                cloning.elapsed().as_millis(),
                if p.from_mirror {
                    "from the worker's mirror"
                } else {
                    "full clone"
                }
            ));
            p
        }
        Err(git::PrepareError::Transient(e)) => {
            return Outcome::failed(OutcomeKind::Infrastructure, e, true)
        }
        // The same clone fails the same way every time: the agent is not run.
        Err(git::PrepareError::Unclonable(e)) => {
            return Outcome::failed(OutcomeKind::AgentError, e, false)
                .with_cause(FailureCause::Unclonable)
        }
    };
    let start_commit = prepared.start_commit;
    if prepared.empty_repository {
        log(format!(
            "{} is empty (no commit yet): the run's commit will be its first, on {}",
            spec.repository, spec.branch
        ));
    }
    // Taken from the fresh clone, before anything of the repository runs.
    let pristine = match git::Pristine::capture(&repo) {
        Ok(p) => p,
        Err(e) => return Outcome::failed(OutcomeKind::Infrastructure, e, true),
    };
    // The repository's setup (or its cached result), with no secret of the run.
    if let Err(failed) = setup::run(spec, &repo, setup_out) {
        return *failed;
    }
    let mut outcome = if matches!(spec.step, Some(ao_shared::task::Step::Integrate { .. })) {
        log("merging the step branches into the task branch");
        integrate::run(spec, &repo)
    } else {
        log(format!("running the {} agent", spec.capability));
        let mut outcome = agent::run(spec, &repo);
        if matches!(
            spec.capability,
            ao_shared::Capability::Planner
                | ao_shared::Capability::Tester
                | ao_shared::Capability::Reviewer
        ) && outcome.kind == OutcomeKind::Succeeded
        {
            // The plan, or a checker's verdict, goes to the coordinator structured; it
            // checks it.
            outcome.structured = ao_shared::plan::extract_json(&outcome.summary).map(Box::new);
        }
        outcome
    };
    // Whatever the agent left behind stops before the runner commits and pushes, and
    // its changes to the git configuration are undone.
    process::kill_strays();
    if let Err(e) = pristine.restore(&repo) {
        return Outcome::failed(OutcomeKind::AgentError, e, false);
    }
    if outcome.kind != OutcomeKind::Succeeded {
        return outcome;
    }
    if !spec.capability.pushes_code() {
        log(format!(
            "{} does not push; changes, if any, are discarded",
            spec.capability
        ));
        return outcome;
    }
    // Fenced: only with the worker's word that this run still holds the subtask (for a
    // bundle too: the worker delivers it right after the run).
    if let Err(reason) = crate::push_permit::ask() {
        log(format!("not pushing: {reason}"));
        let mut refused = Outcome::failed(
            OutcomeKind::Infrastructure,
            format!("not pushed: {reason}"),
            true,
        );
        refused.cost_usd = outcome.cost_usd;
        refused.tokens = outcome.tokens;
        refused.turns = outcome.turns;
        return refused;
    }
    let delivered = match spec.delivery {
        Delivery::Push => git::commit_and_push(spec, &repo, &start_commit, &outcome.summary),
        Delivery::Bundle => {
            git::commit_and_bundle(spec, &repo, &start_commit, &outcome.summary, bundle)
        }
    };
    match delivered {
        Ok(delivered) => {
            let mut notes = delivered.notes;
            match &delivered.commit {
                Some(commit) => {
                    match spec.delivery {
                        Delivery::Push => log(format!("pushed {commit} to {}", spec.branch)),
                        Delivery::Bundle => log(format!("bundled {commit} for {}", spec.branch)),
                    }
                    if prepared.empty_repository {
                        notes.push(format!(
                            "The repository was empty: this is its first commit, on {}. \
                             There is no base branch to open a pull request against; \
                             the work is on {} as it is.",
                            spec.branch, spec.branch
                        ));
                    }
                }
                None => log("the agent changed nothing; nothing to push"),
            }
            if let Some(commit) = &delivered.commit {
                // Bundled work is rebased (if at all) before this; pushed work may have
                // been rebased onto a moved branch: either way `commit` is what the
                // branch holds, and the diff is of the run's own change.
                if let Some(diff) = git::diff_event(&repo, &start_commit, commit) {
                    emit(git::DIFF_EVENT, diff);
                }
                let fork = prepared
                    .base_tip
                    .as_deref()
                    .and_then(|base| git::fork_point(&repo, base, commit));
                if let Some(diff) = fork.and_then(|f| git::diff_event(&repo, &f, commit)) {
                    emit(git::BRANCH_DIFF_EVENT, diff);
                }
            }
            outcome.first_commit = prepared.empty_repository && delivered.commit.is_some();
            outcome.commit = delivered.commit;
            if !notes.is_empty() {
                let said = outcome.summary.trim_end().to_string();
                outcome.summary = if said.is_empty() {
                    notes.join("\n\n")
                } else {
                    format!("{said}\n\n{}", notes.join("\n\n"))
                };
            }
            outcome
        }
        Err(e) => {
            let mut failed = match e {
                // The git host's refusal, or a branch that moved under a conflicting
                // change: the same push fails the same way; the agent is not run again.
                git::PushError::Refused { cause, reason } => {
                    Outcome::failed(OutcomeKind::AgentError, reason, false).with_cause(cause)
                }
                moved @ git::PushError::Moved { .. } => {
                    Outcome::failed(OutcomeKind::AgentError, moved.to_string(), false)
                        .with_cause(FailureCause::BranchMoved)
                }
                git::PushError::Failed(e) => Outcome::failed(OutcomeKind::Infrastructure, e, true),
            };
            failed.cost_usd = outcome.cost_usd;
            failed.tokens = outcome.tokens;
            failed.turns = outcome.turns;
            failed
        }
    }
}
