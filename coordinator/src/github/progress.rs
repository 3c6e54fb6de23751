//! The text the App writes: the one progress comment of a task (a checklist of its
//! subtasks with states, durations and cost, edited in place), the status labels, and
//! the pull request's body.

use ao_shared::status::{SubtaskStatus, TaskStatus};
use ao_shared::task::Task;

/// Status labels the reporter keeps on the issue (exactly one at a time).
pub const STATUS_LABELS: [&str; 4] = [
    "agent:queued",
    "agent:running",
    "agent:done",
    "agent:failed",
];

/// The status label for a task's state; `None` for a cancelled task (all are removed).
pub fn status_label(status: TaskStatus) -> Option<&'static str> {
    match status {
        TaskStatus::Queued | TaskStatus::AwaitingApproval => Some("agent:queued"),
        TaskStatus::Running => Some("agent:running"),
        TaskStatus::Succeeded => Some("agent:done"),
        TaskStatus::Failed => Some("agent:failed"),
        TaskStatus::Cancelled => None,
    }
}

/// A marker that identifies the progress comment of a task.
pub fn marker(task: &Task) -> String {
    format!("<!-- agent-orchestrator:progress task={} -->", task.id)
}

fn duration(sub: &ao_shared::task::Subtask) -> Option<String> {
    let start = sub.started_at?;
    let end = sub.finished_at?;
    let secs = (end - start).whole_seconds().max(0);
    Some(if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    })
}

/// The progress comment's body.
pub fn render(task: &Task, pull_request: Option<u64>) -> String {
    let headline = match task.status {
        TaskStatus::Queued => "⏳ queued",
        TaskStatus::AwaitingApproval => "✋ waiting for `/agent approve`",
        TaskStatus::Running => "🏃 running",
        TaskStatus::Succeeded => "✅ done",
        TaskStatus::Failed => "❌ failed",
        TaskStatus::Cancelled => "🚫 cancelled",
    };
    let mut s = format!("{}\n### Agent: {headline}\n\n", marker(task));
    s.push_str(&format!(
        "Branch `{}` · pipeline `{}`",
        task.branch, task.pipeline
    ));
    if let Some(n) = pull_request {
        s.push_str(&format!(" · pull request #{n}"));
    }
    s.push_str("\n\n");
    for sub in &task.subtasks {
        let done = if sub.status == SubtaskStatus::Succeeded {
            "x"
        } else {
            " "
        };
        let mut detail = vec![sub.status.as_str().to_string()];
        if sub.attempt > 1 {
            detail.push(format!("attempt {}", sub.attempt));
        }
        if let Some(d) = duration(sub) {
            detail.push(d);
        }
        if sub.cost_usd > 0.0 {
            detail.push(format!("${:.2}", sub.cost_usd));
        }
        s.push_str(&format!(
            "- [{done}] **{}** — {}\n",
            sub.capability,
            detail.join(", ")
        ));
    }
    s.push_str(&format!("\nCost so far: ${:.2}\n", task.cost_usd()));
    if let Some(e) = &task.error {
        let e: String = e.chars().take(1500).collect();
        s.push_str(&format!(
            "\n<details><summary>Why</summary>\n\n```\n{e}\n```\n</details>\n"
        ));
    }
    s.push_str(
        "\n<sub>Commands: `/agent status`, `/agent retry`, `/agent cancel`, `/agent approve`, \
         `/agent run`</sub>\n",
    );
    s
}

/// The pull request's body.
pub fn pull_body(task: &Task, issue: u64) -> String {
    format!(
        "Closes #{issue}\n\nOpened by agent-orchestrator for task `{}` (pipeline `{}`). It stays a \
         draft while the agents work and is marked ready for review when they are done.\n",
        task.id, task.pipeline
    )
}
