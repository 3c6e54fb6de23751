//! Claude Code's `--output-format stream-json` events, typed: one JSON object per line
//! (system init, assistant message, user message with tool results, final result). The
//! parser is lenient where the CLI evolves: unknown event types and content blocks are
//! kept as [`StreamEvent::Other`] / [`ContentBlock::Other`], unknown fields are ignored,
//! and only a line that is not a JSON object is an error.
//!
//! [`StreamEvent::agent_events`] turns an event into the compact records the live stream
//! and the dashboard show (`init`, `text`, `thinking`, `tool_use`, `tool_result`,
//! `result`, `other`).

use crate::task::TokenUsage;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Longest line the parser accepts; a longer one is an error, not an allocation.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;
/// Tool output kept in a `tool_result` record; the rest is cut with a note.
pub const MAX_TOOL_RESULT_CHARS: usize = 16 * 1024;
/// Tool input kept in a `tool_use` record (as JSON text) before it is cut.
pub const MAX_TOOL_INPUT_CHARS: usize = 16 * 1024;

/// A line that is not a stream-json event.
#[derive(Debug, thiserror::Error)]
pub enum StreamJsonError {
    #[error("line of {0} bytes is longer than the {MAX_LINE_BYTES}-byte limit")]
    TooLong(usize),
    #[error("not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("not a JSON object with a \"type\"")]
    NoType,
}

/// One line of the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// The session started: model, tools, MCP servers.
    Init(Init),
    /// Another `system` event (e.g. `api_retry`), kept whole.
    System { subtype: String, raw: Value },
    /// A message of the model (text, thinking, tool calls).
    Assistant(AssistantMessage),
    /// A message to the model: the tools' results.
    User { content: Vec<ContentBlock> },
    /// The run's end, with turns, cost and usage.
    Result(RunResult),
    /// An event type this parser does not know.
    Other(Value),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Init {
    pub model: Option<String>,
    pub tools: Vec<String>,
    pub session_id: Option<String>,
    pub mcp_servers: Vec<Value>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct AssistantMessage {
    /// The API message id; one message may come as several events (one per block).
    pub id: Option<String>,
    pub model: Option<String>,
    pub content: Vec<ContentBlock>,
    pub usage: Option<Usage>,
}

/// A content block of a message.
#[derive(Clone, Debug, PartialEq)]
pub enum ContentBlock {
    Text(String),
    Thinking(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
        is_error: bool,
    },
    Other(Value),
}

/// Token counts as the API reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Usage {
    pub fn tokens(&self) -> TokenUsage {
        TokenUsage {
            input: self.input_tokens,
            output: self.output_tokens,
            cache_read: self.cache_read_input_tokens,
            cache_creation: self.cache_creation_input_tokens,
        }
    }
}

/// The final `result` event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunResult {
    /// `success`, `error_max_turns`, `error_max_budget_usd`, `error_during_execution`, …
    pub subtype: String,
    pub is_error: bool,
    /// The HTTP status of the model API error that ended the run, if one did.
    pub api_error_status: Option<u16>,
    pub num_turns: Option<u32>,
    pub total_cost_usd: Option<f64>,
    pub duration_ms: Option<u64>,
    pub usage: Option<Usage>,
    /// The final text (or the error message).
    pub result: Option<String>,
}

/// Parses one line of the stream.
pub fn parse_line(line: &str) -> Result<StreamEvent, StreamJsonError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(StreamJsonError::TooLong(line.len()));
    }
    let value: Value = serde_json::from_str(line)?;
    let Some(kind) = value.get("type").and_then(Value::as_str) else {
        return Err(StreamJsonError::NoType);
    };
    Ok(match kind {
        "system" => {
            let subtype = str_field(&value, "subtype").unwrap_or_default();
            if subtype == "init" {
                StreamEvent::Init(Init {
                    model: str_field(&value, "model"),
                    tools: value
                        .get("tools")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|t| t.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                    session_id: str_field(&value, "session_id"),
                    mcp_servers: value
                        .get("mcp_servers")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                })
            } else {
                StreamEvent::System {
                    subtype,
                    raw: value,
                }
            }
        }
        "assistant" => {
            let message = value.get("message").cloned().unwrap_or(Value::Null);
            StreamEvent::Assistant(AssistantMessage {
                id: str_field(&message, "id"),
                model: str_field(&message, "model"),
                content: blocks(message.get("content")),
                usage: message
                    .get("usage")
                    .and_then(|u| Usage::deserialize(u).ok()),
            })
        }
        "user" => StreamEvent::User {
            content: blocks(value.get("message").and_then(|m| m.get("content"))),
        },
        "result" => StreamEvent::Result(RunResult {
            subtype: str_field(&value, "subtype").unwrap_or_default(),
            is_error: value
                .get("is_error")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            api_error_status: value
                .get("api_error_status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok()),
            num_turns: value
                .get("num_turns")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok()),
            total_cost_usd: value
                .get("total_cost_usd")
                .and_then(Value::as_f64)
                .filter(|c| c.is_finite() && *c >= 0.0),
            duration_ms: value.get("duration_ms").and_then(Value::as_u64),
            usage: value.get("usage").and_then(|u| Usage::deserialize(u).ok()),
            result: str_field(&value, "result"),
        }),
        _ => StreamEvent::Other(value),
    })
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Content blocks: a string is one text block; an array holds typed blocks.
fn blocks(content: Option<&Value>) -> Vec<ContentBlock> {
    match content {
        Some(Value::String(s)) => vec![ContentBlock::Text(s.clone())],
        Some(Value::Array(items)) => items.iter().map(block).collect(),
        _ => Vec::new(),
    }
}

fn block(b: &Value) -> ContentBlock {
    match b.get("type").and_then(Value::as_str) {
        Some("text") => ContentBlock::Text(str_field(b, "text").unwrap_or_default()),
        Some("thinking") => ContentBlock::Thinking(str_field(b, "thinking").unwrap_or_default()),
        Some("tool_use") => ContentBlock::ToolUse {
            id: str_field(b, "id").unwrap_or_default(),
            name: str_field(b, "name").unwrap_or_default(),
            input: b.get("input").cloned().unwrap_or(Value::Null),
        },
        Some("tool_result") => ContentBlock::ToolResult {
            tool_use_id: str_field(b, "tool_use_id").unwrap_or_default(),
            content: tool_result_text(b.get("content")),
            is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
        },
        _ => ContentBlock::Other(b.clone()),
    }
}

/// A tool result's content as text: a string, or the text parts of a block list.
fn tool_result_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// Cuts `text` to at most `max` characters, saying how much was left out.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((cut, _)) => {
            let rest = text[cut..].chars().count();
            format!("{}… [{rest} more characters]", &text[..cut])
        }
    }
}

impl StreamEvent {
    /// The records this event adds to the live stream: `(kind, data)` pairs.
    pub fn agent_events(&self) -> Vec<(&'static str, Value)> {
        match self {
            StreamEvent::Init(i) => vec![(
                "init",
                json!({ "model": i.model, "tools": i.tools, "session_id": i.session_id,
                        "mcp_servers": i.mcp_servers }),
            )],
            StreamEvent::System { subtype, raw } => {
                let mut data = Map::new();
                data.insert("subtype".into(), Value::String(subtype.clone()));
                for key in ["attempt", "max_retries", "error_status", "error"] {
                    if let Some(v) = raw.get(key) {
                        data.insert(key.into(), v.clone());
                    }
                }
                vec![("system", Value::Object(data))]
            }
            StreamEvent::Assistant(m) => m.content.iter().map(block_event).collect(),
            StreamEvent::User { content } => content.iter().map(block_event).collect(),
            StreamEvent::Result(r) => vec![(
                "result",
                json!({ "subtype": r.subtype, "is_error": r.is_error,
                        "api_error_status": r.api_error_status, "num_turns": r.num_turns,
                        "total_cost_usd": r.total_cost_usd, "duration_ms": r.duration_ms,
                        "usage": r.usage.map(|u| u.tokens()),
                        "result": r.result.as_deref().map(|t| truncate(t, MAX_TOOL_RESULT_CHARS)) }),
            )],
            StreamEvent::Other(v) => vec![(
                "other",
                json!({ "raw": truncate(&v.to_string(), MAX_TOOL_INPUT_CHARS) }),
            )],
        }
    }
}

fn block_event(b: &ContentBlock) -> (&'static str, Value) {
    match b {
        ContentBlock::Text(t) => (
            "text",
            json!({ "text": crate::bounded::truncate_bytes(t, crate::bounded::MAX_AGENT_TEXT_BYTES) }),
        ),
        ContentBlock::Thinking(t) => (
            "thinking",
            json!({ "text": crate::bounded::truncate_bytes(t, crate::bounded::MAX_AGENT_TEXT_BYTES) }),
        ),
        ContentBlock::ToolUse { id, name, input } => {
            let text = input.to_string();
            let input = if text.len() > MAX_TOOL_INPUT_CHARS {
                json!({ "truncated": truncate(&text, MAX_TOOL_INPUT_CHARS) })
            } else {
                input.clone()
            };
            (
                "tool_use",
                json!({ "id": id, "name": name, "input": input }),
            )
        }
        ContentBlock::ToolResult {
            tool_use_id,
            content,
            is_error,
        } => (
            "tool_result",
            json!({ "tool_use_id": tool_use_id, "is_error": is_error,
                    "content": truncate(content, MAX_TOOL_RESULT_CHARS) }),
        ),
        ContentBlock::Other(v) => (
            "other",
            json!({ "raw": truncate(&v.to_string(), MAX_TOOL_INPUT_CHARS) }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as Claude Code 2.1 prints them (shortened).
    const INIT: &str = r#"{"type":"system","subtype":"init","cwd":"/w","session_id":"s1","tools":["Bash","Edit"],"mcp_servers":[],"model":"claude-sonnet-4-5","permissionMode":"bypassPermissions","new_field":{"x":1}}"#;
    const TOOL_USE: &str = r#"{"type":"assistant","message":{"id":"msg_0","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"tool_use","id":"toolu_0","name":"Write","input":{"file_path":"a.txt","content":"hi"}}],"usage":{"input_tokens":1000,"output_tokens":1}},"parent_tool_use_id":null,"session_id":"s1"}"#;
    const TOOL_RESULT: &str = r#"{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_0","type":"tool_result","content":[{"type":"text","text":"File created"}],"is_error":false}]},"session_id":"s1"}"#;
    const RESULT: &str = r#"{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":362,"num_turns":3,"result":"All done.","total_cost_usd":0.018,"usage":{"input_tokens":3000,"cache_creation_input_tokens":0,"cache_read_input_tokens":5,"output_tokens":600,"server_tool_use":{}}}"#;

    #[test]
    fn parses_the_cli_s_events() {
        match parse_line(INIT).unwrap() {
            StreamEvent::Init(i) => {
                assert_eq!(i.model.as_deref(), Some("claude-sonnet-4-5"));
                assert_eq!(i.tools, vec!["Bash", "Edit"]);
            }
            other => panic!("{other:?}"),
        }
        match parse_line(TOOL_USE).unwrap() {
            StreamEvent::Assistant(m) => {
                assert_eq!(m.id.as_deref(), Some("msg_0"));
                assert_eq!(m.usage.unwrap().input_tokens, 1000);
                assert!(
                    matches!(&m.content[0], ContentBlock::ToolUse { name, .. } if name == "Write")
                );
            }
            other => panic!("{other:?}"),
        }
        match parse_line(TOOL_RESULT).unwrap() {
            StreamEvent::User { content } => assert_eq!(
                content[0],
                ContentBlock::ToolResult {
                    tool_use_id: "toolu_0".into(),
                    content: "File created".into(),
                    is_error: false
                }
            ),
            other => panic!("{other:?}"),
        }
        match parse_line(RESULT).unwrap() {
            StreamEvent::Result(r) => {
                assert_eq!(r.subtype, "success");
                assert_eq!(r.num_turns, Some(3));
                assert_eq!(r.total_cost_usd, Some(0.018));
                assert_eq!(r.usage.unwrap().tokens().cache_read, 5);
                assert_eq!(r.api_error_status, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_types_and_blocks_are_kept() {
        let e = parse_line(r#"{"type":"stream_event","event":{"a":1}}"#).unwrap();
        assert!(matches!(e, StreamEvent::Other(_)));
        let e = parse_line(
            r#"{"type":"assistant","message":{"content":[{"type":"server_tool_use","id":"x"}]}}"#,
        )
        .unwrap();
        let records = e.agent_events();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].0, "other");
        let retry =
            parse_line(r#"{"type":"system","subtype":"api_retry","attempt":1,"error_status":529}"#)
                .unwrap();
        assert_eq!(retry.agent_events()[0].1["error_status"], 529);
    }

    #[test]
    fn bad_lines_are_errors_not_panics() {
        assert!(matches!(
            parse_line("Could not parse message into JSON"),
            Err(StreamJsonError::NotJson(_))
        ));
        assert!(matches!(parse_line("[1,2]"), Err(StreamJsonError::NoType)));
        assert!(matches!(parse_line("{}"), Err(StreamJsonError::NoType)));
        let e = parse_line(r#"{"type":"result","num_turns":-4,"total_cost_usd":"x"}"#).unwrap();
        assert!(matches!(
            e,
            StreamEvent::Result(RunResult {
                num_turns: None,
                total_cost_usd: None,
                ..
            })
        ));
    }

    #[test]
    fn records_cut_long_tool_output() {
        let long = "x".repeat(MAX_TOOL_RESULT_CHARS + 10);
        let line = json!({"type":"user","message":{"content":[
            {"type":"tool_result","tool_use_id":"t","content": long}]}})
        .to_string();
        let records = parse_line(&line).unwrap().agent_events();
        let content = records[0].1["content"].as_str().unwrap();
        assert!(content.ends_with("[10 more characters]"));
        assert_eq!(truncate("héllo", 2), "hé… [3 more characters]");
        assert_eq!(truncate("ok", 5), "ok");
    }

    #[test]
    fn records_cut_long_text_and_thinking() {
        let long = "y".repeat(1 << 20);
        let line = json!({"type":"assistant","message":{"content":[
            {"type":"text","text": long}, {"type":"thinking","thinking": long}]}})
        .to_string();
        let records = parse_line(&line).unwrap().agent_events();
        assert_eq!(records.len(), 2);
        for (_, data) in records {
            let text = data["text"].as_str().unwrap();
            assert!(
                text.len() < 2 * crate::bounded::MAX_AGENT_TEXT_BYTES,
                "{}",
                text.len()
            );
            assert!(crate::bounded::is_truncated(text));
        }
    }
}
