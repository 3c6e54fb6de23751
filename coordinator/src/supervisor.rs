//! The supervisor of the coordinator's background loops (result consumer, recovery,
//! dead letters, metrics poller, webhook consumer, GitHub reporter, …).
//!
//! Each loop runs in a task of its own. A loop that ends before shutdown — it panicked
//! or returned — is logged, counted in `ao_background_loop_restarts_total{loop}`, marked
//! down (`ao_background_loop_up{loop}` is 0 and `/readyz` fails, naming it), and started
//! again after a [`Backoff`] (1 s doubling to 1 min; a loop that ran a while starts from
//! 1 s again). At shutdown every loop is awaited, bounded by the grace period.

use crate::metrics::Metrics;
use ao_shared::backoff::Backoff;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// First delay before a dead loop is started again; doubled per death up to [`MAX_RESTART_DELAY`].
pub const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
/// Longest delay before a dead loop is started again.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// A loop that ran at least this long before it died starts again after the first delay.
const HEALTHY_RUN: Duration = Duration::from_secs(300);

/// Runs the background loops; cheap to share (`&self` everywhere).
pub struct Supervisor {
    metrics: Metrics,
    shutdown: CancellationToken,
    down: Arc<Mutex<BTreeSet<&'static str>>>,
    /// Per loop: wakes the fault-injection point of [`Supervisor::inject_panic`].
    faults: Mutex<BTreeMap<&'static str, Arc<Notify>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Supervisor {
    pub fn new(metrics: Metrics, shutdown: CancellationToken) -> Self {
        Self {
            metrics,
            shutdown,
            down: Arc::default(),
            faults: Mutex::default(),
            handles: Mutex::default(),
        }
    }

    /// Runs the loop that `start` makes, and makes it again whenever it ends before
    /// shutdown. `name` is the metric label; it should be unique.
    pub fn spawn<F, Fut>(&self, name: &'static str, mut start: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let restarts = self.metrics.loop_restarts.with_label_values(&[name]);
        let up = self.metrics.loop_up.with_label_values(&[name]);
        up.set(1);
        let fault = Arc::new(Notify::new());
        self.faults.lock().insert(name, fault.clone());
        let down = self.down.clone();
        let shutdown = self.shutdown.clone();
        let handle = tokio::spawn(async move {
            let mut backoff = Backoff::new(FIRST_RESTART_DELAY, MAX_RESTART_DELAY);
            loop {
                let started = Instant::now();
                let run = start();
                let fault = fault.clone();
                let result = tokio::spawn(async move {
                    tokio::select! {
                        () = run => {}
                        () = fault.notified() => panic!("fault injected into the {name} loop"),
                    }
                })
                .await;
                if shutdown.is_cancelled() {
                    break;
                }
                let why = match result {
                    Ok(()) => "it returned before shutdown".to_string(),
                    Err(e) if e.is_panic() => {
                        let payload = e.into_panic();
                        let text = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into());
                        format!("it panicked: {text}")
                    }
                    Err(e) => format!("it was stopped: {e}"),
                };
                down.lock().insert(name);
                up.set(0);
                restarts.inc();
                if started.elapsed() >= HEALTHY_RUN {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::error!(background_loop = name, reason = %why,
                    restart_in_ms = delay.as_millis() as u64, "background loop died; restarting it");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
                down.lock().remove(name);
                up.set(1);
                tracing::info!(background_loop = name, "background loop restarted");
            }
        });
        self.handles.lock().push(handle);
    }

    /// The loops that are down now (waiting to be started again), by name.
    pub fn down(&self) -> Vec<&'static str> {
        self.down.lock().iter().copied().collect()
    }

    /// Makes the running loop `name` panic, as a bug in it would: the fault-injection
    /// point the tests use to show restart, readiness and metric. `false` if no loop has
    /// that name.
    pub fn inject_panic(&self, name: &str) -> bool {
        match self.faults.lock().get(name) {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        }
    }

    /// Waits for every loop to end (after the shutdown token was cancelled), at most
    /// `grace`; `false` if some did not end in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        let handles: Vec<JoinHandle<()>> = std::mem::take(&mut *self.handles.lock());
        tokio::time::timeout(grace, futures::future::join_all(handles))
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// With time paused: the loop is down for exactly the first restart delay, then up.
    #[tokio::test(start_paused = true)]
    async fn a_loop_that_dies_is_restarted_counted_and_down_meanwhile() {
        let metrics = Metrics::new().unwrap();
        let shutdown = CancellationToken::new();
        let sup = Supervisor::new(metrics.clone(), shutdown.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let stop = shutdown.clone();
        sup.spawn("flaky", move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                if n == 0 {
                    panic!("first run fails");
                }
                stop.cancelled().await
            }
        });
        let restarts = || metrics.loop_restarts.with_label_values(&["flaky"]).get();
        // Down while it waits to be restarted (no time passes while tasks run).
        while sup.down().is_empty() {
            tokio::task::yield_now().await;
        }
        let died = tokio::time::Instant::now();
        assert_eq!(sup.down(), vec!["flaky"]);
        assert_eq!(restarts(), 1);
        assert_eq!(metrics.loop_up.with_label_values(&["flaky"]).get(), 0);
        // Still down just before the first delay is over.
        tokio::time::sleep(FIRST_RESTART_DELAY - Duration::from_millis(1)).await;
        assert_eq!(sup.down(), vec!["flaky"]);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Up again once it is.
        while runs.load(Ordering::SeqCst) < 2 || !sup.down().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let waited = died.elapsed();
        assert!(
            waited >= FIRST_RESTART_DELAY && waited < FIRST_RESTART_DELAY * 2,
            "restarted after {waited:?}"
        );
        assert_eq!(metrics.loop_up.with_label_values(&["flaky"]).get(), 1);
        shutdown.cancel();
        // A loop that ends at shutdown is not restarted.
        assert!(
            sup.drain(Duration::from_secs(5)).await,
            "the loop did not stop"
        );
        assert_eq!(restarts(), 1);
    }
}
