//! Sandbox drivers: how the runner is started for one attempt, followed to its end, and
//! killed on cancel or shutdown. `bwrap` (the default) is a bubblewrap sandbox; `process`
//! is a plain child process (no isolation); `nomad` a dispatched Nomad batch job.

pub mod bwrap;
pub mod host_user;
pub mod limits;
pub mod local_repo;
pub mod network;
pub mod nomad;
mod private_paths;
pub mod process;
mod result_channel;
pub mod seccomp;
pub mod ucounts;

use crate::spec::{RunSpec, RunnerEvent};
use ao_shared::task::{FailureCause, Outcome, OutcomeKind};
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

/// The outcome of a run whose sandbox could not be placed in time (no capacity). It is
/// retryable, but the worker does not report it: it puts the same attempt back on the
/// queue, so waiting for capacity never uses up attempts.
pub fn not_placed(detail: impl std::fmt::Display) -> Outcome {
    Outcome::failed(
        OutcomeKind::Infrastructure,
        format!("not placed: {detail}"),
        true,
    )
    .with_cause(FailureCause::NotPlaced)
}

/// The runner's result, as it wrote it. A run the runner reports on was placed, so a
/// [`FailureCause::NotPlaced`] in it (which would requeue the attempt for ever) is
/// dropped: only the worker's driver says that.
pub fn runner_outcome(bytes: &[u8]) -> Outcome {
    match serde_json::from_slice::<Outcome>(bytes) {
        Ok(mut outcome) => {
            if outcome.cause == Some(FailureCause::NotPlaced) {
                outcome.cause = None;
            }
            outcome
        }
        Err(e) => Outcome::failed(
            OutcomeKind::Infrastructure,
            format!("the runner's result is unreadable: {e}"),
            true,
        ),
    }
}

/// Whether an outcome is [`not_placed`].
pub fn is_not_placed(outcome: &Outcome) -> bool {
    outcome.cause == Some(FailureCause::NotPlaced)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_worker_says_a_run_was_not_placed() {
        let forged = super::not_placed("by the runner");
        let bytes = serde_json::to_vec(&forged).unwrap();
        assert!(super::is_not_placed(&forged));
        assert!(!super::is_not_placed(&super::runner_outcome(&bytes)));
        let unreadable = super::runner_outcome(b"{");
        assert!(unreadable.retryable, "{unreadable:?}");
    }
}
