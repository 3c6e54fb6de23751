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

/// One finding: where, and what is wrong. A place the checker wrote that is no place
/// (a line that is negative, zero, fractional, beyond `u32` or not a number; a file that
/// is not text) is read as none: the finding, and the verdict, still count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_file"
    )]
    pub file: Option<String>,
    /// 1-based line of the file.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_line"
    )]
    pub line: Option<u32>,
    pub message: String,
}

fn lenient_line<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(v.and_then(|v| v.as_u64())
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0))
}

fn lenient_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(v.and_then(|v| v.as_str().map(str::to_string)))
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

    #[test]
    fn a_finding_whose_place_is_no_place_still_asks_for_changes() {
        let v = Verdict::from_reply(Some(&serde_json::json!({"verdict": "request_changes",
        "findings": [
            {"file": "a.rs", "line": -1, "message": "negative"},
            {"file": "a.rs", "line": 99_999_999_999u64, "message": "huge"},
            {"file": 7, "line": "12", "message": "odd types"},
            {"file": "a.rs", "line": 0, "message": "zero"}
        ]})))
        .expect("a verdict");
        assert!(v.needs_fix());
        let told = v.instructions();
        for want in ["a.rs: negative", "a.rs: huge", "- odd types", "a.rs: zero"] {
            assert!(told.contains(want), "{want} in {told}");
        }
    }
}
