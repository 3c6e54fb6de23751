//! One received subtask, from message to deleted message: report the start, keep the
//! message hidden, run the sandbox while forwarding its events, report the outcome, and
//! delete the message only once the outcome is safely on the result queue.

use crate::cancel_watch;
use crate::heartbeat::Heartbeat;
use crate::spec::{RunSpec, RunnerEvent};
use crate::worker::Worker;
use ao_shared::message::{AgentEventRecord, ResultMessage, SubtaskMessage};
use ao_shared::queue::{QueueId, Received};
use ao_shared::task::{Outcome, OutcomeKind};
use ao_shared::timefmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Agent events are sent in batches of at most this many…
const EVENT_BATCH: usize = 50;
/// …or after this long.
const EVENT_FLUSH: Duration = Duration::from_millis(300);

/// Handles one message. `hard_stop` fires when the shutdown grace period is over: the run
/// is killed and the message released for another worker.
pub async fn handle(worker: Arc<Worker>, message: Received, hard_stop: CancellationToken) {
    let received_at = Instant::now();
    let order = match SubtaskMessage::decode(&message.body) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(message_id = %message.message_id, queue = %message.receipt.queue,
                receives = message.receive_count, error = %e,
                "undecodable subtask message; it goes to the dead-letter queue");
            if let Err(e) = worker.queue.release(&message.receipt).await {
                tracing::warn!(error = %e, "cannot release undecodable message");
            }
            return;
        }
    };
    if worker
        .warm
        .leaves_to_preferred(&worker.id, &order, message.receive_count)
    {
        return crate::warm::leave_to_preferred(&worker, &message, order).await;
    }
    let span = tracing::info_span!("subtask", task_id = %order.task_id,
        subtask_id = %order.subtask_id, attempt = order.attempt, capability = %order.capability);
    run(worker, message, order, received_at, hard_stop)
        .instrument(span)
        .await
}

async fn run(
    worker: Arc<Worker>,
    message: Received,
    order: SubtaskMessage,
    received_at: Instant,
    hard_stop: CancellationToken,
) {
    let s = &worker.settings;
    let heartbeat = Heartbeat::start(
        worker.queue.clone(),
        message.receipt.clone(),
        Duration::from_secs(s.queue.heartbeat_secs),
        Duration::from_secs(s.queue.visibility_timeout_secs),
        worker.metrics.clone(),
    );
    tracing::info!(receives = message.receive_count, "subtask received");
    let started = ResultMessage::Started {
        task_id: order.task_id,
        subtask_id: order.subtask_id,
        attempt: order.attempt,
        worker: worker.id.clone(),
        at: timefmt::now(),
    };
    if let Err(e) = worker.report(&started).await {
        tracing::warn!(error = %e, "cannot report the start; running anyway");
    }

    let mut spec = RunSpec::from_message(
        &order,
        worker.agent_spec(order.capability, order.profile.as_ref()),
    );
    let (tx, rx) = mpsc::channel::<RunnerEvent>(256);
    let forwarder = tokio::spawn(forward_events(
        worker.clone(),
        order.clone(),
        rx,
        received_at,
    ));
    let cancel = hard_stop.child_token();
    let run_done = CancellationToken::new();
    let watch = tokio::spawn(cancel_watch::watch(
        worker.store.clone(),
        order.task_id,
        order.subtask_id,
        order.attempt,
        Duration::from_secs(s.worker.cancel_poll_secs.max(1)),
        cancel.clone(),
        run_done.clone(),
    ));
    let mut warm = None;
    let outcome = match worker.secret_env().await {
        Ok(env) => {
            spec.secret_env = env;
            match crate::credentials::attach(&worker, &order, &mut spec).await {
                Ok(()) => {
                    // Warm start: mirror and setup cache (see `warm.rs`).
                    let w = warm.insert(worker.warm.prepare(&mut spec).await);
                    let tx = w.tap(tx);
                    worker.driver.run(&spec, tx, cancel).await
                }
                Err(failed) => *failed,
            }
        }
        Err(e) => {
            drop(tx);
            Outcome::failed(
                OutcomeKind::Infrastructure,
                format!("cannot resolve agent.api_key: {e}"),
                true,
            )
        }
    };
    run_done.cancel();
    let _ = watch.await;
    let _ = forwarder.await;
    if let Some(w) = warm {
        worker.warm.finish(&spec, w).await;
    }
    let receipt = heartbeat.stop().await;

    if hard_stop.is_cancelled() {
        tracing::warn!(
            "shutdown grace period over: run stopped, message released for another worker"
        );
        if let Err(e) = worker.queue.release(&receipt).await {
            tracing::warn!(error = %e, "cannot release message; it returns after its visibility timeout");
        }
        return;
    }
    // A sandbox that never started for want of capacity (the nomad driver's "not placed")
    // must not use up an attempt: reporting it would make the coordinator count a retry,
    // and releasing the message would count a receive towards the dead-letter queue. So a
    // fresh copy of the same message (same attempt) goes back on the queue, and only then
    // is the received one deleted. Should both exist for a moment, the attempt's
    // idempotency token makes Nomad run it once.
    if crate::sandbox::is_not_placed(&outcome) {
        tracing::info!(
            reason = outcome.error.as_deref().unwrap_or(""),
            "sandbox not placed; the subtask goes back on the queue, same attempt"
        );
        match worker
            .queue
            .send(QueueId::Capability(order.capability), &message.body)
            .await
        {
            Ok(_) => {
                if let Err(e) = worker.queue.delete(&receipt).await {
                    tracing::warn!(error = %e, "cannot delete the requeued message");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot requeue; releasing the message instead");
                let _ = worker.queue.release(&receipt).await;
            }
        }
        return;
    }
    worker
        .metrics
        .runs
        .with_label_values(&[order.capability.as_str(), outcome.kind.as_str()])
        .inc();
    if outcome.kind == OutcomeKind::Succeeded {
        tracing::info!(
            commit = outcome.commit.as_deref().unwrap_or("-"),
            duration_ms = outcome.duration_ms,
            "subtask succeeded"
        );
    } else {
        tracing::warn!(
            outcome = outcome.kind.as_str(),
            error = outcome.error.as_deref().unwrap_or(""),
            "subtask did not succeed"
        );
    }
    let finished = ResultMessage::Finished {
        task_id: order.task_id,
        subtask_id: order.subtask_id,
        attempt: order.attempt,
        worker: worker.id.clone(),
        outcome,
        at: timefmt::now(),
    };
    // The message is deleted only once the result is safely sent; otherwise it comes back
    // and the subtask runs again (the coordinator ignores a repeated result).
    match worker.report_reliably(&finished).await {
        Ok(()) => {
            if let Err(e) = worker.queue.delete(&receipt).await {
                tracing::warn!(error = %e, "cannot delete the finished message; a repeat run will be ignored");
            }
        }
        Err(e) => tracing::error!(error = %e,
            "cannot send the result; the message will be delivered again"),
    }
}

/// Batches runner events into `Events` reports until the runner's stream ends.
async fn forward_events(
    worker: Arc<Worker>,
    order: SubtaskMessage,
    mut rx: mpsc::Receiver<RunnerEvent>,
    received_at: Instant,
) {
    let mut batch: Vec<AgentEventRecord> = Vec::new();
    let mut first = true;
    loop {
        let next = tokio::time::timeout(EVENT_FLUSH, rx.recv()).await;
        let done = matches!(next, Ok(None));
        let timed_out = next.is_err();
        if let Ok(Some(event)) = next {
            if first {
                first = false;
                worker
                    .metrics
                    .sandbox_start
                    .observe(received_at.elapsed().as_secs_f64());
            }
            batch.push(AgentEventRecord {
                at: timefmt::now(),
                kind: event.kind,
                data: event.data,
            });
        }
        let flush = done || batch.len() >= EVENT_BATCH || (timed_out && !batch.is_empty());
        if flush && !batch.is_empty() {
            let report = ResultMessage::Events {
                task_id: order.task_id,
                subtask_id: order.subtask_id,
                attempt: order.attempt,
                events: std::mem::take(&mut batch),
            };
            if let Err(e) = worker.report(&report).await {
                tracing::warn!(error = %e, "cannot forward agent events");
            }
        }
        if done {
            return;
        }
    }
}
