//! Hostile input on the queue message decoders: arbitrary bytes, arbitrary JSON, and
//! structurally valid messages with fields replaced by anything decode to `Ok` or a typed
//! error, never a panic; oversize bodies are refused before they are parsed; whatever
//! decodes encodes back to the same message.

use ao_shared::message::{DecodeError, ResultMessage, SubtaskMessage, MAX_MESSAGE_BYTES};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        Just(json!("00000000-0000-0000-0000-000000000000")),
        Just(json!("2026-01-01T00:00:00Z")),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn subtask_sample() -> Value {
    json!({
        "version": 1, "kind": "subtask",
        "task_id": "0190a0a0-0000-7000-8000-000000000001",
        "subtask_id": "0190a0a0-0000-7000-8000-000000000002",
        "attempt": 1, "capability": "coder",
        "repository": "/srv/git/p.git", "branch": "agent/x",
        "title": "t", "prompt": "do it",
        "enqueued_at": "2026-01-01T00:00:00Z"
    })
}

fn finished_sample() -> Value {
    json!({
        "version": 1, "kind": "finished",
        "task_id": "0190a0a0-0000-7000-8000-000000000001",
        "subtask_id": "0190a0a0-0000-7000-8000-000000000002",
        "attempt": 2, "worker": "w-1",
        "outcome": { "kind": "succeeded", "summary": "ok", "commit": "abc",
                     "cost_usd": 0.5, "tokens": { "input": 1, "output": 2,
                     "cache_read": 3, "cache_creation": 4 }, "duration_ms": 10 },
        "at": "2026-01-01T00:00:00Z"
    })
}

fn events_sample() -> Value {
    json!({
        "version": 1, "kind": "events",
        "task_id": "0190a0a0-0000-7000-8000-000000000001",
        "subtask_id": "0190a0a0-0000-7000-8000-000000000002",
        "attempt": 1,
        "events": [ { "at": "2026-01-01T00:00:00Z", "kind": "text", "data": { "t": "x" } } ]
    })
}

/// Decodes with both decoders; a decoded message must survive a round trip.
fn check(text: &str) {
    if let Ok(m) = SubtaskMessage::decode(text) {
        let again = m.encode().expect("a decoded message encodes");
        assert_eq!(SubtaskMessage::decode(&again).expect("round trip"), m);
    }
    if let Ok(m) = ResultMessage::decode(text) {
        if let Ok(again) = m.encode() {
            assert_eq!(ResultMessage::decode(&again).expect("round trip"), m);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_strings_never_panic(text in ".{0,512}") {
        check(&text);
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        check(&value.to_string());
        // …also with a valid version in front of it.
        if let Value::Object(mut map) = value {
            map.insert("version".into(), json!(1));
            check(&Value::Object(map).to_string());
        }
    }

    /// Valid messages with one field replaced, removed, or one field added.
    #[test]
    fn valid_messages_with_a_wrong_field_never_panic(
        which in 0usize..3,
        field in 0usize..16,
        replacement in any_json(),
        remove in any::<bool>(),
    ) {
        let mut sample = [subtask_sample(), finished_sample(), events_sample()][which].clone();
        let map = sample.as_object_mut().expect("object");
        let keys: Vec<String> = map.keys().cloned().collect();
        let key = keys[field % keys.len()].clone();
        if remove {
            map.remove(&key);
        } else {
            map.insert(key, replacement.clone());
        }
        check(&sample.to_string());
        // Nested: the outcome of a result.
        let mut finished = finished_sample();
        finished["outcome"]["kind"] = replacement.clone();
        check(&finished.to_string());
        finished["outcome"] = replacement;
        check(&finished.to_string());
    }

    #[test]
    fn unknown_versions_are_typed_errors(version in any::<u64>().prop_filter("not 1", |v| *v != 1)) {
        let mut m = subtask_sample();
        m["version"] = json!(version);
        let err = SubtaskMessage::decode(&m.to_string()).expect_err("unknown version");
        let typed = matches!(err, DecodeError::UnsupportedVersion { found } if found == version);
        prop_assert!(typed, "{}", err);
    }
}

#[test]
fn the_samples_are_valid() {
    // Otherwise the properties above would test nothing but rejections.
    assert!(SubtaskMessage::decode(&subtask_sample().to_string()).is_ok());
    assert!(ResultMessage::decode(&finished_sample().to_string()).is_ok());
    assert!(ResultMessage::decode(&events_sample().to_string()).is_ok());
}

#[test]
fn oversize_bodies_are_refused_before_parsing() {
    // Deep nesting or a huge array would cost time and memory to parse; the size check
    // comes first, so refusing it costs nothing.
    for body in [
        "[".repeat(MAX_MESSAGE_BYTES + 1),
        format!(
            "{{\"version\":1,\"pad\":\"{}\"}}",
            "x".repeat(MAX_MESSAGE_BYTES)
        ),
        "1,".repeat(MAX_MESSAGE_BYTES),
    ] {
        let t = Instant::now();
        assert!(matches!(
            SubtaskMessage::decode(&body),
            Err(DecodeError::TooLarge(n)) if n == body.len()
        ));
        assert!(matches!(
            ResultMessage::decode(&body),
            Err(DecodeError::TooLarge(_))
        ));
        // Not a timing target: a check that no parse of 200 KiB+ happened at all.
        assert!(t.elapsed().as_secs() < 5);
    }
}

#[test]
fn deep_nesting_within_the_limit_is_an_error_not_a_stack_overflow() {
    let body = format!(
        "{{\"version\":1,\"x\":{}{}}}",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    assert!(body.len() <= MAX_MESSAGE_BYTES);
    assert!(SubtaskMessage::decode(&body).is_err());
    assert!(ResultMessage::decode(&body).is_err());
}
