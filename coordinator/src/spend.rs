//! Booking what agents spent: the cost a worker reports with a finished attempt is added
//! to its task's spend account (`StateStore::add_spend_once`) exactly once, whatever
//! became of the attempt: applied, repeated, stale (a newer attempt runs), or reported
//! after its task was cancelled. Every run that spent money is booked; no delivery of
//! the same report is booked twice.
//!
//! A report is known by its task, subtask, attempt, worker and finishing time: a second
//! run of the same attempt (its message was delivered again) finishes at another time
//! and is booked too, while a redelivered result message is the same report. The
//! marker is a digest of those, stored like a webhook delivery id (so it expires with
//! `*.delivery_retention_days`, far beyond any queue's retention).
//!
//! Accounts: `github:<installation id>` for tasks from GitHub (the monthly budget of
//! `github.monthly_budget_usd` is checked against it), [`API_ACCOUNT`] for tasks
//! submitted through the REST API. Months are `YYYY-MM` in UTC, at booking time.

use crate::bus::{ChangeKind, TaskChange};
use crate::context::Coordinator;
use ao_shared::ids::{DeliveryId, SubtaskId};
use ao_shared::state::StoreError;
use ao_shared::task::{Task, TaskSource};
use ao_shared::timefmt::Timestamp;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The spend account of tasks submitted through the REST API.
pub const API_ACCOUNT: &str = "api";

/// The spend account of `task`: `github:<installation id>`, or [`API_ACCOUNT`].
pub fn account(task: &Task) -> String {
    match &task.source {
        TaskSource::Github {
            installation_id, ..
        } => format!("github:{installation_id}"),
        TaskSource::Api => API_ACCOUNT.to_string(),
    }
}

/// `YYYY-MM` of now, UTC.
pub fn this_month() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}", now.year(), u8::from(now.month()))
}

/// What identifies one finished report of a run.
#[derive(Clone, Copy, Debug)]
pub struct Report<'a> {
    /// The subtask the run was of.
    pub subtask: SubtaskId,
    /// The attempt the run was of.
    pub attempt: u32,
    /// The worker that ran it, as it reported itself.
    pub worker: &'a str,
    /// When the run finished, as the worker reported it.
    pub at: Timestamp,
    /// What the run cost, in US dollars.
    pub cost_usd: f64,
}

/// The marker under which a report's spend is booked.
pub fn marker(task: &Task, report: &Report<'_>) -> DeliveryId {
    let mut h = Sha256::new();
    h.update(
        format!(
            "{}\n{}\n{}\n{}\n{}",
            task.id,
            report.subtask,
            report.attempt,
            report.at.unix_timestamp_nanos(),
            report.worker
        )
        .as_bytes(),
    );
    let digest = hex::encode(h.finalize());
    crate::once::CoreOnce::Spend { digest: &digest }.key()
}

/// Books `report`'s cost against `task`'s account once, and tells the bus what was
/// booked (`ChangeKind::SpendBooked`: the GitHub adapter announces budget shares).
/// A report without a cost books nothing. Errors are the store's: the caller keeps the
/// report and tries again (booking again is harmless).
pub async fn book(cx: &Coordinator, task: &Task, report: &Report<'_>) -> Result<(), StoreError> {
    if !(report.cost_usd.is_finite() && report.cost_usd > 0.0) {
        return Ok(());
    }
    let micros = (report.cost_usd * 1e6).round() as u64;
    let account = account(task);
    let booked = cx
        .store
        .add_spend_once(&account, &this_month(), &marker(task, report), micros)
        .await?;
    let Some(total_micros) = booked else {
        tracing::debug!(task_id = %task.id, subtask_id = %report.subtask, attempt = report.attempt,
            "spend of this report was booked before");
        return Ok(());
    };
    if let Some(sub) = task.subtask(report.subtask) {
        cx.metrics
            .agent_cost
            .with_label_values(&[sub.capability.as_str(), task.repository.as_str()])
            .inc_by(report.cost_usd);
    }
    tracing::info!(task_id = %task.id, subtask_id = %report.subtask, attempt = report.attempt,
        account, micros, total_micros, "spend booked");
    cx.publish(TaskChange {
        task_id: task.id,
        kind: ChangeKind::SpendBooked {
            task: Arc::new(task.clone()),
            micros,
            total_micros,
        },
    });
    Ok(())
}
