//! One received subtask, from message to deleted message: report the start, keep the
//! message hidden (its lease, see `heartbeat.rs`), run the sandbox while forwarding its
//! events, report the outcome, and delete the message only once the outcome is safely on
//! the result queue. A run whose lease is lost is stopped and not reported.

use crate::cancel_watch;
use crate::heartbeat::{Heartbeat, Lease};
use crate::spec::{LeaseSlot, RunSpec, RunnerEvent};
use crate::spend_ledger::LedgerEntry;
use crate::worker::Worker;
use ao_shared::config::KEPT_TAIL_EVENTS;
use ao_shared::message::{AgentEventRecord, ResultMessage, SubtaskMessage};
use ao_shared::queue::{QueueId, Received};
use ao_shared::task::{Outcome, OutcomeKind};
use ao_shared::timefmt;
use std::collections::VecDeque;
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
    let lease = Lease::new(
        worker.queue.clone(),
        message.receipt.clone(),
        Duration::from_secs(s.queue.visibility_timeout_secs),
        worker.metrics.clone(),
    );
    let heartbeat = Heartbeat::start(lease.clone(), Duration::from_secs(s.queue.heartbeat_secs));
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
    spec.lease = LeaseSlot(Some(lease.clone()));
    // The run's secrets, before anything starts: their values are redacted from every
    // event and the outcome, whatever the sandbox driver.
    let prepared = match budget_left(&mut spec, order.spent_usd) {
        Some(spent) => Err(spent),
        None => match worker.secret_env().await {
            Ok(env) => {
                spec.secret_env = env;
                if let Some(target) = &order.github {
                    spec.git_credentials = crate::credentials::refresher(
                        worker.clone(),
                        target.clone(),
                        order.capability,
                    );
                }
                crate::credentials::attach(&worker, &order, &mut spec)
                    .await
                    .map_err(|failed| *failed)
            }
            Err(e) => Err(Outcome::failed(
                OutcomeKind::Infrastructure,
                format!("cannot resolve agent.api_key: {e}"),
                true,
            )),
        },
    };
    let redactor = spec.secret_env.redactor();
    let (tx, rx) = mpsc::channel::<RunnerEvent>(256);
    let ledger = Arc::new(worker.spend_ledger.entry(&order, &worker.id));
    let forwarder = tokio::spawn(forward_events(
        worker.clone(),
        order.clone(),
        rx,
        received_at,
        redactor.clone(),
        ledger.clone(),
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
    // A lost lease stops the run: another worker may hold the attempt now.
    let lost_watch = tokio::spawn({
        let (lost, cancel, run_done) = (lease.lost(), cancel.clone(), run_done.clone());
        async move {
            tokio::select! {
                _ = lost.cancelled() => cancel.cancel(),
                _ = run_done.cancelled() => {}
            }
        }
    });
    let mut warm = None;
    let mut outcome = match prepared {
        Ok(()) => {
            // Warm start: mirror and setup cache (see `warm.rs`).
            let w = warm.insert(worker.warm.prepare(&mut spec).await);
            if let Some(summary) = w.summary.take() {
                let _ = tx
                    .send(RunnerEvent {
                        kind: "log".into(),
                        data: serde_json::json!({ "message": summary }),
                    })
                    .await;
            }
            let tx = w.tap(tx);
            worker.driver.run(&spec, tx, cancel).await
        }
        Err(failed) => {
            drop(tx);
            failed
        }
    };
    // Whatever the runner wrote, secrets are redacted and agent text is bounded before it
    // is reported.
    redactor.outcome(&mut outcome);
    let outcome = outcome.bounded();
    run_done.cancel();
    let _ = watch.await;
    let _ = lost_watch.await;
    // What the agent's own stream said it spent, for a run stopped before its outcome
    // could carry it (the `process` driver has no model proxy to meter it).
    let streamed_cost = forwarder.await.unwrap_or(0.0);
    if let Some(w) = warm {
        worker.warm.finish(&spec, w).await;
    }

    if lease.is_lost() {
        heartbeat.stop().await;
        tracing::warn!(
            reason = lease.why().unwrap_or_default(),
            outcome = outcome.kind.as_str(),
            "lease lost: the run was stopped or refused its push; only its spend is reported"
        );
        report_spend(&worker, &ledger, outcome.cost_usd.max(streamed_cost)).await;
        worker
            .metrics
            .runs
            .with_label_values(&[order.capability.as_str(), "lease_lost"])
            .inc();
        return;
    }
    // Stopped by the end of the shutdown grace period: the same attempt goes back on the
    // queue for another worker, without using up a receive. A run that ended by itself
    // (even as the grace period ran out) is reported below like any other.
    if hard_stop.is_cancelled() && outcome.kind == OutcomeKind::Cancelled {
        let receipt = heartbeat.stop().await;
        tracing::warn!(
            "shutdown grace period over: run stopped, the subtask goes back on the queue"
        );
        report_spend(&worker, &ledger, outcome.cost_usd.max(streamed_cost)).await;
        worker
            .requeue(
                QueueId::Capability(order.capability),
                &message.body,
                &receipt,
            )
            .await;
        return;
    }
    // A sandbox that never started for want of capacity (the nomad driver's "not placed")
    // must not use up an attempt: reporting it would make the coordinator count a retry,
    // and releasing the message would count a receive towards the dead-letter queue. So a
    // fresh copy of the same message (same attempt) goes back on the queue, and only then
    // is the received one deleted. Should both exist for a moment, the attempt's
    // idempotency token makes Nomad run it once.
    if crate::sandbox::is_not_placed(&outcome) {
        let receipt = heartbeat.stop().await;
        tracing::info!(
            reason = outcome.error.as_deref().unwrap_or(""),
            "sandbox not placed; the subtask goes back on the queue, same attempt"
        );
        worker
            .requeue(
                QueueId::Capability(order.capability),
                &message.body,
                &receipt,
            )
            .await;
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
    // Fenced like the push: a worker that lost its lease (paused past it) does not report
    // a run another worker now holds.
    if let Err(e) = lease.confirm().await {
        heartbeat.stop().await;
        tracing::warn!(error = %e, "lease lost before reporting; only its spend is reported");
        report_spend(&worker, &ledger, outcome.cost_usd.max(streamed_cost)).await;
        return;
    }
    // The ledger holds the report's very `at`: should this worker die before the report
    // is out, the next start sends the spend under the same marker (booked once).
    let at = timefmt::now();
    ledger.record(outcome.cost_usd.max(streamed_cost), at);
    // Cut to fit the message limit if its agent text is too large: a result that cannot
    // be sent would make the attempt run again.
    let finished = ResultMessage::Finished {
        task_id: order.task_id,
        subtask_id: order.subtask_id,
        attempt: order.attempt,
        worker: worker.id.clone(),
        outcome,
        at,
    }
    .fitted();
    // The message is deleted only once the result is safely sent; otherwise it comes back
    // and the subtask runs again (the coordinator ignores a repeated result). The
    // heartbeat keeps the message hidden while the result is being sent.
    let sent = worker.report_reliably(&finished).await;
    let receipt = heartbeat.stop().await;
    match sent {
        Ok(()) => {
            ledger.clear();
            if let Err(e) = worker.queue.delete(&receipt).await {
                tracing::warn!(error = %e, "cannot delete the finished message; a repeat run will be ignored");
            }
        }
        Err(e) => tracing::error!(error = %e,
            "cannot send the result; the message will be delivered again"),
    }
}

/// Which of a run's events are stored: at most `agent.max_events` in all, as the first ones,
/// one `events_dropped` marker counting what was left out, and the last ones.
///
/// The runner's events come from the sandbox, where each output line of the agent is one:
/// without a bound an agent could fill the store with lines. The tail is held back until
/// the run ends (at most [`KEPT_TAIL_EVENTS`] events, each bounded in size), since only then
/// is it known to be the tail.
struct EventBound {
    /// Events still forwarded as they come.
    head_left: u64,
    /// The latest events past the head, at most `tail_cap`.
    tail: VecDeque<AgentEventRecord>,
    tail_cap: usize,
    /// Events left out between the head and the tail.
    dropped: u64,
    limit: u64,
}

impl EventBound {
    /// `limit` 0 means no bound.
    fn new(limit: u64) -> Self {
        let tail_cap = KEPT_TAIL_EVENTS.min(limit / 4);
        Self {
            head_left: if limit == 0 {
                u64::MAX
            } else {
                // One place is kept for the marker.
                limit.saturating_sub(tail_cap + 1)
            },
            tail: VecDeque::new(),
            // `tail_cap` ≤ KEPT_TAIL_EVENTS, a small constant.
            tail_cap: tail_cap as usize,
            dropped: 0,
            limit,
        }
    }

    /// The event if it is forwarded now; else it is kept back or counted as dropped.
    fn admit(&mut self, event: AgentEventRecord) -> Option<AgentEventRecord> {
        if self.head_left > 0 {
            self.head_left -= 1;
            return Some(event);
        }
        self.tail.push_back(event);
        // One more than the tail is held: when nothing else is dropped, the marker's place
        // goes to an event.
        if self.tail.len() > self.tail_cap + 1 {
            self.tail.pop_front();
            self.dropped += 1;
        }
        None
    }

    /// What is still to be forwarded when the run's stream ends: the marker, if anything
    /// was left out, then the tail.
    fn finish(&mut self) -> Vec<AgentEventRecord> {
        let mut rest = Vec::with_capacity(self.tail.len() + 1);
        if self.dropped > 0 {
            if self.tail.len() > self.tail_cap {
                self.tail.pop_front();
                self.dropped += 1;
            }
            rest.push(AgentEventRecord {
                at: timefmt::now(),
                kind: "events_dropped".into(),
                data: serde_json::json!({
                    "dropped": self.dropped,
                    "limit": self.limit,
                    "message": format!(
                        "{} events of this run were left out here (agent.max_events = {}); \
                         the last {} follow",
                        self.dropped,
                        self.limit,
                        self.tail.len()
                    ),
                }),
            });
        }
        rest.extend(self.tail.drain(..));
        rest
    }
}

/// Reports what a run that reports no outcome spent (its lease was lost, so another run
/// holds the attempt, or the shutdown stopped it): a `Spent` report, which the
/// coordinator books once and which changes no state. Budgets would under-count
/// otherwise. Recorded in the run's ledger entry first, cleared once sent.
async fn report_spend(worker: &Worker, ledger: &LedgerEntry, cost_usd: f64) {
    if !(cost_usd.is_finite() && cost_usd > 0.0) {
        ledger.clear();
        return;
    }
    let at = timefmt::now();
    ledger.record(cost_usd, at);
    match worker.report_reliably(&ledger.report(cost_usd, at)).await {
        Ok(()) => ledger.clear(),
        Err(e) => tracing::error!(error = %e, cost_usd,
            "cannot report the spend of a run that reports no outcome; the ledger keeps it"),
    }
}

/// Batches runner events into `Events` reports until the runner's stream ends, within the
/// run's event bound ([`EventBound`]); returns
/// the highest cost the agent's `result` events reported (`total_cost_usd`, dollars; 0
/// when none did).
async fn forward_events(
    worker: Arc<Worker>,
    order: SubtaskMessage,
    mut rx: mpsc::Receiver<RunnerEvent>,
    received_at: Instant,
    redactor: crate::redact::Redactor,
    ledger: Arc<LedgerEntry>,
) -> f64 {
    let mut batch: Vec<AgentEventRecord> = Vec::new();
    let mut bound = EventBound::new(worker.settings.agent.max_events);
    let mut first = true;
    let mut reported_cost = 0.0_f64;
    loop {
        let next = tokio::time::timeout(EVENT_FLUSH, rx.recv()).await;
        let done = matches!(next, Ok(None));
        let timed_out = next.is_err();
        if let Ok(Some(event)) = next {
            if event.kind == "result" {
                if let Some(cost) = event.data["total_cost_usd"].as_f64() {
                    if cost.is_finite() && cost > reported_cost {
                        reported_cost = cost;
                        // Durable at once: the worker may die before it reports.
                        ledger.record(cost, timefmt::now());
                    }
                }
            }
            if first {
                first = false;
                worker
                    .metrics
                    .sandbox_start
                    .observe(received_at.elapsed().as_secs_f64());
            }
            let mut data = event.data;
            redactor.json(&mut data);
            batch.extend(bound.admit(AgentEventRecord {
                at: timefmt::now(),
                kind: redactor.text(&event.kind),
                data,
            }));
        }
        if done {
            batch.extend(bound.finish());
        }
        let flush = done || batch.len() >= EVENT_BATCH || (timed_out && !batch.is_empty());
        if flush && !batch.is_empty() {
            // Split to fit the message limit: a large batch is sent in parts, never dropped.
            for report in ResultMessage::event_batches(
                order.task_id,
                order.subtask_id,
                order.attempt,
                std::mem::take(&mut batch),
            ) {
                if let Err(e) = worker.report(&report).await {
                    tracing::warn!(error = %e, "cannot forward agent events");
                }
            }
        }
        if done {
            return reported_cost;
        }
    }
}

/// Narrows the run's budget (`max_cost_usd`) to what earlier attempts of the subtask left
/// of it (`spent_usd`, from the work order), so that automatic retries share one budget.
///
/// Returns the outcome of the attempt when the budget is already spent: it ends as
/// `budget_exceeded`, not retryable, and no agent runs.
fn budget_left(spec: &mut RunSpec, spent_usd: f64) -> Option<Outcome> {
    let profile = spec.agent.profile.as_mut()?;
    let budget = profile.max_cost_usd?;
    let spent = if spent_usd.is_finite() {
        spent_usd.max(0.0)
    } else {
        0.0
    };
    let left = budget - spent;
    if left <= 0.0 {
        return Some(Outcome::failed(
            OutcomeKind::BudgetExceeded,
            format!(
                "the subtask's budget of ${budget:.2} (max_cost_usd) was spent by its \
                 earlier attempts (${spent:.2})"
            ),
            false,
        ));
    }
    profile.max_cost_usd = Some(left);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> AgentEventRecord {
        AgentEventRecord {
            at: timefmt::now(),
            kind: "log".into(),
            data: serde_json::json!({ "message": i }),
        }
    }

    fn run(limit: u64, events: u64) -> Vec<AgentEventRecord> {
        let mut bound = EventBound::new(limit);
        let mut out: Vec<_> = (1..=events)
            .filter_map(|i| bound.admit(record(i)))
            .collect();
        out.extend(bound.finish());
        out
    }

    #[test]
    fn a_run_within_its_bound_keeps_every_event_and_no_marker() {
        let out = run(500, 500);
        assert_eq!(out.len(), 500);
        assert!(out.iter().all(|e| e.kind == "log"));
        assert_eq!(run(0, 20_000).len(), 20_000, "0 means no bound");
    }

    #[test]
    fn a_flood_keeps_the_head_a_marker_and_the_tail() {
        let out = run(500, 6000);
        assert_eq!(out.len(), 500);
        assert_eq!(out[0].data["message"], 1);
        assert_eq!(out[398].data["message"], 399);
        let marker = &out[399];
        assert_eq!(marker.kind, "events_dropped", "{marker:?}");
        assert_eq!(marker.data["dropped"], 6000 - 399 - 100);
        assert_eq!(out[400].data["message"], 5901);
        assert_eq!(out[499].data["message"], 6000);
    }

    #[test]
    fn a_tiny_bound_still_holds() {
        for limit in 1..6 {
            assert!(run(limit, 50).len() as u64 <= limit, "limit {limit}");
        }
    }
}
