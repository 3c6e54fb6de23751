//! Running the configured agent command in the working copy: the prompt is its last
//! argument (and `AO_PROMPT`); its output lines are forwarded as events; its exit status
//! decides the outcome; the last lines of its output are the summary.

use super::process::run_logged;
use crate::spec::RunSpec;
use ao_shared::task::{Outcome, OutcomeKind};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Lines of agent output kept as the summary.
const SUMMARY_LINES: usize = 20;

pub fn run(spec: &RunSpec, repo: &Path) -> Outcome {
    let prompt = spec.full_prompt();
    let mut cmd = Command::new(&spec.agent.command);
    cmd.args(&spec.agent.args)
        .arg(&prompt)
        .current_dir(repo)
        .env("AO_PROMPT", &prompt)
        .env("AO_CAPABILITY", spec.capability.as_str())
        .env("AO_TASK_ID", spec.task_id.to_string())
        .env("AO_SUBTASK_ID", spec.subtask_id.to_string())
        .env("AO_ATTEMPT", spec.attempt.to_string())
        .env("AO_BRANCH", &spec.branch);
    let timeout = Duration::from_secs(spec.agent.timeout_secs.max(1));
    match run_logged(&mut cmd, timeout) {
        Ok(done) => {
            let summary: Vec<&str> = done
                .lines
                .iter()
                .map(String::as_str)
                .filter(|l| !l.trim().is_empty())
                .collect();
            let summary = summary[summary.len().saturating_sub(SUMMARY_LINES)..].join("\n");
            if done.success {
                Outcome::succeeded(summary, None)
            } else {
                Outcome::failed(
                    OutcomeKind::AgentError,
                    format!(
                        "agent {} failed ({}): {}",
                        spec.agent.command,
                        done.status,
                        done.tail()
                    ),
                    false,
                )
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::failed(
            OutcomeKind::Infrastructure,
            format!(
                "agent command {:?} not found (agent.command)",
                spec.agent.command
            ),
            false,
        ),
        Err(e) if e.to_string().contains("timed out") => {
            Outcome::failed(OutcomeKind::Timeout, format!("agent {e}"), false)
        }
        Err(e) => Outcome::failed(OutcomeKind::Infrastructure, format!("agent: {e}"), true),
    }
}
