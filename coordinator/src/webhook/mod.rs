//! `POST /webhooks/github`: the edge where GitHub's deliveries come in.
//!
//! A delivery is verified (secret configured, bounded body, signature, delivery id) and
//! parsed into a typed [`Event`] by the [`Verified`] extractor ([`extract`]). An accepted
//! event is stored in the state store's inbox
//! ([`ao_shared::state::StateStore::put_inbox`]), bounded ([`Event::bounded`]), under its
//! `X-GitHub-Delivery` id, and only then answered 202; no GitHub API call is made in the
//! request. A delivery id already in the inbox is
//! answered 202 as a duplicate and changes nothing. When the store cannot take it the
//! answer is 503: GitHub marks the delivery failed and the missed-delivery sweep asks for
//! it again.
//!
//! The stored delivery is processed from the store ([`crate::github::handle`]): the
//! replica that took it is woken through the in-process [`Inbox`] at once, and every
//! replica looks for pending deliveries at start-up and periodically, so that one left
//! behind by a restart or a failed attempt is processed again.

pub mod event;
pub mod extract;
pub mod signature;

use crate::context::Coordinator;
use crate::http::error::ApiError;
use ao_shared::ids::DeliveryId;
use ao_shared::state::{InboxDelivery, MAX_INBOX_PAYLOAD_BYTES};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
pub use event::Event;
use event::Parsed;
pub use extract::Verified;
use secrecy::SecretString;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Wake-ups of the local consumer waiting; beyond this a stored delivery waits for the
/// next periodic look at the inbox instead.
pub const INBOX_CAPACITY: usize = 1024;
/// Longest accepted delivery id (GitHub's are GUIDs).
const MAX_DELIVERY_ID_LEN: usize = 100;

/// One delivery, as the consumer handles it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    /// The `X-GitHub-Event` header.
    pub event_name: String,
    pub event: Event,
}

/// Wakes this replica's consumer for deliveries it just stored. The receiving half stays
/// here, so that a consumer restarted after it died finds the wake-ups still waiting;
/// the deliveries themselves are in the state store.
pub struct Inbox {
    tx: mpsc::Sender<DeliveryId>,
    rx: tokio::sync::Mutex<mpsc::Receiver<DeliveryId>>,
}

impl Default for Inbox {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        Self {
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

impl Inbox {
    /// The receiving half, held by one consumer at a time.
    pub async fn receiver(&self) -> tokio::sync::MutexGuard<'_, mpsc::Receiver<DeliveryId>> {
        self.rx.lock().await
    }
}

fn refuse(edge: &Edge, event: &str, result: &str, error: ApiError) -> Response {
    edge.metrics
        .webhook_deliveries
        .with_label_values(&[metric_event(event), result])
        .inc();
    error.into_response()
}

/// The event label for metrics: GitHub's event names are a fixed set of short
/// identifiers; anything else is collapsed so that a sender cannot grow the label set.
fn metric_event(event: &str) -> &str {
    if !event.is_empty()
        && event.len() <= 40
        && event.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        event
    } else {
        "other"
    }
}

async fn secrets(edge: &Edge) -> Result<Vec<SecretString>, ApiError> {
    let refs = edge.settings.github.webhook_secret_refs();
    if refs.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "webhooks_disabled",
            "no webhook secret is configured (github.webhook_secret), so no delivery can be \
             verified and every delivery is refused",
        ));
    }
    let mut out = Vec::new();
    for r in &refs {
        match edge.secrets.resolve(r).await {
            Ok(s) => out.push(s),
            Err(e) => tracing::error!(error = %e, "cannot resolve a webhook secret"),
        }
    }
    if out.is_empty() {
        return Err(ApiError::unavailable(
            "secret_unavailable",
            "the webhook secret cannot be read right now; see the coordinator's log",
        ));
    }
    Ok(out)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// What the webhook route needs: the coordinator's context and the inbox's sending half.
pub struct Edge {
    cx: Arc<Coordinator>,
    inbox: mpsc::Sender<DeliveryId>,
}

impl std::ops::Deref for Edge {
    type Target = Coordinator;

    fn deref(&self) -> &Coordinator {
        &self.cx
    }
}

/// The route `POST /webhooks/github`, to merge into the coordinator's router; accepted
/// deliveries go to `inbox`.
pub fn routes(cx: Arc<Coordinator>, inbox: &Inbox) -> axum::Router {
    let edge = Arc::new(Edge {
        cx,
        inbox: inbox.tx.clone(),
    });
    axum::Router::new()
        .route(
            "/webhooks/github",
            axum::routing::post(receive).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .with_state(edge)
}

/// The handler of `POST /webhooks/github`: a [`Verified`] delivery is acknowledged
/// (ignored, ping) or stored in the inbox before the answer.
pub async fn receive(State(edge): State<Arc<Edge>>, verified: Verified) -> Response {
    let Verified {
        delivery,
        event_name,
        parsed,
    } = verified;
    let event = match parsed {
        Parsed::Event(e) => *e,
        Parsed::Ignored(why) => {
            tracing::debug!(delivery = %delivery, event = %metric_event(&event_name), reason = why,
                "webhook acknowledged and ignored");
            edge.metrics
                .webhook_deliveries
                .with_label_values(&[metric_event(&event_name), "ignored"])
                .inc();
            return (
                StatusCode::OK,
                Json(json!({ "status": "ignored", "reason": why })),
            )
                .into_response();
        }
    };
    if matches!(event, Event::Ping) {
        edge.metrics
            .webhook_deliveries
            .with_label_values(&["ping", "accepted"])
            .inc();
        return (StatusCode::OK, Json(json!({ "status": "pong" }))).into_response();
    }
    let stored = match serde_json::to_string(&event.bounded()) {
        Ok(p) if p.len() <= MAX_INBOX_PAYLOAD_BYTES => InboxDelivery {
            id: delivery.clone(),
            event: event_name.clone(),
            payload: p,
            attempts: 0,
        },
        Ok(_) => {
            return refuse(
                &edge,
                &event_name,
                "too_large",
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the delivery is too large to be kept even with its texts cut",
                ),
            )
        }
        Err(e) => {
            tracing::error!(delivery = %delivery, error = %e, "cannot encode a parsed delivery");
            return refuse(
                &edge,
                &event_name,
                "malformed",
                ApiError::bad_request("malformed_payload", "the delivery cannot be stored"),
            );
        }
    };
    match edge.store.put_inbox(&stored).await {
        Ok(true) => {
            // A full wake-up queue only delays it until the next look at the inbox.
            let _ = edge.inbox.try_send(delivery.clone());
            edge.metrics
                .webhook_deliveries
                .with_label_values(&[metric_event(&event_name), "accepted"])
                .inc();
            tracing::info!(delivery = %delivery, event = %metric_event(&event_name), "webhook accepted");
            (
                StatusCode::ACCEPTED,
                Json(json!({ "status": "accepted", "delivery": delivery.as_str() })),
            )
                .into_response()
        }
        Ok(false) => {
            edge.metrics
                .webhook_deliveries
                .with_label_values(&[metric_event(&event_name), "duplicate"])
                .inc();
            tracing::info!(delivery = %delivery, event = %metric_event(&event_name),
                "webhook delivered before; nothing to do");
            (
                StatusCode::ACCEPTED,
                Json(json!({ "status": "duplicate", "delivery": delivery.as_str() })),
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(delivery = %delivery, error = %e, "cannot store a webhook delivery");
            refuse(
                &edge,
                &event_name,
                "busy",
                ApiError::unavailable(
                    "store_unavailable",
                    "the delivery cannot be stored right now; GitHub will show it as failed \
                     and it is asked for again",
                ),
            )
        }
    }
}
