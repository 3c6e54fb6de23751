//! Chaos: N one-step tasks through the real coordinator and worker binaries while the
//! bench SIGKILLs workers and the coordinator (and starts them again), SIGSTOPs a worker
//! past the visibility timeout (then SIGCONT), cuts the AWS endpoint (a TCP relay in
//! front of moto_server, stopped and started again), and takes results off the result
//! queue to send them again twice, late (duplicated and reordered results). Once every
//! task has ended, or the time is up, it prints what happened, each figure from evidence
//! outside the product's own counters:
//!
//! - tasks submitted, succeeded, failed, and lost (not ended when the bench gave up);
//! - runs that pushed twice for one attempt: every push is logged by the repository's
//!   `post-receive` hook, and each pushed commit names its subtask and attempt
//!   (`Subtask: <id> (attempt N)`), read back with `git log`;
//! - results applied twice: the stored `subtask_status` events of each task (`succeeded`
//!   recorded more than once for one subtask);
//! - spend booked (the store's spend account of API tasks) against the spend the agents
//!   reported (each agent run appends the cost it prints to a ledger just before it
//!   prints it, with whether its runner's parent is still a worker); runs whose worker
//!   was SIGKILLed under them (the runner orphaned, nobody left to report) are counted
//!   apart.
//!
//! The agent is a script speaking Claude Code's stream-json (`agent.kind = "claude"`): it
//! sleeps a little, writes a file, and ends with a `result` carrying a cost.
//!
//! Run with `make bench` (or `cargo build --release --bins && cargo bench -p ao-tests
//! --bench chaos`). Settings (environment): `AO_CHAOS_BACKENDS` (`sqlite,moto`),
//! `AO_CHAOS_SQLITE_TASKS` (200), `AO_CHAOS_MOTO_TASKS` (50), `AO_CHAOS_WORKERS` (2),
//! `AO_CHAOS_VISIBILITY_SECS` (4), `AO_CHAOS_EVERY_MS` (between two faults, 1500),
//! `AO_CHAOS_LIMIT_SECS` (the most a backend's run may take, 600), `AO_CHAOS_SEED`;
//! `AO_CHAOS_LOGS` prints the daemons' logs (filter: `AO_CHAOS_RUST_LOG`, default `warn`).

use ao_shared::backend::Backends;
use ao_shared::config::Settings;
use ao_shared::queue::{Queue, QueueId, Received};
use ao_tests::moto::{unique, Moto};
use ao_tests::relay::Relay;
use ao_tests::{bare_repo, git, script, Cluster};
use nix::sys::signal::Signal;
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (xorshift64*), seeded per run and printed, so that a
/// run can be repeated with `AO_CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Moto,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Moto => "SQS + DynamoDB (moto)",
        }
    }
}

/// How many of each fault were caused.
#[derive(Default)]
struct Faults {
    worker_kills: u32,
    coordinator_kills: u32,
    worker_stops: u32,
    outages: u32,
    results_replayed: Arc<AtomicU64>,
}

/// The agent: Claude Code's stream-json, a short run, a cost per run of 1 to 9 thousandths
/// of a dollar, appended to `ledger` just before the result that reports it.
fn agent(dir: &Path, ledger: &Path) -> PathBuf {
    script(
        dir,
        "agent.sh",
        &format!(
            "cat > /dev/null || true\n\
             sleep 0.$((RANDOM % 8 + 1))\n\
             echo \"$AO_SUBTASK_ID $AO_ATTEMPT $$ $RANDOM\" > result.txt\n\
             cost=0.00$((RANDOM % 9 + 1))\n\
             echo '{{\"type\":\"system\",\"subtype\":\"init\",\"model\":\"claude-sonnet-4-5\"}}'\n\
             runner_parent=$(awk '{{print $4}}' /proc/$PPID/stat)\n\
             if [ \"$(cat /proc/$runner_parent/comm 2>/dev/null)\" = worker ]; then orphan=0; else orphan=1; fi\n\
             echo \"$AO_SUBTASK_ID $AO_ATTEMPT $cost $orphan\" >> {ledger}\n\
             echo \"{{\\\"type\\\":\\\"result\\\",\\\"subtype\\\":\\\"success\\\",\\\"is_error\\\":false,\\\"result\\\":\\\"done\\\",\\\"num_turns\\\":1,\\\"total_cost_usd\\\":$cost}}\"",
            ledger = ledger.display()
        ),
    )
}

/// A bare repository whose `post-receive` hook appends every ref update
/// (`<old> <new> <ref>`) to the returned log.
fn logged_repo(dir: &Path) -> (PathBuf, PathBuf) {
    let repo = bare_repo(dir, "project", &[]);
    let pushes = dir.join("pushes.log");
    let hook = repo.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!("#!/usr/bin/env bash\ncat >> {}\n", pushes.display()),
    )
    .expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("hook mode");
    (repo, pushes)
}

/// Takes results off the result queue now and then (competing with the coordinator for
/// them), holds each for up to 3 s, sends it twice and deletes the original: results
/// arrive twice, and after results sent later. A report already replayed is put back. Stops, flushing what it holds, when
/// `stop` is set.
async fn replay_results(queue: Arc<dyn Queue>, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()));
    let mut held: Vec<(Instant, Received)> = Vec::new();
    let mut replayed: HashSet<String> = HashSet::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping && rng.below(4) == 0 {
            if let Ok(got) = queue
                .receive(
                    &[QueueId::Results],
                    2,
                    Duration::from_millis(200),
                    Duration::from_secs(60),
                )
                .await
            {
                for m in got {
                    // Each report is replayed once: copies of copies would grow without end.
                    if !replayed.insert(m.body.clone()) {
                        let _ = queue.release(&m.receipt).await;
                        continue;
                    }
                    let due = Instant::now() + Duration::from_millis(200 + rng.below(2800));
                    held.push((due, m));
                }
            }
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            held.drain(..).partition(|(at, _)| stopping || *at <= now);
        held = later;
        for (_, m) in due {
            for _ in 0..2 {
                while queue.send(QueueId::Results, &m.body).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let _ = queue.delete(&m.receipt).await;
            count.fetch_add(1, Ordering::Relaxed);
        }
        if stopping && held.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The statuses of `ids` the API could read now (a task it could not read is absent).
async fn statuses(c: &Cluster, ids: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(25) {
        let got = futures::future::join_all(chunk.iter().map(|id| async move {
            let (status, body) = c.get_json(&format!("/api/v1/tasks/{id}")).await.ok()?;
            let status_of = body["status"].as_str()?.to_string();
            (status == 200).then(|| (id.clone(), status_of))
        }))
        .await;
        out.extend(got.into_iter().flatten());
    }
    out
}

fn ended(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// Pushes per (subtask, attempt), from the hook's log and the pushed commits' messages.
fn pushes_per_attempt(repo: &Path, log: &Path) -> BTreeMap<String, u32> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(new) = line.split_whitespace().nth(1) else {
            continue;
        };
        if new.chars().all(|c| c == '0') {
            continue;
        }
        let message = git(repo, &["log", "-1", "--format=%B", new]);
        for l in message.lines().filter(|l| l.starts_with("Subtask: ")) {
            *out.entry(l.to_string()).or_insert(0) += 1;
        }
    }
    out
}

/// `subtask_status: succeeded` events per subtask of the task `id` (from the store,
/// through the API).
async fn successes_per_subtask(c: &Cluster, id: &str) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for _ in 0..30 {
        let Ok((200, body)) = c
            .get_json(&format!("/api/v1/tasks/{id}/events?limit=10000"))
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        for e in body["events"].as_array().into_iter().flatten() {
            if e["data"]["type"] == "subtask_status" && e["data"]["status"] == "succeeded" {
                let sub = e["subtask_id"].as_str().unwrap_or("?").to_string();
                *out.entry(sub).or_insert(0) += 1;
            }
        }
        return out;
    }
    panic!("the events of {id} could not be read");
}

/// The backends as the bench itself opens them (on AWS straight at moto_server, not
/// through the relay: the replayed results are not cut by the outages).
async fn open_backends(env: &[(String, String)]) -> Backends {
    let settings = Settings::load_from(None, env.to_vec()).expect("settings");
    ao_tests::inproc::open_backends(&settings, env)
        .await
        .expect("backends")
}

async fn run(backend: Backend, n: usize, seed: u64) {
    let workers = env_u64("AO_CHAOS_WORKERS", 2) as usize;
    let visibility = env_u64("AO_CHAOS_VISIBILITY_SECS", 4);
    let every = Duration::from_millis(env_u64("AO_CHAOS_EVERY_MS", 1500));
    let limit = Duration::from_secs(env_u64("AO_CHAOS_LIMIT_SECS", 600));
    let mut rng = Rng(seed | 1);

    let moto = (backend == Backend::Moto).then(Moto::start);
    let mut relay = None;
    let mut relay_addr: Option<(SocketAddr, SocketAddr)> = None;
    let mut backend_env: Vec<(String, String)> = Vec::new();
    let mut direct_env: Vec<(String, String)> = Vec::new();
    if let Some(moto) = &moto {
        let target: SocketAddr = moto
            .endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("moto address");
        let addr: SocketAddr = format!("127.0.0.1:{}", ao_tests::free_port())
            .parse()
            .expect("relay address");
        relay = Some(Relay::start(addr, target).await);
        relay_addr = Some((addr, target));
        let prefix = unique("chaos");
        backend_env = moto
            .env(&prefix)
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "AO__AWS__ENDPOINT_URL" => (k, format!("http://{addr}")),
                _ => (k, v),
            })
            .collect();
        // The coordinator makes the queues and the table; the bench only uses them.
        direct_env = moto
            .env(&prefix)
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "AO__AWS__CREATE_RESOURCES" => (k, "false".to_string()),
                _ => (k, v),
            })
            .collect();
    }
    let visibility_s = visibility.to_string();
    let mut extra: Vec<(&str, &str)> = backend_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    extra.extend_from_slice(&[
        ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", visibility_s.as_str()),
        ("AO__QUEUE__HEARTBEAT_SECS", "1"),
        ("AO__QUEUE__MAX_RECEIVES", "5"),
        ("AO__COORDINATOR__RECOVERY_STALE_SECS", "30"),
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__TIMEOUT_SECS", "60"),
        ("AO__AGENT__IDLE_TIMEOUT_SECS", "30"),
        // Claude Code refuses `bypassPermissions` as root; the script does not care.
        ("AO__AGENT__PROFILES__CODER__PERMISSION_MODE", "acceptEdits"),
        ("AO__WORKER__CAPABILITIES", "coder"),
        ("AO__WORKER__CONCURRENCY", "4"),
        ("AO__WORKER__SHUTDOWN_GRACE_SECS", "1"),
    ]);
    let log_filter = std::env::var("AO_CHAOS_RUST_LOG").unwrap_or_else(|_| "warn".into());
    extra.push(("RUST_LOG", log_filter.as_str()));
    let mut c = Cluster::new(&extra);
    let dir = c.dir.path().to_path_buf();
    let ledger = dir.join("ledger.log");
    let agent = agent(&dir, &ledger);
    let agent_s = agent.display().to_string();
    let (repo, push_log) = logged_repo(&dir);
    c.start_coordinator().await.expect("coordinator");
    for _ in 0..workers {
        c.start_worker(&[("AO__AGENT__COMMAND", agent_s.as_str())]);
    }
    let mut mine_env = c.env.clone();
    for (k, v) in &direct_env {
        mine_env.retain(|(key, _)| key != k);
        mine_env.push((k.clone(), v.clone()));
    }
    let mine = open_backends(&mine_env).await;
    let faults = Faults::default();
    let stop_replay = Arc::new(AtomicBool::new(false));
    let replay = tokio::spawn(replay_results(
        mine.queue.clone(),
        stop_replay.clone(),
        faults.results_replayed.clone(),
    ));

    let started = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (status, task) = c
            .submit(json!({ "repository": repo.display().to_string(),
                            "prompt": format!("chaos {i}"), "pipeline": "code",
                            "branch": format!("agent/chaos-{i}") }))
            .await
            .expect("submit");
        assert_eq!(status, 202, "{task}");
        ids.push(task["id"].as_str().expect("id").to_string());
    }
    let mut faults = faults;
    let mut last: HashMap<String, String> = HashMap::new();
    // The coordinator's log starts afresh at each restart: what came before is kept here.
    let mut earlier_logs = String::new();
    while started.elapsed() < limit {
        tokio::time::sleep(every).await;
        match rng.below(100) {
            0..=29 => {
                let live: Vec<usize> = (0..c.workers.len())
                    .filter(|i| c.workers[*i].child.is_some())
                    .collect();
                let w = live[rng.below(live.len() as u64) as usize];
                c.workers[w].kill_hard();
                c.start_worker(&[("AO__AGENT__COMMAND", agent_s.as_str())]);
                faults.worker_kills += 1;
            }
            30..=44 => {
                earlier_logs.push_str(&c.coordinator_log());
                if let Some(d) = c.coordinator.as_mut() {
                    d.kill_hard();
                }
                c.start_coordinator().await.expect("coordinator restarts");
                faults.coordinator_kills += 1;
            }
            45..=59 => {
                let live: Vec<usize> = (0..c.workers.len())
                    .filter(|i| c.workers[*i].child.is_some())
                    .collect();
                let w = live[rng.below(live.len() as u64) as usize];
                c.workers[w].signal(Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_secs(visibility + 2)).await;
                c.workers[w].signal(Signal::SIGCONT);
                faults.worker_stops += 1;
            }
            60..=74 => {
                if let (Some(r), Some((addr, target))) = (relay.take(), relay_addr) {
                    r.stop().await;
                    tokio::time::sleep(Duration::from_millis(2000 + rng.below(3000))).await;
                    relay = Some(Relay::start(addr, target).await);
                    faults.outages += 1;
                }
            }
            _ => {}
        }
        last = statuses(&c, &ids).await;
        if last.len() == ids.len() && last.values().all(|s| ended(s)) {
            break;
        }
    }
    // No more faults: what is left must still end, with every result (the replayed
    // ones too) handled.
    stop_replay.store(true, Ordering::Relaxed);
    let _ = replay.await;
    let settle = Instant::now() + Duration::from_secs(120);
    while Instant::now() < settle {
        last = statuses(&c, &ids).await;
        let d = mine.queue.depth(QueueId::Results).await.ok();
        let drained = d.is_some_and(|d| d.visible + d.in_flight == 0);
        if drained && last.len() == ids.len() && last.values().all(|s| ended(s)) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let elapsed = started.elapsed();

    let count = |s: &str| last.values().filter(|v| v.as_str() == s).count();
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !last.get(*id).is_some_and(|s| ended(s)))
        .collect();
    let pushes = pushes_per_attempt(&repo, &push_log);
    let pushed_twice: Vec<(&String, &u32)> = pushes.iter().filter(|(_, n)| **n > 1).collect();
    let mut applied_twice = 0;
    let mut total_successes = 0;
    for id in &ids {
        for n in successes_per_subtask(&c, id).await.values() {
            total_successes += n;
            if *n > 1 {
                applied_twice += 1;
            }
        }
    }
    let runs: Vec<(String, String, f64, bool)> = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.to_string(),
                f.next()?.to_string(),
                f.next()?.parse().ok()?,
                f.next()? == "1",
            ))
        })
        .collect();
    let micros = |orphaned: bool| -> u64 {
        runs.iter()
            .filter(|r| r.3 == orphaned)
            .map(|r| (r.2 * 1e6).round() as u64)
            .sum()
    };
    let reported_micros = micros(false);
    let orphaned_micros = micros(true);
    let orphaned_runs = runs.iter().filter(|r| r.3).count();
    let now = time::OffsetDateTime::now_utc();
    let month = format!("{:04}-{:02}", now.year(), u8::from(now.month()));
    let booked_micros = mine.store.spend("api", &month).await.expect("spend");
    let attempts_run: HashSet<(&String, &String)> = runs.iter().map(|r| (&r.0, &r.1)).collect();

    println!(
        "chaos, {}: {n} one-step tasks, {workers} workers × 4 slots, visibility {visibility} s, seed {seed}",
        backend.name()
    );
    println!(
        "  faults: {} worker SIGKILLs, {} coordinator SIGKILLs, {} worker SIGSTOPs of {} s, \
         {} endpoint outages, {} results replayed twice and late",
        faults.worker_kills,
        faults.coordinator_kills,
        faults.worker_stops,
        visibility + 2,
        faults.outages,
        faults.results_replayed.load(Ordering::Relaxed)
    );
    println!(
        "  submitted {n}, succeeded {}, failed {}, cancelled {}, lost {} (must be 0), in {:.0} s",
        count("succeeded"),
        count("failed"),
        count("cancelled"),
        lost.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "  agent runs {} (of {} attempts), pushes {}, runs that pushed twice for one attempt {} (must be 0)",
        runs.len(),
        attempts_run.len(),
        pushes.values().sum::<u32>(),
        pushed_twice.len()
    );
    println!(
        "  successes recorded {total_successes}, results applied twice {applied_twice} (must be 0)"
    );
    println!(
        "  spend booked ${:.6}, reported by the agents of live workers ${:.6} ({})",
        booked_micros as f64 / 1e6,
        reported_micros as f64 / 1e6,
        if booked_micros == reported_micros {
            "equal".to_string()
        } else {
            format!(
                "differ by ${:.6}",
                (reported_micros as f64 - booked_micros as f64) / 1e6
            )
        }
    );
    println!(
        "  runs left running by a SIGKILLed worker (runner orphaned, never reported): {orphaned_runs}, ${:.6}",
        orphaned_micros as f64 / 1e6
    );
    for (attempt, n) in &pushed_twice {
        println!("  pushed {n} times: {attempt}");
    }
    for id in &lost {
        println!("  lost: {id} ({:?})", last.get(*id));
    }
    if !lost.is_empty() || std::env::var_os("AO_CHAOS_LOGS").is_some() {
        println!(
            "--- ledger ---\n{}",
            std::fs::read_to_string(&ledger).unwrap_or_default()
        );
        println!(
            "--- coordinator, before its restarts ---\n{earlier_logs}\n{}",
            c.logs()
        );
    }
    if let Some(r) = relay {
        r.stop().await;
    }
}

#[tokio::main]
async fn main() {
    let seed = env_u64(
        "AO_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    let backends = std::env::var("AO_CHAOS_BACKENDS").unwrap_or_else(|_| "sqlite,moto".into());
    for b in backends.split(',').map(str::trim) {
        match b {
            "sqlite" => {
                run(
                    Backend::Sqlite,
                    env_u64("AO_CHAOS_SQLITE_TASKS", 200) as usize,
                    seed,
                )
                .await
            }
            "moto" => {
                run(
                    Backend::Moto,
                    env_u64("AO_CHAOS_MOTO_TASKS", 50) as usize,
                    seed,
                )
                .await
            }
            other => panic!("AO_CHAOS_BACKENDS: unknown backend {other:?} (sqlite, moto)"),
        }
    }
}
