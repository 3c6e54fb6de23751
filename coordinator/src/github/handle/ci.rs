//! Checks (CI) on the agent's own pull request: when its task has succeeded and the
//! checks on the branch's head fail, a follow-up coder run on the same branch is given
//! the failing checks' names and output, at most `pipeline.max_fix_rounds` times per
//! pull request; when they pass, the reporter is told, since the pull request is marked
//! ready only then (`github.ready_waits_for_checks`).

use super::*;
use crate::github::checks::ChecksVerdict;
use ao_shared::task::AGENT_BRANCH_PREFIX;

/// A check changed on `branches`: reads the checks of each agent branch's head and acts.
pub(super) async fn checks_changed(
    gh: &Github,
    ctx: &Context,
    branches: &[String],
) -> HandleResult {
    let mut done = "ignored: not on an agent's branch";
    for branch in branches
        .iter()
        .filter(|b| b.starts_with(AGENT_BRANCH_PREFIX))
    {
        done = on_branch(gh, ctx, branch).await?;
    }
    Ok(done)
}

async fn on_branch(gh: &Github, ctx: &Context, branch: &str) -> HandleResult {
    let url = clone_url(&gh.settings, &ctx.repo);
    let page = gh
        .store
        .list_tasks(&TaskQuery {
            repository: Some(url),
            limit: 200,
            ..Default::default()
        })
        .await?;
    // Newest first.
    let ours: Vec<&Task> = page.tasks.iter().filter(|t| t.branch == branch).collect();
    let (Some(latest), Some(first)) = (ours.first(), ours.last()) else {
        return Ok("ignored: no task owns this branch");
    };
    if ours.iter().any(|t| !t.status.is_terminal()) {
        return Ok("ignored: the agent is still working on this branch");
    }
    if latest.status != TaskStatus::Succeeded {
        return Ok("ignored: the branch's last task did not succeed");
    }
    let (Some(pull), Some((inst, _, issue))) = (
        ours.iter().find_map(|t| pull_of(t)),
        crate::github::source(first),
    ) else {
        return Ok("ignored: no pull request for this branch");
    };
    let (sha, checks) = api::checks_of(&gh.client, inst, &ctx.repo, branch).await?;
    let verdict = ChecksVerdict::of(&checks, &gh.settings.github.required_checks);
    if verdict.failed.is_empty() {
        // Passed, or still running: the reporter marks the pull request ready when it
        // may.
        gh.reporter.notify(latest.id);
        return Ok(if verdict.passed() {
            "checks passed"
        } else {
            "checks still running"
        });
    }
    let rounds = ours.iter().filter(|t| t.ci_round.is_some()).count() as u32;
    let max = gh.settings.pipeline.max_fix_rounds;
    if rounds >= max {
        let key = Once::CiLimit {
            repo: &ctx.repo,
            pull,
        }
        .key();
        if gh.store.record_delivery(&key).await? {
            let names: Vec<String> = verdict
                .failed
                .iter()
                .map(|c| format!("`{}`", c.name.replace('`', "")))
                .collect();
            api::answer(
                &gh.client,
                inst,
                &ctx.repo,
                pull,
                &format!(
                    "The checks {} still fail after {rounds} fix round(s) \
                     (pipeline.max_fix_rounds); a person should take it from here.",
                    names.join(", ")
                ),
            )
            .await?;
        }
        return Ok("refused: fix rounds for the checks used up");
    }
    let round = rounds + 1;
    let new = NewTask {
        title: first.title.clone(),
        prompt: format!(
            "{}\n\nThe checks on pull request #{pull} (branch {branch}) fail. {}",
            first.prompt,
            verdict.instructions()
        ),
        repository: first.repository.clone(),
        branch: first.branch.clone(),
        base_branch: first.base_branch.clone(),
        pipeline_name: format!("ci-round-{round}"),
        pipeline: vec![Capability::Coder],
        source: TaskSource::Github {
            installation_id: inst,
            repo: ctx.repo.full(),
            issue,
            pull_request: Some(pull),
            progress_comment_id: ours.iter().find_map(|t| comment_of(t)),
            untrusted_author: match &first.source {
                TaskSource::Github {
                    untrusted_author, ..
                } => untrusted_author.clone(),
                TaskSource::Api => None,
            },
        },
        approval: Approval::NotRequired,
        review_round: None,
        ci_round: Some(round),
        profiles: first.profiles.clone(),
        planner: None,
    };
    // Once per failing head: every failing check of it sends its own delivery.
    let key = Once::CiRound {
        repo: &ctx.repo,
        branch,
        sha: &sha,
    }
    .key();
    match orchestrator::create_task(gh, new, Some(&key)).await {
        Ok(task) => {
            tracing::info!(task_id = %task.id, pull_request = pull, round,
                failing = verdict.failed.len(), "fix round for failing checks started");
            Ok("fix round for failing checks started")
        }
        Err(ChangeError::Store(StoreError::DuplicateDelivery(_))) => {
            Ok("ignored: a fix round for this commit was started before")
        }
        Err(e) => Err(Box::new(e)),
    }
}
