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
use std::path::Path;
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
    let (status, task) = c
        .submit(json!({
            "repository": repo.display().to_string(),
            "prompt": "attack the sandbox",
            "pipeline": "code",
            "branch": branch,
        }))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().expect("task id").to_string()
}

async fn finished(c: &Cluster, id: &str) -> Value {
    c.wait_for_status(id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends")
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

macro_rules! for_both_workers {
    ($scenario:ident: $root:ident, $ordinary:ident) => {
        #[tokio::test(flavor = "multi_thread")]
        async fn $root() {
            $scenario(Worker::Root).await
        }
        #[tokio::test(flavor = "multi_thread")]
        async fn $ordinary() {
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
/// outcome's summary, the commit message and event data. It is redacted from each.
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
