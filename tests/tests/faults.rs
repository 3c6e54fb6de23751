//! Faults with real processes on loopback, killed and restarted for real: the coordinator
//! SIGKILLed mid-pipeline; a worker SIGKILLed at each step of a subtask (before the agent,
//! during it, after the push, after the result is sent); late, stale and duplicate results;
//! poison messages on a capability queue and on the result queue. In every case the task
//! completes exactly once (one recorded success) or the refusal is reported.

use ao_shared::ids::{SubtaskId, TaskId};
use ao_shared::message::ResultMessage;
use ao_shared::queue::sqlite::SqliteQueue;
use ao_shared::queue::{Queue, QueueId};
use ao_shared::task::{Outcome, OutcomeKind};
use ao_shared::timefmt;
use ao_tests::scenario::{start_agent_worker, successes, wait_succeeded};
use ao_tests::{bare_repo, git, script, Cluster};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

/// Short visibility so that a killed worker's message comes back quickly.
const FAST_REDELIVERY: [(&str, &str); 2] = [
    ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "4"),
    ("AO__QUEUE__HEARTBEAT_SECS", "1"),
];

fn queue_of(c: &Cluster, max_receives: u32) -> SqliteQueue {
    SqliteQueue::open(&c.dir.path().join("data"), max_receives).expect("open the queue")
}

/// Shell lines that SIGKILL the worker whose pid is in `<dir>/worker.pid`, the first time
/// only (a marker file remembers), and then wait to be killed with it.
fn kill_worker_once(dir: &Path, step: &str) -> String {
    let d = dir.display();
    format!(
        "if [ ! -e {d}/killed-{step} ]; then touch {d}/killed-{step}; \
         kill -9 \"$(cat {d}/worker.pid)\"; sleep 30; fi"
    )
}

fn start_worker(c: &mut Cluster, agent: &Path) -> usize {
    let i = start_agent_worker(c, agent);
    std::fs::write(
        c.dir.path().join("worker.pid"),
        c.workers[i].pid().as_raw().to_string(),
    )
    .expect("pid file");
    i
}

async fn wait_until(what: &str, c: &Cluster, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn lines(path: &PathBuf) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_killed_mid_pipeline_resumes_it_after_a_restart() {
    let mut c = Cluster::new(&FAST_REDELIVERY);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "sleep 2\necho \"$AO_CAPABILITY\" > \"$AO_CAPABILITY.txt\"",
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    start_worker(&mut c, &agent);
    let (_, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "three steps",
                        "pipeline": ["coder", "tester", "docs"], "branch": "agent/three" }),
        )
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    // Kill it while the second step runs: its result arrives while no coordinator is up.
    let deadline = Instant::now() + LIMIT;
    loop {
        let t = c.task(&id).await.unwrap();
        if t["subtasks"][1]["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "{t:#}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.coordinator.as_mut().unwrap().kill_hard();
    // The worker finishes the step and reports to a queue nobody reads for a while.
    let queue = queue_of(&c, 3);
    let deadline = Instant::now() + LIMIT;
    while queue.depth(QueueId::Results).await.unwrap().visible == 0 {
        assert!(Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.start_coordinator().await.unwrap();
    let done = wait_succeeded(&c, &id, LIMIT).await;
    for sub in done["subtasks"].as_array().unwrap() {
        assert_eq!(sub["attempt"], 1, "{sub}");
    }
    assert_eq!(successes(&c, &id).await, 3);
    let log = git(&repo, &["log", "--format=%s", "agent/three"]);
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        vec![
            "docs: three steps",
            "tester: three steps",
            "coder: three steps",
            "initial"
        ]
    );
}

/// Runs a one-step task whose worker is SIGKILLed at `step` by `kill` (a repository setup
/// script, the agent, or a git hook), and checks that a second worker completes it once.
async fn killed_at(step: &str) {
    let mut c = Cluster::new(&FAST_REDELIVERY);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let kill = kill_worker_once(&dir, step);
    let agent_body = format!(
        "echo run >> {}\n{}\necho fixed > result.txt",
        runs.display(),
        if step == "agent" { kill.as_str() } else { "" }
    );
    let agent = script(&dir, "agent.sh", &agent_body);
    let setup = if step == "setup" {
        format!("{kill}\n")
    } else {
        String::new()
    };
    let files: Vec<(&str, &str)> = if step == "setup" {
        vec![("agent-setup.sh", setup.as_str())]
    } else {
        vec![]
    };
    let repo = bare_repo(&dir, "project", &files);
    if step == "push" {
        let hook = repo.join("hooks/post-receive");
        std::fs::write(&hook, format!("#!/usr/bin/env bash\n{kill}\n")).expect("fault test step");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
            .expect("fault test step");
    }
    c.start_coordinator().await.expect("fault test step");
    let first = start_worker(&mut c, &agent);
    let (_, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "once",
                        "pipeline": "code", "branch": "agent/once" }),
        )
        .await
        .expect("fault test step");
    let id = task["id"].as_str().expect("fault test step").to_string();
    let marker = dir.join(format!("killed-{step}"));
    wait_until(&format!("the {step} step ran"), &c, || marker.exists()).await;
    // The worker is gone (SIGKILL from inside its own run); reap it, start another.
    let deadline = Instant::now() + LIMIT;
    while c.workers[first]
        .child
        .as_mut()
        .is_some_and(|ch| ch.try_wait().ok().flatten().is_none())
    {
        assert!(Instant::now() < deadline, "worker still alive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start_worker(&mut c, &agent);
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("fault test step");
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let sub = &done["subtasks"][0];
    assert_eq!(sub["attempt"], 1, "a redelivery is the same attempt");
    assert_eq!(sub["worker"], "worker-1", "{sub}");
    assert_eq!(successes(&c, &id).await, 1, "{}", c.logs());
    // One agent commit on the branch, whichever run made it.
    let log = git(&repo, &["log", "--format=%s", "agent/once"]);
    assert_eq!(log.lines().count(), 2, "{log}");
    assert_eq!(git(&repo, &["show", "agent/once:result.txt"]), "fixed");
    let expected_runs = if step == "setup" { 1 } else { 2 };
    assert_eq!(lines(&runs), expected_runs, "agent runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_before_the_agent_starts() {
    killed_at("setup").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_while_the_agent_runs() {
    killed_at("agent").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_after_the_push() {
    killed_at("push").await;
}

/// The message of a finished subtask delivered again, exactly as when its worker is
/// killed after sending the result and before deleting the message: the run is repeated,
/// its result ignored, the task stays completed once.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_after_sending_its_result() {
    let mut c = Cluster::new(&FAST_REDELIVERY);
    let runs = c.dir.path().join("runs.log");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!("echo run >> {}\necho fixed > result.txt", runs.display()),
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    start_worker(&mut c, &agent);
    let (_, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "once",
                        "pipeline": "code", "branch": "agent/after-result" }),
        )
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    let done = c.wait_for_status(&id, &["succeeded"], LIMIT).await.unwrap();
    let sub = &done["subtasks"][0];
    let again = json!({
        "version": 1, "kind": "subtask", "task_id": id, "subtask_id": sub["id"],
        "attempt": 1, "capability": "coder", "repository": done["repository"],
        "branch": done["branch"], "title": done["title"], "prompt": done["prompt"],
        "enqueued_at": sub["queued_at"],
    });
    let queue = queue_of(&c, 3);
    queue
        .send(
            QueueId::Capability(ao_shared::Capability::Coder),
            &again.to_string(),
        )
        .await
        .unwrap();
    // A worker takes the message again and is done with it (deleted): it ran the agent
    // again, or noticed the subtask had ended and did not.
    let coder = QueueId::Capability(ao_shared::Capability::Coder);
    let deadline = Instant::now() + LIMIT;
    loop {
        // The result is sent before the message is deleted, and counted before it is deleted.
        let d = queue.depth(coder).await.unwrap();
        let r = queue.depth(QueueId::Results).await.unwrap();
        if d.visible + d.in_flight + r.visible + r.in_flight == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = c.metrics().await.unwrap();
    assert!(
        m.contains("ao_results_applied_total{kind=\"finished\",result=\"applied\"} 1"),
        "{m}"
    );
    if lines(&runs) == 2 {
        // Its result was applied as a repeat: ignored.
        assert!(
            m.contains("ao_results_applied_total{kind=\"finished\",result=\"ignored\"} 1"),
            "{m}\n{}",
            c.logs()
        );
    }
    assert!(lines(&runs) <= 2);
    eprintln!("agent runs: {}", lines(&runs));
    let after = c.task(&id).await.unwrap();
    assert_eq!(after["status"], "succeeded");
    assert_eq!(after["subtasks"][0]["attempt"], 1);
    assert_eq!(successes(&c, &id).await, 1);
    let log = git(&repo, &["log", "--format=%s", "agent/after-result"]);
    assert_eq!(log.lines().count(), 2, "the repeat pushed nothing: {log}");
}

fn finished(task: &str, subtask: &str, attempt: u32, outcome: Outcome) -> String {
    ResultMessage::Finished {
        task_id: task.parse::<TaskId>().expect("valid message"),
        subtask_id: subtask.parse::<SubtaskId>().expect("valid message"),
        attempt,
        worker: "injected".into(),
        outcome,
        at: timefmt::now(),
    }
    .encode()
    .expect("valid message")
}

/// Results sent straight to the real result queue (no worker runs): duplicates apply once,
/// results of older attempts and of cancelled tasks are ignored.
#[tokio::test(flavor = "multi_thread")]
async fn late_stale_and_duplicate_results_apply_at_most_once() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator().await.unwrap();
    let queue = queue_of(&c, 3);
    let submit = |branch: &'static str| {
        json!({ "repository": "/srv/git/none.git", "prompt": "p", "pipeline": ["coder", "docs"],
                "branch": branch })
    };
    let (_, task) = c.submit(submit("agent/dup")).await.unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    let coder = task["subtasks"][0]["id"].as_str().unwrap().to_string();
    let ok = Outcome::succeeded("done", Some("abc".into()));
    // An attempt that does not exist yet, then the same success three times.
    let stale = finished(
        &id,
        &coder,
        7,
        Outcome::failed(OutcomeKind::AgentError, "x", false),
    );
    queue.send(QueueId::Results, &stale).await.unwrap();
    for _ in 0..3 {
        queue
            .send(QueueId::Results, &finished(&id, &coder, 1, ok.clone()))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + LIMIT;
    loop {
        let m = c.metrics().await.unwrap();
        if m.contains("ao_results_applied_total{kind=\"finished\",result=\"ignored\"} 3") {
            assert!(
                m.contains("ao_results_applied_total{kind=\"finished\",result=\"applied\"} 1"),
                "{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{m}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = c.task(&id).await.unwrap();
    assert_eq!(t["subtasks"][0]["status"], "succeeded");
    assert_eq!(
        t["subtasks"][1]["status"], "queued",
        "the next step was queued"
    );
    assert_eq!(successes(&c, &id).await, 1);
    // The old attempt's failure arriving late changes nothing either.
    let late = finished(
        &id,
        &coder,
        1,
        Outcome::failed(OutcomeKind::Timeout, "late", false),
    );
    queue.send(QueueId::Results, &late).await.unwrap();

    // A cancelled task: its running step's success arrives after the cancel.
    let (_, other) = c.submit(submit("agent/cancelled")).await.unwrap();
    let other_id = other["id"].as_str().unwrap().to_string();
    let other_coder = other["subtasks"][0]["id"].as_str().unwrap().to_string();
    let (status, _) = c
        .post_json(&format!("/api/v1/tasks/{other_id}/cancel"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    queue
        .send(QueueId::Results, &finished(&other_id, &other_coder, 1, ok))
        .await
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    while queue.depth(QueueId::Results).await.unwrap().visible
        + queue.depth(QueueId::Results).await.unwrap().in_flight
        > 0
    {
        assert!(Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = c.metrics().await.unwrap();
    assert!(
        m.contains("ao_results_applied_total{kind=\"finished\",result=\"ignored\"} 5"),
        "{m}"
    );
    let t = c.task(&id).await.unwrap();
    assert_eq!(t["subtasks"][0]["status"], "succeeded");
    assert_eq!(t["subtasks"][0]["outcome"]["kind"], "succeeded");
    let o = c.task(&other_id).await.unwrap();
    assert_eq!(o["status"], "cancelled");
    assert_eq!(o["subtasks"][0]["status"], "cancelled");
    assert_eq!(successes(&c, &other_id).await, 0);
}

/// Undecodable messages on a capability queue and on the result queue end in their
/// dead-letter queues, and the coordinator reports them (metrics and log).
#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_and_reported() {
    let mut c = Cluster::new(&[
        ("AO__QUEUE__MAX_RECEIVES", "2"),
        ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "2"),
        ("AO__QUEUE__HEARTBEAT_SECS", "1"),
    ]);
    let agent = script(c.dir.path(), "agent.sh", "echo x > x.txt");
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    start_worker(&mut c, &agent);
    let queue = queue_of(&c, 2);
    let coder = QueueId::Capability(ao_shared::Capability::Coder);
    for body in ["not json", "{\"version\":9,\"kind\":\"subtask\"}"] {
        queue.send(coder, body).await.unwrap();
    }
    for body in ["\u{0}\u{1}garbage", "{\"version\":1,\"kind\":\"finished\"}"] {
        queue.send(QueueId::Results, body).await.unwrap();
    }
    let deadline = Instant::now() + LIMIT;
    loop {
        let m = c.metrics().await.unwrap();
        if m.contains("ao_queue_messages{queue=\"coder\",state=\"dead\"} 2")
            && m.contains("ao_queue_messages{queue=\"results\",state=\"dead\"} 2")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{m}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.coordinator_log().contains("undecodable result message"));
    assert!(c.workers[0]
        .log_text()
        .contains("undecodable subtask message"));
    // The system still works: a real task completes.
    let (_, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "p", "pipeline": "code" }),
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
    assert_eq!(done["status"], "succeeded", "{}", c.logs());
}
