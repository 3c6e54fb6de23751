//! Recovery of work orphaned by a crash: at start-up, and then in a periodic sweep, finds
//! subtasks that nothing will ever move on and moves them on (`coordinator.recovery`).
//!
//! What can be orphaned, in our states:
//! - A subtask committed as `queued` whose message was never sent: the coordinator sends
//!   the message after the conditional write that queued it, so a crash (or a queue outage
//!   outlasting the send's retries) in between leaves it queued with no message. It is
//!   queued again as a **new attempt** (`queued → pending → queued`, attempt + 1), so that
//!   if its old message does exist after all, the run of the old attempt is stale and its
//!   result is ignored: never two successes.
//! - A subtask `running` whose message is gone without its result having been applied
//!   (the result was lost or dead-lettered, or the queue lost the message). It is failed as
//!   `infrastructure`, retryable: queued again as a new attempt while `max_attempts`
//!   allows, otherwise the task fails with the reason.
//! - A `cancelled` task with subtasks not ended (start-up only): they end cancelled.
//! - A `queued`/`running` task with a subtask ready but not queued: it is queued.
//!
//! A subtask whose message is still alive is left alone: a crashed worker's message comes
//! back after its visibility timeout and is run again as the same attempt; a slow run keeps
//! its message in flight with heartbeats. The queues cannot be searched by content (SQS), so
//! liveness is judged by counts: per capability, the subtasks that need a message (`queued`
//! or `running`) against the messages the queue holds (visible + in flight). Only when the
//! queue holds fewer than needed is a message provably missing, and then the longest-idle
//! candidates are recovered, as many as are missing. Because a worker sends its result
//! *before* deleting its message, a deleted message's result is on the result queue or
//! already applied: the sweep reads the capability queues first, then the result queue, and
//! acts only when the result queue is empty; and every change re-checks, inside the
//! conditional write, that the subtask is still in the status and attempt it saw. Counts
//! on SQS are approximate, so a subtask is recovered only when two sweeps in a row find
//! its message missing, and `stale` mode adds the staleness threshold as a further guard;
//! at worst a recovered subtask runs one more time with its result ignored.
//!
//! Modes: `stale` (default) recovers only subtasks whose task has not changed for
//! `coordinator.recovery_stale_secs`; `all` recovers every orphan at start-up whatever its
//! age, then sweeps as `stale`; `none` does nothing. Sweeps by several coordinator replicas
//! at once are safe: the conditional writes let one of them win.

use crate::context::Coordinator;
use crate::orchestrator::{mutate, ChangeError};
use ao_shared::capability::Capability;
use ao_shared::config::RecoveryMode;
use ao_shared::ids::{SubtaskId, TaskId};
use ao_shared::queue::QueueId;
use ao_shared::state::{EventKind, NewEvent, TaskQuery};
use ao_shared::status::{SubtaskStatus, TaskStatus};
use ao_shared::task::{Applied, Outcome, OutcomeKind, StateChange, Task};
use ao_shared::timefmt::{self, Timestamp};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// How often the start-up sweep is repeated while pending results keep it from deciding.
const STARTUP_RETRY_EVERY: Duration = Duration::from_secs(3);
/// How long the start-up sweep keeps retrying before leaving the rest to periodic sweeps.
const STARTUP_RETRY_FOR: Duration = Duration::from_secs(120);
/// Tasks read per page while sweeping.
const PAGE: usize = 500;

/// What the sweep does to one task.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A `queued` subtask whose message is missing: queue it again as a new attempt.
    Requeue { subtask: SubtaskId, attempt: u32 },
    /// A `running` subtask whose message and result are gone: fail it, retryable.
    FailLost { subtask: SubtaskId, attempt: u32 },
    /// A cancelled task with unfinished subtasks: cancel them.
    FinishCancel,
    /// A task with ready subtasks that are not queued: queue them.
    QueueReady,
}

/// The decisions of one sweep.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<(TaskId, Action)>,
    /// Candidates left alone because results are pending and may still move them.
    pub deferred: usize,
}

/// What the sweep knows about the queues.
#[derive(Clone, Debug, Default)]
pub struct QueueView {
    /// Messages (visible + in flight) on each capability queue.
    pub messages: BTreeMap<Capability, u64>,
    /// Messages (visible + in flight) on the result queue.
    pub results_pending: u64,
}

/// Decides what to recover. `min_idle`: how long a task must have been unchanged for its
/// queued or running subtasks to be candidates.
pub fn plan(tasks: &[Task], queues: &QueueView, min_idle: Duration, now: Timestamp) -> Plan {
    let mut plan = Plan::default();
    // Subtasks that need a live message, per capability; and the candidates among them.
    let mut needed: BTreeMap<Capability, u64> = BTreeMap::new();
    let mut candidates: BTreeMap<Capability, Vec<(Timestamp, TaskId, Action)>> = BTreeMap::new();
    for task in tasks {
        match task.status {
            TaskStatus::Cancelled => {
                if task.subtasks.iter().any(|s| !s.status.is_terminal()) {
                    plan.actions.push((task.id, Action::FinishCancel));
                }
                continue;
            }
            TaskStatus::Queued | TaskStatus::Running => {}
            _ => continue,
        }
        let idle = (now - task.updated_at).max(time::Duration::ZERO);
        let stale = idle >= min_idle;
        let mut live = 0;
        for sub in &task.subtasks {
            let action = match sub.status {
                SubtaskStatus::Queued => Action::Requeue {
                    subtask: sub.id,
                    attempt: sub.attempt,
                },
                SubtaskStatus::Running => Action::FailLost {
                    subtask: sub.id,
                    attempt: sub.attempt,
                },
                _ => continue,
            };
            live += 1;
            *needed.entry(sub.capability).or_default() += 1;
            if stale {
                candidates.entry(sub.capability).or_default().push((
                    task.updated_at,
                    task.id,
                    action,
                ));
            }
        }
        if live == 0 && stale && !task.clone().queue_ready(now).is_empty() {
            plan.actions.push((task.id, Action::QueueReady));
        }
    }
    for (capability, mut list) in candidates {
        let need = needed.get(&capability).copied().unwrap_or(0);
        let have = queues.messages.get(&capability).copied().unwrap_or(0);
        let missing = need.saturating_sub(have) as usize;
        if missing == 0 {
            continue;
        }
        if queues.results_pending > 0 {
            plan.deferred += missing.min(list.len());
            continue;
        }
        // The longest idle first.
        list.sort_by_key(|(at, ..)| *at);
        for (_, task, action) in list.into_iter().take(missing) {
            plan.actions.push((task, action));
        }
    }
    plan
}

/// Runs the start-up recovery, then periodic sweeps, until shutdown.
pub async fn run(cx: Arc<Coordinator>) {
    let settings = &cx.settings.coordinator;
    let mode = settings.recovery;
    if mode == RecoveryMode::None {
        tracing::info!("recovery is off (coordinator.recovery = \"none\")");
        // Idle, not ended: a loop that returns before shutdown counts as dead.
        cx.shutdown.cancelled().await;
        return;
    }
    let stale = Duration::from_secs(settings.recovery_stale_secs);
    let startup_idle = match mode {
        RecoveryMode::All => Duration::ZERO,
        _ => stale,
    };
    // Start-up: retried while pending results or unconfirmed suspects keep it from deciding.
    let started = tokio::time::Instant::now();
    let mut suspects = Suspects::new();
    loop {
        let deferred = match sweep(&cx, startup_idle, true, &mut suspects).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "recovery sweep failed; retrying");
                1
            }
        };
        if deferred == 0 || started.elapsed() > STARTUP_RETRY_FOR {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(STARTUP_RETRY_EVERY) => {}
            _ = cx.shutdown.cancelled() => return,
        }
    }
    let mut tick = tokio::time::interval(stale);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cx.shutdown.cancelled() => break,
        }
        if let Err(e) = sweep(&cx, stale, false, &mut suspects).await {
            tracing::warn!(error = %e, "recovery sweep failed");
        }
    }
}

/// Why a sweep could not read what it needs.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("cannot list tasks: {0}")]
    Store(#[from] ao_shared::state::StoreError),
    #[error("cannot read queue depth: {0}")]
    Queue(#[from] ao_shared::queue::QueueError),
}

/// Subtasks (task, subtask, attempt) found without a message by the previous sweep.
type Suspects = HashSet<(TaskId, SubtaskId, u32)>;

/// Splits a plan's actions into those to take now and those to confirm: a subtask is
/// recovered only when two sweeps in a row find its message missing, so that one reading
/// of approximate queue counts (SQS) or a message in transit never recovers live work.
/// Actions decided by the stored state alone are taken at once.
pub fn confirm(
    actions: Vec<(TaskId, Action)>,
    suspects: &mut Suspects,
) -> (Vec<(TaskId, Action)>, usize) {
    let previous = std::mem::take(suspects);
    let mut now = Vec::new();
    for (task, action) in actions {
        let key = match &action {
            Action::Requeue { subtask, attempt } | Action::FailLost { subtask, attempt } => {
                Some((task, *subtask, *attempt))
            }
            Action::FinishCancel | Action::QueueReady => None,
        };
        match key {
            Some(k) if !previous.contains(&k) => {
                suspects.insert(k);
            }
            _ => now.push((task, action)),
        }
    }
    let unconfirmed = suspects.len();
    (now, unconfirmed)
}

/// One sweep; returns how many candidates wait for a later sweep.
async fn sweep(
    cx: &Coordinator,
    min_idle: Duration,
    startup: bool,
    suspects: &mut Suspects,
) -> Result<usize, SweepError> {
    let mut statuses = vec![TaskStatus::Queued, TaskStatus::Running];
    if startup {
        statuses.push(TaskStatus::Cancelled);
    }
    let mut tasks = Vec::new();
    for status in statuses {
        let mut cursor = None;
        loop {
            let page = cx
                .store
                .list_tasks(&TaskQuery {
                    status: Some(status),
                    limit: PAGE,
                    cursor,
                    ..Default::default()
                })
                .await?;
            tasks.extend(page.tasks);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    // Capability queues first, then the result queue (see the module doc).
    let mut queues = QueueView::default();
    for capability in Capability::ALL {
        let d = cx.queue.depth(QueueId::Capability(capability)).await?;
        queues.messages.insert(capability, d.visible + d.in_flight);
    }
    let results = cx.queue.depth(QueueId::Results).await?;
    // Dead-lettered results too: the dead-letter watcher applies them.
    queues.results_pending = results.visible + results.in_flight + results.dead;
    let plan = plan(&tasks, &queues, min_idle, timefmt::now());
    if plan.deferred > 0 {
        tracing::info!(
            deferred = plan.deferred,
            results_pending = queues.results_pending,
            "recovery waits for pending results before deciding"
        );
    }
    let (now, unconfirmed) = confirm(plan.actions, suspects);
    for (task_id, action) in now {
        apply(cx, task_id, action).await;
    }
    Ok(plan.deferred + unconfirmed)
}

fn still(task: &Task, subtask: SubtaskId, status: SubtaskStatus, attempt: u32) -> bool {
    !task.status.is_terminal()
        && task
            .subtask(subtask)
            .is_some_and(|s| s.status == status && s.attempt == attempt)
}

async fn apply(cx: &Coordinator, task_id: TaskId, action: Action) {
    let max_attempts = cx.settings.coordinator.max_attempts;
    let reason = match &action {
        Action::Requeue { .. } => {
            "queued, but its message is missing (a crash between commit and send?): queued again as a new attempt"
        }
        Action::FailLost { .. } => {
            "running, but its worker is gone and neither its message nor its result is left"
        }
        Action::FinishCancel => "cancelled task with unfinished subtasks: cancelled them",
        Action::QueueReady => "ready subtasks were not queued: queued them",
    };
    let r = mutate(cx, task_id, |task, now| match &action {
        Action::Requeue { subtask, attempt } => {
            if !still(task, *subtask, SubtaskStatus::Queued, *attempt) {
                return Ok(Applied::Ignored("moved on".into()));
            }
            if let Some(sub) = task.subtasks.iter_mut().find(|s| s.id == *subtask) {
                sub.status = sub.status.transition(SubtaskStatus::Pending)?;
            }
            // `mutate` queues it again (attempt + 1) and sends its message.
            Ok(Applied::Changed)
        }
        Action::FailLost { subtask, attempt } => {
            if !still(task, *subtask, SubtaskStatus::Running, *attempt) {
                return Ok(Applied::Ignored("moved on".into()));
            }
            let outcome = Outcome::failed(
                OutcomeKind::Infrastructure,
                format!("recovered after a crash: {reason}"),
                true,
            );
            Ok(task.apply_outcome(*subtask, *attempt, outcome, max_attempts, now)?)
        }
        Action::FinishCancel => {
            if task.status != TaskStatus::Cancelled
                || task.subtasks.iter().all(|s| s.status.is_terminal())
            {
                return Ok(Applied::Ignored("nothing to finish".into()));
            }
            let why = task.error.clone().unwrap_or_else(|| "cancelled".into());
            task.cancel(&why, now)?;
            Ok(Applied::Changed)
        }
        Action::QueueReady => {
            if task.clone().queue_ready(now).is_empty() {
                return Ok(Applied::Ignored("nothing ready".into()));
            }
            Ok(Applied::Changed)
        }
    })
    .await;
    let subtask = match &action {
        Action::Requeue { subtask, .. } | Action::FailLost { subtask, .. } => Some(*subtask),
        _ => None,
    };
    match r {
        Ok((_, Applied::Changed)) => {
            tracing::warn!(task_id = %task_id, subtask_id = ?subtask.map(|s| s.to_string()),
                reason, "recovered orphaned work");
            let event = NewEvent {
                subtask_id: subtask,
                kind: EventKind::State,
                at: timefmt::now(),
                data: serde_json::to_value(StateChange::Recovery {
                    reason: reason.to_string(),
                })
                .unwrap_or_default(),
            };
            if let Err(e) = cx.store.append_events(task_id, &[event]).await {
                tracing::warn!(task_id = %task_id, error = %e, "cannot record the recovery event");
            }
            cx.bus.events_appended(task_id);
        }
        Ok((_, Applied::Ignored(why))) => {
            tracing::debug!(task_id = %task_id, why = %why, "recovery: task moved on")
        }
        Err(ChangeError::NotFound(_)) => {}
        Err(e) => tracing::warn!(task_id = %task_id, error = %e, "recovery cannot change task"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ao_shared::pipeline::plan_subtasks;
    use ao_shared::task::TaskSource;

    fn task(caps: &[Capability], age_secs: i64) -> Task {
        let at = timefmt::now() - time::Duration::seconds(age_secs);
        let mut t = Task {
            profiles: Default::default(),
            id: TaskId::new(),
            status: TaskStatus::Queued,
            title: "t".into(),
            prompt: "p".into(),
            repository: "/tmp/r".into(),
            branch: "agent/x".into(),
            base_branch: None,
            pipeline: "test".into(),
            source: TaskSource::Api,
            created_at: at,
            updated_at: at,
            error: None,
            version: 1,
            subtasks: plan_subtasks(caps),
            approval: Default::default(),
            review_round: None,
            ci_round: None,
            ci_rounds: Vec::new(),
            planning: None,
        };
        t.queue_ready(at);
        t.updated_at = at;
        t
    }

    fn view(coder: u64, results: u64) -> QueueView {
        QueueView {
            messages: [(Capability::Coder, coder)].into_iter().collect(),
            results_pending: results,
        }
    }

    const STALE: Duration = Duration::from_secs(300);

    #[test]
    fn a_queued_subtask_without_a_message_is_requeued_once_stale() {
        let t = task(&[Capability::Coder], 600);
        let p = plan(std::slice::from_ref(&t), &view(0, 0), STALE, timefmt::now());
        assert_eq!(
            p.actions,
            vec![(
                t.id,
                Action::Requeue {
                    subtask: t.subtasks[0].id,
                    attempt: 1
                }
            )]
        );
        // Not yet stale: left alone; with `all` (no minimum): recovered.
        let fresh = task(&[Capability::Coder], 5);
        assert!(plan(
            std::slice::from_ref(&fresh),
            &view(0, 0),
            STALE,
            timefmt::now()
        )
        .actions
        .is_empty());
        assert_eq!(
            plan(&[fresh], &view(0, 0), Duration::ZERO, timefmt::now())
                .actions
                .len(),
            1
        );
    }

    #[test]
    fn a_subtask_whose_message_may_be_alive_is_left_alone() {
        let t = task(&[Capability::Coder], 600);
        assert!(plan(&[t], &view(1, 0), STALE, timefmt::now())
            .actions
            .is_empty());
    }

    #[test]
    fn pending_results_defer_the_decision() {
        let t = task(&[Capability::Coder], 600);
        let p = plan(&[t], &view(0, 1), STALE, timefmt::now());
        assert!(p.actions.is_empty());
        assert_eq!(p.deferred, 1);
    }

    #[test]
    fn only_as_many_as_are_missing_are_recovered_oldest_first() {
        let old = task(&[Capability::Coder], 900);
        let mut running = task(&[Capability::Coder], 600);
        running.subtasks[0].status = SubtaskStatus::Running;
        running.status = TaskStatus::Running;
        let fresh = task(&[Capability::Coder], 1);
        let p = plan(
            &[fresh, running.clone(), old.clone()],
            &view(1, 0),
            STALE,
            timefmt::now(),
        );
        // three need a message, the queue holds one: two are missing, both stale ones.
        assert_eq!(p.actions.len(), 2, "{p:?}");
        assert_eq!(p.actions[0].0, old.id);
        assert_eq!(
            p.actions[1],
            (
                running.id,
                Action::FailLost {
                    subtask: running.subtasks[0].id,
                    attempt: 1
                }
            )
        );
    }

    #[test]
    fn cancelled_tasks_end_cancelled_and_finished_ones_are_ignored() {
        let mut t = task(&[Capability::Coder, Capability::Docs], 600);
        t.status = TaskStatus::Cancelled;
        let mut done = task(&[Capability::Coder], 600);
        done.status = TaskStatus::Succeeded;
        let p = plan(&[t.clone(), done], &view(0, 0), STALE, timefmt::now());
        assert_eq!(p.actions, vec![(t.id, Action::FinishCancel)]);
    }

    #[test]
    fn a_missing_message_is_acted_on_only_when_two_sweeps_agree() {
        let t = task(&[Capability::Coder], 600);
        let requeue = Action::Requeue {
            subtask: t.subtasks[0].id,
            attempt: 1,
        };
        let mut suspects = Suspects::new();
        let (now, wait) = confirm(
            vec![(t.id, requeue.clone()), (t.id, Action::QueueReady)],
            &mut suspects,
        );
        assert_eq!(
            now,
            vec![(t.id, Action::QueueReady)],
            "state-only actions at once"
        );
        assert_eq!(wait, 1);
        let (now, wait) = confirm(vec![(t.id, requeue.clone())], &mut suspects);
        assert_eq!(now, vec![(t.id, requeue.clone())]);
        assert_eq!(wait, 0);
        // A sweep that no longer sees it forgets it.
        confirm(vec![(t.id, requeue.clone())], &mut suspects);
        confirm(Vec::new(), &mut suspects);
        let (now, _) = confirm(vec![(t.id, requeue)], &mut suspects);
        assert!(now.is_empty());
    }

    #[test]
    fn ready_subtasks_left_pending_are_queued() {
        let mut t = task(&[Capability::Coder], 600);
        t.subtasks[0].status = SubtaskStatus::Pending;
        let p = plan(std::slice::from_ref(&t), &view(0, 0), STALE, timefmt::now());
        assert_eq!(p.actions, vec![(t.id, Action::QueueReady)]);
    }
}
