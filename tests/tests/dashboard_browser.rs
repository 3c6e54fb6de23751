//! The dashboard, over plain HTTP and in a real browser.
//!
//! Over HTTP: login, the session cookie, the CSRF rule for cookie-authenticated changes,
//! the task-updates stream, logout.
//!
//! In a browser: a coordinator and a worker (SQLite backends, a script standing in for
//! Claude Code that prints stream-json slowly), and headless Chromium driven by
//! `tests/browser/dashboard.spec.mjs` (playwright-core). The script logs in, submits a
//! task, follows it live and cancels another; this test checks its exit status, then the
//! tasks it left behind through the API. Screenshots go to
//! `$CARGO_TARGET_DIR/test-artifacts/dashboard/`. `make test` installs Chromium and the
//! npm packages (scripts/install-deps.sh).

use ao_tests::{bare_repo, bin_dir, script, Cluster, TOKEN};
use reqwest::header::{HeaderMap, CONTENT_SECURITY_POLICY, COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Chromium as Debian installs it.
const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser session, on a loaded machine.
const BROWSER_LIMIT: Duration = Duration::from_secs(300);

/// Stands in for Claude Code (`agent.kind = claude`): reads the prompt on standard input
/// and prints stream-json a line every second or so: assistant text, tool calls and their
/// results, a plain line (which the runner forwards as a `log` event), text that looks
/// like markup, and a result with its cost. Half-way it waits for the browser test to
/// create the file `{gate}`, so the rest can only stream in while the page is open. A
/// prompt asking for a slow task only prints a line a second for two minutes, to be
/// cancelled.
const AGENT: &str = r#"
prompt=$(cat)
msg() { printf '{"type":"assistant","message":{"id":"m%s","role":"assistant","model":"claude-sonnet-4-5","content":[%s],"usage":{"input_tokens":10,"output_tokens":5}}}\n' "$1" "$2"; sleep 1.2; }
res() { printf '{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"%s","content":"%s","is_error":false}]}}\n' "$1" "$2"; sleep 1.2; }
echo '{"type":"system","subtype":"init","session_id":"s1","model":"claude-sonnet-4-5","tools":["Bash","Write"],"mcp_servers":[]}'
case "$prompt" in *"slow task"*)
  for i in $(seq 1 120); do echo "still working $i"; sleep 1; done
  exit 0;;
esac
sleep 1.2
msg 1 '{"type":"text","text":"Looking at the repository first."}'
msg 2 '{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"ls -la"}}'
res t1 'README.md\nsrc\nCargo.toml'
for i in $(seq 1 1200); do [ -e '{gate}' ] && break; sleep 0.1; done
echo "a plain line from the agent"
sleep 1.2
msg 3 '{"type":"tool_use","id":"t2","name":"Write","input":{"file_path":"NOTES.md","content":"secret body"}}'
printf 'note <img src=x onerror="window.__pwned=3"><script>window.__pwned=4</script>\n' > NOTES.md
res t2 'File created'
msg 4 '{"type":"text","text":"<script>window.__pwned=2</script> Wrote <b>NOTES.md</b>."}'
echo '{"type":"result","subtype":"success","is_error":false,"num_turns":3,"total_cost_usd":0.042,"duration_ms":7000,"result":"Wrote NOTES.md","usage":{"input_tokens":40,"output_tokens":20,"cache_read_input_tokens":0,"cache_creation_input_tokens":0}}'
"#;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// `$CARGO_TARGET_DIR/test-artifacts/dashboard`, found from the test binary.
fn artifacts_dir() -> PathBuf {
    bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(bin_dir)
        .join("test-artifacts")
        .join("dashboard")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_follows_tasks_live_in_a_browser() {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: `apt-get install chromium` (make test does)"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: `npm ci --prefix tests/browser` (make test does)"
    );
    let mut c = Cluster::new(&[]);
    let gate = c.dir.path().join("page-is-open");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &AGENT.replace("{gate}", gate.to_str().unwrap()),
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__COMMAND", agent.to_str().unwrap()),
        ("AO__WORKER__CONCURRENCY", "2"),
    ]);

    let artifacts = artifacts_dir();
    let _ = std::fs::remove_dir_all(&artifacts);
    let run = tokio::process::Command::new("node")
        .arg(browser_dir().join("dashboard.spec.mjs"))
        .current_dir(browser_dir())
        .env("AO_DASHBOARD_URL", c.url(""))
        .env("AO_DASHBOARD_TOKEN", TOKEN)
        .env("AO_REPOSITORY", repo.display().to_string())
        .env("AO_ARTIFACTS", &artifacts)
        .env("AO_AGENT_GATE", &gate)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(BROWSER_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("the browser test ran past {BROWSER_LIMIT:?}\n{}", c.logs()))
        .expect("node runs (make test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed ({}):\n{stdout}\n{stderr}\n{}",
        out.status,
        c.logs()
    );

    // What the browser did is what the API holds.
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    let tasks = list["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{list:#}");
    let by_prompt = |needle: &str| -> &Value {
        tasks
            .iter()
            .find(|t| t["prompt"].as_str().is_some_and(|p| p.contains(needle)))
            .unwrap_or_else(|| panic!("no task with {needle:?}: {list:#}"))
    };
    let done = by_prompt("<img src=x");
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert!((done["cost_usd"].as_f64().unwrap() - 0.042).abs() < 1e-9);
    assert_eq!(by_prompt("slow task")["status"], "cancelled");
    let shot = artifacts.join("dashboard-task.png");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "{} is {size} bytes", shot.display());
}

/// `name=value` of each `Set-Cookie`, with the whole header line.
fn set_cookies(headers: &HeaderMap) -> Vec<(String, String, String)> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|line| {
            let pair = line.split(';').next()?;
            let (k, v) = pair.split_once('=')?;
            Some((k.to_string(), v.to_string(), line.to_string()))
        })
        .collect()
}

/// Reads an SSE response until its text so far contains `needle`.
async fn read_until(stream: &mut reqwest::Response, seen: &mut String, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.chunk()).await {
            Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("stream ended or stalled before {needle:?} ({other:?}): {seen}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_csrf_and_live_updates_over_http() {
    let mut c = Cluster::new(&[]);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // Without a session: the page sends to the login page, the API says 401.
    let r = http.get(c.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[LOCATION], "/login");
    let r = http.get(c.url("/api/v1/tasks")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(c.url("/login")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()[CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );

    // A wrong token starts nothing; the right one starts a session.
    let r = http
        .post(c.url("/login"))
        .form(&[("token", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(set_cookies(r.headers()).is_empty());
    let r = http
        .post(c.url("/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[LOCATION], "/");
    let cookies = set_cookies(r.headers());
    let find = |name: &str| {
        cookies
            .iter()
            .find(|(k, _, _)| k == name)
            .unwrap_or_else(|| panic!("no {name} cookie: {cookies:?}"))
            .clone()
    };
    let (_, session, session_line) = find("ao_session");
    let (_, csrf, csrf_line) = find("ao_csrf");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session_line.contains(flag), "{session_line}");
    }
    assert!(
        !csrf_line.contains("HttpOnly"),
        "the page reads it: {csrf_line}"
    );
    assert!(session.len() >= 32 && !session.contains(TOKEN) && session != csrf);
    let cookie = format!("ao_session={session}; ao_csrf={csrf}");

    // The pages and assets, with the session.
    let r = http
        .get(c.url("/"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key(CONTENT_SECURITY_POLICY));
    let page = r.text().await.unwrap();
    assert!(page.contains("/assets/app.js") && !page.contains(TOKEN));
    let r = http.get(c.url("/assets/app.js")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));

    // The task-updates stream, with the cookie: ready first, then changed tasks.
    let mut stream = http
        .get(c.url("/api/v1/task-updates"))
        .header(COOKIE, &cookie)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "event: ready").await;

    // A change with the cookie needs the session's CSRF token.
    let body = json!({ "repository": repo.display().to_string(), "prompt": "via cookie",
                       "pipeline": "code" });
    let create = |csrf: Option<&str>| {
        let mut req = http
            .post(c.url("/api/v1/tasks"))
            .header(COOKIE, &cookie)
            .json(&body);
        if let Some(token) = csrf {
            req = req.header("x-ao-csrf", token);
        }
        req.send()
    };
    let r = create(None).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "csrf");
    let r = create(Some("0123")).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = create(Some(&csrf)).await.unwrap();
    assert_eq!(r.status(), 202);
    let task: Value = r.json().await.unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    read_until(&mut stream, &mut seen, &format!("\"id\":\"{id}\"")).await;
    assert!(seen.contains("event: task"), "{seen}");

    // The bearer token still works on its own, without CSRF.
    let (status, cancelled) = c
        .post_json(&format!("/api/v1/tasks/{id}/cancel"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{cancelled}");
    read_until(&mut stream, &mut seen, "\"status\":\"cancelled\"").await;
    drop(stream);

    // Logout needs the CSRF token too, then the session is gone.
    let r = http
        .post(c.url("/logout"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(c.url("/logout"))
        .header(COOKIE, &cookie)
        .header("x-ao-csrf", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(set_cookies(r.headers())
        .iter()
        .all(|(_, v, line)| v.is_empty() && line.contains("Max-Age=0")));
    let r = http
        .get(c.url("/api/v1/tasks"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(c.url("/"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
}
