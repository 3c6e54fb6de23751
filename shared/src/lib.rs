//! Shared library of agent-orchestrator: the domain model (tasks, subtasks, capabilities and
//! their state machines), the versioned queue messages, configuration and secret references,
//! and the seams to the outside world (queue, state store) with their backends.
#![forbid(unsafe_code)]

pub mod aws;
pub mod aws_secrets;
pub mod backend;
pub mod backoff;
pub mod bounded;
pub mod capability;
pub mod config;
pub mod ids;
pub mod message;
pub mod metrics;
pub mod names;
pub mod pipeline;
pub mod plan;
pub mod pricing;
pub mod profile;
pub mod queue;
pub mod secret;
pub mod setup;
pub mod shutdown;
pub mod state;
pub mod status;
pub mod stream_json;
pub mod task;
pub mod telemetry;
pub mod timefmt;
pub mod validate;
pub mod verdict;

pub use capability::Capability;
pub use ids::{DeliveryId, SubtaskId, TaskId};
pub use status::{SubtaskStatus, TaskStatus, TransitionError};
pub use task::{Outcome, OutcomeKind, Subtask, Task};
