//! Run-once keys of the core: markers the result path records in the state store's
//! delivery table so that a report delivered again is not applied twice. Every kind has
//! its own variant and prefix, distinct from the GitHub adapter's keys
//! (`github::once::Once`) and from GitHub's delivery ids (GUIDs); [`CoreOnce::key`]
//! renders the text earlier versions recorded, so keys already stored still count.

use ao_shared::ids::{DeliveryId, SubtaskId, TaskId};

/// One effect of the result path that happens at most once.
#[derive(Clone, Copy, Debug)]
pub enum CoreOnce<'a> {
    /// Storing one batch of agent events (`digest`: hex SHA-256 of the report).
    Events { task: TaskId, digest: &'a str },
    /// Sending what follows a finished attempt.
    Followed {
        task: TaskId,
        subtask: SubtaskId,
        attempt: u32,
    },
    /// Booking one report's spend (`digest`: hex SHA-256 of its identity).
    Spend { digest: &'a str },
}

impl CoreOnce<'_> {
    /// The key recorded in the store.
    pub fn key(&self) -> DeliveryId {
        DeliveryId::new(match self {
            CoreOnce::Events { task, digest } => format!("events:{task}:{digest}"),
            CoreOnce::Followed {
                task,
                subtask,
                attempt,
            } => format!("followed:{task}:{subtask}:{attempt}"),
            CoreOnce::Spend { digest } => format!("spend:{digest}"),
        })
    }
}
