//! The SQLite state store in `<data_dir>/state.db` (WAL mode). A task is one row holding
//! its JSON document and a version; updates are `UPDATE … WHERE version = ?`. Events are
//! rows of their own, read in pages; events and webhook delivery records older than the
//! [`Retention`] (`local.event_retention_days`, `local.delivery_retention_days`) are
//! deleted in bounded passes, at most every [`PRUNE_INTERVAL`].

use super::{
    Event, InboxDelivery, InboxOutcome, LeaseGrant, NewEvent, StateStore, StoreError, TaskPage,
    TaskQuery,
};
use crate::ids::{DeliveryId, TaskId};
use crate::queue::sqlite::open_db;
use crate::status::TaskStatus;
use crate::task::Task;
use crate::timefmt::{now, unix_ms};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How often a store deletes what its retention lets go, at most.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// The most rows one pruning pass deletes per table, so that it never holds the database
/// for long; what is left goes in the next pass.
const PRUNE_BATCH: i64 = 10_000;

/// How long records are kept; `None` keeps them for ever.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Task events, by the event's time.
    pub events: Option<Duration>,
    /// Webhook delivery records, by when they were recorded.
    pub deliveries: Option<Duration>,
}

/// Rows deleted by one pruning pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    pub deliveries: u64,
}

/// The SQLite state-store backend.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    retention: Retention,
    /// When the last pruning pass ran (`None`: not yet).
    last_prune: Arc<Mutex<Option<std::time::Instant>>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn insert_events(
    tx: &Transaction<'_>,
    task: TaskId,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO events (task_id, subtask_id, kind, at_ms, body) VALUES (?, ?, ?, ?, ?)",
        )
        .map_err(backend)?;
    for e in events {
        let body = e.stored_body().map_err(backend)?;
        stmt.execute(params![
            task.to_string(),
            e.subtask_id.map(|s| s.to_string()),
            serde_json::to_value(e.kind)
                .map_err(backend)?
                .as_str()
                .unwrap_or("state")
                .to_string(),
            unix_ms(e.at),
            body
        ])
        .map_err(backend)?;
    }
    Ok(())
}

fn parse_task(doc: &str) -> Result<Task, StoreError> {
    serde_json::from_str(doc).map_err(|e| corrupt(format!("stored task is unreadable: {e}")))
}

impl SqliteStore {
    /// Opens (and creates) the state database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(backend)?;
        let conn = open_db(&data_dir.join("state.db")).map_err(backend)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tasks (
                 id            TEXT PRIMARY KEY,
                 version       INTEGER NOT NULL,
                 status        TEXT NOT NULL,
                 repository    TEXT NOT NULL,
                 created_at_ms INTEGER NOT NULL,
                 doc           TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created_at_ms DESC, id DESC);
             CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, created_at_ms DESC);
             CREATE INDEX IF NOT EXISTS tasks_by_repository ON tasks (repository, created_at_ms DESC);
             CREATE TABLE IF NOT EXISTS events (
                 seq        INTEGER PRIMARY KEY AUTOINCREMENT,
                 task_id    TEXT NOT NULL,
                 subtask_id TEXT,
                 kind       TEXT NOT NULL,
                 at_ms      INTEGER NOT NULL,
                 body       TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS events_by_task ON events (task_id, seq);
             CREATE INDEX IF NOT EXISTS events_by_time ON events (at_ms);
             CREATE TABLE IF NOT EXISTS deliveries (
                 id       TEXT PRIMARY KEY,
                 at_ms    INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS spend (
                 account  TEXT NOT NULL,
                 month    TEXT NOT NULL,
                 micros   INTEGER NOT NULL,
                 PRIMARY KEY (account, month)
             );
             CREATE TABLE IF NOT EXISTS leases (
                 name        TEXT PRIMARY KEY,
                 holder      TEXT NOT NULL,
                 expires_ms  INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS inbox (
                 id          TEXT PRIMARY KEY,
                 event       TEXT NOT NULL,
                 payload     TEXT NOT NULL,
                 status      TEXT NOT NULL,
                 attempts    INTEGER NOT NULL DEFAULT 0,
                 due_ms      INTEGER NOT NULL,
                 at_ms       INTEGER NOT NULL,
                 error       TEXT
             );
             CREATE INDEX IF NOT EXISTS inbox_pending ON inbox (status, at_ms);",
        )
        .map_err(backend)?;
        // Databases made before leases had fencing tokens gain the column.
        let has_token: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('leases') WHERE name = 'token'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(backend)?
            > 0;
        if !has_token {
            conn.execute_batch("ALTER TABLE leases ADD COLUMN token INTEGER NOT NULL DEFAULT 0")
                .map_err(backend)?;
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            retention: Retention::default(),
            last_prune: Arc::new(Mutex::new(None)),
        })
    }

    /// The same store, deleting events and delivery records older than `retention` (at
    /// most every [`PRUNE_INTERVAL`], on a write).
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Deletes events and delivery records older than the retention, as of `at`. Each
    /// pass deletes at most a batch per table.
    pub async fn prune(&self, at: crate::timefmt::Timestamp) -> Result<Pruned, StoreError> {
        let retention = self.retention;
        *self.last_prune.lock() = Some(std::time::Instant::now());
        self.blocking(move |conn| {
            let now_ms = unix_ms(at);
            let cutoff = |d: Duration| now_ms - d.as_millis().min(i64::MAX as u128) as i64;
            let mut pruned = Pruned::default();
            if let Some(d) = retention.events {
                pruned.events = conn
                    .execute(
                        "DELETE FROM events WHERE seq IN
                         (SELECT seq FROM events WHERE at_ms < ? LIMIT ?)",
                        params![cutoff(d), PRUNE_BATCH],
                    )
                    .map_err(backend)? as u64;
            }
            if let Some(d) = retention.deliveries {
                pruned.deliveries = conn
                    .execute(
                        "DELETE FROM deliveries WHERE id IN
                         (SELECT id FROM deliveries WHERE at_ms < ? LIMIT ?)",
                        params![cutoff(d), PRUNE_BATCH],
                    )
                    .map_err(backend)? as u64;
                // Finished inbox deliveries go with the delivery records; pending ones stay.
                pruned.deliveries += conn
                    .execute(
                        "DELETE FROM inbox WHERE id IN
                         (SELECT id FROM inbox WHERE status != 'pending' AND at_ms < ? LIMIT ?)",
                        params![cutoff(d), PRUNE_BATCH],
                    )
                    .map_err(backend)? as u64;
            }
            Ok(pruned)
        })
        .await
    }

    /// Prunes when the last pass is [`PRUNE_INTERVAL`] old; a failure is only logged.
    async fn prune_if_due(&self) {
        if self.retention == Retention::default() {
            return;
        }
        let due = self
            .last_prune
            .lock()
            .is_none_or(|t| t.elapsed() >= PRUNE_INTERVAL);
        if due {
            match self.prune(now()).await {
                Ok(p) if p != Pruned::default() => {
                    tracing::info!(
                        events = p.events,
                        deliveries = p.deliveries,
                        "deleted records past their retention"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot delete old records"),
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(backend)?
    }
}

/// Cursor of a task listing: the last row's creation time and id.
fn encode_cursor(created_ms: i64, id: &str) -> String {
    hex::encode(format!("{created_ms}:{id}"))
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), StoreError> {
    let text = hex::decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(StoreError::InvalidCursor)?;
    let (ms, id) = text.split_once(':').ok_or(StoreError::InvalidCursor)?;
    Ok((
        ms.parse().map_err(|_| StoreError::InvalidCursor)?,
        id.to_string(),
    ))
}

#[async_trait]
impl StateStore for SqliteStore {
    async fn create_task(
        &self,
        task: &Task,
        delivery: Option<&DeliveryId>,
        events: &[NewEvent],
    ) -> Result<Task, StoreError> {
        let mut stored = task.clone();
        stored.version = 1;
        let delivery = delivery.cloned();
        let events = events.to_vec();
        self.blocking(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            if let Some(d) = &delivery {
                let n = tx
                    .execute(
                        "INSERT OR IGNORE INTO deliveries (id, at_ms) VALUES (?, ?)",
                        params![d.as_str(), unix_ms(now())],
                    )
                    .map_err(backend)?;
                if n == 0 {
                    return Err(StoreError::DuplicateDelivery(d.clone()));
                }
            }
            let doc = serde_json::to_string(&stored).map_err(backend)?;
            let n = tx
                .execute(
                    "INSERT OR IGNORE INTO tasks (id, version, status, repository, created_at_ms, doc)
                     VALUES (?, 1, ?, ?, ?, ?)",
                    params![
                        stored.id.to_string(),
                        stored.status.as_str(),
                        stored.repository,
                        unix_ms(stored.created_at),
                        doc
                    ],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::AlreadyExists(stored.id));
            }
            insert_events(&tx, stored.id, &events)?;
            tx.commit().map_err(backend)?;
            Ok(stored)
        })
        .await
    }

    async fn get_task(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.blocking(move |conn| {
            let doc: Option<String> = conn
                .query_row(
                    "SELECT doc FROM tasks WHERE id = ?",
                    params![id.to_string()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            doc.as_deref().map(parse_task).transpose()
        })
        .await
    }

    async fn update_task(&self, task: &Task, events: &[NewEvent]) -> Result<Task, StoreError> {
        let mut stored = task.clone();
        stored.version = task.version + 1;
        let expected = task.version;
        let events = events.to_vec();
        self.blocking(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let doc = serde_json::to_string(&stored).map_err(backend)?;
            let n = tx
                .execute(
                    "UPDATE tasks SET version = ?, status = ?, doc = ? WHERE id = ? AND version = ?",
                    params![
                        stored.version as i64,
                        stored.status.as_str(),
                        doc,
                        stored.id.to_string(),
                        expected as i64
                    ],
                )
                .map_err(backend)?;
            if n == 0 {
                let exists: Option<i64> = tx
                    .query_row(
                        "SELECT version FROM tasks WHERE id = ?",
                        params![stored.id.to_string()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(backend)?;
                return Err(match exists {
                    Some(_) => StoreError::Conflict(stored.id),
                    None => StoreError::NotFound(stored.id),
                });
            }
            insert_events(&tx, stored.id, &events)?;
            tx.commit().map_err(backend)?;
            Ok(stored)
        })
        .await
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let limit = query.limit.clamp(1, 500);
        let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
        let status = query.status.map(|s| s.as_str().to_string());
        let repository = query.repository.clone();
        self.blocking(move |conn| {
            let (c_ms, c_id) = cursor.unwrap_or((i64::MAX, String::new()));
            let has_cursor = c_id.is_empty() as i64;
            let mut stmt = conn
                .prepare_cached(
                    "SELECT created_at_ms, id, doc FROM tasks
                     WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR repository = ?2)
                       AND (?5 = 1 OR created_at_ms < ?3 OR (created_at_ms = ?3 AND id < ?4))
                     ORDER BY created_at_ms DESC, id DESC LIMIT ?6",
                )
                .map_err(backend)?;
            let rows: Vec<(i64, String, String)> = stmt
                .query_map(
                    params![
                        status,
                        repository,
                        c_ms,
                        c_id,
                        has_cursor,
                        (limit + 1) as i64
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(backend)?
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            let more = rows.len() > limit;
            let rows = &rows[..rows.len().min(limit)];
            let next_cursor = if more {
                rows.last().map(|(ms, id, _)| encode_cursor(*ms, id))
            } else {
                None
            };
            let tasks = rows
                .iter()
                .map(|(_, _, doc)| parse_task(doc))
                .collect::<Result<_, _>>()?;
            Ok(TaskPage { tasks, next_cursor })
        })
        .await
    }

    async fn count_tasks(&self, status: TaskStatus) -> Result<u64, StoreError> {
        self.blocking(move |conn| {
            let n: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM tasks WHERE status = ?",
                    params![status.as_str()],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    async fn record_delivery(&self, delivery: &DeliveryId) -> Result<bool, StoreError> {
        self.prune_if_due().await;
        let d = delivery.clone();
        self.blocking(move |conn| {
            let n = conn
                .execute(
                    "INSERT OR IGNORE INTO deliveries (id, at_ms) VALUES (?, ?)",
                    params![d.as_str(), unix_ms(now())],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn append_events_once(
        &self,
        task: TaskId,
        marker: &DeliveryId,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        self.prune_if_due().await;
        let events = events.to_vec();
        let marker = marker.clone();
        self.blocking(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let n = tx
                .execute(
                    "INSERT OR IGNORE INTO deliveries (id, at_ms) VALUES (?, ?)",
                    params![marker.as_str(), unix_ms(now())],
                )
                .map_err(backend)?;
            if n == 0 {
                return Ok(false);
            }
            insert_events(&tx, task, &events)?;
            tx.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn append_events(&self, task: TaskId, events: &[NewEvent]) -> Result<(), StoreError> {
        self.prune_if_due().await;
        let events = events.to_vec();
        self.blocking(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            insert_events(&tx, task, &events)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn events(
        &self,
        task: TaskId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let limit = limit.clamp(1, 10_000) as i64;
        self.blocking(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, body FROM events WHERE task_id = ? AND seq > ?
                     ORDER BY seq LIMIT ?",
                )
                .map_err(backend)?;
            let rows: Vec<(i64, String)> = stmt
                .query_map(
                    params![task.to_string(), after.unwrap_or(0) as i64, limit],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(backend)?
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            rows.into_iter()
                .map(|(seq, body)| {
                    let event: NewEvent = serde_json::from_str(&body).map_err(corrupt)?;
                    Ok(Event {
                        seq: seq as u64,
                        task_id: task,
                        event,
                    })
                })
                .collect()
        })
        .await
    }

    async fn add_spend(&self, account: &str, month: &str, micros: u64) -> Result<u64, StoreError> {
        let (account, month) = (account.to_string(), month.to_string());
        self.blocking(move |conn| {
            let total: i64 = conn
                .query_row(
                    "INSERT INTO spend (account, month, micros) VALUES (?1, ?2, ?3)
                     ON CONFLICT (account, month) DO UPDATE SET micros = micros + ?3
                     RETURNING micros",
                    params![account, month, micros as i64],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            Ok(total.max(0) as u64)
        })
        .await
    }

    async fn add_spend_once(
        &self,
        account: &str,
        month: &str,
        marker: &DeliveryId,
        micros: u64,
    ) -> Result<Option<u64>, StoreError> {
        let (account, month, marker) = (account.to_string(), month.to_string(), marker.clone());
        self.blocking(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let n = tx
                .execute(
                    "INSERT OR IGNORE INTO deliveries (id, at_ms) VALUES (?, ?)",
                    params![marker.as_str(), unix_ms(now())],
                )
                .map_err(backend)?;
            if n == 0 {
                return Ok(None);
            }
            let total: i64 = tx
                .query_row(
                    "INSERT INTO spend (account, month, micros) VALUES (?1, ?2, ?3)
                     ON CONFLICT (account, month) DO UPDATE SET micros = micros + ?3
                     RETURNING micros",
                    params![account, month, micros as i64],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(Some(total.max(0) as u64))
        })
        .await
    }

    async fn spend(&self, account: &str, month: &str) -> Result<u64, StoreError> {
        let (account, month) = (account.to_string(), month.to_string());
        self.blocking(move |conn| {
            let total: Option<i64> = conn
                .query_row(
                    "SELECT micros FROM spend WHERE account = ? AND month = ?",
                    params![account, month],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            Ok(total.unwrap_or(0).max(0) as u64)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.blocking(move |conn| {
            let now_ms = unix_ms(now());
            let n = conn
                .execute(
                    "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET holder = ?2, expires_ms = ?3
                     WHERE leases.holder = ?2 OR leases.expires_ms <= ?4",
                    params![name, holder, now_ms + ttl.as_millis() as i64, now_ms],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn claim_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
        held: Option<u64>,
    ) -> Result<Option<LeaseGrant>, StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.blocking(move |conn| {
            let now_ms = unix_ms(now());
            let expires = now_ms + ttl.as_millis() as i64;
            let token: Option<i64> = match held {
                Some(token) => conn
                    .query_row(
                        "UPDATE leases SET expires_ms = ?3
                         WHERE name = ?1 AND holder = ?2 AND token = ?4 AND expires_ms > ?5
                         RETURNING token",
                        params![name, holder, expires, token as i64, now_ms],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(backend)?,
                None => conn
                    .query_row(
                        "INSERT INTO leases (name, holder, expires_ms, token) VALUES (?1, ?2, ?3, 1)
                         ON CONFLICT (name) DO UPDATE SET holder = ?2, expires_ms = ?3,
                             token = leases.token + 1
                         WHERE leases.holder = ?2 OR leases.expires_ms <= ?4
                         RETURNING token",
                        params![name, holder, expires, now_ms],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(backend)?,
            };
            Ok(token.map(|t| LeaseGrant {
                token: t.max(0) as u64,
            }))
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str, token: u64) -> Result<(), StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.blocking(move |conn| {
            conn.execute(
                "UPDATE leases SET expires_ms = 0 WHERE name = ?1 AND holder = ?2 AND token = ?3",
                params![name, holder, token as i64],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn put_inbox(&self, d: &InboxDelivery) -> Result<bool, StoreError> {
        self.prune_if_due().await;
        let d = d.clone();
        self.blocking(move |conn| {
            let now_ms = unix_ms(now());
            let n = conn
                .execute(
                    "INSERT OR IGNORE INTO inbox (id, event, payload, status, attempts, due_ms, at_ms)
                     VALUES (?, ?, ?, 'pending', 0, ?, ?)",
                    params![d.id.as_str(), d.event, d.payload, now_ms, now_ms],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn claim_inbox(
        &self,
        id: &DeliveryId,
        hold: Duration,
    ) -> Result<Option<InboxDelivery>, StoreError> {
        let id = id.clone();
        self.blocking(move |conn| {
            let now_ms = unix_ms(now());
            conn.query_row(
                "UPDATE inbox SET attempts = attempts + 1, due_ms = ?2
                 WHERE id = ?1 AND status = 'pending' AND due_ms <= ?3
                 RETURNING event, payload, attempts",
                params![id.as_str(), now_ms + hold.as_millis() as i64, now_ms],
                |r| {
                    Ok(InboxDelivery {
                        id: id.clone(),
                        event: r.get(0)?,
                        payload: r.get(1)?,
                        attempts: r.get::<_, i64>(2)?.max(0) as u32,
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn finish_inbox(
        &self,
        id: &DeliveryId,
        outcome: &InboxOutcome,
    ) -> Result<(), StoreError> {
        let (id, outcome) = (id.clone(), outcome.clone());
        self.blocking(move |conn| {
            let now_ms = unix_ms(now());
            let (status, due, error) = match outcome {
                InboxOutcome::Done => ("done", now_ms, None),
                InboxOutcome::Retry { after, error } => {
                    ("pending", now_ms + after.as_millis() as i64, Some(error))
                }
                InboxOutcome::Failed { error } => ("failed", now_ms, Some(error)),
            };
            // Finished records age from now, for the retention.
            let at = if status == "pending" {
                None
            } else {
                Some(now_ms)
            };
            conn.execute(
                "UPDATE inbox SET status = ?2, due_ms = ?3, error = ?4, at_ms = COALESCE(?5, at_ms)
                 WHERE id = ?1",
                params![id.as_str(), status, due, error, at],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn pending_inbox(&self, limit: usize) -> Result<Vec<DeliveryId>, StoreError> {
        let limit = limit.clamp(1, 10_000) as i64;
        self.blocking(move |conn| {
            let now_ms = unix_ms(now());
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id FROM inbox WHERE status = 'pending' AND due_ms <= ?
                     ORDER BY at_ms LIMIT ?",
                )
                .map_err(backend)?;
            let ids: Vec<String> = stmt
                .query_map(params![now_ms, limit], |r| r.get(0))
                .map_err(backend)?
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            Ok(ids.into_iter().map(DeliveryId::new).collect())
        })
        .await
    }
}
