//! Attempts to lose, double or grow work on the at-least-once paths, with real processes
//! (workers and the coordinator killed, paused and stopped at awkward moments) and with
//! the coordinator in-process where the test plays the worker:
//!
//! - a run that finishes within a worker's shutdown grace period is reported once;
//! - the coordinator killed while a worker reports: the result is applied once after the
//!   restart, its spend booked once;
//! - a worker SIGKILLed mid-run: its orphaned run (runner and agent) does not push, one
//!   push for the attempt;
//! - reports delivered late and out of order (a `started` after its `finished`, a stale
//!   attempt's failure repeated) neither reopen a subtask nor queue another attempt;
//! - a report for a task the store does not hold is dropped at once, not retried into
//!   the dead-letter queue;
//! - SQS messages a poll kept for a later receive are given back on time by a busy
//!   worker and put back by a stopping one;
//! - event batches at the size limits all encode, none dropped.

use ao_shared::capability::Capability;
use ao_shared::message::{ResultMessage, SubtaskMessage};
use ao_shared::queue::{QueueId, Received};
use ao_shared::task::{Outcome, OutcomeKind};
use ao_shared::timefmt;
use ao_tests::scenario::{start_agent_worker, submit_code, successes, wait_for_file};
use ao_tests::{bare_repo, git, script, Cluster};
use nix::sys::signal::Signal;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

/// Short visibility so that a paused or killed worker's message comes back quickly.
const FAST_REDELIVERY: [(&str, &str); 2] = [
    ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "4"),
    ("AO__QUEUE__HEARTBEAT_SECS", "1"),
];

/// Recovery that never acts within a test: what the tests show must not rely on it.
const NO_RECOVERY: (&str, &str) = ("AO__COORDINATOR__RECOVERY_STALE_SECS", "3600");

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A repository whose every accepted push appends a line to the returned file.
fn counting_repo(dir: &Path) -> (PathBuf, PathBuf) {
    let repo = bare_repo(dir, "project", &[]);
    let pushes = dir.join("pushes.log");
    let hook = repo.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!("#!/usr/bin/env bash\necho push >> {}\n", pushes.display()),
    )
    .expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("hook mode");
    (repo, pushes)
}

async fn wait_until(what: &str, c: &Cluster, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the API account has booked this month, read from the store, in millionths of a
/// dollar.
async fn booked_micros(c: &Cluster) -> u64 {
    let settings = ao_shared::config::Settings::load_from(None, c.env.clone()).expect("settings");
    let b = ao_tests::inproc::open_backends(&settings, &c.env)
        .await
        .expect("backends");
    let now = time::OffsetDateTime::now_utc();
    let month = format!("{:04}-{:02}", now.year(), u8::from(now.month()));
    b.store.spend("api", &month).await.expect("spend")
}

/// Waits until exactly `micros` are booked (failing on more, or on less after `limit`).
async fn wait_booked(c: &Cluster, micros: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let booked = booked_micros(c).await;
        assert!(booked <= micros, "booked {booked}, more than {micros}");
        if booked == micros {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "booked {booked} micro-dollars, not {micros}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A stream-json agent (`agent.kind = "claude"`) that waits for `go`, then writes a file
/// and reports $0.25.
fn paying_agent_waiting_for(dir: &Path, runs: &Path, go: &Path) -> PathBuf {
    script(
        dir,
        "agent.sh",
        &format!(
            "cat > /dev/null || true\necho run >> {runs}\n\
             while [ ! -e {go} ]; do sleep 0.1; done\n\
             echo \"run $(wc -l < {runs})\" > result.txt\n\
             echo '{{\"type\":\"system\",\"subtype\":\"init\",\"model\":\"claude-sonnet-4-5\"}}'\n\
             echo '{{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\
\"result\":\"done\",\"num_turns\":1,\"total_cost_usd\":0.25}}'",
            runs = runs.display(),
            go = go.display()
        ),
    )
}

const CLAUDE_SCRIPT: [(&str, &str); 3] = [
    ("AO__AGENT__KIND", "claude"),
    // Claude Code refuses `bypassPermissions` as root; the script does not care.
    ("AO__AGENT__PROFILES__CODER__PERMISSION_MODE", "acceptEdits"),
    ("AO__WORKER__CAPABILITIES", "coder"),
];

/// SIGTERM reaches the worker while its agent runs; the agent ends well within the grace
/// period. The run pushes (its push permit is still granted during the shutdown), is
/// reported like any other, and the worker exits 0: one run, one push, attempt 1, spend
/// booked once.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_ends_within_the_shutdown_grace_period_is_reported() {
    let mut env: Vec<(&str, &str)> = vec![
        FAST_REDELIVERY[0],
        FAST_REDELIVERY[1],
        ("AO__WORKER__SHUTDOWN_GRACE_SECS", "30"),
    ];
    env.extend_from_slice(&CLAUDE_SCRIPT);
    let mut c = Cluster::new(&env);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let go = dir.join("go");
    let agent = paying_agent_waiting_for(&dir, &runs, &go);
    let (repo, pushes) = counting_repo(&dir);
    c.start_coordinator().await.expect("coordinator");
    let w = start_agent_worker(&mut c, &agent);
    let id = submit_code(&c, &repo, "finish in grace", "agent/grace").await;
    wait_for_file(&c, &runs, LIMIT).await;
    c.workers[w].signal(Signal::SIGTERM);
    // Proof the worker is in its grace period before the agent is let go.
    wait_until("the worker began its shutdown", &c, LIMIT, || {
        let log = c.workers[w].log_text().to_lowercase();
        log.contains("shutdown") || log.contains("sigterm")
    })
    .await;
    std::fs::write(&go, "").expect("go");
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends without another worker");
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert_eq!(done["subtasks"][0]["attempt"], 1, "{done:#}");
    let code = c.workers[w]
        .terminate(Duration::from_secs(40))
        .expect("the worker exits");
    assert_eq!(code, 0, "{}", c.logs());
    assert_eq!(lines(&runs), 1);
    assert_eq!(lines(&pushes), 1, "{}", c.logs());
    assert_eq!(git(&repo, &["show", "agent/grace:result.txt"]), "run 1");
    wait_booked(&c, 250_000, Duration::from_secs(30)).await;
    assert_eq!(successes(&c, &id).await, 1);
}

/// The coordinator is SIGKILLed while the agent runs; the run ends and its worker reports
/// to the result queue with nobody reading it. A restarted coordinator applies the result
/// once and books its spend once; the worker does not run the attempt again.
#[tokio::test(flavor = "multi_thread")]
async fn a_result_reported_while_the_coordinator_is_dead_is_applied_once() {
    let mut env: Vec<(&str, &str)> = vec![FAST_REDELIVERY[0], FAST_REDELIVERY[1], NO_RECOVERY];
    env.extend_from_slice(&CLAUDE_SCRIPT);
    let mut c = Cluster::new(&env);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let go = dir.join("go");
    let agent = paying_agent_waiting_for(&dir, &runs, &go);
    let (repo, pushes) = counting_repo(&dir);
    c.start_coordinator().await.expect("coordinator");
    let w = start_agent_worker(&mut c, &agent);
    let id = submit_code(&c, &repo, "report to nobody", "agent/nobody").await;
    c.wait_for_status(&id, &["running"], LIMIT)
        .await
        .expect("the task runs");
    wait_for_file(&c, &runs, LIMIT).await;
    c.coordinator.as_mut().expect("coordinator").kill_hard();
    std::fs::write(&go, "").expect("go");
    wait_until("the worker finished its run", &c, LIMIT, || {
        c.workers[w].log_text().contains("subtask succeeded")
    })
    .await;
    c.start_coordinator().await.expect("coordinator again");
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends");
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert_eq!(done["subtasks"][0]["attempt"], 1, "{done:#}");
    wait_booked(&c, 250_000, Duration::from_secs(30)).await;
    assert_eq!(successes(&c, &id).await, 1);
    assert_eq!(lines(&runs), 1, "{}", c.logs());
    assert_eq!(lines(&pushes), 1);
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The worker is SIGKILLed while its agent runs; its runner (a child process of the
/// `process` driver) outlives it. A second worker completes the attempt. Once the
/// orphaned run (runner and agent) has ended, the attempt was pushed once, by the second
/// run: the orphan, with nobody to grant its push permit, never pushes.
#[tokio::test(flavor = "multi_thread")]
async fn the_orphaned_runner_of_a_killed_worker_does_not_push() {
    let mut c = Cluster::new(&[FAST_REDELIVERY[0], FAST_REDELIVERY[1], NO_RECOVERY]);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let go = dir.join("go");
    let first_pid = dir.join("first.pid");
    let first_done = dir.join("first.done");
    let first_ppid = dir.join("first.ppid");
    let first_parent = dir.join("first.parent");
    // The first run records its own process (the agent) and waits for `go`.
    let agent = script(
        &dir,
        "agent.sh",
        &format!(
            "echo run >> {runs}\n\
             if [ \"$(wc -l < {runs})\" = 1 ]; then\n\
               echo $$ > {pid}; echo $PPID > {ppid}; ps -o pid=,args= -p $PPID > {parent} || true\n\
               while [ ! -e {go} ]; do sleep 0.1; done; echo first > first.txt; touch {done}\n\
             else echo second > second.txt; fi",
            runs = runs.display(),
            go = go.display(),
            pid = first_pid.display(),
            done = first_done.display(),
            ppid = first_ppid.display(),
            parent = first_parent.display()
        ),
    );
    let (repo, pushes) = counting_repo(&dir);
    c.start_coordinator().await.expect("coordinator");
    let killed = start_agent_worker(&mut c, &agent);
    let id = submit_code(&c, &repo, "orphan", "agent/orphan").await;
    wait_for_file(&c, &first_pid, LIMIT).await;
    let agent_pid: i32 = std::fs::read_to_string(&first_pid)
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    wait_for_file(&c, &first_ppid, LIMIT).await;
    let runner_pid: i32 = std::fs::read_to_string(&first_ppid)
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    c.workers[killed].kill_hard();
    if !pid_alive(agent_pid) {
        // The driver's process tree died with the worker: nothing can push. Still the
        // attempt must complete on another worker.
        start_agent_worker(&mut c, &agent);
        ao_tests::scenario::wait_succeeded(&c, &id, LIMIT).await;
        assert_eq!(lines(&pushes), 1);
        return;
    }
    start_agent_worker(&mut c, &agent);
    let done = ao_tests::scenario::wait_succeeded(&c, &id, LIMIT).await;
    assert_eq!(done["subtasks"][0]["attempt"], 1, "{done:#}");
    // Let the orphan finish; wait until its whole process tree is gone (its runner's
    // push, if any, happened before).
    std::fs::write(&go, "").expect("go");
    let deadline = Instant::now() + LIMIT;
    while pid_alive(agent_pid) || pid_alive(runner_pid) {
        assert!(
            Instant::now() < deadline,
            "the orphaned run is still alive ({})\n{}",
            std::fs::read_to_string(&first_parent).unwrap_or_default(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its runner has exited: whatever it pushed has landed.
    eprintln!(
        "orphan: agent finished its work: {}; parent: {}",
        first_done.exists(),
        std::fs::read_to_string(&first_parent).unwrap_or_default()
    );
    assert_eq!(
        lines(&pushes),
        1,
        "the orphaned runner pushed\n{}",
        c.logs()
    );
    let files = git(&repo, &["ls-tree", "--name-only", "agent/orphan"]);
    assert!(!files.contains("first.txt"), "{files}");
}

// ---------------------------------------------------------------------------------------
// In-process: the test plays the worker.

async fn submit(c: &Cluster, pipeline: serde_json::Value) -> String {
    let (status, task) = c
        .submit(
            json!({ "repository": "/nonexistent/repo.git", "prompt": "p",
                        "pipeline": pipeline, "branch": "agent/results" }),
        )
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().expect("task id").to_string()
}

async fn take_order(c: &Cluster, capability: Capability) -> (SubtaskMessage, Received) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = c
            .cx()
            .queue
            .receive(
                &[QueueId::Capability(capability)],
                1,
                Duration::from_secs(1),
                Duration::from_secs(600),
            )
            .await
            .expect("receive");
        if let Some(m) = got.into_iter().next() {
            let order = SubtaskMessage::decode(&m.body).expect("a work order");
            return (order, m);
        }
        assert!(Instant::now() < deadline, "no {capability} order");
    }
}

async fn report(c: &Cluster, message: &ResultMessage) {
    c.cx()
        .queue
        .send(QueueId::Results, &message.encode().expect("encode"))
        .await
        .expect("send result");
}

fn finished(order: &SubtaskMessage, attempt: u32, outcome: Outcome) -> ResultMessage {
    ResultMessage::Finished {
        task_id: order.task_id,
        subtask_id: order.subtask_id,
        attempt,
        worker: "test-worker".into(),
        outcome,
        at: timefmt::now(),
    }
}

fn started(order: &SubtaskMessage, attempt: u32) -> ResultMessage {
    ResultMessage::Started {
        task_id: order.task_id,
        subtask_id: order.subtask_id,
        attempt,
        worker: "late-worker".into(),
        at: timefmt::now(),
    }
}

async fn results_drained(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = c.cx().queue.depth(QueueId::Results).await.expect("depth");
        if d.visible + d.in_flight == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "results not handled: {d:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Attempt 1 fails (retryable) and attempt 2 is queued. Then, out of order: attempt 1's
/// failure again, attempt 1's `started`, attempt 2's `finished` (success), attempt 2's
/// `started` after it, and attempt 1's success from a late run. The coder step succeeds
/// once with attempt 2's commit; the docs step is queued once; no attempt 3.
#[tokio::test(flavor = "multi_thread")]
async fn late_and_reordered_reports_neither_reopen_nor_requeue() {
    let mut c = Cluster::new(&[NO_RECOVERY]);
    c.start_in_process().await.expect("coordinator");
    let id = submit(&c, json!(["coder", "docs"])).await;
    let (order, _) = take_order(&c, Capability::Coder).await;
    let failure = finished(
        &order,
        1,
        Outcome::failed(OutcomeKind::Infrastructure, "sandbox died", true),
    );
    report(&c, &failure).await;
    let (second, _) = take_order(&c, Capability::Coder).await;
    assert_eq!(second.attempt, 2);
    report(&c, &failure).await;
    report(&c, &started(&order, 1)).await;
    results_drained(&c).await;
    report(
        &c,
        &finished(&second, 2, Outcome::succeeded("two", Some("b".repeat(40)))),
    )
    .await;
    let (docs, _) = take_order(&c, Capability::Docs).await;
    report(&c, &started(&second, 2)).await;
    report(
        &c,
        &finished(&order, 1, Outcome::succeeded("one", Some("a".repeat(40)))),
    )
    .await;
    report(&c, &failure).await;
    results_drained(&c).await;
    let t = c.task(&id).await.expect("task");
    assert_eq!(t["subtasks"][0]["status"], "succeeded", "{t:#}");
    assert_eq!(t["subtasks"][0]["attempt"], 2, "{t:#}");
    assert_eq!(
        t["subtasks"][0]["outcome"]["commit"].as_str(),
        Some("b".repeat(40).as_str()),
        "{t:#}"
    );
    for cap in [Capability::Coder, Capability::Docs] {
        let d = c
            .cx()
            .queue
            .depth(QueueId::Capability(cap))
            .await
            .expect("depth");
        assert_eq!(d.visible, 0, "{cap} queued again: {d:?}");
    }
    report(&c, &finished(&docs, 1, Outcome::succeeded("docs", None))).await;
    c.wait_for_status(&id, &["succeeded"], Duration::from_secs(30))
        .await
        .expect("succeeds");
    assert_eq!(successes(&c, &id).await, 2);
}

/// Reports for a task the store does not hold (deleted, or a forged id) are dropped at
/// once: nothing waits for them to be received again until they are dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn reports_for_an_unknown_task_are_dropped_not_dead_lettered() {
    let mut c = Cluster::new(&[NO_RECOVERY, ("AO__QUEUE__MAX_RECEIVES", "2")]);
    c.start_in_process().await.expect("coordinator");
    let id = submit(&c, json!(["coder"])).await;
    let (order, _) = take_order(&c, Capability::Coder).await;
    let mut ghost = order.clone();
    ghost.task_id = ao_shared::ids::TaskId::new();
    report(&c, &started(&ghost, 1)).await;
    report(
        &c,
        &finished(&ghost, 1, Outcome::succeeded("ghost", Some("c".repeat(40)))),
    )
    .await;
    report(
        &c,
        &ResultMessage::Spent {
            task_id: ghost.task_id,
            subtask_id: ghost.subtask_id,
            attempt: 1,
            worker: "w".into(),
            cost_usd: 0.5,
            at: timefmt::now(),
        },
    )
    .await;
    // A real report after them, as the proof that the queue was read past them.
    report(&c, &finished(&order, 1, Outcome::succeeded("ok", None))).await;
    c.wait_for_status(&id, &["succeeded"], Duration::from_secs(30))
        .await
        .expect("succeeds");
    results_drained(&c).await;
    let d = c.cx().queue.depth(QueueId::Results).await.expect("depth");
    assert_eq!(
        d.dead, 0,
        "reports for an unknown task dead-lettered: {d:?}"
    );
}

/// SQS (moto): a worker long-polls two queues for one message; both polls bring one, it
/// takes the first and then stays busy (its run lasts, it does not receive again). The
/// other message, held in its backend's inbox, must be made visible again after at most
/// half its visibility timeout, for another worker to take; before, it was given back
/// only by the busy worker's next receive, so it stayed hidden for its whole visibility
/// timeout and its receive was used up for nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_held_by_a_busy_worker_is_given_back_in_time_sqs() {
    let moto = ao_tests::moto::Moto::shared();
    let env = moto.env(&ao_tests::moto::unique("held"));
    let settings = ao_shared::config::Settings::load_from(None, env.clone()).expect("settings");
    let busy = ao_tests::inproc::open_backends(&settings, &env)
        .await
        .expect("backends");
    let other = ao_tests::inproc::open_backends(&settings, &env)
        .await
        .expect("backends");
    let (coder, docs) = (
        QueueId::Capability(Capability::Coder),
        QueueId::Capability(Capability::Docs),
    );
    busy.queue.send(coder, "{\"n\":1}").await.expect("send");
    busy.queue.send(docs, "{\"n\":2}").await.expect("send");
    let visibility = Duration::from_secs(20);
    let asked = Instant::now();
    let mut taken = Vec::new();
    while taken.is_empty() {
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "nothing received"
        );
        taken = busy
            .queue
            .receive(&[coder, docs], 1, Duration::from_secs(2), visibility)
            .await
            .expect("receive");
    }
    assert_eq!(taken.len(), 1);
    let left = if taken[0].receipt.queue == coder {
        docs
    } else {
        coder
    };
    // The busy worker receives nothing more. Another worker polls the other queue until
    // it gets the message; it must not have to wait for the visibility timeout.
    let got = loop {
        let got = other
            .queue
            .receive(&[left], 1, Duration::from_secs(1), Duration::from_secs(60))
            .await
            .expect("receive");
        if let Some(m) = got.into_iter().next() {
            break m;
        }
        assert!(
            asked.elapsed() < visibility,
            "the held message was not given back within the visibility timeout"
        );
    };
    let waited = asked.elapsed();
    assert!(
        waited < visibility - Duration::from_secs(3),
        "the held message came back after {waited:?}, only when its visibility ({visibility:?}) \
         ran out (receive count {})",
        got.receive_count
    );
}

/// SQS (moto): a worker of one slot serving two queues takes one task's message and holds
/// the other's (its second poll answered too). SIGTERM stops it (the run is cut by the
/// grace period and put back). The held message must be put back too: a new worker
/// completes both tasks well before the visibility timeout (120 s) would have returned it.
/// Before, the held message stayed hidden until then.
#[tokio::test(flavor = "multi_thread")]
async fn messages_held_at_shutdown_are_put_back_sqs() {
    let moto = ao_tests::moto::Moto::shared();
    let env = moto.env(&ao_tests::moto::unique("held-term"));
    let mut c = ao_tests::scenario::cluster_with(
        &env,
        &[
            NO_RECOVERY,
            ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "120"),
            ("AO__QUEUE__HEARTBEAT_SECS", "2"),
            ("AO__WORKER__CONCURRENCY", "1"),
            ("AO__WORKER__CAPABILITIES", "coder,docs"),
            ("AO__WORKER__SHUTDOWN_GRACE_SECS", "1"),
        ],
    );
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let agent = script(
        &dir,
        "agent.sh",
        &format!(
            "echo run >> {runs}\nif [ \"$(wc -l < {runs})\" = 1 ]; then sleep 600; fi\n\
             echo ok > \"ok-$RANDOM.txt\"",
            runs = runs.display()
        ),
    );
    let repo = bare_repo(&dir, "project", &[]);
    c.start_coordinator().await.expect("coordinator");
    let mut ids = Vec::new();
    for (pipeline, branch) in [("coder", "agent/held-a"), ("docs", "agent/held-b")] {
        let (status, task) = c
            .submit(
                json!({ "repository": repo.display().to_string(), "prompt": "p",
                            "pipeline": [pipeline], "branch": branch }),
            )
            .await
            .expect("submit");
        assert_eq!(status, 202, "{task}");
        ids.push(task["id"].as_str().expect("id").to_string());
    }
    let first = start_agent_worker(&mut c, &agent);
    wait_for_file(&c, &runs, LIMIT).await;
    let code = c.workers[first]
        .terminate(Duration::from_secs(30))
        .expect("the worker stops");
    assert_eq!(code, 0, "{}", c.logs());
    start_agent_worker(&mut c, &agent);
    let limit = Duration::from_secs(60);
    for id in &ids {
        let done = c
            .wait_for_status(id, &["succeeded", "failed"], limit)
            .await
            .expect("both tasks end before the visibility timeout");
        assert_eq!(done["status"], "succeeded", "{done:#}");
        assert_eq!(done["subtasks"][0]["attempt"], 1, "{done:#}");
    }
}

/// Event batches at the limits: events whose data is just under the per-event bound in
/// JSON made of escapes (`\u0001` takes 6 bytes), whose kind is 64 control characters,
/// and one far over the bound. Every batch encodes within the message limit, in order,
/// and no event is dropped.
#[test]
fn event_batches_at_the_size_limits_all_encode_and_keep_every_event() {
    use ao_shared::bounded::MAX_EVENT_DATA_BYTES;
    use ao_shared::message::{AgentEventRecord, MAX_MESSAGE_BYTES};
    // `{"i":NN,"text":"…"}` is 19 bytes around the text; each `\u{1}` is 6 bytes of JSON.
    let near = "\u{1}".repeat((MAX_EVENT_DATA_BYTES - 19) / 6);
    assert!(json!({ "text": near, "i": 59 }).to_string().len() <= MAX_EVENT_DATA_BYTES);
    let mut events: Vec<AgentEventRecord> = (0..60)
        .map(|i| AgentEventRecord {
            at: timefmt::now(),
            kind: "\u{1}".repeat(64),
            data: json!({ "text": near, "i": i }),
        })
        .collect();
    events.push(AgentEventRecord {
        at: timefmt::now(),
        kind: "big".into(),
        data: json!({ "text": "\"".repeat(1 << 20), "i": 60 }),
    });
    let task = ao_shared::ids::TaskId::new();
    let sub = ao_shared::ids::SubtaskId::new();
    let batches = ResultMessage::event_batches(task, sub, 1, events);
    assert!(batches.len() > 1);
    let mut seen = Vec::new();
    for b in &batches {
        let text = b.encode().expect("every batch encodes");
        assert!(text.len() <= MAX_MESSAGE_BYTES, "{} bytes", text.len());
        let ResultMessage::Events { events, .. } = ResultMessage::decode(&text).expect("decodes")
        else {
            panic!("not events")
        };
        for e in events {
            seen.push(e.data["i"].as_i64().or_else(|| {
                e.data["truncated"]
                    .as_str()
                    .and_then(|t| t.contains("\"i\":60").then_some(60))
            }));
        }
    }
    assert_eq!(seen.len(), 61, "events dropped");
    assert!(seen[..60]
        .iter()
        .enumerate()
        .all(|(i, s)| *s == Some(i as i64)));
}
