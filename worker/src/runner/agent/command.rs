//! The `command` agent: any program, with the prompt as its last argument (and in
//! `AO_PROMPT`); its output lines are forwarded as log events, its exit status decides
//! the outcome, and its last lines are the summary.

use super::super::process::{run_streaming, Control, RunError};
use crate::spec::RunSpec;
use ao_shared::bounded::{truncate_bytes, MAX_AGENT_TEXT_BYTES};
use ao_shared::task::{Outcome, OutcomeKind};
use std::path::Path;

/// Lines of agent output kept as the summary.
const SUMMARY_LINES: usize = 20;

pub fn run(spec: &RunSpec, repo: &Path) -> Outcome {
    let prompt = spec.full_prompt();
    let mut cmd = super::base_command(spec, repo);
    cmd.args(&spec.agent.args)
        .arg(&prompt)
        .env("AO_PROMPT", &prompt);
    let result = run_streaming(&mut cmd, &super::limits(spec, None), &mut |line| {
        super::super::emit(
            "log",
            serde_json::json!({ "message": truncate_bytes(line, MAX_AGENT_TEXT_BYTES) }),
        );
        Control::Continue
    });
    match result {
        Ok(done) => {
            let summary: Vec<&str> = done
                .lines
                .iter()
                .map(String::as_str)
                .filter(|l| !l.trim().is_empty())
                .collect();
            let summary = summary[summary.len().saturating_sub(SUMMARY_LINES)..].join("\n");
            let summary = truncate_bytes(&summary, MAX_AGENT_TEXT_BYTES);
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
        Err(e) => failure(spec, e),
    }
}

/// The outcome of an agent that did not end by itself.
pub fn failure(spec: &RunSpec, e: RunError) -> Outcome {
    match e {
        RunError::Spawn(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::failed(
            OutcomeKind::Infrastructure,
            format!(
                "agent command {:?} not found (agent.command)",
                spec.agent.command
            ),
            false,
        ),
        e @ RunError::Timeout(_) => {
            Outcome::failed(OutcomeKind::Timeout, format!("agent {e}"), false)
        }
        // A hang is most often the model service's; another attempt may well succeed.
        e @ RunError::Idle(_) => Outcome::failed(
            OutcomeKind::Stalled,
            format!("agent stalled: {e} (idle timeout)"),
            true,
        ),
        RunError::Stopped(reason) => Outcome::failed(OutcomeKind::AgentError, reason, false),
        e => Outcome::failed(OutcomeKind::Infrastructure, format!("agent: {e}"), true),
    }
}
