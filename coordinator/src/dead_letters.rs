//! The dead-letter watcher: reads every queue's dead-letter queue, so that nothing that
//! lands there is silently dropped.
//!
//! - A **subtask** whose message was received too often without a result is marked
//!   failed with the reason, so that no task waits forever on a message nobody will
//!   process; but only if the dead message is of the subtask's current attempt. A stale
//!   copy (an older attempt, already retried or recovered) is only deleted: it must not
//!   fail the newer attempt.
//! - A **result** that could not be applied within its receives (store trouble lasting
//!   minutes) is applied from here, as the result consumer would
//!   ([`crate::results::apply`]), and retried every [`RESULT_RETRY_VISIBILITY`] while it
//!   still cannot be. One that can never apply (its task is gone or its stored state
//!   corrupt, or it is not a result at all) is logged, counted (`ao_results_applied_total{result="rejected"}` for an
//!   undecodable one) and deleted.

use crate::context::Coordinator;
use crate::orchestrator::{mutate, ChangeError};
use ao_shared::capability::Capability;
use ao_shared::message::{ResultMessage, SubtaskMessage};
use ao_shared::queue::{QueueId, Received};
use ao_shared::state::StoreError;
use std::sync::Arc;
use std::time::Duration;

/// How often the dead-letter queues are read.
const POLL_EVERY: Duration = Duration::from_secs(5);
/// How long a dead letter that cannot be handled stays hidden before it is looked at again.
const RETRY_VISIBILITY: Duration = Duration::from_secs(3600);
/// How long a dead-lettered result that cannot be applied yet stays hidden before the
/// next try.
pub const RESULT_RETRY_VISIBILITY: Duration = Duration::from_secs(30);

/// Runs until shutdown.
pub async fn run(cx: Arc<Coordinator>) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cx.shutdown.cancelled() => break,
        }
        results(&cx).await;
        for capability in Capability::ALL {
            subtasks(&cx, capability).await;
        }
    }
}

/// Applies the results on the result queue's dead-letter queue.
async fn results(cx: &Coordinator) {
    let dead = match cx
        .queue
        .receive_dead_letters(QueueId::Results, 10, RESULT_RETRY_VISIBILITY)
        .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(queue = %QueueId::Results, error = %e, "cannot read dead letters");
            return;
        }
    };
    for message in dead {
        let report = match ResultMessage::decode(&message.body) {
            Ok(r) => r,
            Err(e) => {
                // It can never be applied; kept, it would hold recovery back for good.
                tracing::error!(message_id = %message.message_id, bytes = message.body.len(),
                    error = %e, "undecodable result in the dead-letter queue; deleted");
                cx.metrics
                    .results_applied
                    .with_label_values(&["undecodable", "rejected"])
                    .inc();
                delete(cx, &message).await;
                continue;
            }
        };
        match crate::results::apply(cx, &report).await {
            Ok(()) => {
                tracing::warn!(task_id = %report.task_id(), message_id = %message.message_id,
                    "dead-lettered result applied");
                delete(cx, &message).await;
            }
            // Its task cannot be read back: retrying will not help.
            Err(ChangeError::Store(e @ StoreError::Corrupt(_))) => {
                tracing::error!(task_id = %report.task_id(), error = %e,
                    "dead-lettered result of a task whose stored state is corrupt; deleted");
                delete(cx, &message).await;
            }
            Err(e) => tracing::error!(task_id = %report.task_id(), error = %e,
                retry_in_s = RESULT_RETRY_VISIBILITY.as_secs(),
                "cannot apply a dead-lettered result yet; will retry"),
        }
    }
}

/// Fails the subtasks whose current attempt's message is on `capability`'s dead-letter queue.
async fn subtasks(cx: &Coordinator, capability: Capability) {
    let queue = QueueId::Capability(capability);
    let dead = match cx
        .queue
        .receive_dead_letters(queue, 10, RETRY_VISIBILITY)
        .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(queue = %queue, error = %e, "cannot read dead letters");
            return;
        }
    };
    for message in dead {
        let Ok(order) = SubtaskMessage::decode(&message.body) else {
            // Left in the dead-letter queue for an operator (the alert fires).
            tracing::error!(queue = %queue, message_id = %message.message_id,
                "undecodable message in the dead-letter queue; left for inspection");
            continue;
        };
        let reason = format!(
            "the {capability} message was received {} times without a result \
             (workers crashed or could not handle it) and was dead-lettered",
            message.receive_count.max(cx.settings.queue.max_receives)
        );
        let r = mutate(cx, order.task_id, |task, now| {
            Ok(task.fail_dead_lettered(order.subtask_id, order.attempt, &reason, now)?)
        })
        .await;
        match r {
            Ok((_, ao_shared::task::Applied::Changed)) => {
                tracing::warn!(task_id = %order.task_id, subtask_id = %order.subtask_id,
                    attempt = order.attempt, "dead-lettered subtask marked failed");
                delete(cx, &message).await;
            }
            Ok((_, ao_shared::task::Applied::Ignored(why))) => {
                tracing::info!(task_id = %order.task_id, subtask_id = %order.subtask_id,
                    attempt = order.attempt, reason = %why,
                    "dead letter of an attempt that moved on; deleted");
                delete(cx, &message).await;
            }
            Err(ChangeError::NotFound(_)) => {
                tracing::warn!(task_id = %order.task_id, "dead letter of an unknown task; deleted");
                delete(cx, &message).await;
            }
            Err(e) => tracing::error!(task_id = %order.task_id, error = %e,
                "cannot mark dead-lettered subtask failed; will retry"),
        }
    }
}

async fn delete(cx: &Coordinator, message: &Received) {
    if let Err(e) = cx.queue.delete(&message.receipt).await {
        tracing::warn!(error = %e, "cannot delete handled dead letter");
    }
}
