//! Metering of model calls from the model's own answers: the usage in the Messages API's
//! streamed events (`message_start` carries the input and cache counts, `message_delta`
//! the running output count) or in a whole JSON answer's `usage`. Prices come from
//! `ao_shared::pricing`. This is the run's authoritative cost: nothing in the sandbox
//! can change what the model answered to the proxy.

use ao_shared::pricing;
use ao_shared::stream_json::Usage;
use ao_shared::task::TokenUsage;
use parking_lot::Mutex;
use serde_json::Value;

/// Longest SSE line or JSON answer kept for metering; a longer one is not parsed (its
/// usage, always in short events, is lost only if the model sent an absurd answer).
const MAX_METERED_BYTES: usize = 8 * 1024 * 1024;

/// The usage of one model call.
#[derive(Clone, Debug, Default)]
struct Call {
    model: String,
    usage: Usage,
}

/// Every metered call of one run.
#[derive(Debug, Default)]
pub struct Meter {
    calls: Mutex<Vec<Call>>,
    refused: Mutex<Option<String>>,
}

/// What the meter says about a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metered {
    /// Model calls answered.
    pub calls: usize,
    pub cost_usd: f64,
    pub tokens: TokenUsage,
    /// Why a call was refused for the budget, if one was.
    pub budget_refusal: Option<String>,
}

impl Meter {
    /// The run's cost so far, in dollars.
    pub fn cost_usd(&self) -> f64 {
        self.calls
            .lock()
            .iter()
            .map(|c| pricing::cost_usd(&c.model, &c.usage))
            .sum()
    }

    pub fn summary(&self) -> Metered {
        let calls = self.calls.lock();
        let mut tokens = TokenUsage::default();
        for c in calls.iter() {
            tokens.add(&c.usage.tokens());
        }
        Metered {
            calls: calls.len(),
            cost_usd: calls
                .iter()
                .map(|c| pricing::cost_usd(&c.model, &c.usage))
                .sum(),
            tokens,
            budget_refusal: self.refused.lock().clone(),
        }
    }

    /// Notes that a call was refused because the budget is spent.
    pub fn refuse(&self, why: String) {
        self.refused.lock().get_or_insert(why);
    }

    fn record(&self, call: Call) {
        self.calls.lock().push(call);
    }
}

/// Meters one answer as its bytes pass; records the call when dropped (the answer ended,
/// or the agent hung up: what was answered so far is still charged).
pub struct CallMeter {
    meter: std::sync::Arc<Meter>,
    streamed: bool,
    pending: Vec<u8>,
    overflow: bool,
    call: Call,
    saw_usage: bool,
}

impl CallMeter {
    /// `streamed`: the answer is `text/event-stream`; else one JSON document.
    /// `model`: the model named in the request, until the answer names its own.
    pub fn new(meter: std::sync::Arc<Meter>, streamed: bool, model: String) -> Self {
        Self {
            meter,
            streamed,
            pending: Vec::new(),
            overflow: false,
            call: Call {
                model,
                usage: Usage::default(),
            },
            saw_usage: false,
        }
    }

    /// Feeds the next bytes of the answer.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.streamed {
            if self.pending.len() + bytes.len() <= MAX_METERED_BYTES {
                self.pending.extend_from_slice(bytes);
            } else {
                self.overflow = true;
            }
            return;
        }
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            if !self.overflow {
                self.pending.extend_from_slice(&rest[..i]);
                let line = std::mem::take(&mut self.pending);
                self.sse_line(&line);
            }
            self.overflow = false;
            self.pending.clear();
            rest = &rest[i + 1..];
        }
        if self.pending.len() + rest.len() <= MAX_METERED_BYTES {
            self.pending.extend_from_slice(rest);
        } else {
            self.overflow = true;
            self.pending.clear();
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        match event["type"].as_str() {
            Some("message_start") => {
                self.model_from(&event["message"]);
                self.usage_from(&event["message"]["usage"]);
            }
            Some("message_delta") => self.usage_from(&event["usage"]),
            _ => {}
        }
    }

    fn model_from(&mut self, message: &Value) {
        if let Some(m) = message["model"].as_str().filter(|m| !m.is_empty()) {
            self.call.model = m.to_string();
        }
    }

    /// Takes the larger of each count: the stream repeats and grows them.
    fn usage_from(&mut self, usage: &Value) {
        if !usage.is_object() {
            return;
        }
        self.saw_usage = true;
        let u = &mut self.call.usage;
        let get = |k: &str| usage[k].as_u64().unwrap_or(0);
        u.input_tokens = u.input_tokens.max(get("input_tokens"));
        u.output_tokens = u.output_tokens.max(get("output_tokens"));
        u.cache_creation_input_tokens = u
            .cache_creation_input_tokens
            .max(get("cache_creation_input_tokens"));
        u.cache_read_input_tokens = u
            .cache_read_input_tokens
            .max(get("cache_read_input_tokens"));
    }
}

impl Drop for CallMeter {
    fn drop(&mut self) {
        if self.streamed {
            if !self.overflow && !self.pending.is_empty() {
                let line = std::mem::take(&mut self.pending);
                self.sse_line(&line);
            }
        } else if !self.overflow {
            if let Ok(answer) = serde_json::from_slice::<Value>(&self.pending) {
                self.model_from(&answer);
                self.usage_from(&answer["usage"]);
            }
        }
        if self.saw_usage {
            self.meter.record(std::mem::take(&mut self.call));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_streamed_answer_is_metered_across_chunk_boundaries() {
        let meter = Arc::new(Meter::default());
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",",
            "\"usage\":{\"input_tokens\":1000000,\"output_tokens\":1}}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1000000}}\n\n",
        );
        let mut call = CallMeter::new(meter.clone(), true, String::new());
        for chunk in stream.as_bytes().chunks(7) {
            call.feed(chunk);
        }
        drop(call);
        let m = meter.summary();
        assert_eq!(m.calls, 1);
        assert!((m.cost_usd - 18.0).abs() < 1e-9, "{m:?}");
        assert_eq!(m.tokens.output, 1_000_000);
    }

    #[test]
    fn a_json_answer_is_metered_and_an_answer_without_usage_is_not() {
        let meter = Arc::new(Meter::default());
        let mut call = CallMeter::new(meter.clone(), false, "claude-sonnet-4-5".into());
        call.feed(
            br#"{"model":"claude-haiku-4-5","usage":{"input_tokens":1000000,"output_tokens":0}}"#,
        );
        drop(call);
        let mut empty = CallMeter::new(meter.clone(), false, String::new());
        empty.feed(b"{\"type\":\"error\"}");
        drop(empty);
        let m = meter.summary();
        assert_eq!(m.calls, 1);
        assert!((m.cost_usd - 1.0).abs() < 1e-9, "{m:?}");
    }
}
