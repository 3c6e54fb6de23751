//! Hostile input on the webhook edge (`webhook::event` and `webhook::signature`): any
//! event name with any bytes, and each handled event's payload with any field replaced,
//! removed or added, parses to an event, an "ignored", or a typed error, never a panic;
//! comment bodies of any text never panic the command finder; a signature verifies only
//! when it is the body's HMAC under the secret.

use crate::webhook::event::{parse, Command};
use crate::webhook::signature::verify;
use hmac::{Hmac, KeyInit, Mac};
use proptest::prelude::*;
use secrecy::SecretString;
use serde_json::{json, Map, Value};
use sha2::Sha256;

const EVENTS: [&str; 9] = [
    "ping",
    "issues",
    "issue_comment",
    "pull_request_review",
    "pull_request_review_comment",
    "installation",
    "installation_repositories",
    "push",
    "",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
        prop::sample::select(vec![
            "labeled",
            "unlabeled",
            "opened",
            "closed",
            "reopened",
            "created",
            "submitted",
            "approved",
            "changes_requested",
            "agent",
            "agent:coder",
            "/agent retry",
            "/agent cancel",
            "/agent approve",
            "@agent fix this",
            "deleted",
            "added",
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(".{0,10}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn repo() -> Value {
    json!({ "name": "project", "full_name": "octo/project", "owner": { "login": "octo" },
            "default_branch": "main" })
}

/// A payload that parses, for each handled event.
fn sample(event: &str) -> Value {
    let user = json!({ "login": "octocat", "type": "User" });
    let issue = json!({ "number": 7, "title": "Fix it", "body": "please",
                        "labels": [{ "name": "agent" }] });
    let pull = json!({ "number": 8, "head": { "ref": "agent/x" }, "user": user });
    let installation = json!({ "id": 42, "account": { "login": "octo" } });
    match event {
        "issues" => json!({ "action": "labeled", "issue": issue, "label": { "name": "agent" },
                            "repository": repo(), "sender": user, "installation": { "id": 42 } }),
        "issue_comment" => json!({ "action": "created", "issue": issue,
                                   "comment": { "id": 1, "body": "/agent retry" },
                                   "repository": repo(), "sender": user,
                                   "installation": { "id": 42 } }),
        "pull_request_review" => json!({ "action": "submitted",
                                         "review": { "state": "changes_requested", "body": "redo" },
                                         "pull_request": pull, "repository": repo(),
                                         "sender": user, "installation": { "id": 42 } }),
        "pull_request_review_comment" => json!({ "action": "created",
                                                 "comment": { "body": "@agent rename", "path": "a.rs", "line": 3 },
                                                 "pull_request": pull, "repository": repo(),
                                                 "sender": user, "installation": { "id": 42 } }),
        "installation" => json!({ "action": "created", "installation": installation }),
        "installation_repositories" => json!({ "action": "added", "installation": installation,
                                               "repositories_added": [{ "full_name": "octo/project" }],
                                               "repositories_removed": [] }),
        _ => json!({ "zen": "Keep it logically awesome.", "hook_id": 1 }),
    }
}

/// Replaces the value at a path of object keys chosen by `picks`, or removes it.
fn mutate(value: &mut Value, picks: &[usize], replacement: Value, remove: bool) {
    let mut at = value;
    for (depth, pick) in picks.iter().enumerate() {
        let Value::Object(map) = at else { return };
        if map.is_empty() {
            return;
        }
        let key = map
            .keys()
            .nth(pick % map.len())
            .cloned()
            .unwrap_or_default();
        let last = depth + 1 == picks.len() || !map[&key].is_object();
        if last {
            if remove {
                map.remove(&key);
            } else {
                map.insert(key, replacement);
            }
            return;
        }
        at = map.get_mut(&key).expect("key just listed");
    }
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[test]
fn the_samples_parse() {
    for event in EVENTS.iter().take(7) {
        let body = sample(event).to_string();
        assert!(parse(event, body.as_bytes()).is_ok(), "{event}: {body}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_event_with_any_bytes_never_panics(
        event in prop_oneof![prop::sample::select(EVENTS.to_vec()).prop_map(String::from), ".{0,20}"],
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let _ = parse(&event, &bytes);
    }

    #[test]
    fn any_json_for_a_handled_event_never_panics(
        event in prop::sample::select(EVENTS.to_vec()),
        value in any_json(),
    ) {
        let _ = parse(event, value.to_string().as_bytes());
    }

    #[test]
    fn valid_payloads_with_a_wrong_field_never_panic(
        event in prop::sample::select(EVENTS[..7].to_vec()),
        picks in prop::collection::vec(any::<usize>(), 1..4),
        replacement in any_json(),
        remove in any::<bool>(),
    ) {
        let mut payload = sample(event);
        mutate(&mut payload, &picks, replacement, remove);
        let _ = parse(event, payload.to_string().as_bytes());
    }

    #[test]
    fn command_finder_never_panics(body in "(.|\n){0,300}", prefix in prop::sample::select(vec!["", "/agent ", "@agent ", "/agent"])) {
        let _ = Command::find(&format!("{prefix}{body}"));
    }

    #[test]
    fn only_the_right_signature_verifies(
        body in prop::collection::vec(any::<u8>(), 0..512),
        header in prop_oneof![".{0,80}", "sha256=[0-9a-f]{0,70}"],
    ) {
        let secret = "s3cret";
        let secrets = vec![SecretString::from(secret.to_string())];
        let right = sign(secret, &body);
        prop_assert!(verify(&secrets, &body, Some(&right)).is_ok());
        prop_assert!(verify(&secrets, &body, None).is_err());
        if header.trim() != right {
            prop_assert!(verify(&secrets, &body, Some(&header)).is_err());
        }
        // Another secret never verifies.
        let other = vec![SecretString::from("other".to_string())];
        prop_assert!(verify(&other, &body, Some(&right)).is_err());
    }
}
