//! Redaction of the run's secret values from everything that leaves a run: the runner
//! applies it to each event line, the outcome (summary, error) and the commit message it
//! writes; the worker applies it again to every event and outcome it receives from any
//! sandbox driver, with the values it put into that sandbox. A secret is found as it is
//! and as it reads inside a JSON string.

use ao_shared::task::Outcome;

/// Secrets shorter than this are not searched for (they would match ordinary text).
pub const MIN_REDACTED_LEN: usize = 8;
/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// The secret values to remove, longest first (so a secret containing another is
/// replaced whole).
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    values: Vec<String>,
}

impl Redactor {
    /// A redactor of `values`; those shorter than [`MIN_REDACTED_LEN`] are skipped.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut all = Vec::new();
        for v in values {
            if v.len() < MIN_REDACTED_LEN {
                continue;
            }
            // Also as it reads inside a JSON string.
            let escaped = serde_json::to_string(v).unwrap_or_default();
            let escaped = escaped.trim_matches('"');
            if escaped != v {
                all.push(escaped.to_string());
            }
            all.push(v.to_string());
        }
        all.sort_by_key(|v| std::cmp::Reverse(v.len()));
        all.dedup();
        Self { values: all }
    }

    /// `text` with every secret value replaced by [`REDACTED`].
    pub fn text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.values {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }

    /// Redacts every string (and object key) of a JSON value in place.
    pub fn json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::String(s) => *s = self.text(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.json(v)),
            Value::Object(map) => {
                let entries = std::mem::take(map);
                for (k, mut v) in entries {
                    self.json(&mut v);
                    map.insert(self.text(&k), v);
                }
            }
            _ => {}
        }
    }

    /// Redacts every text of an outcome in place.
    pub fn outcome(&self, outcome: &mut Outcome) {
        outcome.summary = self.text(&outcome.summary);
        outcome.error = outcome.error.as_deref().map(|e| self.text(e));
        outcome.commit = outcome.commit.as_deref().map(|c| self.text(c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ao_shared::task::OutcomeKind;

    #[test]
    fn secrets_are_replaced_everywhere() {
        let r = Redactor::new(["sk-secret-\"quoted\"-value", "short"]);
        assert_eq!(r.text("a short text"), "a short text");
        assert_eq!(
            r.text("key=sk-secret-\"quoted\"-value!"),
            format!("key={REDACTED}!")
        );
        let mut v = serde_json::json!({"m": ["x sk-secret-\"quoted\"-value"]});
        r.json(&mut v);
        assert_eq!(v["m"][0], format!("x {REDACTED}"));
        let line = serde_json::to_string(&serde_json::json!("sk-secret-\"quoted\"-value")).unwrap();
        assert!(!r.text(&line).contains("quoted"), "{}", r.text(&line));
        let mut o = Outcome::failed(OutcomeKind::AgentError, "sk-secret-\"quoted\"-value", false);
        o.summary = "done: sk-secret-\"quoted\"-value".into();
        r.outcome(&mut o);
        assert_eq!(o.error.as_deref(), Some(REDACTED));
        assert_eq!(o.summary, format!("done: {REDACTED}"));
    }
}
