//! Capabilities: the kinds of work a worker can do. Each has its own queue.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a subtask needs of the worker that runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Planner,
    Coder,
    Tester,
    Reviewer,
    Docs,
}

impl Capability {
    /// Every capability, in pipeline order.
    pub const ALL: [Capability; 5] = [
        Capability::Planner,
        Capability::Coder,
        Capability::Tester,
        Capability::Reviewer,
        Capability::Docs,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Capability::Planner => "planner",
            Capability::Coder => "coder",
            Capability::Tester => "tester",
            Capability::Reviewer => "reviewer",
            Capability::Docs => "docs",
        }
    }

    /// Whether this capability's agent may change the repository and push.
    pub fn pushes_code(&self) -> bool {
        matches!(
            self,
            Capability::Coder | Capability::Tester | Capability::Docs
        )
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a capability.
#[derive(Debug, thiserror::Error)]
#[error("unknown capability {0:?} (expected one of planner, coder, tester, reviewer, docs)")]
pub struct UnknownCapability(pub String);

impl FromStr for Capability {
    type Err = UnknownCapability;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL
            .into_iter()
            .find(|c| c.as_str() == s.trim())
            .ok_or_else(|| UnknownCapability(s.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_capability_and_rejects_others() {
        for c in Capability::ALL {
            assert_eq!(c.as_str().parse::<Capability>().unwrap(), c);
        }
        assert!("painter".parse::<Capability>().is_err());
        assert!(!Capability::Reviewer.pushes_code());
        assert!(!Capability::Planner.pushes_code());
    }
}
