//! Attacks on the Nomad sandbox's per-attempt proxy, as a hostile agent holding the
//! attempt's proxy token and as another party on the cluster reaching the proxy's TCP
//! port without it. One attempt runs for the whole file: the real coordinator and worker
//! on the `nomad` driver, the fake Nomad running the real `worker runner` with the real
//! Claude Code CLI against the scripted model server. The agent dumps its environment
//! (where the test reads the proxy's address and token) and then waits until every
//! attack has run; each test attacks the live proxy from outside, with what the agent
//! has, and asserts that the attack fails.

// Test helpers may panic: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use ao_tests::fake_nomad::FakeNomad;
use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::stack::{nomad_env, nomad_options};
use ao_tests::{bare_repo, free_port, Cluster};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The model key: the worker's `agent.api_key` only.
const MODEL_KEY: &str = "sk-ant-nomad-breaker-0123456789abcdef";
/// The tests of this file and whether each is ignored: the attempt ends once all of
/// those this run selects are done.
const TESTS: &[(&str, bool)] = &[
    ("the_token_is_checked_per_request_not_per_connection", false),
    (
        "tunnels_without_the_token_do_not_starve_another_attempt",
        false,
    ),
    ("server_tools_in_disguise_are_never_forwarded", false),
    (
        "a_call_hung_up_on_before_its_answer_is_still_metered",
        false,
    ),
    ("content_the_model_api_would_fetch_by_url_is_refused", false),
    (
        "another_attempts_proxy_refuses_this_attempts_token_and_is_not_reachable_through_it",
        false,
    ),
    (
        "the_workers_coordinators_nomads_and_models_ports_are_refused_through_the_proxy",
        false,
    ),
    ("loopback_aliases_ipv6_and_port_tricks_are_refused", false),
    ("an_allow_listed_host_never_sees_the_token", false),
    ("near_misses_of_the_token_are_refused", false),
    (
        "a_connect_to_the_proxy_itself_without_the_token_is_refused",
        false,
    ),
    ("the_token_stays_out_of_nomad_logs_and_events", false),
    ("unmetered_model_paths_are_never_forwarded", false),
    (
        "concurrent_pipelined_and_tunnelled_calls_stay_within_the_budget",
        false,
    ),
    ("a_streamed_call_hung_up_on_is_still_metered", false),
    (
        "tunnels_to_the_proxy_itself_stay_within_the_connection_bound",
        false,
    ),
    (
        "idle_connections_do_not_lock_the_attempt_out_of_its_proxy",
        false,
    ),
    ("huge_and_slow_request_heads_do_not_stop_the_proxy", false),
    ("no_answer_of_the_proxy_carries_the_model_key", false),
];

/// Whether this run of the test binary runs the test `name`.
fn runs(name: &str) -> bool {
    selection().contains(&name)
}

/// How many of [`TESTS`] this run of the test binary selects.
fn selected() -> usize {
    selection().len()
}

/// The tests of [`TESTS`] this run of the test binary selects (its filters, `--skip`,
/// `--exact`, `--ignored`, `--include-ignored`).
fn selection() -> Vec<&'static str> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let (ignored, include, exact) = (
        flag("--ignored"),
        flag("--include-ignored"),
        flag("--exact"),
    );
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--skip" => skips.extend(it.next().cloned()),
            "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" => {
                it.next();
            }
            a if a.starts_with('-') => {}
            a => filters.push(a.to_string()),
        }
    }
    let matches = |name: &str, f: &String| {
        if exact {
            name == f
        } else {
            name.contains(f.as_str())
        }
    };
    TESTS
        .iter()
        .filter(|(_, ig)| if ignored { *ig } else { include || !*ig })
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| matches(name, f)))
        .filter(|(name, _)| !skips.iter().any(|f| matches(name, f)))
        .map(|(name, _)| *name)
        .collect()
}
/// Words in a model call of the attacks, so the model server's record tells them apart.
const MARK: &str = "breaker-call";
/// The tag of calls the model answers only after a second ($1.00 each).
const LATE: &str = "answered-late";

/// The running attempt and what the attacks need of it.
struct Fixture {
    /// The proxy's `host:port`.
    proxy: String,
    token: String,
    worker_pid: i32,
    worker_port: u16,
    coordinator_port: u16,
    nomad_port: u16,
    model_url: String,
    /// An allow-listed destination (`sandbox.allow_hosts`) and every byte it received.
    echo_port: u16,
    echo_seen: Arc<Mutex<Vec<u8>>>,
    /// The attacked attempt's task, then the concurrent one's.
    task_ids: Vec<String>,
    /// A concurrent attempt of another task on the same worker: its proxy and token.
    other_proxy: String,
    other_token: String,
    model: ModelServer,
    fake: FakeNomad,
    cluster: Mutex<Cluster>,
    /// Signals the end of the attacks; answered when the attempt is over.
    finish: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    finished: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

static FIXTURE: OnceLock<&'static Fixture> = OnceLock::new();
static DONE: AtomicUsize = AtomicUsize::new(0);
/// Set when the attack that needs the concurrent attempt's budget unspent has run.
static URL_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The floods of the proxy hold it alone (write); every other attack shares it (read),
/// so that a flood never fails another attack.
static FLOOD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Held by each test; the last one to end lets the attempt finish and waits for it.
struct Use(&'static Fixture);

impl Drop for Use {
    fn drop(&mut self) {
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 == selected() {
            if let Some(tx) = self.0.finish.lock().unwrap().take() {
                let _ = tx.send(());
            }
            if let Some(rx) = self.0.finished.lock().unwrap().take() {
                let _ = rx.recv_timeout(Duration::from_secs(90));
            }
        }
    }
}

fn fixture() -> Use {
    Use(FIXTURE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run_fixture(tx));
        });
        rx.recv_timeout(Duration::from_secs(180))
            .expect("the attempt did not start")
    }))
}

/// An HTTP server on the allow-list: answers `ok` to anything and keeps what it got.
async fn echo_server(seen: Arc<Mutex<Vec<u8>>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    port
}

async fn run_fixture(ready: std::sync::mpsc::Sender<&'static Fixture>) {
    let nomad_port = free_port();
    let addr = format!("http://127.0.0.1:{nomad_port}");
    let env = nomad_env(&addr);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    let fake = FakeNomad::start_on(nomad_port, nomad_options(c.dir.path(), 2))
        .await
        .unwrap();
    fake.register_sandbox_job("coder").await.unwrap();
    let env_dir = c.dir.path().join("agent-envs");
    std::fs::create_dir_all(&env_dir).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&env_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let go = c.dir.path().join("attacks-done");
    let wait = format!(
        "env > $(mktemp {env}/env-XXXXXX); for i in $(seq 1 2400); do [ -f {go} ] && break; sleep 0.1; done; \
         echo waited",
        env = env_dir.display(),
        go = go.display()
    );
    // Calls of the attacks that name `LATE` are answered after a second.
    let late = Turn::new(
        Step::Delay(Duration::from_secs(1), Box::new(Step::text("late"))),
        333_334,
        1,
    );
    let routes = vec![(
        LATE.to_string(),
        vec![late.clone(), late.clone(), late.clone(), late],
    )];
    let model = ModelServer::start_routed(vec![
        // The agent prints what it holds: its events must not show the token.
        Turn::new(
            Step::tool(
                "Bash",
                json!({ "command": "echo \"leak-probe key=$ANTHROPIC_API_KEY proxy=$HTTPS_PROXY\"" }),
            ),
            10,
            10,
        ),
        Turn::new(
            Step::tool("Bash", json!({ "command": wait, "timeout": 300000 })),
            10,
            10,
        ),
        Turn::new(Step::text("done"), 10, 1),
        // The attacks' own calls ($1.00 each: 333,334 input tokens at $3 per million).
        Turn::new(Step::text("costly"), 333_334, 1),
    ], routes)
    .await;
    let echo_seen = Arc::new(Mutex::new(Vec::new()));
    let echo_port = echo_server(echo_seen.clone()).await;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let cli = claude_cli().display().to_string();
    c.start_coordinator().await.unwrap();
    let worker_port = free_port();
    let worker_listen = format!("127.0.0.1:{worker_port}");
    let allow = format!("127.0.0.1:{echo_port}");
    c.start_worker(&[
        ("AO__WORKER__LISTEN", worker_listen.as_str()),
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__COMMAND", cli.as_str()),
        ("AO_TEST_MODEL_KEY", MODEL_KEY),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ("AO__AGENT__BASE_URL", model.url.as_str()),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__AGENT__PROFILES__CODER__MAX_COST_USD", "0.5"),
        ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
        ("AO__SANDBOX__ALLOW_HOSTS", allow.as_str()),
        ("AO__WORKER__CONCURRENCY", "2"),
    ]);
    let mut task_ids = Vec::new();
    for branch in ["agent/breaker", "agent/other"] {
        let (status, task) = c
            .submit(json!({
                "repository": repo.display().to_string(),
                "prompt": "Add a note",
                "pipeline": ["coder"],
                "branch": branch
            }))
            .await
            .unwrap();
        assert_eq!(status, 202, "{task}");
        task_ids.push(task["id"].as_str().unwrap().to_string());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    // The proxy and token of each attempt, from its agent's environment.
    let mut attempts: Vec<(String, String)> = loop {
        let found: Vec<(String, String)> = std::fs::read_dir(&env_dir)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .filter_map(|t| {
                let token = t
                    .lines()
                    .find_map(|l| l.strip_prefix("ANTHROPIC_API_KEY="))?;
                let base = t
                    .lines()
                    .find_map(|l| l.strip_prefix("ANTHROPIC_BASE_URL="))?;
                t.contains("HTTPS_PROXY=").then(|| {
                    (
                        base.trim_start_matches("http://")
                            .trim_end_matches('/')
                            .to_string(),
                        token.to_string(),
                    )
                })
            })
            .collect();
        if found.len() == 2 {
            break found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agents never ran:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (other_proxy, other_token) = attempts.pop().unwrap();
    let (proxy, token) = attempts.pop().unwrap();
    assert_ne!(proxy, other_proxy);
    let (finish_tx, finish_rx) = std::sync::mpsc::channel();
    let (finished_tx, finished_rx) = std::sync::mpsc::channel();
    let coordinator_port = c.port;
    let worker_pid = c.workers[0].pid().as_raw();
    let model_url = model.url.clone();
    let f: &'static Fixture = Box::leak(Box::new(Fixture {
        proxy,
        token,
        worker_pid,
        worker_port,
        coordinator_port,
        nomad_port,
        model_url,
        echo_port,
        echo_seen,
        task_ids,
        other_proxy,
        other_token,
        model,
        fake,
        cluster: Mutex::new(c),
        finish: Mutex::new(Some(finish_tx)),
        finished: Mutex::new(Some(finished_rx)),
    }));
    ready.send(f).unwrap();
    let _ = tokio::task::spawn_blocking(move || finish_rx.recv()).await;
    std::fs::write(&go, "go").unwrap();
    for id in &f.task_ids {
        let (http, url) = {
            let c = f.cluster.lock().unwrap();
            (c.http.clone(), c.url(&format!("/api/v1/tasks/{id}")))
        };
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < end {
            let done = http
                .get(&url)
                .bearer_auth(ao_tests::TOKEN)
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            let status = if done {
                http.get(&url)
                    .bearer_auth(ao_tests::TOKEN)
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap_or_default()["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            } else {
                String::new()
            };
            if matches!(status.as_str(), "succeeded" | "failed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Stop the daemons before the test process exits.
    let mut c = f.cluster.lock().unwrap();
    for w in c.workers.iter_mut() {
        w.kill_hard();
    }
    if let Some(d) = c.coordinator.as_mut() {
        d.kill_hard();
    }
    drop(c);
    let _ = finished_tx.send(());
}

/// Sends `request` raw to `addr` and returns what came back within `limit` (up to the
/// end of the answer's head, or everything when `whole`).
async fn raw_at(addr: &str, request: &[u8], whole: bool, limit: Duration) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return "connect failed".into();
    };
    if s.write_all(request).await.is_err() {
        return "write failed".into();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if !whole && got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

async fn raw(f: &Fixture, request: &[u8]) -> String {
    raw_at(&f.proxy, request, false, Duration::from_secs(10)).await
}

/// The status code of an HTTP answer's head (0 when there is none).
fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn basic(token: &str) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("ao:{token}"));
    format!("Basic {b}")
}

/// A `CONNECT` to `dest` with the attempt's token as the proxy credentials.
fn connect_req(f: &Fixture, dest: &str) -> Vec<u8> {
    format!(
        "CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\nProxy-Authorization: {}\r\n\r\n",
        basic(&f.token)
    )
    .into_bytes()
}

/// A plain proxied `GET` of `url` with the attempt's token as the proxy credentials.
fn get_req(f: &Fixture, url: &str) -> Vec<u8> {
    format!(
        "GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        basic(&f.token)
    )
    .into_bytes()
}

/// A Messages call with the token as the key whose conversation holds three assistant
/// messages: the scripted model answers it with its $1.00 step.
fn costly_body(tag: &str) -> String {
    json!({
        "model": MODEL, "max_tokens": 10,
        "messages": [
            {"role": "user", "content": format!("{MARK} {tag}")},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
            {"role": "assistant", "content": "e"},
            {"role": "user", "content": "f"}
        ]
    })
    .to_string()
}

fn messages_req(f: &Fixture, path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nx-api-key: {}\r\ncontent-type: application/json\r\n\
         anthropic-version: 2023-06-01\r\ncontent-length: {}\r\n\r\n{body}",
        f.proxy,
        f.token,
        body.len()
    )
    .into_bytes()
}

/// [`messages_req`] with the concurrent attempt's token.
fn other_req(f: &Fixture, path: &str, body: &str) -> Vec<u8> {
    String::from_utf8(messages_req(f, path, body))
        .unwrap()
        .replace(&f.token, &f.other_token)
        .into_bytes()
}

/// Sets its flag when dropped (the test ended, passed or not).
struct SetOnDrop(&'static std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn calls_tagged(f: &Fixture, tag: &str) -> usize {
    let needle = format!("{MARK} {tag}");
    f.model
        .requests()
        .iter()
        .filter(|r| r.body.to_string().contains(&needle))
        .count()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------
// Reaching what is off the allow-list.

/// The worker's own port (metrics, the hand-over), the coordinator's API, Nomad's API
/// and the model API itself, by `CONNECT` and by absolute-form, with the token: each
/// refused (403), nothing reaches them.
#[tokio::test(flavor = "multi_thread")]
async fn the_workers_coordinators_nomads_and_models_ports_are_refused_through_the_proxy() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let model = f
        .model_url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let before = f.model.requests().len();
    for dest in [
        format!("127.0.0.1:{}", f.worker_port),
        format!("127.0.0.1:{}", f.coordinator_port),
        format!("127.0.0.1:{}", f.nomad_port),
        model.to_string(),
    ] {
        let a = raw(f, &connect_req(f, &dest)).await;
        assert_eq!(status(&a), 403, "CONNECT {dest}: {a}");
        for path in ["/metrics", "/v1/messages", "/api/v1/tasks", "/v1/jobs"] {
            let a = raw(f, &get_req(f, &format!("http://{dest}{path}"))).await;
            assert_eq!(status(&a), 403, "GET http://{dest}{path}: {a}");
        }
    }
    assert_eq!(
        f.model.requests().len(),
        before,
        "the model API was reached"
    );
}

/// Other names and forms of loopback and of the worker's port: IPv6, short and
/// numeric forms, a trailing dot, upper case, a mapped IPv4 address, `0.0.0.0`.
#[tokio::test(flavor = "multi_thread")]
async fn loopback_aliases_ipv6_and_port_tricks_are_refused() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let wp = f.worker_port;
    for dest in [
        format!("[::1]:{wp}"),
        format!("[::ffff:127.0.0.1]:{wp}"),
        format!("127.1:{wp}"),
        format!("2130706433:{wp}"),
        format!("0x7f000001:{wp}"),
        format!("0.0.0.0:{wp}"),
        format!("127.0.0.2:{wp}"),
        format!("localhost.:{wp}"),
        format!("LOCALHOST:{wp}"),
        format!("localhost:{wp}"),
        format!("127.0.0.1:{}", wp as u32 + 65536),
        format!("127.0.0.1:0{wp}"),
        format!("127.0.0.1:+{wp}"),
        format!("127.0.0.1:{}:", wp),
        format!("ao@127.0.0.1:{wp}"),
    ] {
        let a = raw(f, &connect_req(f, &dest)).await;
        assert_ne!(status(&a), 200, "CONNECT {dest} was tunnelled: {a}");
        let a = raw(f, &get_req(f, &format!("http://{dest}/metrics"))).await;
        assert!(
            !a.contains("# HELP") && !a.contains("# TYPE"),
            "GET http://{dest}/metrics reached the worker: {a}"
        );
    }
}

/// An allow-listed destination never receives the attempt's token, whether the proxy
/// forwards a plain request or tunnels a `CONNECT`.
#[tokio::test(flavor = "multi_thread")]
async fn an_allow_listed_host_never_sees_the_token() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let dest = format!("127.0.0.1:{}", f.echo_port);
    let a = raw_at(
        &f.proxy,
        &get_req(f, &format!("http://{dest}/plain")),
        true,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status(&a), 200, "{a}");
    // Twice, in two spellings, and as a Bearer too.
    let twice = format!(
        "GET http://{dest}/twice HTTP/1.1\r\nHost: x\r\nproxy-authorization: {}\r\n\
         PROXY-AUTHORIZATION: Bearer {}\r\nProxy-Connection: keep-alive\r\nConnection: close\r\n\r\n",
        basic(&f.token),
        f.token
    );
    let a = raw_at(&f.proxy, twice.as_bytes(), true, Duration::from_secs(5)).await;
    assert_eq!(status(&a), 200, "{a}");
    let a = raw(f, &connect_req(f, &dest)).await;
    assert_eq!(status(&a), 200, "{a}");
    let seen = String::from_utf8_lossy(&f.echo_seen.lock().unwrap()).into_owned();
    assert!(seen.contains("/plain") && seen.contains("/twice"), "{seen}");
    assert!(!seen.contains(&f.token), "the token reached {dest}: {seen}");
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("ao:{}", f.token));
    assert!(!seen.contains(&b), "the token reached {dest}: {seen}");
}

// ---------------------------------------------------------------------------------
// The token.

/// Near misses of the token, an empty one and other schemes are all refused, on the
/// model endpoint and as proxy credentials.
#[tokio::test(flavor = "multi_thread")]
async fn near_misses_of_the_token_are_refused() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let t = &f.token;
    let mut wrong = vec![
        String::new(),
        format!("{t}x"),
        t[..t.len() - 1].to_string(),
        t.to_uppercase(),
        MODEL_KEY.to_string(),
    ];
    wrong.retain(|w| w != t);
    let dest = format!("127.0.0.1:{}", f.echo_port);
    for w in &wrong {
        let req = format!(
            "CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\nProxy-Authorization: {}\r\n\r\n",
            basic(w)
        );
        let a = raw(f, req.as_bytes()).await;
        assert_eq!(status(&a), 407, "{w:?}: {a}");
        let body = "{}";
        let req = format!(
            "POST /v1/messages/count_tokens HTTP/1.1\r\nHost: x\r\nx-api-key: {w}\r\n\
             authorization: Digest {t}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let a = raw(f, req.as_bytes()).await;
        assert!(
            matches!(status(&a), 401 | 400),
            "{w:?} on the model endpoint: {a}"
        );
    }
}

/// A connection that once carried the token carries no right: pipelined requests
/// without it after one with it, and requests without it inside a tunnel to the proxy
/// itself opened with it, are refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_checked_per_request_not_per_connection() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let dest = format!("127.0.0.1:{}", f.echo_port);
    let first = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\r\n",
        f.token
    );
    let bare_get = format!("GET http://{dest}/pipelined HTTP/1.1\r\nHost: {dest}\r\n\r\n");
    let bare_model = "POST /v1/messages/count_tokens HTTP/1.1\r\nHost: x\r\n\
                      content-length: 2\r\nConnection: close\r\n\r\n{}";
    let all = [first.as_str(), bare_get.as_str(), bare_model].concat();
    let a = raw_at(&f.proxy, all.as_bytes(), true, Duration::from_secs(5)).await;
    let codes: Vec<u16> = a
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| status(&a[i..]))
        .collect();
    assert_eq!(codes, vec![404, 407, 401], "{a}");
    // Inside a tunnel to the proxy itself, opened with the token.
    let tunnel = [connect_req(f, &f.proxy), bare_model.as_bytes().to_vec()].concat();
    let a = raw_at(&f.proxy, &tunnel, true, Duration::from_secs(5)).await;
    let codes: Vec<u16> = a
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| status(&a[i..]))
        .collect();
    assert_eq!(codes, vec![200, 401], "{a}");
    let seen = String::from_utf8_lossy(&f.echo_seen.lock().unwrap()).into_owned();
    assert!(!seen.contains("/pipelined"), "{seen}");
}

/// Anyone on the cluster can reach the proxy's port: a `CONNECT` to the proxy itself
/// without the token must be refused (407) like every other request without it.
#[tokio::test(flavor = "multi_thread")]
async fn a_connect_to_the_proxy_itself_without_the_token_is_refused() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let port = f.proxy.rsplit_once(':').unwrap().1;
    for dest in [f.proxy.clone(), format!("localhost:{port}")] {
        let req = format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n");
        let a = raw(f, req.as_bytes()).await;
        assert_eq!(status(&a), 407, "CONNECT {dest} without the token: {a}");
    }
}

/// The token stays out of Nomad (jobs, evaluations, allocations, variables, the
/// allocation's logs and files), the worker's and coordinator's logs, and the run's
/// events, even when the agent prints it.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_stays_out_of_nomad_logs_and_events() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    for id in &f.task_ids {
        let (http, url) = {
            let c = f.cluster.lock().unwrap();
            (c.http.clone(), c.url(&format!("/api/v1/tasks/{id}/events")))
        };
        // The agent's first command printed the token; wait for its event.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let events = loop {
            let text = http
                .get(&url)
                .bearer_auth(ao_tests::TOKEN)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if text.contains("leak-probe") && text.contains("key=") {
                break text;
            }
            assert!(tokio::time::Instant::now() < deadline, "no probe: {text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(!events.contains(&f.token), "the token is in the events");
        assert!(
            !events.contains(&f.other_token),
            "the token is in the events"
        );
    }
    for (where_, bytes) in f.fake.stored_bytes() {
        for secret in [f.token.as_str(), f.other_token.as_str(), MODEL_KEY] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} is in Nomad's {where_}"
            );
        }
    }
    let logs = f.cluster.lock().unwrap().logs();
    assert!(
        !logs.contains(&f.token),
        "the token is in the daemons' logs"
    );
    assert!(
        !logs.contains(&f.other_token),
        "the token is in the daemons' logs"
    );
}

/// A concurrent attempt's proxy takes nothing with this attempt's token (as proxy
/// credentials or as the model key), and this attempt's proxy does not lead to it.
#[tokio::test(flavor = "multi_thread")]
async fn another_attempts_proxy_refuses_this_attempts_token_and_is_not_reachable_through_it() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let dest = format!("127.0.0.1:{}", f.echo_port);
    let a = raw_at(
        &f.other_proxy,
        &connect_req(f, &dest),
        false,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status(&a), 407, "CONNECT through the other proxy: {a}");
    let a = raw_at(
        &f.other_proxy,
        &get_req(f, &format!("http://{dest}/other")),
        false,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status(&a), 407, "GET through the other proxy: {a}");
    let req = messages_req(f, "/v1/messages", &costly_body("other"));
    let a = raw_at(&f.other_proxy, &req, false, Duration::from_secs(10)).await;
    assert_eq!(status(&a), 401, "a model call on the other proxy: {a}");
    // Through this attempt's proxy to the other one, with this attempt's token.
    let a = raw(f, &connect_req(f, &f.other_proxy)).await;
    assert_eq!(status(&a), 403, "CONNECT to the other proxy: {a}");
    let abs = String::from_utf8(req)
        .unwrap()
        .replacen(
            "/v1/messages",
            &format!("http://{}/v1/messages", f.other_proxy),
            1,
        )
        .replacen(
            "\r\n",
            &format!("\r\nProxy-Authorization: {}\r\n", basic(&f.token)),
            1,
        );
    let a = raw(f, abs.as_bytes()).await;
    assert_eq!(status(&a), 403, "absolute-form to the other proxy: {a}");
    assert_eq!(calls_tagged(f, "other"), 0);
}

// ---------------------------------------------------------------------------------
// Unmetered calls and the budget.

/// Every model path but the two metered ones is refused and never forwarded, however
/// it is spelled (encoded, dotted, doubled slashes, other methods, upper case).
#[tokio::test(flavor = "multi_thread")]
async fn unmetered_model_paths_are_never_forwarded() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let before = f.model.other_requests().len();
    let body = costly_body("paths");
    for path in [
        "/v1/complete",
        "/v1/messages/batches",
        "/v1/messages/../complete",
        "/v1/messages/..%2Fbatches",
        "/v1/messages%2Fbatches",
        "/v1//messages/batches",
        "/V1/MESSAGES/batches",
        "/v1/files",
        "/v1/models",
        "/v1/messages/count_tokens/../batches",
        "/v1/messages/batches?x=/v1/messages",
        "//v1/messages",
    ] {
        let a = raw(f, &messages_req(f, path, &body)).await;
        assert!(
            matches!(status(&a), 400 | 404),
            "POST {path} was answered: {a}"
        );
        let get = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\r\n",
            f.token
        );
        let a = raw(f, get.as_bytes()).await;
        assert!(matches!(status(&a), 400 | 404), "GET {path}: {a}");
    }
    assert_eq!(
        f.model.other_requests().len(),
        before,
        "{:?}",
        f.model.other_requests()
    );
    assert_eq!(calls_tagged(f, "paths"), 0);
}

/// Many $1.00 calls at once, pipelined on one connection, through a `CONNECT` to the
/// proxy itself and in absolute form, against a $0.50 budget: at most the one call that
/// crossed the budget reaches the model.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pipelined_and_tunnelled_calls_stay_within_the_budget() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let body = costly_body("budget");
    let one = messages_req(f, "/v1/messages", &body);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let one = one.clone();
        let proxy = f.proxy.clone();
        let absolute = format!("http://{}/v1/messages", f.proxy);
        let tunnel = connect_req(f, &f.proxy);
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => raw_at(&proxy, &one, true, Duration::from_secs(10)).await,
                1 => {
                    let two = [one.clone(), one.clone(), one].concat();
                    raw_at(&proxy, &two, true, Duration::from_secs(10)).await
                }
                2 => {
                    let s = String::from_utf8(one).unwrap();
                    let abs = s.replacen("/v1/messages", &absolute, 1);
                    raw_at(&proxy, abs.as_bytes(), true, Duration::from_secs(10)).await
                }
                _ => {
                    let both = [tunnel, one.clone(), one].concat();
                    raw_at(&proxy, &both, true, Duration::from_secs(10)).await
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = calls_tagged(f, "budget");
    assert!(
        n <= 1,
        "{n} $1.00 calls reached the model under a $0.50 budget"
    );
}

/// A streamed call the agent hangs up on at once is still metered: the next call is
/// refused for the budget.
#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_call_hung_up_on_is_still_metered() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let mut v: Value = serde_json::from_str(&costly_body("hangup")).unwrap();
    v["stream"] = json!(true);
    let body = v.to_string();
    let req = messages_req(f, "/v1/messages", &body);
    // Hang up as soon as the answer's head arrives.
    let _ = raw_at(&f.proxy, &req, false, Duration::from_secs(10)).await;
    let again = raw_at(&f.proxy, &req, true, Duration::from_secs(10)).await;
    let n = calls_tagged(f, "hangup") + calls_tagged(f, "budget");
    assert!(
        n <= 1,
        "{n} $1.00 calls reached the model under a $0.50 budget: {again}"
    );
}

/// A $1.00 call the agent hangs up on right after sending it, before the model's answer
/// has begun (the model answers after a second): the model did the work, so the call is
/// metered and the next is refused for the budget. On the concurrent attempt's proxy,
/// whose $0.50 budget nothing else spends.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_hung_up_on_before_its_answer_is_still_metered() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    // The concurrent attempt's budget is the URL attack's first.
    if runs("content_the_model_api_would_fetch_by_url_is_refused") {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !URL_DONE.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let body = costly_body(LATE);
    let req = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\ncontent-type: application/json\r\n\
         anthropic-version: 2023-06-01\r\ncontent-length: {}\r\n\r\n{body}",
        f.other_token,
        body.len()
    );
    for _ in 0..3 {
        let mut s = TcpStream::connect(&f.other_proxy).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        // Wait for the proxy to have sent it on, then hang up.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let seen = calls_tagged(f, LATE);
        while calls_tagged(f, LATE) == seen && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(s);
    }
    // The last call waits for every earlier one at the budget gate.
    let last = raw_at(
        &f.other_proxy,
        req.as_bytes(),
        false,
        Duration::from_secs(10),
    )
    .await;
    let n = calls_tagged(f, LATE);
    assert!(
        n <= 1,
        "{n} $1.00 calls reached the model under a $0.50 budget; the last: {last}"
    );
}

/// The model API fetches images and documents given by URL itself, off the run's
/// allow-list (a way out for the agent's data): such content is refused like the server
/// tools, and never forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn content_the_model_api_would_fetch_by_url_is_refused() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let _done = SetOnDrop(&URL_DONE);
    for block in [
        json!({"type": "image", "source": {"type": "url", "url": "https://exfil.example.invalid/secret.png"}}),
        json!({"type": "document", "source": {"type": "url", "url": "https://exfil.example.invalid/secret.pdf"}}),
    ] {
        let body = json!({
            "model": MODEL, "max_tokens": 10,
            "messages": [{"role": "user", "content": [block, {"type": "text", "text": "x"}]}]
        })
        .to_string();
        for path in ["/v1/messages/count_tokens", "/v1/messages"] {
            let a = raw_at(
                &f.other_proxy,
                &other_req(f, path, &body),
                true,
                Duration::from_secs(5),
            )
            .await;
            assert!(status(&a) == 400, "{path} with {block}: {a}");
        }
        let seen = f
            .model
            .requests()
            .iter()
            .any(|r| r.body.to_string().contains("exfil.example.invalid"));
        assert!(!seen, "the model API was asked to fetch {block}");
    }
}

/// Server tools hidden from the proxy's reading of the request: a gzip-compressed body,
/// JSON escapes in the tool type, the MCP connector as an empty list. Each is refused
/// (or, once the budget is spent, refused for it) and never reaches the model.
#[tokio::test(flavor = "multi_thread")]
async fn server_tools_in_disguise_are_never_forwarded() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let tag = format!("{MARK} disguise");
    let plain = json!({
        "model": MODEL, "max_tokens": 10,
        "messages": [{"role": "user", "content": tag}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]
    })
    .to_string();
    // gzip with one stored (uncompressed) deflate block; the trailer's CRC is not
    // checked by anything here.
    let gzipped = {
        let data = plain.as_bytes();
        let len = data.len() as u16;
        let mut g = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1];
        g.extend_from_slice(&len.to_le_bytes());
        g.extend_from_slice(&(!len).to_le_bytes());
        g.extend_from_slice(data);
        g.extend_from_slice(&[0, 0, 0, 0]);
        g.extend_from_slice(&(data.len() as u32).to_le_bytes());
        g
    };
    let mut bodies: Vec<(Vec<u8>, &str)> = vec![(gzipped, "content-encoding: gzip\r\n")];
    bodies.push((
        plain
            .replace("web_search_20250305", "web\\u005fsearch_20250305")
            .into_bytes(),
        "",
    ));
    bodies.push((
        json!({
            "model": MODEL, "max_tokens": 10,
            "messages": [{"role": "user", "content": tag}],
            "mcp_servers": []
        })
        .to_string()
        .into_bytes(),
        "",
    ));
    for (body, extra) in bodies {
        let mut req = format!(
            "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\
             content-type: application/json\r\n{extra}content-length: {}\r\n\r\n",
            f.token,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let a = raw_at(&f.proxy, &req, true, Duration::from_secs(5)).await;
        assert!(
            matches!(status(&a), 400 | 403),
            "{}: {a}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(calls_tagged(f, "disguise"), 0);
}

// ---------------------------------------------------------------------------------
// Exhausting the proxy and the worker.

/// A `CONNECT` to the proxy itself holds a connection that no longer counts against
/// the proxy's bound of 128 connections: 400 of them, without the token, held idle.
/// The worker's descriptors must stay within the bound.
#[tokio::test(flavor = "multi_thread")]
async fn tunnels_to_the_proxy_itself_stay_within_the_connection_bound() {
    let u = fixture();
    let _flood = FLOOD.write().await;
    let f = u.0;
    let before = open_fds(f.worker_pid);
    let mut held = Vec::new();
    for _ in 0..400 {
        let Ok(mut s) = TcpStream::connect(&f.proxy).await else {
            break;
        };
        let req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", f.proxy);
        if s.write_all(req.as_bytes()).await.is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => held.push(s),
            _ => break,
        }
    }
    let peak = open_fds(f.worker_pid);
    drop(held);
    assert!(
        peak.saturating_sub(before) <= 128 + 16,
        "the worker holds {} more descriptors for one proxy ({before} → {peak})",
        peak.saturating_sub(before)
    );
}

/// The soft limit of open files of process `pid` (`/proc/<pid>/limits`).
fn nofile_limit(pid: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap()
}

/// Anyone who reaches one attempt's proxy port, without its token, opens tunnels to the
/// proxy itself until the worker is out of file descriptors: the concurrent attempt's
/// own call to its own proxy must still be answered (the worker at the usual service
/// limit of 1024 open files).
#[tokio::test(flavor = "multi_thread")]
async fn tunnels_without_the_token_do_not_starve_another_attempt() {
    let u = fixture();
    let _flood = FLOOD.write().await;
    let f = u.0;
    // A worker run as a systemd service has a soft limit of 1024 open files unless told
    // otherwise; this worker gets that limit (its hard limit unchanged).
    let set = std::process::Command::new("prlimit")
        .args(["--pid", &f.worker_pid.to_string(), "--nofile=1024:"])
        .status()
        .unwrap();
    assert!(set.success(), "prlimit failed");
    let worker_limit = nofile_limit(&f.worker_pid.to_string());
    let own_limit = nofile_limit("self");
    let want = worker_limit.saturating_sub(open_fds(f.worker_pid)) + 16;
    assert!(
        want + 64 < own_limit,
        "this test needs more open files ({want}) than its limit {own_limit}"
    );
    let req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", f.proxy);
    let mut held = Vec::new();
    // Until the worker takes no more (a few above what it had free).
    for _ in 0..own_limit - 256 {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&f.proxy)).await
        else {
            break;
        };
        if s.write_all(req.as_bytes()).await.is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => held.push(s),
            _ => break,
        }
    }
    let tunnels = held.len();
    eprintln!(
        "{tunnels} tunnels held; the worker has {} of {worker_limit} files open",
        open_fds(f.worker_pid)
    );
    let get = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\r\n",
        f.other_token
    );
    let a = raw_at(
        &f.other_proxy,
        get.as_bytes(),
        false,
        Duration::from_secs(5),
    )
    .await;
    drop(held);
    assert_eq!(
        status(&a),
        404,
        "after {tunnels} tunnels (worker limit {worker_limit}), the other attempt's call: {a:?}"
    );
}

/// 400 idle connections (no byte sent, by anyone who reaches the port), three times the
/// proxy's bound of connections, must not keep the attempt's own calls from being
/// answered; the flood's oldest connections are closed instead.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_do_not_lock_the_attempt_out_of_its_proxy() {
    let u = fixture();
    let _flood = FLOOD.write().await;
    let f = u.0;
    let mut idle = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = TcpStream::connect(&f.proxy).await {
            idle.push(s);
        }
    }
    let get = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\r\n",
        f.token
    );
    let a = raw_at(&f.proxy, get.as_bytes(), false, Duration::from_secs(8)).await;
    assert_eq!(status(&a), 404, "the attempt's own request: {a:?}");
    // The first idle connection was closed by the proxy (end of stream, or a reset).
    let mut first = idle.swap_remove(0);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), first.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the oldest idle connection is still open: {read:?}"
    );
}

/// A huge request head and a slow one are cut off, and the proxy still answers.
#[tokio::test(flavor = "multi_thread")]
async fn huge_and_slow_request_heads_do_not_stop_the_proxy() {
    let u = fixture();
    let _flood = FLOOD.write().await;
    let f = u.0;
    let big = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\nx-big: {}\r\n\r\n",
        f.token,
        "a".repeat(2 * 1024 * 1024)
    );
    let a = raw_at(&f.proxy, big.as_bytes(), false, Duration::from_secs(10)).await;
    assert!(
        status(&a) == 431 || status(&a) == 400 || a.is_empty() || a.contains("failed"),
        "{a}"
    );
    let mut slow = TcpStream::connect(&f.proxy).await.unwrap();
    slow.write_all(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let get = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\r\n",
        f.token
    );
    let a = raw_at(&f.proxy, get.as_bytes(), false, Duration::from_secs(8)).await;
    assert_eq!(status(&a), 404, "{a:?}");
    drop(slow);
}

/// Answers the proxy sends back never carry the model key (error texts, headers).
#[tokio::test(flavor = "multi_thread")]
async fn no_answer_of_the_proxy_carries_the_model_key() {
    let u = fixture();
    let _flood = FLOOD.read().await;
    let f = u.0;
    let mut answers = Vec::new();
    for req in [
        messages_req(f, "/v1/messages", "not json"),
        messages_req(f, "/v1/messages/count_tokens", "{}"),
        messages_req(
            f,
            "/v1/messages",
            &json!({"model": MODEL, "max_tokens": 1, "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}).to_string(),
        ),
        connect_req(f, "127.0.0.1:1"),
        get_req(f, "http://127.0.0.1:1/"),
    ] {
        answers.push(raw_at(&f.proxy, &req, true, Duration::from_secs(5)).await);
    }
    for a in &answers {
        assert!(!a.contains(MODEL_KEY), "{a}");
        assert!(!a.contains("sk-ant-"), "{a}");
    }
}
