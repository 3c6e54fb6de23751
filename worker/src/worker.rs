//! The worker's shared context, built once in `main`: settings, the queue, the sandbox
//! driver, metrics; and how reports reach the result queue.

use crate::metrics::Metrics;
use crate::sandbox::SandboxDriver;
use crate::spec::AgentSpec;
use ao_shared::config::Settings;
use ao_shared::message::ResultMessage;
use ao_shared::queue::{Queue, QueueError, QueueId};
use std::sync::Arc;
use std::time::Duration;

/// How often a result is re-sent before the worker gives up on it.
const RESULT_SEND_ATTEMPTS: u32 = 8;

pub struct Worker {
    pub id: String,
    pub settings: Settings,
    pub queue: Arc<dyn Queue>,
    pub driver: Arc<dyn SandboxDriver>,
    pub metrics: Metrics,
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
    pub fn agent_spec(&self) -> AgentSpec {
        AgentSpec {
            command: self.settings.agent.command.clone(),
            args: self.settings.agent.args.clone(),
            timeout_secs: self.settings.agent.timeout_secs,
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
