//! The conformance suite against the SQLite backends.
#![allow(clippy::unwrap_used)]

mod conformance;

use ao_shared::queue::sqlite::SqliteQueue;
use ao_shared::queue::Queue;
use ao_shared::state::sqlite::SqliteStore;
use std::sync::Arc;

fn queue(max_receives: u32) -> (tempfile::TempDir, SqliteQueue) {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::open(dir.path(), max_receives).unwrap();
    (dir, q)
}

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(dir.path()).unwrap();
    (dir, s)
}

#[tokio::test]
async fn queue_round_trip() {
    let (_d, q) = queue(3);
    conformance::queue_round_trip(&q).await;
}

#[tokio::test]
async fn queues_are_separate() {
    let (_d, q) = queue(3);
    conformance::queues_are_separate(&q).await;
}

#[tokio::test]
async fn long_poll_wakes_on_send() {
    let (_d, q) = queue(3);
    conformance::long_poll_wakes_on_send(Arc::new(q)).await;
}

#[tokio::test]
async fn long_poll_sees_another_process_writes() {
    // Two handles on the same file behave like two processes: no shared notification.
    let (d, q) = queue(3);
    let other: Arc<dyn Queue> = Arc::new(SqliteQueue::open(d.path(), 3).unwrap());
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move {
            q.receive(
                &[ao_shared::queue::QueueId::Results],
                1,
                std::time::Duration::from_secs(5),
                std::time::Duration::from_secs(30),
            )
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    other
        .send(ao_shared::queue::QueueId::Results, "x")
        .await
        .unwrap();
    assert_eq!(waiter.await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_send_by_another_process_wakes_a_long_poll_at_once() {
    // Polling once an hour: only a wake-up from the other handle's write can end the
    // wait before the bound below.
    let (d, q) = queue(3);
    let q = q.with_poll_interval(std::time::Duration::from_secs(3600));
    let other = SqliteQueue::open(d.path(), 3).unwrap();
    let waiter = tokio::spawn(async move {
        q.receive(
            &[ao_shared::queue::QueueId::Results],
            1,
            std::time::Duration::from_secs(3600),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap()
    });
    // The waiter's first look finds nothing; the send comes after it (or before: then
    // the first look finds it).
    tokio::task::yield_now().await;
    other
        .send(ao_shared::queue::QueueId::Results, "x")
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .expect("the long poll was not woken by the other handle's send")
        .unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test]
async fn visibility_expiry() {
    let (_d, q) = queue(3);
    conformance::visibility_expiry(&q).await;
}

#[tokio::test]
async fn release_makes_visible() {
    let (_d, q) = queue(3);
    conformance::release_makes_visible(&q).await;
}

#[tokio::test]
async fn redrive_to_dead_letters() {
    let (_d, q) = queue(2);
    conformance::redrive_to_dead_letters(&q, 2).await;
}

#[tokio::test]
async fn conditional_updates() {
    let (_d, s) = store();
    conformance::conditional_updates(&s).await;
}

#[tokio::test]
async fn idempotent_deliveries() {
    let (_d, s) = store();
    conformance::idempotent_deliveries(&s).await;
}

#[tokio::test]
async fn pagination() {
    let (_d, s) = store();
    conformance::pagination(&s).await;
}

#[tokio::test]
async fn events_in_order() {
    let (_d, s) = store();
    conformance::events_in_order(&s).await;
}

#[tokio::test]
async fn events_once() {
    let (_d, s) = store();
    conformance::events_once(&s).await;
}

#[tokio::test]
async fn spend_once() {
    let (_d, s) = store();
    conformance::spend_once(std::sync::Arc::new(s)).await;
}

#[tokio::test]
async fn leases() {
    let (_d, s) = store();
    conformance::leases(&s).await;
}

#[tokio::test]
async fn spend_adds_up() {
    let (_d, s) = store();
    conformance::spend_adds_up(std::sync::Arc::new(s)).await;
}

#[tokio::test]
async fn large_transcript() {
    let (_d, s) = store();
    conformance::large_transcript(&s).await;
}

/// Events and delivery records past their retention are deleted; newer ones are kept.
#[tokio::test]
async fn old_events_and_deliveries_are_pruned() {
    use ao_shared::state::sqlite::{Pruned, Retention};
    use ao_shared::state::{EventKind, NewEvent, StateStore};
    let (_d, s) = store();
    let day = std::time::Duration::from_secs(86_400);
    let s = s.with_retention(Retention {
        events: Some(day * 90),
        deliveries: Some(day * 30),
    });
    let t = conformance::sample_task("/srv/r.git");
    s.create_task(&t, None, &[]).await.unwrap();
    let now = ao_shared::timefmt::now();
    let event = |at, text: &str| NewEvent {
        subtask_id: None,
        kind: EventKind::Agent,
        at,
        data: serde_json::json!({ "message": text }),
    };
    s.append_events(t.id, &[event(now - day * 100, "old"), event(now, "new")])
        .await
        .unwrap();
    let delivery = ao_shared::ids::DeliveryId::new("d-1");
    assert!(s.record_delivery(&delivery).await.unwrap());
    // 31 days later: the delivery record and the 131-day-old event go, the other stays.
    let pruned = s.prune(now + day * 31).await.unwrap();
    assert_eq!(
        pruned,
        Pruned {
            events: 1,
            deliveries: 1
        }
    );
    let left = s.events(t.id, None, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].event.data["message"], "new");
    assert!(s.record_delivery(&delivery).await.unwrap());
}

#[tokio::test]
async fn fenced_leases() {
    let (_d, s) = store();
    conformance::fenced_leases(&s).await;
}

#[tokio::test]
async fn inbox() {
    let (_d, s) = store();
    conformance::inbox(&s).await;
}

#[tokio::test]
async fn inbox_lists_the_due_deliveries() {
    let (_d, s) = store();
    conformance::inbox_lists_the_due_deliveries(&s).await;
}
