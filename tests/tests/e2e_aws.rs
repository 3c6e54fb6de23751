//! End-to-end with `backend.kind = "aws"` against moto_server: two coordinators and two
//! workers share SQS queues and the DynamoDB table; a worker killed mid-subtask leaves its
//! subtask to the other, completed once; a poison message that kills every worker that
//! takes it ends in the dead-letter queue and its subtask is marked failed.

use ao_tests::moto::Moto;
use ao_tests::scenario::{cluster_with, count_successes, events};
use ao_tests::{bare_repo, git, script, Cluster};
use serde_json::json;
use std::time::Duration;

fn aws_cluster(moto: &Moto, extra: &[(&str, &str)]) -> Cluster {
    let prefix = format!("e2e-{}", ao_tests::free_port());
    cluster_with(&moto.env(&prefix), extra)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_coordinators_two_workers_on_sqs_and_dynamodb() {
    let moto = Moto::start();
    let mut c = aws_cluster(
        &moto,
        &[
            ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "4"),
            ("AO__QUEUE__HEARTBEAT_SECS", "1"),
        ],
    );
    let marker = c.dir.path().join("runs.log");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!(
            "echo \"$AO_TASK_ID\" >> {}\nif [[ $1 == slow* ]]; then sleep 4; fi\necho \"$1\" > \"$AO_CAPABILITY.txt\"",
            marker.display()
        ),
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    // A second coordinator replica on another port, same queues and table.
    let second_port = ao_tests::free_port();
    let listen = format!("127.0.0.1:{second_port}");
    let mut second = Cluster::new(&[]);
    second.env = c.env.clone();
    second.env.retain(|(k, _)| k != "AO__SERVER__LISTEN");
    second.env.push(("AO__SERVER__LISTEN".into(), listen));
    second.port = second_port;
    second.start_coordinator().await.unwrap();

    let agent_env = [("AO__AGENT__COMMAND", agent.to_str().unwrap())];
    let a = c.start_worker(&agent_env);
    c.start_worker(&agent_env);

    // A two-step task submitted to one replica completes, visible on both.
    let (status, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "quick",
                        "pipeline": ["coder", "docs"], "branch": "agent/aws" }),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap().to_string();
    let done = second
        .wait_for_status(&id, &["succeeded", "failed"], Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert_eq!(git(&repo, &["show", "agent/aws:docs.txt"]), "quick");

    // A worker killed mid-subtask: the other finishes it, once.
    let (_, slow) = second
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "slow work",
                        "pipeline": "code", "branch": "agent/aws-slow" }),
        )
        .await
        .unwrap();
    let slow_id = slow["id"].as_str().unwrap().to_string();
    let running = c
        .wait_for_status(&slow_id, &["running"], Duration::from_secs(60))
        .await
        .unwrap();
    let runner = running["subtasks"][0]["worker"]
        .as_str()
        .unwrap()
        .to_string();
    let index: usize = runner.trim_start_matches("worker-").parse().unwrap();
    // Kill it once its agent is under way.
    for _ in 0..100 {
        let runs = std::fs::read_to_string(&marker).unwrap_or_default();
        if runs.lines().any(|l| l == slow_id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.workers[index].kill_hard();
    let done = c
        .wait_for_status(&slow_id, &["succeeded", "failed"], Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let events = events(&c, &slow_id).await;
    // Exactly one success is recorded for the subtask, by the surviving worker.
    assert_eq!(count_successes(&events), 1, "{events:#?}");
    assert_ne!(
        done["subtasks"][0]["worker"],
        runner.as_str(),
        "the surviving worker finished it"
    );
    // The killed worker's run stopped with it: the redelivered message is the same
    // attempt, and the branch holds exactly one agent commit.
    assert_eq!(
        done["subtasks"][0]["attempt"],
        1,
        "{events:#?}\n{}",
        c.logs()
    );
    let commits = git(&repo, &["log", "--format=%s", "agent/aws-slow"])
        .lines()
        .count();
    assert_eq!(commits, 2, "initial + one agent commit");
    let runs = std::fs::read_to_string(&marker).unwrap();
    assert!(
        runs.lines().filter(|l| *l == slow_id).count() >= 2,
        "killed run + finishing run"
    );
    let _ = a;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_is_dead_lettered_and_its_subtask_failed() {
    let moto = Moto::start();
    let mut c = aws_cluster(
        &moto,
        &[
            ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "2"),
            ("AO__QUEUE__HEARTBEAT_SECS", "1"),
            ("AO__QUEUE__MAX_RECEIVES", "2"),
        ],
    );
    // This agent kills the worker that runs it (its grandparent): every receive crashes.
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "kill -9 \"$(ps -o ppid= -p $PPID | tr -d ' ')\"; sleep 5",
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    let (_, task) = c
        .submit(json!({ "repository": repo.display().to_string(), "prompt": "poison", "pipeline": "code" }))
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let failed = loop {
        // Keep a worker alive: each one dies on the poison message.
        if c.workers
            .last()
            .is_none_or(|w| w.child.as_ref().is_none() || kill_zero(w.pid().as_raw()).is_err())
        {
            c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
        }
        let t = c.task(&id).await.unwrap();
        if t["status"] == "failed" {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "{t:#}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("dead-lettered"), "{error}");
    assert_eq!(failed["subtasks"][0]["status"], "failed");
    assert!(
        c.workers.len() >= 2,
        "the message was received more than once"
    );
}

/// Whether a process exists (and is not a zombie we have not reaped).
fn kill_zero(pid: i32) -> std::io::Result<()> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    if stat.split_whitespace().nth(2) == Some("Z") {
        return Err(std::io::Error::other("zombie"));
    }
    Ok(())
}
