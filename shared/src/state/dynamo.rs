//! The DynamoDB state store: one table (`aws.table`) holding tasks, their events, webhook
//! deliveries and leases, keyed by `pk` and `sk` (both strings). `docs/aws-backend.md`
//! describes the design; in short:
//!
//! | item | `pk` | `sk` | other attributes |
//! |---|---|---|---|
//! | task | `TASK#<id>` | `TASK` | `doc` (JSON), `version`, `task_status`, `task_repository`, `created_at`, `gsi_all` |
//! | event counter | `TASK#<id>` | `SEQ` | `last_seq` |
//! | event | `TASK#<id>` | `EVENT#<seq, 20 digits>` | `seq`, `body` (JSON), `expires_at` |
//! | delivery | `DELIVERY#<id>` | `DELIVERY` | `expires_at` |
//! | lease | `LEASE#<name>` | `LEASE` | `holder`, `lease_expires_ms`, `fence` (token), `expires_at` |
//! | inbox delivery | `INBOX#<id>` | `INBOX` | `event`, `payload`, `inbox_status`, `attempts`, `due_ms`, `marker`, `error`, `expires_at` (once finished) |
//! | pending marker | `INBOX_PENDING` | `<received ms, 20 digits>#<id>` | `due_ms` (the sweep lists only due markers) |
//! | spend | `SPEND#<account>#<month>` | `SPEND` | `micros` (atomic `ADD`) |
//!
//! Indexes: `status-index` (`task_status`, `created_at`), `repository-index`
//! (`task_repository`, `created_at`, projecting `task_status`) and `all-index` (`gsi_all`
//! = `TASK`, `created_at`); `created_at` is a fixed-width UTC time with milliseconds and
//! the task id, so it sorts by time and is unique. TTL attribute: `expires_at`.
//!
//! Every task write is conditional on `version`. A task created for a webhook delivery is
//! one `TransactWriteItems` with the delivery record, both conditional on not existing; a
//! task written with events is one transaction too. Event sequence numbers come from the
//! task's counter item, written in the same transaction on the condition that it still
//! holds the value read, so numbers increase in commit order across any number of
//! writers, and a reader that has seen `seq` N never later finds a new event below N.

use super::{
    Event, InboxDelivery, InboxOutcome, LeaseGrant, NewEvent, StateStore, StoreError, TaskPage,
    TaskQuery,
};
use crate::aws::error_code;
use crate::ids::{DeliveryId, TaskId};
use crate::status::TaskStatus;
use crate::task::Task;
use crate::timefmt::{now, unix_ms, Timestamp};
use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, KeysAndAttributes, Projection, ProjectionType, Put,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, Select, TableStatus,
    TimeToLiveSpecification, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Index of tasks by status.
pub const STATUS_INDEX: &str = "status-index";
/// Index of tasks by repository (projects `task_status`, for listing by both).
pub const REPOSITORY_INDEX: &str = "repository-index";
/// Index of all tasks (constant hash key `gsi_all` = `TASK`).
pub const ALL_INDEX: &str = "all-index";
/// The TTL attribute (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "expires_at";

const PK: &str = "pk";
/// Spend item: millionths of a US dollar.
const SPEND_MICROS: &str = "micros";
const SK: &str = "sk";
const DOC: &str = "doc";
const VERSION: &str = "version";
const STATUS: &str = "task_status";
const REPOSITORY: &str = "task_repository";
const CREATED: &str = "created_at";
const GSI_ALL: &str = "gsi_all";
const GSI_ALL_VALUE: &str = "TASK";
const LAST_SEQ: &str = "last_seq";
const SEQ: &str = "seq";
const BODY: &str = "body";
const HOLDER: &str = "holder";
const LEASE_EXPIRES: &str = "lease_expires_ms";
const FENCE: &str = "fence";
const INBOX_PENDING: &str = "INBOX_PENDING";
const INBOX_EVENT: &str = "event";
const INBOX_PAYLOAD: &str = "payload";
const INBOX_STATUS: &str = "inbox_status";
const INBOX_ATTEMPTS: &str = "attempts";
const INBOX_DUE: &str = "due_ms";
const INBOX_MARKER: &str = "marker";
const INBOX_ERROR: &str = "error";

/// The most items in one `TransactWriteItems` (DynamoDB's limit).
const MAX_TRANSACTION_ITEMS: usize = 100;
/// Room kept under DynamoDB's 4 MB transaction limit.
const MAX_TRANSACTION_BYTES: usize = 3 * 1024 * 1024;
/// The most keys in one `BatchGetItem`.
const MAX_BATCH_GET: usize = 100;
/// Attempts of a write that lost a race on the event counter or met another transaction.
const MAX_ATTEMPTS: u32 = 8;
/// Event-counter hints kept in memory before the map is cleared.
const MAX_HINTS: usize = 10_000;
/// How long a created table may take to become active.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the store lives and how long records are kept.
#[derive(Clone, Debug)]
pub struct DynamoOptions {
    pub table: String,
    /// Create the table when it is missing (tests and development).
    pub create: bool,
    /// How long events are kept (TTL).
    pub event_retention: Duration,
    /// How long webhook delivery records are kept (TTL).
    pub delivery_retention: Duration,
}

/// The DynamoDB state-store backend.
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: Arc<str>,
    event_retention: Duration,
    delivery_retention: Duration,
    /// The last event sequence number this process wrote per task: a guess that saves a
    /// read; a wrong guess fails the counter's condition and is corrected by reading.
    seq_hints: Arc<Mutex<HashMap<TaskId, u64>>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn sdk_error<E>(op: &str, err: SdkError<E, aws_smithy_runtime_api::http::Response>) -> StoreError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, message) = error_code(&err);
    StoreError::Backend(format!("DynamoDB {op}: {code}: {message}"))
}

fn is_conditional_check_failed<E>(err: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> bool
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata,
{
    matches!(err, SdkError::ServiceError(e) if e.err().code() == Some("ConditionalCheckFailedException"))
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn get_n(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn task_pk(id: TaskId) -> String {
    format!("TASK#{id}")
}

fn event_sk(seq: u64) -> String {
    format!("EVENT#{seq:020}")
}

fn key(pk: String, sk: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([(PK.to_string(), s(pk)), (SK.to_string(), s(sk))])
}

/// The index sort key: fixed-width UTC time with milliseconds, then the id.
pub fn created_sort_key(created_at: Timestamp, id: TaskId) -> String {
    let t = created_at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z#{id}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn epoch_secs_after(d: Duration) -> i64 {
    unix_ms(now()) / 1000 + d.as_secs() as i64
}

/// The largest task document written, kept under DynamoDB's item limit ("The maximum item
/// size in DynamoDB is 400 KB", *Service, account, and table quotas in Amazon DynamoDB*)
/// with room for the other attributes. Task documents stay far smaller: agent text in
/// them is bounded, and the transcript lives in event items.
pub const MAX_TASK_DOC_BYTES: usize = 350 * 1024;

fn task_item(task: &Task) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let doc = serde_json::to_string(task).map_err(backend)?;
    if doc.len() > MAX_TASK_DOC_BYTES {
        return Err(backend(format!(
            "task {} document is {} bytes, above the {MAX_TASK_DOC_BYTES}-byte limit of a \
             task item",
            task.id,
            doc.len()
        )));
    }
    Ok(HashMap::from([
        (PK.to_string(), s(task_pk(task.id))),
        (SK.to_string(), s("TASK")),
        (DOC.to_string(), s(doc)),
        (VERSION.to_string(), n(task.version)),
        (STATUS.to_string(), s(task.status.as_str())),
        (REPOSITORY.to_string(), s(task.repository.clone())),
        (
            CREATED.to_string(),
            s(created_sort_key(task.created_at, task.id)),
        ),
        (GSI_ALL.to_string(), s(GSI_ALL_VALUE)),
    ]))
}

fn parse_task(item: &HashMap<String, AttributeValue>) -> Result<Task, StoreError> {
    let doc = get_s(item, DOC).ok_or_else(|| corrupt("stored task has no document"))?;
    serde_json::from_str(doc).map_err(|e| corrupt(format!("stored task is unreadable: {e}")))
}

fn approx_item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    AttributeValue::S(x) | AttributeValue::N(x) => x.len(),
                    _ => 16,
                }
        })
        .sum()
}

/// What an item of a transaction is, to read its cancellation reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Delivery,
    Task,
    Counter,
    Event,
}

/// Why a transaction did not commit.
enum TxFailure {
    /// The first item whose condition failed, with whether the reason carried the item.
    Condition(Role, bool),
    /// Another transaction held an item: try again.
    Contended,
    Other(StoreError),
}

/// Where a listing reads from.
struct Listing {
    index: &'static str,
    hash_attr: &'static str,
    hash_value: String,
    status_filter: Option<String>,
}

impl DynamoStore {
    /// Opens the store; with `options.create`, creates the table if it is missing,
    /// otherwise fails clearly when it is.
    pub async fn open(client: Client, options: &DynamoOptions) -> Result<Self, StoreError> {
        let store = Self {
            client,
            table: Arc::from(options.table.as_str()),
            event_retention: options.event_retention,
            delivery_retention: options.delivery_retention,
            seq_hints: Arc::new(Mutex::new(HashMap::new())),
        };
        if options.create {
            store.create_table().await?;
        } else {
            store
                .client
                .describe_table()
                .table_name(&*store.table)
                .send()
                .await
                .map_err(|e| {
                    let (code, message) = error_code(&e);
                    StoreError::Backend(format!(
                        "DynamoDB table {:?} not found or not accessible ({code}: {message}); \
                         create it with the Terraform module, or set \
                         aws.create_resources = true for development",
                        store.table
                    ))
                })?;
        }
        Ok(store)
    }

    /// Creates the table, its indexes and its TTL setting, and waits until it is active.
    async fn create_table(&self) -> Result<(), StoreError> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(backend)
        };
        let key_elem = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(backend)
        };
        let gsi = |name: &str, hash: &str, projection: Projection| {
            GlobalSecondaryIndex::builder()
                .index_name(name)
                .key_schema(key_elem(hash, KeyType::Hash)?)
                .key_schema(key_elem(CREATED, KeyType::Range)?)
                .projection(projection)
                .build()
                .map_err(backend)
        };
        let keys_only = Projection::builder()
            .projection_type(ProjectionType::KeysOnly)
            .build();
        let with_status = Projection::builder()
            .projection_type(ProjectionType::Include)
            .non_key_attributes(STATUS)
            .build();
        let created = self
            .client
            .create_table()
            .table_name(&*self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr(PK)?)
            .attribute_definitions(attr(SK)?)
            .attribute_definitions(attr(STATUS)?)
            .attribute_definitions(attr(REPOSITORY)?)
            .attribute_definitions(attr(CREATED)?)
            .attribute_definitions(attr(GSI_ALL)?)
            .key_schema(key_elem(PK, KeyType::Hash)?)
            .key_schema(key_elem(SK, KeyType::Range)?)
            .global_secondary_indexes(gsi(STATUS_INDEX, STATUS, keys_only.clone())?)
            .global_secondary_indexes(gsi(REPOSITORY_INDEX, REPOSITORY, with_status)?)
            .global_secondary_indexes(gsi(ALL_INDEX, GSI_ALL, keys_only)?)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(SdkError::ServiceError(e)) if e.err().is_resource_in_use_exception() => {}
            Err(e) => return Err(sdk_error("CreateTable", e)),
        }
        let deadline = tokio::time::Instant::now() + TABLE_ACTIVE_TIMEOUT;
        loop {
            let out = self
                .client
                .describe_table()
                .table_name(&*self.table)
                .send()
                .await
                .map_err(|e| sdk_error("DescribeTable", e))?;
            if out.table.and_then(|t| t.table_status) == Some(TableStatus::Active) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(backend(format!(
                    "table {} did not become active in time",
                    self.table
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let ttl = TimeToLiveSpecification::builder()
            .attribute_name(TTL_ATTRIBUTE)
            .enabled(true)
            .build()
            .map_err(backend)?;
        match self
            .client
            .update_time_to_live()
            .table_name(&*self.table)
            .time_to_live_specification(ttl)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already enabled: DynamoDB refuses to enable it twice.
            Err(SdkError::ServiceError(e))
                if e.err().meta().code() == Some("ValidationException") =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error("UpdateTimeToLive", e)),
        }
    }

    fn put(
        &self,
        item: HashMap<String, AttributeValue>,
        condition: Option<&str>,
        values: Option<HashMap<String, AttributeValue>>,
    ) -> Result<TransactWriteItem, StoreError> {
        let mut put = Put::builder()
            .table_name(&*self.table)
            .set_item(Some(item))
            .set_expression_attribute_values(values)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(c) = condition {
            put = put.condition_expression(c);
        }
        Ok(TransactWriteItem::builder()
            .put(put.build().map_err(backend)?)
            .build())
    }

    /// The write that records `marker` as a delivery, on the condition that it is new.
    fn delivery_put(&self, marker: &DeliveryId) -> Result<TransactWriteItem, StoreError> {
        let mut record = key(format!("DELIVERY#{}", marker.as_str()), "DELIVERY");
        record.insert(
            TTL_ATTRIBUTE.to_string(),
            n(epoch_secs_after(self.delivery_retention)),
        );
        self.put(record, Some("attribute_not_exists(pk)"), None)
    }

    /// The counter write that reserves `prev + 1 ..= hi` for a task's events.
    fn counter_update(
        &self,
        task: TaskId,
        prev: u64,
        hi: u64,
    ) -> Result<TransactWriteItem, StoreError> {
        let mut update = Update::builder()
            .table_name(&*self.table)
            .set_key(Some(key(task_pk(task), "SEQ")))
            .update_expression("SET #last = :hi")
            .expression_attribute_names("#last", LAST_SEQ)
            .expression_attribute_values(":hi", n(hi));
        // `<=`, not `=`: a counter found behind the stored events is moved past them
        // (see `write_with_events`); it never moves back. The events' own conditions
        // keep two writers from taking one number.
        update = update
            .condition_expression("attribute_not_exists(pk) OR #last <= :prev")
            .expression_attribute_values(":prev", n(prev));
        Ok(TransactWriteItem::builder()
            .update(update.build().map_err(backend)?)
            .build())
    }

    fn event_item(
        &self,
        task: TaskId,
        seq: u64,
        event: &NewEvent,
    ) -> Result<HashMap<String, AttributeValue>, StoreError> {
        let body = event.stored_body().map_err(backend)?;
        Ok(HashMap::from([
            (PK.to_string(), s(task_pk(task))),
            (SK.to_string(), s(event_sk(seq))),
            (SEQ.to_string(), n(seq)),
            (BODY.to_string(), s(body)),
            (
                TTL_ATTRIBUTE.to_string(),
                n(epoch_secs_after(self.event_retention)),
            ),
        ]))
    }

    /// The number of the newest event stored for a task (0 when it has none).
    async fn last_event_seq(&self, task: TaskId) -> Result<u64, StoreError> {
        let out = self
            .client
            .query()
            .table_name(&*self.table)
            .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
            .expression_attribute_values(":pk", s(task_pk(task)))
            .expression_attribute_values(":lo", s(event_sk(1)))
            .expression_attribute_values(":hi", s(event_sk(u64::MAX)))
            .scan_index_forward(false)
            .limit(1)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("Query", e))?;
        Ok(out
            .items
            .unwrap_or_default()
            .first()
            .and_then(|i| get_n(i, SEQ))
            .unwrap_or(0))
    }

    /// The event counter of a task as stored (0 when it has none).
    async fn read_counter(&self, task: TaskId) -> Result<u64, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(task_pk(task), "SEQ")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", e))?;
        Ok(out
            .item
            .as_ref()
            .and_then(|i| get_n(i, LAST_SEQ))
            .unwrap_or(0))
    }

    fn hint(&self, task: TaskId) -> Option<u64> {
        self.seq_hints.lock().get(&task).copied()
    }

    fn set_hint(&self, task: TaskId, last: Option<u64>) {
        let mut hints = self.seq_hints.lock();
        match last {
            Some(v) => {
                if hints.len() >= MAX_HINTS {
                    hints.clear();
                }
                hints.insert(task, v);
            }
            None => {
                hints.remove(&task);
            }
        }
    }

    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
        roles: &[Role],
    ) -> Result<(), TxFailure> {
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if let SdkError::ServiceError(service) = &err {
            if let TransactWriteItemsError::TransactionCanceledException(cancel) = service.err() {
                let reasons = cancel.cancellation_reasons();
                for (i, reason) in reasons.iter().enumerate() {
                    let code = reason.code().unwrap_or("None");
                    if code == "ConditionalCheckFailed" {
                        let role = roles.get(i).copied().unwrap_or(Role::Event);
                        return Err(TxFailure::Condition(role, reason.item().is_some()));
                    }
                }
                if reasons
                    .iter()
                    .any(|r| matches!(r.code(), Some("TransactionConflict")))
                {
                    return Err(TxFailure::Contended);
                }
                let codes: Vec<&str> = reasons.iter().map(|r| r.code().unwrap_or("None")).collect();
                return Err(TxFailure::Other(backend(format!(
                    "DynamoDB TransactWriteItems cancelled: {codes:?}"
                ))));
            }
            if service.err().is_transaction_in_progress_exception() {
                return Err(TxFailure::Contended);
            }
        }
        Err(TxFailure::Other(sdk_error("TransactWriteItems", err)))
    }

    /// Whether the task item exists (to tell a stale version from a missing task).
    async fn task_exists(&self, id: TaskId) -> Result<bool, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(task_pk(id), "TASK")))
            .projection_expression("pk")
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", e))?;
        Ok(out.item.is_some())
    }

    async fn stale_or_missing(&self, id: TaskId, has_item: bool) -> StoreError {
        if has_item {
            return StoreError::Conflict(id);
        }
        match self.task_exists(id).await {
            Ok(true) => StoreError::Conflict(id),
            Ok(false) => StoreError::NotFound(id),
            Err(e) => e,
        }
    }

    /// Writes events with numbers after the task's counter, together with `extra` items
    /// (the task itself), retrying when the counter moved under us.
    async fn write_with_events(
        &self,
        task: TaskId,
        extra: Vec<(TransactWriteItem, Role)>,
        events: &[NewEvent],
    ) -> Result<Option<(Role, bool)>, StoreError> {
        // Set when an event number the counter called free was taken: the counter is
        // behind the stored events (a write that stored events but not the counter, as
        // a restored table or a store without isolated transactions can leave), and
        // the next attempt starts after the newest event, which would otherwise fail
        // the same way for good.
        let mut behind = false;
        for attempt in 0..MAX_ATTEMPTS {
            let prev = match self.hint(task) {
                Some(h) if attempt == 0 => h,
                _ if behind => {
                    let (counter, last) = (
                        self.read_counter(task).await?,
                        self.last_event_seq(task).await?,
                    );
                    if last > counter {
                        tracing::warn!(task_id = %task, counter, last_event = last,
                            "the event counter is behind the stored events; writing after them");
                    }
                    counter.max(last)
                }
                _ => self.read_counter(task).await?,
            };
            let hi = prev + events.len() as u64;
            let mut items = Vec::new();
            let mut roles = Vec::new();
            for (item, role) in &extra {
                items.push(item.clone());
                roles.push(*role);
            }
            items.push(self.counter_update(task, prev, hi)?);
            roles.push(Role::Counter);
            for (i, e) in events.iter().enumerate() {
                // The counter condition alone reserves the sequence numbers; the item
                // condition makes an event never overwrite another, whatever the counter says.
                items.push(self.put(
                    self.event_item(task, prev + 1 + i as u64, e)?,
                    Some("attribute_not_exists(pk)"),
                    None,
                )?);
                roles.push(Role::Event);
            }
            match self.transact(items, &roles).await {
                Ok(()) => {
                    self.set_hint(task, Some(hi));
                    return Ok(None);
                }
                Err(TxFailure::Condition(Role::Counter, _)) => {
                    self.set_hint(task, None);
                }
                Err(TxFailure::Condition(Role::Event, _)) => {
                    self.set_hint(task, None);
                    behind = true;
                }
                Err(TxFailure::Condition(role, has_item)) => {
                    return Ok(Some((role, has_item)));
                }
                Err(TxFailure::Contended) => {}
                Err(TxFailure::Other(e)) => return Err(e),
            }
            backoff(attempt).await;
        }
        Err(backend(format!(
            "events of task {task}: gave up after {MAX_ATTEMPTS} attempts (heavy contention)"
        )))
    }

    /// The index, key and filter a query lists from.
    fn listing(query: &TaskQuery) -> Listing {
        match (&query.repository, query.status) {
            (Some(repo), status) => Listing {
                index: REPOSITORY_INDEX,
                hash_attr: REPOSITORY,
                hash_value: repo.clone(),
                status_filter: status.map(|s| s.as_str().to_string()),
            },
            (None, Some(status)) => Listing {
                index: STATUS_INDEX,
                hash_attr: STATUS,
                hash_value: status.as_str().to_string(),
                status_filter: None,
            },
            (None, None) => Listing {
                index: ALL_INDEX,
                hash_attr: GSI_ALL,
                hash_value: GSI_ALL_VALUE.to_string(),
                status_filter: None,
            },
        }
    }

    /// Reads tasks by key, in the order given.
    async fn batch_get(&self, pks: &[String]) -> Result<Vec<Task>, StoreError> {
        let mut found: HashMap<String, Task> = HashMap::new();
        for chunk in pks.chunks(MAX_BATCH_GET) {
            let keys: Vec<_> = chunk.iter().map(|pk| key(pk.clone(), "TASK")).collect();
            let mut request = Some(HashMap::from([(
                self.table.to_string(),
                KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(true)
                    .build()
                    .map_err(backend)?,
            )]));
            let mut attempt = 0;
            while let Some(req) = request.take().filter(|r| !r.is_empty()) {
                let out = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(req))
                    .send()
                    .await
                    .map_err(|e| sdk_error("BatchGetItem", e))?;
                for item in out
                    .responses
                    .and_then(|mut r| r.remove(&*self.table))
                    .unwrap_or_default()
                {
                    let task = parse_task(&item)?;
                    found.insert(task_pk(task.id), task);
                }
                request = out.unprocessed_keys;
                if request.as_ref().is_some_and(|r| !r.is_empty()) {
                    backoff(attempt).await;
                    attempt += 1;
                }
            }
        }
        Ok(pks.iter().filter_map(|pk| found.remove(pk)).collect())
    }
}

async fn backoff(attempt: u32) {
    let base = 20u64 << attempt.min(6);
    let jitter = rand::random::<u64>() % base.max(1);
    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
}

/// Cursor of a listing: the index and the key of the last task returned.
fn encode_cursor(index: &str, key: &BTreeMap<String, String>) -> String {
    let value = serde_json::json!({ "i": index, "k": key });
    hex::encode(value.to_string())
}

fn decode_cursor(
    cursor: &str,
    listing: &Listing,
) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let bytes = hex::decode(cursor).map_err(|_| StoreError::InvalidCursor)?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| StoreError::InvalidCursor)?;
    if value["i"].as_str() != Some(listing.index) {
        return Err(StoreError::InvalidCursor);
    }
    let key: BTreeMap<String, String> =
        serde_json::from_value(value["k"].clone()).map_err(|_| StoreError::InvalidCursor)?;
    let expected = [PK, SK, listing.hash_attr, CREATED];
    if key.len() != expected.len()
        || !expected.iter().all(|k| key.contains_key(*k))
        || key.get(listing.hash_attr) != Some(&listing.hash_value)
    {
        return Err(StoreError::InvalidCursor);
    }
    Ok(key.into_iter().map(|(k, v)| (k, s(v))).collect())
}

#[async_trait]
impl StateStore for DynamoStore {
    async fn create_task(
        &self,
        task: &Task,
        delivery: Option<&DeliveryId>,
        events: &[NewEvent],
    ) -> Result<Task, StoreError> {
        let mut stored = task.clone();
        stored.version = 1;
        let item = task_item(&stored)?;
        if delivery.is_none() && events.is_empty() {
            let result = self
                .client
                .put_item()
                .table_name(&*self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .send()
                .await;
            return match result {
                Ok(_) => Ok(stored),
                Err(e) if is_conditional_check_failed(&e) => {
                    Err(StoreError::AlreadyExists(stored.id))
                }
                Err(e) => Err(sdk_error("PutItem", e)),
            };
        }
        let mut items = Vec::new();
        let mut roles = Vec::new();
        if let Some(d) = delivery {
            let mut record = key(format!("DELIVERY#{}", d.as_str()), "DELIVERY");
            record.insert(
                TTL_ATTRIBUTE.to_string(),
                n(epoch_secs_after(self.delivery_retention)),
            );
            items.push(self.put(record, Some("attribute_not_exists(pk)"), None)?);
            roles.push(Role::Delivery);
        }
        items.push(self.put(item, Some("attribute_not_exists(pk)"), None)?);
        roles.push(Role::Task);
        let (first, rest) = split_events(self, stored.id, events, items.len() + 1)?;
        if !first.is_empty() {
            items.push(self.counter_update(stored.id, 0, first.len() as u64)?);
            roles.push(Role::Counter);
            for (i, e) in first.iter().enumerate() {
                items.push(self.put(self.event_item(stored.id, i as u64 + 1, e)?, None, None)?);
                roles.push(Role::Event);
            }
        }
        let mut attempt = 0;
        loop {
            match self.transact(items.clone(), &roles).await {
                Ok(()) => break,
                Err(TxFailure::Condition(Role::Delivery, _)) => {
                    let d = delivery.cloned().unwrap_or_else(|| DeliveryId::new(""));
                    return Err(StoreError::DuplicateDelivery(d));
                }
                Err(TxFailure::Condition(_, _)) => {
                    return Err(StoreError::AlreadyExists(stored.id))
                }
                Err(TxFailure::Contended) if attempt + 1 < MAX_ATTEMPTS => {
                    backoff(attempt).await;
                    attempt += 1;
                }
                Err(TxFailure::Contended) => {
                    return Err(backend("TransactWriteItems: gave up under contention"))
                }
                Err(TxFailure::Other(e)) => return Err(e),
            }
        }
        self.set_hint(stored.id, Some(first.len() as u64));
        if !rest.is_empty() {
            self.append_events(stored.id, rest).await?;
        }
        Ok(stored)
    }

    async fn get_task(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(task_pk(id), "TASK")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", e))?;
        out.item.as_ref().map(parse_task).transpose()
    }

    async fn update_task(&self, task: &Task, events: &[NewEvent]) -> Result<Task, StoreError> {
        let mut stored = task.clone();
        stored.version = task.version + 1;
        let item = task_item(&stored)?;
        let expected = HashMap::from([(":v".to_string(), n(task.version))]);
        if events.is_empty() {
            let result = self
                .client
                .put_item()
                .table_name(&*self.table)
                .set_item(Some(item))
                .condition_expression("version = :v")
                .set_expression_attribute_values(Some(expected))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
                .await;
            return match result {
                Ok(_) => Ok(stored),
                Err(e) if is_conditional_check_failed(&e) => {
                    let has_item = matches!(&e, SdkError::ServiceError(se)
                        if matches!(se.err(), aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) if c.item().is_some()));
                    Err(self.stale_or_missing(stored.id, has_item).await)
                }
                Err(e) => Err(sdk_error("PutItem", e)),
            };
        }
        let put = self.put(item, Some("version = :v"), Some(expected))?;
        let (first, rest) = split_events(self, stored.id, events, 2)?;
        match self
            .write_with_events(stored.id, vec![(put, Role::Task)], first)
            .await?
        {
            None => {}
            Some((_, has_item)) => return Err(self.stale_or_missing(stored.id, has_item).await),
        }
        if !rest.is_empty() {
            self.append_events(stored.id, rest).await?;
        }
        Ok(stored)
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let limit = query.limit.clamp(1, 500);
        let listing = Self::listing(query);
        let mut start = query
            .cursor
            .as_deref()
            .map(|c| decode_cursor(c, &listing))
            .transpose()?;
        let want = limit + 1;
        let mut keys: Vec<BTreeMap<String, String>> = Vec::new();
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&*self.table)
                .index_name(listing.index)
                .key_condition_expression("#h = :h")
                .expression_attribute_names("#h", listing.hash_attr)
                .expression_attribute_values(":h", s(listing.hash_value.clone()))
                .scan_index_forward(false)
                .set_exclusive_start_key(start.take());
            q = match &listing.status_filter {
                Some(status) => q
                    .filter_expression("#st = :st")
                    .expression_attribute_names("#st", STATUS)
                    .expression_attribute_values(":st", s(status.clone()))
                    .limit(((want - keys.len()) * 4).min(1000) as i32),
                None => q.limit((want - keys.len()) as i32),
            };
            let out = q.send().await.map_err(|e| sdk_error("Query", e))?;
            for item in out.items.unwrap_or_default() {
                let key: BTreeMap<String, String> = [PK, SK, listing.hash_attr, CREATED]
                    .iter()
                    .filter_map(|k| get_s(&item, k).map(|v| (k.to_string(), v.to_string())))
                    .collect();
                keys.push(key);
            }
            if keys.len() >= want {
                break;
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        let more = keys.len() > limit;
        keys.truncate(limit);
        let next_cursor = if more {
            keys.last().map(|k| encode_cursor(listing.index, k))
        } else {
            None
        };
        let pks: Vec<String> = keys.iter().filter_map(|k| k.get(PK).cloned()).collect();
        let tasks = self.batch_get(&pks).await?;
        Ok(TaskPage { tasks, next_cursor })
    }

    async fn count_tasks(&self, status: TaskStatus) -> Result<u64, StoreError> {
        let mut total = 0u64;
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&*self.table)
                .index_name(STATUS_INDEX)
                .key_condition_expression("#h = :h")
                .expression_attribute_names("#h", STATUS)
                .expression_attribute_values(":h", s(status.as_str()))
                .select(Select::Count)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            total += out.count.max(0) as u64;
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(total),
            }
        }
    }

    async fn record_delivery(&self, delivery: &DeliveryId) -> Result<bool, StoreError> {
        let mut item = key(format!("DELIVERY#{}", delivery.as_str()), "DELIVERY");
        item.insert(
            TTL_ATTRIBUTE.to_string(),
            n(epoch_secs_after(self.delivery_retention)),
        );
        let result = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_check_failed(&e) => Ok(false),
            Err(e) => Err(sdk_error("PutItem", e)),
        }
    }

    async fn append_events_once(
        &self,
        task: TaskId,
        marker: &DeliveryId,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        let (chunk, rest) = split_events(self, task, events, 2)?;
        if chunk.is_empty() && !events.is_empty() {
            return Err(backend(
                "an event is larger than a DynamoDB transaction allows",
            ));
        }
        let marked = self.delivery_put(marker)?;
        if let Some((role, _)) = self
            .write_with_events(task, vec![(marked, Role::Delivery)], chunk)
            .await?
        {
            return match role {
                Role::Delivery => Ok(false),
                _ => Err(backend(format!(
                    "events of task {task}: unexpected condition"
                ))),
            };
        }
        self.append_events(task, rest).await?;
        Ok(true)
    }

    async fn append_events(&self, task: TaskId, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut rest = events;
        while !rest.is_empty() {
            let (chunk, after) = split_events(self, task, rest, 1)?;
            if chunk.is_empty() {
                return Err(backend(
                    "an event is larger than a DynamoDB transaction allows",
                ));
            }
            self.write_with_events(task, Vec::new(), chunk).await?;
            rest = after;
        }
        Ok(())
    }

    async fn events(
        &self,
        task: TaskId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let limit = limit.clamp(1, 10_000);
        let lo = event_sk(after.unwrap_or(0).saturating_add(1));
        let hi = event_sk(u64::MAX);
        let mut out_events = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&*self.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
                .expression_attribute_values(":pk", s(task_pk(task)))
                .expression_attribute_values(":lo", s(lo.clone()))
                .expression_attribute_values(":hi", s(hi.clone()))
                .consistent_read(true)
                .limit((limit - out_events.len()) as i32)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            for item in out.items.unwrap_or_default() {
                let seq = get_n(&item, SEQ).ok_or_else(|| corrupt("event without seq"))?;
                let body = get_s(&item, BODY).ok_or_else(|| corrupt("event without body"))?;
                let event: NewEvent = serde_json::from_str(body).map_err(corrupt)?;
                out_events.push(Event {
                    seq,
                    task_id: task,
                    event,
                });
            }
            if out_events.len() >= limit {
                break;
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        Ok(out_events)
    }

    async fn add_spend(&self, account: &str, month: &str, micros: u64) -> Result<u64, StoreError> {
        let out = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(format!("SPEND#{account}#{month}"), "SPEND")))
            .update_expression("ADD #micros :d")
            .expression_attribute_names("#micros", SPEND_MICROS)
            .expression_attribute_values(":d", n(micros))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| sdk_error("UpdateItem", e))?;
        Ok(out
            .attributes()
            .and_then(|a| get_n(a, SPEND_MICROS))
            .unwrap_or(micros))
    }

    async fn add_spend_once(
        &self,
        account: &str,
        month: &str,
        marker: &DeliveryId,
        micros: u64,
    ) -> Result<Option<u64>, StoreError> {
        let add = Update::builder()
            .table_name(&*self.table)
            .set_key(Some(key(format!("SPEND#{account}#{month}"), "SPEND")))
            .update_expression("ADD #micros :d")
            .expression_attribute_names("#micros", SPEND_MICROS)
            .expression_attribute_values(":d", n(micros))
            .build()
            .map_err(backend)?;
        let items = vec![
            self.delivery_put(marker)?,
            TransactWriteItem::builder().update(add).build(),
        ];
        for attempt in 0..MAX_ATTEMPTS {
            match self
                .transact(items.clone(), &[Role::Delivery, Role::Counter])
                .await
            {
                Ok(()) => return Ok(Some(self.spend(account, month).await?)),
                Err(TxFailure::Condition(_, _)) => return Ok(None),
                Err(TxFailure::Contended) => backoff(attempt).await,
                Err(TxFailure::Other(e)) => return Err(e),
            }
        }
        Err(backend(format!(
            "spend of {account}: gave up after {MAX_ATTEMPTS} attempts (heavy contention)"
        )))
    }

    async fn spend(&self, account: &str, month: &str) -> Result<u64, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(format!("SPEND#{account}#{month}"), "SPEND")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", e))?;
        Ok(out.item().and_then(|i| get_n(i, SPEND_MICROS)).unwrap_or(0))
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now_ms = unix_ms(now());
        let mut item = key(format!("LEASE#{name}"), "LEASE");
        item.insert(HOLDER.to_string(), s(holder));
        item.insert(
            LEASE_EXPIRES.to_string(),
            n(now_ms + ttl.as_millis() as i64),
        );
        // Expired leases are cleaned up a day after they end.
        item.insert(
            TTL_ATTRIBUTE.to_string(),
            n(epoch_secs_after(ttl + Duration::from_secs(86_400))),
        );
        let result = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk) OR #holder = :me OR #expires <= :now")
            .expression_attribute_names("#holder", HOLDER)
            .expression_attribute_names("#expires", LEASE_EXPIRES)
            .expression_attribute_values(":me", s(holder))
            .expression_attribute_values(":now", n(now_ms))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_check_failed(&e) => Ok(false),
            Err(e) => Err(sdk_error("PutItem", e)),
        }
    }

    async fn claim_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
        held: Option<u64>,
    ) -> Result<Option<LeaseGrant>, StoreError> {
        let now_ms = unix_ms(now());
        let update = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(format!("LEASE#{name}"), "LEASE")))
            .expression_attribute_names("#holder", HOLDER)
            .expression_attribute_names("#expires", LEASE_EXPIRES)
            .expression_attribute_names("#fence", FENCE)
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_values(":me", s(holder))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":exp", n(now_ms + ttl.as_millis() as i64))
            // Expired leases are cleaned up a day after they end.
            .expression_attribute_values(
                ":ttl",
                n(epoch_secs_after(ttl + Duration::from_secs(86_400))),
            )
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew);
        let update = match held {
            Some(token) => update
                .update_expression("SET #expires = :exp, #ttl = :ttl")
                .condition_expression("#holder = :me AND #fence = :tok AND #expires > :now")
                .expression_attribute_values(":tok", n(token)),
            None => update
                .update_expression(
                    "SET #holder = :me, #expires = :exp, #ttl = :ttl ADD #fence :one",
                )
                .condition_expression(
                    "attribute_not_exists(pk) OR #holder = :me OR #expires <= :now",
                )
                .expression_attribute_values(":one", n(1)),
        };
        match update.send().await {
            Ok(out) => {
                let token = out
                    .attributes()
                    .and_then(|a| get_n(a, FENCE))
                    .ok_or_else(|| corrupt("lease item has no fencing token"))?;
                Ok(Some(LeaseGrant { token }))
            }
            Err(e) if is_conditional_check_failed(&e) => Ok(None),
            Err(e) => Err(sdk_error("UpdateItem", e)),
        }
    }

    async fn release_lease(&self, name: &str, holder: &str, token: u64) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(format!("LEASE#{name}"), "LEASE")))
            .update_expression("SET #expires = :zero")
            .condition_expression("#holder = :me AND #fence = :tok")
            .expression_attribute_names("#holder", HOLDER)
            .expression_attribute_names("#expires", LEASE_EXPIRES)
            .expression_attribute_names("#fence", FENCE)
            .expression_attribute_values(":me", s(holder))
            .expression_attribute_values(":tok", n(token))
            .expression_attribute_values(":zero", n(0))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_check_failed(&e) => Ok(()),
            Err(e) => Err(sdk_error("UpdateItem", e)),
        }
    }

    async fn put_inbox(&self, d: &InboxDelivery) -> Result<bool, StoreError> {
        let now_ms = unix_ms(now());
        let marker = format!("{now_ms:020}#{}", d.id.as_str());
        let mut record = key(format!("INBOX#{}", d.id.as_str()), "INBOX");
        record.insert(INBOX_EVENT.into(), s(d.event.clone()));
        record.insert(INBOX_PAYLOAD.into(), s(d.payload.clone()));
        record.insert(INBOX_STATUS.into(), s("pending"));
        record.insert(INBOX_ATTEMPTS.into(), n(0));
        record.insert(INBOX_DUE.into(), n(now_ms));
        record.insert(INBOX_MARKER.into(), s(marker.clone()));
        let mut pending = key(INBOX_PENDING.to_string(), &marker);
        pending.insert(INBOX_DUE.into(), n(now_ms));
        for _ in 0..MAX_ATTEMPTS {
            let items = vec![
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&*self.table)
                            .set_item(Some(record.clone()))
                            .condition_expression("attribute_not_exists(pk)")
                            .build()
                            .map_err(backend)?,
                    )
                    .build(),
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&*self.table)
                            .set_item(Some(pending.clone()))
                            .build()
                            .map_err(backend)?,
                    )
                    .build(),
            ];
            match self.transact(items, &[Role::Delivery, Role::Event]).await {
                Ok(()) => return Ok(true),
                Err(TxFailure::Condition(..)) => return Ok(false),
                Err(TxFailure::Contended) => continue,
                Err(TxFailure::Other(e)) => return Err(e),
            }
        }
        Err(backend("inbox write kept meeting other transactions"))
    }

    async fn claim_inbox(
        &self,
        id: &DeliveryId,
        hold: Duration,
    ) -> Result<Option<InboxDelivery>, StoreError> {
        let now_ms = unix_ms(now());
        let result = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(format!("INBOX#{}", id.as_str()), "INBOX")))
            .update_expression("SET #due = :until ADD #attempts :one")
            .condition_expression("#status = :pending AND #due <= :now")
            .expression_attribute_names("#due", INBOX_DUE)
            .expression_attribute_names("#attempts", INBOX_ATTEMPTS)
            .expression_attribute_names("#status", INBOX_STATUS)
            .expression_attribute_values(":until", n(now_ms + hold.as_millis() as i64))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":now", n(now_ms))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let item = out
                    .attributes()
                    .ok_or_else(|| corrupt("claimed inbox delivery came back empty"))?;
                let field = |name: &str| {
                    get_s(item, name)
                        .map(str::to_string)
                        .ok_or_else(|| corrupt(format!("inbox delivery has no {name}")))
                };
                Ok(Some(InboxDelivery {
                    id: id.clone(),
                    event: field(INBOX_EVENT)?,
                    payload: field(INBOX_PAYLOAD)?,
                    attempts: get_n(item, INBOX_ATTEMPTS).unwrap_or(1) as u32,
                }))
            }
            Err(e) if is_conditional_check_failed(&e) => Ok(None),
            Err(e) => Err(sdk_error("UpdateItem", e)),
        }
    }

    async fn finish_inbox(
        &self,
        id: &DeliveryId,
        outcome: &InboxOutcome,
    ) -> Result<(), StoreError> {
        let now_ms = unix_ms(now());
        let record_key = key(format!("INBOX#{}", id.as_str()), "INBOX");
        if let InboxOutcome::Retry { after, error } = outcome {
            let due = n(now_ms + after.as_millis() as i64);
            let out = self
                .client
                .update_item()
                .table_name(&*self.table)
                .set_key(Some(record_key))
                .update_expression("SET #due = :due, #error = :error")
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_names("#due", INBOX_DUE)
                .expression_attribute_names("#error", INBOX_ERROR)
                .expression_attribute_values(":due", due.clone())
                .expression_attribute_values(":error", s(error.clone()))
                .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
                .send()
                .await
                .map_err(|e| sdk_error("UpdateItem", e))?;
            // The pending marker carries the due time too, so that the sweep's listing
            // skips it until then. Not in one transaction with the record: a marker left
            // early only makes a sweep try a claim that the record's own due time refuses.
            if let Some(marker) = out.attributes().and_then(|i| get_s(i, INBOX_MARKER)) {
                self.client
                    .update_item()
                    .table_name(&*self.table)
                    .set_key(Some(key(INBOX_PENDING.to_string(), marker)))
                    .update_expression("SET #due = :due")
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_names("#due", INBOX_DUE)
                    .expression_attribute_values(":due", due)
                    .send()
                    .await
                    .map_err(|e| sdk_error("UpdateItem", e))?;
            }
            return Ok(());
        }
        let (status, error) = match outcome {
            InboxOutcome::Failed { error } => ("failed", error.clone()),
            _ => ("done", String::new()),
        };
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(record_key.clone()))
            .projection_expression("#marker")
            .expression_attribute_names("#marker", INBOX_MARKER)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", e))?;
        let marker = out
            .item()
            .and_then(|i| get_s(i, INBOX_MARKER))
            .map(str::to_string);
        let mut items = vec![TransactWriteItem::builder()
            .update(
                Update::builder()
                    .table_name(&*self.table)
                    .set_key(Some(record_key))
                    .update_expression("SET #status = :status, #error = :error, #ttl = :ttl")
                    .expression_attribute_names("#status", INBOX_STATUS)
                    .expression_attribute_names("#error", INBOX_ERROR)
                    .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                    .expression_attribute_values(":status", s(status))
                    .expression_attribute_values(":error", s(error))
                    .expression_attribute_values(
                        ":ttl",
                        n(epoch_secs_after(self.delivery_retention)),
                    )
                    .build()
                    .map_err(backend)?,
            )
            .build()];
        if let Some(m) = marker {
            items.push(
                TransactWriteItem::builder()
                    .delete(
                        aws_sdk_dynamodb::types::Delete::builder()
                            .table_name(&*self.table)
                            .set_key(Some(key(INBOX_PENDING.to_string(), &m)))
                            .build()
                            .map_err(backend)?,
                    )
                    .build(),
            );
        }
        for _ in 0..MAX_ATTEMPTS {
            match self
                .transact(items.clone(), &[Role::Delivery, Role::Event])
                .await
            {
                Ok(()) => return Ok(()),
                Err(TxFailure::Contended) => continue,
                Err(TxFailure::Condition(..)) => {
                    return Err(backend("inbox delivery changed while it was finished"))
                }
                Err(TxFailure::Other(e)) => return Err(e),
            }
        }
        Err(backend("inbox write kept meeting other transactions"))
    }

    async fn pending_inbox(&self, limit: usize) -> Result<Vec<DeliveryId>, StoreError> {
        let limit = limit.clamp(1, 1000);
        let now_ms = unix_ms(now());
        let mut ids = Vec::new();
        let mut start = None;
        // A filtered query pages until it has `limit` due markers or none are left (each
        // page reads up to 1 MB of markers before the filter, "Query" in the DynamoDB API
        // reference); markers are a few dozen bytes.
        loop {
            let out = self
                .client
                .query()
                .table_name(&*self.table)
                .key_condition_expression("#pk = :pk")
                .filter_expression("attribute_not_exists(#due) OR #due <= :now")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#due", INBOX_DUE)
                .expression_attribute_values(":pk", s(INBOX_PENDING))
                .expression_attribute_values(":now", n(now_ms))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", e))?;
            ids.extend(
                out.items()
                    .iter()
                    .filter_map(|i| get_s(i, SK))
                    .filter_map(|sk| sk.split_once('#').map(|(_, id)| DeliveryId::new(id))),
            );
            match out.last_evaluated_key {
                Some(key) if ids.len() < limit => start = Some(key),
                _ => break,
            }
        }
        ids.truncate(limit);
        Ok(ids)
    }
}

/// Splits events into those that fit one transaction beside `reserved` other items (the
/// counter included) and the rest.
fn split_events<'a>(
    store: &DynamoStore,
    task: TaskId,
    events: &'a [NewEvent],
    reserved: usize,
) -> Result<(&'a [NewEvent], &'a [NewEvent]), StoreError> {
    let room = MAX_TRANSACTION_ITEMS.saturating_sub(reserved + 1);
    let mut bytes = 0usize;
    let mut count = 0usize;
    for e in events.iter().take(room) {
        let size = approx_item_size(&store.event_item(task, u64::MAX, e)?);
        if bytes + size > MAX_TRANSACTION_BYTES {
            break;
        }
        bytes += size;
        count += 1;
    }
    Ok(events.split_at(count))
}

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table", &self.table)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_keys_are_fixed_width_and_ordered() {
        let id = TaskId::new();
        let a = time::macros::datetime!(2025-01-02 03:04:05.006 UTC);
        let b = time::macros::datetime!(2025-01-02 03:04:05.060 UTC);
        let ka = created_sort_key(a, id);
        let kb = created_sort_key(b, id);
        assert!(ka.starts_with("2025-01-02T03:04:05.006Z#"), "{ka}");
        assert_eq!(ka.len(), kb.len());
        assert!(ka < kb);
        assert!(event_sk(9) < event_sk(10));
    }

    #[test]
    fn cursors_must_match_their_listing() {
        let listing = Listing {
            index: STATUS_INDEX,
            hash_attr: STATUS,
            hash_value: "failed".into(),
            status_filter: None,
        };
        let key: BTreeMap<String, String> = [
            (PK, "TASK#x"),
            (SK, "TASK"),
            (STATUS, "failed"),
            (CREATED, "2025"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = encode_cursor(STATUS_INDEX, &key);
        assert_eq!(decode_cursor(&c, &listing).unwrap().len(), 4);
        assert!(decode_cursor("garbage!", &listing).is_err());
        let other = Listing {
            hash_value: "queued".into(),
            ..listing
        };
        assert!(decode_cursor(&c, &other).is_err());
    }
}
