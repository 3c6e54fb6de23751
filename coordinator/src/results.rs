//! The result consumer: reads worker reports from the result queue and applies each to
//! its task exactly once in effect (repeats and stale attempts are recognised and
//! ignored), deleting a message only after its effect is stored.
//!
//! Every effect of a report is idempotent, so that a report delivered again (its delete
//! failed, its write reported an error, the coordinator died) completes what the first
//! delivery left undone and doubles nothing:
//! - a finished attempt's state change is applied once (by attempt and status), and a
//!   write that reports an error is read back before it counts as failed
//!   ([`crate::orchestrator::mutate`]); a repeat whose change is stored sends what the
//!   change queued unless a marker says the first delivery did;
//! - its cost is booked once per report, whatever became of the attempt
//!   ([`crate::spend`]);
//! - a batch of agent events is stored once (a marker per batch, in the same
//!   transaction: [`ao_shared::state::StateStore::append_events_once`]).
//!
//! A report that cannot be applied now is made visible again after a short, growing
//! delay; after `queue.max_receives` receives it reaches the result queue's dead-letter
//! queue, where [`crate::dead_letters`] keeps applying it.

use crate::context::Coordinator;
use crate::orchestrator::{mutate, send_ready, ChangeError};
use ao_shared::backoff::Backoff;
use ao_shared::ids::{DeliveryId, SubtaskId};
use ao_shared::message::ResultMessage;
use ao_shared::queue::{QueueId, Received};
use ao_shared::state::{EventKind, NewEvent};
use ao_shared::status::SubtaskStatus;
use ao_shared::task::{Applied, OutcomeKind, Task};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// First delay before a failed receive is tried again.
const RECEIVE_FIRST_RETRY: Duration = Duration::from_millis(200);
/// Longest delay between failed receives.
const RECEIVE_MAX_RETRY: Duration = Duration::from_secs(10);
/// How long a result stays hidden while it is applied.
const RESULT_VISIBILITY: Duration = Duration::from_secs(60);
/// Delay before a result that could not be applied is tried again, doubled per receive
/// up to [`RESULT_VISIBILITY`].
const APPLY_FIRST_RETRY: Duration = Duration::from_secs(2);

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
            // Left in the queue, visible again after a short delay; after
            // `queue.max_receives` receives the dead-letter watcher takes it over.
            let delay = retry_delay(message.receive_count);
            tracing::error!(task_id = %report.task_id(), error = %e,
                receives = message.receive_count, retry_in_ms = delay.as_millis() as u64,
                "cannot apply result");
            if let Err(e) = cx.queue.extend(&message.receipt, delay).await {
                tracing::warn!(error = %e, "cannot reschedule the result; it comes back after its visibility timeout");
            }
        }
    }
}

/// How long a result that could not be applied at its `receives`-th receive waits.
fn retry_delay(receives: u32) -> Duration {
    ao_shared::backoff::Backoff::new(APPLY_FIRST_RETRY, RESULT_VISIBILITY).after(receives)
}

/// The marker of a batch of agent events: a digest of its task, subtask, attempt and
/// events, so that the same batch delivered again is recognised.
fn events_marker(report: &ResultMessage) -> DeliveryId {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // Messages were decoded from JSON: encoding them again cannot fail.
    h.update(serde_json::to_vec(report).unwrap_or_default());
    let digest = hex::encode(h.finalize());
    crate::once::CoreOnce::Events {
        task: report.task_id(),
        digest: &digest,
    }
    .key()
}

/// Applies one report: its state change, its events or its spend (a `Spent` report
/// books only). `Ok` when the report
/// is done with (applied, a repeat, or one that can never apply, which is logged); an
/// error when it should be tried again later.
pub async fn apply(cx: &Coordinator, report: &ResultMessage) -> Result<(), ChangeError> {
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
            let r = cx
                .store
                .append_events_once(*task_id, &events_marker(report), &new)
                .await;
            if matches!(r, Ok(true)) {
                cx.bus.events_appended(*task_id);
            }
            let r = match r {
                Ok(true) => Ok(Applied::Changed),
                Ok(false) => Ok(Applied::Ignored("events already stored".into())),
                Err(e) => Err(ChangeError::Store(e)),
            };
            ("events", r)
        }
        ResultMessage::Finished {
            task_id,
            subtask_id,
            attempt,
            worker,
            outcome,
            at,
        } => {
            let r = mutate(cx, *task_id, |task, _| {
                Ok(task.apply_outcome(*subtask_id, *attempt, outcome.clone(), max_attempts, *at)?)
            })
            .await;
            // What the run spent is booked whatever became of the attempt, once.
            if let Ok((task, _)) = &r {
                let spent = crate::spend::Report {
                    subtask: *subtask_id,
                    attempt: *attempt,
                    worker,
                    at: *at,
                    cost_usd: outcome.cost_usd,
                };
                crate::spend::book(cx, task, &spent)
                    .await
                    .map_err(ChangeError::Store)?;
            }
            match &r {
                Ok((task, Applied::Changed)) => {
                    record_outcome(cx, task, *subtask_id, outcome);
                    tracing::info!(task_id = %task_id, subtask_id = %subtask_id, attempt,
                        outcome = outcome.kind.as_str(), task_status = %task.status, "result applied");
                    // What follows was sent (`mutate` did): remembered, so that a
                    // redelivery of this result does not send it again.
                    let marker = followed_marker(task, *subtask_id, *attempt);
                    if let Err(e) = cx.store.record_delivery(&marker).await {
                        tracing::warn!(task_id = %task_id, error = %e,
                            "cannot record that what follows the result was sent; a redelivery would send it again");
                    }
                }
                Ok((task, Applied::Ignored(_)))
                    if is_applied_repeat(task, *subtask_id, *attempt) =>
                {
                    follow_up(cx, task, *subtask_id, *attempt)
                        .await
                        .map_err(ChangeError::Store)?;
                }
                _ => {}
            }
            ("finished", r.map(|(_, a)| a))
        }
        ResultMessage::Spent {
            task_id,
            subtask_id,
            attempt,
            worker,
            cost_usd,
            at,
        } => {
            let r = match cx.store.get_task(*task_id).await {
                Ok(Some(task)) => {
                    let spent = crate::spend::Report {
                        subtask: *subtask_id,
                        attempt: *attempt,
                        worker,
                        at: *at,
                        cost_usd: *cost_usd,
                    };
                    crate::spend::book(cx, &task, &spent)
                        .await
                        .map(|()| Applied::Changed)
                        .map_err(ChangeError::Store)
                }
                Ok(None) => Err(ChangeError::NotFound(*task_id)),
                Err(e) => Err(ChangeError::Store(e)),
            };
            ("spent", r)
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

/// The marker saying that what follows a finished attempt was sent.
fn followed_marker(task: &Task, subtask: SubtaskId, attempt: u32) -> DeliveryId {
    crate::once::CoreOnce::Followed {
        task: task.id,
        subtask,
        attempt,
    }
    .key()
}

/// Whether `attempt` of `subtask` is the finished attempt whose change `task` holds: the
/// subtask ended with it, or it was retried as the next attempt (still queued).
fn is_applied_repeat(task: &Task, subtask: SubtaskId, attempt: u32) -> bool {
    !task.status.is_terminal()
        && task.subtask(subtask).is_some_and(|s| {
            (s.attempt == attempt && s.status.is_terminal())
                || (s.attempt == attempt + 1 && s.status == SubtaskStatus::Queued)
        })
}

/// A finished attempt delivered again whose change is stored: sends the messages its
/// change queued (the dependents still queued, or its own retry) unless the first
/// delivery did. That happens when the write committed but neither its answer nor a
/// read-back said so, or the coordinator died between the write and the sends.
async fn follow_up(
    cx: &Coordinator,
    task: &Task,
    subtask: SubtaskId,
    attempt: u32,
) -> Result<(), ao_shared::state::StoreError> {
    let queued: Vec<SubtaskId> = task
        .subtasks
        .iter()
        .filter(|s| {
            s.status == SubtaskStatus::Queued
                && (s.depends_on.contains(&subtask)
                    || (s.id == subtask && s.attempt == attempt + 1))
        })
        .map(|s| s.id)
        .collect();
    if queued.is_empty()
        || !cx
            .store
            .record_delivery(&followed_marker(task, subtask, attempt))
            .await?
    {
        return Ok(());
    }
    tracing::warn!(task_id = %task.id, subtask_id = %subtask, attempt, sending = queued.len(),
        "a repeated result finds its change stored and what follows unsent; sending it");
    send_ready(cx, task, &queued).await;
    Ok(())
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
