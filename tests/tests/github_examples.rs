//! Every example payload of every event type from `@octokit/webhooks-examples` (GitHub's
//! own shapes), signed and sent through the coordinator's webhook endpoint (in-process): the
//! events we handle are accepted (or acknowledged when the action is not ours), all the
//! others acknowledged and ignored, and none is refused as malformed or fails with 5xx.

use ao_tests::fake_github::{sign, FakeGithub, WEBHOOK_SECRET};
use ao_tests::Cluster;
use serde_json::Value;
use std::path::PathBuf;

/// Event types the coordinator acts on.
const HANDLED: &[&str] = &[
    "issues",
    "issue_comment",
    "pull_request_review",
    "pull_request_review_comment",
    "installation",
    "installation_repositories",
    "check_run",
    "check_suite",
    "status",
    "ping",
];

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

#[tokio::test(flavor = "multi_thread")]
async fn every_published_example_is_handled_or_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    let mut env = fake.settings();
    env.push(("AO__GITHUB__RECONCILE_SECS".into(), "0".into()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    c.start_in_process().await.unwrap();

    let mut seen_events = 0;
    let mut sent = 0;
    let mut accepted = 0;
    let mut times = Vec::new();
    for group in examples() {
        let event = group["name"].as_str().unwrap().to_string();
        seen_events += 1;
        for (i, example) in group["examples"].as_array().unwrap().iter().enumerate() {
            let body = example.to_string();
            let started = std::time::Instant::now();
            let r = c
                .http
                .post(c.url("/webhooks/github"))
                .header("content-type", "application/json")
                .header("x-github-event", &event)
                .header("x-github-delivery", format!("{event}-{i}"))
                .header("x-hub-signature-256", sign(WEBHOOK_SECRET, body.as_bytes()))
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            times.push(started.elapsed());
            sent += 1;
            let action = example["action"].as_str().unwrap_or("-");
            assert!(
                status < 500,
                "{event}.{action} #{i}: {status} {v}\n{}",
                c.coordinator_log()
            );
            if HANDLED.contains(&event.as_str()) {
                assert!(
                    status == 200 || status == 202,
                    "{event}.{action} #{i} is a real payload but got {status} {v}"
                );
                if status == 202 {
                    accepted += 1;
                }
            } else {
                assert_eq!(status, 200, "{event}.{action} #{i}: {v}");
                assert_eq!(v["status"], "ignored", "{event}.{action} #{i}: {v}");
            }
        }
    }
    times.sort();
    eprintln!(
        "webhook answer time over {} deliveries: median {:?}, p99 {:?}, max {:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times[times.len() - 1]
    );
    assert!(
        seen_events >= 50,
        "only {seen_events} event types in the examples"
    );
    assert!(sent >= 300, "only {sent} examples");
    // labeled, unlabeled, closed, reopened, review and installation examples are queued.
    assert!(accepted >= 15, "only {accepted} examples were accepted");
    // The coordinator is still healthy and answered nothing with 5xx.
    let metrics = c.metrics().await.unwrap();
    assert!(
        !metrics.contains("route=\"/webhooks/github\",status=\"5"),
        "{metrics}"
    );
    assert!(c
        .http
        .get(c.url("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        .is_success());
}
