//! End-to-end on one machine: the real coordinator and worker binaries, the SQLite
//! backends, a local bare git repository and a small script as the agent.

use ao_tests::{bare_repo, git, script, Cluster};
use serde_json::json;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// An agent that writes a file named after its capability and prints a summary.
const WRITING_AGENT: &str = r#"
echo "working on: $1"
echo "$AO_CAPABILITY was here" > "$AO_CAPABILITY.txt"
echo "wrote $AO_CAPABILITY.txt"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_task_flows_through_the_whole_loop() {
    let mut c = Cluster::new(&[]);
    let agent = script(c.dir.path(), "agent.sh", WRITING_AGENT);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    let (status, task) = c
        .submit(json!({
            "repository": repo.display().to_string(),
            "prompt": "Add a note",
            "pipeline": ["coder", "tester"],
            "branch": "agent/note"
        }))
        .await
        .unwrap();
    assert_eq!(status, 202, "{task}");
    assert_eq!(task["status"], "queued");
    assert_eq!(task["subtasks"].as_array().unwrap().len(), 2);
    let id = task["id"].as_str().unwrap().to_string();

    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    for sub in done["subtasks"].as_array().unwrap() {
        assert_eq!(sub["status"], "succeeded");
        assert_eq!(sub["attempt"], 1);
        assert!(sub["outcome"]["commit"].is_string(), "{sub}");
        assert!(sub["started_at"].is_string() && sub["finished_at"].is_string());
    }
    // The branch in the repository holds both agents' commits, the tester's on top.
    let log = git(&repo, &["log", "--format=%s", "agent/note"]);
    let subjects: Vec<&str> = log.lines().collect();
    assert_eq!(
        subjects,
        vec!["tester: Add a note", "coder: Add a note", "initial"]
    );
    let file = git(&repo, &["show", "agent/note:coder.txt"]);
    assert_eq!(file, "coder was here");
    let tip = git(&repo, &["rev-parse", "agent/note"]);
    assert_eq!(done["subtasks"][1]["outcome"]["commit"], tip.as_str());
    // main is untouched
    assert_eq!(git(&repo, &["log", "--format=%s", "main"]), "initial");

    // Events: state changes and the agent's output lines.
    let (_, events) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .unwrap();
    let events = events["events"].as_array().unwrap();
    assert!(events
        .iter()
        .any(|e| e["data"]["type"] == "task_status" && e["data"]["status"] == "succeeded"));
    assert!(
        events.iter().any(|e| e["kind"] == "agent"
            && e["data"]["event"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("wrote coder.txt"))),
        "agent output missing from events"
    );

    // Listed, newest first, filterable.
    let (_, list) = c.get_json("/api/v1/tasks?status=succeeded").await.unwrap();
    assert_eq!(list["tasks"][0]["id"], id.as_str());
    let metrics = c.metrics().await.unwrap();
    assert!(
        metrics.contains("ao_results_applied_total{kind=\"finished\",result=\"applied\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_agent_fails_the_task_with_the_reason() {
    let mut c = Cluster::new(&[]);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "echo 'cannot find the parser module' >&2\nexit 3",
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let (_, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "Fix it",
                        "pipeline": ["coder", "reviewer"] }),
        )
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap();
    let done = c
        .wait_for_status(id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "failed");
    let error = done["error"].as_str().unwrap();
    assert!(error.contains("cannot find the parser module"), "{error}");
    assert!(error.contains("exit code 3"), "{error}");
    assert_eq!(done["subtasks"][0]["status"], "failed");
    assert_eq!(done["subtasks"][0]["outcome"]["kind"], "agent_error");
    assert_eq!(
        done["subtasks"][1]["status"], "cancelled",
        "the reviewer never runs"
    );
    // Nothing was pushed.
    let branches = git(&repo, &["branch", "--list"]);
    assert_eq!(branches.trim(), "* main");

    // Retry runs it again as attempt 2.
    let (status, retried) = c
        .post_json(&format!("/api/v1/tasks/{id}/retry"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{retried}");
    let again = c.wait_for_status(id, &["failed"], LIMIT).await.unwrap();
    assert_eq!(again["subtasks"][0]["attempt"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_setup_script_runs_before_the_agent() {
    let mut c = Cluster::new(&[]);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "test -f .setup-done && echo ok > checked.txt",
    );
    let repo = bare_repo(
        c.dir.path(),
        "project",
        &[("agent-setup.sh", "touch .setup-done\n")],
    );
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let (_, task) = c
        .submit(
            json!({ "repository": format!("file://{}", repo.display()), "prompt": "check",
                        "pipeline": "code", "branch": "agent/setup" }),
        )
        .await
        .unwrap();
    let done = c
        .wait_for_status(
            task["id"].as_str().unwrap(),
            &["succeeded", "failed"],
            LIMIT,
        )
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(git(&repo, &["show", "agent/setup:checked.txt"]), "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_pipeline() {
    let mut c = Cluster::new(&[]);
    let agent = script(c.dir.path(), "agent.sh", "sleep 3; echo x > f.txt");
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let (_, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "slow",
                        "pipeline": ["coder", "docs"] }),
        )
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap();
    c.wait_for_status(id, &["running"], LIMIT).await.unwrap();
    let (status, cancelled) = c
        .post_json(&format!("/api/v1/tasks/{id}/cancel"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(cancelled["status"], "cancelled");
    // The late result of the running subtask changes nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = c.task(id).await.unwrap();
    assert_eq!(after["status"], "cancelled");
    assert!(after["subtasks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "cancelled"));
    let (status, _) = c
        .post_json(&format!("/api/v1/tasks/{id}/approve"))
        .await
        .unwrap();
    assert_eq!(status, 409);
}

#[tokio::test(flavor = "multi_thread")]
async fn both_daemons_stop_cleanly_on_sigterm() {
    let mut c = Cluster::new(&[]);
    let agent = script(c.dir.path(), "agent.sh", "sleep 1; echo x > f.txt");
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let (_, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "p", "pipeline": "code" }),
        )
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap();
    c.wait_for_status(id, &["running"], LIMIT).await.unwrap();
    // The worker finishes its running subtask within the grace period, then exits 0.
    let code = c.workers[0].terminate(Duration::from_secs(20)).unwrap();
    assert_eq!(code, 0, "{}", c.logs());
    let done = c
        .wait_for_status(id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded");
    let code = c
        .coordinator
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(20))
        .unwrap();
    assert_eq!(code, 0, "{}", c.coordinator_log());
}

/// The data of the run's one event of `kind` (`diff` or `branch_diff`).
fn diff_of(events: &[serde_json::Value], kind: &str) -> serde_json::Value {
    let found: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["data"]["type"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "{kind} events: {events:#?}");
    found[0]["data"]["event"].clone()
}

fn paths(diff: &serde_json::Value) -> Vec<String> {
    diff["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["path"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Each run reports its own change (`diff`) and the task branch's against the base as
/// cloned (`branch_diff`). The second run on a branch moves the clone's idea of the base
/// (`origin/main`) onto its own commit and plants a replacement for the base's tip: the
/// branch's diff still shows both runs' files, taken from the base tip the runner saw
/// before the agent ran, with git's replacement objects off.
#[tokio::test(flavor = "multi_thread")]
async fn each_run_reports_its_diff_and_the_branch_against_its_base() {
    use ao_tests::scenario::{events, submit_code, wait_succeeded};
    let mut c = Cluster::new(&[]);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        r#"
n=$(find . -maxdepth 1 -name 'run-*.txt' | wc -l | tr -d ' ')
echo "run $n" > "run-$n.txt"
if [ "$n" = 1 ]; then
  git add -A && git -c user.name=a -c user.email=a@example.com commit -qm mine
  git update-ref refs/remotes/origin/main HEAD
  git replace -f "$(git rev-parse HEAD~2 2>/dev/null || git rev-parse HEAD~1)" HEAD 2>/dev/null || true
fi
"#,
    );
    let repo = bare_repo(c.dir.path(), "project", &[("README.md", "base\n")]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let first = submit_code(&c, &repo, "first", "agent/diffs").await;
    wait_succeeded(&c, &first, LIMIT).await;
    let second = submit_code(&c, &repo, "second", "agent/diffs").await;
    wait_succeeded(&c, &second, LIMIT).await;

    let one = events(&c, &first).await;
    assert_eq!(paths(&diff_of(&one, "diff")), ["run-0.txt"]);
    assert_eq!(paths(&diff_of(&one, "branch_diff")), ["run-0.txt"]);
    let two = events(&c, &second).await;
    let own = diff_of(&two, "diff");
    assert_eq!(paths(&own), ["run-1.txt"], "{own:#}");
    assert!(
        own["patch"].as_str().unwrap_or_default().contains("+run 1"),
        "{own:#}"
    );
    let branch = diff_of(&two, "branch_diff");
    assert_eq!(paths(&branch), ["run-0.txt", "run-1.txt"], "{branch:#}");
    let base = git(&repo, &["rev-parse", "main"]);
    assert_eq!(branch["from"], base.as_str(), "{branch:#}");
}
