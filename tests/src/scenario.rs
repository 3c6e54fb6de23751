//! Steps the end-to-end scenarios share: a cluster with settings from elsewhere (such as
//! the AWS backends'), a worker running a given agent, an agent whose first run hangs, a
//! code task submitted, waiting for an agent to start and for a task to succeed, and the
//! events and successes a task recorded.

use crate::{bare_repo, script, Cluster};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A cluster with the settings in `env` (owned, e.g. [`crate::moto::Moto::env`]), then `extra`.
pub fn cluster_with(env: &[(String, String)], extra: &[(&str, &str)]) -> Cluster {
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    Cluster::new(&all)
}

/// Starts a worker whose agent is the script at `agent`; returns its index.
pub fn start_agent_worker(c: &mut Cluster, agent: &Path) -> usize {
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().expect("utf-8"))])
}

/// An agent that appends `$AO_ATTEMPT` to the returned marker file on every run; the first
/// run then hangs (for its worker to be killed), later runs write `ok.txt` at once.
/// Returns (marker, agent).
pub fn hang_first_run_agent(c: &Cluster) -> (PathBuf, PathBuf) {
    let marker = c.dir.path().join("runs.log");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!(
            "echo \"$AO_ATTEMPT\" >> {m}\nif [ \"$(wc -l < {m})\" = 1 ]; then sleep 600; fi\n\
             echo ok > ok.txt",
            m = marker.display()
        ),
    );
    (marker, agent)
}

/// A run killed in the middle: see [`kill_mid_run`].
pub struct KilledRun {
    /// The file the agent appends each run's attempt to.
    pub marker: PathBuf,
    /// The agent script ([`hang_first_run_agent`]).
    pub agent: PathBuf,
    /// The task's repository.
    pub repo: PathBuf,
    /// The task's id.
    pub id: String,
}

/// Starts the coordinator and a worker whose agent's first run hangs, submits a `code`
/// task onto `branch`, waits (up to `limit` each) until it runs and its agent has started,
/// then SIGKILLs the worker and the coordinator.
pub async fn kill_mid_run(c: &mut Cluster, branch: &str, limit: Duration) -> KilledRun {
    let (marker, agent) = hang_first_run_agent(c);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.expect("coordinator");
    let w = start_agent_worker(c, &agent);
    let id = submit_code(c, &repo, "p", branch).await;
    c.wait_for_status(&id, &["running"], limit)
        .await
        .expect("the task runs");
    wait_for_file(c, &marker, limit).await;
    c.workers[w].kill_hard();
    c.coordinator
        .as_mut()
        .expect("the coordinator runs")
        .kill_hard();
    KilledRun {
        marker,
        agent,
        repo,
        id,
    }
}

/// Submits a one-step `code` task on `repo` onto `branch`; asserts it is accepted and
/// returns its id.
pub async fn submit_code(c: &Cluster, repo: &Path, prompt: &str, branch: &str) -> String {
    let (status, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": prompt,
                        "pipeline": "code", "branch": branch }),
        )
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().expect("task id").to_string()
}

/// Waits until the file at `path` is not empty (an agent has started), failing with the
/// cluster's logs after `limit`.
pub async fn wait_for_file(c: &Cluster, path: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::fs::read_to_string(path).unwrap_or_default().is_empty() {
        assert!(Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the task ends and asserts it succeeded; returns it.
pub async fn wait_succeeded(c: &Cluster, id: &str, limit: Duration) -> Value {
    let done = c
        .wait_for_status(id, &["succeeded", "failed"], limit)
        .await
        .expect("the task ends");
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    done
}

/// Events of a task.
pub async fn events(c: &Cluster, id: &str) -> Vec<Value> {
    let (_, e) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .expect("events");
    e["events"].as_array().cloned().unwrap_or_default()
}

/// How many subtask successes `events` record.
pub fn count_successes(events: &[Value]) -> usize {
    events
        .iter()
        .filter(|e| e["data"]["type"] == "subtask_status" && e["data"]["status"] == "succeeded")
        .count()
}

/// How many times a task's subtask successes were recorded.
pub async fn successes(c: &Cluster, id: &str) -> usize {
    count_successes(&events(c, id).await)
}
