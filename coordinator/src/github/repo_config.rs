//! A repository's own settings, `.agent-orchestrator.toml` on its default branch, read
//! through the contents API when a task starts. It may add or replace pipelines, pick the
//! trigger label's pipeline, require approval of the plan, and narrow the agent profiles. Unknown keys are errors
//! (`deny_unknown_fields`), reported on the issue instead of being silently ignored.
//!
//! ```toml
//! default_pipeline = "careful"
//! require_approval = true
//! [pipelines]
//! careful = ["planner", "coder", "tester", "reviewer"]
//! [profiles.coder]
//! model = "claude-sonnet-4-5"
//! append_system_prompt = "Run `make check` before you finish."
//! max_cost_usd = 2.0
//! ```

use super::client::{Client, GithubError};
use crate::webhook::event::RepoName;
use ao_shared::capability::Capability;
use ao_shared::profile::RepoProfile;
use base64::Engine;
use http::Method;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The file's path in the repository.
pub const PATH: &str = ".agent-orchestrator.toml";
/// Largest accepted file.
const MAX_BYTES: usize = 64 * 1024;

/// The file's contents.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepoConfig {
    /// Pipelines added to (or replacing) the coordinator's, by name.
    pub pipelines: BTreeMap<String, Vec<Capability>>,
    /// The pipeline of the plain trigger label.
    pub default_pipeline: Option<String>,
    /// Whether the plan waits for `/agent approve` before anything is coded.
    pub require_approval: Option<bool>,
    /// Narrowing of the agent profiles, by capability (see [`RepoProfile`]: a repository
    /// can choose the model, add instructions and lower limits, never widen them).
    pub profiles: BTreeMap<Capability, RepoProfile>,
    /// What the setup produces and depends on; read by the worker (see
    /// [`ao_shared::setup`]), checked here so a mistake is said on the issue.
    pub setup: Option<ao_shared::setup::SetupConfig>,
    /// Narrowing of the planner's bounds (`max_steps`, `max_parallel`); never widens.
    pub planner: Option<ao_shared::config::PlannerSettings>,
}

/// Why the file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RepoConfigError {
    /// The file is there but wrong: said on the issue.
    #[error("`{PATH}` on the default branch is invalid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Github(#[from] GithubError),
}

impl RepoConfig {
    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<Self, RepoConfigError> {
        let c: RepoConfig =
            toml::from_str(text).map_err(|e| RepoConfigError::Invalid(e.to_string()))?;
        for (name, steps) in &c.pipelines {
            if steps.is_empty() || steps.len() > 20 {
                return Err(RepoConfigError::Invalid(format!(
                    "pipeline {name:?} must have 1 to 20 steps"
                )));
            }
        }
        if let Some(setup) = &c.setup {
            setup
                .validate()
                .map_err(|why| RepoConfigError::Invalid(why.to_string()))?;
        }
        for (capability, profile) in &c.profiles {
            profile
                .validate()
                .map_err(|why| RepoConfigError::Invalid(format!("profiles.{capability}: {why}")))?;
        }
        Ok(c)
    }
}

/// Reads the file from `branch` (the default branch when `None`); no file is the
/// default configuration.
pub async fn load(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    branch: Option<&str>,
) -> Result<RepoConfig, RepoConfigError> {
    let mut path = format!("/repos/{repo}/contents/{PATH}");
    if let Some(b) = branch {
        path.push_str(&format!("?ref={}", super::api::urlencode(b)));
    }
    let reply = match c
        .call(
            inst,
            Method::GET,
            "/repos/{o}/{r}/contents/{path}",
            &path,
            None,
        )
        .await
    {
        Ok(r) => r,
        Err(GithubError::Status { status: 404, .. }) => return Ok(RepoConfig::default()),
        Err(e) => return Err(e.into()),
    };
    let encoded: String = reply.body["content"]
        .as_str()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| RepoConfigError::Invalid(format!("cannot decode the file: {e}")))?;
    if bytes.len() > MAX_BYTES {
        return Err(RepoConfigError::Invalid(format!(
            "the file is larger than {MAX_BYTES} bytes"
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| RepoConfigError::Invalid("the file is not UTF-8".into()))?;
    RepoConfig::parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_file_parses_and_mistakes_are_named() {
        let c = RepoConfig::parse(
            "default_pipeline = \"careful\"\nrequire_approval = true\n\
             [pipelines]\ncareful = [\"planner\", \"coder\"]\n",
        )
        .unwrap();
        assert_eq!(c.default_pipeline.as_deref(), Some("careful"));
        assert_eq!(
            c.pipelines["careful"],
            vec![Capability::Planner, Capability::Coder]
        );
        let e = RepoConfig::parse("pipeline = 1").unwrap_err().to_string();
        assert!(e.contains("unknown field `pipeline`"), "{e}");
        let e = RepoConfig::parse("[pipelines]\nx = [\"painter\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("painter"), "{e}");
        assert!(RepoConfig::parse("[pipelines]\nx = []").is_err());
        assert_eq!(RepoConfig::parse("").unwrap(), RepoConfig::default());
    }

    #[test]
    fn profiles_narrow_and_widening_keys_are_refused() {
        let c = RepoConfig::parse(
            "[profiles.coder]
model = \"claude-haiku-4-5\"
max_cost_usd = 0.5
             disallowed_tools = [\"WebFetch\"]\n",
        )
        .unwrap();
        let coder = &c.profiles[&Capability::Coder];
        assert_eq!(coder.model.as_deref(), Some("claude-haiku-4-5"));
        assert_eq!(coder.max_cost_usd, Some(0.5));
        // Nothing that would widen the operator's profile is a key at all.
        for widening in [
            "allowed_tools = [\"Bash\"]",
            "permission_mode = \"default\"",
            "mcp_config = {}",
        ] {
            let e = RepoConfig::parse(&format!("[profiles.coder]\n{widening}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("unknown field"), "{widening}: {e}");
        }
        let e = RepoConfig::parse("[profiles.coder]\nmax_turns = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("profiles.coder"), "{e}");
        assert!(RepoConfig::parse("[profiles.painter]\nmodel = \"x\"").is_err());
    }
}
