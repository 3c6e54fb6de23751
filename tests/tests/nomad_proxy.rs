//! The model key never enters a Nomad sandbox; its way out is the worker's proxy. The
//! real coordinator and worker on the `nomad` driver, the fake Nomad running the real
//! `worker runner` with the real Claude Code CLI, and the scripted model server: the
//! worker's per-attempt proxy adds the key, meters the model's answers (the booked
//! cost), refuses calls past the budget, refuses destinations off the allow-list and
//! requests without the attempt's token, and stops with the attempt.

// Test helpers may panic: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use ao_tests::fake_nomad::FakeNomad;
use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::stack::{nomad_env, nomad_options};
use ao_tests::{bare_repo, free_port, Cluster};
use serde_json::{json, Value};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
/// The model key: the worker's `agent.api_key` only.
const MODEL_KEY: &str = "sk-ant-nomad-proxy-0123456789abcdef";

/// A model call of the agent's to the model endpoint it was given, through the proxy
/// of its environment (`http_proxy`, with the attempt's token as the credentials);
/// prints the HTTP status. Its conversation holds one assistant message, so the
/// scripted model answers its step 1.
fn model_call() -> String {
    "curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
     -H 'anthropic-version: 2023-06-01' -H \"x-api-key: $ANTHROPIC_API_KEY\" \
     \"$ANTHROPIC_BASE_URL/v1/messages\" \
     -d '{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":10,\"messages\":[\
     {\"role\":\"user\",\"content\":\"x\"},{\"role\":\"assistant\",\"content\":\"y\"},\
     {\"role\":\"user\",\"content\":\"z\"}]}'"
        .to_string()
}

/// The agent's Bash command: dumps its environment where the test reads it, makes one
/// $1 model call through the proxy, tries the model endpoint straight without the token,
/// the proxy without credentials, and a host off the allow-list through the proxy.
fn attack(env_file: &std::path::Path) -> String {
    format!(
        "env > {env}; \
         echo \"paid=$({call})\"; \
         echo \"nokey=$(curl -s -o /dev/null -w '%{{http_code}}' --noproxy '*' \
           -H 'x-api-key: guessed' -H 'content-type: application/json' \
           \"$ANTHROPIC_BASE_URL/v1/messages\" -d '{{}}')\"; \
         echo \"noauth=$(curl -s -o /dev/null -w '%{{http_code}}' -m 10 \
           --proxy \"$ANTHROPIC_BASE_URL\" http://blocked.example.invalid/x)\"; \
         echo \"refused=$(curl -s -o /dev/null -w '%{{http_code}}' -m 10 \
           http://blocked.example.invalid/y)\"",
        env = env_file.display(),
        call = model_call()
    )
}

async fn events(c: &Cluster, id: &str) -> Vec<Value> {
    let (_, events) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .unwrap();
    events["events"].as_array().cloned().unwrap_or_default()
}

/// Claude Code in a Nomad sandbox, under a $0.50 budget: its first call runs the attack;
/// the attack's own model call costs $1.00 (333,334 input tokens at $3 per million);
/// Claude Code's next call is then past the budget. Before the proxy, the agent held
/// the model key (from the hand-over or the job's Nomad Variable), nothing refused a
/// call or a destination, and the booked cost was what the runner reported.
#[tokio::test(flavor = "multi_thread")]
async fn the_model_key_stays_with_the_workers_proxy_which_meters_and_limits_the_run() {
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let mut env = nomad_env(&addr);
    env.push(("AO__NOMAD__UNREACHABLE_SECS".into(), "5".into()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    let fake = FakeNomad::start_on(port, nomad_options(c.dir.path(), 2))
        .await
        .unwrap();
    fake.register_sandbox_job("coder").await.unwrap();
    let env_file = c.dir.path().join("agent-env.txt");
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool("Bash", json!({ "command": attack(&env_file) })),
            10,
            10,
        ),
        Turn::new(Step::text("done"), 333_334, 1),
    ])
    .await;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let cli = claude_cli().display().to_string();
    c.start_coordinator().await.unwrap();
    c.start_worker(&[
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__COMMAND", cli.as_str()),
        ("AO_TEST_MODEL_KEY", MODEL_KEY),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ("AO__AGENT__BASE_URL", model.url.as_str()),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__AGENT__PROFILES__CODER__MAX_COST_USD", "0.5"),
        ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
    ]);
    let (status, task) = c
        .submit(json!({
            "repository": repo.display().to_string(),
            "prompt": "Add a note",
            "pipeline": ["coder"],
            "branch": "agent/proxy"
        }))
        .await
        .unwrap();
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap().to_string();
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    let all = events(&c, &id).await;
    let text = serde_json::to_string(&all).unwrap();
    let logs = || format!("{done:#}\n{text}\n{}", c.logs());

    // The model saw the real key on every call, added by the proxy.
    let calls = model.requests();
    assert!(calls.len() >= 2, "{calls:?}\n{}", logs());
    for r in &calls {
        assert_eq!(r.api_key.as_deref(), Some(MODEL_KEY), "{}", logs());
    }
    // The agent's environment has a model endpoint and key, neither of them the model's.
    let agent_env = std::fs::read_to_string(&env_file)
        .unwrap_or_else(|e| panic!("no environment dump ({e}): {}", logs()));
    assert!(!agent_env.contains(MODEL_KEY), "{agent_env}");
    let base = agent_env
        .lines()
        .find_map(|l| l.strip_prefix("ANTHROPIC_BASE_URL="))
        .unwrap_or_else(|| panic!("{agent_env}"));
    assert_ne!(base, model.url, "{agent_env}");
    assert!(
        agent_env.contains("ANTHROPIC_API_KEY=") && agent_env.contains("HTTPS_PROXY=http://"),
        "{agent_env}"
    );
    // Nothing the fake Nomad holds or served has the key.
    for (where_, bytes) in fake.stored_bytes() {
        assert!(
            !bytes
                .windows(MODEL_KEY.len())
                .any(|w| w == MODEL_KEY.as_bytes()),
            "the model key is in {where_}"
        );
    }
    // The paid call went through; without the token the proxy refused, and never
    // forwarded; the host off the allow-list was refused and reported.
    assert!(text.contains("paid=200"), "{}", logs());
    assert!(text.contains("nokey=401"), "{}", logs());
    assert!(text.contains("noauth=407"), "{}", logs());
    assert!(text.contains("refused=403"), "{}", logs());
    let s = &done["subtasks"][0];
    let refused = &s["outcome"]["network_refused"]["refused"];
    assert!(
        refused
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["host"] == "blocked.example.invalid")),
        "{}",
        logs()
    );
    assert!(
        all.iter().any(|e| e["data"]["type"] == "network_denied"
            && e["data"]["event"]["host"] == "blocked.example.invalid"),
        "{}",
        logs()
    );
    // The budget is the proxy's: Claude Code's call after the $1 one was refused, and
    // the run is over budget at the metered cost, not at what the agent reported.
    assert_eq!(s["outcome"]["kind"], "budget_exceeded", "{}", logs());
    let cost = s["cost_usd"].as_f64().expect("cost");
    assert!((cost - 1.0).abs() < 0.01, "metered cost {cost}\n{}", logs());
    let costly = calls
        .iter()
        .filter(|r| {
            r.body["messages"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["role"] == "assistant"))
        })
        .count();
    assert_eq!(costly, 1, "{}", logs());
    // The token died with the attempt: its proxy is gone.
    let token = agent_env
        .lines()
        .find_map(|l| l.strip_prefix("ANTHROPIC_API_KEY="))
        .unwrap();
    let after = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", token)
        .body("{}")
        .send()
        .await;
    assert!(after.is_err(), "the proxy still answers: {after:?}");
    let v = fake.violations();
    assert!(v.is_empty(), "requests outside Nomad's API: {v:#?}");
}
