//! `GET /api/v1/tasks/{id}/events`: the task's events as JSON, or, with
//! `Accept: text/event-stream`, as a live Server-Sent Events stream that replays what is
//! stored (from `Last-Event-ID` or `?after=`) and then follows new events until the task
//! ends. Streams read the store, so they work whichever replica applied the change.

use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::tasks::parse_id;
use crate::context::Coordinator;
use ao_shared::ids::TaskId;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

/// How often a live stream re-reads the store when nothing woke it.
const STREAM_POLL: Duration = Duration::from_millis(500);
const PAGE: usize = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    after: Option<u64>,
    limit: Option<usize>,
}

pub async fn events(
    State(cx): State<Arc<Coordinator>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<EventParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if cx
        .store
        .get_task(id)
        .await
        .map_err(ApiError::store)?
        .is_none()
    {
        return Err(ApiError::not_found(format!("task {id} not found")));
    }
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let limit = params.limit.unwrap_or(1000).clamp(1, 10_000);
        let events = cx
            .store
            .events(id, params.after, limit)
            .await
            .map_err(ApiError::store)?;
        return Ok(Json(serde_json::json!({ "events": events })).into_response());
    }
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let after = last_id.or(params.after);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(pump(cx, id, after, tx));
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Sends stored events, then new ones as they come, until the task has ended and all its
/// events are sent, the client goes away, or the coordinator shuts down.
async fn pump(
    cx: Arc<Coordinator>,
    id: TaskId,
    mut after: Option<u64>,
    tx: tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>,
) {
    let mut wake = cx.bus.subscribe();
    loop {
        // Read the status before the events, so the last events of an ending task are sent.
        let ended = match cx.store.get_task(id).await {
            Ok(Some(t)) => t.status.is_terminal(),
            Ok(None) => true,
            // An outage (or unreadable state) is not the task's end: keep following and
            // read again at the next wake-up.
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "event stream cannot read the task");
                false
            }
        };
        let batch = match cx.store.events(id, after, PAGE).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "event stream cannot read events");
                return;
            }
        };
        let full = batch.len() == PAGE;
        for event in batch {
            after = Some(event.seq);
            let name = match event.event.kind {
                ao_shared::state::EventKind::State => "state",
                ao_shared::state::EventKind::Agent => "agent",
            };
            let sse = SseEvent::default()
                .id(event.seq.to_string())
                .event(name)
                .json_data(&event)
                .unwrap_or_else(|_| SseEvent::default().comment("unencodable event"));
            if tx.send(Ok(sse)).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        if ended {
            let _ = tx
                .send(Ok(SseEvent::default().event("end").data("{}")))
                .await;
            return;
        }
        loop {
            tokio::select! {
                r = wake.recv() => match r {
                    Ok(change) if change.task_id != id => continue,
                    _ => break,
                },
                _ = tokio::time::sleep(STREAM_POLL) => break,
                _ = tx.closed() => return,
                _ = cx.shutdown.cancelled() => return,
            }
        }
    }
}
