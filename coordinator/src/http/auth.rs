//! Bearer-token authentication of the REST API, compared in constant time. Without a
//! configured `api.token` every call is refused with a message saying how to set one.

use super::error::ApiError;
use crate::app::App;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use secrecy::ExposeSecret;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Middleware for `/api/v1`.
pub async fn require_token(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(reference) = &app.settings.api.token else {
        return Err(ApiError::unavailable(
            "api_disabled",
            "the REST API is disabled: set api.token to a secret reference \
             (e.g. AO__API__TOKEN=env:AO_API_TOKEN)",
        ));
    };
    let expected = app.secrets.resolve(reference).await.map_err(|e| {
        tracing::error!(error = %e, "cannot resolve api.token");
        ApiError::unavailable(
            "api_token_unavailable",
            "the API token cannot be read; see the coordinator's log",
        )
    })?;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <token>` header",
        ));
    };
    let ok: bool = presented
        .as_bytes()
        .ct_eq(expected.expose_secret().as_bytes())
        .into();
    if !ok {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid API token",
        ));
    }
    Ok(next.run(request).await)
}
