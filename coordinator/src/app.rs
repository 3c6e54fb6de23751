//! The coordinator's shared context, built once in `main` and passed to every handler
//! and loop.

use crate::metrics::Metrics;
use ao_shared::backend::Backends;
use ao_shared::config::Settings;
use ao_shared::ids::TaskId;
use ao_shared::queue::Queue;
use ao_shared::secret::SecretResolver;
use ao_shared::state::StateStore;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Everything the coordinator's parts share.
pub struct App {
    pub settings: Settings,
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn StateStore>,
    pub secrets: Arc<dyn SecretResolver>,
    pub metrics: Metrics,
    /// Told the id of every task that got new events, for live streams in this process.
    pub task_events: broadcast::Sender<TaskId>,
    /// Cancelled when the coordinator shuts down.
    pub shutdown: CancellationToken,
    ready: AtomicBool,
    /// Unix ms of the last successful queue-depth poll.
    pub last_depth_poll_ms: AtomicI64,
    /// The GitHub App: client, webhook inbox, reporter.
    pub github: crate::github::Github,
}

impl App {
    pub fn new(settings: Settings, backends: Backends, metrics: Metrics) -> Arc<Self> {
        let (task_events, _) = broadcast::channel(1024);
        let github =
            crate::github::Github::new(&settings, backends.secrets.clone(), metrics.clone());
        Arc::new(Self {
            settings,
            queue: backends.queue,
            store: backends.store,
            secrets: backends.secrets,
            metrics,
            task_events,
            shutdown: CancellationToken::new(),
            ready: AtomicBool::new(false),
            last_depth_poll_ms: AtomicI64::new(0),
            github,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.shutdown.is_cancelled()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Wakes live event streams of `task` in this process.
    pub fn notify_task(&self, task: TaskId) {
        let _ = self.task_events.send(task);
    }
}
