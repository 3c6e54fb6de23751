//! The real Claude Code CLI as the agent, inside the bubblewrap sandbox, against the
//! scripted Messages API in `ao_tests::model_server`: it really edits the repository
//! with `Write`, `Edit` and `Bash`, the runner commits and pushes, and the result carries
//! the turns, tokens and cost the scripted usage implies. Then the ways a run goes wrong:
//! a silent model (stalled), a budget crossed, a background process left behind, cancel,
//! model API failures (retried, classified) and the turn limit.

use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::{bare_repo, Cluster};
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);
/// The model key the worker is given (through a secret ref); long enough to be redacted.
const MODEL_KEY: &str = "sk-ant-test-0123456789abcdef";

/// A cluster whose worker runs Claude Code in bwrap against `model`.
async fn cluster(model: &ModelServer, extra: &[(&str, &str)]) -> Cluster {
    let cli = claude_cli();
    let mut settings: Vec<(&str, &str)> = vec![
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__AGENT__PROFILES__TESTER__MODEL", MODEL),
        ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
    ];
    settings.extend_from_slice(extra);
    let mut c = Cluster::new(&settings);
    let cli = cli.display().to_string();
    c.env.push(("AO__AGENT__COMMAND".into(), cli));
    c.env.push(("AO_TEST_MODEL_KEY".into(), MODEL_KEY.into()));
    c.env.push(("ANTHROPIC_BASE_URL".into(), model.url.clone()));
    c.env
        .push(("WORKER_ONLY_CANARY".into(), "do-not-leak-4242".into()));
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    c
}

async fn submit(c: &Cluster, repo: &Path, pipeline: &str) -> String {
    let (status, task) = c
        .submit(json!({ "repository": repo.display().to_string(),
            "prompt": "Create hello.txt", "pipeline": pipeline, "branch": "agent/claude" }))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().expect("id").to_string()
}

/// Submits a `code` task and waits until it has ended.
async fn run_to_end(c: &Cluster, repo: &Path) -> (String, Value) {
    let id = submit(c, repo, "code").await;
    let task = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("task ends");
    (id, task)
}

/// A cluster against `model` with `extra` settings and a fresh repository, on which a
/// `code` task has run to its end. Returns the cluster, the repository, the task's id and
/// the task.
async fn run_once(
    model: &ModelServer,
    extra: &[(&str, &str)],
) -> (Cluster, PathBuf, String, Value) {
    let c = cluster(model, extra).await;
    let repo = repo(&c);
    let (id, task) = run_to_end(&c, &repo).await;
    (c, repo, id, task)
}

/// [`run_once`] with no extra settings, asserting the task succeeded.
async fn run_succeeded(model: &ModelServer) -> (Cluster, PathBuf, String, Value) {
    let (c, repo, id, task) = run_once(model, &[]).await;
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
    (c, repo, id, task)
}

/// The task's agent events: `(type, event)` pairs.
async fn agent_events(c: &Cluster, id: &str) -> Vec<(String, Value)> {
    let (_, body) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .expect("events");
    body["events"]
        .as_array()
        .expect("events array")
        .iter()
        .filter(|e| e["kind"] == "agent")
        .map(|e| {
            (
                e["data"]["type"].as_str().unwrap_or_default().to_string(),
                e["data"]["event"].clone(),
            )
        })
        .collect()
}

fn repo(c: &Cluster) -> PathBuf {
    bare_repo(c.dir.path(), "project", &[("README.md", "# project\n")])
}

/// The file at `path` on the remote branch, if the branch exists.
fn remote_file(c: &Cluster, repo: &Path, branch: &str, path: &str) -> Option<String> {
    let check = c.dir.path().join(format!("check-{}", rand_suffix()));
    let out = std::process::Command::new("git")
        .args(["clone", "-q", "--branch", branch])
        .arg(repo)
        .arg(&check)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    std::fs::read_to_string(check.join(path)).ok()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

fn host_processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
            let line = String::from_utf8_lossy(&bytes).replace('\0', " ");
            if line.contains(needle) {
                found.push(line);
            }
        }
    }
    found
}

fn subtask(task: &Value) -> &Value {
    &task["subtasks"][0]
}

#[tokio::test(flavor = "multi_thread")]
async fn claude_code_edits_the_repository_and_the_work_is_pushed() {
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool(
                "Write",
                json!({ "file_path": "hello.txt", "content": "hello from claude\n" }),
            ),
            1000,
            200,
        ),
        Turn::new(
            Step::tool(
                "Edit",
                json!({ "file_path": "hello.txt", "old_string": "hello from",
                        "new_string": "hello, edited by" }),
            ),
            1000,
            200,
        ),
        Turn::new(
            Step::tool(
                "Bash",
                json!({ "command": "echo more >> hello.txt && env | cut -d= -f1 | sort > env-names.txt; for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ 2>/dev/null; done | grep -c '^AO_SECRET_NAMES=' > environ-leaks.txt",
                        "description": "append a line" }),
            ),
            1000,
            200,
        ),
        Turn::new(Step::text("Done: wrote hello.txt."), 1000, 200),
    ])
    .await;
    let (c, repo, id, task) = run_succeeded(&model).await;

    // The edit is committed and pushed.
    let hello = remote_file(&c, &repo, "agent/claude", "hello.txt").expect("pushed branch");
    assert_eq!(hello, "hello, edited by claude\nmore\n");
    let names = remote_file(&c, &repo, "agent/claude", "env-names.txt").expect("env names");
    assert!(names.lines().any(|n| n == "ANTHROPIC_API_KEY"), "{names}");
    assert!(!names.contains("WORKER_ONLY_CANARY"), "{names}");
    assert!(!names.contains("AO_SECRET_NAMES"), "{names}");
    // Nor can the agent read the runner's environment through /proc.
    let leaks = remote_file(&c, &repo, "agent/claude", "environ-leaks.txt").expect("leaks");
    assert_eq!(
        leaks.trim(),
        "0",
        "processes whose environment the agent can read"
    );

    // Four model turns of 1,000 input and 200 output tokens on a $3/$15 model.
    let s = subtask(&task);
    let outcome = &s["outcome"];
    assert_eq!(outcome["turns"], 4, "{s:#}");
    assert_eq!(outcome["tokens"]["input"], 4000, "{s:#}");
    assert_eq!(outcome["tokens"]["output"], 800, "{s:#}");
    let cost = s["cost_usd"].as_f64().expect("cost");
    assert!((cost - 0.024).abs() < 1e-6, "cost {cost}");
    assert!(outcome["summary"]
        .as_str()
        .unwrap_or_default()
        .contains("Done: wrote hello.txt."));

    // The model saw the coder's profile, the key came from the secret ref.
    let requests = model.agent_requests();
    assert!(requests.len() >= 4, "{} requests", requests.len());
    for r in &requests {
        assert_eq!(r.api_key.as_deref(), Some(MODEL_KEY));
    }
    let system = requests[0].body["system"].to_string();
    assert!(system.contains("You are the coder step"), "{system}");
    let tools: Vec<&str> = requests[0].body["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        tools.contains(&"Edit") && tools.contains(&"Bash"),
        "{tools:?}"
    );
    assert!(!tools.contains(&"WebFetch"), "{tools:?}");

    // The transcript is kept: typed events, and the key in none of them.
    let events = agent_events(&c, &id).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    for expected in ["init", "tool_use", "tool_result", "text", "result"] {
        assert!(kinds.contains(&expected), "{expected} missing in {kinds:?}");
    }
    assert!(events
        .iter()
        .any(|(k, e)| k == "tool_use" && e["name"] == "Edit"));
    let (_, body) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .expect("events");
    assert!(!body.to_string().contains(MODEL_KEY));
    assert!(!c.logs().contains(MODEL_KEY));
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_events_stream_live_before_the_run_ends() {
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool("Bash", json!({ "command": "echo streaming-probe" })),
            100,
            10,
        ),
        Turn::new(
            Step::Delay(Duration::from_secs(6), Box::new(Step::text("late answer"))),
            100,
            10,
        ),
    ])
    .await;
    let c = cluster(&model, &[]).await;
    let repo = repo(&c);
    let id = submit(&c, &repo, "code").await;
    let response = c
        .http
        .get(c.url(&format!("/api/v1/tasks/{id}/events")))
        .bearer_auth(ao_tests::TOKEN)
        .header("accept", "text/event-stream")
        .timeout(LIMIT)
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let deadline = Instant::now() + LIMIT;
    let mut saw_tool_result_while_running = false;
    'read: while Instant::now() < deadline {
        let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(60), stream.next()).await
        else {
            break;
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            for data in frame.lines().filter_map(|l| l.strip_prefix("data:")) {
                let Ok(event) = serde_json::from_str::<Value>(data.trim()) else {
                    continue;
                };
                if event["kind"] == "agent"
                    && event["data"]["type"] == "tool_result"
                    && event["data"]["event"]["content"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("streaming-probe")
                {
                    // The model is still holding its last answer back: the run is live.
                    let task = c.task(&id).await.expect("task");
                    assert_eq!(task["status"], "running", "{task:#}");
                    saw_tool_result_while_running = true;
                    break 'read;
                }
            }
        }
    }
    assert!(
        saw_tool_result_while_running,
        "no live tool result\n{}",
        c.logs()
    );
    let task = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("task ends");
    assert_eq!(task["status"], "succeeded", "{task:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_model_is_killed_as_stalled() {
    let model = ModelServer::start(vec![Turn::new(Step::Hang, 10, 10)]).await;
    let c = cluster(&model, &[("AO__AGENT__IDLE_TIMEOUT_SECS", "5")]).await;
    let repo = repo(&c);
    let started = Instant::now();
    let (_, task) = run_to_end(&c, &repo).await;
    assert_eq!(task["status"], "failed");
    let outcome = &subtask(&task)["outcome"];
    assert_eq!(outcome["kind"], "stalled", "{outcome:#}");
    assert_eq!(outcome["retryable"], true);
    assert!(started.elapsed() < Duration::from_secs(120));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_past_its_budget_is_stopped() {
    // 200,000 input tokens on a $3 model: $0.60 in the first message, past $0.50.
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool(
                "Write",
                json!({ "file_path": "spent.txt", "content": "x\n" }),
            ),
            200_000,
            10,
        ),
        Turn::new(
            Step::tool(
                "Write",
                json!({ "file_path": "more.txt", "content": "y\n" }),
            ),
            200_000,
            10,
        ),
        Turn::new(Step::text("done"), 10, 10),
    ])
    .await;
    let (c, repo, _, task) = run_once(
        &model,
        &[("AO__AGENT__PROFILES__CODER__MAX_COST_USD", "0.5")],
    )
    .await;
    assert_eq!(task["status"], "failed", "{task:#}");
    let s = subtask(&task);
    assert_eq!(s["outcome"]["kind"], "budget_exceeded", "{s:#}");
    let cost = s["cost_usd"].as_f64().expect("cost");
    assert!(cost >= 0.5, "cost {cost}");
    assert!(remote_file(&c, &repo, "agent/claude", "spent.txt").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_the_agent_starts_outlives_the_run() {
    let marker = format!("{}", 40_000 + rand_suffix() % 20_000);
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool(
                "Bash",
                json!({ "command": format!("setsid sleep {marker} >/dev/null 2>&1 < /dev/null & echo started") }),
            ),
            10,
            10,
        ),
        Turn::new(Step::text("left something running"), 10, 10),
    ])
    .await;
    let (c, _, id, _) = run_succeeded(&model).await;
    let events = agent_events(&c, &id).await;
    assert!(
        events
            .iter()
            .any(|(k, e)| k == "tool_result" && e["content"].to_string().contains("started")),
        "the background process never started: {events:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!("sleep {marker}");
    while !host_processes_with(&needle).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(host_processes_with(&needle).is_empty(), "still running");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_cannot_make_the_runner_s_git_run_its_commands() {
    // Whatever the agent plants would commit a file named after itself into the working
    // copy if the runner's git ran it, and the agent points the remote elsewhere. (The
    // local remote itself is read-only to the sandbox; the command-agent variants in
    // sandbox_attacks.rs watch for the same commands from outside.)
    let plant = r#"set -e
T="$PWD"
mkdir -p .git/hooks "$HOME/evil-hooks"
hook() { printf '#!/bin/sh\ntouch %s/sprung-%s\n' "$T" "$1" > "$2"; chmod +x "$2"; }
hook pre-push .git/hooks/pre-push
hook post-commit .git/hooks/post-commit
hook fsmonitor .git/fsmonitor.sh
git config core.fsmonitor "$PWD/.git/fsmonitor.sh"
git config remote.origin.url /nonexistent/elsewhere.git
hook global-pre-push "$HOME/evil-hooks/pre-push"
printf '[core]\n\thooksPath = %s\n' "$HOME/evil-hooks" > "$HOME/.gitconfig"
echo work > work.txt"#;
    let model = ModelServer::start(vec![
        Turn::new(Step::tool("Bash", json!({ "command": plant })), 10, 10),
        Turn::new(Step::text("planted"), 10, 10),
    ])
    .await;
    let (c, repo, id, _) = run_succeeded(&model).await;
    let events = agent_events(&c, &id).await;
    assert!(
        events
            .iter()
            .any(|(k, e)| k == "tool_result" && e["is_error"] == false),
        "the agent's planting failed: {events:?}"
    );
    // The work went to the real remote, and none of the planted commands ran.
    assert_eq!(
        remote_file(&c, &repo, "agent/claude", "work.txt").as_deref(),
        Some("work\n")
    );
    let tree = std::process::Command::new("git")
        .args([
            "-c",
            "safe.directory=*",
            "ls-tree",
            "-r",
            "--name-only",
            "agent/claude",
        ])
        .current_dir(&repo)
        .output()
        .expect("git ls-tree");
    let tree = String::from_utf8_lossy(&tree.stdout);
    assert!(
        !tree.lines().any(|f| f.starts_with("sprung-")),
        "planted commands ran: {tree}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_kills_a_running_agent() {
    let marker = format!("{}", 60_000 + rand_suffix() % 20_000);
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool(
                "Write",
                json!({ "file_path": "partial.txt", "content": "x\n" }),
            ),
            10,
            10,
        ),
        Turn::new(
            Step::tool(
                "Bash",
                json!({ "command": format!("sleep {marker}"), "timeout": 600000 }),
            ),
            10,
            10,
        ),
        Turn::new(Step::text("should never get here"), 10, 10),
    ])
    .await;
    let c = cluster(&model, &[("AO__WORKER__CANCEL_POLL_SECS", "1")]).await;
    let repo = repo(&c);
    let id = submit(&c, &repo, "code").await;
    let needle = format!("sleep {marker}");
    let deadline = Instant::now() + LIMIT;
    while host_processes_with(&needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the agent never ran the command\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cancelled_at = Instant::now();
    let (status, body) = c
        .post_json(&format!("/api/v1/tasks/{id}/cancel"))
        .await
        .expect("cancel");
    assert!(status == 200 || status == 202, "{status} {body}");
    while !host_processes_with(&needle).is_empty() {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(20),
            "the agent outlived the cancel\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let task = c
        .wait_for_status(&id, &["cancelled"], LIMIT)
        .await
        .expect("cancelled");
    assert_eq!(subtask(&task)["status"], "cancelled");
    // Nothing was pushed, even later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(remote_file(&c, &repo, "agent/claude", "partial.txt").is_none());
    assert_eq!(model.agent_requests().len(), 2, "the model was asked again");
}

/// A model API that fails the same way every time: the run is classified, retried up to
/// `coordinator.max_attempts`, and the task fails.
async fn failing_model(step: Step, expected_error: &str) {
    let model = ModelServer::start(vec![Turn::new(step, 10, 10)]).await;
    let (_, _, _, task) = run_once(
        &model,
        &[
            ("AO__COORDINATOR__MAX_ATTEMPTS", "2"),
            ("CLAUDE_CODE_MAX_RETRIES", "0"),
        ],
    )
    .await;
    assert_eq!(task["status"], "failed");
    let s = subtask(&task);
    assert_eq!(s["attempt"], 2, "retried once: {s:#}");
    assert_eq!(s["outcome"]["kind"], "infrastructure", "{s:#}");
    assert_eq!(s["outcome"]["retryable"], true, "{s:#}");
    let error = s["outcome"]["error"].as_str().unwrap_or_default();
    assert!(error.contains(expected_error), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_api_500_is_a_retryable_infrastructure_failure() {
    failing_model(Step::error(500, "api_error"), "model API error 500").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overloaded_model_api_is_a_retryable_infrastructure_failure() {
    failing_model(Step::error(529, "overloaded_error"), "model API error 529").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_stream_is_a_retryable_infrastructure_failure() {
    failing_model(Step::Malformed, "model API failure").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_turn_limit_is_classified() {
    let endless: Vec<Turn> = (0..10)
        .map(|i| {
            Turn::new(
                Step::tool("Bash", json!({ "command": format!("echo turn {i}") })),
                10,
                10,
            )
        })
        .collect();
    let model = ModelServer::start(endless).await;
    let (_, _, _, task) = run_once(&model, &[("AO__AGENT__PROFILES__CODER__MAX_TURNS", "2")]).await;
    assert_eq!(task["status"], "failed");
    let s = subtask(&task);
    assert_eq!(s["outcome"]["kind"], "max_turns", "{s:#}");
    assert_eq!(s["outcome"]["retryable"], false);
}

/// The `network_denied` events of a task: `(host, port)` pairs.
async fn denied(c: &Cluster, id: &str) -> Vec<(String, u64)> {
    let (_, body) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .expect("events");
    body["events"]
        .as_array()
        .expect("events array")
        .iter()
        .filter(|e| e["data"]["type"] == "network_denied")
        .map(|e| {
            let d = &e["data"]["event"];
            (
                d["host"].as_str().unwrap_or_default().to_string(),
                d["port"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_model_key_stays_with_the_proxy_and_other_hosts_are_refused() {
    // The agent dumps its environment and tries a host that is not on the allow-list.
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool(
                "Bash",
                json!({ "command": "env > env.txt; if curl -s -m 5 -o /dev/null https://example.com/; then echo reached; else echo refused; fi > curl.txt" }),
            ),
            100,
            10,
        ),
        Turn::new(Step::text("probed"), 100, 10),
    ])
    .await;
    let (c, repo, id, _) = run_succeeded(&model).await;
    let env = remote_file(&c, &repo, "agent/claude", "env.txt").expect("env.txt");
    assert!(
        !env.contains(MODEL_KEY),
        "the model key is in the sandbox:\n{env}"
    );
    let curl = remote_file(&c, &repo, "agent/claude", "curl.txt").expect("curl.txt");
    assert_eq!(curl.trim(), "refused");
    // Every model call carried the key, added by the worker's proxy.
    let requests = model.agent_requests();
    assert!(requests.len() >= 2, "{} requests", requests.len());
    for r in &requests {
        assert_eq!(r.api_key.as_deref(), Some(MODEL_KEY));
        // Plain answers only: a compressed one would pass the proxy's meter unread.
        assert_eq!(r.accept_encoding.as_deref(), Some("identity"), "{}", r.path);
    }
    let refused = denied(&c, &id).await;
    assert!(
        refused.contains(&("example.com".to_string(), 443)),
        "no network_denied event for example.com:443: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_refuses_model_calls_past_the_budget() {
    // Each answer costs $0.03 (10,000 input tokens at $3 per million); the budget is
    // $0.05. The agent's tool calls the model endpoint itself, around Claude Code and
    // the runner's own budget check: the proxy answers the first call and refuses the
    // rest, and the run ends over its budget.
    let direct = "for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\\n' \
        -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \
        \"$ANTHROPIC_BASE_URL/v1/messages\" \
        -d '{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":10,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}'; done";
    let model = ModelServer::start(vec![
        Turn::new(Step::tool("Bash", json!({ "command": direct })), 10_000, 10),
        Turn::new(Step::text("done"), 10, 10),
    ])
    .await;
    let (c, _, id, task) = run_once(
        &model,
        &[("AO__AGENT__PROFILES__CODER__MAX_COST_USD", "0.05")],
    )
    .await;
    assert_eq!(task["status"], "failed", "{task:#}\n{}", c.logs());
    let s = subtask(&task);
    assert_eq!(s["outcome"]["kind"], "budget_exceeded", "{s:#}");
    // Claude Code's first call and the agent's first direct one reached the model.
    assert_eq!(model.requests().len(), 2, "{:?}", model.requests());
    let cost = s["cost_usd"].as_f64().expect("cost");
    assert!((cost - 0.06).abs() < 0.001, "cost {cost}");
    let events = agent_events(&c, &id).await;
    assert!(
        events
            .iter()
            .any(|(k, e)| k == "tool_result" && e["content"].to_string().contains("200\\n403")),
        "the direct calls were not refused: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_result_line_does_not_change_the_metered_cost() {
    // $3 of input in the first answer; then the agent writes a final `result` line of
    // its own ($0) into Claude Code's standard output and kills it.
    let forge = r#"p=$PPID; while [ "$p" -gt 1 ] && ! tr '\0' ' ' < /proc/$p/cmdline | grep -q 'stream-json'; do p=$(awk '{print $4}' /proc/$p/stat); done
printf '%s\n' '{"type":"result","subtype":"success","is_error":false,"result":"forged","total_cost_usd":0,"num_turns":1,"usage":{"input_tokens":0,"output_tokens":0}}' > /proc/$p/fd/1
kill -9 $p"#;
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool("Bash", json!({ "command": forge })),
            1_000_000,
            10,
        ),
        Turn::new(Step::text("not reached"), 10, 10),
    ])
    .await;
    let (c, _, _, task) = run_once(&model, &[]).await;
    let s = subtask(&task);
    let cost = s["cost_usd"].as_f64().expect("cost");
    assert!(
        cost >= 3.0,
        "the run cost {cost}, not the metered $3\n{s:#}\n{}",
        c.logs()
    );
    assert!(
        s["outcome"]["tokens"]["input"].as_u64() >= Some(1_000_000),
        "{s:#}"
    );
}
