//! Sandbox overhead: the real coordinator and worker binaries on the SQLite backend.
//!
//! 1. Start overhead, driver start to agent exec: a subtask's `started_at` (stamped by
//!    the worker just before it calls the sandbox driver) to the moment the agent
//!    program runs (it prints its clock as its first line). This includes making the
//!    attempt's directory, starting the sandbox, the runner cloning a one-file local
//!    repository and checking out the branch. Measured for `bwrap` and, as the baseline
//!    without isolation, `process`.
//! 2. Memory of a worker running two subtasks at once with the real Claude Code CLI
//!    against the scripted model server: the worker daemon's RSS idle and at its peak,
//!    and the peak of the worker with its sandboxes (the agents included).
//!
//! Run with `cargo bench -p ao-tests --bench sandbox` (`make bench`). `AO_BENCH_RUNS`
//! sets the number of runs per driver (default 30).

use ao_tests::measure::{peak_rss_mib, percentile, rss_mib, tree_rss_mib};
use ao_tests::model_server::{find_claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::{bare_repo, script, Cluster};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const RUNS: usize = 30;
const LIMIT: Duration = Duration::from_secs(180);

async fn submit(c: &Cluster, repo: &str, branch: &str) -> String {
    let (status, task) = c
        .submit(
            json!({ "repository": repo, "prompt": "bench", "pipeline": "code",
                        "branch": branch }),
        )
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().expect("id").to_string()
}

fn timestamp(v: &Value) -> Option<f64> {
    let t = OffsetDateTime::parse(v.as_str()?, &Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// The agent's own clock reading, from its first output line.
async fn agent_exec_time(c: &Cluster, id: &str) -> Option<f64> {
    let (_, body) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .ok()?;
    body["events"].as_array()?.iter().find_map(|e| {
        e["data"]["event"]["message"]
            .as_str()?
            .strip_prefix("agent-exec ")?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// Driver start to agent exec, in ms, for `runs` subtasks one after another.
async fn start_overhead(driver: &str, runs: usize) -> Vec<f64> {
    let mut c = Cluster::new(&[
        ("AO__SANDBOX__DRIVER", driver),
        ("AO__WORKER__CONCURRENCY", "1"),
        ("RUST_LOG", "warn"),
    ]);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "echo \"agent-exec $(date +%s.%N)\"",
    );
    let repo = bare_repo(c.dir.path(), "bench", &[("README.md", "bench\n")])
        .display()
        .to_string();
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))]);
    let mut overheads = Vec::new();
    for i in 0..runs {
        let id = submit(&c, &repo, &format!("bench/{i}")).await;
        let task = c
            .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
            .await
            .expect("task ends");
        assert_eq!(task["status"], "succeeded", "{task:#}");
        let started = timestamp(&task["subtasks"][0]["started_at"]).expect("started_at");
        let exec = agent_exec_time(&c, &id).await.expect("agent-exec line");
        overheads.push((exec - started) * 1000.0);
    }
    overheads.sort_by(|a, b| a.total_cmp(b));
    overheads
}

/// Worker memory with two Claude Code subtasks running at once.
async fn two_subtask_memory() -> Option<(f64, f64, f64, f64)> {
    let cli = find_claude_cli()?;
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool("Write", json!({ "file_path": "a.txt", "content": "a\n" })),
            1000,
            100,
        ),
        Turn::new(
            Step::tool("Bash", json!({ "command": "sleep 3; echo slept" })),
            1000,
            100,
        ),
        Turn::new(Step::text("done"), 1000, 100),
    ])
    .await;
    let mut c = Cluster::new(&[
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__API_KEY", "env:AO_BENCH_MODEL_KEY"),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__WORKER__CONCURRENCY", "2"),
        ("RUST_LOG", "warn"),
    ]);
    c.env
        .push(("AO__AGENT__COMMAND".into(), cli.display().to_string()));
    c.env
        .push(("AO_BENCH_MODEL_KEY".into(), "sk-bench-0123456789".into()));
    c.env.push(("ANTHROPIC_BASE_URL".into(), model.url.clone()));
    let repo = bare_repo(c.dir.path(), "bench", &[("README.md", "bench\n")])
        .display()
        .to_string();
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let worker = c.workers[0].pid().as_raw();
    let idle = rss_mib(worker);
    let ids = [
        submit(&c, &repo, "bench/a").await,
        submit(&c, &repo, "bench/b").await,
    ];
    let mut tree_peak: f64 = 0.0;
    let deadline = Instant::now() + LIMIT;
    loop {
        tree_peak = tree_peak.max(tree_rss_mib(worker));
        let mut done = 0;
        for id in &ids {
            let t = c.task(id).await.expect("task");
            if t["status"] == "succeeded" || t["status"] == "failed" {
                assert_eq!(t["status"], "succeeded", "{t:#}");
                done += 1;
            }
        }
        if done == ids.len() {
            break;
        }
        assert!(Instant::now() < deadline, "runs did not end\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = rss_mib(worker);
    Some((idle, peak_rss_mib(worker), after, tree_peak))
}

#[tokio::main]
async fn main() {
    let runs = std::env::var("AO_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUNS);
    println!("sandbox start overhead, driver start to agent exec ({runs} runs each)");
    for driver in ["process", "bwrap"] {
        let v = start_overhead(driver, runs).await;
        println!(
            "  {driver:8} median {:6.1} ms   p99 {:6.1} ms   min {:6.1} ms   max {:6.1} ms",
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.first().copied().unwrap_or(f64::NAN),
            v.last().copied().unwrap_or(f64::NAN),
        );
    }
    match two_subtask_memory().await {
        Some((idle, peak, after, tree_peak)) => {
            println!("worker running two Claude Code subtasks at once (bwrap)");
            println!("  worker RSS idle {idle:.1} MiB, peak {peak:.1} MiB, after {after:.1} MiB");
            println!("  worker and its sandboxes together, peak {tree_peak:.1} MiB");
        }
        None => println!("worker memory: skipped, the Claude Code CLI is not installed"),
    }
}
