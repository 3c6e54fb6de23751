//! Durable webhook intake, in-process against the fake GitHub: a delivery answered 202 is
//! in the state store, so a handler error followed by a restart of the coordinator still
//! acts on it — once — and the same delivery sent again changes nothing.

use ao_tests::fake_github::{sign, Failure, FakeGithub, WEBHOOK_SECRET};
use ao_tests::Cluster;
use serde_json::Value;
use std::time::{Duration, Instant};

const REPO: &str = "acme/widgets";
const LIMIT: Duration = Duration::from_secs(60);

async fn tasks(c: &Cluster) -> Vec<Value> {
    let (_, list) = c.get_json("/api/v1/tasks").await.expect("task list");
    list["tasks"].as_array().cloned().unwrap_or_default()
}

async fn wait_until<F, Fut>(what: &str, c: &Cluster, mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + LIMIT;
    while !ok().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_whose_handling_failed_runs_once_after_a_restart_and_a_duplicate_changes_nothing()
{
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[]);
    c.start_in_process().await.unwrap();

    // The handler fails: GitHub refuses the permission check (a client error, so the
    // client does not retry it within the call).
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    fake.fail(
        "/collaborators/alice/permission",
        10_000,
        Failure::Unprocessable,
    );
    assert_eq!(fake.comment(REPO, issue, "/agent run", "alice").await, 202);
    let failed = r#"ao_webhook_deliveries_total{event="issue_comment",result="failed"}"#;
    wait_until("the handler error", &c, || async {
        c.metric(failed).await.unwrap_or(0.0) >= 1.0
    })
    .await;
    assert!(tasks(&c).await.is_empty());

    // Restart with GitHub well again: the delivery is acted on from the store.
    c.inproc.take().unwrap().stop().await.unwrap();
    fake.clear_faults();
    c.start_in_process().await.unwrap();
    wait_until("the task of the command", &c, || async {
        !tasks(&c).await.is_empty()
    })
    .await;
    let first = tasks(&c).await;
    assert_eq!(first.len(), 1, "{first:#?}");

    // GitHub sends the same delivery again: it is known, and nothing more happens.
    let m = fake.model();
    let d = m
        .deliveries
        .iter()
        .find(|d| d.event == "issue_comment")
        .expect("the command's delivery");
    let body = d.payload.to_string();
    let r = c
        .http
        .post(c.url("/webhooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "issue_comment")
        .header("x-github-delivery", &d.guid)
        .header("x-hub-signature-256", sign(WEBHOOK_SECRET, body.as_bytes()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["status"], "duplicate", "{answer}");
    let after = tasks(&c).await;
    assert_eq!(after.len(), 1, "{after:#?}");
    assert_eq!(after[0]["id"], first[0]["id"]);
    // The delivery is counted once handled, just after its task is stored.
    let handled = r#"ao_webhook_deliveries_total{event="issue_comment",result="handled"}"#;
    wait_until("the delivery counted as handled", &c, || async {
        c.metric(handled).await.unwrap_or(0.0) >= 1.0
    })
    .await;
    assert_eq!(c.metric(handled).await.unwrap(), 1.0);
    c.inproc.take().unwrap().stop().await.unwrap();
}

/// A delivery whose handling fails every time is tried `MAX_DELIVERY_ATTEMPTS` (6) times,
/// with a growing delay, and then kept as failed, visibly: five failed attempts and one
/// given up on the metric, and no task.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_that_always_fails_is_given_up_after_its_attempts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[("AO__GITHUB__DELIVERY_RETRY_MS", "40")]);
    c.start_in_process().await.unwrap();

    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    fake.fail(
        "/collaborators/alice/permission",
        10_000,
        Failure::Unprocessable,
    );
    assert_eq!(fake.comment(REPO, issue, "/agent run", "alice").await, 202);
    let given_up = r#"ao_webhook_deliveries_total{event="issue_comment",result="given_up"}"#;
    wait_until("the delivery given up", &c, || async {
        c.metric(given_up).await.unwrap_or(0.0) >= 1.0
    })
    .await;
    let failed = r#"ao_webhook_deliveries_total{event="issue_comment",result="failed"}"#;
    assert_eq!(
        c.metric(failed).await.unwrap(),
        5.0,
        "five attempts retried before the sixth gave up"
    );
    assert_eq!(c.metric(given_up).await.unwrap(), 1.0);
    assert!(tasks(&c).await.is_empty());
    c.inproc.take().unwrap().stop().await.unwrap();
}
