//! The parts of Nomad's API objects the driver reads, as Nomad sends them (PascalCase
//! fields; every field optional, since Nomad leaves out what is empty), and the
//! dispatch request it sends.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `POST /v1/job/{id}/dispatch` body (`JobDispatchRequest`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DispatchRequest<'a> {
    #[serde(rename = "JobID")]
    pub job_id: &'a str,
    /// Base64 of the payload; empty (left out): the run spec goes by the hand-over.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub payload: String,
    pub meta: BTreeMap<&'static str, String>,
}

/// `JobDispatchResponse`. `EvalID` is empty when Nomad returned an existing dispatched
/// job for the same idempotency token.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct DispatchResponse {
    #[serde(rename = "DispatchedJobID")]
    pub dispatched_job_id: String,
    #[serde(rename = "EvalID")]
    pub eval_id: String,
}

/// Placement metrics of a task group that could not be placed (`AllocationMetric`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct AllocationMetric {
    pub nodes_evaluated: i64,
    pub nodes_filtered: i64,
    pub nodes_exhausted: i64,
    pub coalesced_failures: i64,
    pub dimension_exhausted: Option<BTreeMap<String, i64>>,
    pub constraint_filtered: Option<BTreeMap<String, i64>>,
    pub class_exhausted: Option<BTreeMap<String, i64>>,
}

impl AllocationMetric {
    /// One line for people: why nothing could be placed.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!(
            "{} node(s) evaluated, {} filtered, {} exhausted",
            self.nodes_evaluated, self.nodes_filtered, self.nodes_exhausted
        )];
        for (label, map) in [
            ("exhausted", &self.dimension_exhausted),
            ("filtered by", &self.constraint_filtered),
        ] {
            if let Some(m) = map.as_ref().filter(|m| !m.is_empty()) {
                let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                parts.push(format!("{label} {}", items.join(", ")));
            }
        }
        parts.join("; ")
    }
}

/// `Evaluation`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Evaluation {
    #[serde(rename = "ID")]
    pub id: String,
    pub status: String,
    pub status_description: String,
    pub blocked_eval: String,
    #[serde(rename = "FailedTGAllocs")]
    pub failed_tg_allocs: Option<BTreeMap<String, AllocationMetric>>,
}

impl Evaluation {
    /// Whether the scheduler is done with it (`blocked` waits for capacity, `pending` for
    /// a scheduler).
    pub fn is_done(&self) -> bool {
        matches!(self.status.as_str(), "complete" | "failed" | "canceled")
    }

    /// Why task groups could not be placed, if any could not.
    pub fn placement_failures(&self) -> Option<String> {
        let failed = self.failed_tg_allocs.as_ref().filter(|m| !m.is_empty())?;
        let parts: Vec<String> = failed
            .iter()
            .map(|(group, m)| format!("group {group}: {}", m.describe()))
            .collect();
        Some(parts.join("; "))
    }
}

/// `TaskEvent`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct TaskEvent {
    #[serde(rename = "Type")]
    pub kind: String,
    pub display_message: String,
    pub exit_code: i64,
    pub signal: i64,
    pub fails_task: bool,
    pub driver_error: String,
    pub setup_error: String,
    pub details: Option<BTreeMap<String, String>>,
}

impl TaskEvent {
    pub fn detail(&self, key: &str) -> Option<&str> {
        self.details.as_ref()?.get(key).map(String::as_str)
    }
}

/// `TaskState`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct TaskState {
    pub state: String,
    pub failed: bool,
    pub started_at: Option<String>,
    pub events: Option<Vec<TaskEvent>>,
}

impl TaskState {
    /// Whether the task has been started (its logs exist).
    pub fn has_started(&self) -> bool {
        self.state == "running"
            || self
                .started_at
                .as_deref()
                .is_some_and(|t| !t.is_empty() && !t.starts_with("0001-"))
    }

    pub fn events(&self) -> &[TaskEvent] {
        self.events.as_deref().unwrap_or_default()
    }
}

/// `Allocation` and `AllocationListStub` (the fields both have).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Allocation {
    #[serde(rename = "ID")]
    pub id: String,
    pub client_status: String,
    pub client_description: String,
    pub desired_status: String,
    pub desired_description: String,
    pub create_index: u64,
    #[serde(rename = "NodeID")]
    pub node_id: String,
    /// The (dispatched) job the allocation belongs to.
    #[serde(rename = "JobID")]
    pub job_id: String,
    pub namespace: String,
    pub task_states: Option<BTreeMap<String, TaskState>>,
}

impl Allocation {
    /// Whether the allocation has ended on its client.
    pub fn is_terminal(&self) -> bool {
        matches!(self.client_status.as_str(), "complete" | "failed" | "lost")
    }

    pub fn task(&self, name: &str) -> Option<&TaskState> {
        self.task_states.as_ref()?.get(name)
    }
}

/// One frame of a framed log stream (`StreamFrame`); `{}` is a heartbeat.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct StreamFrame {
    pub offset: i64,
    /// Base64 of the bytes.
    pub data: Option<String>,
    pub file: String,
    pub file_event: String,
}
