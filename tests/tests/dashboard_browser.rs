//! The dashboard in a real browser: a coordinator and a worker (SQLite backends, a script
//! standing in for Claude Code that prints stream-json slowly), and headless Chromium
//! driven by `tests/browser/dashboard.spec.mjs` (playwright-core). The script logs in,
//! submits a task, follows it live and cancels another; this test checks its exit status,
//! then the tasks it left behind through the API. Screenshots go to
//! `$CARGO_TARGET_DIR/test-artifacts/dashboard/`. `make test` installs Chromium and the
//! npm packages (scripts/install-deps.sh).

use ao_tests::{bare_repo, bin_dir, script, Cluster, TOKEN};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Chromium as Debian installs it.
const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser session, on a loaded machine.
const BROWSER_LIMIT: Duration = Duration::from_secs(300);

/// Stands in for Claude Code (`agent.kind = claude`): reads the prompt on standard input
/// and prints stream-json a line every second or so: assistant text, tool calls and their
/// results, a plain line (which the runner forwards as a `log` event), text that looks
/// like markup, and a result with its cost. A prompt asking for a slow task only prints a
/// line a second for two minutes, to be cancelled.
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
echo "a plain line from the agent"
sleep 1.2
msg 3 '{"type":"tool_use","id":"t2","name":"Write","input":{"file_path":"NOTES.md","content":"secret body"}}'
echo note > NOTES.md
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
    let agent = script(c.dir.path(), "agent.sh", AGENT);
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
