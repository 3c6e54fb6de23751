//! Reviews on the agent's own pull request: a follow-up coder run on the same branch.

use super::*;
use ao_shared::task::AGENT_BRANCH_PREFIX;

/// A review on the agent's own pull request: a follow-up coder task on the same branch
/// with the review as its instructions, at most `github.max_review_iterations` times.
pub(super) async fn review_round(
    gh: &Github,
    ctx: &Context,
    pull: &PullRequest,
    text: &str,
    delivery: &DeliveryId,
) -> HandleResult {
    if !pull.head_ref.starts_with(AGENT_BRANCH_PREFIX) {
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
    let Some((inst, _, issue)) = crate::github::source(first) else {
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
            api::answer(
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
            untrusted_author: match &first.source {
                TaskSource::Github {
                    untrusted_author, ..
                } => untrusted_author.clone(),
                TaskSource::Api => None,
            },
            reported: false,
        },
        approval: Approval::NotRequired,
        review_round: Some(rounds + 1),
        ci_rounds: Vec::new(),
        // The review round works under the same repository settings as the task.
        profiles: first.profiles.clone(),
        planner: None,
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
