//! Running the agent in the working copy: `claude` (Claude Code with the capability's
//! profile, its stream-json parsed) or `command` (any program, plain text output). Both
//! get the same environment: the worker's allow-list, the model key, and the `AO_*`
//! variables describing the attempt; other secrets of the runner (a git token) stay out.

mod claude;
mod command;

use crate::spec::{RunSpec, SECRET_NAMES_VAR};
use ao_shared::config::AgentKind;
use ao_shared::task::Outcome;
use std::path::Path;
use std::process::Command;

/// Secrets the agent itself needs; every other secret of the runner is kept from it.
const AGENT_SECRETS: [&str; 2] = ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"];

pub fn run(spec: &RunSpec, repo: &Path) -> Outcome {
    match spec.agent.kind {
        AgentKind::Command => command::run(spec, repo),
        AgentKind::Claude => claude::run(spec, repo),
    }
}

/// The agent program set up to run in `repo`, before its arguments.
fn base_command(spec: &RunSpec, repo: &Path) -> Command {
    let mut cmd = Command::new(&spec.agent.command);
    cmd.current_dir(repo)
        .env("AO_CAPABILITY", spec.capability.as_str())
        .env("AO_TASK_ID", spec.task_id.to_string())
        .env("AO_SUBTASK_ID", spec.subtask_id.to_string())
        .env("AO_ATTEMPT", spec.attempt.to_string())
        .env("AO_BRANCH", &spec.branch)
        .env_remove(SECRET_NAMES_VAR)
        .env_remove(crate::push_permit::ENV);
    for name in secret_names() {
        if !AGENT_SECRETS.contains(&name.as_str()) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The names of the runner's secret environment variables.
pub fn secret_names() -> Vec<String> {
    std::env::var(SECRET_NAMES_VAR)
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// The wall-clock and idle limits of the agent.
fn limits(spec: &RunSpec, stdin: Option<String>) -> super::process::Limits {
    super::process::Limits {
        timeout: std::time::Duration::from_secs(spec.agent.timeout_secs.max(1)),
        idle: (spec.agent.idle_timeout_secs > 0)
            .then(|| std::time::Duration::from_secs(spec.agent.idle_timeout_secs)),
        stdin,
        finish_grace: super::process::FINISH_GRACE,
    }
}
