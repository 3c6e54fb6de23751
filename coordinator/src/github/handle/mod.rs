//! The consumer of webhook deliveries: one at a time, each in its own span. Labels and
//! `/agent` commands become tasks or changes of tasks; reviews on the agent's own pull
//! request become a follow-up coder run on the same branch.
//!
//! Split by job: intake (this module: the consumer and the dispatch of each event),
//! [`start`] (starting work, the wait for a free slot), [`commands`], [`reviews`] and
//! [`permissions`] (who may act).
//!
//! Rules: bots are ignored unless named in `github.allowed_bots` (another bot's label or
//! command is answered once, saying why nothing runs); the sender of a label or command
//! needs write, maintain or admin on the repository, and is told once per issue when
//! they lack it; a delivery creates at most one task (the task is stored together with
//! its delivery id, or a run-once key). A closed issue starts nothing (said on the
//! issue); commands on a pull request's conversation act on the task that owns the pull
//! request ([`pulls`]), and a trigger label on a pull request is answered.
//!
//! Deliveries come from the inbox in the state store (see [`crate::webhook`]): a delivery
//! is claimed, handled, and marked done only after its effects; a failed attempt is
//! retried with a growing delay and, after [`MAX_DELIVERY_ATTEMPTS`], kept as failed
//! (logged, and counted in `ao_webhook_deliveries_total{result="given_up"}`). An attempt
//! may therefore run again after its effects (a crash before it was marked done): the
//! effects that create something are idempotent through their keys (the delivery id, or
//! [`super::once::Once`]); a state change asked by a command (`retry`, `cancel`,
//! `approve`) is checked against the task's status, so running it again changes no task
//! (at worst it answers once more that there is nothing to do).

use super::once::Once;
use super::repo_config::{self, RepoConfig, RepoConfigError};
use super::{api, clone_url, limits, progress};
use crate::github::Github;
use crate::orchestrator::{self, ChangeError, NewTask};
use crate::webhook::event::{Command, Context, Event, Issue, PullRequest, RepoName, ReviewState};
use crate::webhook::Delivery;
use ao_shared::capability::Capability;
use ao_shared::config::Settings;
use ao_shared::ids::DeliveryId;
use ao_shared::state::{InboxOutcome, StoreError, TaskQuery};
use ao_shared::status::TaskStatus;
use ao_shared::task::{Applied, Approval, Task, TaskSource};
use ao_shared::validate;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

mod ci;
pub use ci::sweep_checks;
mod commands;
mod permissions;
mod pulls;
mod reviews;
pub mod start;

use commands::{cancel_issue, closed_issue, command_};
use permissions::permitted;
use pulls::{pull_command, pull_label};
use reviews::review_round;
pub use start::{approval, branch_name, is_trigger, resolve_pipeline, start, start_waiting};

/// Tasks looked at when finding the tasks of an issue (newest first).
const ISSUE_LOOKUP_LIMIT: usize = 500;
/// Longest prompt taken from an issue or review, in bytes.
const MAX_PROMPT_BYTES: usize = 32 * 1024;

/// Why a delivery could not be handled (GitHub or the store failed).
pub type HandleError = Box<dyn std::error::Error + Send + Sync>;
/// What became of a delivery, in words for the log.
pub type HandleResult = Result<&'static str, HandleError>;

/// What became of a request to start a task for an issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// A task was created.
    Created,
    /// A task for the issue is already under way.
    UnderWay,
    /// The request waits for a free slot (the detail says why).
    Waiting(&'static str),
    /// The request was refused and the issue told why.
    Refused(&'static str),
    /// The same delivery started a task before.
    SeenBefore,
}

impl Started {
    /// In words, for the log.
    pub fn label(&self) -> &'static str {
        match self {
            Started::Created => "task created",
            Started::UnderWay => "ignored: a task for this issue is already under way",
            Started::Waiting(_) => "waiting for a free slot",
            Started::Refused(why) => why,
            Started::SeenBefore => "ignored: delivery seen before",
        }
    }
}

/// Attempts of one delivery before it is marked failed for good.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 6;
/// How long a claimed delivery is left to the replica that claimed it before another may
/// take it (the claimer died while processing it).
pub const CLAIM_HOLD: Duration = Duration::from_secs(300);
/// Longest interval between two looks at the inbox for pending deliveries (besides at
/// start-up); shorter when `github.delivery_retry_ms` is, see [`inbox_sweep`].
pub const INBOX_SWEEP: Duration = Duration::from_secs(10);
/// How many times the first retry delay (`github.delivery_retry_ms`) the longest is.
const MAX_RETRY_FACTOR: u32 = 60;
/// Pending deliveries looked at per sweep.
const PENDING_BATCH: usize = 100;
/// Longest error text kept with a delivery.
const MAX_ERROR_CHARS: usize = 1000;

/// Runs until shutdown: processes the deliveries this replica stored as they come, and
/// at start-up and every [`INBOX_SWEEP`] every pending delivery that is due (left behind
/// by a restart, or waiting for its retry).
pub async fn run(gh: Arc<Github>) {
    let mut rx = gh.inbox.receiver().await;
    let mut sweep = tokio::time::interval(inbox_sweep(&gh.settings));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                Some(id) => process(&gh, &id).await,
                None => break,
            },
            _ = sweep.tick() => match gh.store.pending_inbox(PENDING_BATCH).await {
                Ok(ids) => {
                    for id in ids {
                        if gh.shutdown.is_cancelled() {
                            break;
                        }
                        process(&gh, &id).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list pending webhook deliveries"),
            },
            _ = gh.shutdown.cancelled() => break,
        }
    }
    tracing::info!("webhook consumer stopped");
}

/// Processes one stored delivery if it can be claimed (it is pending, due, and no other
/// processor has it), and records how the attempt ended.
pub async fn process(gh: &Github, id: &DeliveryId) {
    let stored = match gh.store.claim_inbox(id, CLAIM_HOLD).await {
        Ok(Some(d)) => d,
        // Done, failed, not due yet, or being processed elsewhere.
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(delivery = %id, error = %e, "cannot claim a webhook delivery; it stays pending");
            return;
        }
    };
    let span = tracing::info_span!("delivery", delivery = %id, event = %stored.event,
        attempt = stored.attempts);
    let event_name = stored.event.clone();
    let outcome = match serde_json::from_str::<Event>(&stored.payload) {
        Err(e) => {
            let error = format!("the stored delivery cannot be read: {e}");
            span.in_scope(|| tracing::error!(error = %error, "webhook delivery failed for good"));
            InboxOutcome::Failed { error }
        }
        Ok(event) => {
            let delivery = Delivery {
                id: id.clone(),
                event_name: event_name.clone(),
                event,
            };
            match handle(gh, delivery).instrument(span.clone()).await {
                Ok(what) => {
                    span.in_scope(|| tracing::info!(result = what, "delivery handled"));
                    InboxOutcome::Done
                }
                Err(e) => {
                    let error: String = e.to_string().chars().take(MAX_ERROR_CHARS).collect();
                    if stored.attempts >= MAX_DELIVERY_ATTEMPTS {
                        span.in_scope(|| {
                            tracing::error!(error = %error, attempts = stored.attempts,
                                "webhook delivery failed for good; it is kept as failed")
                        });
                        InboxOutcome::Failed { error }
                    } else {
                        let after = retry_delay(&gh.settings, stored.attempts);
                        span.in_scope(|| {
                            tracing::warn!(error = %error, retry_in_ms = after.as_millis() as u64,
                                "delivery failed; it will be processed again")
                        });
                        InboxOutcome::Retry { after, error }
                    }
                }
            }
        }
    };
    let label = match &outcome {
        InboxOutcome::Done => "handled",
        InboxOutcome::Retry { .. } => "failed",
        InboxOutcome::Failed { .. } => "given_up",
    };
    gh.metrics
        .webhook_deliveries
        .with_label_values(&[event_label(&event_name), label])
        .inc();
    if let Err(e) = gh.store.finish_inbox(id, &outcome).await {
        tracing::warn!(delivery = %id, error = %e,
            "cannot record how a delivery ended; it is processed again when its claim expires");
    }
}

/// The delay before attempt `attempts + 1`.
/// Delay before a delivery that failed `attempts` times is tried again:
/// `github.delivery_retry_ms`, doubled per attempt, at most [`MAX_RETRY_FACTOR`] times it.
fn retry_delay(settings: &Settings, attempts: u32) -> Duration {
    let first = Duration::from_millis(settings.github.delivery_retry_ms.max(1));
    ao_shared::backoff::Backoff::new(first, first * MAX_RETRY_FACTOR).after(attempts)
}

/// How often the inbox is swept for due deliveries: twice per first retry delay, at most
/// every [`INBOX_SWEEP`].
fn inbox_sweep(settings: &Settings) -> Duration {
    (Duration::from_millis(settings.github.delivery_retry_ms.max(1)) * 2).min(INBOX_SWEEP)
}

fn event_label(e: &str) -> &'static str {
    match e {
        "issues" => "issues",
        "issue_comment" => "issue_comment",
        "pull_request_review" => "pull_request_review",
        "pull_request_review_comment" => "pull_request_review_comment",
        "installation" => "installation",
        "installation_repositories" => "installation_repositories",
        "check_run" => "check_run",
        "check_suite" => "check_suite",
        "status" => "status",
        _ => "other",
    }
}

/// Whether `login` is this App's own bot (`<slug>[bot]`, the slug configured or read
/// from GitHub, see [`crate::github::client::Client::app_slug`]).
async fn own_bot(gh: &Github, login: &str) -> bool {
    gh.client
        .app_slug()
        .await
        .is_some_and(|slug| login.strip_suffix("[bot]") == Some(slug))
}

/// Whether a bot login is one whose triggers are acted on (`github.allowed_bots`).
fn allowed_bot(settings: &Settings, login: &str) -> bool {
    settings.github.allowed_bots.iter().any(|b| b == login)
}

/// A bot's event: ignored, unless it is a trigger (a trigger label or an `/agent`
/// command), which is answered once per issue and bot saying why nothing runs.
async fn refuse_bot(gh: &Github, event: &Event) -> HandleResult {
    let (ctx, issue) = match event {
        Event::IssueLabeled { ctx, issue, label } if is_trigger(&gh.settings, label) => {
            (ctx, issue)
        }
        Event::Command { ctx, issue, .. } => (ctx, issue),
        _ => return Ok("ignored: sent by a bot"),
    };
    let key = Once::BotRefused {
        repo: &ctx.repo,
        issue: issue.number,
        login: &ctx.sender.login,
    }
    .key();
    if gh.store.record_delivery(&key).await? {
        let text = format!(
            "`{}` is a bot that is not in this agent's `github.allowed_bots`, so its labels \
             and commands start nothing. Someone with write access can add the label or \
             comment the command instead.",
            ctx.sender.login.replace('`', "")
        );
        let inst = ctx.installation_id.unwrap_or_default();
        say_once(gh, inst, &ctx.repo, issue.number, &text).await?;
    }
    Ok("refused: a bot not in github.allowed_bots")
}

/// Posts an answer ([`api::answer`]: a conversation that refuses comments for good is
/// logged and skipped).
async fn say_once(
    gh: &Github,
    inst: u64,
    repo: &RepoName,
    number: u64,
    text: &str,
) -> Result<(), HandleError> {
    Ok(api::answer(&gh.client, inst, repo, number, text).await?)
}

async fn handle(gh: &Github, d: Delivery) -> HandleResult {
    if let Some(ctx) = d.event.context() {
        if ctx.installation_id.is_none() {
            return Ok("ignored: not an App delivery (no installation)");
        }
    }
    if !gh.client.configured() {
        tracing::warn!("github.app_id / github.private_key not set: deliveries cannot be acted on");
        return Ok("ignored: the App is not configured");
    }
    if let Some(ctx) = d.event.context() {
        if ctx.sender.is_bot && own_bot(gh, &ctx.sender.login).await {
            return Ok("ignored: the App's own event");
        }
        if ctx.sender.is_bot && !allowed_bot(&gh.settings, &ctx.sender.login) {
            return refuse_bot(gh, &d.event).await;
        }
    }
    match d.event {
        Event::IssueLabeled { ctx, issue, label } => {
            if !is_trigger(&gh.settings, &label) {
                return Ok("ignored: not a trigger label");
            }
            if !permitted(gh, &ctx, issue.number, "label this issue").await? {
                return Ok("refused: sender lacks write access");
            }
            if issue.is_pull_request {
                return pull_label(gh, &ctx, &issue, &label, &d.id).await;
            }
            if issue.closed {
                return closed_issue(
                    gh,
                    &ctx,
                    issue.number,
                    &d.id,
                    &format!("the `{label}` label"),
                )
                .await;
            }
            start(gh, &ctx, &issue, Some(&label), &d.id).await
        }
        Event::IssueReopened { ctx, issue, labels } => {
            let Some(label) = labels.iter().find(|l| is_trigger(&gh.settings, l)) else {
                return Ok("ignored: no trigger label");
            };
            if !permitted(gh, &ctx, issue.number, "reopen this issue").await? {
                return Ok("refused: sender lacks write access");
            }
            start(gh, &ctx, &issue, Some(label), &d.id).await
        }
        Event::IssueUnlabeled { ctx, issue, label } => {
            if !is_trigger(&gh.settings, &label) {
                return Ok("ignored: not a trigger label");
            }
            cancel_issue(gh, &ctx, issue.number, "the trigger label was removed").await
        }
        Event::IssueClosed { ctx, issue } => {
            cancel_issue(gh, &ctx, issue.number, "the issue was closed").await
        }
        Event::Command {
            ctx,
            issue,
            command,
            ..
        } => {
            if !permitted(gh, &ctx, issue.number, "steer the agent").await? {
                return Ok("refused: sender lacks write access");
            }
            if issue.is_pull_request {
                return pull_command(gh, &ctx, &issue, command, &d.id).await;
            }
            if issue.closed
                && matches!(
                    command,
                    Command::Run | Command::Retry | Command::Approve | Command::Reject(_)
                )
            {
                return closed_issue(gh, &ctx, issue.number, &d.id, "`/agent` commands").await;
            }
            command_(gh, &ctx, &issue, command, issue.number).await
        }
        Event::Review {
            ctx,
            pull,
            state,
            body,
        } => {
            if state != ReviewState::ChangesRequested && !addressed(&body) {
                return Ok("ignored: review neither requests changes nor addresses the agent");
            }
            review_round(gh, &ctx, &pull, &body, &d.id).await
        }
        Event::ReviewComment {
            ctx,
            pull,
            body,
            path,
            line,
        } => {
            if !addressed(&body) {
                return Ok("ignored: review comment not addressed to the agent");
            }
            let text = match line {
                Some(l) => format!("On `{path}` line {l}:\n\n{body}"),
                None => format!("On `{path}`:\n\n{body}"),
            };
            review_round(gh, &ctx, &pull, &text, &d.id).await
        }
        Event::ChecksChanged { ctx, branches } => {
            if ctx.installation_id.is_none() {
                return Ok("ignored: not an App delivery (no installation)");
            }
            ci::checks_changed(gh, &ctx, &branches).await
        }
        Event::Installation {
            installation_id,
            action,
            account,
        } => {
            tracing::info!(installation_id, action = %action, account = %account, "installation changed");
            match action.as_str() {
                "deleted" | "suspend" => gh.client.forget_installation(installation_id),
                // A new or resumed installation may have labelled issues waiting.
                "created" | "unsuspend" | "new_permissions_accepted" => gh.sweep_now.notify_one(),
                _ => {}
            }
            Ok("noted: installation")
        }
        Event::InstallationRepositories {
            installation_id,
            added,
            removed,
        } => {
            tracing::info!(
                installation_id,
                ?added,
                ?removed,
                "installation repositories changed"
            );
            if !added.is_empty() {
                gh.sweep_now.notify_one();
            }
            Ok("noted: installation repositories")
        }
        Event::Ping => Ok("pong"),
    }
}

/// A review text addressed to the agent: a line starting with `/agent`.
fn addressed(body: &str) -> bool {
    body.lines().any(|l| l.trim_start().starts_with("/agent"))
}

/// Tasks of an issue, newest first.
pub async fn tasks_for_issue(
    gh: &Github,
    repo: &RepoName,
    issue: u64,
) -> Result<Vec<Task>, StoreError> {
    let url = clone_url(&gh.settings, repo);
    let mut out = Vec::new();
    let mut cursor = None;
    let mut seen = 0;
    loop {
        let page = gh
            .store
            .list_tasks(&TaskQuery {
                repository: Some(url.clone()),
                limit: 100,
                cursor,
                ..Default::default()
            })
            .await?;
        seen += page.tasks.len();
        out.extend(
            page.tasks.into_iter().filter(
                |t| matches!(&t.source, TaskSource::Github { issue: n, .. } if *n == issue),
            ),
        );
        match page.next_cursor {
            Some(c) if seen < ISSUE_LOOKUP_LIMIT => cursor = Some(c),
            _ => break,
        }
    }
    Ok(out)
}

fn comment_of(task: &Task) -> Option<u64> {
    match &task.source {
        TaskSource::Github {
            progress_comment_id,
            ..
        } => *progress_comment_id,
        TaskSource::Api => None,
    }
}

fn pull_of(task: &Task) -> Option<u64> {
    match &task.source {
        TaskSource::Github { pull_request, .. } => *pull_request,
        TaskSource::Api => None,
    }
}
