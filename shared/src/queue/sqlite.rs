//! The SQLite queue: one table of messages in `<data_dir>/queue.db` (WAL mode), safe for
//! several processes at once. Receiving claims rows in an immediate transaction; long
//! polling re-checks at once when this process sends, when any process writes the
//! database (an inotify watch on `data_dir` sees `queue.db` or its write-ahead log
//! change: a worker wakes as soon as the coordinator enqueues), and every
//! [`POLL_INTERVAL`] whatever happens (where inotify is not available, say).

use super::{Depth, Queue, QueueError, QueueId, Receipt, Received};
use crate::timefmt::{now, unix_ms};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How often a long poll looks for messages sent by other processes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The SQLite queue backend.
#[derive(Clone)]
pub struct SqliteQueue {
    conn: Arc<Mutex<Connection>>,
    max_receives: u32,
    sent: Arc<Notify>,
    poll_interval: Duration,
    /// The watch of other processes' writes; ended with the last clone.
    _watch: Option<Arc<WriteWatch>>,
}

/// The files whose change means another process may have sent: the database and its
/// write-ahead log.
const WATCHED_NAMES: [&str; 2] = ["queue.db", "queue.db-wal"];

/// A thread waking the queue's long polls when another process writes the database.
/// Dropped, it removes its watch, which wakes the thread to end.
struct WriteWatch {
    inotify: Arc<nix::sys::inotify::Inotify>,
    watch: nix::sys::inotify::WatchDescriptor,
}

impl Drop for WriteWatch {
    fn drop(&mut self) {
        let _ = self.inotify.rm_watch(self.watch);
    }
}

impl WriteWatch {
    /// Watches `data_dir` and calls `notify_waiters` on `sent` for every change of the
    /// queue's files. `None` (polling only) when inotify cannot be had.
    fn start(data_dir: &Path, sent: Arc<Notify>) -> Option<Self> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let started = Inotify::init(InitFlags::IN_CLOEXEC).and_then(|i| {
            let flags =
                AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO;
            let watch = i.add_watch(data_dir, flags)?;
            Ok((Arc::new(i), watch))
        });
        let (inotify, watch) = match started {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "no inotify watch of the queue; polling");
                return None;
            }
        };
        let reader = inotify.clone();
        let spawned = std::thread::Builder::new()
            .name("queue-watch".into())
            .spawn(move || loop {
                let Ok(events) = reader.read_events() else {
                    return;
                };
                let mut ours = false;
                for e in &events {
                    // The watch removed: the queue is gone.
                    if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                        return;
                    }
                    ours |= e
                        .name
                        .as_deref()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| WATCHED_NAMES.contains(&n));
                }
                if ours {
                    sent.notify_waiters();
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no thread for the queue's watch; polling");
            let _ = inotify.rm_watch(watch);
            return None;
        }
        Some(Self { inotify, watch })
    }
}

fn backend(e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(e.to_string())
}

/// Opens a database file with the settings every SQLite backend uses.
pub(crate) fn open_db(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn new_handle() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl SqliteQueue {
    /// Opens (and creates) the queue database in `data_dir`.
    pub fn open(data_dir: &Path, max_receives: u32) -> Result<Self, QueueError> {
        std::fs::create_dir_all(data_dir).map_err(backend)?;
        let conn = open_db(&data_dir.join("queue.db")).map_err(backend)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS messages (
                 id            INTEGER PRIMARY KEY AUTOINCREMENT,
                 queue         TEXT    NOT NULL,
                 body          TEXT    NOT NULL,
                 sent_at_ms    INTEGER NOT NULL,
                 visible_at_ms INTEGER NOT NULL,
                 receive_count INTEGER NOT NULL DEFAULT 0,
                 receipt       TEXT,
                 dead          INTEGER NOT NULL DEFAULT 0
             );
             CREATE INDEX IF NOT EXISTS messages_ready
                 ON messages (queue, dead, visible_at_ms, id);",
        )
        .map_err(backend)?;
        let sent = Arc::new(Notify::new());
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            max_receives,
            _watch: WriteWatch::start(data_dir, sent.clone()).map(Arc::new),
            sent,
            poll_interval: POLL_INTERVAL,
        })
    }

    /// The same queue, its long polls re-checking every `interval` instead of
    /// [`POLL_INTERVAL`].
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(backend)?
    }

    fn try_receive(
        conn: &mut Connection,
        queues: &[QueueId],
        dead: bool,
        max: usize,
        visibility: Duration,
        max_receives: u32,
    ) -> Result<Vec<Received>, QueueError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let now_ms = unix_ms(now());
        let mut out = Vec::new();
        {
            let names: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
            let placeholders = vec!["?"; names.len()].join(",");
            let sql = format!(
                "SELECT id, queue, body, receive_count FROM messages
                 WHERE queue IN ({placeholders}) AND dead = ? AND visible_at_ms <= ?
                 ORDER BY id LIMIT ?"
            );
            let mut select = tx.prepare_cached(&sql).map_err(backend)?;
            let mut args: Vec<rusqlite::types::Value> =
                names.iter().map(|n| (*n).to_string().into()).collect();
            args.push(i64::from(dead).into());
            args.push(now_ms.into());
            // Over-fetch so that rows moved to the dead-letter queue do not starve the batch.
            args.push(((max * 2 + 8) as i64).into());
            let rows: Vec<(i64, String, String, u32)> = select
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(backend)?
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            for (id, queue, body, count) in rows {
                if out.len() >= max {
                    break;
                }
                if !dead && count >= max_receives {
                    tx.execute(
                        "UPDATE messages SET dead = 1, receipt = NULL, visible_at_ms = 0,
                         receive_count = 0 WHERE id = ?",
                        params![id],
                    )
                    .map_err(backend)?;
                    tracing::warn!(
                        queue,
                        message_id = id,
                        receives = count,
                        "message moved to the dead-letter queue after too many receives"
                    );
                    continue;
                }
                let handle = new_handle();
                let visible_at = now_ms + visibility.as_millis() as i64;
                tx.execute(
                    "UPDATE messages SET receive_count = receive_count + 1, receipt = ?,
                     visible_at_ms = ? WHERE id = ?",
                    params![handle, visible_at, id],
                )
                .map_err(backend)?;
                let queue = QueueId::parse(&queue)
                    .ok_or_else(|| backend(format!("unknown queue {queue:?} in database")))?;
                out.push(Received {
                    message_id: id.to_string(),
                    receipt: Receipt {
                        queue,
                        dead_letter: dead,
                        handle,
                    },
                    body,
                    receive_count: count + 1,
                });
            }
        }
        tx.commit().map_err(backend)?;
        Ok(out)
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn send(&self, queue: QueueId, body: &str) -> Result<String, QueueError> {
        if body.len() > crate::message::MAX_MESSAGE_BYTES {
            return Err(QueueError::TooLarge(body.len()));
        }
        let body = body.to_string();
        let id = self
            .blocking(move |conn| {
                let now_ms = unix_ms(now());
                conn.execute(
                    "INSERT INTO messages (queue, body, sent_at_ms, visible_at_ms)
                     VALUES (?, ?, ?, ?)",
                    params![queue.as_str(), body, now_ms, now_ms],
                )
                .map_err(backend)?;
                Ok(conn.last_insert_rowid())
            })
            .await?;
        self.sent.notify_waiters();
        Ok(id.to_string())
    }

    async fn receive(
        &self,
        queues: &[QueueId],
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        if queues.is_empty() || max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.sent.notified();
            let qs = queues.to_vec();
            let max_receives = self.max_receives;
            let got = self
                .blocking(move |c| Self::try_receive(c, &qs, false, max, visibility, max_receives))
                .await?;
            let left = deadline.saturating_duration_since(Instant::now());
            if !got.is_empty() || left.is_zero() {
                return Ok(got);
            }
            let _ = tokio::time::timeout(left.min(self.poll_interval), notified).await;
        }
    }

    async fn receive_dead_letters(
        &self,
        queue: QueueId,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        self.blocking(move |c| Self::try_receive(c, &[queue], true, max, visibility, u32::MAX))
            .await
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> Result<Receipt, QueueError> {
        let r = receipt.clone();
        self.blocking(move |conn| {
            let visible_at = unix_ms(now()) + visibility.as_millis() as i64;
            let n = conn
                .execute(
                    "UPDATE messages SET visible_at_ms = ? WHERE receipt = ? AND queue = ?",
                    params![visible_at, r.handle, r.queue.as_str()],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(QueueError::ReceiptExpired);
            }
            Ok(r)
        })
        .await
    }

    async fn delete(&self, receipt: &Receipt) -> Result<(), QueueError> {
        let r = receipt.clone();
        self.blocking(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM messages WHERE receipt = ? AND queue = ?",
                    params![r.handle, r.queue.as_str()],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(QueueError::ReceiptExpired);
            }
            Ok(())
        })
        .await
    }

    async fn release(&self, receipt: &Receipt) -> Result<(), QueueError> {
        let r = receipt.clone();
        self.blocking(move |conn| {
            let n = conn
                .execute(
                    "UPDATE messages SET visible_at_ms = 0, receipt = NULL
                     WHERE receipt = ? AND queue = ?",
                    params![r.handle, r.queue.as_str()],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(QueueError::ReceiptExpired);
            }
            Ok(())
        })
        .await?;
        self.sent.notify_waiters();
        Ok(())
    }

    async fn depth(&self, queue: QueueId) -> Result<Depth, QueueError> {
        self.blocking(move |conn| {
            let now_ms = unix_ms(now());
            let (visible, in_flight, dead, oldest): (i64, i64, i64, Option<i64>) = conn
                .query_row(
                    "SELECT
                       COALESCE(SUM(dead = 0 AND visible_at_ms <= ?1), 0),
                       COALESCE(SUM(dead = 0 AND visible_at_ms > ?1), 0),
                       COALESCE(SUM(dead = 1), 0),
                       MIN(CASE WHEN dead = 0 THEN sent_at_ms END)
                     FROM messages WHERE queue = ?2",
                    params![now_ms, queue.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()
                .map_err(backend)?
                .unwrap_or((0, 0, 0, None));
            Ok(Depth {
                visible: visible as u64,
                in_flight: in_flight as u64,
                dead: dead as u64,
                oldest_age: oldest.map(|t| Duration::from_millis((now_ms - t).max(0) as u64)),
            })
        })
        .await
    }
}
