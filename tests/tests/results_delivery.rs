//! At-least-once on the coordinator's result path, in-process: the test plays the worker
//! (it takes work orders from the capability queues and reports on the result queue) and
//! injects store faults through a wrapped store ([`ao_tests::faulty_store`]).
//!
//! - a result dead-lettered during a store outage is applied once the store is back
//!   (SQLite and SQS/DynamoDB on moto);
//! - a task write that commits but reports an error still sends what follows, and the
//!   spend of the result is booked exactly once, also when the result comes again;
//!   when the coordinator cannot tell at once, the result's redelivery sends it;
//! - a stale dead letter (an older attempt's message) does not fail the newer attempt;
//! - redelivered agent events are stored once;
//! - a manual retry gives a subtask a fresh automatic-retry budget;
//! - spend of stale, cancelled and repeated reports is booked once each.

use ao_shared::capability::Capability;
use ao_shared::message::{AgentEventRecord, ResultMessage, SubtaskMessage};
use ao_shared::queue::{QueueId, Received};
use ao_shared::task::{Outcome, OutcomeKind};
use ao_shared::timefmt;
use ao_tests::faulty_store::{Faults, FaultyStore};
use ao_tests::moto::{unique, Moto};
use ao_tests::scenario::{cluster_with, successes};
use ao_tests::Cluster;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

/// Recovery that never acts within a test: what the tests show must not rely on it.
const NO_RECOVERY: (&str, &str) = ("AO__COORDINATOR__RECOVERY_STALE_SECS", "3600");

/// Starts the coordinator in-process with its store wrapped in a [`FaultyStore`].
async fn start_faulty(c: &mut Cluster) -> Arc<Faults> {
    let faults = Arc::new(Faults::default());
    let f = faults.clone();
    c.start_in_process_with(move |mut b| {
        b.store = FaultyStore::wrap(b.store, f);
        b
    })
    .await
    .expect("coordinator in-process");
    faults
}

async fn submit(c: &Cluster, pipeline: Value) -> String {
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

/// Takes the next work order of `capability`, as a worker would (and keeps it hidden).
async fn take_order(c: &Cluster, capability: Capability) -> (SubtaskMessage, Received) {
    let deadline = Instant::now() + LIMIT;
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
        assert!(
            Instant::now() < deadline,
            "no {capability} order within {LIMIT:?}\n{}",
            c.logs()
        );
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

fn with_cost(mut outcome: Outcome, usd: f64) -> Outcome {
    outcome.cost_usd = usd;
    outcome
}

/// Waits until the result queue holds nothing (every report handled and deleted).
async fn results_drained(c: &Cluster) {
    let deadline = Instant::now() + LIMIT;
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

/// What tasks submitted through the API have booked this month (the spend account
/// `api`), in millionths of a dollar.
async fn api_spend(c: &Cluster) -> u64 {
    let now = time::OffsetDateTime::now_utc();
    let month = format!("{:04}-{:02}", now.year(), u8::from(now.month()));
    c.cx().store.spend("api", &month).await.expect("spend")
}

/// Puts `body` on the dead-letter queue of `queue` in the SQLite queue database, as the
/// queue does after too many receives.
fn dead_letter_sqlite(c: &Cluster, queue: QueueId, body: &str) {
    let db = rusqlite::Connection::open(c.dir.path().join("data").join("queue.db")).expect("db");
    db.busy_timeout(Duration::from_secs(30)).expect("busy");
    let now = timefmt::unix_ms(timefmt::now());
    db.execute(
        "INSERT INTO messages (queue, body, sent_at_ms, visible_at_ms, receive_count, dead)
         VALUES (?1, ?2, ?3, 0, 0, 1)",
        rusqlite::params![queue.as_str(), body, now],
    )
    .expect("insert dead letter");
}

/// Store trouble long enough for a finished result to reach the result queue's
/// dead-letter queue; once the store is back, the coordinator applies it.
async fn dead_lettered_result_is_applied(mut c: Cluster) {
    let faults = start_faulty(&mut c).await;
    let id = submit(&c, json!(["coder"])).await;
    let (order, _) = take_order(&c, Capability::Coder).await;
    faults.refuse_writes.store(true, Ordering::SeqCst);
    report(
        &c,
        &finished(&order, 1, Outcome::succeeded("done", Some("abc".into()))),
    )
    .await;
    // The event that proves the outage outlasted the result's receives.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let d = c.cx().queue.depth(QueueId::Results).await.expect("depth");
        if d.dead >= 1 && d.visible + d.in_flight == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never dead-lettered: {d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    faults.refuse_writes.store(false, Ordering::SeqCst);
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the dead-lettered result is applied");
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["subtasks"][0]["attempt"], 1, "{done:#}");
    assert_eq!(successes(&c, &id).await, 1);
    // Handled: gone from the dead-letter queue too.
    let deadline = Instant::now() + LIMIT;
    while c
        .cx()
        .queue
        .depth(QueueId::Results)
        .await
        .expect("depth")
        .dead
        > 0
    {
        assert!(Instant::now() < deadline, "dead letter left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_result_is_applied_when_the_store_is_back_sqlite() {
    let c = Cluster::new(&[NO_RECOVERY, ("AO__QUEUE__MAX_RECEIVES", "2")]);
    dead_lettered_result_is_applied(c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_result_is_applied_when_the_store_is_back_moto() {
    let moto = Moto::shared();
    let env = moto.env(&unique("results-dlq"));
    let c = cluster_with(&env, &[NO_RECOVERY, ("AO__QUEUE__MAX_RECEIVES", "2")]);
    dead_lettered_result_is_applied(c).await;
}

/// The write that applies the coder's result commits and then reports an error (a
/// timeout). The docs step is still queued, and the result's spend is booked once, also
/// when the same result is delivered again.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_that_commits_but_fails_still_sends_what_follows_and_books_once() {
    let mut c = Cluster::new(&[NO_RECOVERY]);
    let faults = start_faulty(&mut c).await;
    let id = submit(&c, json!(["coder", "docs"])).await;
    let (order, _) = take_order(&c, Capability::Coder).await;
    let before = api_spend(&c).await;
    faults.commit_then_fail.store(1, Ordering::SeqCst);
    let result = finished(
        &order,
        1,
        with_cost(Outcome::succeeded("done", Some("abc".into())), 0.25),
    );
    report(&c, &result).await;
    let (docs, _) = take_order(&c, Capability::Docs).await;
    assert_eq!(faults.committed_but_failed.load(Ordering::SeqCst), 1);
    assert_eq!(docs.attempt, 1);
    results_drained(&c).await;
    assert_eq!(api_spend(&c).await - before, 250_000);
    // The same result again (a redelivery): nothing more is sent or booked.
    report(&c, &result).await;
    report(
        &c,
        &finished(&docs, 1, with_cost(Outcome::succeeded("docs", None), 0.5)),
    )
    .await;
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends");
    assert_eq!(done["status"], "succeeded", "{done:#}");
    results_drained(&c).await;
    assert_eq!(api_spend(&c).await - before, 750_000);
    let depth = c
        .cx()
        .queue
        .depth(QueueId::Capability(Capability::Docs))
        .await
        .expect("depth");
    assert_eq!(depth.visible, 0, "the docs step was sent twice");
}

/// The write that applies the coder's result commits and reports an error, and the
/// store cannot be read for a while after it, so the coordinator cannot tell that it was
/// applied and keeps the result. Its redelivery finds the change stored (a repeat) and
/// still sends the docs step, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_result_whose_change_is_stored_sends_what_follows() {
    let mut c = Cluster::new(&[NO_RECOVERY]);
    let faults = start_faulty(&mut c).await;
    let id = submit(&c, json!(["coder", "docs"])).await;
    let (order, _) = take_order(&c, Capability::Coder).await;
    faults.unreadable_after_commit.store(4, Ordering::SeqCst);
    faults.commit_then_fail.store(1, Ordering::SeqCst);
    let result = finished(&order, 1, Outcome::succeeded("done", Some("abc".into())));
    report(&c, &result).await;
    let (docs, _) = take_order(&c, Capability::Docs).await;
    assert_eq!(faults.committed_but_failed.load(Ordering::SeqCst), 1);
    assert_eq!(docs.attempt, 1);
    // Delivered again once more: the docs step is not sent a second time.
    report(&c, &result).await;
    results_drained(&c).await;
    let depth = c
        .cx()
        .queue
        .depth(QueueId::Capability(Capability::Docs))
        .await
        .expect("depth");
    assert_eq!(depth.visible, 0, "the docs step was sent twice");
    report(&c, &finished(&docs, 1, Outcome::succeeded("docs", None))).await;
    c.wait_for_status(&id, &["succeeded"], LIMIT)
        .await
        .expect("succeeds");
}

/// A dead letter of attempt 1 arrives while attempt 2 is queued: attempt 2 goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_dead_letter_does_not_fail_a_newer_attempt() {
    let mut c = Cluster::new(&[NO_RECOVERY]);
    c.start_in_process().await.expect("coordinator");
    let id = submit(&c, json!(["coder"])).await;
    let (order, first) = take_order(&c, Capability::Coder).await;
    report(
        &c,
        &finished(
            &order,
            1,
            Outcome::failed(OutcomeKind::Infrastructure, "sandbox died", true),
        ),
    )
    .await;
    let (second, _) = take_order(&c, Capability::Coder).await;
    assert_eq!(second.attempt, 2);
    // A copy of attempt 1's message is dead-lettered late.
    dead_letter_sqlite(&c, QueueId::Capability(Capability::Coder), &first.body);
    let coder = QueueId::Capability(Capability::Coder);
    let deadline = Instant::now() + LIMIT;
    while c.cx().queue.depth(coder).await.expect("depth").dead > 0 {
        assert!(Instant::now() < deadline, "dead letter never handled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = c.task(&id).await.expect("task");
    assert_eq!(t["status"], "queued", "{t:#}");
    assert_eq!(t["subtasks"][0]["status"], "queued", "{t:#}");
    assert_eq!(t["subtasks"][0]["attempt"], 2, "{t:#}");
    // And it still completes.
    report(&c, &finished(&second, 2, Outcome::succeeded("ok", None))).await;
    c.wait_for_status(&id, &["succeeded"], LIMIT)
        .await
        .expect("succeeds");
}

/// The same batch of agent events delivered twice is stored once.
#[tokio::test(flavor = "multi_thread")]
async fn redelivered_agent_events_are_stored_once() {
    let mut c = Cluster::new(&[NO_RECOVERY]);
    c.start_in_process().await.expect("coordinator");
    let id = submit(&c, json!(["coder"])).await;
    let (order, _) = take_order(&c, Capability::Coder).await;
    let batch = ResultMessage::Events {
        task_id: order.task_id,
        subtask_id: order.subtask_id,
        attempt: 1,
        events: (0..3)
            .map(|i| AgentEventRecord {
                at: timefmt::now(),
                kind: "log".into(),
                data: json!({ "message": format!("line {i}") }),
            })
            .collect(),
    };
    report(&c, &batch).await;
    report(&c, &batch).await;
    report(&c, &finished(&order, 1, Outcome::succeeded("ok", None))).await;
    c.wait_for_status(&id, &["succeeded"], LIMIT)
        .await
        .expect("succeeds");
    results_drained(&c).await;
    let events = ao_tests::scenario::events(&c, &id).await;
    let lines: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "agent" || e["data"]["type"] == "log")
        .collect();
    assert_eq!(lines.len(), 3, "{events:#?}");
}

/// With `max_attempts = 2`, two retryable failures fail the task; a manual retry gives
/// the subtask two attempts again, so its next retryable failure is retried.
#[tokio::test(flavor = "multi_thread")]
async fn a_manual_retry_resets_the_automatic_retry_budget() {
    let mut c = Cluster::new(&[NO_RECOVERY, ("AO__COORDINATOR__MAX_ATTEMPTS", "2")]);
    c.start_in_process().await.expect("coordinator");
    let id = submit(&c, json!(["coder"])).await;
    let flaky = || Outcome::failed(OutcomeKind::Infrastructure, "model overloaded", true);
    for attempt in 1..=2 {
        let (order, _) = take_order(&c, Capability::Coder).await;
        assert_eq!(order.attempt, attempt);
        report(&c, &finished(&order, attempt, flaky())).await;
    }
    c.wait_for_status(&id, &["failed"], LIMIT)
        .await
        .expect("fails once its attempts are used");
    let (status, body) = c
        .post_json(&format!("/api/v1/tasks/{id}/retry"))
        .await
        .expect("retry");
    assert_eq!(status, 200, "{body}");
    let (order, _) = take_order(&c, Capability::Coder).await;
    assert_eq!(order.attempt, 3);
    report(&c, &finished(&order, 3, flaky())).await;
    let (order, _) = take_order(&c, Capability::Coder).await;
    assert_eq!(order.attempt, 4, "the retried subtask had a fresh budget");
    report(&c, &finished(&order, 4, Outcome::succeeded("ok", None))).await;
    c.wait_for_status(&id, &["succeeded"], LIMIT)
        .await
        .expect("succeeds");
}

/// Spend reported by a stale run, by a run of a cancelled task, and by a retried attempt
/// is booked, each once however often it is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn spend_of_stale_cancelled_and_repeated_reports_is_booked_once() {
    let mut c = Cluster::new(&[NO_RECOVERY]);
    c.start_in_process().await.expect("coordinator");
    let before = api_spend(&c).await;
    let id = submit(&c, json!(["coder"])).await;
    let (order, _) = take_order(&c, Capability::Coder).await;
    let failed = Outcome::failed(OutcomeKind::Infrastructure, "sandbox died", true);
    // Attempt 1 fails (retryable, booked): attempt 2 is queued.
    report(&c, &finished(&order, 1, with_cost(failed.clone(), 0.125))).await;
    let (second, _) = take_order(&c, Capability::Coder).await;
    assert_eq!(second.attempt, 2);
    // A second run of attempt 1 (its message was delivered twice) reports late: stale.
    let stale = finished(&order, 1, with_cost(failed, 0.25));
    report(&c, &stale).await;
    report(&c, &stale).await;
    results_drained(&c).await;
    // The task is cancelled while attempt 2 runs; its run still reports what it spent.
    let (status, body) = c
        .post_json(&format!("/api/v1/tasks/{id}/cancel"))
        .await
        .expect("cancel");
    assert_eq!(status, 200, "{body}");
    let cancelled = finished(
        &second,
        2,
        with_cost(
            Outcome::failed(OutcomeKind::Cancelled, "cancelled", false),
            0.5,
        ),
    );
    report(&c, &cancelled).await;
    report(&c, &cancelled).await;
    results_drained(&c).await;
    assert_eq!(api_spend(&c).await - before, 875_000);
}
