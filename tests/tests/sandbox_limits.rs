//! The bwrap sandbox against a hostile agent: shell-script agents try what an attacker
//! would (reach host services and sockets, find secrets, fill the disk, fork without end,
//! make namespaces, flood the worker with output) and commit what they saw, so the test
//! reads it from the pushed branch. Each test says what was tried; each attack must fail.

use ao_tests::scenario::events;
use ao_tests::{
    bare_repo, free_port, git, running_as_root, script, test_user, Cluster, HOG_OR_OTHER, TEST_USER,
};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

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

fn cluster(extra: &[(&str, &str)]) -> Cluster {
    let mut settings = vec![("AO__SANDBOX__DRIVER", "bwrap")];
    settings.extend_from_slice(extra);
    Cluster::new(&settings)
}

async fn run_code_task(c: &Cluster, repo: &Path, branch: &str) -> (String, Value) {
    let id = c
        .submit_code(repo, branch, "attack the sandbox")
        .await
        .expect("submit");
    let done = c.wait_ended(&id, LIMIT).await.expect("task ends");
    (id, done)
}

/// A host service answering every connection with `answer`; counts connections.
fn tcp_service(answer: String) -> (u16, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = stream.read(&mut buf);
            let body = answer.clone();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, hits)
}

/// A unix socket service (path or abstract) answering `answer`; counts connections.
fn unix_service(listener: std::os::unix::net::UnixListener, answer: String) -> Arc<AtomicUsize> {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    hits
}

/// The agent's environment, every file it can read, every host port and socket it knows
/// of: no secret of the worker or the run, and no host service, is reachable.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_reaches_no_host_service_socket_or_secret() {
    let _shared = TEST_USER_PROCESSES.read().await;
    let mark = marker();
    let model_key = format!("sk-ant-model-key-{mark}");
    let worker_secret = format!("worker-env-secret-{mark}");
    let metadata_secret = format!("metadata-credentials-{mark}");
    // A stand-in cloud metadata endpoint, and the host's sockets.
    let (meta_port, meta_hits) = tcp_service(metadata_secret.clone());
    let abstract_name = format!("ao-test-abstract-{mark}");
    let abstract_hits = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .expect("abstract address");
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).expect("abstract bind");
        unix_service(l, format!("abstract-{mark}"))
    };
    let run_socket = format!("/run/ao-test-{mark}.sock");
    let var_socket = format!("/var/tmp/ao-test-{mark}.sock");
    let run_hits = unix_service(
        std::os::unix::net::UnixListener::bind(&run_socket).expect("bind /run socket"),
        format!("run-socket-{mark}"),
    );
    let var_hits = unix_service(
        std::os::unix::net::UnixListener::bind(&var_socket).expect("bind /var/tmp socket"),
        format!("var-socket-{mark}"),
    );

    let mut c = cluster(&[]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let worker_port = free_port();
    // The agent searches for the secrets' values, given reversed so that the agent's
    // own script (visible to it) does not hold them.
    let rev = |s: &str| s.chars().rev().collect::<String>();
    let body = format!(
        r#"
set +e +o pipefail
secrets="$(printf '%s\n' '{k}' '{w}' '{m}' | rev)"
probe() {{ # name, command…
  local name="$1"; shift
  if out="$(timeout 5 "$@" 2>/dev/null)" && [ -n "$out" ]; then echo "$name=reached:$out"; else echo "$name=blocked"; fi
}}
{{
  for port in {meta} {coord} {worker}; do
    probe "tcp-$port" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && echo open"
    probe "http-$port" curl -sf -m 4 "http://127.0.0.1:$port/"
    probe "direct-$port" curl -sf -m 4 --noproxy '*' "http://127.0.0.1:$port/"
  done
  probe abstract curl -s -m 4 --abstract-unix-socket '{abs}' http://x/
  probe run-socket curl -s -m 4 --unix-socket '{run_socket}' http://x/
  probe var-socket curl -s -m 4 --unix-socket '{var_socket}' http://x/
  ls -la /run /var/run 2>&1 | sed 's/^/run-listing: /'
}} > probe.txt
env > env.txt
# Every readable file outside the system's own trees, and every readable environment.
printf '%s\n' $secrets > /tmp/patterns
{{ find / -xdev \( -path /proc -o -path /sys -o -path /usr -o -path /work -o -path /nix \) -prune \
    -o -type f -readable -size -4M -print0 2>/dev/null
  printf '%s\0' /proc/[0-9]*/environ /proc/[0-9]*/cmdline
}} | xargs -0 grep -lsF -f /tmp/patterns -- > found.txt
if [ -s found.txt ]; then echo "found=1" >> probe.txt; else echo "found=0" >> probe.txt; fi
touch found.txt
"#,
        k = rev(&model_key),
        w = rev(&worker_secret),
        m = rev(&metadata_secret),
        meta = meta_port,
        coord = c.port,
        worker = worker_port,
        abs = abstract_name,
    );
    let agent = script(&root, "agent.sh", &body);
    c.start_coordinator().await.expect("coordinator");
    let listen = format!("127.0.0.1:{worker_port}");
    c.start_worker(&[
        ("AO__WORKER__LISTEN", listen.as_str()),
        ("AO__AGENT__COMMAND", agent.to_str().expect("utf-8")),
        ("AO_TEST_MODEL_KEY", model_key.as_str()),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ("AO_TEST_WORKER_SECRET", worker_secret.as_str()),
    ]);
    let (id, done) = run_code_task(&c, &repo, "agent/attack").await;
    let _ = std::fs::remove_file(&run_socket);
    let _ = std::fs::remove_file(&var_socket);
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let probe = git(&repo, &["show", "agent/attack:probe.txt"]);
    let env = git(&repo, &["show", "agent/attack:env.txt"]);
    let found = git(&repo, &["show", "agent/attack:found.txt"]);

    assert!(
        !probe.contains("=reached"),
        "a host service was reached:\n{probe}"
    );
    assert!(
        probe.contains("found=0"),
        "secrets found:\n{found}\n{probe}"
    );
    for secret in [&model_key, &worker_secret, &metadata_secret] {
        assert!(
            !env.contains(secret.as_str()),
            "{secret} in the environment:\n{env}"
        );
        assert!(
            !probe.contains(secret.as_str()),
            "{secret} in the probe:\n{probe}"
        );
    }
    for (what, hits) in [
        ("metadata service", &meta_hits),
        ("abstract socket", &abstract_hits),
        ("/run socket", &run_hits),
        ("/var/tmp socket", &var_hits),
    ] {
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "the {what} was reached\n{probe}"
        );
    }
    // The proxy refused the host's ports and said so in the task's events.
    let (_, events) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .expect("events");
    let denied: Vec<&Value> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["data"]["type"] == "network_denied")
        .collect();
    let meta_denied = denied.iter().any(|e| {
        e["data"]["event"]["host"] == "127.0.0.1" && e["data"]["event"]["port"] == meta_port
    });
    assert!(
        meta_denied,
        "no network_denied event for the metadata port: {denied:?}\n{events:#}"
    );
}

/// Disk, tmpfs, processes, namespaces and output: the agent fills every writable place,
/// forks past its process limit, makes a user namespace, and prints a 256 MiB line.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_is_held_to_its_disk_process_and_output_limits() {
    let _shared = TEST_USER_PROCESSES.read().await;
    let mut c = cluster(&[
        ("AO__SANDBOX__TMP_MB", "8"),
        ("AO__SANDBOX__HOME_MB", "8"),
        ("AO__SANDBOX__SHM_MB", "8"),
        ("AO__SANDBOX__WORKSPACE_MB", "24"),
        ("AO__SANDBOX__MAX_PROCESSES", "64"),
    ]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = r#"
set +e +o pipefail
fill() { # name, file, MiB
  if dd if=/dev/zero of="$2" bs=1M count="$3" 2>/dev/null; then echo "$1=filled"; else echo "$1=bounded"; fi
  rm -f "$2"
}
{
  fill tmp /tmp/fill 32
  fill home "$HOME/fill" 32
  fill shm /dev/shm/fill 32
  fill workspace ./fill 64
  if ( : > /dev/ao-fill ) 2>/dev/null; then echo "dev=writable"; rm -f /dev/ao-fill; else echo "dev=read-only"; fi
  perl -e 'my @kids; for (1..200) { my $p = fork(); last unless defined $p;
    if ($p == 0) { sleep 20; exit 0 } push @kids, $p }
    print "processes=", scalar(@kids), "\n"; kill 9, @kids; waitpid($_, 0) for @kids;'
  if unshare -U true 2>/dev/null; then echo "userns=made"; else echo "userns=denied"; fi
  if unshare -r true 2>/dev/null; then echo "userns_root=made"; else echo "userns_root=denied"; fi
  # io_uring_setup (425 on x86_64 and arm64): a kernel attack surface container
  # profiles deny.
  python3 -c 'import ctypes; libc = ctypes.CDLL(None, use_errno=True); p = (ctypes.c_char * 120)(); print("io_uring=made" if libc.syscall(425, 8, p) >= 0 else "io_uring=denied")'
  grep '^Seccomp:' /proc/self/status
} > probe.txt 2>&1
# One line of 256 MiB on standard output.
head -c 268435456 /dev/zero | tr '\0' x
echo
echo after-the-long-line
"#;
    let agent = script(&root, "agent.sh", body);
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))]);
    let worker_pid = c.workers[0].pid().as_raw();
    let (_, done) = run_code_task(&c, &repo, "agent/limits").await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let probe = git(&repo, &["show", "agent/limits:probe.txt"]);
    for bounded in [
        "tmp=bounded",
        "home=bounded",
        "shm=bounded",
        "workspace=bounded",
        "dev=read-only",
        "userns=denied",
        "userns_root=denied",
        "io_uring=denied",
        "Seccomp:\t2",
    ] {
        assert!(probe.contains(bounded), "{bounded} missing:\n{probe}");
    }
    let processes: usize = probe
        .lines()
        .find_map(|l| l.strip_prefix("processes="))
        .and_then(|n| n.trim().parse().ok())
        .expect("process count");
    assert!(
        processes < 64,
        "{processes} processes ran under a limit of 64\n{probe}"
    );
    // The 256 MiB line never sat in the worker's memory.
    let status = std::fs::read_to_string(format!("/proc/{worker_pid}/status")).expect("status");
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    assert!(
        peak_kb < 96 * 1024,
        "the worker peaked at {} MiB",
        peak_kb / 1024
    );
}

/// All events of a task, read page by page through the API.
async fn all_events(c: &Cluster, id: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let after = all.last().and_then(|e| e["seq"].as_u64()).unwrap_or(0);
        let (_, page) = c
            .get_json(&format!(
                "/api/v1/tasks/{id}/events?after={after}&limit=10000"
            ))
            .await
            .expect("events");
        let page = page["events"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Output lines: an agent prints 12,000 lines, each of which would be a stored event. The
/// run's events are bounded in number (`agent.max_events`, 10,000 by default): the first
/// lines and the last ones are kept, with one marker saying how many were left out between
/// them.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_is_held_to_its_event_limit() {
    let _shared = TEST_USER_PROCESSES.read().await;
    let mut c = cluster(&[]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let agent = script(
        &root,
        "agent.sh",
        "seq -f 'line-%.0f' 1 12000\necho done > done.txt\n",
    );
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))]);
    let (id, done) = run_code_task(&c, &repo, "agent/events").await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    // The run's last batch of events (the kept tail and the marker) may be stored just
    // after its result: wait for the marker, which comes with the tail.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events = all_events(&c, &id).await;
        if events.iter().any(|e| e["data"]["type"] == "events_dropped")
            || std::time::Instant::now() > deadline
        {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let agent: Vec<&Value> = events.iter().filter(|e| e["kind"] == "agent").collect();
    let text = |e: &Value| e["data"]["event"].to_string();
    assert!(
        agent.len() <= 10_000,
        "{} agent events stored under a limit of 10,000",
        agent.len()
    );
    assert!(
        agent.iter().any(|e| text(e).contains("\"line-1\"")),
        "the first lines are kept"
    );
    assert!(
        agent.iter().any(|e| text(e).contains("\"line-12000\"")),
        "the last lines are kept"
    );
    let marker = agent
        .iter()
        .find(|e| e["data"]["type"] == "events_dropped")
        .unwrap_or_else(|| panic!("no events_dropped marker among {} events", agent.len()));
    let dropped = marker["data"]["event"]["dropped"]
        .as_u64()
        .expect("dropped count");
    assert!(
        dropped >= 1900,
        "the marker counts what was left out: {marker:#}"
    );
}

/// Serialises the test that counts every process of [`TEST_USER`] (its RLIMIT_NPROC)
/// against the others, whose sandboxes run as that user too.
static TEST_USER_PROCESSES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Submits the hog's task on `repo`; its id.
async fn start_hog(c: &Cluster, repo: &Path) -> String {
    c.submit_code(repo, "agent/hog", "fork to the limit")
        .await
        .expect("submit")
}

/// Waits until the hog says how many processes it made and holds; that count.
async fn forked_by_hog(c: &Cluster, hog_id: &str) -> u32 {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let text = serde_json::to_string(&events(c, hog_id).await).expect("encode");
        if let Some(at) = text.find("hog-forked=") {
            let n: String = text[at + 11..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            return n.parse().expect("a count");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hog never forked\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts the cluster's coordinator and one worker whose agent is `body`.
async fn start(c: &mut Cluster, body: &str, extra: &[(&str, &str)]) {
    let agent = script(c.dir.path(), "agent.sh", body);
    c.start_coordinator().await.expect("coordinator");
    let mut settings = vec![("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))];
    settings.extend_from_slice(extra);
    c.start_worker(&settings);
}

/// Whether the worker can get cgroups here: it runs as root (the tests do) on a host with
/// a cgroup hierarchy. Says why not, for the test to skip.
fn cgroups_available() -> bool {
    if !running_as_root() {
        eprintln!("skipped: the worker needs root to make its own cgroups, and the tests do not run as root");
        return false;
    }
    let v1 = Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists()
        && Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists();
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.contains("pids") && c.contains("memory"));
    if !(v1 || v2) {
        eprintln!("skipped: this host has no pids and memory cgroup hierarchy");
        return false;
    }
    true
}

/// The `ao-<attempt>` cgroup name of the attempt now running in the cluster's work
/// directory (attempt directories are named after the subtask and attempt).
async fn running_attempt(c: &Cluster, limit: Duration) -> String {
    let work = c.dir.path().join("work");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(entries) = std::fs::read_dir(&work) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if entry.path().join("spec.json").exists() {
                    return format!("ao-{name}");
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no attempt started\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Memory: the agent allocates 512 MiB under `sandbox.memory_mb = 128`. The kernel kills
/// it, and the outcome says so: out of memory at 128 MiB, cause `out_of_memory`, not
/// retried (before: a bare `killed by signal 9`).
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_past_its_memory_limit_is_killed_and_the_outcome_says_so() {
    let _shared = TEST_USER_PROCESSES.read().await;
    if !cgroups_available() {
        return;
    }
    let mut c = cluster(&[("AO__SANDBOX__MEMORY_MB", "128")]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = r#"
echo change > change.txt
python3 -c '
held = []
for i in range(32):
    held.append(b"\x01" * (16 << 20))
print("allocated", 16 * len(held), "MiB")
'
"#;
    start(&mut c, body, &[]).await;
    let (_, done) = run_code_task(&c, &repo, "agent/memory").await;
    assert_eq!(done["status"], "failed", "{done:#}\n{}", c.logs());
    let outcome = &done["subtasks"][0]["outcome"];
    let error = outcome["error"].as_str().unwrap_or_default();
    assert_eq!(outcome["cause"], "out_of_memory", "{outcome:#}");
    assert!(
        error.contains("out of memory") && error.contains("128 MiB"),
        "the outcome does not say the memory limit was reached: {outcome:#}"
    );
    assert_eq!(outcome["retryable"], false, "{outcome:#}");
    assert_eq!(
        done["subtasks"][0]["attempt"].as_u64(),
        Some(1),
        "retried: {done:#}"
    );
}

/// CPU: four processes of the agent spin for 2 s of wall time under `sandbox.cpus =
/// 0.05`; together they get about 0.1 s of CPU (before: no quota; on this 2-CPU host,
/// busy with builds, two such processes got 0.7 s outside any sandbox).
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_is_held_to_its_cpu_limit() {
    let _shared = TEST_USER_PROCESSES.read().await;
    if !cgroups_available() {
        return;
    }
    if !Path::new("/sys/fs/cgroup/cpu/cgroup.procs").exists()
        && !std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "cpu"))
    {
        eprintln!("skipped: this host has no cpu cgroup controller");
        return;
    }
    let mut c = cluster(&[("AO__SANDBOX__CPUS", "0.05")]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = r#"
python3 -c '
import os, time
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pass
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
t = os.times()
print("cpu=%.3f" % (t.children_user + t.children_system))
' > cpu.txt
"#;
    start(&mut c, body, &[]).await;
    let (_, done) = run_code_task(&c, &repo, "agent/cpu").await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let report = git(&repo, &["show", "agent/cpu:cpu.txt"]);
    let cpu: f64 = report
        .trim()
        .strip_prefix("cpu=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no CPU time: {report}"));
    eprintln!("CPU time of 4 processes spinning 2 s under 0.05 CPU: {cpu} s");
    assert!(
        cpu < 0.4,
        "the agent used {cpu} s of CPU in 2 s under a limit of 0.05 CPU"
    );
}

/// Defaults: with neither `sandbox.memory_mb` nor `sandbox.cpus` set, each sandbox's
/// cgroup holds a memory limit (three quarters of the host's RAM over
/// `worker.concurrency`, 512–4096 MiB) and a CPU quota (the host's CPUs over
/// `worker.concurrency`, at least one). Before: no memory limit, no CPU quota.
#[tokio::test(flavor = "multi_thread")]
async fn each_sandbox_gets_default_memory_and_cpu_limits() {
    let _shared = TEST_USER_PROCESSES.read().await;
    if !cgroups_available() {
        return;
    }
    if !Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists() {
        eprintln!("skipped: the cgroup files read here are those of a cgroup v1 host");
        return;
    }
    let mut c = cluster(&[("AO__WORKER__CONCURRENCY", "2")]);
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    // Long enough for the test to read the cgroup; the run ends by itself.
    start(&mut c, "echo change > change.txt\nsleep 8\n", &[]).await;
    let (status, task) = c
        .submit(json!({
            "repository": repo.display().to_string(),
            "prompt": "hold",
            "pipeline": "code",
            "branch": "agent/defaults",
        }))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    let name = running_attempt(&c, LIMIT).await;
    let read = |path: String| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = std::fs::read_to_string(&path) {
                break v.trim().to_string();
            }
            assert!(std::time::Instant::now() < deadline, "no {path}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let memory: u64 = read(format!(
        "/sys/fs/cgroup/memory/agent-orchestrator/{name}/memory.limit_in_bytes"
    ))
    .parse()
    .expect("a number");
    let ram_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .expect("meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal");
    let expected_mb = ((ram_kb >> 10) * 3 / 4 / 2).clamp(512, 4096);
    assert_eq!(memory, expected_mb << 20, "memory limit of {name}");
    if Path::new("/sys/fs/cgroup/cpu/cgroup.procs").exists() {
        let quota: u64 = read(format!(
            "/sys/fs/cgroup/cpu/agent-orchestrator/{name}/cpu.cfs_quota_us"
        ))
        .parse()
        .expect("a number");
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let expected = (cpus / 2).max(1) as u64 * 100_000;
        assert_eq!(quota, expected, "CPU quota of {name}");
    } else {
        eprintln!("the CPU quota is not checked: no cgroup v1 cpu hierarchy on this host");
    }
    let id = task["id"].as_str().expect("id");
    let done = c
        .wait_for_status(id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends");
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
}

/// Directories in the cgroup v1 `pids`, `memory` and `cpu` hierarchies made for one test
/// and given to a user, as an operator delegates them; removed (with what is left in
/// them) when dropped.
struct DelegatedV1 {
    dirs: Vec<PathBuf>,
}

impl DelegatedV1 {
    /// `None`, saying why, where the host has no v1 hierarchy or the tests cannot make
    /// directories in it.
    fn make(uid: u32, gid: u32) -> Option<Self> {
        if !running_as_root() {
            eprintln!("skipped: delegating a cgroup needs the tests to run as root");
            return None;
        }
        let mut dirs = Vec::new();
        for hierarchy in ["pids", "memory", "cpu"] {
            let base = Path::new("/sys/fs/cgroup").join(hierarchy);
            if !base.join("cgroup.procs").exists() {
                if hierarchy == "cpu" {
                    continue;
                }
                eprintln!("skipped: no cgroup v1 {hierarchy} hierarchy on this host");
                return None;
            }
            let dir = base.join(format!("ao-test-{}-{}", std::process::id(), marker()));
            std::fs::create_dir(&dir).expect("make the delegated cgroup");
            for path in [dir.clone(), dir.join("cgroup.procs"), dir.join("tasks")] {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown the cgroup");
            }
            dirs.push(dir);
        }
        Some(Self { dirs })
    }

    fn setting(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for DelegatedV1 {
    /// Removes the directories, with the attempt cgroups a killed worker left in them,
    /// once the processes still dying there are gone (a few seconds at most).
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for dir in &self.dirs {
            loop {
                if let Ok(children) = std::fs::read_dir(dir) {
                    for child in children.flatten() {
                        if child.path().is_dir() {
                            let _ = std::fs::remove_dir(child.path());
                        }
                    }
                }
                if std::fs::remove_dir(dir).is_ok() || std::time::Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The ordinary-user worker of these tests: [`TEST_USER`] under root, the tests' own
/// user otherwise.
fn ordinary_cluster(extra: &[(&str, &str)]) -> (Cluster, Option<(u32, u32)>) {
    let mut c = cluster(extra);
    if !running_as_root() {
        return (c, None);
    }
    let (uid, gid) = test_user().unwrap_or_else(|| {
        panic!("user {TEST_USER} is missing: run scripts/install-deps.sh test (as root)")
    });
    c.run_as(uid, gid);
    (c, Some((uid, gid)))
}

/// Starvation: on an ordinary-user worker (two runs at once) with cgroup v1 directories
/// delegated to its user (`sandbox.cgroup_v1_dirs`), one run forks up to
/// `sandbox.max_processes` and holds its processes; a concurrent run of the same worker
/// still starts, forks and succeeds. Before: the process limit was RLIMIT_NPROC, shared
/// by every process of the user, and the second run could not start.
#[tokio::test(flavor = "multi_thread")]
async fn one_run_cannot_starve_a_concurrent_one_with_a_delegated_v1_cgroup() {
    let _shared = TEST_USER_PROCESSES.read().await;
    let (mut c, user) = ordinary_cluster(&[
        ("AO__SANDBOX__MAX_PROCESSES", "40"),
        ("AO__WORKER__CONCURRENCY", "2"),
    ]);
    let Some((uid, gid)) = user else {
        eprintln!(
            "skipped: delegating a cgroup to the worker's user needs the tests to run as root"
        );
        return;
    };
    let Some(delegated) = DelegatedV1::make(uid, gid) else {
        return;
    };
    let setting = delegated.setting();
    let root = c.dir.path().to_path_buf();
    let hog = bare_repo(&root, "hog", &[]);
    let other = bare_repo(&root, "other", &[]);
    start(
        &mut c,
        HOG_OR_OTHER,
        &[("AO__SANDBOX__CGROUP_V1_DIRS", setting.as_str())],
    )
    .await;
    let hog_id = start_hog(&c, &hog).await;
    let forked = forked_by_hog(&c, &hog_id).await;
    assert!(forked < 40, "{forked} processes under a limit of 40");
    let (_, done) = run_code_task(&c, &other, "agent/other").await;
    assert_eq!(
        done["status"],
        "succeeded",
        "the concurrent run was starved: {done:#}\n{}",
        c.logs()
    );
    assert_eq!(
        git(&other, &["show", "agent/other:other.txt"]),
        "other-forked=10"
    );
    let hog_now = c.task(&hog_id).await.expect("hog task");
    assert_eq!(
        hog_now["status"], "running",
        "the runs did not overlap: {hog_now:#}"
    );
    let _ = c.post_json(&format!("/api/v1/tasks/{hog_id}/cancel")).await;
    let _ = c
        .wait_for_status(&hog_id, &["cancelled", "failed", "succeeded"], LIMIT)
        .await;
    drop(c);
    drop(delegated);
}

/// Starvation without any cgroup: an ordinary-user worker (two runs at once) with neither
/// `sandbox.cgroup_dir` nor `sandbox.cgroup_v1_dirs`. One run forks up to
/// `sandbox.max_processes` and holds its processes; a concurrent run of the same worker
/// still starts, forks and succeeds, and the hog stays below its limit. Before: the limit
/// was RLIMIT_NPROC set on bubblewrap, which counts every process of the host user, and
/// the second run failed with `bwrap: Creating new namespace failed: Resource temporarily
/// unavailable`.
#[tokio::test(flavor = "multi_thread")]
async fn one_run_cannot_starve_a_concurrent_one_without_a_cgroup() {
    // Every other test's sandboxes run as the same user: none may count against the
    // host-wide limit while this one holds its processes.
    let _alone = TEST_USER_PROCESSES.write().await;
    let (mut c, _) = ordinary_cluster(&[
        ("AO__SANDBOX__MAX_PROCESSES", "40"),
        ("AO__WORKER__CONCURRENCY", "2"),
    ]);
    let root = c.dir.path().to_path_buf();
    let hog = bare_repo(&root, "hog", &[]);
    let other = bare_repo(&root, "other", &[]);
    start(&mut c, HOG_OR_OTHER, &[]).await;
    let hog_id = start_hog(&c, &hog).await;
    let forked = forked_by_hog(&c, &hog_id).await;
    assert!(forked < 40, "{forked} processes under a limit of 40");
    let (_, done) = run_code_task(&c, &other, "agent/other").await;
    let hog_now = c.task(&hog_id).await.expect("hog task");
    let _ = c.post_json(&format!("/api/v1/tasks/{hog_id}/cancel")).await;
    let _ = c
        .wait_for_status(&hog_id, &["cancelled", "failed", "succeeded"], LIMIT)
        .await;
    assert_eq!(
        done["status"],
        "succeeded",
        "the concurrent run was starved: {done:#}\n{}",
        c.logs()
    );
    assert_eq!(
        git(&other, &["show", "agent/other:other.txt"]),
        "other-forked=10"
    );
    assert_eq!(
        hog_now["status"], "running",
        "the runs did not overlap: {hog_now:#}"
    );
}
