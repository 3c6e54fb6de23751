//! Start-up recovery of work orphaned by a crash, with the real binaries: a subtask
//! committed as queued whose message was never sent (the coordinator dies between the
//! commit and the send), and a running subtask whose worker died and whose message was
//! lost. Both complete, as a new attempt.

use ao_shared::queue::sqlite::SqliteQueue;
use ao_shared::queue::{Queue, QueueId};
use ao_shared::Capability;
use ao_tests::scenario::{kill_mid_run, start_agent_worker, wait_succeeded, KilledRun};
use ao_tests::{bare_repo, git, script, Cluster, TOKEN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn queue_db(c: &Cluster) -> std::path::PathBuf {
    c.dir.path().join("data").join("queue.db")
}

async fn recovery_events(c: &Cluster, id: &str) -> Vec<Value> {
    let (_, e) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .expect("events");
    e["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["data"]["type"] == "recovery")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subtask_committed_but_never_sent_is_sent_after_a_restart() {
    let mut c = Cluster::new(&[("AO__COORDINATOR__RECOVERY", "all")]);
    let agent = script(c.dir.path(), "agent.sh", "echo done > done.txt");
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();

    // Hold the queue database's write lock: the task's commit (state.db) succeeds, the
    // send of its first message (queue.db) cannot happen. Then the coordinator dies.
    let lock = rusqlite::Connection::open(queue_db(&c)).unwrap();
    // The coordinator's own queue transactions may hold the lock for a moment.
    lock.busy_timeout(Duration::from_secs(30)).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (http, url) = (c.http.clone(), c.url("/api/v1/tasks"));
    let body = json!({ "repository": repo.display().to_string(), "prompt": "p",
                       "pipeline": "code", "branch": "agent/unsent" });
    let submit = tokio::spawn(async move {
        let _ = http.post(url).bearer_auth(TOKEN).json(&body).send().await;
    });
    let deadline = Instant::now() + LIMIT;
    let task = loop {
        let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
        if let Some(t) = list["tasks"].as_array().and_then(|a| a.first()) {
            break t.clone();
        }
        assert!(Instant::now() < deadline, "{}", c.coordinator_log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(task["subtasks"][0]["status"], "queued");
    assert_eq!(task["subtasks"][0]["attempt"], 1);
    c.coordinator.as_mut().unwrap().kill_hard();
    submit.abort();
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let id = task["id"].as_str().unwrap().to_string();
    let queue = SqliteQueue::open(&c.dir.path().join("data"), 3).unwrap();
    let depth = queue
        .depth(QueueId::Capability(Capability::Coder))
        .await
        .unwrap();
    assert_eq!(
        depth.visible + depth.in_flight,
        0,
        "the message was never sent"
    );

    c.start_coordinator().await.unwrap();
    start_agent_worker(&mut c, &agent);
    let done = wait_succeeded(&c, &id, LIMIT).await;
    assert_eq!(
        done["subtasks"][0]["attempt"], 2,
        "re-sent as a new attempt"
    );
    let recovered = recovery_events(&c, &id).await;
    assert_eq!(recovered.len(), 1, "{recovered:#?}");
    assert!(recovered[0]["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("message is missing"));
    assert!(c.coordinator_log().contains("recovered orphaned work"));
    assert_eq!(git(&repo, &["show", "agent/unsent:done.txt"]), "done");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_subtask_whose_worker_and_message_are_gone_is_retried() {
    // `stale` mode with a short threshold: the periodic sweep after start-up finds it.
    let mut c = Cluster::new(&[
        ("AO__COORDINATOR__RECOVERY", "stale"),
        ("AO__COORDINATOR__RECOVERY_STALE_SECS", "2"),
        ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "60"),
        ("AO__QUEUE__HEARTBEAT_SECS", "1"),
    ]);
    // The first run hangs; worker and coordinator die while it runs.
    let KilledRun {
        marker, agent, id, ..
    } = kill_mid_run(&mut c, "agent/lost", LIMIT).await;
    // The queue loses the in-flight message.
    let db = rusqlite::Connection::open(queue_db(&c)).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    let lost = db
        .execute("DELETE FROM messages WHERE queue = 'coder'", [])
        .unwrap();
    assert_eq!(lost, 1);
    drop(db);

    c.start_coordinator().await.unwrap();
    start_agent_worker(&mut c, &agent);
    let done = wait_succeeded(&c, &id, LIMIT).await;
    assert_eq!(done["subtasks"][0]["attempt"], 2);
    let (_, events) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .unwrap();
    // Attempt 1 was failed as infrastructure trouble (retryable), then attempt 2 succeeded.
    let failed_first = events["events"].as_array().unwrap().iter().any(|e| {
        e["data"]["type"] == "subtask_status"
            && e["data"]["attempt"] == 2
            && e["data"]["outcome"]["kind"] == "infrastructure"
            && e["data"]["outcome"]["retryable"] == true
    });
    assert!(failed_first, "{events:#}");
    assert_eq!(recovery_events(&c, &id).await.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        "1\n2",
        "attempt 1 (killed), then attempt 2"
    );
}
