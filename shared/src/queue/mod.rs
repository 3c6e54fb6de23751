//! The queue seam: one queue per capability plus the result queue, each with a dead-letter
//! queue. At-least-once delivery: a received message stays hidden for its visibility
//! timeout, which its consumer extends while it works (heartbeat); it is deleted only once
//! its work is safely done, and it comes back if its consumer dies.

pub mod sqlite;
pub mod sqs;

use crate::capability::Capability;
use async_trait::async_trait;
use std::fmt;
use std::time::Duration;

/// A logical queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueId {
    Capability(Capability),
    Results,
}

impl QueueId {
    pub fn as_str(&self) -> &'static str {
        match self {
            QueueId::Capability(c) => c.as_str(),
            QueueId::Results => "results",
        }
    }

    /// Every queue: the capability queues, then the result queue.
    pub fn all() -> impl Iterator<Item = QueueId> {
        Capability::ALL
            .into_iter()
            .map(QueueId::Capability)
            .chain(std::iter::once(QueueId::Results))
    }

    pub fn parse(s: &str) -> Option<QueueId> {
        if s == "results" {
            Some(QueueId::Results)
        } else {
            s.parse().ok().map(QueueId::Capability)
        }
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Proof of a receive: needed to extend, delete or release the message. A heartbeat may
/// return a new receipt; always use the newest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub queue: QueueId,
    /// Whether the message was received from the queue's dead-letter queue.
    pub dead_letter: bool,
    pub handle: String,
}

/// A received message.
#[derive(Clone, Debug)]
pub struct Received {
    pub message_id: String,
    pub receipt: Receipt,
    pub body: String,
    /// How many times the message has been received, this time included.
    pub receive_count: u32,
}

/// How many messages a queue holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    pub visible: u64,
    pub in_flight: u64,
    pub dead: u64,
    /// Age of the oldest message not yet deleted, when the backend knows it.
    pub oldest_age: Option<Duration>,
}

/// A queue operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The receipt is no longer valid: the message was deleted, or its visibility expired
    /// and another consumer received it.
    #[error("receipt is no longer valid (message deleted or received again by another consumer)")]
    ReceiptExpired,
    #[error("message body is {0} bytes, above the queue's limit")]
    TooLarge(usize),
    #[error("queue backend: {0}")]
    Backend(String),
}

/// The queue seam.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Sends a message; returns its id.
    async fn send(&self, queue: QueueId, body: &str) -> Result<String, QueueError>;

    /// Receives up to `max` messages from any of `queues`, waiting up to `wait` for the first.
    /// Received messages are hidden for `visibility`. A message received more often than the
    /// queue's maximum is moved to the dead-letter queue instead of being returned.
    async fn receive(
        &self,
        queues: &[QueueId],
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError>;

    /// Receives from the dead-letter queue of `queue` (no waiting).
    async fn receive_dead_letters(
        &self,
        queue: QueueId,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError>;

    /// Extends the visibility of a received message to `visibility` from now.
    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> Result<Receipt, QueueError>;

    /// Deletes a received message.
    async fn delete(&self, receipt: &Receipt) -> Result<(), QueueError>;

    /// Makes a received message visible again at once (graceful shutdown).
    async fn release(&self, receipt: &Receipt) -> Result<(), QueueError>;

    /// How many messages `queue` and its dead-letter queue hold.
    async fn depth(&self, queue: QueueId) -> Result<Depth, QueueError>;

    /// Messages this backend received but has not handed out (brought by a poll that
    /// answered after its receive had returned), once every poll under way has ended;
    /// they are no longer held. A worker that shuts down puts them back. Backends that
    /// hand out everything they receive return none.
    async fn take_held(&self) -> Vec<Received> {
        Vec::new()
    }
}
