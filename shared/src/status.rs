//! Task and subtask states and the transitions allowed between them, in one place.
//! Every state change in the system goes through [`TaskStatus::transition`] or
//! [`SubtaskStatus::transition`]; anything else is an error.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The state of a whole task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Accepted; no subtask has started yet.
    Queued,
    /// The plan waits for `/agent approve`.
    AwaitingApproval,
    /// At least one subtask has started.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// The state of one subtask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubtaskStatus {
    /// Waits for the subtasks before it.
    Pending,
    /// On its capability's queue.
    Queued,
    /// A worker runs it.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A state change that the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal {entity} transition from {from} to {to}")]
pub struct TransitionError {
    pub entity: &'static str,
    pub from: String,
    pub to: String,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Queued,
        TaskStatus::AwaitingApproval,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::AwaitingApproval => "awaiting_approval",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// Whether `self → to` is allowed. Staying in the same state is always allowed.
    pub fn can_become(&self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        *self == to
            || matches!(
                (self, to),
                (Queued, AwaitingApproval | Running | Succeeded | Failed | Cancelled)
                    | (AwaitingApproval, Queued | Running | Cancelled | Failed)
                    | (Running, AwaitingApproval | Queued | Succeeded | Failed | Cancelled)
                    // retry
                    | (Failed | Cancelled, Queued)
            )
    }

    /// The checked transition.
    pub fn transition(&self, to: TaskStatus) -> Result<TaskStatus, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError {
                entity: "task",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }
}

impl SubtaskStatus {
    pub const ALL: [SubtaskStatus; 6] = [
        SubtaskStatus::Pending,
        SubtaskStatus::Queued,
        SubtaskStatus::Running,
        SubtaskStatus::Succeeded,
        SubtaskStatus::Failed,
        SubtaskStatus::Cancelled,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            SubtaskStatus::Pending => "pending",
            SubtaskStatus::Queued => "queued",
            SubtaskStatus::Running => "running",
            SubtaskStatus::Succeeded => "succeeded",
            SubtaskStatus::Failed => "failed",
            SubtaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            SubtaskStatus::Succeeded | SubtaskStatus::Failed | SubtaskStatus::Cancelled
        )
    }

    /// Whether `self → to` is allowed. Staying in the same state is not: a repeated event
    /// must be recognised as a repeat by the caller, not applied twice.
    pub fn can_become(&self, to: SubtaskStatus) -> bool {
        use SubtaskStatus::*;
        matches!(
            (self, to),
            (Pending, Queued | Cancelled)
                // a retryable failure (or a lost run) waits to be queued again
                | (Queued, Running | Succeeded | Failed | Cancelled | Pending)
                | (Running, Pending | Succeeded | Failed | Cancelled)
                // manual retry
                | (Failed | Cancelled, Pending | Queued)
                // a rejected plan: the planner plans again
                | (Succeeded, Pending)
        )
    }

    pub fn transition(&self, to: SubtaskStatus) -> Result<SubtaskStatus, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError {
                entity: "subtask",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for SubtaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown task status {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn succeeded_task_is_final() {
        for to in TaskStatus::ALL {
            if to != TaskStatus::Succeeded {
                let err = TaskStatus::Succeeded.transition(to).unwrap_err();
                assert_eq!(err.entity, "task");
                assert!(err.to_string().contains("from succeeded"), "{err}");
            }
        }
    }

    #[test]
    fn failed_task_can_be_retried_but_not_marked_succeeded() {
        assert!(TaskStatus::Failed.transition(TaskStatus::Queued).is_ok());
        assert!(TaskStatus::Failed
            .transition(TaskStatus::Succeeded)
            .is_err());
        assert!(TaskStatus::Cancelled
            .transition(TaskStatus::Running)
            .is_err());
    }

    #[test]
    fn subtask_cannot_skip_the_queue_or_repeat_success() {
        use SubtaskStatus::*;
        assert!(Pending.transition(Running).is_err());
        assert!(Pending.transition(Succeeded).is_err());
        assert!(Succeeded.transition(Succeeded).is_err());
        assert!(Succeeded.transition(Queued).is_err());
        assert!(Queued.transition(Running).is_ok());
        assert!(Running.transition(Pending).is_ok());
        assert!(Running.transition(Queued).is_err());
        assert!(Failed.transition(Queued).is_ok());
    }

    #[test]
    fn every_terminal_subtask_state_rejects_running() {
        for s in SubtaskStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert!(s.transition(SubtaskStatus::Running).is_err(), "{s}");
        }
    }

    #[test]
    fn statuses_serialize_snake_case() {
        assert_eq!(
            serde_json::to_string(&TaskStatus::AwaitingApproval).unwrap(),
            "\"awaiting_approval\""
        );
    }
}
