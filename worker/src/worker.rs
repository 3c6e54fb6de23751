//! The worker's shared context, built once in `main`: settings, the queue, the sandbox
//! driver, metrics; and how reports reach the result queue.

use crate::metrics::Metrics;
use crate::profile::Profiles;
use crate::sandbox::SandboxDriver;
use crate::spec::{AgentSpec, SecretEnv};
use ao_shared::capability::Capability;
use ao_shared::config::{AgentKind, Settings};
use ao_shared::message::ResultMessage;
use ao_shared::profile::RepoProfile;
use ao_shared::queue::{Queue, QueueError, QueueId, Receipt};
use ao_shared::secret::{SecretError, SecretResolver};
use ao_shared::state::StateStore;
use std::sync::Arc;
use std::time::Duration;

/// How often a result is re-sent before the worker gives up on it.
const RESULT_SEND_ATTEMPTS: u32 = 8;

pub struct Worker {
    pub id: String,
    /// What runs in progress have spent, kept on disk (see `spend_ledger.rs`).
    pub spend_ledger: crate::spend_ledger::SpendLedger,
    pub settings: Settings,
    pub queue: Arc<dyn Queue>,
    pub driver: Arc<dyn SandboxDriver>,
    pub metrics: Metrics,
    /// Read to notice that a running subtask was cancelled.
    pub store: Arc<dyn StateStore>,
    pub secrets: Arc<dyn SecretResolver>,
    pub profiles: Profiles,
    /// Mirrors and setup cache kept between runs.
    pub warm: crate::warm::Warm,
}

/// A report that could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot encode report: {0}")]
    Encode(#[from] ao_shared::message::EncodeError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl Worker {
    /// How the agent runs for `capability`: the configured program, and for Claude Code
    /// the capability's profile (narrowed by the repository's settings, if it has any),
    /// whose limits take precedence.
    pub fn agent_spec(&self, capability: Capability, repo: Option<&RepoProfile>) -> AgentSpec {
        let agent = &self.settings.agent;
        let profile = match agent.kind {
            AgentKind::Claude => {
                let mut p = self.profiles.get(capability).clone();
                if let Some(r) = repo {
                    p.restrict(r);
                }
                Some(p)
            }
            AgentKind::Command => None,
        };
        let timeout_secs = profile
            .as_ref()
            .and_then(|p| p.timeout_secs)
            .unwrap_or(agent.timeout_secs);
        let idle_timeout_secs = profile
            .as_ref()
            .and_then(|p| p.idle_timeout_secs)
            .unwrap_or(agent.idle_timeout_secs);
        AgentSpec {
            kind: agent.kind,
            command: agent.command.clone(),
            args: agent.args.clone(),
            timeout_secs,
            idle_timeout_secs,
            max_file_bytes: agent.max_file_bytes,
            profile,
        }
    }

    /// The secrets a run gets in its sandbox's environment: the model API key.
    pub async fn secret_env(&self) -> Result<SecretEnv, SecretError> {
        let mut env = SecretEnv::default();
        if let Some(reference) = &self.settings.agent.api_key {
            env.set("ANTHROPIC_API_KEY", self.secrets.resolve(reference).await?);
        }
        Ok(env)
    }

    /// Gives a received message back without using up one of its receives: a fresh copy
    /// goes on `queue`, then the received one is deleted. (Releasing it instead would
    /// count a receive each time, so a subtask stopped by a few shutdowns in a row would
    /// reach the dead-letter queue though it never failed.) Should the delete fail, both
    /// copies exist for a while; they are the same attempt, and a repeated run of an
    /// attempt neither pushes twice (the push permit) nor counts twice (the coordinator
    /// ignores a repeated result).
    pub async fn requeue(&self, queue: QueueId, body: &str, receipt: &Receipt) {
        match self.queue.send(queue, body).await {
            Ok(_) => {
                if let Err(e) = self.queue.delete(receipt).await {
                    tracing::warn!(error = %e, "cannot delete the requeued message");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot requeue; releasing the message instead");
                if let Err(e) = self.queue.release(receipt).await {
                    tracing::warn!(error = %e,
                        "cannot release the message; it returns after its visibility timeout");
                }
            }
        }
    }

    /// Sends a report once.
    pub async fn report(&self, report: &ResultMessage) -> Result<(), ReportError> {
        let body = report.encode()?;
        self.queue.send(QueueId::Results, &body).await?;
        Ok(())
    }

    /// Sends a report, retrying with backoff on queue errors.
    pub async fn report_reliably(&self, report: &ResultMessage) -> Result<(), ReportError> {
        let body = report.encode()?;
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.queue.send(QueueId::Results, &body).await {
                Ok(_) => return Ok(()),
                Err(e) if attempt < RESULT_SEND_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "cannot send result; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
