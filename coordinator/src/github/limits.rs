//! Limits of GitHub work: how many tasks may be active (queued or running) at once per
//! repository and per installation, and each installation's monthly cost budget.
//!
//! A task over a concurrency cap is not created yet: the issue gets `agent:queued` and
//! one comment saying why, and the request waits here, in order, until a slot frees
//! (checked whenever a GitHub task changes and every few seconds). The waiting list is
//! in memory; after a restart the missed-delivery sweep finds the labelled issues
//! without a task and starts them again. Spend is booked by the core once per report
//! ([`crate::spend`]), per installation and month in the store, so every coordinator sees
//! the same total; this module announces the budget shares it crosses.

use super::api;
use super::once::Once;
use crate::bus::{ChangeKind, TaskChange};
use crate::github::Github;
use crate::webhook::event::{Context, Issue};
use ao_shared::ids::DeliveryId;
use ao_shared::state::{StoreError, TaskQuery};
use ao_shared::status::TaskStatus;
use ao_shared::task::{Task, TaskSource};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::broadcast::{self, error::RecvError};

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

    /// Takes every waiting request out, oldest first.
    pub fn take_all(&self) -> Vec<Waiting> {
        self.0.lock().drain(..).collect()
    }

    /// Puts requests back at the front, in the order given.
    pub fn put_back_front(&self, mut ws: Vec<Waiting>) {
        let mut q = self.0.lock();
        while let Some(w) = ws.pop() {
            q.push_front(w);
        }
    }

    /// How many deliveries wait.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
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
    gh: &Github,
    installation: u64,
    repo: &crate::webhook::event::RepoName,
) -> Result<Option<(String, bool)>, StoreError> {
    let caps = &gh.settings.github;
    if caps.monthly_budget_usd > 0.0 {
        let spent = gh
            .store
            .spend(&account(installation), &this_month())
            .await? as f64
            / 1e6;
        if spent >= caps.monthly_budget_usd {
            return Ok(Some((
                format!(
                    "this installation has used its monthly budget (${spent:.2} of \
                     ${:.2}, github.monthly_budget_usd), so no new task starts until next month",
                    caps.monthly_budget_usd
                ),
                false,
            )));
        }
    }
    if caps.max_active_per_repo == 0 && caps.max_active_per_installation == 0 {
        return Ok(None);
    }
    let mut in_repo = 0;
    let mut in_installation = 0;
    for status in [TaskStatus::Queued, TaskStatus::Running] {
        let page = gh
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
    if caps.max_active_per_repo > 0 && in_repo >= caps.max_active_per_repo {
        return Ok(Some((
            format!(
                "{in_repo} agent tasks are already active in this repository \
                 (github.max_active_per_repo = {}); this one starts when one of them ends",
                caps.max_active_per_repo
            ),
            true,
        )));
    }
    if caps.max_active_per_installation > 0 && in_installation >= caps.max_active_per_installation {
        return Ok(Some((
            format!(
                "{in_installation} agent tasks are already active for this installation \
                 (github.max_active_per_installation = {}); this one starts when one ends",
                caps.max_active_per_installation
            ),
            true,
        )));
    }
    Ok(None)
}

/// Announces the budget shares crossed by every booking of a GitHub task's spend (the
/// `SpendBooked` changes on the bus) until shutdown; at shutdown, what is already on the
/// bus is announced.
pub async fn book_spend(gh: Arc<Github>, mut changes: broadcast::Receiver<TaskChange>) {
    loop {
        let change = tokio::select! {
            c = changes.recv() => c,
            _ = gh.shutdown.cancelled() => {
                while let Ok(c) = changes.try_recv() {
                    book_change(&gh, &c).await;
                }
                break;
            }
        };
        match change {
            Ok(c) => book_change(&gh, &c).await,
            Err(RecvError::Lagged(n)) => tracing::error!(
                missed = n,
                "budget notices fell behind the task changes; some shares are not announced"
            ),
            Err(RecvError::Closed) => break,
        }
    }
}

async fn book_change(gh: &Github, change: &TaskChange) {
    if let ChangeKind::SpendBooked {
        task,
        micros,
        total_micros,
    } = &change.kind
    {
        announce(gh, task, *micros, *total_micros).await;
    }
}

/// After `micros` of a task's spend were booked, bringing its installation's month to
/// `total` (both in millionths of a US dollar), announces crossing 80, 90 and 100 % of
/// the budget on the task's issue (once each per month).
pub async fn announce(gh: &Github, task: &Task, micros: u64, total: u64) {
    let Some((inst, repo, issue)) = super::source(task) else {
        return;
    };
    let month = this_month();
    let budget = gh.settings.github.monthly_budget_usd;
    if budget <= 0.0 {
        return;
    }
    let ratio = total as f64 / 1e6 / budget;
    gh.metrics
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
        let key = Once::BudgetNotice {
            installation: inst,
            month: &month,
            percent: pct,
        }
        .key();
        if !matches!(gh.store.record_delivery(&key).await, Ok(true)) {
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
        let client = gh.client.clone();
        let repo = repo.clone();
        // Said from its own task: the result consumer does not wait for GitHub.
        tokio::spawn(async move {
            if let Err(e) = api::create_comment(&client, inst, &repo, issue, &text).await {
                tracing::warn!(error = %e, "cannot post the budget notice");
            }
        });
    }
}
