//! Hostile input on the stream-json parser (Claude Code's `--output-format stream-json`
//! lines): arbitrary strings and JSON of every shape parse to an event or a typed error,
//! never a panic; turning an event into live records never panics; over-long lines are
//! refused before they are parsed; `truncate` keeps to character boundaries.

use ao_shared::stream_json::{parse_line, truncate, StreamJsonError, MAX_LINE_BYTES};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        prop::sample::select(vec![
            "system",
            "init",
            "assistant",
            "user",
            "result",
            "text",
            "thinking",
            "tool_use",
            "tool_result",
            "success",
            "error_max_turns",
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(vec![
                        "type",
                        "subtype",
                        "message",
                        "content",
                        "usage",
                        "id",
                        "name",
                        "input",
                        "tool_use_id",
                        "is_error",
                        "result",
                        "num_turns",
                        "total_cost_usd",
                        "duration_ms",
                        "model",
                        "tools",
                        "session_id",
                        "mcp_servers",
                        "text",
                        "thinking",
                        "input_tokens",
                        "output_tokens",
                        "api_error_status",
                    ])
                    .prop_map(String::from),
                    ".{0,8}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Shapes close to what the CLI writes, with any value in any place.
fn event_like() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["system", "assistant", "user", "result", "other"]),
        any_json(),
        any_json(),
        any_json(),
    )
        .prop_map(|(kind, a, b, c)| {
            json!({
                "type": kind, "subtype": a.clone(),
                "message": { "id": "m", "content": [ { "type": "text", "text": b },
                              { "type": "tool_use", "id": "t", "name": "Bash", "input": c.clone() },
                              { "type": "tool_result", "tool_use_id": "t", "content": a } ],
                             "usage": c.clone() },
                "result": b, "usage": c, "num_turns": 3
            })
        })
}

fn check(line: &str) {
    if let Ok(event) = parse_line(line) {
        let _ = event.agent_events();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_strings_never_panic(line in ".{0,512}") {
        check(&line);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        check(&value.to_string());
    }

    #[test]
    fn event_shaped_json_parses_and_renders(value in event_like()) {
        // Every object with a string "type" is an event (unknown parts are kept, not refused).
        let event = parse_line(&value.to_string());
        prop_assert!(event.is_ok(), "{value}");
        let _ = event.map(|e| e.agent_events());
    }

    #[test]
    fn truncate_keeps_char_boundaries(text in ".{0,200}", max in 0usize..220) {
        let cut = truncate(&text, max);
        if text.chars().count() <= max {
            prop_assert_eq!(cut, text);
        } else {
            prop_assert!(cut.starts_with(&text.chars().take(max).collect::<String>()));
        }
    }
}

#[test]
fn over_long_lines_are_refused_before_parsing() {
    let line = "[".repeat(MAX_LINE_BYTES + 1);
    assert!(matches!(parse_line(&line), Err(StreamJsonError::TooLong(n)) if n == line.len()));
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let line = format!(
        "{{\"type\":\"x\",\"a\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(parse_line(&line).is_err());
}
