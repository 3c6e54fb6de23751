//! Counts the AWS API calls of the AWS backends per subtask (SQS and DynamoDB, by
//! operation) and per idle worker per hour, on a `moto_server` started here, and prints
//! the monthly cost they imply at list prices. Run with `cargo bench -p ao-shared --bench
//! aws_calls`. DynamoDB request units are estimated from the item sizes sent and
//! received, with DynamoDB's rounding rules (moto does not report real consumption).

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/moto.rs"]
mod moto;

use ao_shared::aws::{ApiCalls, CallStats};
use ao_shared::capability::Capability;
use ao_shared::ids::{DeliveryId, TaskId};
use ao_shared::message::{ResultMessage, SubtaskMessage};
use ao_shared::pipeline::plan_subtasks;
use ao_shared::queue::sqs::{SqsOptions, SqsQueue};
use ao_shared::queue::{Queue, QueueId};
use ao_shared::state::dynamo::{DynamoOptions, DynamoStore};
use ao_shared::state::{EventKind, NewEvent, StateStore};
use ao_shared::status::TaskStatus;
use ao_shared::task::{Outcome, Task, TaskSource};
use ao_shared::timefmt;
use moto::{clients, unique, Moto};
use std::collections::BTreeMap;
use std::time::Duration;

/// Tasks simulated; each runs the default `full` pipeline.
const TASKS: usize = 4;
/// Length of one simulated agent run, and the heartbeat interval (the defaults).
const RUN_MINUTES: u64 = 10;
const HEARTBEAT_SECS: u64 = 30;
/// Tasks a day for the cost figure.
const TASKS_PER_DAY: f64 = 1000.0;
const DAYS_PER_MONTH: f64 = 30.0;
/// List prices (US East, on-demand), in dollars per million.
const SQS_PER_MILLION: f64 = 0.40;
const DYNAMODB_WRITE_PER_MILLION: f64 = 1.25;
const DYNAMODB_READ_PER_MILLION: f64 = 0.25;
/// A long poll's wait, the SQS maximum.
const LONG_POLL_SECS: f64 = 20.0;

fn event(text: &str) -> NewEvent {
    NewEvent {
        subtask_id: None,
        kind: EventKind::State,
        at: timefmt::now(),
        data: serde_json::json!({ "message": text }),
    }
}

fn new_task() -> Task {
    let now = timefmt::now();
    Task {
        profiles: Default::default(),
        id: TaskId::new(),
        status: TaskStatus::Queued,
        title: "Add a retry to the HTTP client".into(),
        prompt: "The HTTP client gives up on the first 503. Retry with backoff, three \
                 times, and add a test."
            .into(),
        repository: "https://github.com/acme/widgets.git".into(),
        branch: "agent/42-http-retry".into(),
        base_branch: None,
        pipeline: "full".into(),
        source: TaskSource::Github {
            installation_id: 1,
            repo: "acme/widgets".into(),
            issue: 42,
            pull_request: None,
            progress_comment_id: None,
            untrusted_author: None,
            reported: false,
        },
        created_at: now,
        updated_at: now,
        error: None,
        version: 0,
        subtasks: plan_subtasks(&Capability::ALL),
        approval: Default::default(),
        review_round: None,
        ci_round: None,
        ci_rounds: Vec::new(),
        planning: None,
    }
}

/// Runs one task through its pipeline the way the coordinator and a worker do.
async fn run_task(queue: &SqsQueue, store: &DynamoStore) {
    let wait = Duration::from_secs(1);
    let visibility = Duration::from_secs(120);
    let task = new_task();
    let delivery = DeliveryId::new(unique("delivery"));
    let mut task = store
        .create_task(&task, Some(&delivery), &[event("created")])
        .await
        .unwrap();
    loop {
        let ready = task.queue_ready(timefmt::now());
        let Some(&subtask_id) = ready.first() else {
            break;
        };
        // coordinator: store the queued state, then send the work order
        task = store
            .update_task(&task, &[event("subtask queued")])
            .await
            .unwrap();
        let sub = task.subtask(subtask_id).unwrap().clone();
        let order = SubtaskMessage {
            profile: None,
            task_id: task.id,
            subtask_id,
            attempt: sub.attempt,
            capability: sub.capability,
            repository: task.repository.clone(),
            branch: task.branch.clone(),
            base_branch: None,
            title: task.title.clone(),
            prompt: task.prompt.clone(),
            instructions: None,
            step: None,
            start_from: None,
            enqueued_at: timefmt::now(),
            github: None,
            prefer_worker: None,
            spent_usd: 0.0,
        };
        let q = QueueId::Capability(sub.capability);
        queue.send(q, &order.encode().unwrap()).await.unwrap();

        // worker: receive, report start, heartbeat while the agent runs, report the end
        let got = queue.receive(&[q], 1, wait, visibility).await.unwrap();
        let mut receipt = got[0].receipt.clone();
        let started = ResultMessage::Started {
            task_id: task.id,
            subtask_id,
            attempt: sub.attempt,
            worker: "w1".into(),
            at: timefmt::now(),
        };
        queue
            .send(QueueId::Results, &started.encode().unwrap())
            .await
            .unwrap();
        for _ in 0..(RUN_MINUTES * 60 / HEARTBEAT_SECS) {
            receipt = queue.extend(&receipt, visibility).await.unwrap();
        }
        let finished = ResultMessage::Finished {
            task_id: task.id,
            subtask_id,
            attempt: sub.attempt,
            worker: "w1".into(),
            outcome: Outcome::succeeded("done", Some("0123456789abcdef".into())),
            at: timefmt::now(),
        };
        queue
            .send(QueueId::Results, &finished.encode().unwrap())
            .await
            .unwrap();
        queue.delete(&receipt).await.unwrap();

        // coordinator: apply both results, each its own receive, write and delete
        for _ in 0..2 {
            let got = queue
                .receive(&[QueueId::Results], 1, wait, visibility)
                .await
                .unwrap();
            let msg = ResultMessage::decode(&got[0].body).unwrap();
            // A coordinator replica keeps no task in memory: it reads the task first.
            task = store.get_task(msg.task_id()).await.unwrap().unwrap();
            let now = timefmt::now();
            match msg {
                ResultMessage::Started {
                    subtask_id,
                    attempt,
                    worker,
                    ..
                } => {
                    task.apply_started(subtask_id, attempt, &worker, now)
                        .unwrap();
                }
                ResultMessage::Finished {
                    subtask_id,
                    attempt,
                    outcome,
                    ..
                } => {
                    task.apply_outcome(subtask_id, attempt, outcome, 3, now)
                        .unwrap();
                }
                ResultMessage::Events { .. } | ResultMessage::Spent { .. } => {}
            }
            task = store
                .update_task(&task, &[event("result applied")])
                .await
                .unwrap();
            queue.delete(&got[0].receipt).await.unwrap();
        }
    }
    assert_eq!(task.status, TaskStatus::Succeeded);
}

/// Size of an item in DynamoDB JSON, as DynamoDB counts it (names plus values).
fn item_size(item: &serde_json::Value) -> f64 {
    let Some(map) = item.as_object() else {
        return 0.0;
    };
    map.iter()
        .map(|(name, v)| {
            let value = v
                .as_object()
                .and_then(|o| o.values().next())
                .map(|x| match x {
                    serde_json::Value::String(s) => s.len(),
                    other => other.to_string().len(),
                })
                .unwrap_or(0);
            (name.len() + value) as f64
        })
        .sum()
}

fn write_units(bytes: f64) -> f64 {
    (bytes / 1024.0).ceil().max(1.0)
}

fn read_units(bytes: f64, consistent: bool) -> f64 {
    let units = (bytes / 4096.0).ceil().max(1.0);
    if consistent {
        units
    } else {
        units / 2.0
    }
}

/// (write units, read units) of the DynamoDB calls recorded, by DynamoDB's rules.
fn dynamodb_units(calls: &ApiCalls) -> (f64, f64) {
    let (mut writes, mut reads) = (0.0, 0.0);
    for call in calls.recorded() {
        let req: serde_json::Value = serde_json::from_slice(&call.request).unwrap_or_default();
        let resp: serde_json::Value = serde_json::from_slice(&call.response).unwrap_or_default();
        let consistent = req["ConsistentRead"].as_bool().unwrap_or(false);
        match call.operation.as_str() {
            "DynamoDB.PutItem" => writes += write_units(item_size(&req["Item"])),
            "DynamoDB.UpdateItem" | "DynamoDB.DeleteItem" => writes += 1.0,
            "DynamoDB.TransactWriteItems" => {
                for item in req["TransactItems"].as_array().into_iter().flatten() {
                    let size = item_size(&item["Put"]["Item"]);
                    writes += 2.0 * write_units(size);
                }
            }
            "DynamoDB.GetItem" => reads += read_units(item_size(&resp["Item"]), consistent),
            "DynamoDB.Query" => {
                let size: f64 = resp["Items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(item_size)
                    .sum();
                reads += read_units(size, consistent);
            }
            "DynamoDB.BatchGetItem" => {
                for items in resp["Responses"]
                    .as_object()
                    .into_iter()
                    .flat_map(|o| o.values())
                {
                    for item in items.as_array().into_iter().flatten() {
                        reads += read_units(item_size(item), true);
                    }
                }
            }
            _ => {}
        }
    }
    (writes, reads)
}

fn print_table(title: &str, counts: &BTreeMap<String, CallStats>, per: f64) {
    println!("{title}");
    for (op, stats) in counts {
        println!("  {op:<34} {:>8.2}", stats.requests as f64 / per);
    }
}

#[tokio::main]
async fn main() {
    let moto = Moto::start();
    let calls = ApiCalls::new();
    let clients = clients(&moto, Some(&calls)).await;
    let queue = SqsQueue::open(
        clients.sqs.clone(),
        &SqsOptions {
            prefix: unique("bench"),
            max_receives: 3,
            visibility_timeout: Duration::from_secs(120),
            create: true,
        },
    )
    .await
    .unwrap();
    let store = DynamoStore::open(
        clients.dynamodb.clone(),
        &DynamoOptions {
            table: unique("bench"),
            create: true,
            event_retention: Duration::from_secs(90 * 86_400),
            delivery_retention: Duration::from_secs(30 * 86_400),
        },
    )
    .await
    .unwrap();
    let subtasks_per_task = Capability::ALL.len() as f64;

    calls.reset();
    calls.record_bodies();
    for _ in 0..TASKS {
        run_task(&queue, &store).await;
    }
    let busy = calls.snapshot();
    let (wru_table, rru) = dynamodb_units(&calls);
    let subtasks = TASKS as f64 * subtasks_per_task;
    // Index writes: a new task writes its three index entries; each of its two task
    // status changes (queued → running → succeeded) rewrites the entries that hold the
    // status (status-index: delete + put; repository-index: update). Index entries are
    // small (< 1 KB), so one unit each.
    let wru_index = TASKS as f64 * (3.0 + 2.0 * 3.0);
    let wru = wru_table + wru_index;

    calls.reset();
    let idle_polls = 3;
    for _ in 0..idle_polls {
        let got = queue
            .receive(
                &[QueueId::Capability(Capability::Coder)],
                2,
                Duration::from_secs(1),
                Duration::from_secs(120),
            )
            .await
            .unwrap();
        assert!(got.is_empty());
    }
    let idle_one = calls.total() as f64 / idle_polls as f64;
    calls.reset();
    let all: Vec<QueueId> = Capability::ALL
        .iter()
        .map(|c| QueueId::Capability(*c))
        .collect();
    queue
        .receive(&all, 2, Duration::from_secs(1), Duration::from_secs(120))
        .await
        .unwrap();
    // The polls of the other queues end in the background; give them time to be counted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle_all = calls.total() as f64;
    let polls_per_hour = 3600.0 / LONG_POLL_SECS;

    let sqs_per_subtask: f64 = busy
        .iter()
        .filter(|(op, _)| op.starts_with("SQS."))
        .map(|(_, s)| s.requests as f64)
        .sum::<f64>()
        / subtasks;
    let ddb_per_subtask: f64 = busy
        .iter()
        .filter(|(op, _)| op.starts_with("DynamoDB."))
        .map(|(_, s)| s.requests as f64)
        .sum::<f64>()
        / subtasks;

    println!("AWS API calls of the AWS backends (measured on moto_server)");
    println!(
        "simulated: {TASKS} tasks x {subtasks_per_task} subtasks (pipeline `full`), \
         {RUN_MINUTES}-minute agent runs, heartbeat every {HEARTBEAT_SECS} s, \
         one state event per write"
    );
    println!();
    print_table("requests per subtask, by operation:", &busy, subtasks);
    println!("  {:<34} {:>8.2}", "SQS total", sqs_per_subtask);
    println!("  {:<34} {:>8.2}", "DynamoDB total", ddb_per_subtask);
    println!(
        "  {:<34} {:>8.2}  (table {:.2} + indexes {:.2})",
        "DynamoDB write units (estimated)",
        wru / subtasks,
        wru_table / subtasks,
        wru_index / subtasks
    );
    println!(
        "  {:<34} {:>8.2}",
        "DynamoDB read units (estimated)",
        rru / subtasks
    );
    println!();
    println!("idle worker, {LONG_POLL_SECS} s long polls:");
    println!(
        "  one queue:   {idle_one:.0} ReceiveMessage per poll, {:.0} requests/hour",
        idle_one * polls_per_hour
    );
    println!(
        "  five queues: {idle_all:.0} ReceiveMessage per poll, {:.0} requests/hour",
        idle_all * polls_per_hour
    );
    println!();
    let subtasks_month = TASKS_PER_DAY * subtasks_per_task * DAYS_PER_MONTH;
    let sqs_busy = sqs_per_subtask * subtasks_month;
    let idle_workers = subtasks_per_task; // one worker per capability, always polling
    let sqs_idle = idle_workers * idle_one * polls_per_hour * 24.0 * DAYS_PER_MONTH;
    let coordinator_idle = idle_one * polls_per_hour * 24.0 * DAYS_PER_MONTH;
    let sqs_requests = sqs_busy + sqs_idle + coordinator_idle;
    let wru_month = wru / subtasks * subtasks_month;
    let rru_month = rru / subtasks * subtasks_month;
    let sqs_cost = sqs_requests / 1e6 * SQS_PER_MILLION;
    let wcost = wru_month / 1e6 * DYNAMODB_WRITE_PER_MILLION;
    let rcost = rru_month / 1e6 * DYNAMODB_READ_PER_MILLION;
    println!(
        "monthly cost at list prices for {TASKS_PER_DAY:.0} tasks/day x {subtasks_per_task} \
         subtasks, {DAYS_PER_MONTH:.0} days, {idle_workers:.0} workers (one per capability) \
         and one coordinator long-polling around the clock:"
    );
    println!(
        "  prices: SQS ${SQS_PER_MILLION:.2}/million requests (free tier of 1 million/month \
         not deducted), DynamoDB on-demand ${DYNAMODB_WRITE_PER_MILLION:.2}/million write \
         units, ${DYNAMODB_READ_PER_MILLION:.2}/million read units"
    );
    println!(
        "  SQS:      {:>12.0} requests ({:.0} for work, {:.0} idle polling)  ${sqs_cost:.2}",
        sqs_requests,
        sqs_busy,
        sqs_idle + coordinator_idle
    );
    println!("  DynamoDB: {wru_month:>12.0} write units  ${wcost:.2}");
    println!("  DynamoDB: {rru_month:>12.0} read units   ${rcost:.2}");
    println!(
        "  total:    ${:.2} per month (storage and data transfer not included)",
        sqs_cost + wcost + rcost
    );
}
