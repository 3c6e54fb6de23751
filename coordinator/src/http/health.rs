//! Liveness, readiness and the metrics endpoint.

use super::error::ApiError;
use crate::app::App;
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
pub async fn readyz(State(app): State<Arc<App>>) -> Result<impl IntoResponse, ApiError> {
    if !app.is_ready() {
        return Err(ApiError::unavailable(
            "not_ready",
            "starting or shutting down",
        ));
    }
    app.store
        .count_tasks(ao_shared::TaskStatus::Running)
        .await
        .map_err(|e| ApiError::unavailable("store_unavailable", e.to_string()))?;
    app.queue
        .depth(ao_shared::queue::QueueId::Results)
        .await
        .map_err(|e| ApiError::unavailable("queue_unavailable", e.to_string()))?;
    Ok(Json(json!({ "status": "ready" })))
}

/// Prometheus text format.
pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    crate::monitor::refresh_poll_age(&app);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}
