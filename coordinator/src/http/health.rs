//! Liveness, readiness and the metrics endpoint.

use super::error::ApiError;
use crate::context::Coordinator;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;
use std::sync::Arc;

/// The process is up.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// The process can serve: backends answer and it is not shutting down.
pub async fn readyz(State(cx): State<Arc<Coordinator>>) -> Result<impl IntoResponse, ApiError> {
    let down = cx.loops.down();
    if !down.is_empty() {
        return Err(ApiError::unavailable(
            "loop_down",
            format!("background loop(s) down, restarting: {}", down.join(", ")),
        ));
    }
    if !cx.is_ready() {
        return Err(ApiError::unavailable(
            "not_ready",
            "starting or shutting down",
        ));
    }
    cx.store
        .count_tasks(ao_shared::TaskStatus::Running)
        .await
        .map_err(|e| ApiError::unavailable("store_unavailable", e.to_string()))?;
    cx.queue
        .depth(ao_shared::queue::QueueId::Results)
        .await
        .map_err(|e| ApiError::unavailable("queue_unavailable", e.to_string()))?;
    Ok(Json(json!({ "status": "ready" })))
}

/// Prometheus text format.
pub async fn metrics(State(cx): State<Arc<Coordinator>>) -> impl IntoResponse {
    crate::monitor::refresh_poll_age(&cx);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        cx.metrics.render(),
    )
}
