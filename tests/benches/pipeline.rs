//! Orchestration overhead on the SQLite backend with a no-op agent: the real coordinator
//! and worker binaries, a local bare repository, and an agent that only records when it
//! started. Prints subtasks per second end to end and the latency from submitting a task
//! to its agent starting (median, p99), for tasks one at a time and for a burst.
//!
//! Run with `make bench` (or `cargo build --release --bins && cargo bench -p ao-tests --bench pipeline`).

use ao_tests::measure::{percentile, rss_mib};
use ao_tests::{bare_repo, script, Cluster};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Tasks submitted one after another, each waited for (`AO_BENCH_SEQUENTIAL` overrides).
const SEQUENTIAL: usize = 30;
/// Tasks submitted at once (`AO_BENCH_BURST` overrides).
const BURST: usize = 200;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
/// Subtasks a worker runs at once.
const CONCURRENCY: &str = "4";

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

async fn submit(c: &Cluster, repo: &str) -> (String, u128) {
    let t = now_ns();
    let (status, task) = c
        .submit(json!({ "repository": repo, "prompt": "noop", "pipeline": "code" }))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    (task["id"].as_str().expect("id").to_string(), t)
}

/// Succeeded tasks, counted over every page of the listing.
async fn count_succeeded(c: &Cluster) -> usize {
    let mut done = 0;
    let mut cursor = String::new();
    loop {
        let path = format!("/api/v1/tasks?status=succeeded&limit=200{cursor}");
        let (_, list) = c.get_json(&path).await.expect("list");
        done += list["tasks"].as_array().map(|a| a.len()).unwrap_or(0);
        match list["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return done,
        }
    }
}

async fn wait_all_done(c: &Cluster, n: usize) {
    let deadline =
        Instant::now() + Duration::from_secs(count("AO_BENCH_DEADLINE_SECS", 300) as u64);
    let mut last_report = Instant::now();
    loop {
        let done = count_succeeded(c).await;
        let (_, failed) = c
            .get_json("/api/v1/tasks?status=failed&limit=1")
            .await
            .expect("list");
        assert!(
            failed["tasks"].as_array().is_none_or(|a| a.is_empty()),
            "a task failed: {failed}\n{}",
            c.logs()
        );
        if done >= n {
            return;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("… {done}/{n} tasks done");
            last_report = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "only {done}/{n} done\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn latencies(starts_dir: &std::path::Path, submitted: &HashMap<String, u128>) -> Vec<f64> {
    let mut v: Vec<f64> = submitted
        .iter()
        .filter_map(|(id, t0)| {
            let text = std::fs::read_to_string(starts_dir.join(id)).ok()?;
            let t1: u128 = text.trim().parse().ok()?;
            Some((t1.saturating_sub(*t0)) as f64 / 1e6)
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

#[tokio::main]
async fn main() {
    let (sequential, burst_n) = (
        count("AO_BENCH_SEQUENTIAL", SEQUENTIAL),
        count("AO_BENCH_BURST", BURST),
    );
    let mut c = Cluster::new(&[
        ("AO__WORKER__CONCURRENCY", CONCURRENCY),
        ("AO__QUEUE__WAIT_SECS", "20"),
        ("RUST_LOG", "warn"),
    ]);
    let starts = c.dir.path().join("starts");
    std::fs::create_dir_all(&starts).expect("starts dir");
    let agent = script(
        c.dir.path(),
        "noop-agent.sh",
        &format!("date +%s%N > {}/\"$AO_TASK_ID\"", starts.display()),
    );
    let repo = bare_repo(c.dir.path(), "bench", &[]).display().to_string();
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let coordinator_pid = c
        .coordinator
        .as_ref()
        .map(|d| d.pid().as_raw())
        .unwrap_or(0);
    let worker_pid = c.workers[0].pid().as_raw();
    let idle = (rss_mib(coordinator_pid), rss_mib(worker_pid));

    // One at a time: the latency of the loop itself.
    let mut submitted = HashMap::new();
    let t = Instant::now();
    for i in 0..sequential {
        let (id, t0) = submit(&c, &repo).await;
        submitted.insert(id, t0);
        wait_all_done(&c, i + 1).await;
    }
    let seq_elapsed = t.elapsed();
    let seq = latencies(&starts, &submitted);

    // A burst: throughput and latency under a backlog.
    let mut burst_ids = HashMap::new();
    let t = Instant::now();
    let futures: Vec<_> = (0..burst_n).map(|_| submit(&c, &repo)).collect();
    for (id, t0) in futures::future::join_all(futures).await {
        burst_ids.insert(id, t0);
    }
    let submit_elapsed = t.elapsed();
    wait_all_done(&c, sequential + burst_n).await;
    let burst_elapsed = t.elapsed();
    let burst = latencies(&starts, &burst_ids);
    let peak = (rss_mib(coordinator_pid), rss_mib(worker_pid));

    println!("orchestration overhead, SQLite backend, no-op agent, 1 worker x {CONCURRENCY} slots, process driver");
    println!("sequential: {sequential} tasks in {:.2} s = {:.1} subtasks/s; submit→agent start median {:.0} ms, p99 {:.0} ms",
        seq_elapsed.as_secs_f64(), sequential as f64 / seq_elapsed.as_secs_f64(),
        percentile(&seq, 0.5), percentile(&seq, 0.99));
    println!("burst:      {burst_n} tasks submitted in {:.2} s, all done in {:.2} s = {:.1} subtasks/s; submit→agent start median {:.0} ms, p99 {:.0} ms",
        submit_elapsed.as_secs_f64(), burst_elapsed.as_secs_f64(),
        burst_n as f64 / burst_elapsed.as_secs_f64(),
        percentile(&burst, 0.5), percentile(&burst, 0.99));
    println!("RSS: coordinator idle {:.1} MiB, after burst {:.1} MiB; worker idle {:.1} MiB, after burst {:.1} MiB",
        idle.0, peak.0, idle.1, peak.1);
}
