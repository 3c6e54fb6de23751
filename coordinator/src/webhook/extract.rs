//! The webhook edge as an axum extractor: [`Verified`] is a delivery whose signature
//! held, read in bounded size and parsed into a typed [`super::Event`]. Every refusal is
//! answered (with its JSON error and counted in `ao_webhook_deliveries_total`) before any
//! handler runs, so a handler taking a [`Verified`] never sees unverified bytes.
//!
//! In order: a webhook secret must be configured (else 401, saying so); the body is read
//! up to `github.max_webhook_bytes` (413 above, from `Content-Length` before reading);
//! `X-Hub-Signature-256` is checked over the raw bytes against every configured secret
//! (401); `X-GitHub-Delivery` and `X-GitHub-Event` must be present (400); only then is
//! the payload parsed (400 when a handled event's payload does not parse). See GitHub's
//! "Validating webhook deliveries" for the signature scheme.

use super::event::{self, Parsed};
use super::{header, metric_event, refuse, secrets, signature, Edge, MAX_DELIVERY_ID_LEN};
use crate::http::error::ApiError;
use ao_shared::ids::DeliveryId;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::Response;
use std::sync::Arc;

/// A delivery whose signature held, with its id, its event name and its parsed payload.
#[derive(Debug)]
pub struct Verified {
    /// `X-GitHub-Delivery`: at most 100 ASCII characters.
    pub delivery: DeliveryId,
    /// `X-GitHub-Event`, as sent (not empty).
    pub event_name: String,
    /// The payload: an event we handle, or why it is acknowledged and ignored.
    pub parsed: Parsed,
}

impl FromRequest<Arc<Edge>> for Verified {
    /// The refusal, already counted.
    type Rejection = Response;

    async fn from_request(req: Request, edge: &Arc<Edge>) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let headers = &parts.headers;
        let event_name = header(headers, "x-github-event").unwrap_or("").to_string();
        let fail = |result: &str, error: ApiError| refuse(edge, &event_name, result, error);
        let secrets = secrets(edge).await.map_err(|e| fail("refused", e))?;
        let limit = edge.settings.github.max_webhook_bytes;
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("webhook body is larger than {limit} bytes (github.max_webhook_bytes)"),
            )
        };
        let declared = header(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(fail("too_large", too_large()));
        }
        let body = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| fail("too_large", too_large()))?;
        if let Err(e) = signature::verify(&secrets, &body, header(headers, "x-hub-signature-256")) {
            tracing::warn!(event = %metric_event(&event_name), error = %e, "webhook refused");
            return Err(fail(
                "bad_signature",
                ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", e.to_string()),
            ));
        }
        let delivery = match header(headers, "x-github-delivery") {
            Some(d) if !d.is_empty() && d.len() <= MAX_DELIVERY_ID_LEN && d.is_ascii() => {
                DeliveryId::new(d)
            }
            _ => {
                return Err(fail(
                    "malformed",
                    ApiError::bad_request(
                        "missing_delivery",
                        "X-GitHub-Delivery header is missing or not a delivery id",
                    ),
                ))
            }
        };
        if event_name.is_empty() {
            return Err(fail(
                "malformed",
                ApiError::bad_request("missing_event", "X-GitHub-Event header is missing"),
            ));
        }
        let parsed = match event::parse(&event_name, &body) {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::warn!(delivery = %delivery, error = %e, "webhook payload does not parse");
                return Err(fail(
                    "malformed",
                    ApiError::bad_request("malformed_payload", e.to_string()),
                ));
            }
        };
        Ok(Self {
            delivery,
            event_name,
            parsed,
        })
    }
}
