//! The coordinator's HTTP surface: health, metrics, the REST API under `/api/v1`, the dashboard.

pub mod auth;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod openapi;
pub mod tasks;

use crate::context::Coordinator;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

/// The whole router: health, metrics, the REST API and the dashboard, plus `edges`
/// (routes of adapters such as the GitHub webhook), all counted and with JSON 404/405.
pub fn router(cx: Arc<Coordinator>, edges: Router) -> Router {
    let auth = auth::Auth {
        cx: cx.clone(),
        sessions: Arc::new(dashboard::session::Sessions::default()),
    };
    let api = Router::new()
        .route("/tasks", post(tasks::create).get(tasks::list))
        .route("/tasks/{id}", get(tasks::get))
        .route("/tasks/{id}/events", get(events::events))
        .route("/tasks/{id}/cancel", post(tasks::cancel))
        .route("/tasks/{id}/retry", post(tasks::retry))
        .route("/tasks/{id}/approve", post(tasks::approve))
        .route("/tasks/{id}/reject", post(tasks::reject))
        .route("/task-updates", get(dashboard::updates::task_updates))
        .layer(DefaultBodyLimit::max(cx.settings.server.max_body_bytes))
        .route_layer(middleware::from_fn_with_state(
            auth.clone(),
            auth::require_auth,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/api/v1/openapi.json", get(openapi::spec))
        .nest("/api/v1", api)
        .merge(dashboard::router(auth))
        .with_state(cx.clone())
        .merge(edges)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(cx, count_requests))
}

/// Counts requests by route template (never by raw path, which would explode the labels).
async fn count_requests(
    State(cx): State<Arc<Coordinator>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    cx.metrics
        .http_requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    response
}
