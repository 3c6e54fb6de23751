//! What real repositories, git hosts and the agent CLI do to a run, through the real
//! coordinator and worker binaries with real git (local repositories, whose hooks stand
//! for a git host's refusals) and a scripted agent: a push the remote refuses for good,
//! files too big to commit, a task branch that moved during the run (rebased, or kept
//! at a side branch on conflict), an empty repository, a base branch that does not
//! exist, a Claude Code that prints its result and does not exit, and a worker whose
//! configuration cannot work on its host. Each ends once, with the right result or one
//! clear, non-retryable reason, and never runs the agent again for nothing.

use ao_tests::fake_github::{FakeGithub, MAX_FILE_BYTES_FILE};
use ao_tests::scenario::start_agent_worker;
use ao_tests::{bare_repo, git, script, Cluster};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

/// An agent that counts its runs in `<dir>/runs.log`, then runs `body` in the working copy.
fn counting_agent(c: &Cluster, body: &str) -> (PathBuf, PathBuf) {
    let runs = c.dir.path().join("runs.log");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!("echo run >> {}\n{body}", runs.display()),
    );
    (runs, agent)
}

fn runs(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Starts the coordinator and a worker running `agent`, submits a `code` task (with the
/// extra fields of `body`) and waits for its end; returns the task.
async fn run_task(c: &mut Cluster, agent: &Path, body: Value) -> Value {
    c.start_coordinator().await.expect("coordinator");
    start_agent_worker(c, agent);
    let mut request = json!({ "prompt": "change it", "pipeline": "code" });
    if let (Some(r), Some(extra)) = (request.as_object_mut(), body.as_object()) {
        r.extend(extra.clone());
    }
    let (status, task) = c.submit(request).await.expect("submit");
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().expect("task id").to_string();
    c.wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends")
}

/// The task's one subtask.
fn only_subtask(task: &Value) -> &Value {
    let subtasks = task["subtasks"].as_array().expect("subtasks");
    assert_eq!(subtasks.len(), 1, "{task:#}");
    &subtasks[0]
}

/// Writes an executable hook into a bare repository.
fn hook(repo: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = repo.join("hooks").join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("hook");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Creates `branch` in the bare `repo` from its `main`.
fn make_branch(repo: &Path, branch: &str) {
    git(repo, &["branch", branch, "main"]);
}

/// Shell lines that wait (up to 60 s) until `branch` of the bare `repo` is no longer at
/// `tip`: the agent stays in its run until the person's push ([`push_once_the_agent_runs`])
/// happened. The loose ref is read as a file, which the `bwrap` sandbox shows read-only.
fn wait_for_the_branch_to_move(repo: &Path, branch: &str, tip: &str) -> String {
    format!(
        "for i in $(seq 600); do [ \"$(cat {}/refs/heads/{branch})\" != {tip} ] && break; \
         sleep 0.1; done",
        repo.display()
    )
}

/// Once a process running `agent` is seen on the host (the agent of the run, under any
/// driver), commits `file` = `text` onto `branch` of `repo` from a clone of the test's
/// own and pushes it, as a person pushing during the run would.
fn push_once_the_agent_runs(
    c: &Cluster,
    agent: &Path,
    repo: &Path,
    branch: &str,
    file: &str,
    text: &str,
) -> tokio::task::JoinHandle<()> {
    let agent = agent.display().to_string();
    let clone = c.dir.path().join("human");
    let (repo, branch, file, text) = (
        repo.to_path_buf(),
        branch.to_string(),
        file.to_string(),
        text.to_string(),
    );
    tokio::spawn(async move {
        let deadline = Instant::now() + LIMIT;
        while !agent_running(&agent) {
            assert!(Instant::now() < deadline, "the agent never ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let repo = repo.display().to_string();
        let clone_s = clone.display().to_string();
        git(
            Path::new("/"),
            &["clone", "-q", "-b", &branch, &repo, &clone_s],
        );
        std::fs::write(clone.join(&file), &text).expect("write");
        git(&clone, &["add", "-A"]);
        git(
            &clone,
            &[
                "-c",
                "user.name=human",
                "-c",
                "user.email=h@example.com",
                "commit",
                "-qm",
                "human",
            ],
        );
        git(&clone, &["push", "-q", "origin", &branch]);
    })
}

/// Whether a process running the script `agent` is on the host: its interpreter's
/// command line names it (bubblewrap's own, which names it in a mount, does not count).
fn agent_running(agent: &str) -> bool {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten().any(|entry| {
                std::fs::read(entry.path().join("cmdline"))
                    .map(|line| {
                        let line = String::from_utf8_lossy(&line);
                        line.contains(agent) && !line.contains("--ro-bind")
                    })
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_the_remote_refuses_fails_once_quoting_its_reason() {
    let mut c = Cluster::new(&[]);
    let (count, agent) = counting_agent(&c, "echo change > change.txt");
    let repo = bare_repo(c.dir.path(), "project", &[]);
    // The words of GitHub's protected-branch refusal, through a pre-receive hook.
    hook(
        &repo,
        "pre-receive",
        "echo 'error: GH006: Protected branch update failed for refs/heads/agent/guarded.' >&2\n\
         echo 'error: Changes must be made through a pull request.' >&2\nexit 1",
    );
    let task = run_task(
        &mut c,
        &agent,
        json!({ "repository": repo.display().to_string(), "branch": "agent/guarded" }),
    )
    .await;
    let subtask = only_subtask(&task);
    assert_eq!(task["status"], "failed", "{task:#}\n{}", c.logs());
    assert_eq!(subtask["attempt"], 1, "retried: {task:#}");
    assert_eq!(runs(&count), 1, "the agent ran again");
    let outcome = &subtask["outcome"];
    assert_eq!(outcome["retryable"], false, "{outcome:#}");
    assert_eq!(outcome["cause"], "push_refused", "{outcome:#}");
    let error = outcome["error"].as_str().unwrap_or_default();
    for quoted in [
        "pre-receive hook declined",
        "GH006: Protected branch update failed",
        "Changes must be made through a pull request",
    ] {
        assert!(error.contains(quoted), "{quoted:?} not in {error}");
    }
}

/// The same over real git on smart HTTP, refused as GitHub refuses a file over its size
/// limit (the fake's pre-receive hook, in GitHub's words), from an issue to the end.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_over_the_git_hosts_limit_fails_once_in_the_hosts_words() {
    const REPO: &str = "acme/widgets";
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    let bare = fake.add_repo(7, REPO, &[]);
    std::fs::write(bare.join(MAX_FILE_BYTES_FILE), "100000").expect("limit");
    fake.set_role(REPO, "alice", "write");
    // No limit of the runner's own: the host's answer is what is under test.
    let mut c = fake.cluster(Some("code"), &[("AO__AGENT__MAX_FILE_BYTES", "0")]);
    let (count, agent) = counting_agent(&c, "head -c 300000 /dev/zero > data.bin\necho wrote");
    c.start_in_process().await.expect("coordinator");
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))]);
    let issue = fake.open_issue(REPO, "Add data", "Please add the data.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    fake.wait_for("the task failed", LIMIT, |m| {
        m.issue(REPO, issue)
            .is_some_and(|i| i.labels.iter().any(|l| l == "agent:failed"))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .expect("the task fails");
    let (_, tasks) = c.get_json("/api/v1/tasks").await.expect("tasks");
    let subtask = &tasks["tasks"][0]["subtasks"][0];
    assert_eq!(subtask["attempt"], 1, "retried: {tasks:#}");
    assert_eq!(runs(&count), 1, "the agent ran again");
    let outcome = &subtask["outcome"];
    assert_eq!(
        (&outcome["retryable"], &outcome["cause"]),
        (&json!(false), &json!("push_refused")),
        "{outcome:#}"
    );
    let error = outcome["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("GH001: Large files detected") && error.contains("data.bin"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_over_the_size_limit_are_left_out_and_named() {
    let mut c = Cluster::new(&[("AO__AGENT__MAX_FILE_BYTES", "100000")]);
    let (_, agent) = counting_agent(
        &c,
        "echo small > small.txt\nmkdir -p .cache\nhead -c 300000 /dev/zero > .cache/tool.db\n\
         echo done",
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let task = run_task(
        &mut c,
        &agent,
        json!({ "repository": repo.display().to_string(), "branch": "agent/big" }),
    )
    .await;
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
    let files = git(&repo, &["ls-tree", "-r", "--name-only", "agent/big"]);
    assert!(files.lines().any(|f| f == "small.txt"), "{files}");
    assert!(
        !files.contains("tool.db"),
        "the big file was committed: {files}"
    );
    let summary = only_subtask(&task)["outcome"]["summary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        summary.contains(".cache/tool.db (300000 bytes)") && summary.contains("max_file_bytes"),
        "{summary}"
    );
}

/// The sandbox drivers a moved branch is tried under: the `process` driver pushes from
/// the runner; `bwrap` shows a local repository read-only and the worker delivers the
/// runner's bundle.
const DRIVERS: [&str; 2] = ["process", "bwrap"];

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_that_moved_during_the_run_gets_the_work_on_its_new_tip() {
    for driver in DRIVERS {
        a_branch_that_moved_gets_the_work_on_its_new_tip(driver).await;
    }
}

async fn a_branch_that_moved_gets_the_work_on_its_new_tip(driver: &str) {
    eprintln!("driver {driver}");
    let mut c = Cluster::new(&[("AO__SANDBOX__DRIVER", driver)]);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    make_branch(&repo, "agent/moved");
    let tip = git(&repo, &["rev-parse", "agent/moved"]);
    let wait = wait_for_the_branch_to_move(&repo, "agent/moved", &tip);
    // The agent also plants hooks for every step of a rebase and a push, and points
    // core.hooksPath at them: none may run in the runner's git.
    let d = c.dir.path().display();
    let hooks = format!(
        "for h in pre-rebase post-rewrite post-checkout pre-commit commit-msg pre-push \
         reference-transaction; do printf '#!/bin/sh\\ntouch {d}/hook-ran-%s\\n' $h \
         > .git/hooks/$h; chmod +x .git/hooks/$h; done; git config core.hooksPath .git/hooks"
    );
    let (count, agent) = counting_agent(&c, &format!("echo agent > agent.txt\n{hooks}\n{wait}"));
    let human = push_once_the_agent_runs(&c, &agent, &repo, "agent/moved", "human.txt", "human");
    let task = run_task(
        &mut c,
        &agent,
        json!({ "repository": repo.display().to_string(), "branch": "agent/moved" }),
    )
    .await;
    human.await.expect("the person's push");
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
    let subtask = only_subtask(&task);
    assert_eq!(subtask["attempt"], 1, "retried: {task:#}");
    // The agent's own log is in the sandbox's /tmp under `bwrap`.
    if driver == "process" {
        assert_eq!(runs(&count), 1, "the agent ran again");
    }
    // Both changes are on the branch, the agent's on top of the person's.
    let files = git(&repo, &["ls-tree", "-r", "--name-only", "agent/moved"]);
    assert!(
        files.contains("human.txt") && files.contains("agent.txt"),
        "{files}"
    );
    let parent = git(&repo, &["log", "-1", "--format=%s", "agent/moved^"]);
    assert_eq!(parent, "human");
    assert_eq!(
        subtask["outcome"]["commit"].as_str(),
        Some(git(&repo, &["rev-parse", "agent/moved"]).as_str())
    );
    let summary = subtask["outcome"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("moved during the run"), "{summary}");
    let ran: Vec<String> = std::fs::read_dir(c.dir.path())
        .expect("cluster dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hook-ran-"))
        .collect();
    assert!(ran.is_empty(), "the agent's hooks ran: {ran:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_that_moved_under_a_conflicting_change_keeps_the_work_aside() {
    for driver in DRIVERS {
        a_branch_that_moved_under_a_conflict_keeps_the_work_aside(driver).await;
    }
}

async fn a_branch_that_moved_under_a_conflict_keeps_the_work_aside(driver: &str) {
    eprintln!("driver {driver}");
    let mut c = Cluster::new(&[("AO__SANDBOX__DRIVER", driver)]);
    let repo = bare_repo(c.dir.path(), "project", &[("shared.txt", "base\n")]);
    make_branch(&repo, "agent/clash");
    let tip = git(&repo, &["rev-parse", "agent/clash"]);
    let wait = wait_for_the_branch_to_move(&repo, "agent/clash", &tip);
    let (count, agent) = counting_agent(&c, &format!("echo agent > shared.txt\n{wait}"));
    let human = push_once_the_agent_runs(&c, &agent, &repo, "agent/clash", "shared.txt", "human");
    let task = run_task(
        &mut c,
        &agent,
        json!({ "repository": repo.display().to_string(), "branch": "agent/clash" }),
    )
    .await;
    human.await.expect("the person's push");
    assert_eq!(task["status"], "failed", "{task:#}\n{}", c.logs());
    let subtask = only_subtask(&task);
    assert_eq!(subtask["attempt"], 1, "retried: {task:#}");
    if driver == "process" {
        assert_eq!(runs(&count), 1, "the agent ran again");
    }
    let outcome = &subtask["outcome"];
    assert_eq!(
        (&outcome["retryable"], &outcome["cause"]),
        (&json!(false), &json!("branch_moved")),
        "{outcome:#}"
    );
    let error = outcome["error"].as_str().unwrap_or_default();
    let kept = error
        .strip_prefix("branch moved, work kept at ")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no side branch named in {error}"));
    // The person's change stays on the branch; the agent's is on the side branch.
    let on_branch = git(&repo, &["show", "agent/clash:shared.txt"]);
    assert_eq!(on_branch, "human");
    let aside = git(&repo, &["show", &format!("{kept}:shared.txt")]);
    assert_eq!(aside, "agent");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_repository_gets_its_first_commit_on_the_task_branch() {
    let mut c = Cluster::new(&[]);
    let (count, agent) = counting_agent(&c, "echo first > first.txt");
    let repo = c.dir.path().join("empty.git");
    std::fs::create_dir_all(&repo).expect("dir");
    git(&repo, &["init", "--quiet", "--bare", "-b", "main"]);
    let task = run_task(
        &mut c,
        &agent,
        json!({ "repository": repo.display().to_string(), "branch": "agent/first",
                "base_branch": "main" }),
    )
    .await;
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
    let subtask = only_subtask(&task);
    assert_eq!(subtask["attempt"], 1, "retried: {task:#}");
    assert_eq!(runs(&count), 1);
    let files = git(&repo, &["ls-tree", "-r", "--name-only", "agent/first"]);
    assert_eq!(files, "first.txt");
    // The outcome says so in a typed field the reporter acts on.
    assert_eq!(subtask["outcome"]["first_commit"], true, "{task:#}");
    let summary = subtask["outcome"]["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("The repository was empty")
            && summary.contains("no base branch to open a pull request against"),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_branch_that_does_not_exist_fails_once_without_running_the_agent() {
    let mut c = Cluster::new(&[]);
    let (count, agent) = counting_agent(&c, "echo x > x.txt");
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let task = run_task(
        &mut c,
        &agent,
        json!({ "repository": repo.display().to_string(), "branch": "agent/nobase",
                "base_branch": "release-9" }),
    )
    .await;
    assert_eq!(task["status"], "failed", "{task:#}\n{}", c.logs());
    let subtask = only_subtask(&task);
    assert_eq!(subtask["attempt"], 1, "retried: {task:#}");
    assert_eq!(runs(&count), 0, "the agent ran");
    let outcome = &subtask["outcome"];
    assert_eq!(outcome["cause"], "unclonable", "{outcome:#}");
    assert!(
        outcome["error"]
            .as_str()
            .is_some_and(|e| e.contains("\"release-9\" does not exist")),
        "{outcome:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claude_code_that_prints_its_result_and_stays_keeps_the_result() {
    let mut c = Cluster::new(&[
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__IDLE_TIMEOUT_SECS", "2"),
    ]);
    // Claude Code's stream-json as it ends a run, then it neither exits nor closes
    // its output.
    let (count, agent) = counting_agent(
        &c,
        concat!(
            "cat > /dev/null\necho result > result.txt\n",
            r#"echo '{"type":"system","subtype":"init","model":"claude-sonnet-4-5"}'"#,
            "\n",
            r#"echo '{"type":"result","subtype":"success","is_error":false,"result":"all done","num_turns":2,"total_cost_usd":0.25}'"#,
            "\nexec sleep 600"
        ),
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let task = run_task(
        &mut c,
        &agent,
        json!({ "repository": repo.display().to_string(), "branch": "agent/lingers" }),
    )
    .await;
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
    let subtask = only_subtask(&task);
    assert_eq!(subtask["attempt"], 1, "retried: {task:#}");
    assert_eq!(runs(&count), 1);
    assert_eq!(subtask["outcome"]["summary"], "all done");
    let files = git(&repo, &["ls-tree", "-r", "--name-only", "agent/lingers"]);
    assert!(files.contains("result.txt"), "{files}");
}

/// Starts a worker with `extra` settings and waits for it to exit; returns its exit code
/// and log. Fails if it is still running after `LIMIT`.
fn worker_exit(c: &mut Cluster, extra: &[(&str, &str)]) -> (i32, String) {
    let i = c.start_worker(extra);
    let deadline = Instant::now() + LIMIT;
    let worker = &mut c.workers[i];
    let child = worker.child.as_mut().expect("worker started");
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status.code().unwrap_or(-1), worker.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not refuse to start\n{}",
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_would_run_claude_code_as_root_refuses_to_start() {
    if !ao_tests::running_as_root() {
        eprintln!("skipped: needs root (the worker must run as root)");
        return;
    }
    let mut c = Cluster::new(&[
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__COMMAND", "claude"),
        ("AO__SANDBOX__DRIVER", "process"),
    ]);
    let (code, log) = worker_exit(&mut c, &[]);
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("which Claude Code refuses as root") && log.contains("coder"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_without_a_network_namespace_refuses_to_start_for_network_off() {
    let mut c = Cluster::new(&[]);
    // bubblewrap as it behaves where the kernel or the container refuses a new network
    // namespace (some containers, gVisor): everything works but `--unshare-net`.
    let bwrap = script(
        c.dir.path(),
        "bwrap",
        "for a in \"$@\"; do if [ \"$a\" = --unshare-net ]; then \
         echo 'bwrap: loopback: Failed RTM_NEWADDR: Operation not permitted' >&2; exit 1; fi; \
         done\nexec bwrap \"$@\"",
    );
    let bwrap = bwrap.display().to_string();
    let (code, log) = worker_exit(
        &mut c,
        &[
            ("AO__SANDBOX__DRIVER", "bwrap"),
            ("AO__SANDBOX__BWRAP", &bwrap),
            ("AO__SANDBOX__NETWORK_OFF", "reviewer"),
        ],
    );
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("network namespace")
            && log.contains("reviewer")
            && log.contains("Failed RTM_NEWADDR"),
        "{log}"
    );
}
