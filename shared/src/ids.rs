//! Identifier newtypes, so that a task id can never be passed where a subtask id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
            /// The first eight hex digits, for branch names and log lines.
            pub fn short(&self) -> String {
                self.0.simple().to_string()[..8].to_string()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| IdError { kind: $prefix, value: s.chars().take(64).collect() })
            }
        }
    };
}

/// A string that is not a valid id.
#[derive(Debug, thiserror::Error)]
#[error("invalid {kind} id {value:?}: expected a UUID")]
pub struct IdError {
    kind: &'static str,
    value: String,
}

uuid_id!(
    /// Identifies a task: one unit of work requested by a user (an issue, an API call).
    TaskId,
    "task"
);
uuid_id!(
    /// Identifies a subtask: one capability's step of a task.
    SubtaskId,
    "subtask"
);

/// A GitHub webhook delivery id (`X-GitHub-Delivery`), recorded to make deliveries idempotent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryId(String);

impl DeliveryId {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = TaskId::new();
        assert_eq!(id.to_string().parse::<TaskId>().unwrap(), id);
        let err = "nope".parse::<SubtaskId>().unwrap_err().to_string();
        assert!(err.contains("invalid subtask id"), "{err}");
        assert_eq!(id.short().len(), 8);
    }
}
