//! Load on the real coordinator and worker binaries (release build, SQLite backend):
//!
//! - idle: resident memory and CPU of the coordinator and of a worker doing nothing;
//! - backlog: how both grow as 10, 100 and 1,000 tasks wait in the queue (the worker serves
//!   another capability, so it keeps long-polling while the backlog stays);
//! - webhooks: signed `issues` deliveries (`labeled` with a label that starts nothing, so
//!   each is verified, parsed, queued to the webhook consumer and handled) posted open-loop
//!   at increasing rates; the sustained rate is the highest one the coordinator keeps up
//!   with (≥ 97 % of the offered rate answered 2xx, p99 under 250 ms). The load generator runs
//!   on the same 2 cores, so the figure is a floor.
//!
//! Run with `make bench` (or `cargo build --release --bins && cargo bench -p ao-tests --bench load`).
//! `AO_BENCH_WEBHOOK_RATES` (comma-separated, per second) and `AO_BENCH_STEP_SECS` change the steps.

use ao_tests::fake_github::sign;
use ao_tests::{script, Cluster};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECRET: &str = "bench-webhook-secret";
/// Webhook rates tried, per second, until one is not sustained.
const RATES: &[u32] = &[
    200, 400, 800, 1600, 3200, 6400, 9600, 12800, 16000, 20000, 25000,
];
/// A rate is sustained when this share of its deliveries is answered 2xx in the step…
const MIN_OK_SHARE: f64 = 0.97;
/// …and the 99th percentile latency stays under this.
const MAX_P99: Duration = Duration::from_millis(250);
/// Deliveries in flight at most (a client that never waits unboundedly).
const MAX_IN_FLIGHT: usize = 512;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// User + system CPU time of a process so far, in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(f64::NAN)
}

/// CPU use of each process over `window`, in percent of one core.
async fn cpu_percent(pids: &[i32], window: Duration) -> Vec<f64> {
    let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(p, b)| (cpu_secs(*p) - b) / secs * 100.0)
        .collect()
}

fn labeled_payload(n: u64) -> Vec<u8> {
    json!({
        "action": "labeled",
        "issue": {
            "number": n, "title": format!("Issue {n}"),
            "body": "Steps to reproduce:\n".repeat(100),
            "labels": [{ "name": "bug" }], "state": "open",
            "user": { "login": "octocat", "type": "User" }
        },
        "label": { "name": "bug" },
        "repository": { "name": "project", "full_name": "octo-org/project",
                        "owner": { "login": "octo-org" }, "default_branch": "main" },
        "sender": { "login": "octocat", "type": "User" },
        "installation": { "id": 42 }
    })
    .to_string()
    .into_bytes()
}

struct Step {
    rate: u32,
    sent: usize,
    ok: usize,
    other: usize,
    p50_ms: f64,
    p99_ms: f64,
    achieved: f64,
}

/// Posts deliveries at `rate` per second for `secs`, open loop.
async fn webhook_step(c: &Cluster, rate: u32, secs: u64) -> Step {
    let url = c.url("/webhooks/github");
    let total = (rate as u64 * secs) as usize;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut handles = Vec::with_capacity(total);
    let started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let body = labeled_payload(i as u64 + 1);
        let signature = sign(SECRET, &body);
        let (http, url, slots) = (c.http.clone(), url.clone(), slots.clone());
        handles.push(tokio::spawn(async move {
            let _permit = slots.acquire_owned().await.ok()?;
            let t = Instant::now();
            let r = http
                .post(&url)
                .header("content-type", "application/json")
                .header("x-github-event", "issues")
                .header("x-github-delivery", uuid::Uuid::new_v4().to_string())
                .header("x-hub-signature-256", signature)
                .body(body)
                .send()
                .await
                .ok()?;
            let ok = r.status().is_success();
            let _ = r.bytes().await;
            Some((ok, t.elapsed().as_secs_f64() * 1000.0))
        }));
    }
    let mut lat = Vec::with_capacity(total);
    let (mut ok, mut other) = (0, 0);
    for h in handles {
        match h.await.ok().flatten() {
            Some((true, ms)) => {
                ok += 1;
                lat.push(ms);
            }
            _ => other += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    Step {
        rate,
        sent: total,
        ok,
        other,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        achieved: ok as f64 / elapsed,
    }
}

fn env_list(var: &str) -> Option<Vec<u32>> {
    let v = std::env::var(var).ok()?;
    Some(v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
}

#[tokio::main]
async fn main() {
    let step_secs: u64 = std::env::var("AO_BENCH_STEP_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rates = env_list("AO_BENCH_WEBHOOK_RATES").unwrap_or_else(|| RATES.to_vec());
    let mut c = Cluster::new(&[
        ("AO__GITHUB__WEBHOOK_SECRET", "env:AO_BENCH_WEBHOOK_SECRET"),
        ("AO_BENCH_WEBHOOK_SECRET", SECRET),
        // Production-like intervals (the test harness shortens them).
        ("AO__COORDINATOR__DEPTH_POLL_SECS", "5"),
        ("AO__QUEUE__WAIT_SECS", "20"),
        ("RUST_LOG", "warn"),
    ]);
    let agent = script(c.dir.path(), "noop-agent.sh", "true");
    c.start_coordinator().await.expect("coordinator");
    // Serves only `docs`: the backlog of `coder` subtasks stays queued while it polls.
    c.start_worker(&[
        ("AO__AGENT__COMMAND", agent.to_str().expect("utf-8")),
        ("AO__WORKER__CAPABILITIES", "docs"),
    ]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let coordinator = c
        .coordinator
        .as_ref()
        .map(|d| d.pid().as_raw())
        .unwrap_or(0);
    let worker = c.workers[0].pid().as_raw();
    let pids = [coordinator, worker];
    let window = Duration::from_secs(10);

    println!("load, SQLite backend, release build, 2 cores shared with the load generator");
    let cpu = cpu_percent(&pids, window).await;
    println!(
        "idle:            coordinator {:.1} MiB RSS, {:.2} % CPU; worker {:.1} MiB RSS, {:.2} % CPU",
        rss_mib(coordinator),
        cpu[0],
        rss_mib(worker),
        cpu[1]
    );

    let mut queued = 0usize;
    for level in [10usize, 100, 1000] {
        let bodies: Vec<_> = (queued..level)
            .map(|i| json!({ "repository": "/srv/git/bench.git", "prompt": format!("task {i}"), "pipeline": "code" }))
            .collect();
        for chunk in bodies.chunks(50) {
            let sent = chunk.iter().map(|b| c.submit(b.clone()));
            for r in futures::future::join_all(sent).await {
                let (status, body) = r.expect("submit");
                assert_eq!(status, 202, "{body}");
            }
        }
        queued = level;
        // Let the next depth poll and any sweep see the backlog, then measure at rest.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let cpu = cpu_percent(&pids, window).await;
        println!(
            "{level:>5} queued:    coordinator {:.1} MiB RSS, {:.2} % CPU; worker {:.1} MiB RSS, {:.2} % CPU",
            rss_mib(coordinator),
            cpu[0],
            rss_mib(worker),
            cpu[1]
        );
    }

    println!("webhooks (issues.labeled, {step_secs} s per step, open loop):");
    let mut sustained = None;
    for rate in rates {
        let s = webhook_step(&c, rate, step_secs).await;
        let good = s.ok as f64 >= s.sent as f64 * MIN_OK_SHARE
            && s.achieved >= s.rate as f64 * MIN_OK_SHARE
            && s.p99_ms <= MAX_P99.as_secs_f64() * 1000.0;
        println!(
            "  {:>5}/s offered: {:>6.0}/s answered 2xx, {} of {} not 2xx, p50 {:.1} ms, p99 {:.1} ms{}",
            s.rate,
            s.achieved,
            s.other,
            s.sent,
            s.p50_ms,
            s.p99_ms,
            if good { "" } else { "  <- not sustained" }
        );
        if !good {
            break;
        }
        sustained = Some(s);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    match sustained {
        Some(s) => println!(
            "sustained webhook rate: {}/s (p50 {:.1} ms, p99 {:.1} ms); coordinator RSS after: {:.1} MiB",
            s.rate,
            s.p50_ms,
            s.p99_ms,
            rss_mib(coordinator)
        ),
        None => println!("no webhook rate was sustained\n{}", c.logs()),
    }
    // Every delivery answered 2xx was really taken in (counted by the coordinator).
    let metrics = c.metrics().await.expect("metrics");
    let accepted = metrics
        .lines()
        .find(|l| {
            l.starts_with("ao_webhook_deliveries_total{event=\"issues\",result=\"accepted\"}")
        })
        .unwrap_or("ao_webhook_deliveries_total: not found");
    println!("coordinator: {accepted}");
}
