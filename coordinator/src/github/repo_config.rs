//! A repository's own settings, `.agent-orchestrator.toml` on its default branch, read
//! through the contents API when a task starts. It may add or replace pipelines, pick the
//! trigger label's pipeline, and require approval of the plan. Unknown keys are errors
//! (`deny_unknown_fields`), reported on the issue instead of being silently ignored.
//!
//! ```toml
//! default_pipeline = "careful"
//! require_approval = true
//! [pipelines]
//! careful = ["planner", "coder", "tester", "reviewer"]
//! ```

use super::client::{Client, GithubError};
use crate::webhook::event::RepoName;
use ao_shared::capability::Capability;
use base64::Engine;
use reqwest::Method;
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
}
