//! Periodic readings for the metrics: queue depths (visible, in flight, dead), tasks by
//! status, and subtasks of active tasks by capability and status.

use crate::context::Coordinator;
use ao_shared::queue::QueueId;
use ao_shared::state::TaskQuery;
use ao_shared::status::{SubtaskStatus, TaskStatus};
use ao_shared::timefmt::{now, unix_ms};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Reads everything once.
pub async fn poll(cx: &Coordinator) {
    let m = &cx.metrics;
    let mut all_ok = true;
    for queue in QueueId::all() {
        match cx.queue.depth(queue).await {
            Ok(d) => {
                let q = queue.as_str();
                m.queue_messages
                    .with_label_values(&[q, "visible"])
                    .set(d.visible as i64);
                m.queue_messages
                    .with_label_values(&[q, "in_flight"])
                    .set(d.in_flight as i64);
                m.queue_messages
                    .with_label_values(&[q, "dead"])
                    .set(d.dead as i64);
                m.queue_oldest_age
                    .with_label_values(&[q])
                    .set(d.oldest_age.map(|a| a.as_secs_f64()).unwrap_or(0.0));
            }
            Err(e) => {
                all_ok = false;
                tracing::warn!(queue = %queue, error = %e, "cannot read queue depth");
            }
        }
    }
    if all_ok {
        cx.last_depth_poll_ms
            .store(unix_ms(now()), Ordering::Relaxed);
    }
    for status in TaskStatus::ALL {
        match cx.store.count_tasks(status).await {
            Ok(n) => m.tasks.with_label_values(&[status.as_str()]).set(n as i64),
            Err(e) => tracing::warn!(error = %e, "cannot count tasks"),
        }
    }
    let mut counts = std::collections::BTreeMap::new();
    for status in [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::AwaitingApproval,
    ] {
        let query = TaskQuery {
            status: Some(status),
            limit: 500,
            ..Default::default()
        };
        if let Ok(page) = cx.store.list_tasks(&query).await {
            for sub in page.tasks.iter().flat_map(|t| &t.subtasks) {
                *counts.entry((sub.capability, sub.status)).or_insert(0i64) += 1;
            }
        }
    }
    for capability in ao_shared::Capability::ALL {
        for status in SubtaskStatus::ALL.iter().filter(|s| !s.is_terminal()) {
            let n = counts.get(&(capability, *status)).copied().unwrap_or(0);
            m.subtasks
                .with_label_values(&[capability.as_str(), status.as_str()])
                .set(n);
        }
    }
}

/// Polls every `coordinator.depth_poll_secs` until shutdown.
pub async fn run(cx: Arc<Coordinator>) {
    let every = Duration::from_secs(cx.settings.coordinator.depth_poll_secs.max(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => poll(&cx).await,
            _ = cx.shutdown.cancelled() => break,
        }
    }
}

/// Updates the poll-age gauge; called just before a scrape.
pub fn refresh_poll_age(cx: &Coordinator) {
    let last = cx.last_depth_poll_ms.load(Ordering::Relaxed);
    let age = if last == 0 {
        f64::NAN
    } else {
        (unix_ms(now()) - last) as f64 / 1000.0
    };
    cx.metrics.queue_poll_age.set(age);
}
