//! The coordinator's shared context ([`Coordinator`]), built once and passed to every
//! handler and loop: settings, the queue and state-store seams, secrets, metrics, the
//! task-change bus, the supervisor of the background loops, and the shutdown signal.
//!
//! It knows nothing of GitHub: the GitHub adapter ([`crate::github::Github`]) holds a
//! `Coordinator` and follows the bus like any other subscriber.

use crate::bus::{Bus, TaskChange};
use crate::lease::{LeaseLoop, Leases};
use crate::metrics::Metrics;
use crate::supervisor::Supervisor;
use ao_shared::backend::Backends;
use ao_shared::config::Settings;
use ao_shared::queue::Queue;
use ao_shared::secret::SecretResolver;
use ao_shared::state::StateStore;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Everything the coordinator's parts share.
pub struct Coordinator {
    pub settings: Settings,
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn StateStore>,
    pub secrets: Arc<dyn SecretResolver>,
    pub metrics: Metrics,
    /// Every change of a task in this process, as it was stored.
    pub bus: Bus,
    /// Runs the background loops and knows which are down.
    pub loops: Supervisor,
    /// Cancelled when the coordinator shuts down.
    pub shutdown: CancellationToken,
    /// This replica's identity as the holder of singleton loops' leases.
    pub leases: Arc<Leases>,
    ready: AtomicBool,
    /// Unix ms of the last successful queue-depth poll.
    pub last_depth_poll_ms: AtomicI64,
}

impl Coordinator {
    pub fn new(settings: Settings, backends: Backends, metrics: Metrics) -> Arc<Self> {
        let shutdown = CancellationToken::new();
        crate::lease::show_metrics(&metrics);
        Arc::new(Self {
            settings,
            queue: backends.queue,
            store: backends.store,
            secrets: backends.secrets,
            loops: Supervisor::new(metrics.clone(), shutdown.clone()),
            metrics,
            bus: Bus::default(),
            shutdown,
            leases: Arc::new(Leases::default()),
            ready: AtomicBool::new(false),
            last_depth_poll_ms: AtomicI64::new(0),
        })
    }

    /// Started, not shutting down, and every background loop is up.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && !self.shutdown.is_cancelled()
            && self.loops.down().is_empty()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// What a lease-owned loop of this replica needs.
    pub fn lease_loop(&self) -> LeaseLoop {
        let c = &self.settings.coordinator;
        LeaseLoop {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            ttl: std::time::Duration::from_millis(c.lease_ttl_ms),
            renew: std::time::Duration::from_millis(c.lease_renew_ms),
            shutdown: self.shutdown.clone(),
            leases: self.leases.clone(),
        }
    }

    /// Tells every subscriber of the bus about a change.
    pub fn publish(&self, change: TaskChange) {
        self.bus.publish(change);
    }
}
