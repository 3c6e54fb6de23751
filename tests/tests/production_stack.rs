//! The production stack in one run: the GitHub App (the fake GitHub, real git over smart
//! HTTP), SQS + DynamoDB + Secrets Manager (moto_server; the App's private key and the
//! model key are read from Secrets Manager), two coordinator processes on that backend,
//! one worker per capability of a two-step pipeline (`code-review`: coder, reviewer) on
//! the `nomad` driver against the fake Nomad running the real sandbox job file under
//! bubblewrap, and the real Claude Code CLI against the scripted model.
//!
//! A labelled issue becomes a ready pull request holding the agent's commit, with the
//! cost in the progress comment. Then a second issue whose run outlives the installation
//! token, during which the coordinator holding the singleton leases and the coder worker
//! are killed (SIGKILL) and started again: the task still completes once, with one pull
//! request. Nothing the fake Nomad stores or serves, and no daemon log, holds a git
//! token, the model key or the App key.
//!
//! Every step of a task (webhook delivery, plan, queue, worker, Nomad allocation, result,
//! pull request) logs with the task's id as its trace id.
//!
//! Prints the figures of docs/benchmarks.md ("The production stack"): label → first model
//! request, label → pull request ready, and the lease takeover time.
//!
//! The test sets moto's dummy AWS credentials in its own environment (to put the secrets
//! into Secrets Manager), so it has a binary of its own.

// Test helpers may panic: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use ao_shared::aws::AwsClients;
use ao_shared::config::AwsSettings;
use ao_tests::fake_github::Model;
use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::moto::Moto;
use ao_tests::scenario::successes;
use ao_tests::stack::{NomadGithub, StackOptions, REPO};
use ao_tests::{free_port, git, Cluster};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);
const MODEL_KEY: &str = "sk-ant-prod-stack-0123456789abcdef";
/// What the fake GitHub's installation tokens live in the second part, in seconds.
const TOKEN_TTL_SECS: u64 = 6;
/// Lease settings of the two coordinators (as `tests/src/leases.rs`).
const LEASE_TTL_MS: u64 = 1500;
const LEASE_RENEW_MS: u64 = 300;

/// A writing turn of the coder: 50,000 input and 2,000 output tokens (at Sonnet's $3/$15
/// per million, $0.18), so the progress comment's cost is not rounded to $0.00.
fn write_turn(file: &str, text: &str, delay: Option<Duration>) -> Turn {
    let step = Step::tool("Write", json!({ "file_path": file, "content": text }));
    let step = match delay {
        Some(d) => Step::Delay(d, Box::new(step)),
        None => step,
    };
    Turn::new(step, 50_000, 2_000)
}

/// The coder's and the reviewer's conversations, chosen by their system prompts, and
/// the slow coder of the second issue, chosen by its issue text.
async fn model() -> ModelServer {
    let reviewer = vec![Turn::new(
        Step::text("APPROVE\n```json\n{\"verdict\": \"approve\"}\n```"),
        10_000,
        200,
    )];
    // In order: the first route that matches answers (a reviewer of the slow issue is
    // a reviewer first).
    ModelServer::start_routed(
        vec![Turn::new(Step::text("Nothing to do."), 10, 10)],
        vec![
            ("You are the reviewer step".into(), reviewer),
            ("SLOW-NOTE".into(), {
                let mut slow = vec![write_turn(
                    "SLOW.md",
                    "a slow note from claude\n",
                    Some(Duration::from_secs(2 * TOKEN_TTL_SECS)),
                )];
                slow.push(Turn::new(Step::text("Done: wrote SLOW.md."), 1_000, 100));
                slow
            }),
            (
                "You are the coder step".into(),
                vec![
                    write_turn("NOTE.md", "a note from claude\n", None),
                    Turn::new(Step::text("Done: wrote NOTE.md."), 1_000, 100),
                ],
            ),
        ],
    )
    .await
}

/// Puts the App's private key and the model key into Secrets Manager; returns the
/// settings that refer to them.
async fn secrets(moto: &Moto, app_key: &std::path::Path) -> Vec<(String, String)> {
    let env = moto.env("unused");
    for (k, v) in env.iter().filter(|(k, _)| k.starts_with("AWS_")) {
        std::env::set_var(k, v);
    }
    let settings = AwsSettings {
        endpoint_url: env
            .iter()
            .find(|(k, _)| k == "AO__AWS__ENDPOINT_URL")
            .map(|(_, v)| v.clone()),
        region: Some(ao_tests::moto::REGION.to_string()),
        ..AwsSettings::default()
    };
    let clients = AwsClients::from_settings(&settings, None).await;
    let suffix = free_port();
    let app_name = format!("prod/github-app-key-{suffix}");
    let model_name = format!("prod/model-key-{suffix}");
    for (name, value) in [
        (&app_name, std::fs::read_to_string(app_key).unwrap()),
        (&model_name, MODEL_KEY.to_string()),
    ] {
        clients
            .secrets
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await
            .unwrap();
    }
    vec![
        (
            "AO__GITHUB__PRIVATE_KEY".into(),
            format!("aws-sm:{app_name}"),
        ),
        ("AO__AGENT__API_KEY".into(), format!("aws-sm:{model_name}")),
    ]
}

/// A second coordinator replica of `c`: same settings and backend, its own port.
fn replica(c: &Cluster) -> Cluster {
    let port = free_port();
    let mut other = Cluster::new(&[]);
    other.env = c.env.clone();
    other.env.retain(|(k, _)| k != "AO__SERVER__LISTEN");
    other
        .env
        .push(("AO__SERVER__LISTEN".into(), format!("127.0.0.1:{port}")));
    other.port = port;
    other
}

/// Whether the coordinator of `c` holds the `recovery` lease, by its /metrics.
async fn holds_recovery(c: &Cluster) -> bool {
    c.metrics().await.is_ok_and(|m| {
        m.lines()
            .any(|l| l == r#"ao_lease_held{lease="recovery"} 1"#)
    })
}

/// Whether `issue` has a ready pull request of its branch and the label `agent:done`.
fn ready(m: &Model, issue: u64) -> bool {
    let head = format!("agent/{issue}-");
    m.pulls(REPO)
        .iter()
        .any(|p| !p.draft && p.head.starts_with(&head))
        && m.issue(REPO, issue)
            .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The JSON log lines in `logs` (every daemon's, `AO__LOG__FORMAT=json`) that carry
/// `task_id` = `id`, as a field of the event or of one of its spans.
fn traced(logs: &str, id: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["task_id"] == id
                || v["spans"]
                    .as_array()
                    .is_some_and(|spans| spans.iter().any(|s| s["task_id"] == id))
        })
        .collect()
}

/// Follows task `id` through the logs: each step of its way has a line carrying the id;
/// the task was created within the span of the webhook delivery that labelled `issue`.
fn follow_the_trace(logs: &str, id: &str, m: &Model, issue: u64) {
    let lines = traced(logs, id);
    let find = |target: &str, message: &str| {
        lines.iter().find(|l| {
            l["target"].as_str().is_some_and(|t| t.starts_with(target)) && l["message"] == message
        })
    };
    for (step, target, message) in [
        (
            "webhook",
            "ao_coordinator::github",
            "task started from GitHub",
        ),
        ("plan", "ao_coordinator::orchestrator", "task created"),
        ("queue", "ao_coordinator::orchestrator", "subtask queued"),
        ("worker", "worker::job", "subtask received"),
        ("token", "worker::credentials", "scoped git token minted"),
        (
            "nomad dispatch",
            "worker::sandbox::nomad",
            "sandbox dispatched",
        ),
        (
            "nomad allocation",
            "worker::sandbox::nomad",
            "sandbox placed",
        ),
        ("worker result", "worker::job", "subtask succeeded"),
        ("result", "ao_coordinator::results", "result applied"),
        (
            "pull request",
            "ao_coordinator::github::reporter",
            "pull request opened",
        ),
        (
            "ready",
            "ao_coordinator::github::reporter",
            "pull request ready for review",
        ),
    ] {
        assert!(
            find(target, message).is_some(),
            "{step}: no `{message}` line of {target} carries the task id {id}"
        );
    }
    let label = m
        .deliveries
        .iter()
        .find(|d| {
            d.event == "issues"
                && d.action.as_deref() == Some("labeled")
                && d.payload["issue"]["number"] == issue
        })
        .unwrap();
    let created = find("ao_coordinator::orchestrator", "task created").unwrap();
    assert!(
        created["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["delivery"] == label.guid.as_str()),
        "the task is not tied to its webhook delivery {}: {created}",
        label.guid
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_labelled_issue_becomes_a_pull_request_on_the_production_stack() {
    let moto = Moto::start();
    let model = model().await;
    let prefix = format!("prod-{}", free_port());
    let mut env = moto.env(&prefix);
    env.extend(
        [
            ("AO__AGENT__KIND", "claude".to_string()),
            ("AO__AGENT__COMMAND", claude_cli().display().to_string()),
            ("AO__AGENT__PROFILES__CODER__MODEL", MODEL.to_string()),
            ("AO__AGENT__PROFILES__REVIEWER__MODEL", MODEL.to_string()),
            ("ANTHROPIC_BASE_URL", model.url.clone()),
            ("AO__COORDINATOR__LEASE_TTL_MS", LEASE_TTL_MS.to_string()),
            (
                "AO__COORDINATOR__LEASE_RENEW_MS",
                LEASE_RENEW_MS.to_string(),
            ),
            ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "5".to_string()),
            ("AO__QUEUE__HEARTBEAT_SECS", "1".to_string()),
            ("AO__COORDINATOR__MAX_ATTEMPTS", "3".to_string()),
            ("AO__LOG__FORMAT", "json".to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let sandbox_env = format!("ANTHROPIC_BASE_URL=\"{}\"", model.url);
    let mut s = NomadGithub::start(StackOptions {
        pipeline: Some("code-review"),
        capabilities: &["coder", "reviewer"],
        sandbox_env: &sandbox_env,
        env,
    })
    .await
    .unwrap();
    // The App key and the model key come from Secrets Manager only.
    let refs = secrets(&moto, &s.gh.private_key_path).await;
    for (k, v) in refs {
        s.c.env.retain(|(key, _)| *key != k);
        s.c.env.push((k, v));
    }
    let gh = &s.gh;
    let mut a = std::mem::replace(&mut s.c, Cluster::new(&[]));
    let mut b = replica(&a);
    a.start_coordinator().await.unwrap();
    b.start_coordinator().await.unwrap();
    let coder_env = [("AO__WORKER__CAPABILITIES", "coder")];
    let coder = a.start_worker(&coder_env);
    a.start_worker(&[("AO__WORKER__CAPABILITIES", "reviewer")]);
    let logs = |a: &Cluster, b: &Cluster| format!("{}\n--- replica ---\n{}", a.logs(), b.logs());

    // Part 1: a labelled issue becomes a ready pull request with Claude's commit.
    let issue = gh.open_issue(REPO, "Add a note", "A NOTE.md, please.", "alice");
    let labelled = Instant::now();
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = gh
        .wait_for("the ready pull request", LIMIT, |m| ready(m, issue))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&a, &b)))
        .unwrap();
    let to_ready = labelled.elapsed();
    let first_request = model
        .agent_requests()
        .first()
        .map(|r| r.at.duration_since(labelled))
        .unwrap();
    let pr = m.pulls(REPO)[0].clone();
    let bare = gh.repo_path(REPO);
    assert_eq!(
        git(&bare, &["show", &format!("{}:NOTE.md", pr.head)]),
        "a note from claude"
    );
    // The model got the key from Secrets Manager, by the hand-over.
    assert!(model
        .agent_requests()
        .iter()
        .all(|r| r.api_key.as_deref() == Some(MODEL_KEY)));
    let progress: Vec<_> = m
        .comments_on(REPO, issue)
        .into_iter()
        .filter(|c| c.body.contains("Cost so far: $"))
        .collect();
    assert_eq!(progress.len(), 1, "one progress comment");
    assert!(
        !progress[0].body.contains("Cost so far: $0.00"),
        "{}",
        progress[0].body
    );
    eprintln!(
        "production stack: label -> first model request {} ms, label -> pull request ready {} ms",
        first_request.as_millis(),
        to_ready.as_millis()
    );

    // One trace id, the task's id, through every step: webhook, plan, queue, worker,
    // Nomad allocation, result, pull request.
    let (_, list) = a.get_json("/api/v1/tasks").await.unwrap();
    let task_id = list["tasks"][0]["id"].as_str().unwrap().to_string();
    follow_the_trace(&logs(&a, &b), &task_id, &m, issue);
    let dispatched = s
        .nomad
        .dispatches()
        .iter()
        .filter(|d| d.meta.get("task_id") == Some(&task_id))
        .count();
    assert_eq!(dispatched, 2, "each step's Nomad job carries the task id");

    // Part 2: a run longer than the token lives; the lease holder and the coder worker
    // are killed during it, and started again.
    gh.set_token_ttl(Duration::from_secs(TOKEN_TTL_SECS));
    let holder_is_a = {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (x, y) = (holds_recovery(&a).await, holds_recovery(&b).await);
            assert!(!(x && y), "both replicas hold the recovery lease");
            if x ^ y {
                break x;
            }
            assert!(Instant::now() < deadline, "no replica holds the lease");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut cs = [a, b];
    let (h, v) = if holder_is_a { (0, 1) } else { (1, 0) };
    // GitHub delivers to the replica that survives (the one webhook URL in front of both).
    gh.set_webhook(
        &cs[v].url("/webhooks/github"),
        ao_tests::fake_github::WEBHOOK_SECRET,
    );
    let slow = gh.open_issue(
        REPO,
        "Add a slow note",
        "SLOW-NOTE: a SLOW.md, please.",
        "alice",
    );
    let asked_before = model.agent_requests().len();
    let requests_before = gh.model().token_requests.len();
    assert_eq!(gh.label_issue(REPO, slow, "agent", "alice").await, 202);
    // The agent is under way: its first request reached the model (which answers late).
    let deadline = Instant::now() + LIMIT;
    while !model
        .agent_requests()
        .iter()
        .skip(asked_before)
        .any(|r| r.body.to_string().contains("SLOW-NOTE"))
    {
        assert!(
            Instant::now() < deadline,
            "the slow agent never asked\n{}",
            logs(&cs[0], &cs[1])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cs[h].coordinator.as_mut().unwrap().kill_hard();
    let killed = Instant::now();
    cs[0].workers[coder].kill_hard();
    while !holds_recovery(&cs[v]).await {
        assert!(killed.elapsed() < LIMIT, "no takeover\n{}", cs[v].logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let takeover = killed.elapsed();
    eprintln!(
        "production stack: lease takeover {} ms after SIGKILL (lease_ttl_ms {LEASE_TTL_MS}, \
         lease_renew_ms {LEASE_RENEW_MS})",
        takeover.as_millis()
    );
    assert!(
        takeover <= Duration::from_millis(LEASE_TTL_MS + LEASE_RENEW_MS + 1000),
        "{takeover:?}"
    );
    cs[h].start_coordinator().await.unwrap();
    cs[0].start_worker(&coder_env);

    let m = gh
        .wait_for("the slow issue's ready pull request", LIMIT, |m| {
            ready(m, slow)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&cs[0], &cs[1])))
        .unwrap();
    let head = format!("agent/{slow}-");
    let pulls: Vec<_> = m
        .pulls(REPO)
        .into_iter()
        .filter(|p| p.head.starts_with(&head))
        .collect();
    assert_eq!(pulls.len(), 1, "one pull request: {pulls:#?}");
    assert_eq!(
        git(&bare, &["show", &format!("{}:SLOW.md", pulls[0].head)]),
        "a slow note from claude"
    );
    // One task for the issue; each of its two subtasks succeeded once.
    let (_, list) = cs[v].get_json("/api/v1/tasks").await.unwrap();
    let tasks: Vec<&Value> = list["tasks"].as_array().unwrap().iter().collect();
    assert_eq!(tasks.len(), 2, "{list:#}");
    let slow_task = tasks
        .iter()
        .find(|t| t["branch"].as_str().is_some_and(|b| b.starts_with(&head)))
        .unwrap();
    let id = slow_task["id"].as_str().unwrap();
    let done = cs[v].task(id).await.unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(successes(&cs[v], id).await, 2, "{done:#}");
    // The coder's run outlived its token: besides the token of each attempt's start, its
    // push asked for a fresh one.
    let scoped_writes = m.token_requests[requests_before..]
        .iter()
        .filter(|t| t.body["permissions"]["contents"] == "write")
        .count();
    let coder_attempts = done["subtasks"][0]["attempt"].as_u64().unwrap() as usize;
    assert!(
        scoped_writes > coder_attempts,
        "{scoped_writes} write tokens for {coder_attempts} attempts"
    );
    // The restarted worker found the killed one's sandbox by the idempotency token.
    eprintln!(
        "production stack: the slow coder succeeded at attempt {coder_attempts}; dispatches: {:?}",
        s.nomad
            .dispatches()
            .iter()
            .map(|d| (d.token.clone(), d.existing))
            .collect::<Vec<_>>()
    );
    // No per-attempt secret (nor the model key, nor the App key) in anything the fake
    // Nomad stores or served.
    let stored = s.nomad.stored_bytes();
    assert!(stored.iter().any(|(w, _)| w.starts_with("dispatch meta")));
    let app_key = std::fs::read_to_string(&gh.private_key_path).unwrap();
    let app_key_body = app_key.lines().nth(1).unwrap().to_string();
    let mut held: Vec<String> = m.tokens.keys().cloned().collect();
    assert!(!held.is_empty());
    held.push(MODEL_KEY.to_string());
    held.push(app_key_body);
    // Nor in any daemon's log.
    let all_logs = logs(&cs[0], &cs[1]);
    for secret in &held {
        for (where_, bytes) in &stored {
            assert!(!contains(bytes, secret), "a secret is in {where_}");
        }
        assert!(!all_logs.contains(secret.as_str()), "a secret is in a log");
    }
    let v = s.nomad.violations();
    assert!(v.is_empty(), "requests outside Nomad's API: {v:#?}");
}
