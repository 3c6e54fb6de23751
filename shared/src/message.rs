//! Versioned message envelopes for the capability queues and the result queue.
//!
//! Every body is JSON `{"version": N, "kind": "...", ...}`. Decoding checks the version
//! before anything else, and a malformed or oversized body is an error, never a panic.

use crate::capability::Capability;
use crate::ids::{SubtaskId, TaskId};
use crate::task::Outcome;
use crate::timefmt::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The message format version this build writes and reads.
pub const MESSAGE_VERSION: u32 = 1;

/// SQS's limit on a message: "The minimum message size is 1 byte (1 character). The
/// maximum is 262,144 bytes (256 KiB)" (Amazon SQS Developer Guide, *Amazon SQS message
/// quotas*, <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html>).
/// The limit counts the body and its message attributes.
pub const SQS_MESSAGE_LIMIT_BYTES: usize = 262_144;

/// The largest body accepted, well below [`SQS_MESSAGE_LIMIT_BYTES`] (room for the
/// attributes and for backends that count differently): large data is stored, not sent.
/// Every result a worker builds fits it: outcomes are [`Outcome::bounded`], and event
/// batches are split with [`ResultMessage::event_batches`].
pub const MAX_MESSAGE_BYTES: usize = 200 * 1024;

/// Bytes of an `events` message besides its events (envelope, ids, kind), with room to spare.
const EVENTS_ENVELOPE_BYTES: usize = 1024;

/// A message that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {0} bytes, above the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("message is not a JSON object with a numeric \"version\": {0}")]
    NoVersion(String),
    #[error("unsupported message version {found} (this build reads version {MESSAGE_VERSION})")]
    UnsupportedVersion { found: u64 },
    #[error("malformed message body: {0}")]
    Malformed(String),
}

/// A message that cannot be encoded within limits.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message would be {0} bytes, above the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("cannot encode message: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Deserialize)]
struct VersionProbe {
    version: serde_json::Value,
}

fn encode<T: Serialize>(body: &T) -> Result<String, EncodeError> {
    let text = serde_json::to_string(&Envelope {
        version: MESSAGE_VERSION,
        body,
    })?;
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(EncodeError::TooLarge(text.len()));
    }
    Ok(text)
}

fn decode<T: DeserializeOwned>(text: &str) -> Result<T, DecodeError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(text.len()));
    }
    let probe: VersionProbe =
        serde_json::from_str(text).map_err(|e| DecodeError::NoVersion(e.to_string()))?;
    match probe.version.as_u64() {
        Some(v) if v == u64::from(MESSAGE_VERSION) => {}
        Some(found) => return Err(DecodeError::UnsupportedVersion { found }),
        None => {
            return Err(DecodeError::NoVersion(format!(
                "version is {}",
                probe.version
            )))
        }
    }
    serde_json::from_str::<Envelope<T>>(text)
        .map(|e| e.body)
        .map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// The work order on a capability queue: everything a worker needs to run one attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename = "subtask")]
pub struct SubtaskMessage {
    pub task_id: TaskId,
    pub subtask_id: SubtaskId,
    pub attempt: u32,
    pub capability: Capability,
    pub repository: String,
    pub branch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_branch: Option<String>,
    pub title: String,
    pub prompt: String,
    /// Extra instructions for this step: for a step of a plan, its part of the plan and
    /// the context handed forward from the steps it depends on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// For a subtask of a plan: the step it is, or the merge it makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<crate::task::Step>,
    /// Where `branch` starts when the remote does not have it yet: the task branch for a
    /// step branch (when the task branch exists), before `base_branch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_from: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub enqueued_at: Timestamp,
    /// The repository's narrowing of this capability's agent profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<crate::profile::RepoProfile>,
    /// For a task from GitHub: where the worker gets a repository-scoped token for git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github: Option<GithubTarget>,
    /// The worker that ran this task's latest subtask and so holds its working state (a
    /// mirror, a setup result): a hint, never a requirement. Any worker may run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer_worker: Option<String>,
    /// What earlier attempts of this subtask cost, in US dollars, as the coordinator
    /// booked them. The worker's run budget (`max_cost_usd`) is what is left of it, so
    /// automatic retries share one budget instead of each starting afresh.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spent_usd: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// The GitHub App installation and repository of a subtask's task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GithubTarget {
    pub installation_id: u64,
    /// `owner/name`
    pub repo: String,
}

impl SubtaskMessage {
    pub fn encode(&self) -> Result<String, EncodeError> {
        encode(self)
    }
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text)
    }
}

/// One agent event forwarded live (tool call, text, result), as the agent reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentEventRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub at: Timestamp,
    /// The event's type (`assistant`, `tool_use`, `result`, `log`, …).
    pub kind: String,
    pub data: serde_json::Value,
}

/// What a worker reports on the result queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResultMessage {
    /// A worker started an attempt.
    Started {
        task_id: TaskId,
        subtask_id: SubtaskId,
        attempt: u32,
        worker: String,
        #[serde(with = "time::serde::rfc3339")]
        at: Timestamp,
    },
    /// Agent output while the attempt runs.
    Events {
        task_id: TaskId,
        subtask_id: SubtaskId,
        attempt: u32,
        events: Vec<AgentEventRecord>,
    },
    /// The attempt ended.
    Finished {
        task_id: TaskId,
        subtask_id: SubtaskId,
        attempt: u32,
        worker: String,
        outcome: Outcome,
        #[serde(with = "time::serde::rfc3339")]
        at: Timestamp,
    },
    /// What a run of the attempt spent, for a run that ends without reporting an outcome
    /// (its lease was lost: another run holds the attempt). Booked like a `Finished`'s
    /// cost, once per report (task, subtask, attempt, worker, `at`); it changes no state.
    Spent {
        task_id: TaskId,
        subtask_id: SubtaskId,
        attempt: u32,
        worker: String,
        /// US dollars, as the run's outcome reported them.
        cost_usd: f64,
        /// When the run ended.
        #[serde(with = "time::serde::rfc3339")]
        at: Timestamp,
    },
}

impl ResultMessage {
    /// `events` as `Events` messages that each encode within [`MAX_MESSAGE_BYTES`], in
    /// order: no event is dropped, and one whose data is too large on its own is kept as a
    /// truncated copy ([`crate::bounded::bound_event_data`]).
    pub fn event_batches(
        task_id: TaskId,
        subtask_id: SubtaskId,
        attempt: u32,
        events: Vec<AgentEventRecord>,
    ) -> Vec<ResultMessage> {
        let budget = MAX_MESSAGE_BYTES - EVENTS_ENVELOPE_BYTES;
        let mut batches = Vec::new();
        let mut batch = Vec::new();
        let mut size = 0;
        for mut event in events {
            event.data = crate::bounded::bound_event_data(event.data);
            event.kind = crate::bounded::truncate_bytes(&event.kind, 64);
            // An event's JSON plus the comma between events.
            let bytes = serde_json::to_string(&event).map_or(0, |t| t.len()) + 1;
            if !batch.is_empty() && size + bytes > budget {
                batches.push(std::mem::take(&mut batch));
                size = 0;
            }
            size += bytes;
            batch.push(event);
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        batches
            .into_iter()
            .map(|events| ResultMessage::Events {
                task_id,
                subtask_id,
                attempt,
                events,
            })
            .collect()
    }

    pub fn encode(&self) -> Result<String, EncodeError> {
        encode(self)
    }

    /// The message made to encode within [`MAX_MESSAGE_BYTES`]: a `Finished` whose
    /// outcome is too large (agent text is bounded in bytes, but JSON escapes of control
    /// characters take up to six times as many) has its agent text cut further, step by
    /// step, each cut marked: summary and error to 2 KiB, then the structured result left
    /// out, then the refused destinations past the first 5, then summary and error to
    /// 256 bytes. A result that cannot be sent is run again until dead-lettered, so it is
    /// cut rather than lost. Other messages are returned as they are.
    pub fn fitted(mut self) -> Self {
        for step in 0..4 {
            if self.encode().is_ok() {
                break;
            }
            let ResultMessage::Finished { outcome, .. } = &mut self else {
                break;
            };
            match step {
                0 => {
                    outcome.summary = crate::bounded::truncate_bytes(&outcome.summary, 2048);
                    outcome.error = outcome
                        .error
                        .as_deref()
                        .map(|e| crate::bounded::truncate_bytes(e, 2048));
                }
                1 => {
                    if outcome.structured.take().is_some() {
                        outcome.summary.push_str(
                            "\n[the structured result was left out: too large to report]",
                        );
                    }
                }
                2 => {
                    if let Some(n) = outcome.network_refused.as_mut() {
                        if n.refused.len() > 5 {
                            n.unlisted += (n.refused.len() - 5) as u64;
                            n.refused.truncate(5);
                        }
                    }
                }
                _ => {
                    outcome.summary = crate::bounded::truncate_bytes(&outcome.summary, 256);
                    outcome.error = outcome
                        .error
                        .as_deref()
                        .map(|e| crate::bounded::truncate_bytes(e, 256));
                }
            }
        }
        self
    }

    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text)
    }
    pub fn task_id(&self) -> TaskId {
        match self {
            ResultMessage::Started { task_id, .. }
            | ResultMessage::Events { task_id, .. }
            | ResultMessage::Finished { task_id, .. }
            | ResultMessage::Spent { task_id, .. } => *task_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::OutcomeKind;
    use crate::timefmt;

    fn sample() -> SubtaskMessage {
        SubtaskMessage {
            profile: None,
            task_id: TaskId::new(),
            subtask_id: SubtaskId::new(),
            attempt: 1,
            capability: Capability::Coder,
            repository: "file:///tmp/repo.git".into(),
            branch: "agent/x".into(),
            base_branch: None,
            title: "t".into(),
            prompt: "do it".into(),
            instructions: None,
            step: None,
            start_from: None,
            enqueued_at: timefmt::now(),
            github: None,
            prefer_worker: None,
            spent_usd: 0.0,
        }
    }

    #[test]
    fn github_target_is_optional_both_ways() {
        let mut m = sample();
        let plain = m.encode().unwrap();
        assert!(!plain.contains("github"), "{plain}");
        m.github = Some(GithubTarget {
            installation_id: 7,
            repo: "o/r".into(),
        });
        let text = m.encode().unwrap();
        assert_eq!(SubtaskMessage::decode(&text).unwrap(), m);
        // A message written before the field existed still decodes.
        assert_eq!(SubtaskMessage::decode(&plain).unwrap().github, None);
    }

    #[test]
    fn subtask_message_round_trips_with_version() {
        let m = sample();
        let text = m.encode().unwrap();
        assert!(text.contains("\"version\":1"), "{text}");
        assert_eq!(SubtaskMessage::decode(&text).unwrap(), m);
    }

    #[test]
    fn result_message_round_trips() {
        let r = ResultMessage::Finished {
            task_id: TaskId::new(),
            subtask_id: SubtaskId::new(),
            attempt: 2,
            worker: "w".into(),
            outcome: Outcome::failed(OutcomeKind::Timeout, "slow", false),
            at: timefmt::now(),
        };
        assert_eq!(ResultMessage::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn unknown_version_is_rejected_clearly() {
        let text = sample()
            .encode()
            .unwrap()
            .replace("\"version\":1", "\"version\":7");
        let err = SubtaskMessage::decode(&text).unwrap_err();
        assert!(
            matches!(err, DecodeError::UnsupportedVersion { found: 7 }),
            "{err}"
        );
        assert!(err.to_string().contains("version 7"));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for bad in [
            "",
            "[]",
            "null",
            "{",
            "{\"version\":\"1\"}",
            "{\"version\":1}",
            "{\"version\":1,\"kind\":\"subtask\",\"task_id\":5}",
            "{\"version\":-1}",
        ] {
            assert!(SubtaskMessage::decode(bad).is_err(), "{bad}");
            assert!(ResultMessage::decode(bad).is_err(), "{bad}");
        }
        let kind_swap = sample().encode().unwrap();
        assert!(ResultMessage::decode(&kind_swap).is_err());
    }

    #[test]
    fn a_finished_result_with_huge_agent_text_always_fits_one_message() {
        // Control characters take 6 bytes each in JSON: the worst case.
        let huge = "\u{1}".repeat(1 << 20);
        let mut outcome = Outcome::failed(OutcomeKind::AgentError, huge.clone(), false);
        outcome.summary = huge;
        let r = ResultMessage::Finished {
            task_id: TaskId::new(),
            subtask_id: SubtaskId::new(),
            attempt: 1,
            worker: "w".into(),
            outcome: outcome.bounded(),
            at: timefmt::now(),
        };
        let text = r.encode().expect("a bounded outcome encodes");
        assert!(text.len() <= MAX_MESSAGE_BYTES && MAX_MESSAGE_BYTES < SQS_MESSAGE_LIMIT_BYTES);
        let ResultMessage::Finished { outcome, .. } = ResultMessage::decode(&text).unwrap() else {
            panic!("not finished")
        };
        assert!(crate::bounded::is_truncated(&outcome.summary));
        assert!(crate::bounded::is_truncated(
            outcome.error.as_deref().unwrap()
        ));
    }

    #[test]
    fn event_batches_over_the_limit_are_split_not_dropped() {
        let (task, sub) = (TaskId::new(), SubtaskId::new());
        let events: Vec<AgentEventRecord> = (0..300)
            .map(|i| AgentEventRecord {
                at: timefmt::now(),
                kind: "text".into(),
                data: serde_json::json!({ "i": i, "text": "x".repeat(5000) }),
            })
            .chain(std::iter::once(AgentEventRecord {
                at: timefmt::now(),
                kind: "text".into(),
                data: serde_json::json!({ "i": 300, "text": "\u{1}".repeat(1 << 20) }),
            }))
            .collect();
        let batches = ResultMessage::event_batches(task, sub, 1, events);
        assert!(batches.len() > 1);
        let mut seen = Vec::new();
        for b in &batches {
            let text = b.encode().expect("every batch encodes");
            assert!(text.len() <= MAX_MESSAGE_BYTES);
            let ResultMessage::Events { events, .. } = b else {
                panic!("not events")
            };
            for e in events {
                seen.push(e.data.get("i").and_then(|i| i.as_u64()));
            }
        }
        // The huge one is kept, truncated (its "i" is inside the truncated text).
        assert_eq!(seen.len(), 301);
        assert_eq!(seen[..300], (0..300).map(Some).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn oversized_messages_are_refused_both_ways() {
        let mut m = sample();
        m.prompt = "x".repeat(MAX_MESSAGE_BYTES);
        assert!(matches!(m.encode(), Err(EncodeError::TooLarge(_))));
        let huge = format!(
            "{{\"version\":1,\"pad\":\"{}\"}}",
            "y".repeat(MAX_MESSAGE_BYTES)
        );
        assert!(matches!(
            SubtaskMessage::decode(&huge),
            Err(DecodeError::TooLarge(_))
        ));
    }

    /// An outcome at every bound, made of control characters (six bytes each in JSON):
    /// it did not encode, so the result was never sent; fitted, it does, with every cut
    /// marked.
    #[test]
    fn an_outcome_of_escapes_at_every_bound_is_fitted_into_a_message() {
        use crate::task::{NetworkRefused, Outcome, RefusedDestination};
        let ctl = |n: usize| "\u{1}".repeat(n);
        let mut outcome = Outcome::failed(OutcomeKind::AgentError, ctl(8 * 1024), true);
        outcome.summary = ctl(8 * 1024);
        outcome.structured = Some(Box::new(serde_json::Value::String(ctl(60 * 1024))));
        outcome.network_refused = Some(NetworkRefused {
            refused: (0..50)
                .map(|i| RefusedDestination {
                    host: format!("{i}{}", ctl(250)),
                    port: 443,
                    count: 1,
                    first_at: "2026-01-01T00:00:00Z".into(),
                    last_at: "2026-01-01T00:00:00Z".into(),
                })
                .collect(),
            total: 50,
            unlisted: 0,
        });
        let m = ResultMessage::Finished {
            task_id: TaskId::new(),
            subtask_id: SubtaskId::new(),
            attempt: 1,
            worker: "w".into(),
            outcome,
            at: timefmt::now(),
        };
        assert!(matches!(m.encode(), Err(EncodeError::TooLarge(_))));
        let fitted = m.fitted();
        let text = fitted.encode().expect("fits");
        assert!(text.len() <= MAX_MESSAGE_BYTES);
        let ResultMessage::Finished { outcome, .. } = fitted else {
            panic!("still a Finished")
        };
        assert!(crate::bounded::is_truncated(&outcome.summary));
        assert_eq!(outcome.kind, OutcomeKind::AgentError);
    }
}
