//! Sandbox drivers: how the runner is started for one attempt, followed to its end, and
//! killed on cancel or shutdown. `bwrap` (the default) is a bubblewrap sandbox; `process`
//! is a plain child process (no isolation); `nomad` a dispatched Nomad batch job.

pub mod bwrap;
pub mod host_user;
pub mod limits;
pub mod local_repo;
pub mod network;
pub mod nomad;
pub mod process;
mod result_channel;
pub mod seccomp;

use crate::spec::{RunSpec, RunnerEvent};
use ao_shared::task::{Outcome, OutcomeKind};
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

/// Start of the error of an outcome meaning that the sandbox never started for want of
/// capacity (see [`not_placed`]).
const NOT_PLACED: &str = "not placed: ";

/// The outcome of a run whose sandbox could not be placed in time (no capacity). It is
/// retryable, but the worker does not report it: it puts the same attempt back on the
/// queue, so waiting for capacity never uses up attempts.
pub fn not_placed(detail: impl std::fmt::Display) -> Outcome {
    Outcome::failed(
        OutcomeKind::Infrastructure,
        format!("{NOT_PLACED}{detail}"),
        true,
    )
}

/// Whether an outcome is [`not_placed`].
pub fn is_not_placed(outcome: &Outcome) -> bool {
    outcome.kind == OutcomeKind::Infrastructure
        && outcome.retryable
        && outcome
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with(NOT_PLACED))
}
