//! Limits of GitHub work: how many tasks may be active (queued or running) at once per
//! repository and per installation, and each installation's monthly cost budget.
//!
//! A task over a concurrency cap is not created yet: the issue gets `agent:queued` and
//! one comment saying why, and the request waits here, in order, until a slot frees
//! (checked whenever a GitHub task changes and every few seconds). The waiting list is
//! in memory; after a restart the missed-delivery sweep finds the labelled issues
//! without a task and starts them again. Spend is stored per installation and month
//! (`StateStore::add_spend`), so every coordinator sees the same total.

use super::api;
use super::handle::{self, HandleResult};
use crate::app::App;
use crate::webhook::event::{Context, Issue};
use ao_shared::ids::DeliveryId;
use ao_shared::state::{StoreError, TaskQuery};
use ao_shared::status::TaskStatus;
use ao_shared::task::{Task, TaskSource};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// How often waiting requests are looked at besides task changes.
const WAIT_CHECK: Duration = Duration::from_secs(3);
/// Budget shares that are announced on the issue.
const NOTICES: [u32; 3] = [80, 90, 100];

/// A start request waiting for a free slot.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub ctx: Context,
    pub issue: Issue,
    pub label: Option<String>,
    pub delivery: DeliveryId,
}

/// The waiting requests, oldest first.
#[derive(Default)]
pub struct WaitList(parking_lot::Mutex<VecDeque<Waiting>>);

impl WaitList {
    /// Adds a request unless the same issue already waits; `false` if it did.
    pub fn push(&self, w: Waiting) -> bool {
        let mut q = self.0.lock();
        if q.iter()
            .any(|x| x.ctx.repo == w.ctx.repo && x.issue.number == w.issue.number)
        {
            return false;
        }
        q.push_back(w);
        true
    }

    /// Drops the request of an issue (cancelled, closed, unlabelled).
    pub fn remove(&self, repo: &crate::webhook::event::RepoName, issue: u64) -> bool {
        let mut q = self.0.lock();
        let before = q.len();
        q.retain(|x| !(x.ctx.repo == *repo && x.issue.number == issue));
        q.len() != before
    }

    fn take_all(&self) -> Vec<Waiting> {
        self.0.lock().drain(..).collect()
    }

    fn put_back_front(&self, mut ws: Vec<Waiting>) {
        let mut q = self.0.lock();
        while let Some(w) = ws.pop() {
            q.push_front(w);
        }
    }

    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
}

/// `YYYY-MM` of now, UTC.
pub fn this_month() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}", now.year(), u8::from(now.month()))
}

/// The spend account of an installation.
pub fn account(installation: u64) -> String {
    format!("github:{installation}")
}

/// Why a new task may not start now, if so: `(reason, may wait)`.
pub async fn blocked(
    app: &App,
    installation: u64,
    repo: &crate::webhook::event::RepoName,
) -> Result<Option<(String, bool)>, StoreError> {
    let gh = &app.settings.github;
    if gh.monthly_budget_usd > 0.0 {
        let spent = app
            .store
            .spend(&account(installation), &this_month())
            .await? as f64
            / 1e6;
        if spent >= gh.monthly_budget_usd {
            return Ok(Some((
                format!(
                    "this installation has used its monthly budget (${spent:.2} of \
                     ${:.2}, github.monthly_budget_usd), so no new task starts until next month",
                    gh.monthly_budget_usd
                ),
                false,
            )));
        }
    }
    if gh.max_active_per_repo == 0 && gh.max_active_per_installation == 0 {
        return Ok(None);
    }
    let mut in_repo = 0;
    let mut in_installation = 0;
    for status in [TaskStatus::Queued, TaskStatus::Running] {
        let page = app
            .store
            .list_tasks(&TaskQuery {
                status: Some(status),
                limit: 500,
                ..Default::default()
            })
            .await?;
        for t in &page.tasks {
            if let TaskSource::Github {
                installation_id,
                repo: r,
                ..
            } = &t.source
            {
                if *installation_id == installation {
                    in_installation += 1;
                    if *r == repo.full() {
                        in_repo += 1;
                    }
                }
            }
        }
    }
    if gh.max_active_per_repo > 0 && in_repo >= gh.max_active_per_repo {
        return Ok(Some((
            format!(
                "{in_repo} agent tasks are already active in this repository \
                 (github.max_active_per_repo = {}); this one starts when one of them ends",
                gh.max_active_per_repo
            ),
            true,
        )));
    }
    if gh.max_active_per_installation > 0 && in_installation >= gh.max_active_per_installation {
        return Ok(Some((
            format!(
                "{in_installation} agent tasks are already active for this installation \
                 (github.max_active_per_installation = {}); this one starts when one ends",
                gh.max_active_per_installation
            ),
            true,
        )));
    }
    Ok(None)
}

/// Starts waiting requests whose slot is free, oldest first, until shutdown.
pub async fn run(app: Arc<App>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WAIT_CHECK) => {}
            _ = app.github.slots_changed.notified() => {}
            _ = app.shutdown.cancelled() => break,
        }
        if app.github.waiting.len() == 0 {
            continue;
        }
        let mut still = Vec::new();
        for w in app.github.waiting.take_all() {
            match handle::start_waiting(&app, &w).await {
                Ok(what) if what.starts_with("waiting") => still.push(w),
                Ok(what) => {
                    tracing::info!(repository = %w.ctx.repo, issue = w.issue.number, result = what,
                        "waiting request handled");
                }
                Err(e) => {
                    tracing::warn!(repository = %w.ctx.repo, issue = w.issue.number, error = %e,
                        "cannot start a waiting request yet");
                    still.push(w);
                }
            }
        }
        app.github.waiting.put_back_front(still);
    }
}

/// Books the cost of an applied result against its installation's budget, and announces
/// crossing 80, 90 and 100 % on the task's issue (once each per month).
pub async fn book(app: &App, task: &Task, cost_usd: f64) {
    let Some((inst, repo, issue)) = super::source(task) else {
        return;
    };
    if cost_usd <= 0.0 || !cost_usd.is_finite() {
        return;
    }
    let micros = (cost_usd * 1e6).round() as u64;
    let month = this_month();
    let total = match app.store.add_spend(&account(inst), &month, micros).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(installation = inst, error = %e, "cannot book spend");
            return;
        }
    };
    let budget = app.settings.github.monthly_budget_usd;
    if budget <= 0.0 {
        return;
    }
    let ratio = total as f64 / 1e6 / budget;
    app.metrics
        .budget_used_ratio
        .with_label_values(&[&inst.to_string()])
        .set(ratio);
    let before = total.saturating_sub(micros) as f64 / 1e6 / budget;
    // Only the highest share crossed by this result is announced.
    let crossed = NOTICES.iter().rev().copied().find(|pct| {
        let t = f64::from(*pct) / 100.0;
        before < t && ratio >= t
    });
    if let Some(pct) = crossed {
        let key = DeliveryId::new(format!("budget:{inst}:{month}:{pct}"));
        if !matches!(app.store.record_delivery(&key).await, Ok(true)) {
            return;
        }
        let text = if pct >= 100 {
            format!(
                "This installation has used its whole monthly budget (${:.2} of ${budget:.2}). \
                 Running tasks finish; new ones are refused until next month.",
                total as f64 / 1e6
            )
        } else {
            format!(
                "This installation has used {pct} % of its monthly budget (${:.2} of ${budget:.2}).",
                total as f64 / 1e6
            )
        };
        let client = app.github.client.clone();
        let repo = repo.clone();
        // Said from its own task: the result consumer does not wait for GitHub.
        tokio::spawn(async move {
            if let Err(e) = api::create_comment(&client, inst, &repo, issue, &text).await {
                tracing::warn!(error = %e, "cannot post the budget notice");
            }
        });
    }
}

/// Records a request that must wait, says so on the issue once, and labels it queued.
pub async fn wait(app: &App, w: Waiting, why: &str) -> HandleResult {
    let inst = w.ctx.installation_id.unwrap_or_default();
    let (repo, issue) = (w.ctx.repo.clone(), w.issue.number);
    if !app.github.waiting.push(w) {
        return Ok("waiting: already waiting");
    }
    let c = &app.github.client;
    api::add_labels(c, inst, &repo, issue, &["agent:queued"]).await?;
    let key = DeliveryId::new(format!("waiting:{repo}#{issue}"));
    if app.store.record_delivery(&key).await? {
        api::create_comment(c, inst, &repo, issue, &format!("Queued: {why}.")).await?;
    }
    Ok("waiting: at capacity")
}
