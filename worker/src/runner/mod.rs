//! The in-sandbox runner (`worker runner --spec F --result F`): makes a fresh working
//! copy of the repository on the task branch, runs `agent-setup.sh` if the repository
//! has one, runs the agent with the prompt, commits what changed and pushes, then writes
//! the outcome as JSON to the result file. Progress goes to standard output as JSON
//! lines (one [`RunnerEvent`] each), which the worker forwards live.

mod agent;
pub(crate) mod git;
mod process;
mod setup;
mod warm_clone;

use crate::spec::{RunSpec, RunnerEvent};
use ao_shared::task::{Outcome, OutcomeKind};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Secrets shorter than this are not searched for (they would match ordinary text).
const MIN_REDACTED_LEN: usize = 8;

/// The values of the runner's secret variables, as they may appear in an event line.
fn secret_values() -> &'static [String] {
    static VALUES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    VALUES.get_or_init(|| {
        let mut values = Vec::new();
        for name in agent::secret_names() {
            if let Ok(v) = std::env::var(&name) {
                if v.len() >= MIN_REDACTED_LEN {
                    // Also as it reads inside a JSON string.
                    let escaped = serde_json::to_string(&v).unwrap_or_default();
                    values.push(escaped.trim_matches('"').to_string());
                    values.push(v);
                }
            }
        }
        values
    })
}

/// Prints one event line on standard output, with any secret value of the runner's
/// environment replaced.
pub fn emit(kind: &str, data: serde_json::Value) {
    let mut line = serde_json::to_string(&RunnerEvent {
        kind: kind.into(),
        data,
    })
    .unwrap_or_default();
    for secret in secret_values() {
        if line.contains(secret.as_str()) {
            line = line.replace(secret.as_str(), "[redacted]");
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn log(message: impl Into<String>) {
    emit("log", serde_json::json!({ "message": message.into() }));
}

/// Reads the spec, runs the attempt, writes the result. Returns the process exit code.
pub fn main(spec_path: &Path, result_path: &Path, work_dir: Option<PathBuf>) -> i32 {
    let started = Instant::now();
    // The agent runs as the same user: without this it could read the runner's secrets
    // (a git token) from /proc/<runner>/environ, or attach to it.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        let _ = writeln!(
            std::io::stderr(),
            "runner: cannot make itself non-dumpable: {e}"
        );
    }
    process::exit_with_parent();
    let outcome = match std::fs::read_to_string(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<RunSpec>(&t).map_err(|e| e.to_string()))
    {
        Ok(spec) => {
            let work = work_dir.unwrap_or_else(|| {
                spec_path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(std::env::temp_dir)
            });
            run(&spec, &work)
        }
        Err(e) => Outcome::failed(
            OutcomeKind::Infrastructure,
            format!("cannot read run spec {}: {e}", spec_path.display()),
            false,
        ),
    };
    let mut outcome = outcome;
    outcome.duration_ms = started.elapsed().as_millis() as u64;
    let text = match serde_json::to_string(&outcome) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cannot encode outcome: {e}");
            return 2;
        }
    };
    // Written whole and renamed, so a reader never sees half a result.
    let tmp = result_path.with_extension("partial");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, result_path)) {
        let _ = writeln!(
            std::io::stderr(),
            "cannot write result {}: {e}",
            result_path.display()
        );
        return 2;
    }
    0
}

/// Runs one attempt in `work` and says how it ended.
pub fn run(spec: &RunSpec, work: &Path) -> Outcome {
    let repo = work.join("repo");
    if repo.exists() {
        let _ = std::fs::remove_dir_all(&repo);
    }
    log(format!(
        "cloning {} (branch {})",
        spec.repository, spec.branch
    ));
    let start_commit = match git::prepare(spec, &repo) {
        Ok(c) => c,
        Err(e) => return Outcome::failed(OutcomeKind::Infrastructure, e, true),
    };
    if let Err(failed) = setup::run(spec, &repo) {
        return *failed;
    }
    let pristine = match git::Pristine::capture(&repo) {
        Ok(p) => p,
        Err(e) => return Outcome::failed(OutcomeKind::Infrastructure, e, true),
    };
    log(format!("running the {} agent", spec.capability));
    let mut outcome = agent::run(spec, &repo);
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
    match git::commit_and_push(spec, &repo, &start_commit, &outcome.summary) {
        Ok(Some(commit)) => {
            log(format!("pushed {commit} to {}", spec.branch));
            outcome.commit = Some(commit);
            outcome
        }
        Ok(None) => {
            log("the agent changed nothing; nothing to push");
            outcome
        }
        Err(e) => {
            let mut failed = Outcome::failed(OutcomeKind::Infrastructure, e, true);
            failed.cost_usd = outcome.cost_usd;
            failed.tokens = outcome.tokens;
            failed.turns = outcome.turns;
            failed
        }
    }
}
