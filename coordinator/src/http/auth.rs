//! Authentication of the REST API: a bearer token compared in constant time, or a
//! dashboard session cookie (see `dashboard::session`), which must bring the session's
//! CSRF token in `X-AO-CSRF` on every state-changing call. Without a configured
//! `api.token` every call is refused with a message saying how to set one.

use super::dashboard::session::{SessionCheck, Sessions, CSRF_HEADER};
use super::error::ApiError;
use crate::context::Coordinator;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What the authentication middleware needs.
#[derive(Clone)]
pub struct Auth {
    pub cx: Arc<Coordinator>,
    pub sessions: Arc<Sessions>,
}

/// The configured API token, or why there is none.
pub async fn expected_token(cx: &Coordinator) -> Result<SecretString, ApiError> {
    let Some(reference) = &cx.settings.api.token else {
        return Err(ApiError::unavailable(
            "api_disabled",
            "the REST API is disabled: set api.token to a secret reference \
             (e.g. AO__API__TOKEN=env:AO_API_TOKEN)",
        ));
    };
    cx.secrets.resolve(reference).await.map_err(|e| {
        tracing::error!(error = %e, "cannot resolve api.token");
        ApiError::unavailable(
            "api_token_unavailable",
            "the API token cannot be read; see the coordinator's log",
        )
    })
}

/// Whether `presented` is the token, compared in constant time.
pub fn token_matches(presented: &str, expected: &SecretString) -> bool {
    presented
        .as_bytes()
        .ct_eq(expected.expose_secret().as_bytes())
        .into()
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Middleware for `/api/v1`: a bearer token, or else a dashboard session.
pub async fn require_auth(
    State(auth): State<Auth>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let expected = expected_token(&auth.cx).await?;
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(presented) = presented else {
            return Err(unauthorized(
                "missing `Authorization: Bearer <token>` header",
            ));
        };
        if !token_matches(presented, &expected) {
            return Err(unauthorized("invalid API token"));
        }
        return Ok(next.run(request).await);
    }
    let changes_state = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    match auth.sessions.check(request.headers(), changes_state) {
        SessionCheck::Valid => Ok(next.run(request).await),
        SessionCheck::CsrfMismatch => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            format!(
                "a state-changing call made with a session cookie needs the session's \
                 CSRF token in the {CSRF_HEADER} header"
            ),
        )),
        SessionCheck::Expired => Err(unauthorized(
            "the dashboard session has ended; log in again at /login",
        )),
        SessionCheck::NoCookie => Err(unauthorized(
            "missing `Authorization: Bearer <token>` header",
        )),
    }
}
