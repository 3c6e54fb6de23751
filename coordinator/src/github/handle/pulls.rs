//! Commands and labels on a pull request's conversation. GitHub sends them as
//! `issue_comment` and `issues` events with `issue.pull_request` set; they act on the
//! task that owns the pull request (the issue's task), never on the pull request as if
//! it were an issue of its own.

use super::*;

/// The newest task that opened or answers pull request `pull`, if any.
async fn owner(gh: &Github, repo: &RepoName, pull: u64) -> Result<Option<Task>, StoreError> {
    let url = clone_url(&gh.settings, repo);
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
        if let Some(t) = page.tasks.into_iter().find(|t| pull_of(t) == Some(pull)) {
            return Ok(Some(t));
        }
        match page.next_cursor {
            Some(c) if seen < ISSUE_LOOKUP_LIMIT => cursor = Some(c),
            _ => return Ok(None),
        }
    }
}

/// The issue a task works for, as far as commands need it.
fn issue_of(task: &Task, number: u64) -> Issue {
    Issue {
        number,
        title: task.title.clone(),
        body: String::new(),
        is_pull_request: false,
        closed: false,
        author: None,
    }
}

/// An `/agent` command on a pull request's conversation: `status`, `retry`, `cancel`,
/// `approve` and `reject` act on the owning task and answer on the pull request; `run` (which
/// starts work for an issue) and anything on a pull request the agent does not own are
/// answered with where to comment.
pub(super) async fn pull_command(
    gh: &Github,
    ctx: &Context,
    pull: &Issue,
    command: Command,
    delivery: &DeliveryId,
) -> HandleResult {
    let inst = ctx.installation_id.unwrap_or_default();
    let owner = owner(gh, &ctx.repo, pull.number).await?;
    let issue = owner.as_ref().and_then(super::super::source).map(|s| s.2);
    match (owner, issue, command) {
        (Some(t), Some(n), c) if c != Command::Run => {
            command_(gh, ctx, &issue_of(&t, n), c, pull.number).await
        }
        (_, Some(n), _) => {
            if gh
                .store
                .record_delivery(&Once::Answer { delivery }.key())
                .await?
            {
                let text = format!(
                    "This pull request is the agent's work for issue #{n}: comment \
                     `/agent run` on #{n} to start it again. Here, `/agent status`, \
                     `/agent retry`, `/agent cancel`, `/agent approve` and `/agent reject` act on its task."
                );
                say_once(gh, inst, &ctx.repo, pull.number, &text).await?;
            }
            Ok("answered: run belongs on the issue")
        }
        _ => {
            if gh
                .store
                .record_delivery(&Once::Answer { delivery }.key())
                .await?
            {
                say_once(
                    gh,
                    inst,
                    &ctx.repo,
                    pull.number,
                    "This pull request is not one the agent opened, so `/agent` commands do \
                     nothing here: comment them on the issue the work is for.",
                )
                .await?;
            }
            Ok("answered: not the agent's pull request")
        }
    }
}

/// A trigger label on a pull request: nothing starts (work starts from issues), and the
/// pull request is told where to put it, once per delivery.
pub(super) async fn pull_label(
    gh: &Github,
    ctx: &Context,
    pull: &Issue,
    label: &str,
    delivery: &DeliveryId,
) -> HandleResult {
    if !gh
        .store
        .record_delivery(&Once::Answer { delivery }.key())
        .await?
    {
        return Ok("ignored: answered before");
    }
    let inst = ctx.installation_id.unwrap_or_default();
    let owner = owner(gh, &ctx.repo, pull.number).await?;
    let label = label.replace('`', "");
    let text = match owner.as_ref().and_then(super::super::source) {
        Some((_, _, n)) => format!(
            "The `{label}` label starts nothing on a pull request. This one is the agent's \
             work for issue #{n}: label that issue, or comment `/agent status` or \
             `/agent retry` here."
        ),
        None => format!(
            "The `{label}` label starts nothing on a pull request: put it on the issue the \
             work is for."
        ),
    };
    say_once(gh, inst, &ctx.repo, pull.number, &text).await?;
    Ok("answered: a label on a pull request")
}
