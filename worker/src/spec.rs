//! The run spec: everything the in-sandbox runner needs for one attempt, written by a
//! sandbox driver as JSON (a file for bwrap/process, the dispatch payload for Nomad).
//! It holds no secret: credentials reach the sandbox through its environment.

use ao_shared::capability::Capability;
use ao_shared::ids::{SubtaskId, TaskId};
use ao_shared::message::SubtaskMessage;
use serde::{Deserialize, Serialize};

/// How to run the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Wall-clock limit of the agent, in seconds.
    pub timeout_secs: u64,
}

/// One attempt of one subtask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub task_id: TaskId,
    pub subtask_id: SubtaskId,
    pub attempt: u32,
    pub capability: Capability,
    pub repository: String,
    pub branch: String,
    #[serde(default)]
    pub base_branch: Option<String>,
    pub title: String,
    pub prompt: String,
    #[serde(default)]
    pub instructions: Option<String>,
    pub agent: AgentSpec,
}

impl RunSpec {
    pub fn from_message(m: &SubtaskMessage, agent: AgentSpec) -> Self {
        Self {
            task_id: m.task_id,
            subtask_id: m.subtask_id,
            attempt: m.attempt,
            capability: m.capability,
            repository: m.repository.clone(),
            branch: m.branch.clone(),
            base_branch: m.base_branch.clone(),
            title: m.title.clone(),
            prompt: m.prompt.clone(),
            instructions: m.instructions.clone(),
            agent,
        }
    }

    /// The full prompt given to the agent: the task, and this step's extra instructions.
    pub fn full_prompt(&self) -> String {
        match &self.instructions {
            Some(extra) => format!("{}\n\n{}", self.prompt, extra),
            None => self.prompt.clone(),
        }
    }
}

/// One line of the runner's standard output: an event for the live stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunnerEvent {
    pub kind: String,
    pub data: serde_json::Value,
}
