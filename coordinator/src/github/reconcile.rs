//! Missed webhooks: at start-up and every `github.reconcile_secs`, (1) the App's recent
//! deliveries are listed and every one that never reached us (connection failure or a
//! 5xx from us, and no successful attempt since) is asked for again — the endpoint's
//! delivery-id dedupe makes a needless redelivery harmless; (2) open issues carrying a
//! trigger label but no task at all get one, when the user who labelled them may write;
//! (3) the checks of recent agent pull requests still drafts are read again
//! ([`handle::sweep_checks`]): a fix round for a failing one, ready when they pass.
//!
//! Every list is read to its last page. One installation's or repository's error (a
//! repository with issues disabled answers 410) is logged and the sweep goes on with
//! the others.
//!
//! Both paths can see the same labelled issue; the task is still made once, because a
//! task is started only when the issue has none under way (the redelivery arrives within
//! seconds of the sweep, long before a task ends).

use super::once::Once;
use super::{api, handle};
use crate::github::Github;
use crate::webhook::event::{Context, Issue, Sender};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Redeliveries asked for one delivery before it is given up.
const MAX_REDELIVERIES: usize = 3;

/// Runs the sweep at start-up, then periodically, until shutdown.
pub async fn run(gh: Arc<Github>) {
    if !gh.client.configured() {
        // Nothing to sweep; a loop that returned would count as dead.
        gh.shutdown.cancelled().await;
        return;
    }
    let every = gh.settings.github.reconcile_secs;
    loop {
        if let Err(e) = sweep(&gh).await {
            tracing::warn!(error = %e, "missed-delivery sweep failed; trying again later");
        }
        // With no interval, only start-up and new installations or repositories sweep.
        let interval = async {
            if every == 0 {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(Duration::from_secs(every)).await;
            }
        };
        tokio::select! {
            _ = interval => {}
            _ = gh.sweep_now.notified() => {}
            _ = gh.shutdown.cancelled() => break,
        }
    }
}

/// One sweep.
pub async fn sweep(gh: &Github) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let c = &gh.client;
    // 1. Deliveries that never got through.
    let deliveries = match api::hook_deliveries(c).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the App's deliveries; the labelled issues are still swept");
            Vec::new()
        }
    };
    let mut by_guid: HashMap<&str, Vec<&api::HookDelivery>> = HashMap::new();
    for d in &deliveries {
        by_guid.entry(d.guid.as_str()).or_default().push(d);
    }
    let mut asked = 0;
    for (guid, attempts) in by_guid {
        let failed = |d: &&api::HookDelivery| d.status_code == 0 || d.status_code >= 500;
        if attempts.iter().any(|d| !failed(d)) || attempts.len() > MAX_REDELIVERIES {
            continue;
        }
        let Some(latest) = attempts.iter().max_by_key(|d| d.id) else {
            continue;
        };
        match api::redeliver(c, latest.id).await {
            Ok(()) => {
                asked += 1;
                tracing::info!(
                    delivery = guid,
                    "asked GitHub to redeliver a missed webhook"
                );
            }
            Err(e) => tracing::warn!(delivery = guid, error = %e, "cannot ask for a redelivery"),
        }
    }
    // 2. Labelled issues without a task.
    for inst in api::installations(c).await? {
        let repos = match api::installation_repositories(c, inst.id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(installation_id = inst.id, error = %e,
                    "cannot list an installation's repositories; the others are still swept");
                continue;
            }
        };
        for (repo, default_branch) in repos {
            if let Err(e) = sweep_repo(gh, &inst, &repo, default_branch).await {
                tracing::warn!(repository = %repo, error = %e,
                    "cannot sweep a repository's labelled issues; the others are still swept");
            }
        }
    }
    // 3. Checks on the agent's draft pull requests, whose webhook may have been missed.
    let branches = handle::sweep_checks(gh).await?;
    tracing::info!(redeliveries = asked, branches, "missed-delivery sweep done");
    Ok(())
}

/// Starts a task for each open issue of one repository that carries a trigger label
/// but has no task, when the user who last labelled it may write.
async fn sweep_repo(
    gh: &Github,
    inst: &api::Installation,
    repo: &crate::webhook::event::RepoName,
    default_branch: Option<String>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let c = &gh.client;
    let label = gh.settings.github.trigger_label.clone();
    let repo = repo.clone();
    let issues = api::open_issues_with_label(c, inst.id, &repo, &label).await?;
    for issue in issues {
        if !handle::tasks_for_issue(gh, &repo, issue.number)
            .await?
            .is_empty()
        {
            continue;
        }
        let Some(label) = issue
            .labels
            .iter()
            .find(|l| handle::is_trigger(&gh.settings, l))
            .cloned()
        else {
            continue;
        };
        let Some((login, is_bot)) =
            api::last_labeler(c, inst.id, &repo, issue.number, &label).await?
        else {
            continue;
        };
        if is_bot && !gh.settings.github.allowed_bots.contains(&login) {
            continue;
        }
        let role = api::permission(c, inst.id, &repo, &login).await?;
        if !api::can_write(&role) {
            continue;
        }
        let ctx = Context {
            installation_id: Some(inst.id),
            repo: repo.clone(),
            default_branch: default_branch.clone(),
            sender: Sender { login, is_bot },
        };
        let i = Issue {
            number: issue.number,
            title: issue.title.clone(),
            body: issue.body.clone(),
            is_pull_request: false,
            closed: false,
            author: issue.author.clone(),
        };
        let key = Once::Sweep {
            repo: &repo,
            issue: issue.number,
        }
        .key();
        let what = handle::start(gh, &ctx, &i, Some(&label), &key).await?;
        tracing::info!(repository = %repo, issue = issue.number, result = what,
                    "labelled issue without a task reconciled");
    }
    Ok(())
}
