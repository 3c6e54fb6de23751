//! The queue consumer: long-polls the queues of the worker's capabilities for as many
//! messages as it has free slots, runs each in a slot, and on shutdown stops receiving,
//! lets running subtasks finish within the grace period (a run that ends in it is
//! reported), then stops the rest and puts their subtasks back on the queue as fresh
//! copies, so that shutdowns and scale-in never use up a subtask's receives.

use crate::job;
use crate::worker::Worker;
use ao_shared::queue::QueueId;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Runs until `shutdown` fires and in-flight work is done or released.
pub async fn run(worker: Arc<Worker>, shutdown: CancellationToken) {
    let s = &worker.settings;
    let concurrency = s.worker.concurrency;
    let queues: Vec<QueueId> = s
        .worker
        .capabilities
        .iter()
        .map(|c| QueueId::Capability(*c))
        .collect();
    let wait = Duration::from_secs(s.queue.wait_secs.min(20));
    let visibility = Duration::from_secs(s.queue.visibility_timeout_secs);
    let grace = Duration::from_secs(s.worker.shutdown_grace_secs);
    let slots = Arc::new(Semaphore::new(concurrency));
    let hard_stop = CancellationToken::new();
    let mut jobs = JoinSet::new();
    let mut backoff = Duration::from_millis(200);
    set_slots(&worker, concurrency, &slots);

    loop {
        while jobs.try_join_next().is_some() {}
        // Wait for one free slot, then take every other free one.
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let asked = Instant::now();
        let receive = worker
            .queue
            .receive(&queues, permits.len(), wait, visibility);
        tokio::pin!(receive);
        let received = tokio::select! {
            r = &mut receive => r,
            _ = shutdown.cancelled() => {
                // The poll is let finish (it ends within `wait`): dropped, it would leave
                // what it received hidden for a visibility timeout, with a receive used up.
                // What it brings goes back as fresh copies, using up nothing.
                if let Ok(messages) = receive.await {
                    for m in messages {
                        worker.requeue(m.receipt.queue, &m.body, &m.receipt).await;
                    }
                }
                break;
            }
        };
        let messages = match received {
            Ok(m) => {
                backoff = Duration::from_millis(200);
                m
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot receive; retrying");
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        if !messages.is_empty() {
            worker
                .metrics
                .receive_latency
                .observe(asked.elapsed().as_secs_f64());
        }
        for message in messages {
            let Some(permit) = permits.pop() else {
                // More than asked for: give it back at once, without using up a receive.
                worker
                    .requeue(message.receipt.queue, &message.body, &message.receipt)
                    .await;
                continue;
            };
            let (worker, hard_stop, slots) = (worker.clone(), hard_stop.clone(), slots.clone());
            jobs.spawn(async move {
                set_slots(&worker, worker.settings.worker.concurrency, &slots);
                job::handle(worker.clone(), message, hard_stop).await;
                drop(permit);
                set_slots(&worker, worker.settings.worker.concurrency, &slots);
            });
        }
        drop(permits);
        set_slots(&worker, concurrency, &slots);
    }

    // What polls brought that no receive took yet goes back as fresh copies too: left
    // held, it would stay hidden for a visibility timeout, with a receive used up.
    for m in worker.queue.take_held().await {
        worker.requeue(m.receipt.queue, &m.body, &m.receipt).await;
    }
    tracing::info!(
        running = jobs.len(),
        grace_secs = grace.as_secs(),
        "no longer receiving; waiting for running subtasks"
    );
    let drained =
        tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            running = jobs.len(),
            "grace period over; stopping runs and releasing their messages"
        );
        hard_stop.cancel();
        while jobs.join_next().await.is_some() {}
    }
}

fn set_slots(worker: &Worker, concurrency: usize, slots: &Semaphore) {
    let free = slots.available_permits();
    worker
        .metrics
        .slots
        .with_label_values(&["free"])
        .set(free as i64);
    worker
        .metrics
        .slots
        .with_label_values(&["busy"])
        .set(concurrency.saturating_sub(free) as i64);
}
