//! How tasks are created and changed: every change is read → apply a domain rule →
//! conditional write (retried on conflict; read back when it reports an error, since it
//! may have been applied) → send the messages of newly ready subtasks.
//! State-change events are derived by comparing the task before and after, in one place,
//! stored with the write, and published on the bus ([`crate::bus`]) once stored: this
//! module is the only writer of tasks and knows none of the bus's subscribers.

use crate::bus::{ChangeKind, TaskChange};
use crate::context::Coordinator;
use ao_shared::backoff::Backoff;
use ao_shared::capability::Capability;
use ao_shared::config::PlannerSettings;
use ao_shared::ids::{DeliveryId, SubtaskId, TaskId};
use ao_shared::message::SubtaskMessage;
use ao_shared::pipeline::plan_subtasks;
use ao_shared::plan::PlanLimits;
use ao_shared::profile::RepoProfile;
use ao_shared::queue::QueueId;
use ao_shared::state::{EventKind, NewEvent, StoreError};
use ao_shared::status::{SubtaskStatus, TaskStatus, TransitionError};
use ao_shared::task::{Applied, Approval, Planning, StateChange, Step, Task, TaskSource};
use ao_shared::timefmt::{self, Timestamp};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// First delay before a failed send of a subtask message is retried.
const SEND_FIRST_RETRY: Duration = Duration::from_millis(100);
/// How often a conflicting write is retried before giving up.
const MAX_CONFLICT_RETRIES: usize = 20;

/// Why a change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("task {0} not found")]
    NotFound(TaskId),
    #[error(transparent)]
    Illegal(#[from] TransitionError),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(StoreError),
    #[error("task {0} kept changing under us; gave up after {MAX_CONFLICT_RETRIES} attempts")]
    Contended(TaskId),
}

/// What a new task needs.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub title: String,
    pub prompt: String,
    pub repository: String,
    pub branch: String,
    pub base_branch: Option<String>,
    pub pipeline_name: String,
    pub pipeline: Vec<Capability>,
    pub source: TaskSource,
    /// Whether and when the task waits for approval.
    pub approval: Approval,
    /// Which review round this task answers, if it is one.
    pub review_round: Option<u32>,
    /// For a round of fixing failing checks: every round on the pull request so far,
    /// this one last (its number is the task's `ci_round`); empty for any other task.
    pub ci_rounds: Vec<ao_shared::task::CiRound>,
    /// The repository's narrowing of the agent profiles.
    pub profiles: BTreeMap<Capability, RepoProfile>,
    /// The repository's narrowing of the planner's bounds.
    pub planner: Option<PlannerSettings>,
}

/// How the planner drives a task of `pipeline`: when the pipeline starts with the
/// planner, its plan becomes the task's subtasks, in place of the rest of the pipeline,
/// whose capabilities are the ones the plan may use.
pub fn planning(pipeline: &[Capability], bounds: PlannerSettings) -> Option<Planning> {
    let (first, rest) = pipeline.split_first()?;
    if *first != Capability::Planner {
        return None;
    }
    let mut allowed: Vec<Capability> = rest
        .iter()
        .copied()
        .filter(|c| *c != Capability::Planner)
        .collect();
    allowed.sort();
    allowed.dedup();
    if allowed.is_empty() {
        return None;
    }
    Some(Planning {
        limits: PlanLimits {
            max_steps: bounds.max_steps,
            max_parallel: bounds.max_parallel,
            allowed,
            max_fix_rounds: 0,
        },
        repairs: 0,
        expanded: false,
        summary: String::new(),
        fix_rounds: 0,
        rejections: 0,
    })
}

/// The state changes that make `after` from `before`, as stored events.
fn stored_events(changes: &[(Option<SubtaskId>, StateChange)], at: Timestamp) -> Vec<NewEvent> {
    changes
        .iter()
        .map(|(subtask_id, change)| NewEvent {
            subtask_id: *subtask_id,
            kind: EventKind::State,
            at,
            // A plain enum of plain fields: encoding cannot fail.
            data: serde_json::to_value(change).unwrap_or_default(),
        })
        .collect()
}

/// Tells the bus that the task was stored with `changes`.
fn publish(cx: &Coordinator, stored: Task, changes: Vec<(Option<SubtaskId>, StateChange)>) {
    cx.publish(TaskChange {
        task_id: stored.id,
        kind: ChangeKind::State {
            task: Arc::new(stored),
            changes,
        },
    });
}

/// Creates a task, queues its first subtasks, and returns it as stored.
pub async fn create_task(
    cx: &Coordinator,
    new: NewTask,
    delivery: Option<&DeliveryId>,
) -> Result<Task, ChangeError> {
    let now = timefmt::now();
    let mut task = Task {
        profiles: new.profiles,
        id: TaskId::new(),
        status: TaskStatus::Queued,
        title: new.title,
        prompt: new.prompt,
        repository: new.repository,
        branch: new.branch,
        base_branch: new.base_branch,
        pipeline: new.pipeline_name,
        source: new.source,
        created_at: now,
        updated_at: now,
        error: None,
        version: 0,
        subtasks: plan_subtasks(&new.pipeline),
        approval: new.approval,
        review_round: new.review_round,
        ci_round: new.ci_rounds.last().map(|r| r.round),
        ci_rounds: new.ci_rounds,
        planning: planning(&new.pipeline, cx.settings.planner.narrowed(new.planner)).map(
            |mut p| {
                p.limits.max_fix_rounds = cx.settings.pipeline.max_fix_rounds;
                p
            },
        ),
    };
    if new.approval == Approval::BeforeStart {
        task.status = TaskStatus::AwaitingApproval;
    }
    let ready = task.queue_ready(now);
    let changes = StateChange::between(None, &task);
    let events = stored_events(&changes, now);
    let stored = cx
        .store
        .create_task(&task, delivery, &events)
        .await
        .map_err(ChangeError::Store)?;
    tracing::info!(task_id = %stored.id, repository = %stored.repository,
        branch = %stored.branch, pipeline = %stored.pipeline, "task created");
    publish(cx, stored.clone(), changes);
    send_ready(cx, &stored, &ready).await;
    Ok(stored)
}

/// Applies `change` to the stored task, retrying on conflicting writes, then sends the
/// messages of subtasks that became ready. `change` returns `Ignored` to write nothing.
pub async fn mutate<F>(
    cx: &Coordinator,
    id: TaskId,
    mut change: F,
) -> Result<(Task, Applied), ChangeError>
where
    F: FnMut(&mut Task, Timestamp) -> Result<Applied, ChangeError>,
{
    for _ in 0..MAX_CONFLICT_RETRIES {
        let before = cx
            .store
            .get_task(id)
            .await
            .map_err(ChangeError::Store)?
            .ok_or(ChangeError::NotFound(id))?;
        let mut task = before.clone();
        let now = timefmt::now();
        let applied = change(&mut task, now)?;
        if let Applied::Ignored(_) = applied {
            return Ok((before, applied));
        }
        // A task that runs again is to be reported again when it ends.
        if !task.status.is_terminal() {
            if let TaskSource::Github { reported, .. } = &mut task.source {
                *reported = false;
            }
        }
        let ready = task.queue_ready(now);
        task.updated_at = now;
        let changes = StateChange::between(Some(&before), &task);
        let events = stored_events(&changes, now);
        match cx.store.update_task(&task, &events).await {
            Ok(stored) => {
                publish(cx, stored.clone(), changes);
                send_ready(cx, &stored, &ready).await;
                return Ok((stored, applied));
            }
            Err(StoreError::Conflict(_)) => {
                tracing::debug!(task_id = %id, "conflicting write, re-reading");
                continue;
            }
            // The write may have been applied although it reported an error (a timeout,
            // a 5xx after the SDK's retries): read it back before failing, so that what
            // follows a stored change (the next messages, the bus) is not skipped.
            Err(StoreError::Backend(e)) => match written(cx, &task).await {
                Some(stored) => {
                    tracing::warn!(task_id = %id, error = %e,
                        "the write reported an error but was applied; going on");
                    publish(cx, stored.clone(), changes);
                    send_ready(cx, &stored, &ready).await;
                    return Ok((stored, applied));
                }
                None => return Err(ChangeError::Store(StoreError::Backend(e))),
            },
            Err(e) => return Err(ChangeError::Store(e)),
        }
    }
    Err(ChangeError::Contended(id))
}

/// How often a write that reported an error is read back to learn whether it was applied.
const READ_BACK_TRIES: usize = 4;
/// First delay between read-backs; doubled each time.
const READ_BACK_FIRST_DELAY: Duration = Duration::from_millis(200);

/// The task as stored, if the write of `task` (as passed to `update_task`, with the
/// version it was read at) was applied; `None` if it was not, or it cannot be told (the
/// store stays unreadable, or someone wrote after it).
async fn written(cx: &Coordinator, task: &Task) -> Option<Task> {
    let mut backoff = Backoff::new(READ_BACK_FIRST_DELAY, READ_BACK_FIRST_DELAY * 8);
    for _ in 0..READ_BACK_TRIES {
        match cx.store.get_task(task.id).await {
            Ok(Some(stored)) => {
                let mut expected = task.clone();
                expected.version = task.version + 1;
                return (stored == expected).then_some(stored);
            }
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(task_id = %task.id, error = %e, "cannot read the write back yet");
                backoff.wait().await;
            }
        }
    }
    None
}

/// The work order for one subtask of a task.
pub fn subtask_message(task: &Task, id: SubtaskId) -> Option<SubtaskMessage> {
    let sub = task.subtask(id)?;
    Some(SubtaskMessage {
        profile: task.profiles.get(&sub.capability).cloned(),
        task_id: task.id,
        subtask_id: sub.id,
        attempt: sub.attempt,
        capability: sub.capability,
        repository: task.repository.clone(),
        // A step that changes code works on its own branch, made from the task branch.
        branch: match &sub.step {
            Some(Step::Plan {
                branch: Some(b), ..
            }) => b.clone(),
            _ => task.branch.clone(),
        },
        start_from: match &sub.step {
            Some(Step::Plan {
                branch: Some(_), ..
            }) => Some(task.branch.clone()),
            _ => None,
        },
        step: sub.step.clone(),
        base_branch: task.base_branch.clone(),
        title: task.title.clone(),
        prompt: task.prompt.clone(),
        instructions: task.instructions_for(sub.id),
        enqueued_at: sub.queued_at.unwrap_or(task.updated_at),
        github: match &task.source {
            TaskSource::Github {
                installation_id,
                repo,
                ..
            } => Some(ao_shared::message::GithubTarget {
                installation_id: *installation_id,
                repo: repo.clone(),
            }),
            TaskSource::Api => None,
        },
        // The worker of the task's latest other subtask has its working state; but steps
        // that run at the same time are meant for different workers, so none is preferred
        // while another subtask of the task is queued or running.
        prefer_worker: task
            .subtasks
            .iter()
            .filter(|s| s.id != sub.id && s.worker.is_some())
            .max_by_key(|s| s.finished_at.or(s.started_at))
            .and_then(|s| s.worker.clone())
            .filter(|_| {
                !task.subtasks.iter().any(|s| {
                    s.id != sub.id
                        && matches!(s.status, SubtaskStatus::Queued | SubtaskStatus::Running)
                })
            }),
        // What this subtask's attempts since the last manual retry cost.
        spent_usd: (sub.cost_usd - sub.retry_cost_base).max(0.0),
    })
}

/// Sends the messages of newly queued subtasks, retrying briefly. A message that still
/// cannot be sent is logged; start-up recovery re-sends subtasks left queued.
pub async fn send_ready(cx: &Coordinator, task: &Task, ready: &[SubtaskId]) {
    for id in ready {
        let Some(message) = subtask_message(task, *id) else {
            continue;
        };
        let body = match message.encode() {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(task_id = %task.id, subtask_id = %id, error = %e,
                    "cannot encode subtask message");
                continue;
            }
        };
        let queue = QueueId::Capability(message.capability);
        let mut backoff = Backoff::new(SEND_FIRST_RETRY, SEND_FIRST_RETRY * 8);
        for attempt in 1..=5 {
            match cx.queue.send(queue, &body).await {
                Ok(_) => {
                    tracing::info!(task_id = %task.id, subtask_id = %id,
                        capability = %message.capability, attempt = message.attempt,
                        "subtask queued");
                    break;
                }
                Err(e) if attempt < 5 => {
                    tracing::warn!(task_id = %task.id, subtask_id = %id, error = %e,
                        "send failed, retrying");
                    backoff.wait().await;
                }
                Err(e) => tracing::error!(task_id = %task.id, subtask_id = %id, error = %e,
                    "cannot send subtask message; recovery will re-send it"),
            }
        }
    }
}
