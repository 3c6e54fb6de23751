//! The structured verdict a tester or reviewer ends its reply with (one JSON object in a
//! ```json block, like the plan): the tester's `passed` / `failed` with the failing tests
//! and an output excerpt, the reviewer's `approve` / `request_changes` with findings by
//! file and line. A verdict that asks for work starts a bounded fix round
//! ([`crate::task::Task::apply_outcome`]). A reply without a verdict counts as passed.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Findings listed in a fix round's instructions at most.
pub const MAX_FINDINGS: usize = 30;
/// Bytes of a fix round's instructions at most.
pub const MAX_FINDINGS_BYTES: usize = 4000;

/// One finding: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    pub message: String,
}

/// A checker's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The tests pass.
    Passed,
    /// Tests fail: which, and an excerpt of their output.
    Failed {
        #[serde(default)]
        failures: Vec<Finding>,
        #[serde(default)]
        output: String,
    },
    /// The reviewer approves.
    Approve,
    /// The reviewer asks for changes.
    RequestChanges {
        #[serde(default)]
        findings: Vec<Finding>,
    },
}

impl Verdict {
    /// The verdict in a reply's structured part, if it holds one.
    pub fn from_reply(structured: Option<&serde_json::Value>) -> Option<Verdict> {
        structured
            .filter(|v| v.get("verdict").is_some())
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Whether the verdict asks for a fix.
    pub fn needs_fix(&self) -> bool {
        matches!(
            self,
            Verdict::Failed { .. } | Verdict::RequestChanges { .. }
        )
    }

    /// What a fix round is told to address, bounded.
    pub fn instructions(&self) -> String {
        let (head, findings, output) = match self {
            Verdict::Passed | Verdict::Approve => return String::new(),
            Verdict::Failed { failures, output } => {
                ("The tests failed.", failures, output.as_str())
            }
            Verdict::RequestChanges { findings } => ("The review asks for changes.", findings, ""),
        };
        let mut s = format!("{head} Fix every finding below; do not weaken or remove tests.\n");
        for f in findings.iter().take(MAX_FINDINGS) {
            let at = match (&f.file, f.line) {
                (Some(file), Some(line)) => format!("{file}:{line}: "),
                (Some(file), None) => format!("{file}: "),
                _ => String::new(),
            };
            let _ = writeln!(s, "- {at}{}", f.message);
        }
        if !output.trim().is_empty() {
            let _ = write!(s, "\nOutput:\n```\n{}\n```\n", output.trim());
        }
        crate::bounded::truncate_bytes(&s, MAX_FINDINGS_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse_and_say_what_to_fix() {
        let v = Verdict::from_reply(Some(&serde_json::json!({"verdict": "request_changes",
            "findings": [{"file": "src/a.rs", "line": 3, "message": "off by one"}]})))
        .unwrap();
        assert!(v.needs_fix());
        assert!(v.instructions().contains("src/a.rs:3: off by one"));
        let v = Verdict::from_reply(Some(&serde_json::json!({"verdict": "failed",
            "failures": [{"message": "test_x"}], "output": "assert 1 == 2"})))
        .unwrap();
        assert!(v.instructions().contains("assert 1 == 2"));
        assert_eq!(
            Verdict::from_reply(Some(&serde_json::json!({"verdict": "passed"}))),
            Some(Verdict::Passed)
        );
        assert_eq!(
            Verdict::from_reply(Some(&serde_json::json!({"steps": []}))),
            None
        );
        assert_eq!(Verdict::from_reply(None), None);
    }
}
