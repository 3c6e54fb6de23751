//! The `claude` agent: Claude Code in print mode with the capability's profile
//! (`claude -p --output-format stream-json --verbose …`, the prompt on standard input).
//! Each stream-json line is parsed and forwarded as typed events as it arrives; the
//! usage of every model message is priced as it streams, and the run is stopped when it
//! passes the profile's `max_cost_usd`. The final `result` event decides the outcome.

use super::super::process::{run_streaming, Control, RunError};
use crate::spec::RunSpec;
use ao_shared::pricing;
use ao_shared::profile::AgentProfile;
use ao_shared::stream_json::{self, RunResult, StreamEvent, Usage};
use ao_shared::task::{Outcome, OutcomeKind, TokenUsage};
use std::collections::HashMap;
use std::path::Path;

/// Characters of the final answer kept as the summary.
const SUMMARY_CHARS: usize = 8 * 1024;

/// The Claude Code options a profile stands for (the prompt goes on standard input).
pub fn arguments(profile: &AgentProfile, mcp_file: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = [
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--no-session-persistence",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--max-turns".into(), profile.max_turns.to_string()]);
    args.extend(["--permission-mode".into(), profile.permission_mode.clone()]);
    if let Some(model) = &profile.model {
        args.extend(["--model".into(), model.clone()]);
    }
    if !profile.system_prompt.trim().is_empty() {
        args.extend([
            "--append-system-prompt".into(),
            profile.system_prompt.trim().to_string(),
        ]);
    }
    if !profile.tools.is_empty() {
        args.extend(["--tools".into(), profile.tools.join(",")]);
    }
    // One option per rule: rules may hold spaces (`Bash(git push:*)`).
    for rule in &profile.allowed_tools {
        args.extend(["--allowedTools".into(), rule.clone()]);
    }
    for rule in &profile.disallowed_tools {
        args.extend(["--disallowedTools".into(), rule.clone()]);
    }
    if let Some(file) = mcp_file {
        args.extend([
            "--mcp-config".into(),
            file.display().to_string(),
            "--strict-mcp-config".into(),
        ]);
    }
    if let Some(budget) = profile.max_cost_usd {
        args.extend(["--max-budget-usd".into(), format!("{budget}")]);
    }
    args
}

/// What the stream has told so far.
#[derive(Default)]
struct Progress {
    /// The model of the session (from `init`), for pricing.
    model: Option<String>,
    /// Usage per model message id (a message may come as several events).
    usage: HashMap<String, (Option<String>, Usage)>,
    result: Option<RunResult>,
    events: usize,
}

impl Progress {
    fn cost(&self) -> f64 {
        self.usage
            .values()
            .map(|(model, usage)| {
                let model = model.as_deref().or(self.model.as_deref()).unwrap_or("");
                pricing::cost_usd(model, usage)
            })
            .sum()
    }

    fn tokens(&self) -> TokenUsage {
        let mut total = TokenUsage::default();
        for (_, u) in self.usage.values() {
            total.add(&u.tokens());
        }
        total
    }

    fn observe(&mut self, event: &StreamEvent) {
        self.events += 1;
        match event {
            StreamEvent::Init(i) => self.model = i.model.clone(),
            StreamEvent::Assistant(m) => {
                if let Some(usage) = m.usage {
                    let id =
                        m.id.clone()
                            .unwrap_or_else(|| format!("event-{}", self.events));
                    let entry = self
                        .usage
                        .entry(id)
                        .or_insert((m.model.clone(), Usage::default()));
                    // The same message repeats its usage; keep the largest counts.
                    entry.1.input_tokens = entry.1.input_tokens.max(usage.input_tokens);
                    entry.1.output_tokens = entry.1.output_tokens.max(usage.output_tokens);
                    entry.1.cache_read_input_tokens = entry
                        .1
                        .cache_read_input_tokens
                        .max(usage.cache_read_input_tokens);
                    entry.1.cache_creation_input_tokens = entry
                        .1
                        .cache_creation_input_tokens
                        .max(usage.cache_creation_input_tokens);
                }
            }
            StreamEvent::Result(r) => self.result = Some(r.clone()),
            _ => {}
        }
    }
}

pub fn run(spec: &RunSpec, repo: &Path) -> Outcome {
    let Some(profile) = &spec.agent.profile else {
        return Outcome::failed(
            OutcomeKind::Infrastructure,
            "agent.kind = claude but the run has no profile",
            false,
        );
    };
    let mcp_file = match &profile.mcp_config {
        Some(config) => {
            let file = repo.parent().unwrap_or(repo).join("mcp-config.json");
            if let Err(e) = std::fs::write(&file, config.to_string()) {
                return Outcome::failed(
                    OutcomeKind::Infrastructure,
                    format!("cannot write the MCP config: {e}"),
                    true,
                );
            }
            Some(file)
        }
        None => None,
    };
    let mut cmd = super::base_command(spec, repo);
    cmd.args(arguments(profile, mcp_file.as_deref()))
        .args(&spec.agent.args)
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_ERROR_REPORTING", "1");
    let budget = profile.max_cost_usd;
    let mut progress = Progress::default();
    let limits = super::limits(spec, Some(spec.full_prompt()));
    let result = run_streaming(&mut cmd, &limits, &mut |line| {
        match stream_json::parse_line(line) {
            Ok(event) => {
                progress.observe(&event);
                for (kind, data) in event.agent_events() {
                    super::super::emit(kind, data);
                }
            }
            // Claude Code prints the odd plain line (a warning); keep it as a log line.
            Err(_) => super::super::emit("log", serde_json::json!({ "message": line })),
        }
        match budget {
            Some(limit) if progress.cost() > limit => Control::Stop(format!(
                "the run's cost passed its budget of ${limit:.2} (max_cost_usd)"
            )),
            // The final result is the run's last word: a process that lingers after it
            // (its output still open) is ended after a grace, and the result stands.
            _ if progress.result.is_some() => Control::Finish,
            _ => Control::Continue,
        }
    });
    let mut outcome = match result {
        Ok(done) => match &progress.result {
            Some(r) => classify(r),
            None => Outcome::failed(
                OutcomeKind::AgentError,
                format!(
                    "claude ended ({}) without a result: {}",
                    done.status,
                    done.tail()
                ),
                false,
            ),
        },
        Err(RunError::Stopped(reason)) => {
            Outcome::failed(OutcomeKind::BudgetExceeded, reason, false)
        }
        Err(e) => super::command::failure(spec, e),
    };
    // The result's own figures are exact; the streamed estimate covers runs cut short.
    let final_result = progress.result.as_ref();
    outcome.cost_usd = final_result
        .and_then(|r| r.total_cost_usd)
        .unwrap_or_else(|| progress.cost());
    outcome.tokens = final_result
        .and_then(|r| r.usage)
        .map(|u| u.tokens())
        .unwrap_or_else(|| progress.tokens());
    outcome.turns = final_result.and_then(|r| r.num_turns);
    outcome
}

/// The outcome a final `result` event stands for.
pub fn classify(r: &RunResult) -> Outcome {
    let text = r.result.clone().unwrap_or_default();
    match r.subtype.as_str() {
        "success" if !r.is_error => {
            return Outcome::succeeded(stream_json::truncate(&text, SUMMARY_CHARS), None)
        }
        "error_max_turns" => {
            return Outcome::failed(
                OutcomeKind::MaxTurns,
                format!(
                    "the agent reached its turn limit ({} turns)",
                    r.num_turns.unwrap_or_default()
                ),
                false,
            )
        }
        s if s.contains("budget") => {
            return Outcome::failed(
                OutcomeKind::BudgetExceeded,
                "the run's cost reached its budget (max_cost_usd)",
                false,
            )
        }
        _ => {}
    }
    let detail = stream_json::truncate(&text, 2000);
    match r.api_error_status {
        Some(401 | 403) => Outcome::failed(
            OutcomeKind::Infrastructure,
            format!("the model API refused the credentials: {detail}"),
            false,
        ),
        Some(s @ (408 | 409 | 429 | 500..=599)) => Outcome::failed(
            OutcomeKind::Infrastructure,
            format!("model API error {s}: {detail}"),
            true,
        ),
        Some(s) => Outcome::failed(
            OutcomeKind::AgentError,
            format!("model API error {s}: {detail}"),
            false,
        ),
        // No status: the connection failed or the stream was malformed.
        None if text.starts_with("API Error") => Outcome::failed(
            OutcomeKind::Infrastructure,
            format!("model API failure: {detail}"),
            true,
        ),
        None => Outcome::failed(
            OutcomeKind::AgentError,
            format!("the agent ended with an error ({}): {detail}", r.subtype),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(subtype: &str, is_error: bool, status: Option<u16>, text: &str) -> RunResult {
        RunResult {
            subtype: subtype.into(),
            is_error,
            api_error_status: status,
            result: Some(text.into()),
            num_turns: Some(4),
            ..RunResult::default()
        }
    }

    #[test]
    fn results_are_classified() {
        let ok = classify(&result("success", false, None, "done"));
        assert_eq!(
            (ok.kind, ok.summary.as_str()),
            (OutcomeKind::Succeeded, "done")
        );
        let turns = classify(&result("error_max_turns", true, None, ""));
        assert_eq!(
            (turns.kind, turns.retryable),
            (OutcomeKind::MaxTurns, false)
        );
        let budget = classify(&result("error_max_budget_usd", true, None, ""));
        assert_eq!(budget.kind, OutcomeKind::BudgetExceeded);
        for status in [500, 529, 429] {
            let o = classify(&result("success", true, Some(status), "API Error: 500"));
            assert_eq!((o.kind, o.retryable), (OutcomeKind::Infrastructure, true));
        }
        let key = classify(&result("success", true, Some(401), "API Error: 401"));
        assert_eq!(
            (key.kind, key.retryable),
            (OutcomeKind::Infrastructure, false)
        );
        let malformed = classify(&result(
            "success",
            true,
            None,
            "API Error: API returned an empty or malformed response",
        ));
        assert_eq!(
            (malformed.kind, malformed.retryable),
            (OutcomeKind::Infrastructure, true)
        );
        let other = classify(&result("error_during_execution", true, None, "boom"));
        assert_eq!(
            (other.kind, other.retryable),
            (OutcomeKind::AgentError, false)
        );
    }

    /// Claude Code sometimes prints its final `result` and then stays alive with its
    /// output open. Before, the idle timeout fired, the parsed success was discarded and
    /// the run counted as `stalled` (retryable), so the agent ran again.
    #[test]
    fn a_result_followed_by_no_exit_keeps_the_result() {
        use ao_shared::capability::Capability;
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("claude");
        std::fs::write(
            &agent,
            concat!(
                "#!/bin/sh\n",
                "cat >/dev/null\n",
                r#"echo '{"type":"system","subtype":"init","model":"claude-sonnet-4-5"}'"#,
                "\n",
                r#"echo '{"type":"result","subtype":"success","is_error":false,"result":"all done","num_turns":2,"total_cost_usd":0.25}'"#,
                "\n",
                "exec sleep 600\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = RunSpec {
            task_id: Default::default(),
            subtask_id: Default::default(),
            attempt: 1,
            capability: Capability::Coder,
            repository: "/nowhere".into(),
            branch: "agent/x".into(),
            base_branch: None,
            title: "t".into(),
            prompt: "p".into(),
            instructions: None,
            step: None,
            start_from: None,
            agent: crate::spec::AgentSpec {
                kind: ao_shared::config::AgentKind::Claude,
                command: agent.display().to_string(),
                args: Vec::new(),
                timeout_secs: 600,
                idle_timeout_secs: 1,
                max_file_bytes: 0,
                profile: Some(
                    toml::from_str(include_str!("../../../profiles/coder.toml")).unwrap(),
                ),
            },
            secret_env: Default::default(),
            lease: Default::default(),
            git_credentials: Default::default(),
            delivery: Default::default(),
            warm: Default::default(),
        };
        let outcome = run(&spec, dir.path());
        assert_eq!(
            (outcome.kind, outcome.summary.as_str()),
            (OutcomeKind::Succeeded, "all done"),
            "{outcome:?}"
        );
        assert_eq!(outcome.turns, Some(2));
        assert!((outcome.cost_usd - 0.25).abs() < 1e-9);
    }

    #[test]
    fn arguments_follow_the_profile() {
        let profile: AgentProfile = toml::from_str(
            r#"
            system_prompt = "be careful"
            tools = ["Read", "Grep"]
            disallowed_tools = ["Bash(git push:*)"]
            model = "claude-sonnet-4-5"
            max_turns = 7
            max_cost_usd = 1.5
            "#,
        )
        .unwrap();
        let args = arguments(&profile, Some(Path::new("/w/mcp.json")));
        let joined = args.join(" ");
        for expected in [
            "-p --output-format stream-json --verbose",
            "--max-turns 7",
            "--permission-mode bypassPermissions",
            "--model claude-sonnet-4-5",
            "--append-system-prompt be careful",
            "--tools Read,Grep",
            "--disallowedTools Bash(git push:*)",
            "--mcp-config /w/mcp.json --strict-mcp-config",
            "--max-budget-usd 1.5",
        ] {
            assert!(joined.contains(expected), "{expected} missing in {joined}");
        }
    }

    #[test]
    fn streamed_usage_is_counted_once_per_message() {
        let mut p = Progress::default();
        for line in [
            r#"{"type":"system","subtype":"init","model":"claude-sonnet-4-5"}"#,
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"a"}],"usage":{"input_tokens":1000000,"output_tokens":1}}}"#,
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"tool_use","id":"t","name":"Bash","input":{}}],"usage":{"input_tokens":1000000,"output_tokens":1}}}"#,
            r#"{"type":"assistant","message":{"id":"m2","content":[],"usage":{"input_tokens":0,"output_tokens":1000000}}}"#,
        ] {
            p.observe(&stream_json::parse_line(line).unwrap());
        }
        // $3 for the first message's input (counted once), $15 for the second's output.
        assert!((p.cost() - 18.000015).abs() < 1e-6, "{}", p.cost());
        assert_eq!(p.tokens().input, 1_000_000);
    }
}
