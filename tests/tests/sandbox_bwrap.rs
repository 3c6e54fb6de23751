//! The `bwrap` sandbox driver end to end: the real coordinator and worker binaries, real
//! bubblewrap, a local bare repository and shell-script agents that probe their sandbox and
//! commit what they found, so the test reads it from the pushed branch.

use ao_tests::{bare_repo, git, script, Cluster};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

/// A cluster whose workers use the bwrap driver.
fn cluster(extra: &[(&str, &str)]) -> Cluster {
    let mut settings = vec![("AO__SANDBOX__DRIVER", "bwrap")];
    settings.extend_from_slice(extra);
    Cluster::new(&settings)
}

/// A marker unique to this test run.
fn marker() -> String {
    format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos()
    )
}

/// The command lines of every process on the host.
fn host_cmdlines() -> Vec<String> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
            all.push(String::from_utf8_lossy(&bytes).replace('\0', " "));
        }
    }
    all
}

async fn submit(c: &Cluster, repo: &Path, pipeline: Value, branch: &str) -> String {
    let (status, task) = c
        .submit(json!({
            "repository": repo.display().to_string(),
            "prompt": "probe the sandbox",
            "pipeline": pipeline,
            "branch": branch,
        }))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().expect("task id").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_runs_confined_and_its_work_is_pushed() {
    let mark = marker();
    let mut c = cluster(&[
        ("AO__SANDBOX__MAX_OPEN_FILES", "777"),
        ("AO__SANDBOX__MAX_PROCESSES", "999"),
    ]);
    let root = c.dir.path().to_path_buf();
    let data = root.join("data");
    let work = root.join("work");
    let repo = bare_repo(&root, "project", &[]);
    let host_tmp = format!("/tmp/ao-escape-{mark}");
    let body = format!(
        r#"
set +e
try() {{ if ( echo x > "$1" ) 2>/dev/null; then echo "wrote $1"; else echo "denied $1"; fi; }}
{{
  echo "uid=$(id -u)"
  echo "data_listing=[$(ls -A {data} 2>/dev/null | tr '\n' ' ')]"
  try /etc/ao-escape-{mark}
  try {data}/escape-{mark}
  try {work}/escape-{mark}
  try {root}/escape-{mark}
  try {host_tmp}
  echo "home=$HOME"
  grep -E '^Max (processes|open files)' /proc/self/limits
}} > probe.txt
env > env.txt
setsid bash -c 'exec -a ao-orphan-{mark} sleep 300' </dev/null >/dev/null 2>&1 &
sleep 3
echo "probed"
"#,
        data = data.display(),
        work = work.display(),
        root = root.display(),
    );
    let agent = script(&root, "agent.sh", &body);
    let secret = format!("worker-only-{mark}");
    let api_key = format!("sk-test-{mark}");
    c.start_coordinator().await.unwrap();
    c.start_worker(&[
        ("AO__AGENT__COMMAND", agent.to_str().unwrap()),
        ("AO_TEST_SECRET", secret.as_str()),
        ("AO_TEST_MODEL_KEY", api_key.as_str()),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
    ]);
    let id = submit(&c, &repo, json!("code"), "agent/probe").await;

    // While the sandbox runs, no command line on the host carries the passed-in key.
    let deadline = Instant::now() + LIMIT;
    let mut saw_sandbox = false;
    loop {
        for line in host_cmdlines() {
            assert!(!line.contains(&api_key), "secret in a command line: {line}");
            saw_sandbox |= line.contains("bwrap") && line.contains("--unshare-pid");
        }
        let task = c.task(&id).await.unwrap();
        if task["status"] == "succeeded" || task["status"] == "failed" {
            break;
        }
        assert!(Instant::now() < deadline, "task not done\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_sandbox, "no bwrap process was seen while the task ran");
    let done = c.task(&id).await.unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let tip = git(&repo, &["rev-parse", "agent/probe"]);
    assert_eq!(done["subtasks"][0]["outcome"]["commit"], tip.as_str());

    let probe = git(&repo, &["show", "agent/probe:probe.txt"]);
    let uid = probe.lines().find_map(|l| l.strip_prefix("uid=")).unwrap();
    assert_ne!(uid, "0", "{probe}");
    assert!(
        probe.contains(&format!("denied /etc/ao-escape-{mark}")),
        "{probe}"
    );
    assert!(!Path::new(&format!("/etc/ao-escape-{mark}")).exists());
    // The worker's data dir and work root are hidden and read-only.
    for dir in [&data, &work] {
        let denied = format!("denied {}/escape-{mark}", dir.display());
        assert!(probe.contains(&denied), "{probe}");
    }
    // Whatever the agent managed to write went into throwaway mounts, never to the host.
    for host in [
        data.join(format!("escape-{mark}")),
        work.join(format!("escape-{mark}")),
        root.join(format!("escape-{mark}")),
        host_tmp.clone().into(),
    ] {
        assert!(!host.exists(), "{} was written\n{probe}", host.display());
    }
    // The data dir holds the SQLite files, but the sandbox sees it empty.
    assert!(std::fs::read_dir(&data).unwrap().count() > 0);
    // (Only the mount point of this repository's read-only mirror shows, with a warm
    // start.)
    let listing = probe
        .lines()
        .find_map(|l| l.strip_prefix("data_listing=["))
        .and_then(|l| l.strip_suffix(']'))
        .unwrap_or("?");
    assert!(
        listing.split_whitespace().all(|e| e == "mirrors"),
        "{probe}"
    );
    assert!(probe.contains("home=/home/agent"), "{probe}");
    let limit = |name: &str| {
        let line = probe.lines().find(|l| l.starts_with(name)).expect(name);
        line[name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(limit("Max open files"), "777", "{probe}");
    // Where a cgroup holds the process limit (a root worker's, as here under root), it is
    // that cgroup's `pids.max` (see sandbox_limits.rs) and no RLIMIT_NPROC is set: one
    // shared by every process of the host user would let one run starve another.
    if ao_tests::running_as_root() {
        assert_ne!(limit("Max processes"), "999", "{probe}");
    } else {
        assert_eq!(limit("Max processes"), "999", "{probe}");
    }

    let env = git(&repo, &["show", "agent/probe:env.txt"]);
    // The model key stays with the worker's proxy; the agent gets a placeholder.
    assert!(!env.contains(&api_key), "{env}");
    assert!(
        env.contains("ANTHROPIC_API_KEY=sk-ant-placeholder"),
        "{env}"
    );
    assert!(!env.contains(&secret), "{env}");
    assert!(!env.contains("AO_TEST_SECRET"), "{env}");
    assert!(!env.contains("AO__"), "{env}");

    // The background process the agent left died with the sandbox.
    let orphan = format!("ao-orphan-{mark}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_cmdlines().iter().any(|l| l.contains(&orphan)) {
        assert!(Instant::now() < deadline, "{orphan} outlived the sandbox");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_over_its_time_is_killed_and_the_subtask_times_out() {
    let mut c = cluster(&[("AO__AGENT__TIMEOUT_SECS", "2")]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let agent = script(
        &root,
        "agent.sh",
        "echo starting; sleep 120; echo x > late.txt",
    );
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo, json!("code"), "agent/slow").await;
    let started = Instant::now();
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(done["status"], "failed", "{done:#}");
    assert_eq!(
        done["subtasks"][0]["outcome"]["kind"],
        "timeout",
        "{done:#}\n{}",
        c.logs()
    );
    assert_eq!(git(&repo, &["branch", "--list"]).trim(), "* main");
}

#[tokio::test(flavor = "multi_thread")]
async fn network_off_capabilities_cannot_connect_even_to_loopback() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let mut c = cluster(&[
        ("AO__SANDBOX__NETWORK_OFF", "coder"),
        ("AO__SANDBOX__NETWORK_OPEN", "tester"),
    ]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = format!(
        r#"
if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then r=connected; else r=refused; fi
echo "$r" > "net-$AO_CAPABILITY.txt"
"#
    );
    let agent = script(&root, "agent.sh", &body);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo, json!(["coder", "tester"]), "agent/net").await;
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert_eq!(git(&repo, &["show", "agent/net:net-coder.txt"]), "refused");
    assert_eq!(
        git(&repo, &["show", "agent/net:net-tester.txt"]),
        "connected"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_worker_kills_the_whole_sandbox() {
    let mark = marker();
    let mut c = cluster(&[("AO__WORKER__SHUTDOWN_GRACE_SECS", "1")]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = format!(
        "setsid bash -c 'exec -a ao-stuck-{mark} sleep 300' </dev/null >/dev/null 2>&1 &\n\
         exec -a ao-agent-{mark} sleep 300"
    );
    let agent = script(&root, "agent.sh", &body);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo, json!("code"), "agent/stuck").await;
    c.wait_for_status(&id, &["running"], LIMIT).await.unwrap();
    let alive = |name: String| host_cmdlines().iter().any(|l| l.contains(&name));
    let deadline = Instant::now() + LIMIT;
    while !(alive(format!("ao-stuck-{mark}")) && alive(format!("ao-agent-{mark}"))) {
        assert!(
            Instant::now() < deadline,
            "the agent never started\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let code = c.workers[0].terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(code, 0, "{}", c.logs());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(format!("ao-stuck-{mark}")) || alive(format!("ao-agent-{mark}")) {
        assert!(
            Instant::now() < deadline,
            "sandbox processes outlived the worker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
