//! The conformance suite against the AWS backends (SQS, DynamoDB, Secrets Manager) on a
//! `moto_server` started for this test binary, plus checks only the AWS backends need:
//! the real redrive policy, a rotated secret, transactions that leave nothing behind,
//! several replicas writing at once, and resources that are missing.
#![allow(clippy::unwrap_used)]

mod conformance;
#[path = "support/moto.rs"]
mod moto;

use ao_shared::aws::AwsClients;
use ao_shared::aws_secrets::AwsSecrets;
use ao_shared::backend::Backends;
use ao_shared::config::Settings;
use ao_shared::ids::DeliveryId;
use ao_shared::queue::sqs::{SqsOptions, SqsQueue};
use ao_shared::queue::{Queue, QueueError, QueueId};
use ao_shared::secret::{SecretError, SecretRef, SecretResolver};
use ao_shared::state::dynamo::{DynamoOptions, DynamoStore};
use ao_shared::state::{EventKind, NewEvent, StateStore, StoreError};
use ao_shared::status::TaskStatus;
use ao_shared::Capability;
use moto::{unique, Moto};
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::time::Duration;

const CODER: QueueId = QueueId::Capability(Capability::Coder);

async fn clients() -> AwsClients {
    moto::clients(Moto::shared(), None).await
}

async fn queue_with(max_receives: u32) -> SqsQueue {
    let c = clients().await;
    SqsQueue::open(
        c.sqs,
        &SqsOptions {
            prefix: unique("q"),
            max_receives,
            visibility_timeout: Duration::from_secs(30),
            create: true,
        },
    )
    .await
    .expect("open SQS queue on moto")
}

async fn queue() -> SqsQueue {
    queue_with(3).await
}

fn store_options(table: &str) -> DynamoOptions {
    DynamoOptions {
        table: table.to_string(),
        create: true,
        event_retention: Duration::from_secs(90 * 86_400),
        delivery_retention: Duration::from_secs(30 * 86_400),
    }
}

async fn store() -> DynamoStore {
    let c = clients().await;
    DynamoStore::open(c.dynamodb, &store_options(&unique("t")))
        .await
        .expect("open DynamoDB store on moto")
}

fn event(text: &str) -> NewEvent {
    NewEvent {
        subtask_id: None,
        kind: EventKind::Agent,
        at: ao_shared::timefmt::now(),
        data: serde_json::json!({ "message": text }),
    }
}

// ---- the shared conformance suite ----

#[tokio::test]
async fn queue_round_trip() {
    conformance::queue_round_trip(&queue().await).await;
}

#[tokio::test]
async fn queues_are_separate() {
    conformance::queues_are_separate(&queue().await).await;
}

#[tokio::test]
async fn long_poll_wakes_on_send() {
    conformance::long_poll_wakes_on_send(Arc::new(queue().await)).await;
}

#[tokio::test]
async fn visibility_expiry() {
    conformance::visibility_expiry(&queue().await).await;
}

#[tokio::test]
async fn release_makes_visible() {
    conformance::release_makes_visible(&queue().await).await;
}

#[tokio::test]
async fn redrive_to_dead_letters() {
    conformance::redrive_to_dead_letters(&queue_with(2).await, 2).await;
}

#[tokio::test]
async fn conditional_updates() {
    conformance::conditional_updates(&store().await).await;
}

#[tokio::test]
async fn idempotent_deliveries() {
    conformance::idempotent_deliveries(&store().await).await;
}

#[tokio::test]
async fn pagination() {
    conformance::pagination(&store().await).await;
}

#[tokio::test]
async fn events_in_order() {
    conformance::events_in_order(&store().await).await;
}

#[tokio::test]
async fn events_once() {
    conformance::events_once(&store().await).await;
}

#[tokio::test]
async fn spend_once() {
    conformance::spend_once(std::sync::Arc::new(store().await)).await;
}

#[tokio::test]
async fn leases() {
    conformance::leases(&store().await).await;
}

#[tokio::test]
async fn spend_adds_up() {
    conformance::spend_adds_up(std::sync::Arc::new(store().await)).await;
}

// ---- AWS-specific checks ----

/// The created queues carry the redrive policy the Terraform module sets: the
/// dead-letter queue named after the queue, and `maxReceiveCount` = `queue.max_receives`.
#[tokio::test]
async fn queues_have_the_redrive_policy() {
    let c = clients().await;
    let prefix = unique("rp");
    SqsQueue::open(
        c.sqs.clone(),
        &SqsOptions {
            prefix: prefix.clone(),
            max_receives: 4,
            visibility_timeout: Duration::from_secs(30),
            create: true,
        },
    )
    .await
    .unwrap();
    let url = c
        .sqs
        .get_queue_url()
        .queue_name(format!("{prefix}-coder"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let attrs = c
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap();
    let policy: serde_json::Value =
        serde_json::from_str(&attrs[&aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy])
            .unwrap();
    assert_eq!(policy["maxReceiveCount"].to_string().trim_matches('"'), "4");
    assert!(policy["deadLetterTargetArn"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":{prefix}-coder-dlq")));
}

/// Without `aws.create_resources`, a missing queue or table is an error that names it.
#[tokio::test]
async fn missing_resources_are_reported() {
    let c = clients().await;
    let prefix = unique("missing");
    let err = SqsQueue::open(
        c.sqs.clone(),
        &SqsOptions {
            prefix: prefix.clone(),
            max_receives: 3,
            visibility_timeout: Duration::from_secs(30),
            create: false,
        },
    )
    .await
    .err()
    .expect("opening missing queues must fail")
    .to_string();
    assert!(
        err.contains(&prefix) && err.contains("create_resources"),
        "{err}"
    );
    let table = unique("missing");
    let mut options = store_options(&table);
    options.create = false;
    let err = DynamoStore::open(c.dynamodb, &options)
        .await
        .expect_err("opening a missing table must fail")
        .to_string();
    assert!(
        err.contains(&table) && err.contains("create_resources"),
        "{err}"
    );
}

/// More messages than asked for are handed back at once, not hidden until they expire.
#[tokio::test]
async fn surplus_messages_are_released() {
    let q = queue().await;
    let tester = QueueId::Capability(Capability::Tester);
    for body in ["a", "b", "c"] {
        q.send(CODER, body).await.unwrap();
    }
    q.send(tester, "t").await.unwrap();
    let got = q
        .receive(
            &[CODER, tester],
            1,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    q.delete(&got[0].receipt).await.unwrap();
    let mut rest = Vec::new();
    for _ in 0..10 {
        let more = q
            .receive(
                &[CODER, tester],
                10,
                Duration::from_secs(1),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        rest.extend(more);
        if rest.len() >= 3 {
            break;
        }
    }
    assert_eq!(rest.len(), 3, "the surplus did not come back at once");
    for m in rest {
        q.delete(&m.receipt).await.unwrap();
    }
}

/// Receiving from several queues at once: when one queue's poll answers first, what the
/// other polls bring is neither dropped (hidden until its visibility timeout) nor made
/// visible again (which counts a receive): the next receive hands it out, received once.
#[tokio::test]
async fn every_polls_messages_are_kept() {
    let q = queue().await;
    let tester = QueueId::Capability(Capability::Tester);
    for round in 0..5 {
        q.send(CODER, &format!("c{round}")).await.unwrap();
        q.send(tester, &format!("t{round}")).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            let more = q
                .receive(
                    &[CODER, tester],
                    1,
                    Duration::from_secs(1),
                    Duration::from_secs(120),
                )
                .await
                .unwrap();
            assert!(more.len() <= 1, "more than asked for");
            got.extend(more);
            if got.len() == 2 {
                break;
            }
        }
        let mut bodies: Vec<&str> = got.iter().map(|m| m.body.as_str()).collect();
        bodies.sort();
        assert_eq!(
            bodies,
            vec![format!("c{round}"), format!("t{round}")],
            "round {round}: a message of the slower poll was lost"
        );
        for m in &got {
            assert_eq!(
                m.receive_count, 1,
                "round {round}: {} was received again",
                m.body
            );
            q.delete(&m.receipt).await.unwrap();
        }
    }
}

/// Bodies above the limit are refused before anything is sent; a visibility beyond 12 h
/// is cut to what SQS allows; the receipt of a deleted message is reported as expired.
#[tokio::test]
async fn limits_are_kept() {
    let q = queue().await;
    let big = "x".repeat(ao_shared::message::MAX_MESSAGE_BYTES + 1);
    assert!(matches!(
        q.send(CODER, &big).await,
        Err(QueueError::TooLarge(_))
    ));
    q.send(CODER, "long job").await.unwrap();
    let got = q
        .receive(&[CODER], 1, Duration::from_secs(2), Duration::from_secs(30))
        .await
        .unwrap();
    let receipt = q
        .extend(&got[0].receipt, Duration::from_secs(13 * 3600))
        .await
        .expect("a heartbeat past 12 h is cut, not refused");
    q.delete(&receipt).await.unwrap();
    let r = q.extend(&receipt, Duration::from_secs(30)).await;
    assert!(matches!(r, Err(QueueError::ReceiptExpired)), "{r:?}");
}

/// A rotated secret is seen once the refresh interval has passed; env: references are
/// resolved locally; errors never carry a value.
#[tokio::test]
async fn rotated_secret_is_picked_up() {
    let c = clients().await;
    let name = unique("secret");
    c.secrets
        .create_secret()
        .name(&name)
        .secret_string("first-value")
        .send()
        .await
        .unwrap();
    let secrets = AwsSecrets::new(c.secrets.clone(), Duration::from_secs(1));
    let reference = SecretRef::AwsSecretsManager(name.clone());
    assert_eq!(
        secrets.resolve(&reference).await.unwrap().expose_secret(),
        "first-value"
    );
    c.secrets
        .put_secret_value()
        .secret_id(&name)
        .secret_string("second-value")
        .send()
        .await
        .unwrap();
    assert_eq!(
        secrets.resolve(&reference).await.unwrap().expose_secret(),
        "first-value",
        "served from the cache within the refresh interval"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        secrets.resolve(&reference).await.unwrap().expose_secret(),
        "second-value"
    );
    let missing = SecretRef::AwsSecretsManager(unique("nope"));
    let err = secrets.resolve(&missing).await.unwrap_err();
    assert!(matches!(err, SecretError::Backend { .. }), "{err}");
    assert!(matches!(
        secrets
            .resolve(&SecretRef::Env("AO_TEST_SURELY_UNSET".into()))
            .await,
        Err(SecretError::MissingEnv { .. })
    ));
}

/// A transaction that fails (duplicate delivery, existing task) writes none of its items.
#[tokio::test]
async fn failed_transactions_leave_nothing_behind() {
    let s = store().await;
    let delivery = DeliveryId::new(unique("delivery"));
    let first = conformance::sample_task("/srv/tx.git");
    s.create_task(&first, Some(&delivery), &[event("created")])
        .await
        .unwrap();

    let second = conformance::sample_task("/srv/tx.git");
    assert!(matches!(
        s.create_task(&second, Some(&delivery), &[event("a"), event("b")])
            .await,
        Err(StoreError::DuplicateDelivery(_))
    ));
    assert!(s.get_task(second.id).await.unwrap().is_none());
    assert!(s.events(second.id, None, 10).await.unwrap().is_empty());

    // Same task id, fresh delivery: the task exists, so the delivery is not recorded.
    let fresh = DeliveryId::new(unique("delivery"));
    assert!(matches!(
        s.create_task(&first, Some(&fresh), &[event("again")]).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(
        s.record_delivery(&fresh).await.unwrap(),
        "the failed transaction recorded its delivery"
    );
    let events = s.events(first.id, None, 10).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");

    // A stale update with events adds none of them.
    let stored = s.get_task(first.id).await.unwrap().unwrap();
    let mut newer = stored.clone();
    newer.status = TaskStatus::Running;
    s.update_task(&newer, &[event("running")]).await.unwrap();
    assert!(matches!(
        s.update_task(&stored, &[event("stale")]).await,
        Err(StoreError::Conflict(_))
    ));
    let texts: Vec<_> = s
        .events(first.id, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            e.event.data["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(texts, ["created", "running"]);
}

/// Two replicas (separate store handles, separate memories) write events and updates to
/// the same task in turn, each with a stale idea of the other's writes: sequence numbers
/// stay unique and increasing, no event is lost, and of two updates from the same version
/// exactly one wins.
///
/// The writes interleave one transaction at a time rather than racing: moto does not
/// isolate concurrent `TransactWriteItems` (it snapshots the table before a transaction and
/// restores the snapshot when a condition fails, which can undo another request's committed
/// write), so a race on moto tests moto. DynamoDB itself serialises transactions on an item
/// ("TransactWriteItems", Isolation levels, in the DynamoDB developer guide); what this
/// store adds on top is the counter condition and the retry with a fresh counter, and those
/// are what the stale replicas exercise here.
#[tokio::test]
async fn replicas_write_in_turn_with_stale_counters() {
    let c = clients().await;
    let table = unique("t");
    let a = DynamoStore::open(c.dynamodb.clone(), &store_options(&table))
        .await
        .unwrap();
    let b = DynamoStore::open(c.dynamodb.clone(), &store_options(&table))
        .await
        .unwrap();
    let task = conformance::sample_task("/srv/replicas.git");
    let stored = a
        .create_task(&task, None, &[event("created")])
        .await
        .unwrap();

    // Each replica remembers the counter it last wrote; every write after the other
    // replica's is made from a stale counter and must be retried, not overwrite.
    let mut expected = vec!["created".to_string()];
    for j in 0..3 {
        for (i, s) in [&a, &b, &a, &b].into_iter().enumerate() {
            let text = format!("w{i}-{j}");
            s.append_events(task.id, &[event(&text)]).await.unwrap();
            expected.push(text);
        }
    }
    let events = b.events(task.id, None, 100).await.unwrap();
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let texts: Vec<_> = events
        .iter()
        .map(|e| {
            e.event.data["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(texts, expected, "every event kept, once, in order");

    let mut x = stored.clone();
    x.status = TaskStatus::Running;
    let mut y = stored.clone();
    y.status = TaskStatus::Cancelled;
    a.update_task(&x, &[event("x")]).await.unwrap();
    let loser = b.update_task(&y, &[event("y")]).await;
    assert!(matches!(loser, Err(StoreError::Conflict(_))), "{loser:?}");
    let now = b.get_task(task.id).await.unwrap().unwrap();
    assert_eq!(now.status, TaskStatus::Running, "the loser changed nothing");
}

/// A task's event counter behind its stored events (what a table restored from a backup,
/// or moto's restore of a whole-table snapshot when a concurrent transaction's condition
/// fails, can leave): every later append took a number already taken, and failed for good
/// ("gave up after 8 attempts"), wedging the task. The store now writes after the newest
/// stored event.
#[tokio::test]
async fn a_counter_behind_the_stored_events_is_moved_past_them() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let c = clients().await;
    let table = unique("t");
    let store = DynamoStore::open(c.dynamodb.clone(), &store_options(&table))
        .await
        .unwrap();
    let task = conformance::sample_task("/srv/behind.git");
    store
        .create_task(&task, None, &[event("created")])
        .await
        .unwrap();
    store.append_events(task.id, &[event("a")]).await.unwrap();
    // Put the counter back by one, as a lost counter write would have left it.
    let pk = format!("TASK#{}", task.id);
    c.dynamodb
        .update_item()
        .table_name(&table)
        .key("pk", AttributeValue::S(pk))
        .key("sk", AttributeValue::S("SEQ".into()))
        .update_expression("SET last_seq = :one")
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
    // A replica that never wrote this task (no cached counter) appends.
    let other = DynamoStore::open(c.dynamodb.clone(), &store_options(&table))
        .await
        .unwrap();
    other.append_events(task.id, &[event("b")]).await.unwrap();
    other
        .update_task(&task_as_stored(&other, task.id).await, &[event("c")])
        .await
        .unwrap();
    let texts: Vec<String> = other
        .events(task.id, None, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            e.event.data["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        texts,
        ["created", "a", "b", "c"],
        "every event kept, once, in order"
    );
}

async fn task_as_stored(store: &DynamoStore, id: ao_shared::ids::TaskId) -> ao_shared::task::Task {
    store.get_task(id).await.unwrap().unwrap()
}

/// `Backends::open_aws` wires the three AWS seams from settings.
#[tokio::test]
async fn backends_open_from_settings() {
    let moto = Moto::shared();
    let mut settings = Settings::default();
    settings.aws.endpoint_url = Some(moto.endpoint.clone());
    settings.aws.region = Some(moto::REGION.into());
    settings.aws.queue_prefix = unique("b");
    settings.aws.table = unique("b");
    settings.aws.create_resources = true;
    let backends = Backends::open_aws(&settings, &clients().await)
        .await
        .unwrap();
    backends
        .queue
        .send(QueueId::Results, "hello")
        .await
        .unwrap();
    let depth = backends.queue.depth(QueueId::Results).await.unwrap();
    assert_eq!(depth.visible, 1);
    assert_eq!(depth.oldest_age, None);
    let task = conformance::sample_task("/srv/open.git");
    backends.store.create_task(&task, None, &[]).await.unwrap();
    assert!(backends.store.get_task(task.id).await.unwrap().is_some());
}

#[tokio::test]
async fn large_transcript() {
    let s = store().await;
    conformance::large_transcript(&s).await;
}

#[tokio::test]
async fn fenced_leases() {
    conformance::fenced_leases(&store().await).await;
}

#[tokio::test]
async fn inbox() {
    conformance::inbox(&store().await).await;
}

#[tokio::test]
async fn inbox_lists_the_due_deliveries() {
    conformance::inbox_lists_the_due_deliveries(&store().await).await;
}
