//! The webhook edge against the coordinator, in-process: secrets, signatures, body limit,
//! replayed deliveries, permissions, bots, malformed payloads — with the fake GitHub
//! answering the coordinator's API calls.

use ao_tests::fake_github::{sign, FakeGithub, BOT_LOGIN, WEBHOOK_SECRET};
use ao_tests::Cluster;
use serde_json::{json, Value};
use std::time::Duration;

const REPO: &str = "acme/widgets";

fn cluster(fake: &FakeGithub) -> Cluster {
    let mut env = fake.settings();
    env.push(("AO__GITHUB__RECONCILE_SECS".into(), "0".into()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Cluster::new(&refs)
}

async fn post(
    c: &Cluster,
    event: &str,
    delivery: &str,
    body: &[u8],
    signature: Option<String>,
) -> (u16, Value) {
    let mut req = c
        .http
        .post(c.url("/webhooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .body(body.to_vec());
    if let Some(s) = signature {
        req = req.header("x-hub-signature-256", s);
    }
    let r = req.send().await.expect("test setup");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Sends only the head of a request whose declared body is above the limit.
async fn declared_too_large(c: &Cluster) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", c.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: issues\r\nX-GitHub-Delivery: big-1\r\n\
         X-Hub-Signature-256: sha256={}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        "0".repeat(64),
        26 * 1024 * 1024
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn labeled(issue: u64, sender: &str, sender_type: &str) -> Value {
    json!({
        "action": "labeled",
        "label": { "name": "agent" },
        "issue": { "number": issue, "title": "Add a note", "body": "b", "labels": [{"name": "agent"}] },
        "repository": { "name": "widgets", "full_name": REPO, "owner": { "login": "acme" },
                        "default_branch": "main" },
        "sender": { "login": sender, "type": sender_type },
        "installation": { "id": 7 }
    })
}

async fn tasks(c: &Cluster) -> Vec<Value> {
    let (_, list) = c.get_json("/api/v1/tasks").await.expect("test setup");
    list["tasks"].as_array().cloned().unwrap_or_default()
}

async fn setup() -> (tempfile::TempDir, FakeGithub, Cluster) {
    let tmp = tempfile::tempdir().expect("test setup");
    let fake = FakeGithub::start(tmp.path(), 4242)
        .await
        .expect("test setup");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    fake.set_role(REPO, "rita", "read");
    let mut c = cluster(&fake);
    fake.set_webhook(&c.url("/webhooks/github"), WEBHOOK_SECRET);
    c.start_in_process().await.expect("test setup");
    (tmp, fake, c)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_secret_every_delivery_is_refused_with_the_reason() {
    let mut c = Cluster::new(&[]);
    c.start_in_process().await.unwrap();
    let body = br#"{"zen":"Design for failure."}"#;
    let (status, err) = post(&c, "ping", "d-1", body, Some(sign("x", body))).await;
    assert_eq!(status, 401, "{err}");
    assert_eq!(err["code"], "webhooks_disabled");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("github.webhook_secret"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_limits_and_malformed_payloads() {
    let (_tmp, _fake, c) = setup().await;
    let body = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let (status, v) = post(&c, "ping", "p-1", body, Some(sign(WEBHOOK_SECRET, body))).await;
    assert_eq!(status, 200, "{v}");

    // Missing and wrong signatures.
    let (status, v) = post(&c, "ping", "p-2", body, None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("bad_signature")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("missing"), "{v}");
    let (status, _) = post(&c, "ping", "p-3", body, Some(sign("not-the-secret", body))).await;
    assert_eq!(status, 401);
    // A signature over a different body.
    let (status, _) = post(&c, "ping", "p-4", b"{}", Some(sign(WEBHOOK_SECRET, body))).await;
    assert_eq!(status, 401);

    // A body above GitHub's 25 MB cap is refused from its declared length, before it is
    // read (raw HTTP, so that the early answer is read rather than racing the upload).
    let (status, v) = declared_too_large(&c).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["code"], "payload_too_large");
    // And one that is sent whole (no declared length given to the check) is cut at the limit.
    let big = vec![b' '; 26 * 1024 * 1024];
    // Its own client: the server closes that connection after answering early.
    let own = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let sent = own
        .post(c.url("/webhooks/github"))
        .header("x-github-event", "issues")
        .header("x-github-delivery", "big-2")
        .header("x-hub-signature-256", sign(WEBHOOK_SECRET, &big))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(
            big.chunks(1024 * 1024)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        )))
        .send()
        .await;
    // The server answers 413 as soon as the limit is passed; the client may still be
    // writing and see the connection closed instead.
    if let Ok(r) = sent {
        assert_eq!(r.status().as_u16(), 413);
    }

    // Verified, but not a payload of its event type: 400, never 500.
    for bad in [&b"not json"[..], b"{}", br#"{"action":"labeled"}"#] {
        let (status, v) = post(&c, "issues", "bad-1", bad, Some(sign(WEBHOOK_SECRET, bad))).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["code"], "malformed_payload");
    }
    // Events we do not handle are acknowledged.
    let star = br#"{"action":"created"}"#;
    let (status, v) = post(&c, "star", "s-1", star, Some(sign(WEBHOOK_SECRET, star))).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("ignored")),
        "{v}"
    );

    let metrics = c.metrics().await.unwrap();
    assert!(
        metrics.contains("ao_webhook_deliveries_total{event=\"ping\",result=\"bad_signature\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("ao_webhook_deliveries_total{event=\"issues\",result=\"too_large\"}"));
    assert!(metrics.contains("ao_github_rate_limit_remaining"));
    assert!(metrics.contains("ao_budget_used_ratio"));
    assert!(metrics.contains("ao_github_api_calls_total"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_delivery_creates_nothing_twice() {
    let (_tmp, fake, c) = setup().await;
    let issue = fake.open_issue(REPO, "Add a note", "b", "alice");
    let body = labeled(issue, "alice", "User").to_string();
    let sig = sign(WEBHOOK_SECRET, body.as_bytes());
    for i in 0..3 {
        let (status, v) = post(
            &c,
            "issues",
            "same-delivery",
            body.as_bytes(),
            Some(sig.clone()),
        )
        .await;
        assert_eq!(status, 202, "{v}");
        // The repeats are known from the stored inbox at once.
        let expected = if i == 0 { "accepted" } else { "duplicate" };
        assert_eq!(v["status"], expected, "{v}");
    }
    // The first made a task (its progress comment shows up on the fake).
    fake.wait_for("the progress comment", Duration::from_secs(30), |m| {
        m.comments_on(REPO, issue)
            .iter()
            .any(|c| c.user == BOT_LOGIN)
    })
    .await
    .unwrap();
    // The first was handled; the repeats were never processed.
    let handled = r#"ao_webhook_deliveries_total{event="issues",result="handled"}"#;
    let duplicate = r#"ao_webhook_deliveries_total{event="issues",result="duplicate"}"#;
    assert_eq!(c.metric(handled).await.unwrap(), 1.0);
    assert_eq!(c.metric(duplicate).await.unwrap(), 2.0);
    assert_eq!(tasks(&c).await.len(), 1);
    let ours = fake.model().comments_on(REPO, issue);
    assert_eq!(ours.iter().filter(|c| c.user == BOT_LOGIN).count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_is_told_once_and_a_bot_not_allowed_is_told_why_nothing_runs() {
    let (_tmp, fake, c) = setup().await;
    let issue = fake.open_issue(REPO, "Do something", "b", "rita");
    // A user with read access labels it, twice.
    assert_eq!(fake.label_issue(REPO, issue, "agent", "rita").await, 202);
    let m = fake
        .wait_for("the explanatory comment", Duration::from_secs(30), |m| {
            !m.comments_on(REPO, issue).is_empty()
        })
        .await
        .unwrap();
    let comments = m.comments_on(REPO, issue);
    assert_eq!(comments.len(), 1);
    assert!(comments[0].body.contains("@rita"), "{}", comments[0].body);
    assert!(comments[0].body.contains("`read`"), "{}", comments[0].body);
    assert_eq!(fake.label_issue(REPO, issue, "agent", "rita").await, 202);
    // A bot's command.
    assert_eq!(
        fake.comment(REPO, issue, "/agent run", "other-app[bot]")
            .await,
        202
    );
    // And a write user's unknown command, answered: a marker that everything before was handled.
    assert_eq!(
        fake.comment(REPO, issue, "/agent dance", "alice").await,
        202
    );
    let m = fake
        .wait_for("the unknown-command answer", Duration::from_secs(30), |m| {
            m.comments_on(REPO, issue)
                .iter()
                .any(|c| c.user == BOT_LOGIN && c.body.contains("Unknown command"))
        })
        .await
        .unwrap();
    let bot_comments: Vec<_> = m
        .comments_on(REPO, issue)
        .into_iter()
        .filter(|c| c.user == BOT_LOGIN)
        .collect();
    assert_eq!(bot_comments.len(), 3, "{bot_comments:#?}");
    assert!(
        bot_comments[1].body.contains("`other-app[bot]`")
            && bot_comments[1].body.contains("github.allowed_bots"),
        "{bot_comments:#?}"
    );
    assert!(tasks(&c).await.is_empty(), "no task may start");
    // Both comments (the bot's and alice's) were handled and answered.
    let handled = r#"ao_webhook_deliveries_total{event="issue_comment",result="handled"}"#;
    assert_eq!(c.metric(handled).await.unwrap(), 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_cancel_and_retry_the_issue_task() {
    let (_tmp, fake, c) = setup().await;
    let issue = fake.open_issue(REPO, "Cancel me", "b", "alice");
    assert_eq!(fake.comment(REPO, issue, "/agent run", "alice").await, 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tasks(&c).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no task started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fake.comment(REPO, issue, "/agent cancel", "alice").await,
        202
    );
    let id = tasks(&c).await[0]["id"].as_str().unwrap().to_string();
    c.wait_for_status(&id, &["cancelled"], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        fake.comment(REPO, issue, "/agent retry", "alice").await,
        202
    );
    c.wait_for_status(&id, &["queued", "running"], Duration::from_secs(30))
        .await
        .unwrap();
    // Closing the issue cancels it again.
    let mut payload = labeled(issue, "alice", "User");
    payload["action"] = json!("closed");
    assert_eq!(fake.deliver("issues", payload).await, 202);
    c.wait_for_status(&id, &["cancelled"], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(tasks(&c).await.len(), 1);
}
