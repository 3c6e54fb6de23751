//! The result consumer: reads worker reports from the result queue and applies each to
//! its task exactly once in effect (repeats and stale attempts are recognised and
//! ignored), deleting a message only after its effect is stored.

use crate::context::Coordinator;
use crate::orchestrator::{mutate, ChangeError};
use ao_shared::backoff::Backoff;
use ao_shared::message::ResultMessage;
use ao_shared::queue::{QueueId, Received};
use ao_shared::state::{EventKind, NewEvent};
use ao_shared::task::{Applied, OutcomeKind};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// First delay before a failed receive is tried again.
const RECEIVE_FIRST_RETRY: Duration = Duration::from_millis(200);
/// Longest delay between failed receives.
const RECEIVE_MAX_RETRY: Duration = Duration::from_secs(10);
/// How long a result stays hidden while it is applied.
const RESULT_VISIBILITY: Duration = Duration::from_secs(60);

/// Runs until shutdown.
pub async fn run(cx: Arc<Coordinator>) {
    let wait = Duration::from_secs(cx.settings.queue.wait_secs.min(20));
    let mut backoff = Backoff::new(RECEIVE_FIRST_RETRY, RECEIVE_MAX_RETRY);
    while !cx.shutdown.is_cancelled() {
        let received = tokio::select! {
            r = cx.queue.receive(&[QueueId::Results], 10, wait, RESULT_VISIBILITY) => r,
            _ = cx.shutdown.cancelled() => break,
        };
        match received {
            Ok(messages) => {
                backoff.reset();
                for message in messages {
                    handle(&cx, message).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot receive results; retrying");
                backoff.wait().await;
            }
        }
    }
    tracing::info!("result consumer stopped");
}

async fn handle(cx: &Coordinator, message: Received) {
    let report = match ResultMessage::decode(&message.body) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(message_id = %message.message_id, receives = message.receive_count,
                error = %e, "undecodable result message; it goes to the dead-letter queue");
            cx.metrics
                .results_applied
                .with_label_values(&["undecodable", "rejected"])
                .inc();
            // Visible again at once, so that it reaches the dead-letter queue quickly.
            if let Err(e) = cx.queue.release(&message.receipt).await {
                tracing::warn!(error = %e, "cannot release undecodable result");
            }
            return;
        }
    };
    let span = tracing::info_span!("result", task_id = %report.task_id());
    let outcome = apply(cx, &report).instrument(span).await;
    match outcome {
        Ok(()) => {
            if let Err(e) = cx.queue.delete(&message.receipt).await {
                tracing::warn!(error = %e, "cannot delete applied result; it will be re-applied as a repeat");
            }
        }
        Err(e) => {
            // Left in the queue: retried after its visibility timeout.
            tracing::error!(task_id = %report.task_id(), error = %e, "cannot apply result");
        }
    }
}

async fn apply(cx: &Coordinator, report: &ResultMessage) -> Result<(), ChangeError> {
    let max_attempts = cx.settings.coordinator.max_attempts;
    let (kind, result) = match report {
        ResultMessage::Started {
            task_id,
            subtask_id,
            attempt,
            worker,
            at,
        } => {
            let r = mutate(cx, *task_id, |task, _| {
                Ok(task.apply_started(*subtask_id, *attempt, worker, *at)?)
            })
            .await;
            if let Ok((task, Applied::Changed)) = &r {
                if let Some(sub) = task.subtask(*subtask_id) {
                    let waited = (*at - task.created_at).as_seconds_f64().max(0.0);
                    cx.metrics
                        .trigger_to_start
                        .with_label_values(&[sub.capability.as_str()])
                        .observe(waited);
                }
            }
            ("started", r.map(|(_, a)| a))
        }
        ResultMessage::Events {
            task_id,
            subtask_id,
            events,
            ..
        } => {
            let new: Vec<NewEvent> = events
                .iter()
                .map(|e| NewEvent {
                    subtask_id: Some(*subtask_id),
                    kind: EventKind::Agent,
                    at: e.at,
                    data: serde_json::json!({ "type": e.kind, "event": e.data }),
                })
                .collect();
            let r = cx.store.append_events(*task_id, &new).await;
            cx.bus.events_appended(*task_id);
            (
                "events",
                r.map(|_| Applied::Changed).map_err(ChangeError::Store),
            )
        }
        ResultMessage::Finished {
            task_id,
            subtask_id,
            attempt,
            outcome,
            at,
            ..
        } => {
            let r = mutate(cx, *task_id, |task, _| {
                Ok(task.apply_outcome(*subtask_id, *attempt, outcome.clone(), max_attempts, *at)?)
            })
            .await;
            if let Ok((task, Applied::Changed)) = &r {
                record_outcome(cx, task, *subtask_id, outcome);
                tracing::info!(task_id = %task_id, subtask_id = %subtask_id, attempt,
                    outcome = outcome.kind.as_str(), task_status = %task.status, "result applied");
            }
            ("finished", r.map(|(_, a)| a))
        }
    };
    let label = match &result {
        Ok(Applied::Changed) => "applied",
        Ok(Applied::Ignored(_)) => "ignored",
        Err(ChangeError::NotFound(_)) => "unknown_task",
        Err(_) => "error",
    };
    cx.metrics
        .results_applied
        .with_label_values(&[kind, label])
        .inc();
    match result {
        Ok(Applied::Ignored(why)) => {
            tracing::info!(task_id = %report.task_id(), kind, reason = %why, "report ignored");
            Ok(())
        }
        Ok(Applied::Changed) => Ok(()),
        // A report for a task that does not exist can never apply: drop it.
        Err(ChangeError::NotFound(id)) => {
            tracing::warn!(task_id = %id, kind, "report for an unknown task dropped");
            Ok(())
        }
        Err(ChangeError::Illegal(e)) => {
            tracing::warn!(task_id = %report.task_id(), error = %e, "report would make an illegal transition; dropped");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn record_outcome(
    cx: &Coordinator,
    task: &ao_shared::task::Task,
    subtask: ao_shared::ids::SubtaskId,
    outcome: &ao_shared::task::Outcome,
) {
    let Some(sub) = task.subtask(subtask) else {
        return;
    };
    let cap = sub.capability.as_str();
    let repo = task.repository.as_str();
    let m = &cx.metrics;
    m.subtask_duration
        .with_label_values(&[cap, outcome.kind.as_str()])
        .observe(outcome.duration_ms as f64 / 1000.0);
    if outcome.cost_usd > 0.0 {
        m.agent_cost
            .with_label_values(&[cap, repo])
            .inc_by(outcome.cost_usd);
    }
    for (kind, n) in [
        ("input", outcome.tokens.input),
        ("output", outcome.tokens.output),
        ("cache_read", outcome.tokens.cache_read),
        ("cache_creation", outcome.tokens.cache_creation),
    ] {
        m.agent_tokens
            .with_label_values(&[cap, repo, kind])
            .inc_by(n);
    }
    if outcome.kind != OutcomeKind::Succeeded {
        tracing::warn!(task_id = %task.id, subtask_id = %subtask, capability = cap,
            outcome = outcome.kind.as_str(), error = outcome.error.as_deref().unwrap_or(""),
            "subtask attempt did not succeed");
    }
}
