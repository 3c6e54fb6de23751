//! The dead-letter watcher: a subtask whose message was received too often without a
//! result lands in its queue's dead-letter queue; this loop marks it failed with the
//! reason, so that no task waits forever on a message nobody will process.

use crate::context::Coordinator;
use crate::orchestrator::mutate;
use ao_shared::capability::Capability;
use ao_shared::message::SubtaskMessage;
use ao_shared::queue::QueueId;
use std::sync::Arc;
use std::time::Duration;

/// How often the dead-letter queues are read.
const POLL_EVERY: Duration = Duration::from_secs(5);
/// How long a dead letter that cannot be handled stays hidden before it is looked at again.
const RETRY_VISIBILITY: Duration = Duration::from_secs(3600);

/// Runs until shutdown.
pub async fn run(cx: Arc<Coordinator>) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cx.shutdown.cancelled() => break,
        }
        for capability in Capability::ALL {
            let queue = QueueId::Capability(capability);
            let dead = match cx
                .queue
                .receive_dead_letters(queue, 10, RETRY_VISIBILITY)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "cannot read dead letters");
                    continue;
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
                let r = mutate(&cx, order.task_id, |task, now| {
                    Ok(task.fail_dead_lettered(order.subtask_id, &reason, now)?)
                })
                .await;
                match r {
                    Ok(_) | Err(crate::orchestrator::ChangeError::NotFound(_)) => {
                        tracing::warn!(task_id = %order.task_id, subtask_id = %order.subtask_id,
                            "dead-lettered subtask marked failed");
                        if let Err(e) = cx.queue.delete(&message.receipt).await {
                            tracing::warn!(error = %e, "cannot delete handled dead letter");
                        }
                    }
                    Err(e) => tracing::error!(task_id = %order.task_id, error = %e,
                        "cannot mark dead-lettered subtask failed; will retry"),
                }
            }
        }
    }
}
