//! The state-store seam: tasks (each with its subtasks, one versioned document), their
//! events (state changes and agent output), webhook deliveries, spend per account and
//! month (cost budgets), and leases.
//!
//! A task's document stays small and bounded: it holds the task and its subtasks' state,
//! with agent text cut ([`crate::task::Outcome::bounded`]). Events (the transcript) are
//! records of their own, each bounded ([`NewEvent::stored_body`]), read in pages with
//! [`StateStore::events`], and deleted after a retention period (DynamoDB TTL with
//! `aws.event_retention_days`; SQLite with `local.event_retention_days`).
//!
//! Every write of a task is conditional on the version read: a stale write fails with
//! [`StoreError::Conflict`] and the caller re-reads and re-applies its change.

pub mod dynamo;
pub mod sqlite;

use crate::ids::{DeliveryId, SubtaskId, TaskId};
use crate::status::TaskStatus;
use crate::task::Task;
use crate::timefmt::Timestamp;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A state-store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conflict: task {0} was changed by someone else (stale version)")]
    Conflict(TaskId),
    #[error("task {0} already exists")]
    AlreadyExists(TaskId),
    #[error("webhook delivery {0} was already recorded")]
    DuplicateDelivery(DeliveryId),
    #[error("task {0} not found")]
    NotFound(TaskId),
    #[error("invalid cursor")]
    InvalidCursor,
    /// The backend did not answer or refused the call (an outage, throttling, a missing
    /// table): the caller may retry later.
    #[error("state backend: {0}")]
    Backend(String),
    /// What the backend holds cannot be read back (a stored document that no longer
    /// parses, an item missing its attributes): retrying will not help.
    #[error("stored state is corrupt: {0}")]
    Corrupt(String),
}

/// What a task event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The task or a subtask changed state.
    State,
    /// Output of the agent (text, tool calls, results).
    Agent,
}

/// An event to append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtask_id: Option<SubtaskId>,
    pub kind: EventKind,
    #[serde(with = "time::serde::rfc3339")]
    pub at: Timestamp,
    pub data: serde_json::Value,
}

impl NewEvent {
    /// The event as stored: JSON, with `data` bounded
    /// ([`crate::bounded::bound_event_data`]), so that no event outgrows a record
    /// (DynamoDB items are at most 400 KB) whatever sent it.
    pub fn stored_body(&self) -> Result<String, serde_json::Error> {
        let text = serde_json::to_string(self)?;
        if text.len() <= crate::bounded::MAX_EVENT_DATA_BYTES + 1024 {
            return Ok(text);
        }
        let mut bounded = self.clone();
        bounded.data = crate::bounded::bound_event_data(bounded.data);
        serde_json::to_string(&bounded)
    }
}

/// A stored event; `seq` increases within a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub task_id: TaskId,
    #[serde(flatten)]
    pub event: NewEvent,
}

/// Which tasks to list. Newest first.
#[derive(Clone, Debug, Default)]
pub struct TaskQuery {
    pub status: Option<TaskStatus>,
    pub repository: Option<String>,
    pub limit: usize,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
}

/// One page of tasks.
#[derive(Clone, Debug)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    pub next_cursor: Option<String>,
}

/// The state-store seam.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Stores a new task (its `version` must be 0; it is stored as 1). With a delivery id,
    /// records the delivery in the same transaction and fails with `DuplicateDelivery`
    /// if it was recorded before, creating nothing.
    async fn create_task(
        &self,
        task: &Task,
        delivery: Option<&DeliveryId>,
        events: &[NewEvent],
    ) -> Result<Task, StoreError>;

    async fn get_task(&self, id: TaskId) -> Result<Option<Task>, StoreError>;

    /// Writes `task` if the stored version is still `task.version`, together with `events`;
    /// returns the task as stored (version incremented).
    async fn update_task(&self, task: &Task, events: &[NewEvent]) -> Result<Task, StoreError>;

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError>;

    /// How many tasks are in `status` (for the metrics).
    async fn count_tasks(&self, status: TaskStatus) -> Result<u64, StoreError>;

    /// Records a delivery id on its own; `false` if it was recorded before.
    async fn record_delivery(&self, delivery: &DeliveryId) -> Result<bool, StoreError>;

    /// Appends events (agent output) to a task.
    async fn append_events(&self, task: TaskId, events: &[NewEvent]) -> Result<(), StoreError>;

    /// Appends `events` to a task unless a batch marked `marker` was appended before;
    /// `false` (nothing appended) if it was. The marker is recorded like a delivery id
    /// (same namespace and retention, so give it a prefix of its own) in the same
    /// transaction as the events, so that a redelivered batch is stored once. On DynamoDB
    /// a batch too large for one transaction is written in several, the marker with the
    /// first: a crash between them loses the rest of that batch rather than doubling it.
    async fn append_events_once(
        &self,
        task: TaskId,
        marker: &DeliveryId,
        events: &[NewEvent],
    ) -> Result<bool, StoreError>;

    /// Events of a task with `seq` greater than `after`, oldest first.
    async fn events(
        &self,
        task: TaskId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError>;

    /// Adds `micros` (millionths of a US dollar) to what `account` spent in `month`
    /// (`YYYY-MM`, UTC) and returns the new total, atomically (concurrent adds all count).
    async fn add_spend(&self, account: &str, month: &str, micros: u64) -> Result<u64, StoreError>;

    /// Like [`StateStore::add_spend`], once per `marker`: records the marker (like a
    /// delivery id, in the same transaction) and adds `micros`, or does nothing if the
    /// marker was recorded before. Returns the new total, or `None` when it was booked
    /// before. On DynamoDB the total is read after the write (concurrent bookings may be
    /// in it).
    async fn add_spend_once(
        &self,
        account: &str,
        month: &str,
        marker: &DeliveryId,
        micros: u64,
    ) -> Result<Option<u64>, StoreError>;

    /// What `account` spent in `month`, in millionths of a US dollar (0 when nothing).
    async fn spend(&self, account: &str, month: &str) -> Result<u64, StoreError>;

    /// Takes or renews the lease `name` for `holder` for `ttl`; `false` if someone else
    /// holds an unexpired lease.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
}
