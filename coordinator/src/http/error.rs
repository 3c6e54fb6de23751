//! JSON errors: `{"error": "...", "code": "..."}` with the status that fits.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
    /// A server-side failure: the detail goes to the log, not to the client.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the coordinator's log",
        )
    }
}

impl ApiError {
    /// A state-store failure: a backend that does not answer is a 503 the client may
    /// retry (an outage is not a server bug); stored state that cannot be read back is a
    /// 500 `store_corrupt` (retrying will not help, an operator must look); anything else
    /// is internal.
    pub fn store(e: ao_shared::state::StoreError) -> Self {
        match e {
            ao_shared::state::StoreError::Corrupt(detail) => {
                tracing::error!(error = %detail, "stored state is corrupt");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_corrupt",
                    "stored state cannot be read; see the coordinator's log",
                )
            }
            ao_shared::state::StoreError::Backend(detail) => {
                tracing::warn!(error = %detail, "state store unavailable");
                Self::unavailable(
                    "store_unavailable",
                    "the state store does not answer; retry shortly",
                )
            }
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.message, "code": self.code })),
        )
            .into_response()
    }
}

impl From<crate::orchestrator::ChangeError> for ApiError {
    fn from(e: crate::orchestrator::ChangeError) -> Self {
        use crate::orchestrator::ChangeError::*;
        match e {
            NotFound(id) => ApiError::not_found(format!("task {id} not found")),
            Illegal(t) => ApiError::conflict(t.to_string()),
            Refused(why) => ApiError::conflict(why),
            Contended(_) => ApiError::unavailable("contended", e.to_string()),
            Store(s) => ApiError::store(s),
        }
    }
}

/// Unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// Known routes asked with a method they do not serve.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not serve that method",
    )
}
