//! The task aggregate: a task and its subtasks, stored and versioned as one document.
//! All the rules of how a task advances (which subtasks are ready, how a result or a
//! cancellation changes it) live here, so that every backend and both daemons agree.

use crate::capability::Capability;
use crate::ids::{SubtaskId, TaskId};
use crate::profile::RepoProfile;
use crate::status::{SubtaskStatus, TaskStatus, TransitionError};
use crate::timefmt::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The prefix of the branches the system names for its tasks (`agent/<n>-<slug>`); a
/// pull request whose head starts with it may be one of ours.
pub const AGENT_BRANCH_PREFIX: &str = "agent/";

/// How a subtask's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Succeeded,
    /// The agent ran and reported an error, or the repository work (setup, push) failed.
    AgentError,
    MaxTurns,
    Timeout,
    /// No agent output for longer than the idle timeout.
    Stalled,
    BudgetExceeded,
    Cancelled,
    /// The system around the agent failed (sandbox, clone, model service).
    Infrastructure,
}

/// Why a run failed, where something acts on the reason rather than only showing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// The sandbox never started for want of capacity: the worker puts the same attempt
    /// back on the queue instead of reporting it.
    NotPlaced,
    /// The git host refused a push that touches `.github/workflows/`: the token has no
    /// `workflows` permission ("refusing to allow a GitHub App to create or update
    /// workflow … without `workflows` permission", see GitHub's docs on the permissions
    /// required for GitHub Apps). Not retryable until the permission is granted.
    WorkflowsPermission,
    /// The git host refused the push for good: a pre-receive hook, a protected-branch
    /// rule, a file over its size limit. The error quotes the remote's reason; the same
    /// push would be refused again, so it is not retried.
    PushRefused,
    /// The task branch moved during the run (someone pushed to it, or forced it) and the
    /// agent's commits do not apply on its new tip: the work was pushed to a side branch
    /// the error names, and the agent is not run again.
    BranchMoved,
    /// The repository cannot be cloned as asked, the same way every time (its base
    /// branch does not exist).
    Unclonable,
    /// The kernel killed processes of the sandbox for its memory limit
    /// (`sandbox.memory_mb`); the error says the limit. Not retried: the same work would
    /// reach it again.
    OutOfMemory,
    /// A cause this version does not know, sent by a newer worker: the outcome is kept
    /// and acted on by its kind and `retryable` alone. Never sent.
    #[serde(other)]
    Unknown,
}

/// Destinations listed in a [`NetworkRefused`] at most (the rest are counted), so that
/// an outcome stays small: 50 hosts of at most 253 bytes.
pub const MAX_REFUSED_LISTED: usize = 50;

/// One destination the sandbox's network proxy refused in a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedDestination {
    /// The host asked for (a name or an address; a longer one is cut, with a marker).
    pub host: String,
    pub port: u16,
    /// Requests refused.
    pub count: u64,
    /// RFC 3339, of the first and the last refusal.
    pub first_at: String,
    pub last_at: String,
}

/// Every destination the sandbox's network proxy refused in one run (hosts off the
/// allow-list): shown on the dashboard, in the progress comment and the pull request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRefused {
    /// The destinations, in the order first refused, at most [`MAX_REFUSED_LISTED`].
    pub refused: Vec<RefusedDestination>,
    /// Refused requests in all, listed or not.
    pub total: u64,
    /// Destinations refused but not listed (past [`MAX_REFUSED_LISTED`]).
    pub unlisted: u64,
}

impl OutcomeKind {
    /// Every kind, for metric label sets that start at zero.
    pub const ALL: [OutcomeKind; 8] = [
        OutcomeKind::Succeeded,
        OutcomeKind::AgentError,
        OutcomeKind::MaxTurns,
        OutcomeKind::Timeout,
        OutcomeKind::Stalled,
        OutcomeKind::BudgetExceeded,
        OutcomeKind::Cancelled,
        OutcomeKind::Infrastructure,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            OutcomeKind::Succeeded => "succeeded",
            OutcomeKind::AgentError => "agent_error",
            OutcomeKind::MaxTurns => "max_turns",
            OutcomeKind::Timeout => "timeout",
            OutcomeKind::Stalled => "stalled",
            OutcomeKind::BudgetExceeded => "budget_exceeded",
            OutcomeKind::Cancelled => "cancelled",
            OutcomeKind::Infrastructure => "infrastructure",
        }
    }
}

/// Tokens used by an agent run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_creation: u64,
}

impl TokenUsage {
    pub fn add(&mut self, other: &TokenUsage) {
        self.input += other.input;
        self.output += other.output;
        self.cache_read += other.cache_read;
        self.cache_creation += other.cache_creation;
    }
}

/// The outcome of one attempt of a subtask, as reported by a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub kind: OutcomeKind,
    /// Whether running the same attempt again may succeed (infrastructure trouble).
    #[serde(default)]
    pub retryable: bool,
    /// A short human summary.
    #[serde(default)]
    pub summary: String,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The commit pushed to the task branch, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default)]
    pub tokens: TokenUsage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turns: Option<u32>,
    #[serde(default)]
    pub duration_ms: u64,
    /// Why it failed, when something acts on the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<FailureCause>,
    /// What the sandbox's network proxy refused in the run, when it refused anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_refused: Option<NetworkRefused>,
    /// The structured part of the agent's final reply (the planner's plan as JSON), when
    /// it gave one; at most [`MAX_STRUCTURED_BYTES`] encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured: Option<Box<serde_json::Value>>,
    /// The repository had no commit (an unborn default branch) and `commit` is its first,
    /// on the task branch: there is no base branch to open a pull request against.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub first_commit: bool,
}

/// The largest structured reply an outcome carries, in bytes of JSON: a plan of
/// `planner.max_steps` steps fits it, and the result message stays below its limit.
pub const MAX_STRUCTURED_BYTES: usize = 64 * 1024;

impl Outcome {
    pub fn succeeded(summary: impl Into<String>, commit: Option<String>) -> Self {
        Self::new(OutcomeKind::Succeeded, summary, None, commit)
    }

    pub fn failed(kind: OutcomeKind, error: impl Into<String>, retryable: bool) -> Self {
        let error = error.into();
        let mut outcome = Self::new(kind, error.clone(), Some(error), None);
        outcome.retryable = retryable;
        outcome
    }

    /// A failure of `kind` in place of this outcome that keeps what the run measured: its
    /// cost, tokens, turns and duration (a run that failed after the agent ran still
    /// spent them).
    pub fn failed_after(
        &self,
        kind: OutcomeKind,
        error: impl Into<String>,
        retryable: bool,
    ) -> Self {
        let mut failed = Self::failed(kind, error, retryable);
        failed.cost_usd = self.cost_usd;
        failed.tokens = self.tokens;
        failed.turns = self.turns;
        failed.duration_ms = self.duration_ms;
        failed
    }

    /// The outcome with every field that carries agent text cut to
    /// [`crate::bounded::MAX_AGENT_TEXT_BYTES`] (with a visible marker), so that a result
    /// carrying it always fits one message. A commit id is at most 64 bytes.
    pub fn bounded(mut self) -> Self {
        use crate::bounded::{truncate_bytes, MAX_AGENT_TEXT_BYTES};
        if self.summary.len() > MAX_AGENT_TEXT_BYTES {
            self.summary = truncate_bytes(&self.summary, MAX_AGENT_TEXT_BYTES);
        }
        if let Some(e) = self
            .error
            .as_mut()
            .filter(|e| e.len() > MAX_AGENT_TEXT_BYTES)
        {
            *e = truncate_bytes(e, MAX_AGENT_TEXT_BYTES);
        }
        if let Some(c) = self.commit.as_mut().filter(|c| c.len() > 64) {
            *c = truncate_bytes(c, 64);
        }
        if !self.cost_usd.is_finite() {
            self.cost_usd = 0.0;
        }
        if self.structured.as_ref().is_some_and(|v| {
            serde_json::to_string(v).map_or(true, |t| t.len() > MAX_STRUCTURED_BYTES)
        }) {
            // Too large to carry: the coordinator sees no plan and says so.
            self.structured = None;
        }
        if let Some(n) = self.network_refused.as_mut() {
            let cut = n.refused.len().saturating_sub(MAX_REFUSED_LISTED);
            n.refused.truncate(MAX_REFUSED_LISTED);
            n.unlisted += cut as u64;
            for r in &mut n.refused {
                if r.host.len() > 253 {
                    r.host = truncate_bytes(&r.host, 253);
                }
            }
        }
        self
    }

    fn new(
        kind: OutcomeKind,
        summary: impl Into<String>,
        error: Option<String>,
        commit: Option<String>,
    ) -> Self {
        Self {
            kind,
            retryable: false,
            summary: summary.into(),
            error,
            commit,
            cost_usd: 0.0,
            tokens: TokenUsage::default(),
            turns: None,
            duration_ms: 0,
            cause: None,
            network_refused: None,
            structured: None,
            first_commit: false,
        }
    }

    /// The same outcome, marked with why it failed.
    pub fn with_cause(mut self, cause: FailureCause) -> Self {
        self.cause = Some(cause);
        self
    }
}

/// One capability's step of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subtask {
    pub id: SubtaskId,
    pub capability: Capability,
    pub status: SubtaskStatus,
    /// The attempt now queued or running; 0 before the first.
    pub attempt: u32,
    /// Attempts made before the last manual retry: the automatic-retry budget
    /// (`coordinator.max_attempts`) counts the attempts after it, so a manual retry gives
    /// the subtask a full budget again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_base: u32,
    /// The subtask's cost (`cost_usd`) at the last manual retry: the run budget
    /// (`max_cost_usd`) counts what was spent after it, so a manual retry gives the
    /// subtask a full budget again, as it does the attempts.
    #[serde(default, skip_serializing_if = "is_zero_usd")]
    pub retry_cost_base: f64,
    /// Subtasks that must succeed before this one is queued.
    #[serde(default)]
    pub depends_on: Vec<SubtaskId>,
    /// Extra instructions for this step (e.g. review feedback to address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// For a subtask made from the planner's plan: which step, or which merge, it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub queued_at: Option<Timestamp>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<Timestamp>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<Timestamp>,
    /// Cost of all attempts so far.
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default)]
    pub tokens: TokenUsage,
    /// The worker running or last running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl Subtask {
    /// Whether the subtask's commits land on the task branch itself, rather than on a
    /// step branch that an integration subtask merges later.
    pub fn works_on_task_branch(&self) -> bool {
        !matches!(
            &self.step,
            Some(Step::Plan {
                branch: Some(_),
                ..
            })
        )
    }

    pub fn new(capability: Capability, depends_on: Vec<SubtaskId>) -> Self {
        Self {
            id: SubtaskId::new(),
            capability,
            status: SubtaskStatus::Pending,
            attempt: 0,
            retry_base: 0,
            retry_cost_base: 0.0,
            depends_on,
            instructions: None,
            step: None,
            queued_at: None,
            started_at: None,
            finished_at: None,
            cost_usd: 0.0,
            tokens: TokenUsage::default(),
            worker: None,
            outcome: None,
        }
    }

    fn set_status(&mut self, to: SubtaskStatus) -> Result<(), TransitionError> {
        self.status = self.status.transition(to)?;
        Ok(())
    }
}

/// One fix round for the failing checks of a task's pull request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiRound {
    /// 1, 2, … (at most `pipeline.max_fix_rounds`).
    pub round: u32,
    /// The names of the checks whose failure started it (at most [`MAX_CI_ROUND_CHECKS`],
    /// each at most [`MAX_CHECK_NAME_BYTES`]): anyone's text, shown as code spans.
    pub failing: Vec<String>,
    /// How the round's run ended; `None` for the round of the task that holds the list
    /// (its own status tells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<crate::status::TaskStatus>,
}

/// Failing checks a [`CiRound`] names at most.
pub const MAX_CI_ROUND_CHECKS: usize = 10;
/// The longest check name a [`CiRound`] keeps, in bytes.
pub const MAX_CHECK_NAME_BYTES: usize = 100;

impl CiRound {
    /// Round `round`, started by the failing checks `failing` (bounded here).
    pub fn new(round: u32, failing: impl IntoIterator<Item = String>) -> Self {
        Self {
            round,
            failing: failing
                .into_iter()
                .take(MAX_CI_ROUND_CHECKS)
                .map(|n| crate::bounded::truncate_bytes(&n, MAX_CHECK_NAME_BYTES))
                .collect(),
            ended: None,
        }
    }
}

/// What a subtask of a planned task does beyond its capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// A step of the plan.
    Plan {
        /// The step's id in the plan.
        id: String,
        title: String,
        /// The files or areas it expects to touch.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        paths: Vec<String>,
        /// The plan ids of the steps it depends on.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        depends_on: Vec<String>,
        /// The step branch it works on (made from the task branch), for a step that
        /// changes code; a step that does not works on the task branch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        branch: Option<String>,
        /// For one of several attempts at the same step (swarm mode, the plan step's
        /// `attempts`): which one, from 1. A [`Step::Pick`] keeps one of them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        candidate: Option<u32>,
    },
    /// Merges these step branches into the task branch, in this order; a conflict is
    /// resolved by the coder agent, which sees both sides.
    Integrate { branches: Vec<String> },
    /// Compares the attempts at the plan step `id` (on the branches `candidates`) and
    /// picks one: a reviewer, who replies `{"pick": <1..n>, "reasons": "…"}`. The pick
    /// then stands for the step: every merge of the step's branch `branch` merges the
    /// picked candidate's branch instead.
    Pick {
        id: String,
        title: String,
        candidates: Vec<String>,
        branch: String,
        /// The candidate branch picked, once the reviewer chose.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        picked: Option<String>,
    },
}

/// How a task's planner drives it: the limits its plan is held to, and how the plan went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planning {
    pub limits: crate::plan::PlanLimits,
    /// Repair turns the planner was given for an invalid plan (at most [`MAX_PLAN_REPAIRS`]).
    #[serde(default)]
    pub repairs: u32,
    /// Whether a valid plan was expanded into the task's subtasks.
    #[serde(default)]
    pub expanded: bool,
    /// The plan's overview, when it gave one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    /// Fix rounds run so far (at most `limits.max_fix_rounds`).
    #[serde(default)]
    pub fix_rounds: u32,
    /// Plans rejected by the approver so far, each answered by a new plan.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rejections: u32,
}

/// Bytes of the reports of earlier steps handed to a step at most, shared among them;
/// with the step's own part of the plan the work order stays well inside the sandbox
/// drivers' limits (a Nomad dispatch payload holds 16 KiB).
pub const CONTEXT_BUDGET_BYTES: usize = 6 * 1024;

/// Repair turns an invalid plan gets before the task fails.
pub const MAX_PLAN_REPAIRS: u32 = 1;

/// Bytes of an approver's feedback on a rejected plan kept at most (longer feedback is
/// cut with a visible marker).
pub const MAX_REJECT_FEEDBACK_BYTES: usize = 4 * 1024;

/// Why a plan cannot be rejected. Each is the client's mistake, never the system's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectError {
    /// Only a plan that waits for approval can be rejected.
    #[error("the task is {0}, not waiting for approval of a plan")]
    NotAwaitingApproval(TaskStatus),
    /// The task waits for approval before anything ran: there is no plan yet.
    #[error("the task has no plan to reject (it waits for approval before it starts); approve or cancel it")]
    NoPlan,
    /// Feedback is what the new plan answers: it must say something.
    #[error("the feedback must say what to change in the plan")]
    EmptyFeedback,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_usd(v: &f64) -> bool {
    *v == 0.0
}

/// Where a task came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskSource {
    Api,
    Github {
        installation_id: u64,
        /// `owner/name`
        repo: String,
        issue: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pull_request: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress_comment_id: Option<u64>,
        /// The issue's author, when they lack write access to the repository (the
        /// progress comment says so: the task's instructions are theirs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        untrusted_author: Option<String>,
        /// Set once the task has ended and GitHub shows all of it (pull request ready,
        /// progress comment, status label): a replica that did not see the task end
        /// (the one that did died) reports the ended tasks not yet marked so.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reported: bool,
    },
}

/// Whether and when a task waits for a person's approval (`/agent approve`, `POST
/// /api/v1/tasks/{id}/approve`) before going on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// The task runs through without waiting.
    #[default]
    NotRequired,
    /// The task waits before anything is queued.
    BeforeStart,
    /// The planner runs first; when it succeeded the task waits with its plan.
    AfterPlan,
}

impl Approval {
    fn is_not_required(&self) -> bool {
        *self == Approval::NotRequired
    }
}

/// A change of state of a task or one of its subtasks: the `data` of a stored `state`
/// event, hence exactly the JSON that `GET /api/v1/tasks/{id}/events` (and its live
/// stream) and the dashboard read, tagged by `type`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StateChange {
    /// The task's status changed; `error` says why when it failed or was cancelled.
    TaskStatus {
        status: TaskStatus,
        error: Option<String>,
    },
    /// A subtask's status or attempt changed.
    SubtaskStatus {
        capability: Capability,
        status: SubtaskStatus,
        attempt: u32,
        worker: Option<String>,
        outcome: Option<Outcome>,
    },
    /// Start-up or periodic recovery repaired orphaned work; `reason` says what it did.
    Recovery { reason: String },
}

impl StateChange {
    /// The changes that make `after` from `before` (`None`: a new task), task first, then
    /// subtasks in plan order.
    pub fn between(before: Option<&Task>, after: &Task) -> Vec<(Option<SubtaskId>, StateChange)> {
        let mut out = Vec::new();
        if before.map(|b| b.status) != Some(after.status) {
            out.push((
                None,
                StateChange::TaskStatus {
                    status: after.status,
                    error: after.error.clone(),
                },
            ));
        }
        for sub in &after.subtasks {
            let old = before.and_then(|b| b.subtask(sub.id));
            if old.map(|o| (o.status, o.attempt)) != Some((sub.status, sub.attempt)) {
                out.push((
                    Some(sub.id),
                    StateChange::SubtaskStatus {
                        capability: sub.capability,
                        status: sub.status,
                        attempt: sub.attempt,
                        worker: sub.worker.clone(),
                        outcome: sub.outcome.clone(),
                    },
                ));
            }
        }
        out
    }
}

/// A unit of work requested by a user, with its subtasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub status: TaskStatus,
    pub title: String,
    pub prompt: String,
    /// Git URL or path of the repository to work on.
    pub repository: String,
    /// The branch the agents commit to.
    pub branch: String,
    /// The branch work starts from; the remote's default branch when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_branch: Option<String>,
    /// The pipeline's name, for display.
    pub pipeline: String,
    pub source: TaskSource,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: Timestamp,
    /// Why the task failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Optimistic-concurrency version: every stored write increments it.
    pub version: u64,
    pub subtasks: Vec<Subtask>,
    /// A repository's narrowing of the agent profiles (`[profiles.<capability>]` in its
    /// `.agent-orchestrator.toml`), given to each subtask's run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub profiles: BTreeMap<Capability, RepoProfile>,
    /// Whether the task waits for approval, and when.
    #[serde(default, skip_serializing_if = "Approval::is_not_required")]
    pub approval: Approval,
    /// For a follow-up run that answers a review of the task's pull request: which round
    /// (1, 2, …) it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_round: Option<u32>,
    /// For a follow-up run that fixes the checks (CI) failing on the task's pull request:
    /// which round (1, 2, …) it is, at most `pipeline.max_fix_rounds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_round: Option<u32>,
    /// For a fix round of the checks: every round on the pull request so far, this one
    /// last, for the progress comment to show each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ci_rounds: Vec<CiRound>,
    /// For a task whose planner's plan becomes its subtasks: the limits and how it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planning: Option<Planning>,
}

/// What applying a worker report did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The task changed and must be stored.
    Changed,
    /// The report was stale or a repeat; nothing changed.
    Ignored(String),
}

impl Task {
    /// The subtask with this id.
    pub fn subtask(&self, id: SubtaskId) -> Option<&Subtask> {
        self.subtasks.iter().find(|s| s.id == id)
    }

    fn subtask_mut(&mut self, id: SubtaskId) -> Option<&mut Subtask> {
        self.subtasks.iter_mut().find(|s| s.id == id)
    }

    /// What the agent of a subtask is told besides the task: for a step of a plan, its
    /// part of the plan (title, instructions, paths), the plan's outline, and what the
    /// steps it depends on reported (a reviewer's or tester's report as findings to
    /// address), within [`CONTEXT_BUDGET_BYTES`]; for a merge, the steps it merges; for
    /// any other subtask its own instructions.
    pub fn instructions_for(&self, id: SubtaskId) -> Option<String> {
        use std::fmt::Write;
        let sub = self.subtask(id)?;
        let step = match &sub.step {
            None => return sub.instructions.clone(),
            Some(step) => step,
        };
        let mut out = String::new();
        // The subtasks whose reports this one receives.
        let sources: Vec<&Subtask> = match step {
            Step::Plan {
                id: step_id,
                title,
                paths,
                depends_on,
                ..
            } => {
                let _ = writeln!(
                    out,
                    "## Your step of the plan: {step_id} ({}): {title}\n",
                    sub.capability
                );
                out.push_str(sub.instructions.as_deref().unwrap_or("").trim());
                out.push('\n');
                if let Some(Step::Plan {
                    candidate: Some(k), ..
                }) = &sub.step
                {
                    let _ = writeln!(
                        out,
                        "\nYou make attempt {k} at this step, on a branch of its own; other \
                         attempts at the same step are made independently, and a reviewer \
                         keeps the best one. Take the approach you judge best."
                    );
                }
                if !paths.is_empty() {
                    let _ = writeln!(
                        out,
                        "\nFiles or areas it expects to touch: {}",
                        paths.join(", ")
                    );
                }
                let _ = writeln!(out, "\n## The whole plan (other steps are done by others)");
                if let Some(p) = self.planning.as_ref().filter(|p| !p.summary.is_empty()) {
                    let _ = writeln!(out, "{}", p.summary);
                }
                for s in &self.subtasks {
                    if let Some(Step::Plan {
                        id,
                        title,
                        depends_on,
                        ..
                    }) = &s.step
                    {
                        let after = if depends_on.is_empty() {
                            String::new()
                        } else {
                            format!(" (after {})", depends_on.join(", "))
                        };
                        let _ = writeln!(out, "- {id} [{}]: {title}{after}", s.capability);
                    }
                }
                depends_on
                    .iter()
                    .filter_map(|d| {
                        self.subtasks
                            .iter()
                            .find(|s| matches!(&s.step, Some(Step::Plan { id, .. }) if id == d))
                    })
                    .collect()
            }
            Step::Pick {
                id,
                title,
                candidates,
                ..
            } => {
                let _ = writeln!(
                    out,
                    "## Pick one of {} attempts at the step {id}: {title}\n\n\
                     Each attempt did the step below on its own branch, fetched as \
                     `origin/<branch>`: compare them (`git diff HEAD origin/<branch>`), judge \
                     which does the step best (correct, complete, simple, tested), and \
                     keep that one. Change nothing yourself.\n",
                    candidates.len()
                );
                out.push_str(sub.instructions.as_deref().unwrap_or("").trim());
                out.push_str("\n\nThe attempts:\n");
                for (k, branch) in candidates.iter().enumerate() {
                    let _ = writeln!(out, "{}. `{branch}`", k + 1);
                }
                let _ = writeln!(
                    out,
                    "\nEnd your reply with your choice as one JSON object in a ```json block: \
                     {{\"pick\": <the attempt's number, 1 to {}>, \"reasons\": \"<why this \
                     one, against the others>\"}}",
                    candidates.len()
                );
                sub.depends_on
                    .iter()
                    .filter_map(|d| self.subtask(*d))
                    .collect()
            }
            Step::Integrate { branches } => {
                let _ = writeln!(
                    out,
                    "## Merge of the plan's step branches into the task branch\n\nBranches, in order: {}",
                    branches.join(", ")
                );
                sub.depends_on
                    .iter()
                    .filter_map(|d| self.subtask(*d))
                    .collect()
            }
        };
        if !sources.is_empty() {
            let share = CONTEXT_BUDGET_BYTES / sources.len();
            let _ = writeln!(out, "\n## What the steps before it reported");
            for s in sources {
                let (name, title) = match &s.step {
                    Some(Step::Plan { id, title, .. }) | Some(Step::Pick { id, title, .. }) => {
                        (id.as_str(), title.as_str())
                    }
                    _ => ("merge", "merge of step branches"),
                };
                let report = s.outcome.as_ref().map_or("", |o| o.summary.as_str()).trim();
                let heading = match s.capability {
                    Capability::Reviewer | Capability::Tester => "findings to address",
                    _ => "summary",
                };
                let _ = writeln!(
                    out,
                    "\n### {name} ({}): {title}: {heading}\n{}",
                    s.capability,
                    crate::bounded::truncate_bytes(report, share)
                );
            }
        }
        Some(out)
    }

    /// Total cost of all subtasks.
    pub fn cost_usd(&self) -> f64 {
        self.subtasks.iter().map(|s| s.cost_usd).sum()
    }

    fn set_status(&mut self, to: TaskStatus) -> Result<(), TransitionError> {
        self.status = self.status.transition(to)?;
        Ok(())
    }

    /// Moves every pending subtask whose dependencies have all succeeded to `Queued`,
    /// with a new attempt number, and returns their ids: the caller sends their messages.
    pub fn queue_ready(&mut self, now: Timestamp) -> Vec<SubtaskId> {
        if self.status.is_terminal() || self.status == TaskStatus::AwaitingApproval {
            return Vec::new();
        }
        let succeeded: Vec<SubtaskId> = self
            .subtasks
            .iter()
            .filter(|s| s.status == SubtaskStatus::Succeeded)
            .map(|s| s.id)
            .collect();
        // A planned task runs at most `max_parallel` subtasks at once.
        let limit = self
            .planning
            .as_ref()
            .map_or(usize::MAX, |p| p.limits.max_parallel.max(1) as usize);
        let mut active = self
            .subtasks
            .iter()
            .filter(|s| matches!(s.status, SubtaskStatus::Queued | SubtaskStatus::Running))
            .count();
        let mut ready = Vec::new();
        for sub in &mut self.subtasks {
            if active < limit
                && sub.status == SubtaskStatus::Pending
                && sub.depends_on.iter().all(|d| succeeded.contains(d))
                && sub.set_status(SubtaskStatus::Queued).is_ok()
            {
                active += 1;
                sub.attempt += 1;
                sub.queued_at = Some(now);
                ready.push(sub.id);
            }
        }
        if !ready.is_empty() {
            self.updated_at = now;
        }
        ready
    }

    /// A worker started `attempt` of a subtask.
    pub fn apply_started(
        &mut self,
        subtask: SubtaskId,
        attempt: u32,
        worker: &str,
        at: Timestamp,
    ) -> Result<Applied, TransitionError> {
        if self.status.is_terminal() {
            return Ok(Applied::Ignored(format!("task is {}", self.status)));
        }
        let Some(sub) = self.subtask_mut(subtask) else {
            return Ok(Applied::Ignored("unknown subtask".into()));
        };
        if sub.attempt != attempt {
            return Ok(Applied::Ignored(format!(
                "stale attempt {attempt} (current {})",
                sub.attempt
            )));
        }
        match sub.status {
            SubtaskStatus::Queued => {
                sub.set_status(SubtaskStatus::Running)?;
                sub.started_at = Some(at);
                sub.worker = Some(worker.to_string());
            }
            // A redelivered message picked up by another worker: note who runs it now.
            SubtaskStatus::Running => {
                sub.worker = Some(worker.to_string());
            }
            other => return Ok(Applied::Ignored(format!("subtask is {other}"))),
        }
        if self.status == TaskStatus::Queued {
            self.set_status(TaskStatus::Running)?;
        }
        self.updated_at = at;
        Ok(Applied::Changed)
    }

    /// A worker finished `attempt` of a subtask with `outcome`. A repeat of a result already
    /// applied, or a result for an older attempt, is ignored. A retryable failure puts the
    /// subtask back in the queue while attempts remain (`max_attempts`).
    pub fn apply_outcome(
        &mut self,
        subtask: SubtaskId,
        attempt: u32,
        outcome: Outcome,
        max_attempts: u32,
        at: Timestamp,
    ) -> Result<Applied, TransitionError> {
        if self.status.is_terminal() {
            return Ok(Applied::Ignored(format!("task is {}", self.status)));
        }
        let Some(sub) = self.subtask_mut(subtask) else {
            return Ok(Applied::Ignored("unknown subtask".into()));
        };
        if sub.attempt != attempt {
            return Ok(Applied::Ignored(format!(
                "stale attempt {attempt} (current {})",
                sub.attempt
            )));
        }
        if !matches!(sub.status, SubtaskStatus::Queued | SubtaskStatus::Running) {
            return Ok(Applied::Ignored(format!(
                "subtask is already {}",
                sub.status
            )));
        }
        // Agent text kept in the task stays bounded, whoever sent it: the task item must
        // stay small (DynamoDB refuses items over 400 KB).
        let outcome = outcome.bounded();
        let (outcome, plan) = self.check_plan(subtask, outcome);
        let (outcome, fix) = self.check_verdict(subtask, outcome);
        let (outcome, picked) = self.check_pick(subtask, outcome);
        let Some(sub) = self.subtask_mut(subtask) else {
            return Ok(Applied::Ignored("unknown subtask".into()));
        };
        sub.cost_usd += outcome.cost_usd;
        sub.tokens.add(&outcome.tokens);
        if sub.started_at.is_none() {
            sub.started_at = Some(at);
        }
        let kind = outcome.kind;
        // Attempts since the last manual retry, this one included.
        let used = attempt.saturating_sub(sub.retry_base);
        let retry = outcome.retryable && kind != OutcomeKind::Succeeded && used < max_attempts;
        let error = outcome
            .error
            .clone()
            .unwrap_or_else(|| outcome.summary.clone());
        sub.outcome = Some(outcome);
        if let Some(Err(repair)) = plan {
            // One more turn of the planner, told what was wrong with its plan.
            sub.instructions = Some(repair);
            sub.set_status(SubtaskStatus::Pending)?;
            if let Some(p) = self.planning.as_mut() {
                p.repairs += 1;
            }
            self.updated_at = at;
            return Ok(Applied::Changed);
        }
        if retry {
            // Back on the queue as a new attempt: the caller sends the message.
            sub.set_status(SubtaskStatus::Pending)?;
        } else {
            sub.finished_at = Some(at);
            let to = match kind {
                OutcomeKind::Succeeded => SubtaskStatus::Succeeded,
                OutcomeKind::Cancelled => SubtaskStatus::Cancelled,
                _ => SubtaskStatus::Failed,
            };
            sub.set_status(to)?;
            let capability = sub.capability;
            if let Some(Ok(plan)) = plan {
                self.expand_plan(subtask, &plan);
            }
            if let (SubtaskStatus::Succeeded, Some(findings)) = (to, fix) {
                self.add_fix_round(subtask, findings);
            }
            if let (SubtaskStatus::Succeeded, Some(picked)) = (to, picked) {
                self.apply_pick(subtask, picked);
            }
            match to {
                SubtaskStatus::Failed => {
                    self.fail_remaining(at);
                    self.error = Some(format!("{capability} failed ({}): {error}", kind.as_str()));
                    self.set_status(TaskStatus::Failed)?;
                }
                SubtaskStatus::Cancelled => {
                    self.fail_remaining(at);
                    self.set_status(TaskStatus::Cancelled)?;
                }
                _ => {
                    if self
                        .subtasks
                        .iter()
                        .all(|s| s.status == SubtaskStatus::Succeeded)
                    {
                        self.set_status(TaskStatus::Succeeded)?;
                    } else if capability == Capability::Planner
                        && self.approval == Approval::AfterPlan
                    {
                        // The plan is made; nothing more is queued until it is approved.
                        if let Ok(to) = self.status.transition(TaskStatus::AwaitingApproval) {
                            self.status = to;
                        }
                    }
                }
            }
        }
        self.updated_at = at;
        Ok(Applied::Changed)
    }

    /// For a planner's successful outcome on a task its plan drives: the plan when it is
    /// valid (`Some(Ok)`), the instructions of a repair turn when it is not and a repair
    /// is left (`Some(Err)`), or else the outcome turned into a non-retryable failure
    /// that says what was wrong. `None` when no plan is expected of this outcome.
    fn check_plan(
        &self,
        subtask: SubtaskId,
        mut outcome: Outcome,
    ) -> (Outcome, Option<Result<crate::plan::Plan, String>>) {
        let Some(planning) = self.planning.as_ref().filter(|p| !p.expanded) else {
            return (outcome, None);
        };
        let is_planner = self
            .subtask(subtask)
            .is_some_and(|s| s.capability == Capability::Planner);
        if !is_planner || outcome.kind != OutcomeKind::Succeeded {
            return (outcome, None);
        }
        // The runner hands the plan over structured; a reply whose plan it did not find
        // (another agent kind) is read here the same way.
        let value = outcome
            .structured
            .as_deref()
            .cloned()
            .or_else(|| crate::plan::extract_json(&outcome.summary));
        match crate::plan::Plan::parse(value.as_ref(), &planning.limits) {
            Ok(plan) => (outcome, Some(Ok(plan))),
            Err(errors) if planning.repairs < MAX_PLAN_REPAIRS => {
                let repair = format!(
                    "Your previous plan was rejected:\n{}\n\nRead the task again and reply \
                     with a corrected plan that follows the plan schema.",
                    crate::plan::describe(&errors)
                );
                (outcome, Some(Err(repair)))
            }
            Err(errors) => {
                let error = format!(
                    "the planner's plan is invalid after {} repair turn(s):\n{}",
                    planning.repairs,
                    crate::plan::describe(&errors)
                );
                let mut failed = outcome.failed_after(OutcomeKind::AgentError, error, false);
                failed.structured = outcome.structured.take();
                (failed.bounded(), None)
            }
        }
    }

    /// For a checker's (tester, reviewer) successful outcome in a planned task: the
    /// findings of a fix round to start when its verdict asks for one and rounds are left
    /// (`Some`); the outcome turned into a non-retryable failure when none are left.
    fn check_verdict(&self, subtask: SubtaskId, outcome: Outcome) -> (Outcome, Option<String>) {
        let Some(planning) = self.planning.as_ref().filter(|p| p.expanded) else {
            return (outcome, None);
        };
        let is_checker = self.subtask(subtask).is_some_and(|s| {
            matches!(s.capability, Capability::Tester | Capability::Reviewer)
                && matches!(s.step, Some(Step::Plan { .. }))
        });
        if !is_checker || outcome.kind != OutcomeKind::Succeeded {
            return (outcome, None);
        }
        let reply = outcome
            .structured
            .as_deref()
            .cloned()
            .or_else(|| crate::plan::extract_json(&outcome.summary));
        let Some(verdict) = crate::verdict::Verdict::from_reply(reply.as_ref()) else {
            return (outcome, None);
        };
        if !verdict.needs_fix() {
            return (outcome, None);
        }
        if planning.fix_rounds < planning.limits.max_fix_rounds {
            return (outcome, Some(verdict.instructions()));
        }
        let error = format!(
            "still not passing after {} fix round(s) (pipeline.max_fix_rounds):\n{}",
            planning.fix_rounds,
            verdict.instructions()
        );
        let mut failed = outcome.failed_after(OutcomeKind::AgentError, error, false);
        failed.structured = outcome.structured;
        (failed.bounded(), None)
    }

    /// For a [`Step::Pick`]'s successful outcome: the candidate branch its reply picks
    /// (`Some`), or the outcome turned into a non-retryable failure saying what a pick
    /// must look like.
    fn check_pick(&self, subtask: SubtaskId, outcome: Outcome) -> (Outcome, Option<String>) {
        let Some(Step::Pick { candidates, .. }) =
            self.subtask(subtask).and_then(|s| s.step.as_ref())
        else {
            return (outcome, None);
        };
        if outcome.kind != OutcomeKind::Succeeded {
            return (outcome, None);
        }
        let reply = outcome
            .structured
            .as_deref()
            .cloned()
            .or_else(|| crate::plan::extract_json(&outcome.summary));
        let pick = reply
            .as_ref()
            .and_then(|r| r.get("pick"))
            .and_then(serde_json::Value::as_u64)
            .filter(|k| (1..=candidates.len() as u64).contains(k));
        if let Some(k) = pick {
            return (outcome, candidates.get(k as usize - 1).cloned());
        }
        let error = format!(
            "the reviewer picked none of the {} attempts: its reply must end with \
             {{\"pick\": <1 to {}>, \"reasons\": \"…\"}} in a ```json block",
            candidates.len(),
            candidates.len()
        );
        let mut failed = outcome.failed_after(OutcomeKind::AgentError, error, false);
        failed.structured = outcome.structured;
        (failed.bounded(), None)
    }

    /// Records the pick `picked` of the [`Step::Pick`] `pick`, and makes every merge of
    /// the step's branch merge the picked candidate's branch.
    fn apply_pick(&mut self, pick: SubtaskId, picked: String) {
        let Some(Step::Pick { branch, .. }) = self.subtask(pick).and_then(|s| s.step.clone())
        else {
            return;
        };
        for s in &mut self.subtasks {
            match &mut s.step {
                Some(Step::Pick { picked: p, .. }) if s.id == pick => *p = Some(picked.clone()),
                Some(Step::Integrate { branches }) => {
                    for b in branches.iter_mut().filter(|b| **b == branch) {
                        b.clone_from(&picked);
                    }
                }
                _ => {}
            }
        }
    }

    /// A fix round after the checker `checker`: a coder step given the findings, on the
    /// checker's branch, then the same check again; what waited for the checker waits
    /// for the check again instead.
    fn add_fix_round(&mut self, checker: SubtaskId, findings: String) {
        let Some(check) = self.subtask(checker).cloned() else {
            return;
        };
        let Some(Step::Plan {
            id,
            title,
            paths,
            branch,
            ..
        }) = check.step.clone()
        else {
            return;
        };
        let round = self.planning.as_ref().map_or(0, |p| p.fix_rounds) + 1;
        let fix_id = format!("{id}-fix{round}");
        let mut fix = Subtask::new(Capability::Coder, vec![checker]);
        fix.instructions = Some(findings);
        fix.step = Some(Step::Plan {
            id: fix_id.clone(),
            title: format!("Fix round {round}: address the findings of {id}"),
            paths: paths.clone(),
            depends_on: vec![id.clone()],
            branch: branch.clone(),
            candidate: None,
        });
        let mut again = Subtask::new(check.capability, vec![fix.id]);
        again.instructions = check.instructions.clone();
        again.step = Some(Step::Plan {
            id: format!("{id}-check{round}"),
            title,
            paths,
            depends_on: vec![fix_id],
            branch,
            candidate: None,
        });
        let again_id = again.id;
        for s in &mut self.subtasks {
            for d in &mut s.depends_on {
                if *d == checker {
                    *d = again_id;
                }
            }
        }
        self.subtasks.push(fix);
        self.subtasks.push(again);
        if let Some(p) = self.planning.as_mut() {
            p.fix_rounds = round;
        }
    }

    /// Replaces the subtasks still waiting after the planner `planner` with the plan's.
    fn expand_plan(&mut self, planner: SubtaskId, plan: &crate::plan::Plan) {
        let steps = plan.expand(&self.branch, planner);
        self.subtasks
            .retain(|s| s.id == planner || s.status != SubtaskStatus::Pending);
        self.subtasks.extend(steps);
        if let Some(p) = self.planning.as_mut() {
            p.expanded = true;
            p.summary = crate::bounded::truncate_bytes(&plan.summary, 2000);
        }
    }

    /// The approver rejects the plan the task waits with: the planner plans again, told
    /// the rejected plan and `feedback` (cut to [`MAX_REJECT_FEEDBACK_BYTES`]), and the
    /// subtasks made from the rejected plan go. The new plan waits for approval in turn.
    pub fn reject_plan(&mut self, feedback: &str, at: Timestamp) -> Result<(), RejectError> {
        use std::fmt::Write;
        if self.status != TaskStatus::AwaitingApproval {
            return Err(RejectError::NotAwaitingApproval(self.status));
        }
        let feedback = feedback.trim();
        if feedback.is_empty() {
            return Err(RejectError::EmptyFeedback);
        }
        let planner = self
            .subtasks
            .iter()
            .rposition(|s| {
                s.capability == Capability::Planner && s.status == SubtaskStatus::Succeeded
            })
            .filter(|_| self.approval == Approval::AfterPlan)
            .ok_or(RejectError::NoPlan)?;
        let sub = &self.subtasks[planner];
        // The plan as the coordinator read it, else the planner's reply as written.
        let rejected = sub
            .outcome
            .as_ref()
            .map(|o| {
                match o
                    .structured
                    .as_deref()
                    .cloned()
                    .or_else(|| crate::plan::extract_json(&o.summary))
                {
                    // A JSON value encodes: this cannot fail.
                    Some(plan) => format!(
                        "```json\n{}\n```",
                        serde_json::to_string_pretty(&plan).unwrap_or_default()
                    ),
                    None => o.summary.trim().to_string(),
                }
            })
            .unwrap_or_default();
        let mut told = String::from(
            "## Your previous plan was rejected\n\nThe person who approves plans rejected it \
             and asks for a new plan. Their feedback:\n\n",
        );
        let _ = writeln!(
            told,
            "{}\n\nThe rejected plan:\n\n{}\n\nRead the task again and reply with a new plan, \
             in the same plan schema, that answers the feedback.",
            crate::bounded::truncate_bytes(feedback, MAX_REJECT_FEEDBACK_BYTES),
            crate::bounded::truncate_bytes(&rejected, CONTEXT_BUDGET_BYTES)
        );
        let planner_id = sub.id;
        // What the rejected plan made: nothing of it has run (the task was waiting).
        if self.planning.as_ref().is_some_and(|p| p.expanded) {
            self.subtasks.retain(|s| {
                s.id == planner_id || !(s.step.is_some() && s.status == SubtaskStatus::Pending)
            });
        }
        if let Some(p) = self.planning.as_mut() {
            p.expanded = false;
            p.summary.clear();
            p.repairs = 0;
            p.fix_rounds = 0;
            p.rejections += 1;
        }
        let Some(sub) = self.subtask_mut(planner_id) else {
            return Err(RejectError::NoPlan);
        };
        // Checked above: a succeeded subtask may become pending again.
        if sub.set_status(SubtaskStatus::Pending).is_err() {
            return Err(RejectError::NoPlan);
        }
        sub.instructions = Some(told);
        sub.outcome = None;
        sub.finished_at = None;
        // A new run of the planner: its own attempt and cost budgets.
        sub.retry_base = sub.attempt;
        sub.retry_cost_base = sub.cost_usd;
        self.status = TaskStatus::Queued;
        self.error = None;
        self.updated_at = at;
        Ok(())
    }

    /// Cancels every subtask that has not ended.
    fn fail_remaining(&mut self, at: Timestamp) {
        for sub in &mut self.subtasks {
            if !sub.status.is_terminal() && sub.set_status(SubtaskStatus::Cancelled).is_ok() {
                sub.finished_at = Some(at);
            }
        }
    }

    /// Cancels the task and every subtask that has not ended.
    pub fn cancel(&mut self, reason: &str, at: Timestamp) -> Result<(), TransitionError> {
        self.set_status(TaskStatus::Cancelled)?;
        self.fail_remaining(at);
        self.error = Some(reason.to_string());
        self.updated_at = at;
        Ok(())
    }

    /// Makes a failed or cancelled task run again from its first unfinished subtask.
    pub fn retry(&mut self, at: Timestamp) -> Result<(), TransitionError> {
        self.set_status(TaskStatus::Queued)?;
        for sub in &mut self.subtasks {
            if matches!(sub.status, SubtaskStatus::Failed | SubtaskStatus::Cancelled) {
                sub.set_status(SubtaskStatus::Pending)?;
                sub.finished_at = None;
                sub.outcome = None;
                // A fresh automatic-retry budget from the next attempt on.
                sub.retry_base = sub.attempt;
                sub.retry_cost_base = sub.cost_usd;
            }
        }
        // A planner retried by hand gets its repair turn again.
        if let Some(p) = self.planning.as_mut().filter(|p| !p.expanded) {
            p.repairs = 0;
        }
        self.error = None;
        self.updated_at = at;
        Ok(())
    }

    /// Marks a subtask failed because the message of its `attempt` went to the
    /// dead-letter queue. A dead letter of another attempt (a stale copy of a message
    /// whose attempt was retried or recovered since) is ignored.
    pub fn fail_dead_lettered(
        &mut self,
        subtask: SubtaskId,
        attempt: u32,
        reason: &str,
        at: Timestamp,
    ) -> Result<Applied, TransitionError> {
        if self.status.is_terminal() {
            return Ok(Applied::Ignored(format!("task is {}", self.status)));
        }
        let Some(sub) = self.subtask_mut(subtask) else {
            return Ok(Applied::Ignored("unknown subtask".into()));
        };
        if sub.attempt != attempt {
            return Ok(Applied::Ignored(format!(
                "stale dead letter of attempt {attempt} (current {})",
                sub.attempt
            )));
        }
        if !matches!(sub.status, SubtaskStatus::Queued | SubtaskStatus::Running) {
            return Ok(Applied::Ignored(format!("subtask is {}", sub.status)));
        }
        // Not retryable: a dead-lettered message is not run again.
        let outcome = Outcome::failed(OutcomeKind::Infrastructure, reason, false);
        self.apply_outcome(subtask, attempt, outcome, attempt, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::plan_subtasks;
    use crate::timefmt;

    /// A worker newer than this coordinator may send a failure cause this version does
    /// not know: the outcome still decodes (its cause read as `Unknown`), instead of the
    /// whole result being refused and lost. Before: `unknown variant`.
    #[test]
    fn an_unknown_failure_cause_still_decodes() {
        let mut outcome =
            serde_json::to_value(Outcome::failed(OutcomeKind::AgentError, "boom", false))
                .expect("encode");
        outcome["cause"] = serde_json::json!("a_cause_of_a_later_version");
        let decoded: Outcome = serde_json::from_value(outcome).expect("decodes");
        assert_eq!(decoded.cause, Some(FailureCause::Unknown));
        assert_eq!(decoded.kind, OutcomeKind::AgentError);
        assert_eq!(decoded.error.as_deref(), Some("boom"));
    }

    fn task(caps: &[Capability]) -> Task {
        let now = timefmt::now();
        Task {
            profiles: Default::default(),
            id: TaskId::new(),
            status: TaskStatus::Queued,
            title: "t".into(),
            prompt: "p".into(),
            repository: "/tmp/r".into(),
            branch: "agent/x".into(),
            base_branch: None,
            pipeline: "test".into(),
            source: TaskSource::Api,
            created_at: now,
            updated_at: now,
            error: None,
            version: 0,
            subtasks: plan_subtasks(caps),
            approval: Approval::NotRequired,
            review_round: None,
            ci_round: None,
            ci_rounds: Vec::new(),
            planning: None,
        }
    }

    #[test]
    fn a_plan_to_approve_stops_the_task_after_the_planner() {
        let mut t = task(&[Capability::Planner, Capability::Coder]);
        t.approval = Approval::AfterPlan;
        let now = timefmt::now();
        let planner = t.queue_ready(now)[0];
        t.apply_outcome(planner, 1, Outcome::succeeded("the plan", None), 3, now)
            .unwrap();
        assert_eq!(t.status, TaskStatus::AwaitingApproval);
        assert!(
            t.queue_ready(now).is_empty(),
            "nothing is queued before approval"
        );

        // Without the gate the coder is queued at once.
        let mut t = task(&[Capability::Planner, Capability::Coder]);
        let planner = t.queue_ready(now)[0];
        t.apply_outcome(planner, 1, Outcome::succeeded("the plan", None), 3, now)
            .unwrap();
        assert_eq!(t.queue_ready(now), vec![t.subtasks[1].id]);
    }

    fn planned(max_parallel: u32) -> Task {
        let mut t = task(&[Capability::Planner, Capability::Coder, Capability::Tester]);
        t.planning = Some(Planning {
            limits: crate::plan::PlanLimits {
                max_steps: 5,
                max_parallel,
                allowed: vec![Capability::Coder, Capability::Tester],
                max_fix_rounds: 1,
            },
            repairs: 0,
            expanded: false,
            summary: String::new(),
            fix_rounds: 0,
            rejections: 0,
        });
        t
    }

    fn plan_reply() -> String {
        let plan = serde_json::json!({"version": 1, "summary": "two parts, then a test",
            "steps": [
            {"id": "a", "capability": "coder", "title": "part a", "instructions": "write a.txt"},
            {"id": "b", "capability": "coder", "title": "part b", "instructions": "write b.txt"},
            {"id": "t", "capability": "tester", "title": "test both", "instructions": "check a and b",
             "depends_on": ["a", "b"]}]});
        format!("The plan:\n```json\n{plan}\n```\n")
    }

    fn plan_id(t: &Task, id: SubtaskId) -> String {
        match &t.subtask(id).unwrap().step {
            Some(Step::Plan { id, .. }) => id.clone(),
            Some(Step::Integrate { .. }) => "merge".into(),
            Some(Step::Pick { id, .. }) => format!("{id}-pick"),
            None => t.subtask(id).unwrap().capability.to_string(),
        }
    }

    /// Swarm mode: a step asking for 3 attempts becomes 3 coders on branches of their
    /// own, run at once, then a reviewer's pick; the merge then takes the picked
    /// attempt's branch, and what came after the step waits for the pick. A pick that
    /// names no attempt fails the task once, saying what a pick looks like.
    #[test]
    fn a_step_with_attempts_runs_them_at_once_and_the_pick_is_merged() {
        let plan = serde_json::json!({"version": 1, "steps": [
            {"id": "a", "capability": "coder", "title": "part a", "instructions": "write a.txt",
             "attempts": 3},
            {"id": "t", "capability": "tester", "title": "test", "instructions": "check a",
             "depends_on": ["a"]}]});
        let reply = format!("```json\n{plan}\n```");
        for (pick_reply, picked) in [
            (
                "b is best\n```json\n{\"pick\": 2, \"reasons\": \"smallest\"}\n```",
                Some(2),
            ),
            ("```json\n{\"pick\": 4}\n```", None),
        ] {
            let mut t = planned(4);
            if let Some(p) = t.planning.as_mut() {
                p.limits.allowed.push(Capability::Reviewer);
            }
            let now = timefmt::now();
            let planner = t.queue_ready(now)[0];
            t.apply_outcome(planner, 1, Outcome::succeeded(reply.clone(), None), 3, now)
                .unwrap();
            let tries = t.queue_ready(now);
            assert_eq!(tries.len(), 3, "{:#?}", t.subtasks);
            let branches: Vec<String> = tries
                .iter()
                .map(|i| match &t.subtask(*i).unwrap().step {
                    Some(Step::Plan {
                        branch: Some(b),
                        candidate: Some(_),
                        ..
                    }) => b.clone(),
                    other => panic!("not an attempt: {other:?}"),
                })
                .collect();
            assert_eq!(branches.len(), 3);
            assert!(branches[1].ends_with("-step-a.try2"), "{branches:?}");
            assert!(t
                .instructions_for(tries[0])
                .unwrap()
                .contains("You make attempt 1"));
            for (n, id) in tries.iter().enumerate() {
                assert!(
                    t.queue_ready(now).is_empty(),
                    "the pick waits for every attempt"
                );
                t.apply_outcome(
                    *id,
                    1,
                    Outcome::succeeded(format!("try {n}"), Some(format!("c{n}"))),
                    3,
                    now,
                )
                .unwrap();
            }
            let pick = t.queue_ready(now);
            assert_eq!(pick.len(), 1);
            assert_eq!(plan_id(&t, pick[0]), "a-pick");
            let context = t.instructions_for(pick[0]).unwrap();
            assert!(
                context.contains(&branches[2]) && context.contains("try 2"),
                "{context}"
            );
            t.apply_outcome(pick[0], 1, Outcome::succeeded(pick_reply, None), 3, now)
                .unwrap();
            let Some(k) = picked else {
                assert_eq!(t.status, TaskStatus::Failed);
                let error = t.error.clone().unwrap_or_default();
                assert!(error.contains("picked none of the 3 attempts"), "{error}");
                continue;
            };
            let merge = t.queue_ready(now);
            assert_eq!(plan_id(&t, merge[0]), "merge");
            match &t.subtask(merge[0]).unwrap().step {
                Some(Step::Integrate { branches: merged }) => {
                    assert_eq!(merged, &vec![branches[k - 1].clone()])
                }
                other => panic!("not a merge: {other:?}"),
            }
            match &t.subtask(pick[0]).unwrap().step {
                Some(Step::Pick { picked, .. }) => {
                    assert_eq!(picked.as_deref(), Some(branches[k - 1].as_str()))
                }
                other => panic!("not a pick: {other:?}"),
            }
        }
    }

    #[test]
    fn a_plan_asks_for_attempts_only_where_they_can_be_picked() {
        let limits = |allowed: Vec<Capability>| crate::plan::PlanLimits {
            max_steps: 5,
            max_parallel: 4,
            allowed,
            max_fix_rounds: 1,
        };
        let plan = |capability: &str, attempts: u32| {
            serde_json::json!({"version": 1, "steps": [{"id": "a", "capability": capability,
                "title": "a", "instructions": "do a", "attempts": attempts}]})
        };
        let all = vec![Capability::Coder, Capability::Tester, Capability::Reviewer];
        let parse = |v: serde_json::Value, l| crate::plan::Plan::parse(Some(&v), &l);
        assert!(parse(plan("coder", 4), limits(all.clone())).is_ok());
        for (bad, l) in [
            (plan("coder", 0), limits(all.clone())),
            (plan("coder", 5), limits(all.clone())),
            (plan("reviewer", 2), limits(all.clone())),
            (plan("coder", 2), limits(vec![Capability::Coder])),
        ] {
            let errors = parse(bad, l).unwrap_err();
            assert!(
                matches!(errors[..], [crate::plan::PlanError::BadAttempts { .. }]),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn the_plan_becomes_the_subtasks_and_independent_steps_run_together() {
        let mut t = planned(4);
        let now = timefmt::now();
        let planner = t.queue_ready(now)[0];
        t.apply_outcome(planner, 1, Outcome::succeeded(plan_reply(), None), 3, now)
            .unwrap();
        // The fixed chain after the planner is replaced by the plan and its merges.
        assert_eq!(t.subtasks.len(), 1 + 3 + 2, "{:#?}", t.subtasks);
        assert!(t.planning.as_ref().unwrap().expanded);
        let ready: Vec<String> = t.queue_ready(now).iter().map(|i| plan_id(&t, *i)).collect();
        assert_eq!(ready, vec!["a", "b"], "both independent steps at once");
        let (a, b) = (t.subtasks[1].id, t.subtasks[2].id);
        t.apply_outcome(
            a,
            1,
            Outcome::succeeded("wrote a.txt", Some("c1".into())),
            3,
            now,
        )
        .unwrap();
        assert!(t.queue_ready(now).is_empty(), "the merge waits for b");
        t.apply_outcome(
            b,
            1,
            Outcome::succeeded("wrote b.txt", Some("c2".into())),
            3,
            now,
        )
        .unwrap();
        let merge = t.queue_ready(now);
        assert_eq!(merge.len(), 1);
        assert_eq!(plan_id(&t, merge[0]), "merge");
        t.apply_outcome(merge[0], 1, Outcome::succeeded("merged", None), 3, now)
            .unwrap();
        let test = t.queue_ready(now);
        assert_eq!(plan_id(&t, test[0]), "t");
        // The tester is handed its part of the plan and what the coders did.
        let context = t.instructions_for(test[0]).unwrap();
        for owed in [
            "check a and b",
            "wrote a.txt",
            "wrote b.txt",
            "two parts, then a test",
            "- a [coder]: part a",
        ] {
            assert!(context.contains(owed), "{owed:?} missing from:\n{context}");
        }
        t.apply_outcome(
            test[0],
            1,
            Outcome::succeeded("tests pass", Some("c3".into())),
            3,
            now,
        )
        .unwrap();
        let last = t.queue_ready(now);
        assert_eq!(plan_id(&t, last[0]), "merge");
        t.apply_outcome(last[0], 1, Outcome::succeeded("merged", None), 3, now)
            .unwrap();
        assert_eq!(t.status, TaskStatus::Succeeded);
    }

    #[test]
    fn with_approval_the_expanded_graph_is_what_waits() {
        let mut t = planned(4);
        t.approval = Approval::AfterPlan;
        let now = timefmt::now();
        let planner = t.queue_ready(now)[0];
        t.apply_outcome(planner, 1, Outcome::succeeded(plan_reply(), None), 3, now)
            .unwrap();
        assert_eq!(t.status, TaskStatus::AwaitingApproval);
        assert_eq!(t.subtasks.len(), 6, "the graph is there to approve");
        assert!(t.queue_ready(now).is_empty());
        t.status = TaskStatus::Queued; // what approving does
        assert_eq!(t.queue_ready(now).len(), 2);
    }

    #[test]
    fn a_rejected_plan_goes_back_to_the_planner_with_the_feedback() {
        let mut t = planned(4);
        t.approval = Approval::AfterPlan;
        let now = timefmt::now();
        // Nothing to reject before the plan waits.
        assert_eq!(
            t.reject_plan("no", now),
            Err(RejectError::NotAwaitingApproval(TaskStatus::Queued))
        );
        let planner = t.queue_ready(now)[0];
        let mut reply = Outcome::succeeded(plan_reply(), None);
        reply.cost_usd = 1.5;
        t.apply_outcome(planner, 1, reply, 3, now).unwrap();
        assert_eq!(t.status, TaskStatus::AwaitingApproval);
        assert_eq!(t.reject_plan("  \n ", now), Err(RejectError::EmptyFeedback));
        t.reject_plan("Split part a in two.", now).unwrap();
        // The rejected plan's steps are gone; the planner plans again.
        assert_eq!(t.status, TaskStatus::Queued);
        assert_eq!(t.subtasks.len(), 1, "{:#?}", t.subtasks);
        let p = t.planning.as_ref().unwrap();
        assert!(!p.expanded && p.rejections == 1 && p.summary.is_empty());
        assert_eq!(t.queue_ready(now), vec![planner]);
        assert_eq!(t.subtasks[0].attempt, 2);
        let told = t.instructions_for(planner).unwrap();
        for owed in [
            "was rejected",
            "Split part a in two.",
            "\"title\": \"part b\"",
        ] {
            assert!(told.contains(owed), "{owed:?} missing from:\n{told}");
        }
        // The new plan waits for approval in turn, with a full budget for its run.
        assert_eq!(t.subtasks[0].retry_cost_base, 1.5);
        t.apply_outcome(planner, 2, Outcome::succeeded(plan_reply(), None), 3, now)
            .unwrap();
        assert_eq!(t.status, TaskStatus::AwaitingApproval);
        assert_eq!(t.subtasks.len(), 6);
        t.status = TaskStatus::Queued; // what approving does
        assert_eq!(t.queue_ready(now).len(), 2);
        assert!(matches!(
            t.reject_plan("too late", now),
            Err(RejectError::NotAwaitingApproval(TaskStatus::Queued))
        ));

        // A task that waits before it starts has no plan to reject.
        let mut t = task(&[Capability::Coder]);
        t.approval = Approval::BeforeStart;
        t.status = TaskStatus::AwaitingApproval;
        assert_eq!(t.reject_plan("why", now), Err(RejectError::NoPlan));
    }

    #[test]
    fn a_failing_check_starts_a_bounded_fix_round() {
        let mut t = planned(4);
        let now = timefmt::now();
        let planner = t.queue_ready(now)[0];
        t.apply_outcome(planner, 1, Outcome::succeeded(plan_reply(), None), 3, now)
            .unwrap();
        // Both coders, then the merge.
        for _ in 0..2 {
            for id in t.queue_ready(now) {
                t.apply_outcome(id, 1, Outcome::succeeded("done", None), 3, now)
                    .unwrap();
            }
        }
        let test = t.queue_ready(now);
        assert_eq!(plan_id(&t, test[0]), "t");
        let failing = "```json\n{\"verdict\": \"failed\", \"failures\": [{\"file\": \"a.txt\", \"line\": 1, \"message\": \"a.txt is empty\"}], \"output\": \"FAIL a\"}\n```";
        t.apply_outcome(test[0], 1, Outcome::succeeded(failing, None), 3, now)
            .unwrap();
        assert_eq!(t.planning.as_ref().unwrap().fix_rounds, 1);
        let fix = t.queue_ready(now);
        assert_eq!(plan_id(&t, fix[0]), "t-fix1");
        assert_eq!(t.subtask(fix[0]).unwrap().capability, Capability::Coder);
        let told = t.instructions_for(fix[0]).unwrap();
        assert!(
            told.contains("a.txt:1: a.txt is empty") && told.contains("FAIL a"),
            "{told}"
        );
        // The last merge now waits for the check again, not the failed one.
        let last = t
            .subtasks
            .iter()
            .find(|s| s.depends_on.iter().any(|d| *d == test[0]));
        assert!(last
            .is_some_and(|s| s.capability == Capability::Coder && plan_id(&t, s.id) == "t-fix1"));
        t.apply_outcome(fix[0], 1, Outcome::succeeded("filled a.txt", None), 3, now)
            .unwrap();
        let again = t.queue_ready(now);
        assert_eq!(plan_id(&t, again[0]), "t-check1");
        assert!(t.subtasks.iter().any(|s| {
            matches!(s.step, Some(Step::Integrate { .. })) && s.depends_on.contains(&again[0])
        }));
        // Failing again with no round left fails the task for good.
        t.apply_outcome(again[0], 1, Outcome::succeeded(failing, None), 3, now)
            .unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        assert!(t
            .error
            .as_deref()
            .unwrap()
            .contains("still not passing after 1 fix round"));
    }

    #[test]
    fn max_parallel_bounds_what_runs_at_once() {
        let mut t = planned(1);
        let now = timefmt::now();
        let planner = t.queue_ready(now)[0];
        t.apply_outcome(planner, 1, Outcome::succeeded(plan_reply(), None), 3, now)
            .unwrap();
        let first = t.queue_ready(now);
        assert_eq!(first.len(), 1);
        assert!(t.queue_ready(now).is_empty());
        t.apply_outcome(first[0], 1, Outcome::succeeded("done", None), 3, now)
            .unwrap();
        assert_eq!(t.queue_ready(now).len(), 1, "the next one after it");
    }

    #[test]
    fn an_invalid_plan_gets_one_repair_turn_then_fails_for_good() {
        let mut t = planned(2);
        let now = timefmt::now();
        let planner = t.queue_ready(now)[0];
        let bad = "```json\n{\"version\": 1, \"steps\": [{\"id\": \"a\", \"capability\": \"coder\", \"title\": \"x\", \"instructions\": \"y\", \"depends_on\": [\"zz\"]}]}\n```";
        t.apply_outcome(planner, 1, Outcome::succeeded(bad, None), 3, now)
            .unwrap();
        assert_eq!(t.status, TaskStatus::Queued);
        assert_eq!(t.queue_ready(now), vec![planner], "the planner again");
        assert_eq!(t.subtasks[0].attempt, 2);
        let repair = t.instructions_for(planner).unwrap();
        assert!(repair.contains("\"zz\", which is not a step"), "{repair}");
        t.apply_outcome(
            planner,
            2,
            Outcome::succeeded("no plan at all", None),
            3,
            now,
        )
        .unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        let sub = &t.subtasks[0];
        assert_eq!(sub.status, SubtaskStatus::Failed);
        assert!(!sub.outcome.as_ref().unwrap().retryable);
        let error = t.error.as_deref().unwrap();
        assert!(
            error.contains("invalid after 1 repair turn") && error.contains("no plan found"),
            "{error}"
        );
    }

    #[test]
    fn state_changes_have_the_json_the_event_stream_reads() {
        let mut before = task(&[Capability::Coder]);
        let mut after = before.clone();
        after.status = TaskStatus::Failed;
        after.error = Some("boom".into());
        after.subtasks[0].status = SubtaskStatus::Queued;
        after.subtasks[0].attempt = 1;
        let changes = StateChange::between(Some(&before), &after);
        let json: Vec<serde_json::Value> = changes
            .iter()
            .map(|(_, c)| serde_json::to_value(c).unwrap())
            .collect();
        assert_eq!(
            json[0],
            serde_json::json!({"type": "task_status", "status": "failed", "error": "boom"})
        );
        assert_eq!(
            json[1],
            serde_json::json!({"type": "subtask_status", "capability": "coder",
                "status": "queued", "attempt": 1, "worker": null, "outcome": null})
        );
        assert_eq!(changes[1].0, Some(after.subtasks[0].id));
        before.status = after.status;
        assert_eq!(StateChange::between(Some(&after), &after), vec![]);
        assert_eq!(StateChange::between(None, &before).len(), 2);
    }

    #[test]
    fn tasks_stored_before_the_typed_fields_still_read() {
        let t = task(&[Capability::Coder]);
        let mut json = serde_json::to_value(&t).unwrap();
        let obj = json.as_object_mut().unwrap();
        assert!(!obj.contains_key("approval") && !obj.contains_key("review_round"));
        let back: Task = serde_json::from_value(json).unwrap();
        assert_eq!(back.approval, Approval::NotRequired);
        assert_eq!(back.review_round, None);
    }

    #[test]
    fn pipeline_advances_one_step_at_a_time() {
        let mut t = task(&[Capability::Coder, Capability::Reviewer]);
        let now = timefmt::now();
        let ready = t.queue_ready(now);
        assert_eq!(ready, vec![t.subtasks[0].id]);
        assert!(t.queue_ready(now).is_empty(), "nothing else is ready");
        let coder = t.subtasks[0].id;
        assert_eq!(
            t.apply_started(coder, 1, "w1", now).unwrap(),
            Applied::Changed
        );
        assert_eq!(t.status, TaskStatus::Running);
        let ok = Outcome::succeeded("done", Some("abc".into()));
        assert_eq!(
            t.apply_outcome(coder, 1, ok.clone(), 3, now).unwrap(),
            Applied::Changed
        );
        // the same result again is a repeat
        assert!(matches!(
            t.apply_outcome(coder, 1, ok, 3, now).unwrap(),
            Applied::Ignored(_)
        ));
        assert_eq!(t.queue_ready(now), vec![t.subtasks[1].id]);
        let reviewer = t.subtasks[1].id;
        t.apply_outcome(reviewer, 1, Outcome::succeeded("lgtm", None), 3, now)
            .unwrap();
        assert_eq!(t.status, TaskStatus::Succeeded);
    }

    #[test]
    fn retryable_failure_requeues_until_attempts_run_out() {
        let mut t = task(&[Capability::Coder]);
        let now = timefmt::now();
        let id = t.queue_ready(now)[0];
        let flaky = Outcome::failed(OutcomeKind::Infrastructure, "model overloaded", true);
        t.apply_outcome(id, 1, flaky.clone(), 2, now).unwrap();
        assert_eq!(t.subtasks[0].status, SubtaskStatus::Pending);
        assert_eq!(t.queue_ready(now), vec![id]);
        assert_eq!(t.subtasks[0].attempt, 2);
        // a late result of attempt 1 is stale
        assert!(matches!(
            t.apply_outcome(id, 1, flaky.clone(), 2, now).unwrap(),
            Applied::Ignored(_)
        ));
        t.apply_outcome(id, 2, flaky, 2, now).unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        assert!(t.error.as_deref().unwrap().contains("model overloaded"));
    }

    #[test]
    fn failure_cancels_the_rest_and_retry_resumes() {
        let mut t = task(&[Capability::Coder, Capability::Tester]);
        let now = timefmt::now();
        let id = t.queue_ready(now)[0];
        t.apply_outcome(
            id,
            1,
            Outcome::failed(OutcomeKind::AgentError, "boom", false),
            3,
            now,
        )
        .unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.subtasks[1].status, SubtaskStatus::Cancelled);
        t.retry(now).unwrap();
        assert_eq!(t.status, TaskStatus::Queued);
        assert_eq!(t.queue_ready(now), vec![id]);
        assert_eq!(t.subtasks[0].attempt, 2);
    }

    #[test]
    fn a_manual_retry_gives_a_fresh_retry_budget() {
        let mut t = task(&[Capability::Coder]);
        let now = timefmt::now();
        let id = t.queue_ready(now)[0];
        let flaky = Outcome::failed(OutcomeKind::Infrastructure, "overloaded", true);
        t.apply_outcome(id, 1, flaky.clone(), 2, now).unwrap();
        t.queue_ready(now);
        t.apply_outcome(id, 2, flaky.clone(), 2, now).unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        t.retry(now).unwrap();
        assert_eq!(t.queue_ready(now), vec![id]);
        t.apply_outcome(id, 3, flaky, 2, now).unwrap();
        assert_eq!(
            t.subtasks[0].status,
            SubtaskStatus::Pending,
            "retried again"
        );
        assert_eq!(t.queue_ready(now), vec![id]);
        assert_eq!(t.subtasks[0].attempt, 4);
    }

    #[test]
    fn a_stale_dead_letter_is_ignored() {
        let mut t = task(&[Capability::Coder]);
        let now = timefmt::now();
        let id = t.queue_ready(now)[0];
        let flaky = Outcome::failed(OutcomeKind::Infrastructure, "overloaded", true);
        t.apply_outcome(id, 1, flaky, 3, now).unwrap();
        t.queue_ready(now);
        let r = t.fail_dead_lettered(id, 1, "dead", now).unwrap();
        assert!(matches!(r, Applied::Ignored(_)), "{r:?}");
        assert_eq!(t.subtasks[0].status, SubtaskStatus::Queued);
        t.fail_dead_lettered(id, 2, "dead", now).unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
    }

    #[test]
    fn results_for_a_cancelled_task_are_ignored() {
        let mut t = task(&[Capability::Coder]);
        let now = timefmt::now();
        let id = t.queue_ready(now)[0];
        t.cancel("user asked", now).unwrap();
        let r = t
            .apply_outcome(id, 1, Outcome::succeeded("late", None), 3, now)
            .unwrap();
        assert!(matches!(r, Applied::Ignored(_)));
        assert_eq!(t.status, TaskStatus::Cancelled);
        assert!(t.cancel("again", now).is_ok(), "cancel is idempotent");
        assert!(TaskStatus::Succeeded
            .transition(TaskStatus::Cancelled)
            .is_err());
    }
}
