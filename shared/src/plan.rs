//! The planner's structured plan: its shape (version 1, described for readers and for
//! the agent by `schemas/plan.v1.json`), the checks the coordinator makes before it trusts
//! one, and how a valid plan becomes the task's subtasks (a DAG with step branches and
//! integration steps).
//!
//! The plan comes from the agent, so it is hostile input: it is parsed with
//! `deny_unknown_fields`, every text is bounded, step ids are restricted to what is safe
//! in a git branch name, and the graph is checked (unknown dependency, cycle, too many
//! steps, a capability the task's pipeline does not allow) before anything is expanded.

use crate::capability::Capability;
use crate::ids::SubtaskId;
use crate::task::{Step, Subtask};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The plan format version this build reads (`"version": 1`).
pub const PLAN_VERSION: u32 = 1;
/// The longest step id, in bytes; ids are `[a-z0-9][a-z0-9-]*`.
pub const MAX_STEP_ID_BYTES: usize = 32;
/// The longest step title, in bytes.
pub const MAX_TITLE_BYTES: usize = 200;
/// The longest instructions of one step, in bytes.
pub const MAX_INSTRUCTIONS_BYTES: usize = 4000;
/// Paths listed per step at most, each at most [`MAX_PATH_BYTES`].
pub const MAX_PATHS: usize = 20;
/// The longest path or area of a step, in bytes.
pub const MAX_PATH_BYTES: usize = 200;
/// Attempts a step may ask for at most (swarm mode, [`PlanStep::attempts`]).
pub const MAX_ATTEMPTS: u32 = 4;

/// A plan as the planner writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The format version: [`PLAN_VERSION`].
    pub version: u32,
    /// A short overview of the approach (optional).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    pub steps: Vec<PlanStep>,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanStep {
    /// Unique in the plan; `[a-z0-9][a-z0-9-]*`, at most [`MAX_STEP_ID_BYTES`].
    pub id: String,
    /// Who does it.
    pub capability: Capability,
    pub title: String,
    /// What to do, for the agent of this step.
    pub instructions: String,
    /// Ids of the steps that must be done first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// The files or areas the step expects to touch.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Swarm mode: how many independent attempts at the step run (1 to
    /// [`MAX_ATTEMPTS`], a step that changes code only), each on its own branch; a
    /// reviewer then compares them and keeps one. 1 (the default): the step runs once.
    #[serde(default = "one_attempt", skip_serializing_if = "is_one_attempt")]
    pub attempts: u32,
}

fn one_attempt() -> u32 {
    1
}

fn is_one_attempt(n: &u32) -> bool {
    *n == 1
}

/// What a plan may hold: from `planner.*` in the configuration, narrowed by a
/// repository, and the capabilities of the task's pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanLimits {
    /// Steps in a plan at most.
    pub max_steps: u32,
    /// Subtasks of the task queued or running at once at most.
    pub max_parallel: u32,
    /// The capabilities a step may have.
    pub allowed: Vec<Capability>,
    /// Fix rounds a failing test or a review asking for changes may start, in all.
    #[serde(default)]
    pub max_fix_rounds: u32,
}

/// One thing wrong with a plan; the messages are written for the planner's repair turn.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no plan found: end your reply with the plan as one JSON object in a ```json block")]
    Missing,
    #[error("the plan is not valid JSON of the plan schema: {0}")]
    Malformed(String),
    #[error("unsupported plan version {0} (expected {PLAN_VERSION})")]
    Version(u32),
    #[error("the plan has no steps")]
    Empty,
    #[error("the plan has {found} steps; at most {max} are allowed")]
    TooManySteps { found: usize, max: u32 },
    #[error(
        "step id {0:?} is not 1-32 characters of a-z, 0-9 and '-' starting with a letter or digit"
    )]
    BadId(String),
    #[error("step id {0:?} is used twice")]
    DuplicateId(String),
    #[error("step {step:?} depends on {dependency:?}, which is not a step of the plan")]
    UnknownDependency { step: String, dependency: String },
    #[error("the steps {0:?} depend on each other in a cycle")]
    Cycle(Vec<String>),
    #[error("step {step:?} has capability {capability}, which this task does not allow (allowed: {allowed})")]
    NotAllowed {
        step: String,
        capability: Capability,
        allowed: String,
    },
    #[error("step {step:?} asks for {attempts} attempts: {why}")]
    BadAttempts {
        step: String,
        attempts: u32,
        why: &'static str,
    },
    #[error("step {step:?}: {field} is empty or longer than {max} bytes")]
    BadText {
        step: String,
        field: &'static str,
        max: usize,
    },
}

/// The errors of a plan as one text, one per line.
pub fn describe(errors: &[PlanError]) -> String {
    errors
        .iter()
        .map(|e| format!("- {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The plan in an agent's final reply: the last ```json fenced block, or else the whole
/// reply when it is a JSON object. `None` when there is neither.
pub fn extract_json(text: &str) -> Option<serde_json::Value> {
    let mut found = None;
    let mut rest = text;
    while let Some(start) = rest.find("```json") {
        let body = &rest[start + "```json".len()..];
        let Some(end) = body.find("```") else { break };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(body[..end].trim()) {
            if v.is_object() {
                found = Some(v);
            }
        }
        rest = &body[end + 3..];
    }
    found.or_else(|| {
        serde_json::from_str::<serde_json::Value>(text.trim())
            .ok()
            .filter(|v| v.is_object())
    })
}

impl Plan {
    /// Parses and checks a plan: `Ok` only for a plan that can be expanded as it is.
    pub fn parse(
        value: Option<&serde_json::Value>,
        limits: &PlanLimits,
    ) -> Result<Plan, Vec<PlanError>> {
        let value = value.ok_or_else(|| vec![PlanError::Missing])?;
        if let Some(v) = value.get("version").and_then(|v| v.as_u64()) {
            if v != u64::from(PLAN_VERSION) {
                return Err(vec![PlanError::Version(v.min(u64::from(u32::MAX)) as u32)]);
            }
        }
        let plan: Plan = serde_json::from_value(value.clone()).map_err(|e| {
            let mut m = e.to_string();
            m.truncate(300);
            vec![PlanError::Malformed(m)]
        })?;
        plan.validate(limits)?;
        Ok(plan)
    }

    /// Every problem of the plan against `limits`, or `Ok`.
    pub fn validate(&self, limits: &PlanLimits) -> Result<(), Vec<PlanError>> {
        let mut errors = Vec::new();
        if self.version != PLAN_VERSION {
            errors.push(PlanError::Version(self.version));
        }
        if self.steps.is_empty() {
            errors.push(PlanError::Empty);
        }
        if self.steps.len() > limits.max_steps as usize {
            errors.push(PlanError::TooManySteps {
                found: self.steps.len(),
                max: limits.max_steps,
            });
            // The graph of an oversized plan is not worth checking.
            return Err(errors);
        }
        let mut ids = BTreeSet::new();
        for step in &self.steps {
            if !valid_id(&step.id) {
                errors.push(PlanError::BadId(step.id.chars().take(40).collect()));
            } else if !ids.insert(step.id.as_str()) {
                errors.push(PlanError::DuplicateId(step.id.clone()));
            }
            if !limits.allowed.contains(&step.capability) {
                errors.push(PlanError::NotAllowed {
                    step: step.id.clone(),
                    capability: step.capability,
                    allowed: limits
                        .allowed
                        .iter()
                        .map(|c| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            for (field, text, max) in [
                ("title", &step.title, MAX_TITLE_BYTES),
                ("instructions", &step.instructions, MAX_INSTRUCTIONS_BYTES),
            ] {
                if text.trim().is_empty() || text.len() > max {
                    errors.push(PlanError::BadText {
                        step: step.id.clone(),
                        field,
                        max,
                    });
                }
            }
            let why = if step.attempts == 0 || step.attempts > MAX_ATTEMPTS {
                Some("attempts is 1 to 4")
            } else if step.attempts > 1 && !step.capability.pushes_code() {
                Some("only a step that changes code can be attempted several times")
            } else if step.attempts > 1 && !limits.allowed.contains(&Capability::Reviewer) {
                Some("the reviewer that picks one attempt is not allowed in this task")
            } else {
                None
            };
            if let Some(why) = why {
                errors.push(PlanError::BadAttempts {
                    step: step.id.clone(),
                    attempts: step.attempts,
                    why,
                });
            }
            if step.paths.len() > MAX_PATHS || step.paths.iter().any(|p| p.len() > MAX_PATH_BYTES) {
                errors.push(PlanError::BadText {
                    step: step.id.clone(),
                    field: "paths",
                    max: MAX_PATH_BYTES,
                });
            }
        }
        for step in &self.steps {
            for dep in &step.depends_on {
                if !ids.contains(dep.as_str()) {
                    errors.push(PlanError::UnknownDependency {
                        step: step.id.clone(),
                        dependency: dep.chars().take(40).collect(),
                    });
                }
            }
        }
        if errors.is_empty() {
            if let Err(cycle) = self.topological_order() {
                errors.push(PlanError::Cycle(cycle));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Step indices with every step after the steps it depends on, stable in plan order;
    /// the ids left in a cycle when there is one.
    pub fn topological_order(&self) -> Result<Vec<usize>, Vec<String>> {
        let index: BTreeMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let mut done = vec![false; self.steps.len()];
        let mut order = Vec::with_capacity(self.steps.len());
        loop {
            let before = order.len();
            for (i, step) in self.steps.iter().enumerate() {
                if !done[i]
                    && step
                        .depends_on
                        .iter()
                        .all(|d| index.get(d.as_str()).is_some_and(|&j| done[j]))
                {
                    done[i] = true;
                    order.push(i);
                }
            }
            if order.len() == self.steps.len() {
                return Ok(order);
            }
            if order.len() == before {
                return Err(self
                    .steps
                    .iter()
                    .zip(&done)
                    .filter(|(_, d)| !**d)
                    .map(|(s, _)| s.id.clone())
                    .collect());
            }
        }
    }

    /// The subtasks of this (valid) plan for a task on `task_branch`, after the planner
    /// subtask `planner`:
    /// - every step becomes a subtask with its instructions; one that changes code works
    ///   on its own step branch (`<task branch>-step-<id>`), made from the task branch;
    /// - a step that depends on steps which changed code depends on an integration
    ///   subtask that merges their branches into the task branch first (one per distinct
    ///   set of dependencies), so that it starts from their work;
    /// - a last integration merges the branches of the steps no other step depends on.
    ///
    /// Merges go in the plan's dependency order; independent steps share no edge and so
    /// run at the same time.
    pub fn expand(&self, task_branch: &str, planner: SubtaskId) -> Vec<Subtask> {
        let order = self.topological_order().unwrap_or_default();
        let branch_of = |i: usize| -> Option<String> {
            let s = &self.steps[i];
            s.capability
                .pushes_code()
                .then(|| format!("{task_branch}-step-{}", s.id))
        };
        let index: BTreeMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let position: BTreeMap<usize, usize> =
            order.iter().enumerate().map(|(p, &i)| (i, p)).collect();
        let mut ids: BTreeMap<usize, SubtaskId> = BTreeMap::new();
        let mut integrations: BTreeMap<Vec<usize>, SubtaskId> = BTreeMap::new();
        let mut out: Vec<Subtask> = Vec::new();
        // An integration of the steps `deps` (sorted by plan order), made once.
        let mut integrate = |deps: Vec<usize>,
                             ids: &BTreeMap<usize, SubtaskId>,
                             out: &mut Vec<Subtask>|
         -> Vec<SubtaskId> {
            let dep_ids: Vec<SubtaskId> = deps.iter().filter_map(|i| ids.get(i).copied()).collect();
            let branches: Vec<String> = deps.iter().filter_map(|&i| branch_of(i)).collect();
            if branches.is_empty() {
                return dep_ids;
            }
            if let Some(id) = integrations.get(&deps) {
                return vec![*id];
            }
            let mut sub = Subtask::new(Capability::Coder, dep_ids);
            sub.step = Some(Step::Integrate { branches });
            integrations.insert(deps, sub.id);
            let id = sub.id;
            out.push(sub);
            vec![id]
        };
        for &i in &order {
            let step = &self.steps[i];
            let mut deps: Vec<usize> = step
                .depends_on
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            deps.sort_by_key(|d| position.get(d).copied().unwrap_or(usize::MAX));
            let depends_on = if deps.is_empty() {
                vec![planner]
            } else {
                integrate(deps, &ids, &mut out)
            };
            let plan_step = |branch: Option<String>, candidate: Option<u32>| Step::Plan {
                id: step.id.clone(),
                title: step.title.clone(),
                paths: step.paths.clone(),
                depends_on: step.depends_on.clone(),
                branch,
                candidate,
            };
            match branch_of(i).filter(|_| step.attempts > 1) {
                // Swarm mode: the attempts, each on a branch of its own, then the
                // reviewer's pick, which stands for the step.
                Some(branch) => {
                    let mut candidates = Vec::new();
                    let mut tries = Vec::new();
                    for k in 1..=step.attempts {
                        let mut sub = Subtask::new(step.capability, depends_on.clone());
                        sub.instructions = Some(step.instructions.clone());
                        // `.` is in no step id: no other step's branch can be this one.
                        let own = format!("{branch}.try{k}");
                        sub.step = Some(plan_step(Some(own.clone()), Some(k)));
                        candidates.push(own);
                        tries.push(sub.id);
                        out.push(sub);
                    }
                    let mut pick = Subtask::new(Capability::Reviewer, tries);
                    pick.instructions = Some(step.instructions.clone());
                    pick.step = Some(Step::Pick {
                        id: step.id.clone(),
                        title: step.title.clone(),
                        candidates,
                        branch,
                        picked: None,
                    });
                    ids.insert(i, pick.id);
                    out.push(pick);
                }
                None => {
                    let mut sub = Subtask::new(step.capability, depends_on);
                    sub.instructions = Some(step.instructions.clone());
                    sub.step = Some(plan_step(branch_of(i), None));
                    ids.insert(i, sub.id);
                    out.push(sub);
                }
            }
        }
        let depended: BTreeSet<&str> = self
            .steps
            .iter()
            .flat_map(|s| s.depends_on.iter().map(String::as_str))
            .collect();
        let leaves: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| !depended.contains(self.steps[i].id.as_str()))
            .collect();
        if leaves.iter().any(|&i| branch_of(i).is_some()) {
            // The last integration also waits for the leaves that change no code (a
            // review), so that the task ends after every step.
            if let [last] = integrate(leaves.clone(), &ids, &mut out)[..] {
                if let Some(sub) = out.iter_mut().find(|s| s.id == last) {
                    for dep in leaves.iter().filter_map(|i| ids.get(i)) {
                        if !sub.depends_on.contains(dep) {
                            sub.depends_on.push(*dep);
                        }
                    }
                }
            }
        }
        out
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_STEP_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PlanLimits {
        PlanLimits {
            max_steps: 5,
            max_parallel: 2,
            allowed: vec![Capability::Coder, Capability::Tester, Capability::Reviewer],
            max_fix_rounds: 1,
        }
    }

    fn step(id: &str, cap: Capability, deps: &[&str]) -> serde_json::Value {
        serde_json::json!({"id": id, "capability": cap, "title": format!("do {id}"),
            "instructions": format!("instructions of {id}"),
            "depends_on": deps, "paths": ["src/"]})
    }

    fn plan(steps: Vec<serde_json::Value>) -> serde_json::Value {
        serde_json::json!({"version": 1, "steps": steps})
    }

    #[test]
    fn a_plan_is_found_in_the_last_json_block_or_the_whole_reply() {
        let text = "Here:\n```json\n{\"a\": 1}\n```\nand finally\n```json\n{\"b\": 2}\n```\n";
        assert_eq!(extract_json(text), Some(serde_json::json!({"b": 2})));
        assert_eq!(
            extract_json(" {\"c\": 3} "),
            Some(serde_json::json!({"c": 3}))
        );
        assert_eq!(extract_json("- [ ] a free-text plan"), None);
        assert_eq!(extract_json("```json\n{broken\n```"), None);
    }

    #[test]
    fn every_kind_of_bad_plan_is_named() {
        let l = limits();
        let err = |v: serde_json::Value| Plan::parse(Some(&v), &l).unwrap_err();
        assert_eq!(Plan::parse(None, &l).unwrap_err(), vec![PlanError::Missing]);
        assert!(matches!(
            err(serde_json::json!({"version": 1, "steps": [], "extra": 1}))[0],
            PlanError::Malformed(_)
        ));
        assert_eq!(
            err(serde_json::json!({"version": 2, "steps": []})),
            vec![PlanError::Version(2)]
        );
        assert_eq!(err(plan(vec![])), vec![PlanError::Empty]);
        let many = (0..6)
            .map(|i| step(&format!("s{i}"), Capability::Coder, &[]))
            .collect();
        assert_eq!(
            err(plan(many)),
            vec![PlanError::TooManySteps { found: 6, max: 5 }]
        );
        assert_eq!(
            err(plan(vec![step("a", Capability::Coder, &["nope"])])),
            vec![PlanError::UnknownDependency {
                step: "a".into(),
                dependency: "nope".into()
            }]
        );
        assert_eq!(
            err(plan(vec![
                step("a", Capability::Coder, &["b"]),
                step("b", Capability::Coder, &["a"]),
                step("c", Capability::Coder, &[]),
            ])),
            vec![PlanError::Cycle(vec!["a".into(), "b".into()])]
        );
        assert!(matches!(
            err(plan(vec![step("a", Capability::Docs, &[])]))[0],
            PlanError::NotAllowed {
                capability: Capability::Docs,
                ..
            }
        ));
        assert!(matches!(
            err(plan(vec![step("../x", Capability::Coder, &[])]))[0],
            PlanError::BadId(_)
        ));
        assert_eq!(
            err(plan(vec![
                step("a", Capability::Coder, &[]),
                step("a", Capability::Coder, &[])
            ])),
            vec![PlanError::DuplicateId("a".into())]
        );
        let mut long = step("a", Capability::Coder, &[]);
        long["instructions"] = "x".repeat(MAX_INSTRUCTIONS_BYTES + 1).into();
        assert!(matches!(
            err(plan(vec![long]))[0],
            PlanError::BadText {
                field: "instructions",
                ..
            }
        ));
        assert!(describe(&err(plan(vec![]))).contains("no steps"));
    }

    #[test]
    fn independent_steps_share_no_edge_and_are_integrated_before_their_dependent() {
        let p = Plan::parse(
            Some(&plan(vec![
                step("api", Capability::Coder, &[]),
                step("cli", Capability::Coder, &[]),
                step("test", Capability::Tester, &["api", "cli"]),
                step("review", Capability::Reviewer, &["test"]),
            ])),
            &limits(),
        )
        .unwrap();
        let planner = SubtaskId::new();
        let subs = p.expand("agent/1-x", planner);
        let find = |id: &str| {
            subs.iter()
                .find(|s| matches!(&s.step, Some(Step::Plan { id: i, .. }) if i == id))
                .unwrap()
        };
        let (api, cli, test, review) = (find("api"), find("cli"), find("test"), find("review"));
        assert_eq!(api.depends_on, vec![planner]);
        assert_eq!(cli.depends_on, vec![planner]);
        assert!(
            matches!(&api.step, Some(Step::Plan { branch: Some(b), .. }) if b == "agent/1-x-step-api")
        );
        assert!(matches!(
            &review.step,
            Some(Step::Plan { branch: None, .. })
        ));
        // The tester starts from both coders' work, merged in plan order.
        let merge = subs.iter().find(|s| s.id == test.depends_on[0]).unwrap();
        assert_eq!(merge.depends_on, vec![api.id, cli.id]);
        assert_eq!(
            merge.step,
            Some(Step::Integrate {
                branches: vec!["agent/1-x-step-api".into(), "agent/1-x-step-cli".into()]
            })
        );
        // The tester's work is merged before the review, which ends the task.
        let merge2 = subs.iter().find(|s| s.id == review.depends_on[0]).unwrap();
        assert_eq!(
            merge2.step,
            Some(Step::Integrate {
                branches: vec!["agent/1-x-step-test".into()]
            })
        );
        assert_eq!(subs.len(), 6, "4 steps and 2 integrations");
        assert_eq!(test.instructions.as_deref(), Some("instructions of test"));
    }

    #[test]
    fn the_last_integration_merges_every_leaf_and_waits_for_all() {
        let p = Plan::parse(
            Some(&plan(vec![
                step("a", Capability::Coder, &[]),
                step("b", Capability::Coder, &[]),
                step("r", Capability::Reviewer, &[]),
            ])),
            &limits(),
        )
        .unwrap();
        let subs = p.expand("t", SubtaskId::new());
        let last = subs.last().unwrap();
        assert_eq!(
            last.step,
            Some(Step::Integrate {
                branches: vec!["t-step-a".into(), "t-step-b".into()]
            })
        );
        assert_eq!(last.depends_on.len(), 3);
    }
}
