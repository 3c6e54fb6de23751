//! The run spec: everything the in-sandbox runner needs for one attempt, written by a
//! sandbox driver as JSON (a file for bwrap/process, the worker's hand-over for Nomad,
//! see `sandbox/nomad/handover.rs`). It holds no secret: credentials reach the sandbox
//! through its environment.

use ao_shared::capability::Capability;
use ao_shared::config::AgentKind;
use ao_shared::ids::{SubtaskId, TaskId};
use ao_shared::message::SubtaskMessage;
use ao_shared::profile::AgentProfile;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// How to run the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// How the agent is invoked and its output understood.
    #[serde(default)]
    pub kind: AgentKind,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Wall-clock limit of the agent, in seconds.
    pub timeout_secs: u64,
    /// Seconds without output before the agent is killed as stalled (0: none).
    #[serde(default)]
    pub idle_timeout_secs: u64,
    /// Largest file the runner commits, in bytes (0: no limit); see
    /// `agent.max_file_bytes`.
    #[serde(default)]
    pub max_file_bytes: u64,
    /// The capability's Claude Code profile (for `kind = claude`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<AgentProfile>,
}

/// One attempt of one subtask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub task_id: TaskId,
    pub subtask_id: SubtaskId,
    pub attempt: u32,
    pub capability: Capability,
    pub repository: String,
    pub branch: String,
    #[serde(default)]
    pub base_branch: Option<String>,
    pub title: String,
    pub prompt: String,
    #[serde(default)]
    pub instructions: Option<String>,
    /// For a subtask of a plan: the step it is, or the merge it makes.
    #[serde(default)]
    pub step: Option<ao_shared::task::Step>,
    /// Where a new `branch` starts, when the remote has it (see `SubtaskMessage`).
    #[serde(default)]
    pub start_from: Option<String>,
    pub agent: AgentSpec,
    /// How the runner hands over its commit.
    #[serde(default)]
    pub delivery: Delivery,
    /// What the worker prepared for a warm start (see `warm.rs`); empty for a cold one.
    #[serde(default)]
    pub warm: WarmSpec,
    /// Secret environment variables for this attempt (the model API key, a git token).
    /// Never serialized: they reach the sandbox only through its environment (for Nomad,
    /// the hand-over's separate `env`), never the spec file or anything Nomad holds.
    #[serde(skip)]
    pub secret_env: SecretEnv,
    /// The lease of the message this attempt came from: the runner pushes only once the
    /// worker confirmed it (see `push_permit.rs`). Never serialized.
    #[serde(skip)]
    pub lease: LeaseSlot,
    /// Mints the attempt's git credential afresh at the moment of the push (an
    /// installation token lives an hour; a run may last longer). Never serialized.
    #[serde(skip)]
    pub git_credentials: GitCredentials,
}

/// A fresh git credential, or why none could be had.
pub type MintFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<SecretString, String>> + Send + 'static>,
>;

/// Where a run's git credential is minted afresh, if it has one (GitHub tasks).
#[derive(Clone, Default)]
pub struct GitCredentials(pub Option<std::sync::Arc<dyn Fn() -> MintFuture + Send + Sync>>);

impl GitCredentials {
    /// A fresh credential; `None` when the run has no minted credential.
    pub async fn mint(&self) -> Option<Result<SecretString, String>> {
        match &self.0 {
            Some(f) => Some(f().await),
            None => None,
        }
    }
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Minted" } else { "None" })
    }
}

impl PartialEq for GitCredentials {
    /// Credentials take no part in comparing specs.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The lease a run is fenced by, if any (none for runs started outside a queue consumer).
#[derive(Clone, Default)]
pub struct LeaseSlot(pub Option<crate::heartbeat::Lease>);

impl std::fmt::Debug for LeaseSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Lease" } else { "None" })
    }
}

impl PartialEq for LeaseSlot {
    /// Leases take no part in comparing specs.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// How the runner hands over the commit it made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// The runner pushes to the repository's URL (HTTPS, SSH) itself.
    #[default]
    Push,
    /// The runner writes the new commits as a git bundle, [`BUNDLE_FILE`] in its work
    /// directory, once every other process of the sandbox is gone; the worker pushes it
    /// into the repository from outside the sandbox. For local repositories, which the
    /// sandbox sees read-only.
    Bundle,
}

/// The bundle of a [`Delivery::Bundle`] run, in the runner's work directory.
pub const BUNDLE_FILE: &str = "push.bundle";
/// What the worker keeps for this run between runs (see `warm.rs`). Every path is a host
/// path that the sandbox driver makes visible at the same place inside.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WarmSpec {
    /// A bare mirror of the repository, just brought up to date, read-only inside: the
    /// runner makes the working copy from it (`git clone --shared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<std::path::PathBuf>,
    /// The setup cache for this run, when the repository declares one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<SetupCacheSpec>,
}

/// The setup cache of one run: restore `restore` instead of running the setup when the
/// working copy's key is `key`; else, after a successful setup, write the result into
/// `store` (the worker takes it from there only if its hash matches what the runner
/// reported before the agent started).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetupCacheSpec {
    /// The key the worker computed from its mirror (hex SHA-256, see `ao_shared::setup`).
    pub key: String,
    /// A cached result (a tar archive), read-only inside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<std::path::PathBuf>,
    /// A directory, writable inside, where the runner puts `<key>.tar` after a setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<std::path::PathBuf>,
}

/// The runner's event announcing a setup result to store: data `{key, sha256, bytes}`.
pub const SETUP_STORED_EVENT: &str = "setup_cache_stored";

/// Names the runner's secret environment variables (comma-separated).
pub const SECRET_NAMES_VAR: &str = "AO_SECRET_NAMES";

/// Secret environment variables of one attempt, by name; their values never appear in
/// `Debug` output.
#[derive(Clone, Debug, Default)]
pub struct SecretEnv(Vec<(String, SecretString)>);

impl SecretEnv {
    /// Sets `name` (replacing an earlier value).
    pub fn set(&mut self, name: impl Into<String>, value: SecretString) {
        let name = name.into();
        self.0.retain(|(n, _)| *n != name);
        self.0.push((name, value));
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&SecretString> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Removes `name` and returns its value.
    pub fn take(&mut self, name: &str) -> Option<SecretString> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(i).1)
    }

    /// Every variable, name and value.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &SecretString)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }

    /// A redactor of every value.
    pub fn redactor(&self) -> crate::redact::Redactor {
        use secrecy::ExposeSecret;
        crate::redact::Redactor::new(self.0.iter().map(|(_, v)| v.expose_secret()))
    }

    /// Adds every variable to a command's environment, and their names (not values) as
    /// `AO_SECRET_NAMES`, so that the runner can keep them out of everything it prints.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        use secrecy::ExposeSecret;
        for (name, value) in &self.0 {
            cmd.env(name, value.expose_secret());
        }
        let names: Vec<&str> = self.names().collect();
        cmd.env(SECRET_NAMES_VAR, names.join(","));
    }
}

impl PartialEq for SecretEnv {
    /// Secrets take no part in comparing specs.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl RunSpec {
    pub fn from_message(m: &SubtaskMessage, agent: AgentSpec) -> Self {
        Self {
            task_id: m.task_id,
            subtask_id: m.subtask_id,
            attempt: m.attempt,
            capability: m.capability,
            repository: m.repository.clone(),
            branch: m.branch.clone(),
            base_branch: m.base_branch.clone(),
            title: m.title.clone(),
            prompt: m.prompt.clone(),
            instructions: m.instructions.clone(),
            step: m.step.clone(),
            start_from: m.start_from.clone(),
            agent,
            delivery: Delivery::Push,
            warm: WarmSpec::default(),
            secret_env: SecretEnv::default(),
            lease: LeaseSlot::default(),
            git_credentials: GitCredentials::default(),
        }
    }

    /// The full prompt given to the agent: the task, and this step's extra instructions.
    pub fn full_prompt(&self) -> String {
        match &self.instructions {
            Some(extra) => format!("{}\n\n{}", self.prompt, extra),
            None => self.prompt.clone(),
        }
    }
}

/// One line of the runner's standard output: an event for the live stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunnerEvent {
    pub kind: String,
    pub data: serde_json::Value,
}
