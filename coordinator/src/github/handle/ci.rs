//! Checks (CI) on the agent's own pull request: when its task has succeeded and the
//! checks on the branch's head fail, a follow-up coder run on the same branch is given
//! the failing checks' names and output, at most `pipeline.max_fix_rounds` times per
//! pull request; when they pass, the reporter is told, since the pull request is marked
//! ready only then (`github.ready_waits_for_checks`). The missed-delivery sweep reads
//! the checks of recent agent pull requests still drafts the same way
//! ([`sweep_checks`]), for a check whose webhook never came.

use super::*;
use crate::github::checks::ChecksVerdict;
use ao_shared::task::AGENT_BRANCH_PREFIX;

/// How far back the sweep looks for succeeded tasks whose pull request waits for checks.
const CHECKS_SWEEP_WINDOW: time::Duration = time::Duration::days(1);

/// The sweep for missed check webhooks: every agent branch whose last task succeeded
/// within [`CHECKS_SWEEP_WINDOW`] and whose pull request is still an open draft has its
/// checks read as if one had changed. Returns how many branches were looked at; one
/// branch's error is logged and the others are still swept.
pub async fn sweep_checks(gh: &Github) -> Result<usize, HandleError> {
    let page = gh
        .store
        .list_tasks(&TaskQuery {
            status: Some(TaskStatus::Succeeded),
            limit: 200,
            ..Default::default()
        })
        .await?;
    let since = ao_shared::timefmt::now() - CHECKS_SWEEP_WINDOW;
    let mut seen = std::collections::HashSet::new();
    for t in page.tasks.iter().filter(|t| t.updated_at > since) {
        let (Some((inst, repo, _)), Some(pr)) = (crate::github::source(t), pull_of(t)) else {
            continue;
        };
        if !seen.insert((repo.full(), t.branch.clone())) {
            continue;
        }
        match api::get_pull(&gh.client, inst, &repo, pr).await {
            Ok(p) if p.draft && p.open => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(task_id = %t.id, error = %e, "cannot read a pull request; its checks are swept later");
                continue;
            }
        }
        let ctx = Context {
            installation_id: Some(inst),
            repo,
            default_branch: None,
            sender: crate::webhook::event::Sender {
                login: String::new(),
                is_bot: true,
            },
        };
        match on_branch(gh, &ctx, &t.branch).await {
            Ok(what) => tracing::info!(task_id = %t.id, branch = %t.branch, what, "checks swept"),
            Err(e) => tracing::warn!(task_id = %t.id, error = %e, "cannot sweep a branch's checks"),
        }
    }
    Ok(seen.len())
}

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
    // A pull request a person merged or closed is no longer the agent's to fix: a
    // check that fails on its branch afterwards (a re-run, a late runner) starts nothing.
    if !api::get_pull(&gh.client, inst, &ctx.repo, pull).await?.open {
        return Ok("ignored: the pull request is closed");
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
                // A check's name is anyone's text.
                .map(|c| crate::github::untrusted::code_span(&c.name))
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
    // The rounds before, as the last one's task holds them, with how it ended; then this.
    let mut ci_rounds = ours
        .iter()
        .filter(|t| t.ci_round.is_some())
        .max_by_key(|t| t.ci_round)
        .map(|last| {
            let mut before = last.ci_rounds.clone();
            if let Some(r) = before.last_mut().filter(|r| r.ended.is_none()) {
                r.ended = Some(last.status);
            }
            before
        })
        .unwrap_or_default();
    ci_rounds.push(ao_shared::task::CiRound::new(
        round,
        verdict.failed.iter().map(|c| c.name.clone()),
    ));
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
            reported: false,
        },
        approval: Approval::NotRequired,
        review_round: None,
        ci_rounds,
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
