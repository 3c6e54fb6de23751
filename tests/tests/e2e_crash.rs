//! A worker killed with SIGKILL in the middle of a subtask: the message comes back after
//! its visibility timeout, another worker finishes it, and the result is applied once.

use ao_tests::scenario::{start_agent_worker, submit_code, successes, wait_succeeded};
use ao_tests::{bare_repo, git, script, Cluster};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_s_subtask_is_finished_once_by_another() {
    let mut c = Cluster::new(&[
        ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "4"),
        ("AO__QUEUE__HEARTBEAT_SECS", "1"),
    ]);
    let marker = c.dir.path().join("runs.log");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!(
            "echo \"$AO_ATTEMPT $$ $PPID\" >> {}\nsleep 3\necho done > out.txt",
            marker.display()
        ),
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    let a = start_agent_worker(&mut c, &agent);
    let id = &submit_code(&c, &repo, "p", "agent/crash").await;
    let running = c
        .wait_for_status(id, &["running"], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(running["subtasks"][0]["worker"], "worker-0");
    // Let the agent start, then kill the worker outright.
    for _ in 0..50 {
        if std::fs::read_to_string(&marker)
            .map(|s| !s.is_empty())
            .unwrap_or(false)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.workers[a].kill_hard();
    start_agent_worker(&mut c, &agent);

    let done = wait_succeeded(&c, id, Duration::from_secs(60)).await;
    let sub = &done["subtasks"][0];
    assert_eq!(sub["attempt"], 1, "a redelivery is the same attempt");
    assert_eq!(sub["worker"], "worker-1");
    // The agent ran twice (once killed), but exactly one success was recorded.
    let runs = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(runs.lines().count(), 2, "{runs}");
    assert_eq!(successes(&c, id).await, 1);
    assert_eq!(
        git(&repo, &["log", "--format=%s", "agent/crash"])
            .lines()
            .count(),
        2
    );
    // The killed worker's runner did not outlive it (it would have pushed a second commit):
    // once it and its agent are gone, the branch still holds one agent commit.
    let first: Vec<i32> = runs
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|p| p.parse().unwrap())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while first
        .iter()
        .any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed worker's runner or agent still runs: {first:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        git(&repo, &["log", "--format=%s", "agent/crash"])
            .lines()
            .count(),
        2
    );
}
