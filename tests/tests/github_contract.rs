//! The project checked against GitHub's own descriptions (`@octokit/openapi` and
//! `@octokit/openapi-webhooks`, installed by `make deps-test`):
//! - the fake GitHub's contract check refuses what GitHub would (so the GitHub tests,
//!   which all run through it, show every request of the project is a described one);
//! - every webhook field the project reads is in GitHub's schema of each event it handles,
//!   printed as a count;
//! - a delivery with every field the schema lets be absent left out is still accepted.
//!
//! Without the descriptions (a plain `cargo test` in a clone without `make deps-test`),
//! each test says so in one line and checks nothing.

use ao_tests::fake_github::openapi::{self, describes, strip_optional, webhook_schema};
use ao_tests::fake_github::{sign, FakeGithub, WEBHOOK_SECRET};
use ao_tests::Cluster;
use serde_json::{json, Value};
use std::path::PathBuf;

#[test]
fn the_contract_check_refuses_what_github_would() {
    let Some(api) = openapi::rest() else { return };
    let (op, params) = api
        .find("POST", "/repos/acme/app/issues/12/comments")
        .expect("creating a comment is described");
    assert_eq!(op.id, "issues/create-comment");
    assert_eq!(params["issue_number"], "12");
    assert!(api
        .check_request(op, &[], Some(&json!({ "body": "hi" })))
        .is_empty());
    // A missing required field, a wrong type, an unknown query parameter.
    assert!(!api.check_request(op, &[], Some(&json!({}))).is_empty());
    assert!(!api
        .check_request(op, &[], Some(&json!({ "body": 5 })))
        .is_empty());
    assert!(!api
        .check_request(
            op,
            &[("page".into(), "2".into())],
            Some(&json!({ "body": "hi" }))
        )
        .is_empty());
    // The App's deliveries are paged by cursor, not by page number.
    let (deliveries, _) = api.find("GET", "/app/hook/deliveries").unwrap();
    assert!(!api
        .check_request(deliveries, &[("page".into(), "2".into())], None)
        .is_empty());
    assert!(api
        .check_request(deliveries, &[("cursor".into(), "v1_2".into())], None)
        .is_empty());
    // Nothing at an undescribed path.
    assert!(api.find("GET", "/repos/acme/app/no-such-thing").is_none());
    // An answer with a field of the wrong type is caught, even once completed.
    let (get_issue, _) = api.find("GET", "/repos/acme/app/issues/1").unwrap();
    let mut answer = json!({ "number": "one", "title": "t", "state": "open" });
    api.complete(get_issue, 200, &mut answer);
    assert!(!api.check_response(get_issue, 200, &answer).is_empty());
    let mut answer = json!({ "number": 1, "title": "t", "state": "open",
                             "user": { "login": "alice" }, "labels": [{ "name": "agent" }] });
    api.complete(get_issue, 200, &mut answer);
    let errors = api.check_response(get_issue, 200, &answer);
    assert!(errors.is_empty(), "{errors:#?}");
}

/// The webhooks the project handles: (event, action, schema name in
/// `@octokit/openapi-webhooks`). `issues.closed` has no published example: the
/// `reopened` one is sent as `closed`.
const HANDLED: &[(&str, &str, &str)] = &[
    ("issues", "labeled", "issues-labeled"),
    ("issues", "unlabeled", "issues-unlabeled"),
    ("issues", "closed", "issues-closed"),
    ("issues", "reopened", "issues-reopened"),
    ("issue_comment", "created", "issue-comment-created"),
    (
        "pull_request_review",
        "submitted",
        "pull-request-review-submitted",
    ),
    (
        "pull_request_review_comment",
        "created",
        "pull-request-review-comment-created",
    ),
    ("check_run", "completed", "check-run-completed"),
    ("check_suite", "completed", "check-suite-completed"),
    ("status", "-", "status"),
    ("installation", "created", "installation-created"),
    ("installation", "deleted", "installation-deleted"),
    (
        "installation_repositories",
        "added",
        "installation-repositories-added",
    ),
    (
        "installation_repositories",
        "removed",
        "installation-repositories-removed",
    ),
];

/// Every field the coordinator reads from a webhook payload, by event (or by webhook, for
/// a field read for some actions only): the fields of the `Raw*` payload structs of
/// `coordinator/src/webhook/event.rs` (kept in step with them).
const READ: &[(&str, &[&str])] = &[
    (
        "issues",
        &[
            "action",
            "issue.number",
            "issue.title",
            "issue.body",
            "issue.pull_request",
            "issue.labels[].name",
            "issue.state",
            "issue.user.login",
            "issue.user.type",
            "repository.name",
            "repository.owner.login",
            "repository.default_branch",
            "sender.login",
            "sender.type",
            "installation.id",
        ],
    ),
    ("issues-labeled", &["label.name"]),
    ("issues-unlabeled", &["label.name"]),
    (
        "issue_comment",
        &[
            "action",
            "issue.number",
            "issue.title",
            "issue.body",
            "issue.pull_request",
            "issue.labels[].name",
            "issue.state",
            "issue.user.login",
            "issue.user.type",
            "comment.id",
            "comment.body",
            "repository.name",
            "repository.owner.login",
            "repository.default_branch",
            "sender.login",
            "sender.type",
            "installation.id",
        ],
    ),
    (
        "pull_request_review",
        &[
            "action",
            "review.state",
            "review.body",
            "pull_request.number",
            "pull_request.head.ref",
            "pull_request.user.login",
            "pull_request.user.type",
            "repository.name",
            "repository.owner.login",
            "repository.default_branch",
            "sender.login",
            "sender.type",
            "installation.id",
        ],
    ),
    (
        "pull_request_review_comment",
        &[
            "action",
            "comment.body",
            "comment.path",
            "comment.line",
            "pull_request.number",
            "pull_request.head.ref",
            "pull_request.user.login",
            "pull_request.user.type",
            "repository.name",
            "repository.owner.login",
            "repository.default_branch",
            "sender.login",
            "sender.type",
            "installation.id",
        ],
    ),
    (
        "check_run",
        &[
            "action",
            "check_run.check_suite.head_branch",
            "check_run.check_suite.pull_requests[].head.ref",
            "check_run.pull_requests[].head.ref",
            "repository.name",
            "repository.owner.login",
            "repository.default_branch",
            "sender.login",
            "sender.type",
            "installation.id",
        ],
    ),
    (
        "check_suite",
        &[
            "action",
            "check_suite.head_branch",
            "check_suite.pull_requests[].head.ref",
            "repository.name",
            "repository.owner.login",
            "repository.default_branch",
            "sender.login",
            "sender.type",
            "installation.id",
        ],
    ),
    (
        "status",
        &[
            "state",
            "branches[].name",
            "repository.name",
            "repository.owner.login",
            "repository.default_branch",
            "sender.login",
            "sender.type",
            "installation.id",
        ],
    ),
    (
        "installation",
        &["action", "installation.id", "installation.account.login"],
    ),
    (
        "installation_repositories",
        &[
            "installation.id",
            "installation.account.login",
            "repositories_added[].full_name",
            "repositories_removed[].full_name",
        ],
    ),
];

#[test]
fn every_webhook_field_the_project_reads_is_in_githubs_schemas() {
    let Some(doc) = openapi::webhook_schemas() else {
        return;
    };
    let mut checked = 0;
    let mut missing = Vec::new();
    for (event, fields) in READ {
        for (_, _, name) in HANDLED
            .iter()
            .filter(|(e, _, name)| e == event || name == event)
        {
            let schema = webhook_schema(doc, name).unwrap_or_else(|| panic!("no webhook {name}"));
            for field in *fields {
                checked += 1;
                if !describes(doc, schema, field) {
                    missing.push(format!("{name}: {field}"));
                }
            }
        }
    }
    let by_event: usize = READ.iter().map(|(_, f)| f.len()).sum();
    let distinct: std::collections::BTreeSet<&str> =
        READ.iter().flat_map(|(_, f)| f.iter().copied()).collect();
    println!(
        "webhook fields read: {} distinct paths, {by_event} (event, field) pairs over {} \
         webhooks; {checked} (webhook, field) checks against @octokit/openapi-webhooks; not \
         in the schemas: {}",
        distinct.len(),
        HANDLED.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "{missing:#?}");
}

fn examples() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("github-examples/node_modules/@octokit/webhooks-examples/api.github.com/index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `npm ci --prefix tests/github-examples` (make test does)",
            path.display()
        )
    });
    serde_json::from_str::<Vec<Value>>(&text).expect("the examples are JSON")
}

/// GitHub's published example of `event`.`action` (for `issues.closed`, the
/// `reopened` one turned into a close).
fn example(all: &[Value], event: &str, action: &str) -> Value {
    let (want, closed) = match (event, action) {
        ("issues", "closed") => ("reopened", true),
        _ => (action, false),
    };
    let group = all
        .iter()
        .find(|g| g["name"] == event)
        .unwrap_or_else(|| panic!("no examples of {event}"));
    let mut e = group["examples"]
        .as_array()
        .expect("examples are a list")
        .iter()
        .find(|e| e["action"].as_str().unwrap_or("-") == want)
        .unwrap_or_else(|| panic!("no example of {event}.{want}"))
        .clone();
    if closed {
        e["action"] = json!("closed");
        e["issue"]["state"] = json!("closed");
    }
    e
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_without_the_fields_its_schema_lets_be_absent_is_accepted() {
    let Some(doc) = openapi::webhook_schemas() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    let mut env = fake.settings();
    env.push(("AO__GITHUB__RECONCILE_SECS".into(), "0".into()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    c.start_in_process().await.unwrap();
    let all = examples();
    let mut sent = 0;
    for (i, (event, action, name)) in HANDLED.iter().enumerate() {
        let schema = webhook_schema(doc, name).unwrap();
        let full = example(&all, event, action);
        let mut least = full.clone();
        strip_optional(doc, schema, &mut least);
        assert_ne!(least, full, "{name}: nothing optional was left out");
        let body = least.to_string();
        let r = c
            .http
            .post(c.url("/webhooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", *event)
            .header("x-github-delivery", format!("least-{i}"))
            .header("x-hub-signature-256", sign(WEBHOOK_SECRET, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let answer = r.text().await.unwrap_or_default();
        assert!(
            status == 200 || status == 202,
            "{name} without its optional fields: {status} {answer}\npayload: {least:#}\n{}",
            c.coordinator_log()
        );
        sent += 1;
    }
    println!("{sent} webhooks sent with only the fields their schema requires: all accepted");
}
