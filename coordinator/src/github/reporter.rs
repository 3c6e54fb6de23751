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
//!
//! Every replica runs a reporter, and each learns of the changes made in its own process.
//! A task whose end was applied by a replica that died before reporting it would be left
//! half-reported (a draft pull request, the running label) with nobody to notice: so a
//! fully reported ended task is marked so in its source (`reported`), and every reporter
//! passes over the ended GitHub tasks not so marked at start-up and every
//! [`ENDED_SWEEP`] (those that ended at least [`ENDED_SETTLE`] ago, and at most
//! [`ENDED_LOOKBACK`] ago). A task that runs again is unmarked by the orchestrator.
//!
//! A step GitHub refuses for good ([`GithubError::is_permanent`]: a locked conversation
//! or an archived repository answers 403, issues disabled 410) is logged once and not
//! tried again for that task by this process; every other step is still done. A creating
//! call that failed without a clear answer is looked up before it is made again.

use super::checks::ChecksVerdict;
use super::client::GithubError;
use super::once::Once;
use super::{api, progress, review, source};
use crate::bus::TaskChange;
use crate::github::Github;
use crate::orchestrator::{self, ChangeError};
use ao_shared::backoff::Backoff;
use ao_shared::capability::Capability;
use ao_shared::ids::{DeliveryId, TaskId};
use ao_shared::state::TaskQuery;
use ao_shared::status::{SubtaskStatus, TaskStatus};
use ao_shared::task::{Applied, FailureCause, Task, TaskSource};
use ao_shared::verdict::Verdict;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// First retry delay of a failed pass; doubled up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// How often the reporter looks for ended tasks no replica finished reporting.
pub const ENDED_SWEEP: Duration = Duration::from_secs(30);
/// An ended task is left to the replica that ended it this long before another steps in.
pub const ENDED_SETTLE: Duration = Duration::from_secs(20);
/// Ended tasks older than this are not looked at (nor are tasks from before `reported`).
pub const ENDED_LOOKBACK: Duration = Duration::from_secs(24 * 3600);
/// Tasks read per ended status by one sweep (the newest first).
const ENDED_SCAN: usize = 100;

/// Ended tasks whose steps refused for good are remembered at most (the oldest are
/// forgotten first).
const MAX_ENDED_REFUSED: usize = 10_000;

/// How long one replica's claim to make a task's progress comment lasts: longer than a
/// GitHub call takes, short enough that a replica that died holding it holds nothing up
/// for long.
const COMMENT_CLAIM_TTL: Duration = Duration::from_secs(30);

/// The lease that lets one replica at a time make a task's progress comment.
fn comment_claim(task: TaskId) -> String {
    format!("progress_comment/{task}")
}

/// Another replica holds the claim to make the task's progress comment: the pass is
/// tried again shortly, and then finds the comment's id stored.
#[derive(Debug, thiserror::Error)]
#[error("another replica is making the progress comment")]
struct CommentClaimed;

/// The task changed while a pass wrote what it showed: the pass runs again shortly.
#[derive(Debug, thiserror::Error)]
#[error("the task changed during the pass")]
struct Outdated;

/// The App's slug, to know its own comments and reviews (`github.app_slug`, else
/// GitHub's, see [`super::client::Client::app_slug`]).
async fn app_slug(gh: &Github) -> Option<&str> {
    gh.client.app_slug().await
}

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
    /// Steps GitHub refused for good; skipped from then on.
    refused: HashSet<Step>,
}

/// A step of a pass, as far as GitHub may refuse it for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    PullRequest,
    Review,
    Plan,
    PullBody,
    Ready,
    Comment,
    Labels,
    Notice,
}

impl Written {
    /// Whether `step` is still to be tried (GitHub has not refused it for good).
    fn open(&self, step: Step) -> bool {
        !self.refused.contains(&step)
    }

    /// The result of `step`'s call: `Ok(Some(_))` when done, `Ok(None)` when GitHub
    /// refused it for good (logged the first time; skipped from now on), the error when
    /// it may succeed later.
    fn settle<T>(
        &mut self,
        task: TaskId,
        step: Step,
        r: Result<T, GithubError>,
    ) -> Result<Option<T>, GithubError> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_permanent() => {
                if self.refused.insert(step) {
                    tracing::warn!(task_id = %task, step = ?step, error = %e,
                        "GitHub refuses this step for good; it is left out and the others are done");
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Runs until shutdown.
pub async fn run(gh: Arc<Github>, mut changes: broadcast::Receiver<TaskChange>) {
    let mut rx = gh.reporter.rx.lock().await;
    let mut written: HashMap<TaskId, Written> = HashMap::new();
    // Ended tasks whose refused steps are remembered, oldest first.
    let mut ended_refused: std::collections::VecDeque<TaskId> = Default::default();
    // Due passes: task → (when, current retry delay).
    let mut due: HashMap<TaskId, (Instant, Backoff)> = HashMap::new();
    for task in active_tasks(&gh).await {
        due.insert(task, (Instant::now(), retry_backoff()));
    }
    let mut sweep = tokio::time::interval(ENDED_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: at start-up every unreported ended task is due.
    let mut settle = Duration::ZERO;
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
            _ = sweep.tick() => {
                for task in unreported_ended(&gh, settle).await {
                    due.entry(task).or_insert_with(|| (Instant::now(), retry_backoff()));
                }
                settle = ENDED_SETTLE;
            }
            change = changes.recv() => match change {
                Ok(change) => {
                    if change.task().is_some_and(|t| super::is_github(t) && !ended_and_reported(t)) {
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
                            // Finished and fully reported: forget what was written, except
                            // the steps GitHub refused for good (a later change of the
                            // ended task must not try them again).
                            if done {
                                let refused = written.remove(&id).map(|w| w.refused).unwrap_or_default();
                                if !refused.is_empty() {
                                    ended_refused.push_back(id);
                                    if ended_refused.len() > MAX_ENDED_REFUSED {
                                        if let Some(old) = ended_refused.pop_front() {
                                            written.remove(&old);
                                        }
                                    }
                                    written.insert(id, Written { refused, ..Default::default() });
                                }
                            }
                        }
                        // Another replica makes the progress comment, or the task moved
                        // on during the pass: look again soon.
                        Err(e) if e.is::<CommentClaimed>() || e.is::<Outdated>() => {
                            tracing::debug!(task_id = %id, reason = %e, "the task is passed over again");
                            let backoff = due.remove(&id).map(|(_, b)| b).unwrap_or_else(retry_backoff);
                            due.insert(id, (Instant::now() + FIRST_RETRY_DELAY, backoff));
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

/// Whether `task` has ended and was fully reported (by any replica).
fn ended_and_reported(task: &Task) -> bool {
    task.status.is_terminal() && matches!(task.source, TaskSource::Github { reported: true, .. })
}

/// Ended GitHub tasks not marked reported that were last changed between `settle` and
/// [`ENDED_LOOKBACK`] ago ([`ENDED_SCAN`] newest of each ended status). A store error
/// is logged; the next sweep tries again.
async fn unreported_ended(gh: &Github, settle: Duration) -> Vec<TaskId> {
    let now = ao_shared::timefmt::now();
    let mut out = Vec::new();
    for status in [
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ] {
        let query = TaskQuery {
            status: Some(status),
            limit: ENDED_SCAN,
            ..Default::default()
        };
        match gh.store.list_tasks(&query).await {
            Ok(page) => out.extend(
                page.tasks
                    .iter()
                    .filter(|t| {
                        let age = now - t.updated_at;
                        matches!(
                            t.source,
                            TaskSource::Github {
                                reported: false,
                                ..
                            }
                        ) && age >= settle
                            && age <= ENDED_LOOKBACK
                    })
                    .map(|t| t.id),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot list ended tasks to report"),
        }
    }
    out
}

/// Marks an ended task fully reported (nothing when it runs again meanwhile).
async fn mark_reported(gh: &Github, id: TaskId) -> Result<(), ChangeError> {
    orchestrator::mutate(gh, id, |task, _| {
        let ended = task.status.is_terminal();
        match &mut task.source {
            TaskSource::Github { reported, .. } if ended && !*reported => {
                *reported = true;
                Ok(Applied::Changed)
            }
            _ => Ok(Applied::Ignored(
                "not an unreported ended GitHub task".into(),
            )),
        }
    })
    .await?;
    Ok(())
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

    // 1. The pull request, once there is a commit on the task branch (one opened before
    // a crash, or by a creation whose answer was lost, is found and adopted). A plan's
    // step commits on its own step branch: the task branch exists only once an
    // integration merged it.
    let pushed = task.subtasks.iter().any(|s| {
        s.works_on_task_branch() && s.outcome.as_ref().is_some_and(|o| o.commit.is_some())
    });
    // A repository's first commit has no base branch to ask for: the progress comment
    // says so, and no pull request is tried.
    let pushed = pushed && !progress::first_commit(&task);
    if pull_request.is_none() && pushed && written.open(Step::PullRequest) {
        let found = api::find_pull(c, inst, &repo, &task.branch).await;
        let pr = match written.settle(id, Step::PullRequest, found)? {
            Some(Some(pr)) => Some(pr),
            Some(None) => {
                let base = task.base_branch.clone().unwrap_or_else(|| "main".into());
                let body = progress::pull_body(&task, issue);
                let made =
                    api::create_pull(c, inst, &repo, &task.branch, &base, &task.title, &body).await;
                let pr = written.settle(id, Step::PullRequest, made)?;
                if pr.is_some() {
                    written.pull_body = Some(body);
                }
                pr
            }
            None => None,
        };
        if let Some(pr) = pr {
            let number = pr.number;
            task = set_source(gh, id, move |p, _| *p = Some(number)).await?;
            pull_request = Some(number);
            tracing::info!(task_id = %id, pull_request = number, "pull request opened");
        }
    }

    // 2. The reviewer's findings as a review on the pull request.
    if let (Some(pr), true) = (pull_request, written.open(Step::Review)) {
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
                let outcome = sub.outcome.as_ref();
                let summary = outcome.map_or("", |o| o.summary.as_str());
                let verdict = outcome.and_then(|o| {
                    let reply = o
                        .structured
                        .as_deref()
                        .cloned()
                        .or_else(|| ao_shared::plan::extract_json(&o.summary));
                    Verdict::from_reply(reply.as_ref())
                });
                // The lines the diff shows, only when there is a finding to place.
                let placed = matches!(&verdict, Some(Verdict::RequestChanges { findings })
                    if findings.iter().any(|f| f.file.is_some() && f.line.is_some()));
                let mut diff = BTreeMap::new();
                if placed {
                    match api::pull_files(c, inst, &repo, pr).await {
                        Ok(files) => {
                            for (name, patch) in files {
                                let lines = patch.as_deref().map(review::diff_lines);
                                diff.insert(name, lines.unwrap_or_default());
                            }
                        }
                        // No diff to place findings on: all of them go in the body.
                        Err(e) if e.is_permanent() => {
                            tracing::warn!(task_id = %id, error = %e,
                                "cannot read the pull request's files; the findings go in the review's body");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                let mut r = review::review(summary, verdict.as_ref(), &diff);
                let marker = progress::once_marker(&key);
                r.body.push_str(&format!("\n\n{marker}\n"));
                // A post tried before may have been made without an answer: look first.
                if owed {
                    let found =
                        api::has_review(c, inst, &repo, pr, &marker, app_slug(gh).await).await;
                    if written.settle(id, Step::Review, found)? == Some(true) {
                        written.owed_reviews.remove(&key);
                        written.reviews.insert(key);
                        continue;
                    }
                }
                let mut posted = api::create_review(c, inst, &repo, pr, &r.body, &r.comments).await;
                // The diff moved since it was read: the findings go in the body.
                if matches!(&posted, Err(GithubError::Status { status: 422, .. }))
                    && !r.comments.is_empty()
                {
                    r = review::without_line_comments(r);
                    posted = api::create_review(c, inst, &repo, pr, &r.body, &r.comments).await;
                }
                written.settle(id, Step::Review, posted)?;
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
        if written.reviews.contains(&key) || !written.open(Step::Plan) {
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
            // The planner's words as written: never mentions, links or images of the App.
            let mut body = format!(
                "**Plan** for task `{}`\n\n{}",
                task.id,
                progress::fenced(&plan)
            );
            if task.status == TaskStatus::AwaitingApproval {
                body.push_str(
                    "\nNothing is coded until someone with write access comments \
                     `/agent approve`, or `/agent reject <what to change>` for a new plan \
                     (or `/agent cancel`).\n",
                );
            }
            let marker = progress::once_marker(&key);
            body.push_str(&format!("\n{marker}\n"));
            // A post tried before may have been made without an answer: look first.
            let found = if owed {
                let found =
                    api::find_comment(c, inst, &repo, issue, &marker, app_slug(gh).await).await;
                written.settle(id, Step::Plan, found)?.flatten()
            } else {
                None
            };
            if found.is_none() {
                let posted = api::create_comment(c, inst, &repo, issue, &body).await;
                written.settle(id, Step::Plan, posted)?;
            }
            written.owed_reviews.remove(&key);
        }
        written.reviews.insert(key);
    }

    // 2c. The pull request's body follows what it shows (the refused network
    // destinations), edited only when that changed.
    if let (Some(pr), true) = (pull_request, written.open(Step::PullBody)) {
        let body = progress::pull_body(&task, issue);
        let stale = match &written.pull_body {
            Some(last) => *last != body,
            // Written before this process: rewrite it only when it has more to say.
            None => body != progress::pull_body_plain(&task, issue),
        };
        if stale {
            let edited = api::update_pull_body(c, inst, &repo, pr, &body).await;
            written.settle(id, Step::PullBody, edited)?;
        }
        written.pull_body = Some(body);
    }

    // 3. Ready for review when the task succeeded and, with
    // `github.ready_waits_for_checks`, the checks on the branch's head passed (a check
    // that completes notifies the reporter again; one that fails starts a fix round).
    let checks_pass = match (task.status, written.ready, pull_request) {
        (TaskStatus::Succeeded, false, Some(_)) if gh.settings.github.ready_waits_for_checks => {
            match api::checks_of(c, inst, &repo, &task.branch).await {
                Ok((_, checks)) => {
                    let verdict = ChecksVerdict::of(&checks, &gh.settings.github.required_checks);
                    if !verdict.passed() {
                        tracing::info!(task_id = %id, pending = ?verdict.pending,
                            failed = verdict.failed.len(), missing = ?verdict.missing,
                            "the pull request waits for its checks before it is ready");
                    }
                    verdict.passed()
                }
                // Checks the App may not read (no `checks`/`statuses` permission) hold
                // nothing up.
                Err(e) if e.is_permanent() => {
                    tracing::warn!(task_id = %id, error = %e,
                        "cannot read the pull request's checks; it is marked ready without them");
                    true
                }
                Err(e) => return Err(e.into()),
            }
        }
        _ => true,
    };
    if let (Some(pr), TaskStatus::Succeeded, false, true, true) = (
        pull_request,
        task.status,
        written.ready,
        written.open(Step::Ready),
        checks_pass,
    ) {
        let current = api::get_pull(c, inst, &repo, pr).await;
        if let Some(current) = written.settle(id, Step::Ready, current)? {
            if current.draft {
                let marked = api::mark_ready(c, inst, &current.node_id).await;
                if written.settle(id, Step::Ready, marked)?.is_some() {
                    tracing::info!(task_id = %id, pull_request = pr, "pull request ready for review");
                }
            }
        }
        written.ready = true;
    }

    // 4. The progress comment, created once and edited in place.
    let body = progress::render(&task, pull_request);
    if written.open(Step::Comment) {
        match comment_id {
            None => {
                // One replica makes it: the holder of the task's comment claim, which
                // first looks for one with the task's marker (made by a process that
                // died, or whose answer was lost, before its id was stored).
                let claim = comment_claim(id);
                let holder = gh.leases.holder.as_str();
                let Some(grant) = gh
                    .store
                    .claim_lease(&claim, holder, COMMENT_CLAIM_TTL, None)
                    .await?
                else {
                    return Err(Box::new(CommentClaimed));
                };
                let stored = gh.store.get_task(id).await?.and_then(|t| match t.source {
                    TaskSource::Github {
                        progress_comment_id,
                        ..
                    } => progress_comment_id,
                    TaskSource::Api => None,
                });
                let found = match stored {
                    Some(cid) => Some(cid),
                    None => {
                        let marker = progress::marker(&task);
                        api::find_comment(c, inst, &repo, issue, &marker, app_slug(gh).await)
                            .await?
                    }
                };
                let made = match found {
                    Some(cid) => api::update_comment(c, inst, &repo, cid, &body)
                        .await
                        .map(|()| cid),
                    None => api::create_comment(c, inst, &repo, issue, &body).await,
                };
                if let Some(new_id) = written.settle(id, Step::Comment, made)? {
                    if stored.is_none() {
                        set_source(gh, id, move |_, cid| *cid = Some(new_id)).await?;
                    }
                    written.comment_body = Some(body.clone());
                }
                if let Err(e) = gh.store.release_lease(&claim, holder, grant.token).await {
                    tracing::debug!(task_id = %id, error = %e,
                        "cannot release the progress comment's claim; it expires");
                }
            }
            Some(cid) if written.comment_body.as_deref() != Some(body.as_str()) => {
                match api::update_comment(c, inst, &repo, cid, &body).await {
                    // Someone deleted the progress comment: a new one takes its place.
                    Err(GithubError::Status { status: 404, .. }) => {
                        let made = api::create_comment(c, inst, &repo, issue, &body).await;
                        // Made or not, no answer: the next pass looks for it by marker.
                        if made.as_ref().is_err_and(GithubError::is_ambiguous) {
                            set_source(gh, id, |_, cid| *cid = None).await?;
                        }
                        if let Some(new_id) = written.settle(id, Step::Comment, made)? {
                            set_source(gh, id, move |_, cid| *cid = Some(new_id)).await?;
                            tracing::info!(task_id = %id, "the progress comment was deleted; a new one is made");
                            written.comment_body = Some(body.clone());
                        }
                    }
                    edited => {
                        if written.settle(id, Step::Comment, edited)?.is_some() {
                            written.comment_body = Some(body.clone());
                        }
                    }
                }
            }
            Some(_) => {}
        }
    }

    // 5. Exactly one status label.
    let want = progress::status_label(task.status);
    if written.label != Some(want) && written.open(Step::Labels) {
        if let Some(l) = want {
            let added = api::add_labels(c, inst, &repo, issue, &[l]).await;
            written.settle(id, Step::Labels, added)?;
        }
        for other in progress::STATUS_LABELS.iter().filter(|l| Some(**l) != want) {
            if !written.open(Step::Labels) {
                break;
            }
            let removed = api::remove_label(c, inst, &repo, issue, other).await;
            written.settle(id, Step::Labels, removed)?;
        }
        written.label = Some(want);
    }

    // 6. Plain words when a push touching workflows was refused for lack of permission.
    if task.status == TaskStatus::Failed && written.open(Step::Notice) {
        let key = Once::WorkflowsNotice { task: task.id }.key();
        let refused = task.subtasks.iter().any(|s| {
            s.outcome
                .as_ref()
                .is_some_and(|o| o.cause == Some(FailureCause::WorkflowsPermission))
        });
        if refused && !written.notices.contains(&key) {
            if gh.store.record_delivery(&key).await? {
                // The token asks for `workflows: write` whenever the installation grants
                // it; say which case this is, as the installation shows it now.
                let granted = matches!(
                    api::installation_permission(c, inst, "workflows").await,
                    Ok(Some(level)) if level == "write"
                );
                let posted =
                    api::create_comment(c, inst, &repo, issue, workflows_notice(granted)).await;
                written.settle(id, Step::Notice, posted)?;
            }
            written.notices.insert(key);
        }
    }
    // What this pass showed is checked against the task as stored now: a replica held
    // up mid-pass (a stop, a slow call) may have written after another replica's newer
    // pass, and would leave GitHub showing an older state for good. Then it passes again.
    if let Some(now) = gh.store.get_task(id).await? {
        if progress::status_label(now.status) != want
            || progress::render(&now, pull_request) != body
        {
            return Err(Box::new(Outdated));
        }
    }
    let ended = task.status.is_terminal();
    if ended && !ended_and_reported(&task) {
        mark_reported(gh, id).await?;
    }
    Ok(ended)
}

/// The notice of a push GitHub refused because it touches `.github/workflows/` without
/// the `workflows` permission. `granted`: whether the installation grants the App
/// `workflows: write` now (then a retry's token carries it).
pub fn workflows_notice(granted: bool) -> &'static str {
    if granted {
        "GitHub refused the push: the agent's change touches `.github/workflows/`, and the \
         token it pushed with had no **workflows** permission. The App's installation grants \
         Workflows now, so `/agent retry` pushes with it."
    } else {
        "GitHub refused the push: the agent's change touches `.github/workflows/`, and the \
         App's installation on this repository lacks the **workflows** permission, so no \
         token of the App may change workflow files. An owner may grant Workflows (read and \
         write) in the installation's settings and then `/agent retry`; or ask for a change \
         that leaves the workflow files alone, or edit them yourself."
    }
}

#[cfg(test)]
mod tests {
    use super::workflows_notice;

    #[test]
    fn the_workflows_notice_says_whether_the_installation_grants_the_permission() {
        let lacking = workflows_notice(false);
        assert!(lacking.contains("lacks the **workflows** permission"));
        assert!(lacking.contains("grant Workflows"));
        let granted = workflows_notice(true);
        assert!(granted.contains("grants Workflows now"));
        assert!(
            !granted.contains("lacks"),
            "not 'grant it' when it is granted"
        );
    }
}
