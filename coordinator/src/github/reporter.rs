//! The reporter: brings GitHub in line with a stored task — the draft pull request once
//! a commit is pushed, ready for review when the task succeeds; the reviewer's findings
//! as a pull-request review; the one progress comment, edited in place; the status label.
//!
//! It is level-driven, not event-driven: each pass reads the task as stored and does
//! whatever is still missing, so a pass that fails (GitHub 5xx, rate limit) is simply
//! repeated later with backoff, and nothing is lost. Passes run in one task of their own,
//! so the result consumer never waits for GitHub. What was already written is remembered
//! in memory (to skip needless edits); the ids that must survive a restart (progress
//! comment, pull request) are stored in the task's source.

use super::once::Once;
use super::{api, progress, source};
use crate::bus::TaskChange;
use crate::github::Github;
use crate::orchestrator::{self, ChangeError};
use ao_shared::backoff::Backoff;
use ao_shared::capability::Capability;
use ao_shared::ids::{DeliveryId, TaskId};
use ao_shared::state::TaskQuery;
use ao_shared::status::{SubtaskStatus, TaskStatus};
use ao_shared::task::{Applied, FailureCause, Task, TaskSource};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// First retry delay of a failed pass; doubled up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The delays between failed passes over one task.
fn retry_backoff() -> Backoff {
    Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY)
}

/// Wakes the reporter.
pub struct Handle {
    tx: mpsc::UnboundedSender<TaskId>,
    /// Held by the running reporter; kept here so that a restarted one finds it.
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<TaskId>>,
}

impl Default for Handle {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

impl Handle {
    pub fn notify(&self, task: TaskId) {
        let _ = self.tx.send(task);
    }
}

/// What was already written for a task.
#[derive(Default)]
struct Written {
    comment_body: Option<String>,
    /// The pull request body last written (`None`: not by this process).
    pull_body: Option<String>,
    label: Option<Option<&'static str>>,
    ready: bool,
    reviews: HashSet<DeliveryId>,
    owed_reviews: HashSet<DeliveryId>,
    notices: HashSet<DeliveryId>,
}

/// Runs until shutdown.
pub async fn run(gh: Arc<Github>, mut changes: broadcast::Receiver<TaskChange>) {
    let mut rx = gh.reporter.rx.lock().await;
    let mut written: HashMap<TaskId, Written> = HashMap::new();
    // Due passes: task → (when, current retry delay).
    let mut due: HashMap<TaskId, (Instant, Backoff)> = HashMap::new();
    for task in active_tasks(&gh).await {
        due.insert(task, (Instant::now(), retry_backoff()));
    }
    loop {
        let next = due.values().map(|(at, _)| *at).min();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = gh.shutdown.cancelled() => break,
            change = changes.recv() => match change {
                Ok(change) => {
                    if change.task().is_some_and(super::is_github) {
                        due.entry(change.task_id).and_modify(|(at, _)| *at = Instant::now())
                            .or_insert_with(|| (Instant::now(), retry_backoff()));
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "reporter fell behind the task changes; re-reading active tasks");
                    for task in active_tasks(&gh).await {
                        due.entry(task).or_insert_with(|| (Instant::now(), retry_backoff()));
                    }
                }
                Err(RecvError::Closed) => break,
            },
            id = rx.recv() => match id {
                Some(id) => {
                    due.entry(id).and_modify(|(at, _)| *at = Instant::now())
                        .or_insert_with(|| (Instant::now(), retry_backoff()));
                }
                None => break,
            },
            _ = sleep => {
                let now = Instant::now();
                let ready: Vec<TaskId> = due.iter().filter(|(_, (at, _))| *at <= now)
                    .map(|(id, _)| *id).collect();
                for id in ready {
                    let entry = written.entry(id).or_default();
                    match pass(&gh, id, entry).await {
                        Ok(done) => {
                            due.remove(&id);
                            // Finished and fully reported: forget what was written.
                            if done {
                                written.remove(&id);
                            }
                        }
                        Err(e) => {
                            let mut backoff = due.remove(&id).map(|(_, b)| b).unwrap_or_else(retry_backoff);
                            let delay = backoff.next_delay();
                            tracing::warn!(task_id = %id, error = %e, retry_in_s = delay.as_secs(),
                                "cannot report to GitHub yet; will retry");
                            due.insert(id, (Instant::now() + delay, backoff));
                        }
                    }
                }
            }
        }
    }
    tracing::info!("GitHub reporter stopped");
}

/// GitHub tasks not yet finished, to report on at start-up.
async fn active_tasks(gh: &Github) -> Vec<TaskId> {
    let mut out = Vec::new();
    for status in [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::AwaitingApproval,
    ] {
        let query = TaskQuery {
            status: Some(status),
            limit: 500,
            ..Default::default()
        };
        if let Ok(page) = gh.store.list_tasks(&query).await {
            out.extend(
                page.tasks
                    .iter()
                    .filter(|t| matches!(t.source, TaskSource::Github { .. }))
                    .map(|t| t.id),
            );
        }
    }
    out
}

/// `Ok(true)` when the task has ended and everything about it is reported.
type PassResult = Result<bool, Box<dyn std::error::Error + Send + Sync>>;

/// Stores a change of the task's GitHub ids.
async fn set_source(
    gh: &Github,
    id: TaskId,
    f: impl Fn(&mut Option<u64>, &mut Option<u64>) + Send,
) -> Result<Task, ChangeError> {
    let (task, _) = orchestrator::mutate(gh, id, |task, _| {
        if let TaskSource::Github {
            pull_request,
            progress_comment_id,
            ..
        } = &mut task.source
        {
            f(pull_request, progress_comment_id);
            Ok(Applied::Changed)
        } else {
            Ok(Applied::Ignored("not a GitHub task".into()))
        }
    })
    .await?;
    Ok(task)
}

/// One pass over one task.
async fn pass(gh: &Github, id: TaskId, written: &mut Written) -> PassResult {
    let Some(mut task) = gh.store.get_task(id).await? else {
        return Ok(true);
    };
    let Some((inst, repo, issue)) = source(&task) else {
        return Ok(true);
    };
    let c = &gh.client;
    if !c.configured() {
        tracing::warn!(task_id = %id, "github.app_id / github.private_key not set: cannot report");
        return Ok(true);
    }
    let (mut pull_request, comment_id) = match &task.source {
        TaskSource::Github {
            pull_request,
            progress_comment_id,
            ..
        } => (*pull_request, *progress_comment_id),
        TaskSource::Api => (None, None),
    };

    // 1. The pull request, once there is a commit on the branch.
    let pushed = task
        .subtasks
        .iter()
        .any(|s| s.outcome.as_ref().is_some_and(|o| o.commit.is_some()));
    if pull_request.is_none() && pushed {
        let pr = match api::find_pull(c, inst, &repo, &task.branch).await? {
            Some(pr) => pr,
            None => {
                let base = task.base_branch.clone().unwrap_or_else(|| "main".into());
                let body = progress::pull_body(&task, issue);
                let pr = api::create_pull(c, inst, &repo, &task.branch, &base, &task.title, &body)
                    .await?;
                written.pull_body = Some(body);
                pr
            }
        };
        let number = pr.number;
        task = set_source(gh, id, move |p, _| *p = Some(number)).await?;
        pull_request = Some(number);
        tracing::info!(task_id = %id, pull_request = number, "pull request opened");
    }

    // 2. The reviewer's findings as a review on the pull request.
    if let Some(pr) = pull_request {
        for sub in task.subtasks.iter().filter(|s| {
            s.capability == Capability::Reviewer && s.status == SubtaskStatus::Succeeded
        }) {
            let key = Once::Review {
                task: task.id,
                subtask: sub.id,
                attempt: sub.attempt,
            }
            .key();
            if written.reviews.contains(&key) {
                continue;
            }
            // Recorded before it is posted: after a crash in between, the review is not
            // posted twice (at the price of, rarely, not at all). A post that fails is
            // owed and tried again by the next pass.
            let owed = written.owed_reviews.contains(&key);
            if owed || gh.store.record_delivery(&key).await? {
                written.owed_reviews.insert(key.clone());
                let summary = sub
                    .outcome
                    .as_ref()
                    .map(|o| o.summary.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "The reviewer found nothing to add.".into());
                let body = format!("**Reviewer agent**\n\n{summary}");
                api::create_review(c, inst, &repo, pr, &body).await?;
                written.owed_reviews.remove(&key);
            }
            written.reviews.insert(key);
        }
    }

    // 2b. The planner's plan on the issue, once per attempt.
    for sub in task
        .subtasks
        .iter()
        .filter(|s| s.capability == Capability::Planner && s.status == SubtaskStatus::Succeeded)
    {
        let key = Once::Plan {
            task: task.id,
            subtask: sub.id,
            attempt: sub.attempt,
        }
        .key();
        if written.reviews.contains(&key) {
            continue;
        }
        let owed = written.owed_reviews.contains(&key);
        if owed || gh.store.record_delivery(&key).await? {
            written.owed_reviews.insert(key.clone());
            let plan = sub
                .outcome
                .as_ref()
                .map(|o| o.summary.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "(the planner wrote no plan)".into());
            let mut body = format!("**Plan** for task `{}`\n\n{plan}\n", task.id);
            if task.status == TaskStatus::AwaitingApproval {
                body.push_str(
                    "\nNothing is coded until someone with write access comments \
                     `/agent approve` (or `/agent cancel`).\n",
                );
            }
            api::create_comment(c, inst, &repo, issue, &body).await?;
            written.owed_reviews.remove(&key);
        }
        written.reviews.insert(key);
    }

    // 2c. The pull request's body follows what it shows (the refused network
    // destinations), edited only when that changed.
    if let Some(pr) = pull_request {
        let body = progress::pull_body(&task, issue);
        let stale = match &written.pull_body {
            Some(last) => *last != body,
            // Written before this process: rewrite it only when it has more to say.
            None => body != progress::pull_body_plain(&task, issue),
        };
        if stale {
            api::update_pull_body(c, inst, &repo, pr, &body).await?;
        }
        written.pull_body = Some(body);
    }

    // 3. Ready for review when the task succeeded.
    if let (Some(pr), TaskStatus::Succeeded, false) = (pull_request, task.status, written.ready) {
        let current = api::get_pull(c, inst, &repo, pr).await?;
        if current.draft {
            api::mark_ready(c, inst, &current.node_id).await?;
            tracing::info!(task_id = %id, pull_request = pr, "pull request ready for review");
        }
        written.ready = true;
    }

    // 4. The progress comment, created once and edited in place.
    let body = progress::render(&task, pull_request);
    match comment_id {
        None => {
            let new_id = api::create_comment(c, inst, &repo, issue, &body).await?;
            set_source(gh, id, move |_, cid| *cid = Some(new_id)).await?;
            written.comment_body = Some(body);
        }
        Some(cid) if written.comment_body.as_deref() != Some(body.as_str()) => {
            api::update_comment(c, inst, &repo, cid, &body).await?;
            written.comment_body = Some(body);
        }
        Some(_) => {}
    }

    // 5. Exactly one status label.
    let want = progress::status_label(task.status);
    if written.label != Some(want) {
        if let Some(l) = want {
            api::add_labels(c, inst, &repo, issue, &[l]).await?;
        }
        for other in progress::STATUS_LABELS.iter().filter(|l| Some(**l) != want) {
            api::remove_label(c, inst, &repo, issue, other).await?;
        }
        written.label = Some(want);
    }

    // 6. Plain words when a push touching workflows was refused for lack of permission.
    if task.status == TaskStatus::Failed {
        let key = Once::WorkflowsNotice { task: task.id }.key();
        let refused = task.subtasks.iter().any(|s| {
            s.outcome
                .as_ref()
                .is_some_and(|o| o.cause == Some(FailureCause::WorkflowsPermission))
        });
        if refused && !written.notices.contains(&key) {
            if gh.store.record_delivery(&key).await? {
                api::create_comment(
                    c,
                    inst,
                    &repo,
                    issue,
                    "GitHub refused the push: the agent's change touches \
                     `.github/workflows/`, and the token the agent pushes with has no \
                     **workflows** permission (agents are not given it). Ask for a change that \
                     leaves the workflow files alone and `/agent retry`, or edit the workflow \
                     files yourself.",
                )
                .await?;
            }
            written.notices.insert(key);
        }
    }
    Ok(task.status.is_terminal())
}
