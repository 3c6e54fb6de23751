//! Sandbox drivers: how the runner is started for one attempt, followed to its end, and
//! killed on cancel or shutdown. `bwrap` (the default) is a bubblewrap sandbox; `process`
//! is a plain child process (no isolation).

pub mod bwrap;
pub mod process;

use crate::spec::{RunSpec, RunnerEvent};
use ao_shared::task::Outcome;
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Starts and follows sandboxes.
#[async_trait]
pub trait SandboxDriver: Send + Sync {
    /// Runs one attempt; forwards runner events to `events`; stops the sandbox when
    /// `cancel` fires (the outcome is then `cancelled`). Never panics: every failure is an
    /// outcome (infrastructure, retryable or not).
    async fn run(
        &self,
        spec: &RunSpec,
        events: mpsc::Sender<RunnerEvent>,
        cancel: CancellationToken,
    ) -> Outcome;

    /// A name for logs.
    fn name(&self) -> &'static str;
}
