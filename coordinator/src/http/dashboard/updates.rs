//! `GET /api/v1/task-updates`: a Server-Sent Events stream of task-level changes for the
//! dashboard's task list. It first sends `ready` (the client then loads the list, so no
//! change between its load and the stream is lost), then a `task` event with the task as
//! the API shows it whenever a task of this process changes state, and `resync` when it
//! fell behind and the client should reload the list. Agent output wakes the same channel;
//! a task is only sent again when its stored version changed.

use crate::bus::TaskChange;
use crate::context::Coordinator;
use crate::http::tasks::view;
use ao_shared::ids::TaskId;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Changes arriving within this window are sent together, each task once.
const COALESCE: Duration = Duration::from_millis(200);
/// Versions remembered per stream before the memory is cleared.
const MAX_REMEMBERED: usize = 10_000;

type Tx = mpsc::Sender<Result<SseEvent, Infallible>>;

pub async fn task_updates(State(cx): State<Arc<Coordinator>>) -> Response {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(pump(cx, tx));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

enum Next {
    Changed(TaskId),
    Resync,
    Stop,
}

async fn next(
    cx: &Coordinator,
    wake: &mut tokio::sync::broadcast::Receiver<TaskChange>,
    tx: &Tx,
) -> Next {
    tokio::select! {
        r = wake.recv() => match r {
            Ok(change) => Next::Changed(change.task_id),
            Err(RecvError::Lagged(_)) => Next::Resync,
            Err(RecvError::Closed) => Next::Stop,
        },
        _ = tx.closed() => Next::Stop,
        _ = cx.shutdown.cancelled() => Next::Stop,
    }
}

async fn send(tx: &Tx, event: SseEvent) -> bool {
    tx.send(Ok(event)).await.is_ok()
}

async fn pump(cx: Arc<Coordinator>, tx: Tx) {
    let mut wake = cx.bus.subscribe();
    if !send(&tx, SseEvent::default().event("ready").data("{}")).await {
        return;
    }
    let mut sent: HashMap<TaskId, u64> = HashMap::new();
    loop {
        let mut changed = HashSet::new();
        let mut resync = false;
        match next(&cx, &mut wake, &tx).await {
            Next::Changed(id) => {
                changed.insert(id);
            }
            Next::Resync => resync = true,
            Next::Stop => return,
        }
        let window = tokio::time::sleep(COALESCE);
        tokio::pin!(window);
        loop {
            tokio::select! {
                r = next(&cx, &mut wake, &tx) => match r {
                    Next::Changed(id) => { changed.insert(id); }
                    Next::Resync => resync = true,
                    Next::Stop => return,
                },
                _ = &mut window => break,
            }
        }
        if resync {
            sent.clear();
            if !send(&tx, SseEvent::default().event("resync").data("{}")).await {
                return;
            }
            continue;
        }
        for id in changed {
            let task = match cx.store.get_task(id).await {
                Ok(Some(task)) => task,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(task_id = %id, error = %e, "task update stream cannot read a task");
                    continue;
                }
            };
            if sent.get(&id) == Some(&task.version) {
                continue;
            }
            if sent.len() >= MAX_REMEMBERED {
                sent.clear();
            }
            sent.insert(id, task.version);
            let event = SseEvent::default()
                .event("task")
                .json_data(view(&task))
                .unwrap_or_else(|_| SseEvent::default().comment("unencodable task"));
            if !send(&tx, event).await {
                return;
            }
        }
    }
}
