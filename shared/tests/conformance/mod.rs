//! The backend conformance suite: the same checks run against every queue and state-store
//! backend (SQLite here; SQS/DynamoDB on moto_server in `conformance_aws.rs`).
//! Each backend instance must be fresh (empty queues, empty table).

#![allow(dead_code)]

use ao_shared::capability::Capability;
use ao_shared::ids::{DeliveryId, TaskId};
use ao_shared::pipeline::plan_subtasks;
use ao_shared::queue::{Queue, QueueError, QueueId};
use ao_shared::state::{
    EventKind, InboxDelivery, InboxOutcome, NewEvent, StateStore, StoreError, TaskQuery,
};
use ao_shared::status::TaskStatus;
use ao_shared::task::{Task, TaskSource};
use ao_shared::timefmt;
use std::time::Duration;

const CODER: QueueId = QueueId::Capability(Capability::Coder);
const TESTER: QueueId = QueueId::Capability(Capability::Tester);

/// Send, receive, heartbeat, delete; a deleted message is gone; a stale receipt is refused.
pub async fn queue_round_trip(q: &dyn Queue) {
    q.send(CODER, "one").await.unwrap();
    let got = q
        .receive(
            &[CODER],
            10,
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "one");
    assert_eq!(got[0].receive_count, 1);
    assert_eq!(got[0].receipt.queue, CODER);
    let depth = q.depth(CODER).await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (0, 1), "{depth:?}");
    let receipt = q
        .extend(&got[0].receipt, Duration::from_secs(60))
        .await
        .unwrap();
    q.delete(&receipt).await.unwrap();
    let again = q
        .receive(
            &[CODER],
            10,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(again.is_empty(), "deleted message came back");
    let depth = q.depth(CODER).await.unwrap();
    assert_eq!((depth.visible, depth.in_flight, depth.dead), (0, 0, 0));
}

/// Messages of one queue are not delivered from another.
pub async fn queues_are_separate(q: &dyn Queue) {
    q.send(TESTER, "for tester").await.unwrap();
    let none = q
        .receive(
            &[CODER],
            10,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    let got = q
        .receive(
            &[CODER, TESTER],
            10,
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].receipt.queue, TESTER);
    q.delete(&got[0].receipt).await.unwrap();
}

/// A long poll returns as soon as a message arrives, not at the end of its wait.
pub async fn long_poll_wakes_on_send(q: std::sync::Arc<dyn Queue>) {
    let q2 = q.clone();
    let started = std::time::Instant::now();
    let waiter = tokio::spawn(async move {
        q2.receive(
            &[CODER],
            1,
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    q.send(CODER, "late").await.unwrap();
    let got = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "long poll did not wake"
    );
    q.delete(&got[0].receipt).await.unwrap();
}

/// An unextended message becomes visible again after its visibility timeout, with a
/// higher receive count, and the first receipt no longer deletes it.
pub async fn visibility_expiry(q: &dyn Queue) {
    q.send(CODER, "lost worker").await.unwrap();
    let first = q
        .receive(&[CODER], 1, Duration::from_secs(2), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = q
        .receive(&[CODER], 1, Duration::from_secs(3), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        second.len(),
        1,
        "message did not come back after its visibility timeout"
    );
    assert_eq!(second[0].receive_count, 2);
    assert_eq!(second[0].body, "lost worker");
    q.delete(&second[0].receipt).await.unwrap();
    assert!(matches!(
        q.delete(&first[0].receipt).await,
        Err(QueueError::ReceiptExpired) | Ok(())
    ));
}

/// A released message is visible again at once.
pub async fn release_makes_visible(q: &dyn Queue) {
    q.send(CODER, "released").await.unwrap();
    let got = q
        .receive(&[CODER], 1, Duration::from_secs(2), Duration::from_secs(60))
        .await
        .unwrap();
    q.release(&got[0].receipt).await.unwrap();
    let again = q
        .receive(&[CODER], 1, Duration::from_secs(2), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    q.delete(&again[0].receipt).await.unwrap();
}

/// After `max_receives` receives without a delete, the message moves to the dead-letter
/// queue, where the coordinator can read it.
pub async fn redrive_to_dead_letters(q: &dyn Queue, max_receives: u32) {
    q.send(TESTER, "poison").await.unwrap();
    for i in 0..max_receives {
        let got = q
            .receive(&[TESTER], 1, Duration::from_secs(3), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(got.len(), 1, "receive {i}");
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let mut dead = Vec::new();
    for _ in 0..20 {
        // the move happens on the next receive attempt
        let none = q
            .receive(&[TESTER], 1, Duration::from_secs(1), Duration::from_secs(1))
            .await
            .unwrap();
        assert!(none.is_empty(), "poison message delivered again");
        dead = q
            .receive_dead_letters(TESTER, 10, Duration::from_secs(30))
            .await
            .unwrap();
        if !dead.is_empty() {
            break;
        }
    }
    assert_eq!(dead.len(), 1, "message not in the dead-letter queue");
    assert_eq!(dead[0].body, "poison");
    assert!(dead[0].receipt.dead_letter);
    q.delete(&dead[0].receipt).await.unwrap();
    let depth = q.depth(TESTER).await.unwrap();
    assert_eq!(depth.dead, 0, "{depth:?}");
}

pub fn sample_task(repository: &str) -> Task {
    let now = timefmt::now();
    Task {
        profiles: Default::default(),
        id: TaskId::new(),
        status: TaskStatus::Queued,
        title: "conformance".into(),
        prompt: "do the thing".into(),
        repository: repository.into(),
        branch: "agent/conformance".into(),
        base_branch: None,
        pipeline: "code".into(),
        source: TaskSource::Api,
        created_at: now,
        updated_at: now,
        error: None,
        version: 0,
        subtasks: plan_subtasks(&[Capability::Coder, Capability::Reviewer]),
        approval: Default::default(),
        review_round: None,
        ci_round: None,
        ci_rounds: Vec::new(),
        planning: None,
    }
}

fn state_event(text: &str) -> NewEvent {
    NewEvent {
        subtask_id: None,
        kind: EventKind::State,
        at: timefmt::now(),
        data: serde_json::json!({ "message": text }),
    }
}

/// Create, read, conditional update; a stale write is a conflict and changes nothing.
pub async fn conditional_updates(s: &dyn StateStore) {
    let task = sample_task("/srv/a.git");
    let stored = s
        .create_task(&task, None, &[state_event("created")])
        .await
        .unwrap();
    assert_eq!(stored.version, 1);
    assert!(matches!(
        s.create_task(&task, None, &[]).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let read = s.get_task(task.id).await.unwrap().unwrap();
    assert_eq!(read, stored);

    let mut a = read.clone();
    a.status = TaskStatus::Running;
    let a = s.update_task(&a, &[state_event("running")]).await.unwrap();
    assert_eq!(a.version, 2);

    let mut stale = read.clone();
    stale.status = TaskStatus::Cancelled;
    assert!(matches!(
        s.update_task(&stale, &[state_event("lost")]).await,
        Err(StoreError::Conflict(_))
    ));
    let now = s.get_task(task.id).await.unwrap().unwrap();
    assert_eq!(now.status, TaskStatus::Running);
    let events = s.events(task.id, None, 100).await.unwrap();
    let texts: Vec<_> = events
        .iter()
        .map(|e| e.event.data["message"].clone())
        .collect();
    assert_eq!(
        texts,
        vec!["created", "running"],
        "the failed write must add no event"
    );

    let mut ghost = sample_task("/srv/a.git");
    ghost.version = 1;
    assert!(matches!(
        s.update_task(&ghost, &[]).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(s.get_task(TaskId::new()).await.unwrap().is_none());
}

/// A delivery id creates one task; a redelivery creates nothing.
pub async fn idempotent_deliveries(s: &dyn StateStore) {
    let delivery = DeliveryId::new(format!("d-{}", uuid_like()));
    let first = sample_task("/srv/b.git");
    s.create_task(&first, Some(&delivery), &[]).await.unwrap();
    let second = sample_task("/srv/b.git");
    assert!(matches!(
        s.create_task(&second, Some(&delivery), &[]).await,
        Err(StoreError::DuplicateDelivery(_))
    ));
    assert!(
        s.get_task(second.id).await.unwrap().is_none(),
        "half a transaction survived"
    );
    assert!(!s.record_delivery(&delivery).await.unwrap());
    let fresh = DeliveryId::new(format!("d-{}", uuid_like()));
    assert!(s.record_delivery(&fresh).await.unwrap());
    assert!(!s.record_delivery(&fresh).await.unwrap());
}

fn uuid_like() -> String {
    TaskId::new().to_string()
}

/// Listing pages through every task newest first, and filters by status and repository.
pub async fn pagination(s: &dyn StateStore) {
    let repo = format!("/srv/page-{}.git", uuid_like());
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut t = sample_task(&repo);
        t.created_at += time::Duration::milliseconds(i * 10);
        if i % 2 == 0 {
            t.status = TaskStatus::Failed;
        }
        s.create_task(&t, None, &[]).await.unwrap();
        ids.push(t.id);
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .list_tasks(&TaskQuery {
                repository: Some(repo.clone()),
                limit: 3,
                cursor: cursor.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.tasks.len() <= 3);
        seen.extend(page.tasks.iter().map(|t| t.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");
    let failed = s
        .list_tasks(&TaskQuery {
            repository: Some(repo.clone()),
            status: Some(TaskStatus::Failed),
            limit: 100,
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(failed.tasks.len(), 4);
    assert!(s.count_tasks(TaskStatus::Failed).await.unwrap() >= 4);
    assert!(failed.tasks.iter().all(|t| t.status == TaskStatus::Failed));
    assert!(s
        .list_tasks(&TaskQuery {
            cursor: Some("garbage!".into()),
            limit: 3,
            ..Default::default()
        })
        .await
        .is_err());
}

/// Events come back in order, after a given sequence number.
pub async fn events_in_order(s: &dyn StateStore) {
    let t = sample_task("/srv/e.git");
    s.create_task(&t, None, &[]).await.unwrap();
    for i in 0..5 {
        s.append_events(t.id, &[state_event(&format!("e{i}"))])
            .await
            .unwrap();
    }
    let all = s.events(t.id, None, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    let tail = s.events(t.id, Some(all[2].seq), 100).await.unwrap();
    assert_eq!(tail.len(), 2);
    assert_eq!(tail[0].event.data["message"], "e3");
}

/// A batch appended with a marker is stored once, however often it is appended; another
/// marker appends again.
pub async fn events_once(s: &dyn StateStore) {
    let t = sample_task("/srv/once.git");
    s.create_task(&t, None, &[]).await.unwrap();
    let batch = [state_event("a"), state_event("b")];
    let marker = DeliveryId::new(format!("events:{}:1", t.id));
    assert!(s.append_events_once(t.id, &marker, &batch).await.unwrap());
    assert!(!s.append_events_once(t.id, &marker, &batch).await.unwrap());
    assert_eq!(s.events(t.id, None, 100).await.unwrap().len(), 2);
    let other = DeliveryId::new(format!("events:{}:2", t.id));
    assert!(s.append_events_once(t.id, &other, &batch).await.unwrap());
    let all = s.events(t.id, None, 100).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[3].event.data["message"], "b");
}

/// Spend booked with a marker counts once, also when booked concurrently.
pub async fn spend_once(s: std::sync::Arc<dyn StateStore>) {
    let marker = DeliveryId::new(format!("spend:{}", uuid_like()));
    let books = (0..5).map(|_| {
        let (s, m) = (s.clone(), marker.clone());
        async move {
            s.add_spend_once("api", "2026-10", &m, 125_000)
                .await
                .unwrap()
        }
    });
    let results = futures::future::join_all(books).await;
    assert_eq!(
        results.iter().filter(|r| r.is_some()).count(),
        1,
        "{results:?}"
    );
    assert_eq!(results.iter().flatten().next().copied(), Some(125_000));
    assert_eq!(s.spend("api", "2026-10").await.unwrap(), 125_000);
    let other = DeliveryId::new(format!("spend:{}", uuid_like()));
    assert_eq!(
        s.add_spend_once("api", "2026-10", &other, 1).await.unwrap(),
        Some(125_001)
    );
}

/// A lease is held by one holder until it expires.
///
/// The leases the checks rely on are held for a minute, so a slow store under load cannot
/// let one expire between two checks; the expiry the test waits for is set by a renewal
/// for a millisecond.
pub async fn leases(s: &dyn StateStore) {
    let name = format!("lease-{}", uuid_like());
    let hold = Duration::from_secs(60);
    assert!(s.acquire_lease(&name, "a", hold).await.unwrap());
    assert!(!s.acquire_lease(&name, "b", hold).await.unwrap());
    assert!(s.acquire_lease(&name, "a", hold).await.unwrap(), "renewal");
    assert!(
        s.acquire_lease(&name, "a", Duration::from_millis(1))
            .await
            .unwrap(),
        "a renewal may shorten the lease"
    );
    // Wait for the expiry by its effect: another holder can take the lease.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.acquire_lease(&name, "b", hold).await.unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!s.acquire_lease(&name, "a", hold).await.unwrap());
}

/// A fenced lease: one holder at a time; renewal keeps the token and needs the token;
/// a takeover after expiry increments it and refuses the old holder's renewal; a release
/// frees it at once.
///
/// Every lease the checks rely on is held for a minute, so a slow store under load cannot
/// let one expire between two checks; the one expiry the test waits for is set by a
/// renewal for a millisecond.
pub async fn fenced_leases(s: &dyn StateStore) {
    let name = format!("fenced-{}", uuid_like());
    let ttl = Duration::from_secs(60);
    let a = s.claim_lease(&name, "a", ttl, None).await.unwrap().unwrap();
    assert!(s
        .claim_lease(&name, "b", ttl, None)
        .await
        .unwrap()
        .is_none());
    let renewed = s.claim_lease(&name, "a", ttl, Some(a.token)).await.unwrap();
    assert_eq!(renewed, Some(a), "a renewal keeps the token");
    assert!(
        s.claim_lease(&name, "a", ttl, Some(a.token + 1))
            .await
            .unwrap()
            .is_none(),
        "a renewal with another token is refused"
    );
    let shortened = s
        .claim_lease(&name, "a", Duration::from_millis(1), Some(a.token))
        .await
        .unwrap();
    assert_eq!(shortened, Some(a), "a renewal may shorten the lease");
    // Wait for the expiry by its effect: another holder can take the lease.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let b = loop {
        if let Some(b) = s.claim_lease(&name, "b", ttl, None).await.unwrap() {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        s.claim_lease(&name, "a", ttl, Some(a.token))
            .await
            .unwrap()
            .is_none(),
        "an expired lease is not renewed"
    );
    assert!(b.token > a.token, "a takeover increments the token");
    assert!(s
        .claim_lease(&name, "a", ttl, None)
        .await
        .unwrap()
        .is_none());
    // A release by someone else, or with an old token, changes nothing.
    s.release_lease(&name, "a", a.token).await.unwrap();
    assert!(s
        .claim_lease(&name, "a", ttl, None)
        .await
        .unwrap()
        .is_none());
    s.release_lease(&name, "b", b.token).await.unwrap();
    let a2 = s.claim_lease(&name, "a", ttl, None).await.unwrap().unwrap();
    assert!(a2.token > b.token);
}

/// Pending deliveries waiting for a later retry do not hide a due one from the sweep: more
/// than a sweep's batch of them, stored before it, and it is still listed.
pub async fn inbox_lists_the_due_deliveries(s: &dyn StateStore) {
    let hold = Duration::from_secs(60);
    for i in 0..12 {
        let id = DeliveryId::new(format!("later-{i}-{}", uuid_like()));
        let d = InboxDelivery {
            id: id.clone(),
            event: "issues".into(),
            payload: "{}".into(),
            attempts: 0,
        };
        assert!(s.put_inbox(&d).await.unwrap());
        s.claim_inbox(&id, hold).await.unwrap().unwrap();
        s.finish_inbox(
            &id,
            &InboxOutcome::Retry {
                after: Duration::from_secs(3600),
                error: "GitHub said 502".into(),
            },
        )
        .await
        .unwrap();
    }
    let due = DeliveryId::new(format!("due-{}", uuid_like()));
    let d = InboxDelivery {
        id: due.clone(),
        event: "issues".into(),
        payload: "{}".into(),
        attempts: 0,
    };
    assert!(s.put_inbox(&d).await.unwrap());
    let listed = s.pending_inbox(10).await.unwrap();
    assert!(
        listed.contains(&due),
        "the due delivery is hidden behind {} waiting ones",
        listed.len()
    );
    assert!(
        listed.iter().all(|id| !id.as_str().starts_with("later-")),
        "deliveries waiting for their retry are not listed as due: {listed:?}"
    );
}

/// The webhook inbox: stored once, claimed by one processor at a time, retried when due,
/// finished as done or failed, and listed while pending.
pub async fn inbox(s: &dyn StateStore) {
    let id = DeliveryId::new(format!("inbox-{}", uuid_like()));
    let d = InboxDelivery {
        id: id.clone(),
        event: "issues".into(),
        payload: r#"{"k":"v"}"#.into(),
        attempts: 0,
    };
    assert!(s.put_inbox(&d).await.unwrap());
    assert!(!s.put_inbox(&d).await.unwrap(), "a duplicate is refused");
    assert!(s.pending_inbox(1000).await.unwrap().contains(&id));
    let hold = Duration::from_secs(60);
    let got = s.claim_inbox(&id, hold).await.unwrap().unwrap();
    assert_eq!(got.payload, d.payload);
    assert_eq!(got.event, "issues");
    assert_eq!(got.attempts, 1);
    assert!(
        s.claim_inbox(&id, hold).await.unwrap().is_none(),
        "claimed: no second processor"
    );
    s.finish_inbox(
        &id,
        &InboxOutcome::Retry {
            after: Duration::ZERO,
            error: "GitHub said 502".into(),
        },
    )
    .await
    .unwrap();
    let again = s.claim_inbox(&id, hold).await.unwrap().unwrap();
    assert_eq!(again.attempts, 2);
    s.finish_inbox(&id, &InboxOutcome::Done).await.unwrap();
    assert!(s.claim_inbox(&id, hold).await.unwrap().is_none());
    assert!(!s.pending_inbox(1000).await.unwrap().contains(&id));
    assert!(
        !s.put_inbox(&d).await.unwrap(),
        "a done delivery is still known"
    );

    let failing = DeliveryId::new(format!("inbox-failed-{}", uuid_like()));
    let mut f = d.clone();
    f.id = failing.clone();
    assert!(s.put_inbox(&f).await.unwrap());
    s.claim_inbox(&failing, hold).await.unwrap().unwrap();
    s.finish_inbox(
        &failing,
        &InboxOutcome::Failed {
            error: "gave up".into(),
        },
    )
    .await
    .unwrap();
    assert!(s.claim_inbox(&failing, hold).await.unwrap().is_none());
    assert!(!s.pending_inbox(1000).await.unwrap().contains(&failing));
    assert!(s
        .claim_inbox(&DeliveryId::new("unknown"), hold)
        .await
        .unwrap()
        .is_none());
}

/// Spend adds up per account and month, atomically under concurrent adds.
pub async fn spend_adds_up(s: std::sync::Arc<dyn StateStore>) {
    assert_eq!(s.spend("github:7", "2026-11").await.unwrap(), 0);
    assert_eq!(
        s.add_spend("github:7", "2026-11", 1_500_000).await.unwrap(),
        1_500_000
    );
    let adds = (0..10).map(|_| {
        let s = s.clone();
        async move { s.add_spend("github:7", "2026-11", 250_000).await.unwrap() }
    });
    let totals = futures::future::join_all(adds).await;
    assert_eq!(totals.iter().max().copied(), Some(4_000_000));
    assert_eq!(s.spend("github:7", "2026-11").await.unwrap(), 4_000_000);
    // Other months and accounts are separate.
    assert_eq!(s.spend("github:7", "2026-12").await.unwrap(), 0);
    assert_eq!(s.spend("github:8", "2026-11").await.unwrap(), 0);
    assert_eq!(s.add_spend("github:8", "2026-11", 0).await.unwrap(), 0);
}

/// A task whose agent wrote 1 MB of output over 500 turns: every event is stored as its
/// own record and the whole transcript reads back in pages; an event too large for one
/// record (sent by an older worker) is kept, truncated with a marker; the task item stays
/// small through the applied outcome, however long the agent's summary, and the task
/// completes.
pub async fn large_transcript(s: &dyn StateStore) {
    use ao_shared::task::{Outcome, OutcomeKind};
    let t = sample_task("/srv/big.git");
    let mut task = s.create_task(&t, None, &[]).await.unwrap();
    let sub = task.subtasks[0].id;
    let turn_text = "o".repeat(2048);
    let mut written = 0usize;
    let mut batch = Vec::new();
    for turn in 0..500 {
        for kind in ["text", "tool_use", "tool_result"] {
            let data = serde_json::json!({ "type": kind, "turn": turn, "text": turn_text });
            written += turn_text.len();
            batch.push(NewEvent {
                subtask_id: Some(sub),
                kind: EventKind::Agent,
                at: timefmt::now(),
                data,
            });
        }
        if batch.len() >= 150 {
            s.append_events(task.id, &std::mem::take(&mut batch))
                .await
                .unwrap();
        }
    }
    s.append_events(task.id, &batch).await.unwrap();
    assert!(written >= 1 << 20);
    // One event of 1 MB on its own.
    let huge = "h".repeat(1 << 20);
    s.append_events(
        task.id,
        &[NewEvent {
            subtask_id: Some(sub),
            kind: EventKind::Agent,
            at: timefmt::now(),
            data: serde_json::json!({ "type": "text", "text": huge }),
        }],
    )
    .await
    .unwrap();

    assert_eq!(task.queue_ready(timefmt::now()), vec![sub]);
    let attempt = task.subtasks[0].attempt;
    let started = task.apply_started(sub, attempt, "w", timefmt::now());
    assert!(
        matches!(started, Ok(ao_shared::task::Applied::Changed)),
        "{started:?}"
    );
    task = s
        .update_task(&task, &[state_event("running")])
        .await
        .unwrap();
    let mut outcome = Outcome::succeeded("s".repeat(1 << 20), None);
    outcome.error = Some("e".repeat(1 << 20));
    assert_eq!(outcome.kind, OutcomeKind::Succeeded);
    task.apply_outcome(sub, attempt, outcome, 3, timefmt::now())
        .unwrap();
    let task = s.update_task(&task, &[state_event("coded")]).await.unwrap();
    let doc = serde_json::to_string(&task).unwrap();
    assert!(
        doc.len() < 64 * 1024,
        "task document is {} bytes",
        doc.len()
    );

    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = s.events(task.id, after, 200).await.unwrap();
        assert!(page.len() <= 200);
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        all.extend(page);
    }
    let agent: Vec<_> = all
        .iter()
        .filter(|e| e.event.kind == EventKind::Agent)
        .collect();
    assert_eq!(agent.len(), 1501);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    for (i, e) in agent[..1500].iter().enumerate() {
        assert_eq!(e.event.data["turn"], i / 3, "{i}");
        assert_eq!(e.event.data["text"].as_str().unwrap().len(), 2048);
    }
    let last = agent[1500].event.data.to_string();
    assert!(last.len() < 128 * 1024, "{} bytes", last.len());
    assert!(ao_shared::bounded::is_truncated(&last));
}
