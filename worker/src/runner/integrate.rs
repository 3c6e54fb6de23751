//! The merge of a plan's step branches into the task branch (a [`Step::Integrate`]
//! subtask): each branch in the given order, fetched by `git::prepare`, is merged with a
//! merge commit that names the attempt (so that a repeated run is recognised before it
//! pushes again). A clean merge needs no agent. A conflict is given to the coder agent
//! with both sides in front of it (the conflicted files with their markers, and each
//! side's diff against the merge base); the runner commits the merge only when no
//! conflict marker is left, so no step's work is dropped silently: the run fails instead.

use super::git::{attempt_line, git};
use crate::spec::RunSpec;
use ao_shared::task::{Outcome, OutcomeKind, Step};
use std::path::Path;

/// Bytes of each side's diff shown to the agent at most.
const DIFF_EXCERPT_BYTES: usize = 6 * 1024;

/// Merges the step branches of `spec` (an integration) into the checked-out task
/// branch, running the agent on conflicts. The outcome carries what the agent spent.
pub fn run(spec: &RunSpec, repo: &Path) -> Outcome {
    let Some(Step::Integrate { branches }) = &spec.step else {
        return Outcome::failed(OutcomeKind::Infrastructure, "not a merge", false);
    };
    let mut merged = Vec::new();
    let mut resolved = Vec::new();
    let mut spent = Outcome::succeeded(String::new(), None);
    for branch in branches {
        let theirs = format!("origin/{branch}");
        if git_ok(repo, &["rev-parse", "--verify", "--quiet", &theirs]).is_err() {
            // The step changed nothing, so it never pushed its branch.
            super::log(format!("{branch} does not exist: its step changed nothing"));
            continue;
        }
        let message = format!(
            "Merge step branch {branch}\n\nTask: {}\n{}\n",
            spec.task_id,
            attempt_line(spec)
        );
        super::log(format!("merging {branch}"));
        if git_ok(
            repo,
            &["merge", "--no-ff", "--no-edit", "-m", &message, &theirs],
        )
        .is_ok()
        {
            merged.push(branch.clone());
            continue;
        }
        let conflicted = match git_ok(repo, &["diff", "--name-only", "--diff-filter=U"]) {
            Ok(files) if !files.trim().is_empty() => files,
            Ok(_) | Err(_) => {
                return Outcome::failed(
                    OutcomeKind::AgentError,
                    format!("cannot merge {branch}, and git names no conflicted file"),
                    false,
                )
            }
        };
        super::log(format!(
            "merging {branch} conflicts in: {}; the agent resolves it",
            conflicted.lines().collect::<Vec<_>>().join(", ")
        ));
        let ours = git_ok(repo, &["diff", "--stat", "-p", "MERGE_HEAD...HEAD"]).unwrap_or_default();
        let their_diff =
            git_ok(repo, &["diff", "--stat", "-p", "HEAD...MERGE_HEAD"]).unwrap_or_default();
        let mut asked = spec.clone();
        asked.instructions = Some(conflict_prompt(
            spec,
            branch,
            &conflicted,
            &ours,
            &their_diff,
        ));
        let outcome = super::agent::run(&asked, repo);
        super::process::kill_strays();
        add_spent(&mut spent, &outcome);
        if outcome.kind != OutcomeKind::Succeeded {
            return with_spent(outcome, &spent);
        }
        let left: Vec<&str> = conflicted
            .lines()
            .filter(|f| {
                std::fs::read(repo.join(f)).is_ok_and(|bytes| {
                    bytes
                        .split(|b| *b == b'\n')
                        .any(|l| l.starts_with(b"<<<<<<< ") || l.starts_with(b">>>>>>> "))
                })
            })
            .collect();
        if !left.is_empty() {
            let failed = Outcome::failed(
                OutcomeKind::AgentError,
                format!(
                    "the merge of {branch} still has conflict markers in {}; nothing is pushed",
                    left.join(", ")
                ),
                false,
            );
            return with_spent(failed, &spent);
        }
        if let Err(e) = git_ok(repo, &["add", "--all"])
            .and_then(|_| git_ok(repo, &["commit", "--quiet", "--no-verify", "-m", &message]))
        {
            return with_spent(Outcome::failed(OutcomeKind::AgentError, e, false), &spent);
        }
        merged.push(branch.clone());
        resolved.push(format!("{branch} ({})", outcome.summary.trim()));
    }
    let mut summary = if merged.is_empty() {
        "no step branch to merge".to_string()
    } else {
        format!("merged {}", merged.join(", "))
    };
    if !resolved.is_empty() {
        summary.push_str(&format!("; conflicts resolved: {}", resolved.join("; ")));
    }
    let mut done = Outcome::succeeded(summary, None);
    add_spent(&mut done, &spent);
    done
}

/// What the agent is told about one conflicted merge.
fn conflict_prompt(
    spec: &RunSpec,
    branch: &str,
    conflicted: &str,
    ours: &str,
    theirs: &str,
) -> String {
    use ao_shared::bounded::truncate_bytes;
    format!(
        "{}\n\n## Merge conflict to resolve\n\nThe step branch `{branch}` is being merged \
         into the task branch `{}`, and these files conflict:\n{}\n\nThe files hold both \
         sides between conflict markers. Resolve every conflict so that the work of BOTH \
         sides is kept (never drop either side's change), remove every marker, and make \
         sure the result builds. Do not run `git commit`, `git merge` or `git push`: the \
         pipeline commits the merge.\n\n### The task branch's side (its changes since the \
         merge base)\n```diff\n{}\n```\n\n### The step branch's side\n```diff\n{}\n```\n",
        spec.instructions.as_deref().unwrap_or(""),
        spec.branch,
        conflicted
            .lines()
            .map(|f| format!("- {f}"))
            .collect::<Vec<_>>()
            .join("\n"),
        truncate_bytes(ours, DIFF_EXCERPT_BYTES),
        truncate_bytes(theirs, DIFF_EXCERPT_BYTES),
    )
}

fn add_spent(to: &mut Outcome, from: &Outcome) {
    to.cost_usd += from.cost_usd;
    to.tokens.add(&from.tokens);
    to.turns = match (to.turns, from.turns) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    };
}

fn with_spent(mut outcome: Outcome, spent: &Outcome) -> Outcome {
    outcome.cost_usd = spent.cost_usd;
    outcome.tokens = spent.tokens;
    outcome.turns = spent.turns;
    outcome
}

/// Runs the runner's git in `repo` (local operations only: no network, no prompt); its
/// standard output, or why it failed.
fn git_ok(repo: &Path, args: &[&str]) -> Result<String, String> {
    let out = git(Some(repo))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("git {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "git {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
