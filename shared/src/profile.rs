//! Agent profiles: how Claude Code runs for one capability (system prompt, tools, model,
//! turn/time/cost limits, MCP servers). The worker ships one built-in profile per
//! capability; `agent.profiles_dir` can replace them with files and
//! `[agent.profiles.<capability>]` can override single fields.

use serde::{Deserialize, Serialize};

/// A complete profile, as the runner uses it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentProfile {
    /// Appended to Claude Code's own system prompt (`--append-system-prompt`).
    pub system_prompt: String,
    /// The built-in tools the agent has at all (`--tools`); empty: Claude Code's default set.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Tool rules allowed without asking (`--allowedTools`).
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    /// Tool rules always refused (`--disallowedTools`).
    #[serde(default)]
    pub disallowed_tools: Vec<String>,
    /// `--permission-mode`; `bypassPermissions` lets an unattended agent work inside the
    /// sandbox, which is what contains it (the tool lists still apply).
    #[serde(default = "default_permission_mode")]
    pub permission_mode: String,
    /// The model; Claude Code's default when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// Agentic turns before the run stops (classified `max_turns`).
    pub max_turns: u32,
    /// Wall-clock limit in seconds; `agent.timeout_secs` when absent.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Seconds without any agent output before the run is killed as `stalled`;
    /// `agent.idle_timeout_secs` when absent.
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
    /// Budget of one run in dollars; the run is stopped (`budget_exceeded`) beyond it.
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
    /// MCP servers, as Claude Code's `--mcp-config` JSON (`{"mcpServers": {…}}`); only
    /// these are loaded (`--strict-mcp-config`).
    #[serde(default)]
    pub mcp_config: Option<serde_json::Value>,
}

fn default_permission_mode() -> String {
    "bypassPermissions".into()
}

/// Field-by-field overrides of a profile from the configuration; absent fields keep
/// the profile's value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileOverride {
    pub system_prompt: Option<String>,
    pub tools: Option<Vec<String>>,
    pub allowed_tools: Option<Vec<String>>,
    pub disallowed_tools: Option<Vec<String>>,
    pub permission_mode: Option<String>,
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    pub timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub mcp_config: Option<serde_json::Value>,
}

/// What a repository may say about a capability's profile (`[profiles.<capability>]` in
/// its `.agent-orchestrator.toml`). It can only narrow what the operator allows: pick the
/// model, add instructions, take tools away, refuse more tool rules, and lower the turn,
/// time and cost limits. It cannot add tools, allow rules, MCP servers or a permission
/// mode, and a higher limit than the operator's is ignored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepoProfile {
    pub model: Option<String>,
    /// Appended to the profile's system prompt.
    pub append_system_prompt: Option<String>,
    /// Tools kept (those of the operator's profile that are also named here).
    pub tools: Option<Vec<String>>,
    /// Tool rules refused besides the profile's.
    pub disallowed_tools: Vec<String>,
    pub max_turns: Option<u32>,
    pub timeout_secs: Option<u64>,
    pub max_cost_usd: Option<f64>,
}

/// Longest repository addition to a system prompt.
pub const MAX_REPO_PROMPT_CHARS: usize = 8 * 1024;

impl RepoProfile {
    /// Checks the values a repository gave.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_turns == Some(0) {
            return Err("max_turns must be at least 1".into());
        }
        if let Some(b) = self.max_cost_usd {
            if !(b.is_finite() && b > 0.0) {
                return Err(format!("max_cost_usd must be a positive number, not {b}"));
            }
        }
        if self
            .append_system_prompt
            .as_ref()
            .is_some_and(|p| p.chars().count() > MAX_REPO_PROMPT_CHARS)
        {
            return Err(format!(
                "append_system_prompt is longer than {MAX_REPO_PROMPT_CHARS} characters"
            ));
        }
        if let Some(m) = &self.model {
            if m.is_empty() || m.len() > 100 || m.starts_with('-') {
                return Err(format!("model {m:?} is not a model name"));
            }
        }
        Ok(())
    }
}

/// A profile that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("max_turns must be at least 1")]
    NoTurns,
    #[error("max_cost_usd must be a positive number, not {0}")]
    BadBudget(f64),
    #[error("permission_mode {0:?} is not one of acceptEdits, auto, bypassPermissions, default, dontAsk, plan")]
    BadPermissionMode(String),
    #[error("mcp_config must be a JSON object with \"mcpServers\"")]
    BadMcpConfig,
}

const PERMISSION_MODES: [&str; 6] = [
    "acceptEdits",
    "auto",
    "bypassPermissions",
    "default",
    "dontAsk",
    "plan",
];

impl AgentProfile {
    /// Applies the set fields of `o`.
    pub fn apply(&mut self, o: &ProfileOverride) {
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = &o.$field { self.$field = v.clone(); } )* };
        }
        take!(
            system_prompt,
            tools,
            allowed_tools,
            disallowed_tools,
            permission_mode,
            max_turns
        );
        macro_rules! take_opt {
            ($($field:ident),*) => { $( if o.$field.is_some() { self.$field = o.$field.clone(); } )* };
        }
        take_opt!(
            model,
            timeout_secs,
            idle_timeout_secs,
            max_cost_usd,
            mcp_config
        );
    }

    /// Narrows this profile by a repository's wishes (see [`RepoProfile`]).
    pub fn restrict(&mut self, r: &RepoProfile) {
        if let Some(model) = &r.model {
            self.model = Some(model.clone());
        }
        if let Some(extra) = r
            .append_system_prompt
            .as_deref()
            .filter(|e| !e.trim().is_empty())
        {
            self.system_prompt = format!(
                "{}\n\nInstructions from the repository's configuration:\n{}",
                self.system_prompt.trim_end(),
                extra.trim()
            );
        }
        if let Some(keep) = &r.tools {
            // An empty tool list means Claude Code's whole default set: never widen to it.
            if self.tools.is_empty() {
                self.disallowed_tools.extend(
                    [
                        "Bash",
                        "Write",
                        "Edit",
                        "NotebookEdit",
                        "WebFetch",
                        "WebSearch",
                    ]
                    .iter()
                    .filter(|t| !keep.iter().any(|k| k == *t))
                    .map(|t| t.to_string()),
                );
            } else {
                self.tools.retain(|t| keep.contains(t));
                if self.tools.is_empty() {
                    // No tool left: refuse every built-in one rather than fall back to all.
                    self.disallowed_tools.extend(
                        [
                            "Bash",
                            "Read",
                            "Write",
                            "Edit",
                            "Glob",
                            "Grep",
                            "NotebookEdit",
                        ]
                        .iter()
                        .map(|t| t.to_string()),
                    );
                }
            }
        }
        for rule in &r.disallowed_tools {
            if !self.disallowed_tools.contains(rule) {
                self.disallowed_tools.push(rule.clone());
            }
        }
        if let Some(t) = r.max_turns {
            self.max_turns = self.max_turns.min(t.max(1));
        }
        if let Some(t) = r.timeout_secs {
            self.timeout_secs = Some(self.timeout_secs.map_or(t, |mine| mine.min(t)));
        }
        if let Some(b) = r.max_cost_usd.filter(|b| b.is_finite() && *b > 0.0) {
            self.max_cost_usd = Some(self.max_cost_usd.map_or(b, |mine| mine.min(b)));
        }
    }

    /// Checks what Claude Code would otherwise refuse at run time.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.max_turns == 0 {
            return Err(ProfileError::NoTurns);
        }
        if let Some(b) = self.max_cost_usd {
            if !(b.is_finite() && b > 0.0) {
                return Err(ProfileError::BadBudget(b));
            }
        }
        if !PERMISSION_MODES.contains(&self.permission_mode.as_str()) {
            return Err(ProfileError::BadPermissionMode(
                self.permission_mode.clone(),
            ));
        }
        if let Some(m) = &self.mcp_config {
            if !m.get("mcpServers").is_some_and(|s| s.is_object()) {
                return Err(ProfileError::BadMcpConfig);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AgentProfile {
        toml_profile("system_prompt = \"x\"\nmax_turns = 5\n")
    }

    fn toml_profile(text: &str) -> AgentProfile {
        let v: serde_json::Value = serde_json::to_value(
            text.lines()
                .filter_map(|l| l.split_once(" = "))
                .map(|(k, v)| {
                    let v: serde_json::Value =
                        serde_json::from_str(v).unwrap_or(serde_json::Value::Null);
                    (k.to_string(), v)
                })
                .collect::<serde_json::Map<_, _>>(),
        )
        .unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn overrides_replace_only_set_fields() {
        let mut p = base();
        p.apply(&ProfileOverride {
            model: Some("claude-haiku-4-5".into()),
            max_cost_usd: Some(0.5),
            ..Default::default()
        });
        assert_eq!(p.model.as_deref(), Some("claude-haiku-4-5"));
        assert_eq!(p.max_cost_usd, Some(0.5));
        assert_eq!(p.system_prompt, "x");
        assert_eq!(p.max_turns, 5);
        assert_eq!(p.permission_mode, "bypassPermissions");
        p.validate().unwrap();
    }

    #[test]
    fn a_repository_can_only_narrow_a_profile() {
        let mut p = base();
        p.tools = vec!["Bash".into(), "Read".into(), "Edit".into()];
        p.max_cost_usd = Some(2.0);
        p.timeout_secs = Some(600);
        p.restrict(&RepoProfile {
            model: Some("claude-haiku-4-5".into()),
            append_system_prompt: Some("Use tabs.".into()),
            tools: Some(vec!["Read".into(), "Edit".into(), "WebFetch".into()]),
            disallowed_tools: vec!["Bash(rm:*)".into()],
            max_turns: Some(100),
            timeout_secs: Some(60),
            max_cost_usd: Some(50.0),
        });
        assert_eq!(p.model.as_deref(), Some("claude-haiku-4-5"));
        assert!(p.system_prompt.starts_with('x') && p.system_prompt.ends_with("Use tabs."));
        // WebFetch was not the operator's to give: only the intersection stays.
        assert_eq!(p.tools, vec!["Read", "Edit"]);
        assert_eq!(p.disallowed_tools, vec!["Bash(rm:*)"]);
        // Higher limits are ignored, lower ones taken.
        assert_eq!(p.max_turns, 5);
        assert_eq!(p.max_cost_usd, Some(2.0));
        assert_eq!(p.timeout_secs, Some(60));

        let mut open = base();
        open.restrict(&RepoProfile {
            tools: Some(vec!["Read".into()]),
            ..Default::default()
        });
        assert!(open.tools.is_empty());
        assert!(open.disallowed_tools.contains(&"Bash".to_string()));
        assert!(!open.disallowed_tools.contains(&"Read".to_string()));

        assert!(RepoProfile {
            max_turns: Some(0),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(RepoProfile {
            model: Some("--evil".into()),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(RepoProfile::default().validate().is_ok());
    }

    #[test]
    fn bad_profiles_are_refused() {
        let mut p = base();
        p.max_turns = 0;
        assert!(matches!(p.validate(), Err(ProfileError::NoTurns)));
        let mut p = base();
        p.max_cost_usd = Some(-1.0);
        assert!(p.validate().is_err());
        let mut p = base();
        p.permission_mode = "yolo".into();
        assert!(p.validate().is_err());
        let mut p = base();
        p.mcp_config = Some(serde_json::json!({"servers": {}}));
        assert!(p.validate().is_err());
    }
}
