//! Notices that a running subtask should stop: it was cancelled (directly or with its
//! task), a newer attempt replaced it, or it already ended (a message delivered again). The watch reads the task from the state store
//! every `worker.cancel_poll_secs` (one key read; the worker needs nothing more than
//! read access to the table) and fires the run's cancel token, which makes the sandbox
//! driver kill the sandbox.

use ao_shared::ids::{SubtaskId, TaskId};
use ao_shared::state::StateStore;
use ao_shared::status::{SubtaskStatus, TaskStatus};
use ao_shared::task::Task;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why a run must stop, when it must.
pub fn reason_to_stop(task: &Task, subtask: SubtaskId, attempt: u32) -> Option<String> {
    if task.status == TaskStatus::Cancelled {
        return Some("the task was cancelled".into());
    }
    let Some(s) = task.subtasks.iter().find(|s| s.id == subtask) else {
        return Some("the subtask is no longer part of its task".into());
    };
    if s.status == SubtaskStatus::Cancelled {
        return Some("the subtask was cancelled".into());
    }
    if s.attempt != attempt {
        return Some(format!("attempt {} replaced this one", s.attempt));
    }
    // A message delivered again after its result was applied: the work is done.
    if s.status.is_terminal() {
        return Some(format!("the subtask already ended ({})", s.status));
    }
    None
}

/// Watches until `done` fires; fires `stop` when the run must end.
pub async fn watch(
    store: Arc<dyn StateStore>,
    task_id: TaskId,
    subtask_id: SubtaskId,
    attempt: u32,
    every: Duration,
    stop: CancellationToken,
    done: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.get_task(task_id).await {
            Ok(Some(task)) => {
                if let Some(reason) = reason_to_stop(&task, subtask_id, attempt) {
                    tracing::info!(%reason, "stopping the run");
                    stop.cancel();
                    return;
                }
            }
            Ok(None) => {
                tracing::warn!("the task is gone from the state store; stopping the run");
                stop.cancel();
                return;
            }
            // A store hiccup must not stop a healthy run: try again next time.
            Err(e) => tracing::warn!(error = %e, "cannot read the task to check for a cancel"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ao_shared::capability::Capability;
    use ao_shared::task::Subtask;

    fn task(status: SubtaskStatus, attempt: u32) -> (Task, SubtaskId) {
        let mut sub = Subtask::new(Capability::Coder, Vec::new());
        sub.status = status;
        sub.attempt = attempt;
        let id = sub.id;
        let now = ao_shared::timefmt::now();
        let task = serde_json::from_value(serde_json::json!({
            "id": TaskId::new(), "status": "running", "title": "t", "prompt": "p",
            "repository": "/r.git", "branch": "b", "pipeline": "code",
            "source": { "kind": "api" }, "version": 1,
            "created_at": ao_shared::timefmt::rfc3339(now),
            "updated_at": ao_shared::timefmt::rfc3339(now),
            "subtasks": [sub],
        }))
        .expect("task");
        (task, id)
    }

    #[test]
    fn runs_stop_for_cancels_newer_attempts_and_ended_subtasks() {
        let (t, id) = task(SubtaskStatus::Running, 2);
        assert_eq!(reason_to_stop(&t, id, 2), None);
        assert!(reason_to_stop(&t, id, 1).unwrap().contains("attempt 2"));
        assert!(reason_to_stop(&t, SubtaskId::new(), 2).is_some());
        let (t, id) = task(SubtaskStatus::Cancelled, 2);
        assert!(reason_to_stop(&t, id, 2).unwrap().contains("cancelled"));
        let (t, id) = task(SubtaskStatus::Succeeded, 2);
        assert!(reason_to_stop(&t, id, 2).unwrap().contains("already ended"));
        let (mut t, id) = task(SubtaskStatus::Running, 2);
        t.status = TaskStatus::Cancelled;
        assert!(reason_to_stop(&t, id, 2)
            .unwrap()
            .contains("task was cancelled"));
    }
}
