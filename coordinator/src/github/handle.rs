//! The consumer of webhook deliveries: one at a time, each in its own span. Labels and
//! `/agent` commands become tasks or changes of tasks; reviews on the agent's own pull
//! request become a follow-up coder run on the same branch.
//!
//! Rules: bots (including this App) are ignored; the sender of a label or command needs
//! write, maintain or admin on the repository, and is told once per issue when they lack
//! it; a delivery creates at most one task (the task is stored together with its delivery
//! id) and at most one effect (commands record their delivery id first).

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
use ao_shared::state::{StoreError, TaskQuery};
use ao_shared::status::TaskStatus;
use ao_shared::task::{Applied, Approval, Task, TaskSource};
use ao_shared::validate;
use std::sync::Arc;
use tracing::Instrument;

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

/// Runs until shutdown.
pub async fn run(gh: Arc<Github>) {
    let mut rx = gh.inbox.receiver().await;
    loop {
        let delivery = tokio::select! {
            d = rx.recv() => match d { Some(d) => d, None => break },
            _ = gh.shutdown.cancelled() => break,
        };
        let span =
            tracing::info_span!("delivery", delivery = %delivery.id, event = %delivery.event_name);
        let event_name = delivery.event_name.clone();
        let result = handle(&gh, delivery).instrument(span.clone()).await;
        let label = match &result {
            Ok(what) => {
                span.in_scope(|| tracing::info!(result = what, "delivery handled"));
                "handled"
            }
            Err(e) => {
                span.in_scope(|| tracing::error!(error = %e, "delivery failed"));
                "failed"
            }
        };
        gh.metrics
            .webhook_deliveries
            .with_label_values(&[event_label(&event_name), label])
            .inc();
    }
    tracing::info!("webhook consumer stopped");
}

fn event_label(e: &str) -> &'static str {
    match e {
        "issues" => "issues",
        "issue_comment" => "issue_comment",
        "pull_request_review" => "pull_request_review",
        "pull_request_review_comment" => "pull_request_review_comment",
        "installation" => "installation",
        "installation_repositories" => "installation_repositories",
        _ => "other",
    }
}

/// Whether a label is one that starts work: the trigger label, or `<trigger>:<name>`
/// (the status labels excepted).
pub fn is_trigger(settings: &Settings, label: &str) -> bool {
    let t = &settings.github.trigger_label;
    !progress::STATUS_LABELS.contains(&label)
        && (label == t
            || label
                .strip_prefix(t.as_str())
                .is_some_and(|r| r.starts_with(':')))
}

/// The pipeline a trigger label (or `/agent run`, `None`) asks for, with the
/// repository's own pipelines first: `(name, steps)`, or why there is none.
pub fn resolve_pipeline(
    settings: &Settings,
    repo: &RepoConfig,
    label: Option<&str>,
) -> Result<(String, Vec<Capability>), String> {
    let gh = &settings.github;
    let named = |name: &str| {
        repo.pipelines
            .get(name)
            .or_else(|| settings.pipelines.get(name))
            .cloned()
    };
    let asked = label
        .filter(|l| *l != gh.trigger_label)
        .and_then(|l| l.strip_prefix(&format!("{}:", gh.trigger_label)));
    match asked {
        None => {
            let name = repo
                .default_pipeline
                .clone()
                .unwrap_or_else(|| gh.default_pipeline.clone());
            named(&name)
                .map(|steps| (name.clone(), steps))
                .ok_or_else(|| format!("the default pipeline `{name}` is not defined"))
        }
        Some(name) => {
            if let Some(steps) = named(name) {
                return Ok((name.to_string(), steps));
            }
            name.parse::<Capability>()
                .map(|cap| (cap.as_str().to_string(), vec![cap]))
                .map_err(|_| {
                    let mut known: Vec<&str> = repo
                        .pipelines
                        .keys()
                        .chain(settings.pipelines.keys())
                        .map(String::as_str)
                        .collect();
                    known.dedup();
                    format!(
                        "`{}:{name}` names no pipeline or capability; pipelines: {}",
                        gh.trigger_label,
                        known.join(", ")
                    )
                })
        }
    }
}

async fn handle(gh: &Github, d: Delivery) -> HandleResult {
    if let Some(ctx) = d.event.context() {
        if ctx.sender.is_bot {
            return Ok("ignored: sent by a bot");
        }
        if ctx.installation_id.is_none() {
            return Ok("ignored: not an App delivery (no installation)");
        }
    }
    if !gh.client.configured() {
        tracing::warn!("github.app_id / github.private_key not set: deliveries cannot be acted on");
        return Ok("ignored: the App is not configured");
    }
    match d.event {
        Event::IssueLabeled { ctx, issue, label } => {
            if !is_trigger(&gh.settings, &label) {
                return Ok("ignored: not a trigger label");
            }
            if issue.is_pull_request {
                return Ok("ignored: label on a pull request");
            }
            if !permitted(gh, &ctx, issue.number, "label this issue").await? {
                return Ok("refused: sender lacks write access");
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
            if !gh.store.record_delivery(&d.id).await? {
                return Ok("ignored: delivery seen before");
            }
            if !permitted(gh, &ctx, issue.number, "steer the agent").await? {
                return Ok("refused: sender lacks write access");
            }
            command_(gh, &ctx, &issue, command).await
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
        Event::Installation {
            installation_id,
            action,
            account,
        } => {
            tracing::info!(installation_id, action = %action, account = %account, "installation changed");
            match action.as_str() {
                "deleted" | "suspend" => gh.client.forget_installation(installation_id),
                // A new or resumed installation may have labelled issues waiting.
                "created" | "unsuspend" | "new_permissions_accepted" => {
                    gh.sweep_now.notify_one()
                }
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

/// Checks the sender's role; tells them once per issue when it is not enough.
async fn permitted(gh: &Github, ctx: &Context, issue: u64, what: &str) -> Result<bool, HandleError> {
    let inst = ctx.installation_id.unwrap_or_default();
    let c = &gh.client;
    let role = api::permission(c, inst, &ctx.repo, &ctx.sender.login).await?;
    if api::can_write(&role) {
        return Ok(true);
    }
    tracing::info!(sender = %ctx.sender.login, role = %role, "sender may not steer the agent");
    let key = Once::AccessDenied {
        repo: &ctx.repo,
        issue,
        login: &ctx.sender.login,
    }
    .key();
    if gh.store.record_delivery(&key).await? {
        let text = format!(
            "@{} you need write, maintain or admin access to this repository to {what}; \
             your access is `{role}`, so the agent did nothing. Someone with write access can \
             add the label or comment `/agent run`.",
            ctx.sender.login
        );
        api::create_comment(c, inst, &ctx.repo, issue, &text).await?;
    }
    Ok(false)
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

/// The branch of an issue's tasks: `agent/<issue>-<slug>`.
pub fn branch_name(issue: u64, title: &str) -> String {
    let slug: String = validate::slug(title).chars().take(40).collect();
    let slug = slug.trim_end_matches(['-', '.']).to_string();
    if slug.is_empty() {
        format!("agent/{issue}")
    } else {
        format!("agent/{issue}-{slug}")
    }
}

fn prompt(issue: &Issue) -> String {
    let mut p = format!(
        "Resolve GitHub issue #{}: {}\n\n{}",
        issue.number, issue.title, issue.body
    );
    if p.len() > MAX_PROMPT_BYTES {
        let mut cut = MAX_PROMPT_BYTES;
        while !p.is_char_boundary(cut) {
            cut -= 1;
        }
        p.truncate(cut);
    }
    p
}

/// Starts a task for an issue unless one is already under way.
pub async fn start(
    gh: &Github,
    ctx: &Context,
    issue: &Issue,
    label: Option<&str>,
    delivery: &DeliveryId,
) -> HandleResult {
    start_inner(gh, ctx, issue, label, delivery, false)
        .await
        .map(|s| s.label())
}

/// Starts a request that waited for a slot; [`Started::Waiting`] when there is still none.
pub async fn start_waiting(gh: &Github, w: &limits::Waiting) -> Result<Started, HandleError> {
    start_inner(gh, &w.ctx, &w.issue, w.label.as_deref(), &w.delivery, true).await
}

async fn start_inner(
    gh: &Github,
    ctx: &Context,
    issue: &Issue,
    label: Option<&str>,
    delivery: &DeliveryId,
    waited: bool,
) -> Result<Started, HandleError> {
    let one_at_a_time = gh.start_lock.lock().await;
    let existing = tasks_for_issue(gh, &ctx.repo, issue.number).await?;
    if existing.iter().any(|t| !t.status.is_terminal()) {
        return Ok(Started::UnderWay);
    }
    let inst = ctx.installation_id.unwrap_or_default();
    let c = &gh.client;
    if let Some((why, may_wait)) = limits::blocked(gh, inst, &ctx.repo).await? {
        drop(one_at_a_time);
        if waited && may_wait {
            return Ok(Started::Waiting("still no free slot"));
        }
        if may_wait {
            let w = limits::Waiting {
                ctx: ctx.clone(),
                issue: issue.clone(),
                label: label.map(str::to_string),
                delivery: delivery.clone(),
            };
            return limits::wait(gh, w, &why).await;
        }
        let month = limits::this_month();
        let key = Once::BudgetRefused {
            repo: &ctx.repo,
            issue: issue.number,
            month: &month,
        }
        .key();
        if gh.store.record_delivery(&key).await? {
            api::create_comment(
                c,
                inst,
                &ctx.repo,
                issue.number,
                &format!("Not started: {why}."),
            )
            .await?;
        }
        return Ok(Started::Refused("refused: budget used up"));
    }
    let plan = match repo_config::load(c, inst, &ctx.repo, ctx.default_branch.as_deref()).await {
        Ok(cfg) => resolve_pipeline(&gh.settings, &cfg, label).map(|p| (p, cfg)),
        Err(RepoConfigError::Invalid(why)) => Err(format!(
            "`{}` on the default branch is invalid, so the agent did not start:\n\n```\n{why}\n```",
            repo_config::PATH
        )),
        Err(e) => return Err(Box::new(e)),
    };
    let ((pipeline_name, pipeline), cfg) = match plan {
        Ok(p) => p,
        Err(why) => {
            api::create_comment(c, inst, &ctx.repo, issue.number, &why).await?;
            return Ok(Started::Refused("refused: no pipeline"));
        }
    };
    let approval = approval(
        cfg.require_approval
            .unwrap_or(gh.settings.github.require_approval),
        &pipeline,
    );
    let previous = existing.first();
    let new = NewTask {
        title: issue.title.chars().take(200).collect(),
        prompt: prompt(issue),
        repository: clone_url(&gh.settings, &ctx.repo),
        branch: previous
            .map(|t| t.branch.clone())
            .unwrap_or_else(|| branch_name(issue.number, &issue.title)),
        base_branch: ctx.default_branch.clone(),
        pipeline_name,
        pipeline,
        source: TaskSource::Github {
            installation_id: ctx.installation_id.unwrap_or_default(),
            repo: ctx.repo.full(),
            issue: issue.number,
            pull_request: previous.and_then(pull_of),
            // One progress comment per issue: a later task edits the earlier one.
            progress_comment_id: previous.and_then(comment_of),
        },
        approval,
        review_round: None,
        profiles: cfg.profiles.clone(),
    };
    match orchestrator::create_task(gh, new, Some(delivery)).await {
        Ok(task) => {
            tracing::info!(task_id = %task.id, issue = issue.number, "task started from GitHub");
            Ok(Started::Created)
        }
        Err(ChangeError::Store(StoreError::DuplicateDelivery(_))) => Ok(Started::SeenBefore),
        Err(e) => Err(Box::new(e)),
    }
}

/// When a task asked to wait for approval waits: with a planner first, after the plan is
/// made (the plan is shown, then approved); otherwise before anything runs.
pub fn approval(required: bool, pipeline: &[Capability]) -> Approval {
    match (required, pipeline.first()) {
        (false, _) => Approval::NotRequired,
        (true, Some(Capability::Planner)) => Approval::AfterPlan,
        (true, _) => Approval::BeforeStart,
    }
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

async fn cancel_issue(gh: &Github, ctx: &Context, issue: u64, why: &str) -> HandleResult {
    let tasks = tasks_for_issue(gh, &ctx.repo, issue).await?;
    let mut n = usize::from(gh.waiting.remove(&ctx.repo, issue));
    for t in tasks.iter().filter(|t| !t.status.is_terminal()) {
        let reason = why.to_string();
        orchestrator::mutate(gh, t.id, |task, now| {
            if task.status.is_terminal() {
                return Ok(Applied::Ignored("already ended".into()));
            }
            task.cancel(&reason, now)?;
            Ok(Applied::Changed)
        })
        .await?;
        n += 1;
    }
    Ok(if n > 0 {
        "task cancelled"
    } else {
        "ignored: no task under way"
    })
}

async fn command_(gh: &Github, ctx: &Context, issue: &Issue, command: Command) -> HandleResult {
    let inst = ctx.installation_id.unwrap_or_default();
    let c = &gh.client;
    let tasks = tasks_for_issue(gh, &ctx.repo, issue.number).await?;
    let latest = tasks.first();
    let say = |text: String| async move {
        api::create_comment(c, inst, &ctx.repo, issue.number, &text).await
    };
    match command {
        Command::Run => {
            let delivery = Once::Run {
                repo: &ctx.repo,
                issue: issue.number,
                after: latest.map(|t| t.id),
            }
            .key();
            start(gh, ctx, issue, None, &delivery).await
        }
        Command::Retry => {
            let Some(t) = latest else {
                say("There is no agent task on this issue to retry.".into()).await?;
                return Ok("refused: no task");
            };
            let r = orchestrator::mutate(gh, t.id, |task, now| {
                if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
                    return Err(ChangeError::Refused(format!(
                        "the task is {}; only a failed or cancelled task can be retried",
                        task.status
                    )));
                }
                task.retry(now)?;
                Ok(Applied::Changed)
            })
            .await;
            answer(r, say, "retried").await
        }
        Command::Cancel => {
            let Some(t) = latest else {
                return Ok("ignored: no task");
            };
            let r = orchestrator::mutate(gh, t.id, |task, now| {
                if task.status.is_terminal() {
                    return Err(ChangeError::Refused(format!(
                        "the task has already ended ({})",
                        task.status
                    )));
                }
                task.cancel("cancelled with /agent cancel", now)?;
                Ok(Applied::Changed)
            })
            .await;
            answer(r, say, "cancelled").await
        }
        Command::Approve => {
            let Some(t) = latest else {
                return Ok("ignored: no task");
            };
            let r = orchestrator::mutate(gh, t.id, |task, now| {
                if task.status != TaskStatus::AwaitingApproval {
                    return Err(ChangeError::Refused(format!(
                        "the task is {}, not waiting for approval",
                        task.status
                    )));
                }
                task.status = task.status.transition(TaskStatus::Queued)?;
                task.updated_at = now;
                Ok(Applied::Changed)
            })
            .await;
            answer(r, say, "approved").await
        }
        Command::Status => {
            match latest {
                Some(t) => {
                    // The progress comment stays the one place with the details.
                    gh.reporter.notify(t.id);
                    let done = t
                        .subtasks
                        .iter()
                        .filter(|s| s.status == ao_shared::status::SubtaskStatus::Succeeded)
                        .count();
                    say(format!(
                        "The agent's task is **{}** ({done} of {} steps done, ${:.2} so far); \
                         the progress comment on this issue has the details.",
                        t.status,
                        t.subtasks.len(),
                        t.cost_usd()
                    ))
                    .await?;
                }
                None => {
                    say("No agent task has run on this issue yet.".into()).await?;
                }
            }
            Ok("status posted")
        }
        Command::Unknown(verb) => {
            say(format!(
                "Unknown command `/agent {verb}`. Commands: `/agent run`, `/agent retry`, \
                 `/agent cancel`, `/agent approve`, `/agent status`."
            ))
            .await?;
            Ok("unknown command answered")
        }
    }
}

async fn answer<F, Fut>(
    r: Result<(Task, Applied), ChangeError>,
    say: F,
    done: &'static str,
) -> HandleResult
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<u64, super::client::GithubError>>,
{
    match r {
        Ok(_) => Ok(done),
        Err(ChangeError::Refused(why)) => {
            say(format!("Cannot do that: {why}.")).await?;
            Ok("refused")
        }
        Err(ChangeError::Illegal(e)) => {
            say(format!("Cannot do that: {e}.")).await?;
            Ok("refused")
        }
        Err(e) => Err(Box::new(e)),
    }
}

/// A review on the agent's own pull request: a follow-up coder task on the same branch
/// with the review as its instructions, at most `github.max_review_iterations` times.
async fn review_round(
    gh: &Github,
    ctx: &Context,
    pull: &PullRequest,
    text: &str,
    delivery: &DeliveryId,
) -> HandleResult {
    if !pull.head_ref.starts_with("agent/") {
        return Ok("ignored: not the agent's pull request");
    }
    let url = clone_url(&gh.settings, &ctx.repo);
    let page = gh
        .store
        .list_tasks(&TaskQuery {
            repository: Some(url),
            limit: 200,
            ..Default::default()
        })
        .await?;
    let ours: Vec<&Task> = page
        .tasks
        .iter()
        .filter(|t| t.branch == pull.head_ref && pull_of(t) == Some(pull.number))
        .collect();
    let Some(first) = ours.last() else {
        return Ok("ignored: no task owns this pull request");
    };
    let Some((inst, _, issue)) = super::source(first) else {
        return Ok("ignored: not a GitHub task");
    };
    if !permitted(gh, ctx, issue, "ask the agent for changes").await? {
        return Ok("refused: reviewer lacks write access");
    }
    if ours.iter().any(|t| !t.status.is_terminal()) {
        return Ok("ignored: the agent is still working on this pull request");
    }
    let rounds = ours.iter().filter(|t| t.review_round.is_some()).count() as u32;
    if rounds >= gh.settings.github.max_review_iterations {
        let key = Once::ReviewLimit {
            repo: &ctx.repo,
            pull: pull.number,
        }
        .key();
        if gh.store.record_delivery(&key).await? {
            api::create_comment(
                &gh.client,
                inst,
                &ctx.repo,
                pull.number,
                &format!(
                    "The agent has already answered {rounds} reviews on this pull request \
                     (github.max_review_iterations); a person should take it from here."
                ),
            )
            .await?;
        }
        return Ok("refused: review rounds used up");
    }
    let mut new = NewTask {
        title: first.title.clone(),
        prompt: first.prompt.clone(),
        repository: first.repository.clone(),
        branch: first.branch.clone(),
        base_branch: first.base_branch.clone(),
        pipeline_name: format!("review-round-{}", rounds + 1),
        pipeline: vec![Capability::Coder],
        source: TaskSource::Github {
            installation_id: inst,
            repo: ctx.repo.full(),
            issue,
            pull_request: Some(pull.number),
            progress_comment_id: ours.first().and_then(|t| comment_of(t)),
        },
        approval: Approval::NotRequired,
        review_round: Some(rounds + 1),
        // The review round works under the same repository settings as the task.
        profiles: first.profiles.clone(),
    };
    let review: String = text.chars().take(MAX_PROMPT_BYTES / 2).collect();
    new.prompt = format!(
        "{}\n\nA reviewer asked for changes on pull request #{} (branch {}). Address this \
         review:\n\n{}",
        new.prompt, pull.number, pull.head_ref, review
    );
    match orchestrator::create_task(gh, new, Some(delivery)).await {
        Ok(task) => {
            tracing::info!(task_id = %task.id, pull_request = pull.number, "review round started");
            Ok("review round started")
        }
        Err(ChangeError::Store(StoreError::DuplicateDelivery(_))) => {
            Ok("ignored: delivery seen before")
        }
        Err(e) => Err(Box::new(e)),
    }
}
