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
//! Webhook deliveries are kept in an inbox ([`InboxDelivery`]) from the moment they are
//! verified until their effects are done: stored before the delivery is answered, claimed
//! by one processor at a time ([`StateStore::claim_inbox`]), and finished as done, retried
//! later, or failed ([`InboxOutcome`]).
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

/// A webhook delivery kept in the inbox until its effects are done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxDelivery {
    /// GitHub's `X-GitHub-Delivery` id.
    pub id: DeliveryId,
    /// The `X-GitHub-Event` header.
    pub event: String,
    /// The delivery as the coordinator parsed it (JSON), bounded by the caller (at most
    /// [`MAX_INBOX_PAYLOAD_BYTES`]).
    pub payload: String,
    /// Processing attempts begun so far (the claim that returned this record included).
    pub attempts: u32,
}

/// The largest inbox payload stored, under DynamoDB's 400 KB item limit with room for the
/// other attributes.
pub const MAX_INBOX_PAYLOAD_BYTES: usize = 300 * 1024;

/// How a processing attempt of an inbox delivery ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboxOutcome {
    /// Its effects are done; it is never processed again.
    Done,
    /// It failed and may be claimed again after `after`.
    Retry { after: Duration, error: String },
    /// It failed for good (too many attempts); it stays, visibly, as failed.
    Failed { error: String },
}

/// A lease as granted: its fencing token increases every time the lease changes hands
/// (or is taken again after it expired), and stays while the holder renews it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    pub token: u64,
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

    /// Takes or renews the lease `name` for `holder` for `ttl`, with a fencing token.
    /// With `held = None` the lease is taken when it is free, expired, or already
    /// `holder`'s, and its token is incremented. With `held = Some(token)` it is renewed
    /// only while `holder` still holds it unexpired with that token (the token stays).
    /// `None` when the lease is someone else's (or, renewing, was lost).
    async fn claim_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
        held: Option<u64>,
    ) -> Result<Option<LeaseGrant>, StoreError>;

    /// Ends `holder`'s lease `name` with `token` at once (a clean shutdown), so another
    /// replica need not wait for it to expire. Nothing happens if it is not held so.
    async fn release_lease(&self, name: &str, holder: &str, token: u64) -> Result<(), StoreError>;

    /// Stores a verified delivery as pending, due at once; `false` (storing nothing) when
    /// a delivery with its id is already in the inbox, whatever its state.
    async fn put_inbox(&self, delivery: &InboxDelivery) -> Result<bool, StoreError>;

    /// Claims a pending delivery that is due: it is not due again for `hold` (so no other
    /// processor takes it meanwhile) and its attempts are counted. `None` when it is not
    /// pending, not due (claimed by someone else, or waiting to be retried) or unknown.
    async fn claim_inbox(
        &self,
        id: &DeliveryId,
        hold: Duration,
    ) -> Result<Option<InboxDelivery>, StoreError>;

    /// Records how an attempt ended (see [`InboxOutcome`]). Done and failed deliveries
    /// are kept for the delivery retention, so a redelivery is known as a duplicate.
    async fn finish_inbox(&self, id: &DeliveryId, outcome: &InboxOutcome)
        -> Result<(), StoreError>;

    /// Ids of pending deliveries that are due (not waiting for a retry), oldest first, at
    /// most `limit`. A delivery held by a processor may be listed; claiming it then fails.
    async fn pending_inbox(&self, limit: usize) -> Result<Vec<DeliveryId>, StoreError>;
}
