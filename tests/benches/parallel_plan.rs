//! Parallel workers against a chain: a plan of `k` independent coder steps whose agents
//! (the real Claude Code CLI in bubblewrap, against the scripted model) each take `T`
//! seconds — a scripted model delay — run on `k` workers, against the same `k` steps
//! chained (each depends on the one before). For k = 2 and 4 it prints the time the
//! plan's steps took (first step started → last step finished), its ratio to `k·T`
//! (what a chain cannot beat) and to the measured chain. A parallel plan finishes in
//! about `T` plus overhead: a ratio to `k·T` near `1/k`.
//!
//! `AO_BENCH_STEP_SECS` sets `T` (default 5). Run with `make bench` (or `cargo build
//! --release --bins && cargo bench -p ao-tests --bench parallel_plan`).

use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::{bare_repo, Cluster};
use serde_json::{json, Value};
use std::time::Duration;

/// The longest a planned task may take here.
const LIMIT: Duration = Duration::from_secs(600);

fn step_secs() -> u64 {
    std::env::var("AO_BENCH_STEP_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// The planner's reply: `k` coder steps, each writing its own file; chained or not.
fn plan_reply(k: usize, chained: bool) -> String {
    let steps: Vec<Value> = (1..=k)
        .map(|i| {
            let depends_on: Vec<String> = if chained && i > 1 {
                vec![format!("s{}", i - 1)]
            } else {
                Vec::new()
            };
            json!({"id": format!("s{i}"), "capability": "coder", "title": format!("Write f{i}.txt"),
                   "instructions": format!("Create f{i}.txt."), "paths": [format!("f{i}.txt")],
                   "depends_on": depends_on})
        })
        .collect();
    let plan = json!({"version": 1, "summary": "Independent files.", "steps": steps});
    format!("The plan.\n```json\n{plan:#}\n```\n")
}

/// The script of step `i`: a model turn that takes `delay`, then its report.
fn writer(i: usize, delay: Duration) -> Vec<Turn> {
    vec![
        Turn::new(
            Step::Delay(
                delay,
                Box::new(Step::tool(
                    "Write",
                    json!({ "file_path": format!("f{i}.txt"), "content": format!("{i}\n") }),
                )),
            ),
            100,
            20,
        ),
        Turn::new(Step::text(&format!("Wrote f{i}.txt.")), 100, 20),
    ]
}

fn time(v: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        v.as_str().expect("a timestamp"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339")
}

/// Runs one planned task of `k` steps on `k` workers; the seconds from the first plan
/// step's start to the last one's end.
async fn run(k: usize, chained: bool, delay: Duration) -> f64 {
    let routes = (1..=k)
        .map(|i| {
            (
                format!("Your step of the plan: s{i} (coder)"),
                writer(i, delay),
            )
        })
        .collect();
    let model = ModelServer::start_routed(
        vec![Turn::new(Step::text(&plan_reply(k, chained)), 500, 300)],
        routes,
    )
    .await;
    let cli = claude_cli().display().to_string();
    let parallel = k.to_string();
    let mut c = Cluster::new(&[
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ("AO__AGENT__PROFILES__PLANNER__MODEL", MODEL),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
        ("AO__WORKER__CONCURRENCY", "1"),
        ("AO__PLANNER__MAX_PARALLEL", &parallel),
        ("AO__PLANNER__MAX_STEPS", "8"),
        ("RUST_LOG", "warn"),
    ]);
    c.env.push(("AO__AGENT__COMMAND".into(), cli));
    c.env.push((
        "AO_TEST_MODEL_KEY".into(),
        "sk-ant-test-0123456789abcdef".into(),
    ));
    c.env.push(("ANTHROPIC_BASE_URL".into(), model.url.clone()));
    c.start_coordinator().await.expect("coordinator");
    for _ in 0..k {
        c.start_worker(&[]);
    }
    let repo = bare_repo(c.dir.path(), "bench", &[("README.md", "bench\n")]);
    let (status, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "Write the files.",
            "pipeline": ["planner", "coder"] }),
        )
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().expect("id").to_string();
    let task = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends");
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
    let steps: Vec<&Value> = task["subtasks"]
        .as_array()
        .expect("subtasks")
        .iter()
        .filter(|s| s["step"]["kind"] == "plan")
        .collect();
    assert_eq!(steps.len(), k, "{task:#}");
    let first = steps
        .iter()
        .map(|s| time(&s["started_at"]))
        .min()
        .expect("a step");
    let last = steps
        .iter()
        .map(|s| time(&s["finished_at"]))
        .max()
        .expect("a step");
    model.stop();
    (last - first).as_seconds_f64()
}

#[tokio::main]
async fn main() {
    let t = step_secs();
    let delay = Duration::from_secs(t);
    println!(
        "a plan of k independent steps, each agent {t} s (scripted model delay), on k workers \
         (real Claude Code CLI in bubblewrap, SQLite backend), against the same steps chained"
    );
    for k in [2usize, 4] {
        let parallel = run(k, false, delay).await;
        let chained = run(k, true, delay).await;
        let kt = (k as u64 * t) as f64;
        println!(
            "k = {k}: parallel {parallel:.1} s, chained {chained:.1} s, k·T = {kt:.0} s; \
             parallel / k·T = {:.2} (ideal {:.2}), parallel / chained = {:.2}",
            parallel / kt,
            1.0 / k as f64,
            parallel / chained
        );
    }
}
