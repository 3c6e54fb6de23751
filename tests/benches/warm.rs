//! Warm workers, with the real coordinator and worker binaries on the `bwrap` driver:
//!
//! 1. On a generated repository of about 100 MB of packed history (`AO_BENCH_REPO_MB`):
//!    a plain `git clone` (median), the start of a subtask on a cold worker (no mirror)
//!    and on a warm one (its mirror is there), submit to the agent's first line; and the
//!    ratio warm / clone (goal: at most 0.5).
//! 2. A repository whose `agent-setup.sh` takes 5 s: the total setup time of a five-step
//!    pipeline without the setup cache (cold) and with it, once it holds the result
//!    (warm; goal: at most 10 % of cold), from the runner's own timings.
//! 3. Submit to the agent's first model request, with the real Claude Code CLI against
//!    the scripted model server, against the CLI started alone on the same machine
//!    (goal: ratio at most 1.2).
//!
//! Run with `make bench`, or `cargo build --release --bins && cargo bench -p ao-tests
//! --bench warm`. `AO_BENCH_WARM_RUNS` sets the runs per median (default 5),
//! `AO_BENCH_WARM_PARTS` the parts to run (`starts,setup,model`, all by default). Each
//! start is also broken down into phases (queue, mirror, sandbox and runner start,
//! working copy, setup, agent start), from the times the worker saw each runner line.

use ao_tests::measure::percentile;
use ao_tests::model_server::{find_claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::{bare_repo, git, script, Cluster};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const RUNS: usize = 5;
const LIMIT: Duration = Duration::from_secs(600);
/// Files in the generated repository.
const FILES: usize = 4000;
/// Steps of the setup pipeline.
const STEPS: usize = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 0.5)
}

/// A bare repository of about `mb` MiB of packed history: `FILES` files of random
/// (incompressible) bytes, then commits that each rewrite a slice of them.
fn generate_repo(dir: &Path, mb: usize) -> PathBuf {
    let bare = dir.join("big.git");
    git(dir, &["init", "--quiet", "--bare", "-b", "main", "big.git"]);
    let total = mb * 1024 * 1024;
    let first = total / 2;
    let file_size = first / FILES;
    let per_commit = FILES / 20;
    let commits = (total - first) / (per_commit * file_size).max(1);
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(&bare)
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    let mut input = std::io::BufWriter::new(child.stdin.take().expect("stdin"));
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut random = |n: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(n);
        out
    };
    let mut write_commit = |input: &mut dyn Write, n: usize, files: &[usize]| {
        let mut body = Vec::new();
        for f in files {
            let data = random(file_size);
            write!(
                body,
                "M 100644 inline src/{:02}/f{f}.bin\ndata {}\n",
                f % 50,
                data.len()
            )
            .expect("write");
            body.extend_from_slice(&data);
            body.push(b'\n');
        }
        let message = format!("commit {n}");
        write!(
            input,
            "commit refs/heads/main\ncommitter bench <bench@example.com> {} +0000\ndata {}\n{message}\n",
            1_700_000_000 + n,
            message.len()
        )
        .expect("write");
        input.write_all(&body).expect("write");
        input.write_all(b"\n").expect("write");
    };
    let all: Vec<usize> = (0..FILES).collect();
    write_commit(&mut input, 0, &all);
    for n in 1..=commits {
        let start = (n * per_commit) % FILES;
        let files: Vec<usize> = (start..start + per_commit).map(|f| f % FILES).collect();
        write_commit(&mut input, n, &files);
    }
    drop(input);
    assert!(child.wait().expect("fast-import").success());
    git(&bare, &["repack", "-a", "-d", "--quiet"]);
    bare
}

/// MiB of the files under `dir`.
fn dir_mib(dir: &Path) -> f64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total as f64 / (1024.0 * 1024.0)
}

async fn submit(c: &Cluster, repo: &str, branch: &str, pipeline: Value) -> String {
    let (status, task) = c
        .submit(
            json!({ "repository": repo, "prompt": "bench", "pipeline": pipeline,
                        "branch": branch }),
        )
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().expect("id").to_string()
}

async fn events(c: &Cluster, id: &str) -> Vec<Value> {
    let (_, body) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .expect("events");
    body["events"].as_array().cloned().unwrap_or_default()
}

/// Log lines of the runners of a task.
async fn messages(c: &Cluster, id: &str) -> Vec<String> {
    events(c, id)
        .await
        .iter()
        .filter_map(|e| e["data"]["event"]["message"].as_str().map(str::to_string))
        .collect()
}

async fn wait_done(c: &Cluster, id: &str) {
    let task = c
        .wait_for_status(id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("task ends");
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
}

/// Wall-clock seconds of an RFC 3339 timestamp (or of milliseconds since the epoch).
fn wall(v: &Value) -> Option<f64> {
    if let Some(ms) = v.as_f64() {
        return Some(ms / 1000.0);
    }
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// The phases of a subtask's start, in order: name and the event that ends it (a
/// prefix of a runner or worker log line; `None` for the worker taking the order).
const PHASES: &[(&str, Option<&str>)] = &[
    ("queue: submit → a worker has the order", None),
    (
        "mirror fetch and lease (worker)",
        Some("warm start prepared"),
    ),
    ("sandbox and runner start", Some("cloning ")),
    (
        "clone from the mirror",
        Some("cloned from the worker's mirror"),
    ),
    ("checkout of the task branch", Some("working copy ready")),
    ("setup and pre-agent", Some("running the ")),
    (
        "agent start to its first line (claude: init)",
        Some(INIT_MARK),
    ),
];
/// The mark of Claude Code's `init` event (the first line it prints).
const INIT_MARK: &str = "type:init";
/// The name of the last phase, to the measured end.
const LAST_PHASE: &str = "to the measured end (agent line, model request)";

/// Where the time from submit (`t0`, wall clock) to `end` went, phase by phase, in
/// seconds: from the subtask's start time and the time the worker got each runner
/// line (the event's `at`). A phase whose mark is missing counts in the next one.
async fn phases(c: &Cluster, id: &str, t0: f64, end: f64) -> Vec<f64> {
    let task = c.task(id).await.expect("task");
    let events = events(c, id).await;
    let mut out = Vec::new();
    let mut last = t0;
    for (_, mark) in PHASES {
        let at = match mark {
            None => wall(&task["subtasks"][0]["started_at"]),
            Some(INIT_MARK) => events
                .iter()
                .find(|e| e["data"]["type"] == "init")
                .and_then(|e| wall(&e["at"])),
            Some(prefix) => events.iter().find_map(|e| {
                let m = e["data"]["event"]["message"].as_str()?;
                m.starts_with(prefix).then(|| wall(&e["at"]))?
            }),
        };
        match at {
            Some(at) => {
                out.push((at - last).max(0.0));
                last = at.max(last);
            }
            None => out.push(0.0),
        }
    }
    out.push((end - last).max(0.0));
    out
}

/// Prints the median of each phase over `runs` breakdowns.
fn print_phases(title: &str, runs: &[Vec<f64>]) {
    if runs.is_empty() {
        return;
    }
    println!("  {title}: phases, median of {} runs", runs.len());
    let names = PHASES.iter().map(|(n, _)| *n).chain([LAST_PHASE]);
    for (i, name) in names.enumerate() {
        let m = median(runs.iter().map(|r| r[i]).collect());
        println!("    {name:<48} {m:6.3} s");
    }
}

/// Submit to the agent's first line (its clock), in seconds, and where it went.
async fn subtask_start(c: &Cluster, repo: &str, branch: &str) -> (f64, Vec<f64>) {
    let t0 = now_secs();
    let id = submit(c, repo, branch, json!("code")).await;
    wait_done(c, &id).await;
    let exec = messages(c, &id)
        .await
        .iter()
        .find_map(|m| m.strip_prefix("agent-exec ")?.trim().parse::<f64>().ok())
        .expect("agent-exec line");
    (exec - t0, phases(c, &id, t0, exec).await)
}

async fn clone_and_starts(runs: usize) {
    let mb = env_usize("AO_BENCH_REPO_MB", 100);
    let mut c = Cluster::new(&[
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__WORKER__CONCURRENCY", "1"),
        ("RUST_LOG", "warn"),
    ]);
    let t = Instant::now();
    let repo = generate_repo(c.dir.path(), mb);
    let packed = dir_mib(&repo.join("objects"));
    println!(
        "warm workers: generated repository, {FILES} files, {packed:.0} MiB packed ({:.1} s to make)",
        t.elapsed().as_secs_f64()
    );
    let url = format!("file://{}", repo.display());
    let mut clones = Vec::new();
    for i in 0..runs {
        let to = c.dir.path().join(format!("clone-{i}"));
        let t = Instant::now();
        let ok = Command::new("git")
            .args(["clone", "--quiet", "--no-tags", &url])
            .arg(&to)
            .status()
            .expect("git clone")
            .success();
        assert!(ok);
        clones.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&to);
    }
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "echo \"agent-exec $(date +%s.%N)\"",
    );
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))]);
    let mirrors = c.dir.path().join("data").join("mirrors");
    let (mut cold, mut cold_phases) = (Vec::new(), Vec::new());
    let (mut warm, mut warm_phases) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Cold: the worker has never seen the repository.
        let _ = std::fs::remove_dir_all(&mirrors);
        let (t, p) = subtask_start(&c, &url, &format!("bench/cold-{i}")).await;
        cold.push(t);
        cold_phases.push(p);
        // Warm: the mirror the previous run made is there.
        let (t, p) = subtask_start(&c, &url, &format!("bench/warm-{i}")).await;
        warm.push(t);
        warm_phases.push(p);
    }
    let (clone, cold, warm) = (median(clones), median(cold), median(warm));
    println!("  plain git clone (file://)          median {clone:6.2} s");
    println!("  cold subtask start, submit→agent    median {cold:6.2} s");
    println!("  warm subtask start, submit→agent    median {warm:6.2} s");
    println!(
        "  ratio warm/clone {:.2} (goal ≤ 0.5), cold/clone {:.2}",
        warm / clone,
        cold / clone
    );
    print_phases("cold start", &cold_phases);
    print_phases("warm start", &warm_phases);
}

/// The runner's setup timings of a task, in seconds: `agent-setup.sh done in N ms` and
/// `… restored from the cache in N ms`.
async fn setup_seconds(c: &Cluster, id: &str) -> (f64, usize, usize) {
    let mut total = 0.0;
    let (mut ran, mut restored) = (0, 0);
    for m in messages(c, id).await {
        let ms = m
            .split(" in ")
            .nth(1)
            .and_then(|rest| rest.split(" ms").next())
            .and_then(|n| n.parse::<f64>().ok());
        if m.starts_with("agent-setup.sh done in ") {
            ran += 1;
            total += ms.unwrap_or(0.0) / 1000.0;
        } else if m.starts_with("setup result restored from the cache in ") {
            restored += 1;
            total += ms.unwrap_or(0.0) / 1000.0;
        }
    }
    (total, ran, restored)
}

async fn setup_pipeline(cache: bool, pipelines: usize) -> Vec<(f64, usize, usize)> {
    let cache = if cache { "true" } else { "false" };
    let mut c = Cluster::new(&[
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__WORKER__CONCURRENCY", "1"),
        ("AO__WARM__SETUP_CACHE", cache),
        ("RUST_LOG", "warn"),
    ]);
    let agent = script(c.dir.path(), "agent.sh", "echo agent");
    let repo = bare_repo(
        c.dir.path(),
        "setup5",
        &[
            (
                "agent-setup.sh",
                "sleep 5\nmkdir -p deps\nhead -c 20000000 /dev/urandom > deps/blob\n",
            ),
            (
                ".agent-orchestrator.toml",
                "[setup]\ncache = [\"deps\"]\nkey = [\"deps.lock\"]\n",
            ),
            ("deps.lock", "v1\n"),
            (".gitignore", "deps/\n"),
        ],
    )
    .display()
    .to_string();
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))]);
    let mut out = Vec::new();
    for p in 0..pipelines {
        let id = submit(
            &c,
            &repo,
            &format!("bench/setup-{p}"),
            json!(vec!["coder"; STEPS]),
        )
        .await;
        wait_done(&c, &id).await;
        out.push(setup_seconds(&c, &id).await);
    }
    out
}

async fn setup_cache() {
    let cold = setup_pipeline(false, 1).await;
    let warm = setup_pipeline(true, 2).await;
    let (cold_s, cold_ran, _) = cold[0];
    let (first_s, first_ran, first_restored) = warm[0];
    let (warm_s, warm_ran, warm_restored) = warm[1];
    println!("setup cache: agent-setup.sh of 5 s (20 MB result), {STEPS}-step pipeline, total setup time");
    println!("  cold (no cache)            {cold_s:6.2} s  ({cold_ran} setups run)");
    println!("  first with cache           {first_s:6.2} s  ({first_ran} run, {first_restored} restored)");
    println!(
        "  warm (cache holds it)      {warm_s:6.2} s  ({warm_ran} run, {warm_restored} restored)"
    );
    println!("  warm/cold {:.1} % (goal ≤ 10 %)", 100.0 * warm_s / cold_s);
}

/// The CLI alone: start to its first model request and start to its first line (its
/// `init` event), in seconds, `runs` times in `dir` (a git repository with a `home`
/// directory).
async fn cli_alone(cli: &Path, model: &ModelServer, dir: &Path, runs: usize) -> Vec<(f64, f64)> {
    let home = dir.join("home");
    let mut out = Vec::new();
    for _ in 0..runs {
        let before = model.requests().len();
        let t0 = Instant::now();
        let mut child = Command::new(cli)
            .args([
                "-p",
                "bench",
                "--output-format",
                "stream-json",
                "--verbose",
                "--model",
                MODEL,
            ])
            .current_dir(dir)
            .env("HOME", &home)
            .env("ANTHROPIC_BASE_URL", &model.url)
            .env("ANTHROPIC_API_KEY", "sk-bench-0123456789")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("claude");
        let stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = lines.next();
            let first_line = t0.elapsed().as_secs_f64();
            lines.for_each(drop);
            first_line
        });
        let status = child.wait().expect("claude");
        assert!(status.success());
        let first_line = reader.join().expect("reader");
        let first = model.requests()[before..]
            .iter()
            .map(|r| r.at)
            .min()
            .expect("a model request");
        out.push((first.duration_since(t0).as_secs_f64(), first_line));
    }
    out
}

/// One product run: submit to the first model request, in seconds, and where it went.
async fn product_run(c: &Cluster, model: &ModelServer, repo: &str, i: usize) -> (f64, Vec<f64>) {
    let before = model.requests().len();
    let (t0, t0_wall) = (Instant::now(), now_secs());
    let id = submit(c, repo, &format!("bench/model-{i}"), json!("code")).await;
    wait_done(c, &id).await;
    let first = model.requests()[before..]
        .iter()
        .map(|r| r.at)
        .min()
        .expect("a model request");
    let took = first.duration_since(t0).as_secs_f64();
    (took, phases(c, &id, t0_wall, t0_wall + took).await)
}

async fn first_model_request(runs: usize) {
    let Some(cli) = find_claude_cli() else {
        println!("submit→first model request: skipped, the Claude Code CLI is not installed");
        return;
    };
    let model = ModelServer::start(vec![Turn::new(Step::text("done"), 100, 10)]).await;
    let alone_dir = tempfile::tempdir().expect("tempdir");
    git(alone_dir.path(), &["init", "--quiet"]);
    std::fs::create_dir_all(alone_dir.path().join("home")).expect("home");
    // One run first, as for the product below: both measured with warm caches.
    cli_alone(&cli, &model, alone_dir.path(), 1).await;
    let mut c = Cluster::new(&[
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__API_KEY", "env:AO_BENCH_MODEL_KEY"),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__WORKER__CONCURRENCY", "1"),
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
    // One run first, so the mirror is there: the product's steady state.
    let id = submit(&c, &repo, "bench/first", json!("code")).await;
    wait_done(&c, &id).await;
    // The CLI alone and the product in pairs, run back to back, the order alternating
    // from one pair to the next (alone first, then product first), so that a change of
    // the machine's load during the bench weighs on both alike; the ratio is the median
    // of the pairs' ratios, each pair measured within a few seconds.
    let mut alone = Vec::new();
    let mut product = Vec::new();
    let mut breakdowns = Vec::new();
    for i in 0..runs {
        if i % 2 == 0 {
            alone.extend(cli_alone(&cli, &model, alone_dir.path(), 1).await);
        }
        let (took, phases) = product_run(&c, &model, &repo, i).await;
        product.push(took);
        breakdowns.push(phases);
        if i % 2 == 1 {
            alone.extend(cli_alone(&cli, &model, alone_dir.path(), 1).await);
        }
    }
    let ratios: Vec<f64> = product
        .iter()
        .zip(&alone)
        .map(|(p, (a, _))| p / a)
        .collect();
    let (lowest, highest) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let ratio = median(ratios);
    let pairs: Vec<String> = product
        .iter()
        .zip(&alone)
        .map(|(p, (a, _))| format!("{a:.2}/{p:.2}"))
        .collect();
    let alone_line = median(alone.iter().map(|a| a.1).collect());
    let alone = median(alone.iter().map(|a| a.0).collect());
    let product = median(product);
    println!("submit→first model request, real Claude Code CLI, bwrap ({runs} pairs)");
    println!(
        "  Claude Code CLI alone   median {alone:6.3} s (its first line at {alone_line:.3} s)"
    );
    println!("  product                 median {product:6.3} s");
    println!(
        "  ratio {ratio:.2} (goal ≤ 1.2), median of the pairs' ratios ({lowest:.2} to \
         {highest:.2}); ratio of the medians {:.2}",
        product / alone
    );
    println!("  pairs, alone/product (s): {}", pairs.join(" "));
    print_phases("submit→first model request", &breakdowns);
}

#[tokio::main]
async fn main() {
    let runs = env_usize("AO_BENCH_WARM_RUNS", RUNS);
    // `AO_BENCH_WARM_PARTS`: which parts to run (`starts`, `setup`, `model`), all by default.
    let parts = std::env::var("AO_BENCH_WARM_PARTS").unwrap_or_default();
    let wants = |part: &str| parts.is_empty() || parts.split(',').any(|p| p.trim() == part);
    if wants("starts") {
        clone_and_starts(runs).await;
    }
    if wants("setup") {
        setup_cache().await;
    }
    if wants("model") {
        first_model_request(runs).await;
    }
}
