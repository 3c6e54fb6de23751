//! Chaos on the production stack (`tests/src/stack.rs`: the fake GitHub App, moto's SQS
//! and DynamoDB, two coordinator processes, workers on the `nomad` driver against the
//! fake Nomad running the real sandbox job file under bubblewrap, the real Claude Code CLI
//! against the scripted model).
//!
//! - A coordinator killed (SIGKILL) between the moment its result consumer applied a
//!   task's last result and the moment its GitHub reporter finished reporting it: the pull
//!   request must still become ready and the issue labelled `agent:done`.
//! - The lease holder stopped (SIGSTOP) past the lease's life while the coder works, then
//!   resumed: it gives the lease up, and nothing is doubled (pull request, progress
//!   comment, status label, task, step successes).
//! - The coder's worker killed the moment it grants the sandbox's push permit: one pull
//!   request with the agent's commit.
//!
//! The test sets moto's dummy AWS credentials in its own environment, so it has a binary
//! of its own.

// Test helpers may panic: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use ao_tests::fake_github::{Failure, Model};
use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::moto::Moto;
use ao_tests::stack::{NomadGithub, StackOptions, REPO};
use ao_tests::{free_port, Cluster};
use serde_json::json;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);
const LEASE_TTL_MS: u64 = 1500;
const LEASE_RENEW_MS: u64 = 300;

/// The coder writes NOTE.md; the reviewer approves.
async fn model() -> ModelServer {
    ModelServer::start_routed(
        vec![Turn::new(Step::text("Nothing to do."), 10, 10)],
        vec![
            (
                "You are the reviewer step".into(),
                vec![Turn::new(
                    Step::text("APPROVE\n```json\n{\"verdict\": \"approve\"}\n```"),
                    10_000,
                    200,
                )],
            ),
            (
                "You are the coder step".into(),
                vec![
                    Turn::new(
                        Step::tool(
                            "Write",
                            json!({ "file_path": "NOTE.md", "content": "a note\n" }),
                        ),
                        50_000,
                        2_000,
                    ),
                    Turn::new(Step::text("Done: wrote NOTE.md."), 1_000, 100),
                ],
            ),
        ],
    )
    .await
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

/// Whether `issue` has a ready pull request of its branch and the label `agent:done`.
fn ready(m: &Model, issue: u64) -> bool {
    let head = format!("agent/{issue}-");
    m.pulls(REPO)
        .iter()
        .any(|p| !p.draft && p.head.starts_with(&head))
        && m.issue(REPO, issue)
            .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
}

/// The production stack's two coordinators (started) and its workers (on `a`).
async fn stack(model: &ModelServer, moto: &Moto) -> (NomadGithub, Cluster, Cluster) {
    let prefix = format!("breaker-{}", free_port());
    let mut env = moto.env(&prefix);
    env.extend(
        [
            ("AO__AGENT__KIND", "claude".to_string()),
            ("AO__AGENT__COMMAND", claude_cli().display().to_string()),
            ("AO__AGENT__PROFILES__CODER__MODEL", MODEL.to_string()),
            ("AO__AGENT__PROFILES__REVIEWER__MODEL", MODEL.to_string()),
            ("ANTHROPIC_BASE_URL", model.url.clone()),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY".to_string()),
            ("AO_TEST_MODEL_KEY", "sk-ant-breaker".to_string()),
            ("AO__COORDINATOR__LEASE_TTL_MS", LEASE_TTL_MS.to_string()),
            (
                "AO__COORDINATOR__LEASE_RENEW_MS",
                LEASE_RENEW_MS.to_string(),
            ),
            ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "5".to_string()),
            ("AO__QUEUE__HEARTBEAT_SECS", "1".to_string()),
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
    let mut a = std::mem::replace(&mut s.c, Cluster::new(&[]));
    let mut b = replica(&a);
    a.start_coordinator().await.unwrap();
    b.start_coordinator().await.unwrap();
    a.start_worker(&[("AO__WORKER__CAPABILITIES", "coder")]);
    a.start_worker(&[("AO__WORKER__CAPABILITIES", "reviewer")]);
    (s, a, b)
}

/// Whether the coordinator's log says its reporter is retrying task `id`.
fn retrying(c: &Cluster, id: &str) -> bool {
    c.coordinator_log()
        .lines()
        .any(|l| l.contains("cannot report to GitHub yet") && l.contains(id))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_request_becomes_ready_after_the_reporting_coordinator_is_killed() {
    let moto = Moto::start();
    let model = model().await;
    let (s, a, b) = stack(&model, &moto).await;
    let gh = &s.gh;
    let logs = |a: &Cluster, b: &Cluster| format!("{}\n--- replica ---\n{}", a.logs(), b.logs());
    // GitHub refuses to mark any pull request ready (502) until told otherwise: the
    // reporter of the replica that applies the task's last result keeps retrying.
    gh.fail("POST /graphql", 1_000_000, Failure::ServerError);
    let issue = gh.open_issue(REPO, "Add a note", "A NOTE.md, please.", "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);

    // The task succeeded in the store, and a replica's reporter is retrying it.
    let deadline = Instant::now() + LIMIT;
    let id = loop {
        let (_, list) = a.get_json("/api/v1/tasks").await.unwrap();
        if let Some(t) = list["tasks"].as_array().and_then(|t| t.first()) {
            let id = t["id"].as_str().unwrap().to_string();
            if t["status"] == "succeeded" && (retrying(&a, &id) || retrying(&b, &id)) {
                break id;
            }
        }
        assert!(Instant::now() < deadline, "no success\n{}", logs(&a, &b));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let m = gh.model();
    assert!(m.pulls(REPO).iter().all(|p| p.draft), "a draft so far");

    // Kill the reporting replica(s); GitHub recovers; the killed ones start again.
    let mut cs = [a, b];
    let killed: Vec<usize> = (0..2).filter(|i| retrying(&cs[*i], &id)).collect();
    for i in &killed {
        cs[*i].coordinator.as_mut().unwrap().kill_hard();
    }
    gh.clear_faults();
    for i in &killed {
        cs[*i].start_coordinator().await.unwrap();
    }
    let m = gh
        .wait_for("the ready pull request", Duration::from_secs(60), |m| {
            ready(m, issue)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nkilled {killed:?}\n{}", logs(&cs[0], &cs[1])))
        .unwrap();
    let head = format!("agent/{issue}-");
    assert_eq!(
        m.pulls(REPO)
            .iter()
            .filter(|p| p.head.starts_with(&head))
            .count(),
        1,
        "one pull request"
    );
}

/// Whether the coordinator of `c` holds the `recovery` lease, by its /metrics.
async fn holds_recovery(c: &Cluster) -> bool {
    c.metrics().await.is_ok_and(|m| {
        m.lines()
            .any(|l| l == r#"ao_lease_held{lease="recovery"} 1"#)
    })
}

/// The lease holder is stopped (SIGSTOP) while the coder works, for longer than the lease
/// lives; the other replica takes over; the stopped one resumes (SIGCONT) and must give
/// the lease up, not run beside the new owner; the task ends once, with one pull request,
/// one progress comment and one status label.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_then_resumed_lease_holder_gives_way_and_nothing_is_doubled() {
    let moto = Moto::start();
    let model = model().await;
    let (s, a, b) = stack(&model, &moto).await;
    let gh = &s.gh;
    let logs = |a: &Cluster, b: &Cluster| format!("{}\n--- replica ---\n{}", a.logs(), b.logs());
    let deadline = Instant::now() + LIMIT;
    let holder_is_a = loop {
        let (x, y) = (holds_recovery(&a).await, holds_recovery(&b).await);
        assert!(!(x && y), "both replicas hold the recovery lease");
        if x ^ y {
            break x;
        }
        assert!(Instant::now() < deadline, "no replica holds the lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cs = [a, b];
    let (h, v) = if holder_is_a { (0, 1) } else { (1, 0) };
    gh.set_webhook(
        &cs[v].url("/webhooks/github"),
        ao_tests::fake_github::WEBHOOK_SECRET,
    );
    let issue = gh.open_issue(REPO, "Add a note", "A NOTE.md, please.", "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);
    // The coder is under way.
    while model.agent_requests().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no agent\n{}",
            logs(&cs[0], &cs[1])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let holder = cs[h].coordinator.as_ref().unwrap();
    holder.signal(nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    while !holds_recovery(&cs[v]).await {
        assert!(stopped.elapsed() < LIMIT, "no takeover\n{}", cs[v].logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.signal(nix::sys::signal::Signal::SIGCONT);
    // The resumed replica gives the lease up (its metrics say so) and the survivor keeps it.
    let resumed = Instant::now();
    while holds_recovery(&cs[h]).await {
        assert!(
            resumed.elapsed() < Duration::from_millis(LEASE_TTL_MS + LEASE_RENEW_MS + 1000),
            "the resumed replica still holds the lease\n{}",
            cs[h].logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(holds_recovery(&cs[v]).await, "the survivor lost the lease");

    // A replica resumed mid-pass may write an older status label after the newer one;
    // reading the task again after its pass, it puts it right: what is asserted is
    // where GitHub settles, one status label.
    let status_labels = |m: &Model| -> Vec<String> {
        m.issue(REPO, issue)
            .map(|i| i.labels.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.starts_with("agent:"))
            .collect()
    };
    let m = gh
        .wait_for("the ready pull request and one status label", LIMIT, |m| {
            ready(m, issue) && status_labels(m) == ["agent:done"]
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&cs[0], &cs[1])))
        .unwrap();
    let head = format!("agent/{issue}-");
    assert_eq!(
        m.pulls(REPO)
            .iter()
            .filter(|p| p.head.starts_with(&head))
            .count(),
        1,
        "one pull request"
    );
    let progress = m
        .comments_on(REPO, issue)
        .into_iter()
        .filter(|c| c.body.contains("agent-orchestrator:progress"))
        .count();
    assert_eq!(progress, 1, "one progress comment");
    let (_, list) = cs[v].get_json("/api/v1/tasks").await.unwrap();
    assert_eq!(
        list["tasks"].as_array().unwrap().len(),
        1,
        "one task: {list:#}"
    );
    let id = list["tasks"][0]["id"].as_str().unwrap();
    assert_eq!(
        ao_tests::scenario::successes(&cs[v], id).await,
        2,
        "each step succeeded once"
    );
}

/// The coder's worker is killed (SIGKILL) the moment it grants the sandbox's push permit,
/// while the runner pushes, and started again: the task still ends once, with one pull
/// request holding the agent's commit.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_killed_during_the_push_leaves_one_pull_request() {
    let moto = Moto::start();
    let model = model().await;
    let (s, mut a, b) = stack(&model, &moto).await;
    let gh = &s.gh;
    let logs = |a: &Cluster, b: &Cluster| format!("{}\n--- replica ---\n{}", a.logs(), b.logs());
    let issue = gh.open_issue(REPO, "Add a note", "A NOTE.md, please.", "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);
    let deadline = Instant::now() + LIMIT;
    // Worker 0 is the coder's (see `stack`).
    while !a.workers[0].log_text().contains("push permit answered") {
        assert!(Instant::now() < deadline, "no push\n{}", logs(&a, &b));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.workers[0].kill_hard();
    a.start_worker(&[("AO__WORKER__CAPABILITIES", "coder")]);
    let m = gh
        .wait_for("the ready pull request", LIMIT, |m| ready(m, issue))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&a, &b)))
        .unwrap();
    let head = format!("agent/{issue}-");
    let pulls: Vec<_> = m
        .pulls(REPO)
        .into_iter()
        .filter(|p| p.head.starts_with(&head))
        .collect();
    assert_eq!(pulls.len(), 1, "one pull request");
    assert_eq!(
        ao_tests::git(
            &gh.repo_path(REPO),
            &["show", &format!("{}:NOTE.md", pulls[0].head)]
        ),
        "a note"
    );
    let (_, list) = a.get_json("/api/v1/tasks").await.unwrap();
    assert_eq!(
        list["tasks"].as_array().unwrap().len(),
        1,
        "one task: {list:#}"
    );
    let id = list["tasks"][0]["id"].as_str().unwrap();
    let done = a.task(id).await.unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}");
    eprintln!(
        "worker killed during the push: the coder succeeded at attempt {}",
        done["subtasks"][0]["attempt"]
    );
}
