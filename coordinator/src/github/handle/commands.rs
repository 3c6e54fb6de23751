//! `/agent` commands on an issue, cancelling an issue's task when it is closed or
//! unlabelled, and the answer to a trigger on a closed issue.

use super::*;

/// A label or command that would start work on a closed issue: nothing starts, and the
/// issue is told once per delivery (`what`: what was refused, in words).
pub(super) async fn closed_issue(
    gh: &Github,
    ctx: &Context,
    issue: u64,
    delivery: &DeliveryId,
    what: &str,
) -> HandleResult {
    if gh
        .store
        .record_delivery(&Once::Answer { delivery }.key())
        .await?
    {
        let text = format!(
            "This issue is closed, so {what} start nothing here. Reopen it to have the agent \
             work on it (a trigger label still on it then starts the agent)."
        );
        let inst = ctx.installation_id.unwrap_or_default();
        say_once(gh, inst, &ctx.repo, issue, &text).await?;
    }
    Ok("refused: the issue is closed")
}

pub(super) async fn cancel_issue(
    gh: &Github,
    ctx: &Context,
    issue: u64,
    why: &str,
) -> HandleResult {
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

/// Carries out `command` on `issue`'s latest task, answering on `reply` (the issue, or
/// the pull request whose conversation the command came from).
pub(super) async fn command_(
    gh: &Github,
    ctx: &Context,
    issue: &Issue,
    command: Command,
    reply: u64,
) -> HandleResult {
    let inst = ctx.installation_id.unwrap_or_default();
    let c = &gh.client;
    let tasks = tasks_for_issue(gh, &ctx.repo, issue.number).await?;
    let latest = tasks.first();
    let say = |text: String| async move { api::answer(c, inst, &ctx.repo, reply, &text).await };
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
        Command::Reject(feedback) => {
            let Some(t) = latest else {
                return Ok("ignored: no task");
            };
            // Only what GitHub shows a reader of the comment reaches the planner.
            let feedback = crate::github::untrusted::visible(&feedback);
            if feedback.trim().is_empty() {
                say(
                    "Say what to change in the plan: `/agent reject <what to change>`; \
                     the planner makes a new plan from it."
                        .into(),
                )
                .await?;
                return Ok("refused: no feedback");
            }
            let r = orchestrator::mutate(gh, t.id, |task, now| {
                task.reject_plan(&feedback, now)
                    .map_err(|e| ChangeError::Refused(e.to_string()))?;
                Ok(Applied::Changed)
            })
            .await;
            answer(r, say, "plan rejected").await
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
                 `/agent cancel`, `/agent approve`, `/agent reject <feedback>`, `/agent status`."
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
    Fut: std::future::Future<Output = Result<(), crate::github::client::GithubError>>,
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
