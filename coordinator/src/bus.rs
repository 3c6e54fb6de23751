//! The task-change bus: the core publishes one [`TaskChange`] for every task it stores
//! (created, changed, given new agent output, or its spend booked); the GitHub reporter,
//! the wait list, budget notices and the live streams (SSE, dashboard) subscribe. The core never calls
//! its subscribers, so it knows none of them.
//!
//! A `tokio::sync::broadcast` channel: a subscriber that falls more than
//! [`BUS_CAPACITY`] changes behind is told it lagged and must re-read what it follows
//! from the store (every subscriber does: the store, not the bus, is the truth).

use ao_shared::ids::{SubtaskId, TaskId};
use ao_shared::task::{StateChange, Task};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Changes a subscriber may fall behind before it is told it lagged.
pub const BUS_CAPACITY: usize = 4096;

/// One change of one task, as stored.
#[derive(Clone, Debug)]
pub struct TaskChange {
    pub task_id: TaskId,
    pub kind: ChangeKind,
}

/// What changed.
#[derive(Clone, Debug)]
pub enum ChangeKind {
    /// The task was created or its state was written.
    State {
        /// The task as stored after the change.
        task: Arc<Task>,
        /// The state events stored with the change, with their subtask.
        changes: Vec<(Option<SubtaskId>, StateChange)>,
    },
    /// A run's reported cost was booked against the task's spend account (once per
    /// report, see [`crate::spend`]).
    SpendBooked {
        /// The task as last read.
        task: Arc<Task>,
        /// What was booked, in millionths of a US dollar.
        micros: u64,
        /// The account's total for the month after the booking, in millionths of a US dollar.
        total_micros: u64,
    },
    /// Events were appended without a change of state (agent output, recovery notes).
    EventsAppended,
}

impl TaskChange {
    /// The task as stored, when the change wrote it.
    pub fn task(&self) -> Option<&Task> {
        match &self.kind {
            ChangeKind::State { task, .. } => Some(task),
            ChangeKind::EventsAppended | ChangeKind::SpendBooked { .. } => None,
        }
    }
}

/// The sending side; subscribe with [`Bus::subscribe`].
pub struct Bus(broadcast::Sender<TaskChange>);

impl Default for Bus {
    fn default() -> Self {
        Self(broadcast::channel(BUS_CAPACITY).0)
    }
}

impl Bus {
    /// Tells subscribers that events were appended to `task_id`.
    pub fn events_appended(&self, task_id: TaskId) {
        self.publish(TaskChange {
            task_id,
            kind: ChangeKind::EventsAppended,
        });
    }

    /// Sends to every current subscriber (none is fine).
    pub fn publish(&self, change: TaskChange) {
        let _ = self.0.send(change);
    }

    /// A receiver of every change published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TaskChange> {
        self.0.subscribe()
    }
}
