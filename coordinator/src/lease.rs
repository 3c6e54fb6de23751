//! Leases on the singleton loops: the loops that must run on one coordinator replica at a
//! time when several share a state store.
//!
//! A lease is a record in the state store ([`ao_shared::state::StateStore::claim_lease`])
//! with a holder (this replica's [`Leases::holder`]), an expiry and a fencing token that
//! grows every time the lease changes hands. The replica that takes a lease runs the loop
//! and renews the lease every `coordinator.lease_renew_ms`; a renewal is conditional on
//! the holder and the token, so it fails once another replica has taken over. The loop is
//! stopped (its future dropped) when a renewal is refused, or when none has been confirmed
//! for `coordinator.lease_ttl_ms` since the last one was asked for (measured on this
//! replica's clock from before the request, so it stops no later than the store lets
//! another replica take over). A replica without the lease tries to take it every renewal
//! interval, so a replica that died (and stopped renewing) is replaced within
//! `lease_ttl_ms + lease_renew_ms`. On a clean shutdown the lease is released at once.
//!
//! Which loops are singletons ([`LEASES`]): `recovery` (the orphan sweep: it judges
//! liveness by counting whole queues, so two sweeps at once would count each other's
//! repairs) and `github_reconcile` (the missed-delivery sweep: two would ask GitHub for the
//! same redeliveries and label sweeps). Every other loop runs on every replica: the result
//! consumer and the dead-letter watcher receive from queues that hand each message to one
//! receiver; the webhook consumer claims each stored delivery before processing it; the
//! GitHub reporter, wait list and budget booking follow the changes made in their own
//! process; the metrics poller exports this replica's view (use `max`, not `sum`, across
//! replicas).
//!
//! The loop is polled only while the lease is valid by this replica's clock: a holder that
//! was not scheduled past the expiry (stopped, stalled) is stopped before its next step.
//! Store writes made by a singleton loop are not themselves conditioned on the token: task
//! writes are conditional on the task's version, so a loop that lost its lease while a
//! write was in flight cannot overwrite a newer holder's change, only lose the race.

use crate::metrics::Metrics;
use ao_shared::state::StateStore;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The recovery sweep's lease.
pub const RECOVERY: &str = "recovery";
/// The missed-delivery sweep's lease.
pub const GITHUB_RECONCILE: &str = "github_reconcile";
/// Every lease a coordinator takes (the metrics show each from start-up).
pub const LEASES: [&str; 2] = [RECOVERY, GITHUB_RECONCILE];

/// This replica's identity as a lease holder.
pub struct Leases {
    /// Unique per process start: the host (or Nomad allocation) and a random suffix, so
    /// that a restarted replica never mistakes its predecessor's lease for its own.
    pub holder: String,
    abandoned: AtomicBool,
}

impl Default for Leases {
    fn default() -> Self {
        let host = std::env::var("NOMAD_ALLOC_ID")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "coordinator".into());
        let host: String = host.chars().take(64).collect();
        Self {
            holder: format!("{host}-{}", uuid::Uuid::new_v4().simple()),
            abandoned: AtomicBool::new(false),
        }
    }
}

impl Leases {
    /// Stops renewing and releasing every lease without stopping anything else, as a
    /// replica that was killed would: the fault-injection point the tests use.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }

    fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }
}

/// Makes every lease's metrics show from start-up (held 0, no takeover, none lost).
pub fn show_metrics(metrics: &Metrics) {
    for lease in LEASES {
        metrics.lease_held.with_label_values(&[lease]).set(0);
        metrics.lease_takeovers.with_label_values(&[lease]);
        metrics.lease_lost.with_label_values(&[lease]);
    }
}

/// What a lease-owned loop needs of the coordinator (built by
/// `Coordinator::lease_loop`): the store the leases live in, the metrics, the timing
/// (`coordinator.lease_ttl_ms`, `coordinator.lease_renew_ms`), the shutdown signal and
/// this replica's holder identity.
#[derive(Clone)]
pub struct LeaseLoop {
    pub store: Arc<dyn StateStore>,
    pub metrics: Metrics,
    /// How long a lease lasts unless renewed.
    pub ttl: Duration,
    /// How often the holder renews it (and others try to take it).
    pub renew: Duration,
    pub shutdown: CancellationToken,
    pub leases: Arc<Leases>,
}

/// How a held lease ended.
enum HeldUntil {
    /// The loop ended (shutdown, or it returned).
    LoopEnded,
    /// The lease was lost: the loop was stopped.
    Lost(&'static str),
    /// The replica abandoned its leases (a simulated kill).
    Abandoned,
}

/// Runs the loop that `start` makes while this replica holds the lease `name`, until
/// shutdown. Meant to be the body of a supervised loop: it returns at shutdown, or when
/// the loop itself returned before shutdown (the supervisor then counts a death).
pub async fn owned<F, Fut>(cx: LeaseLoop, name: &'static str, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let (ttl, renew) = (cx.ttl, cx.renew);
    let held = cx.metrics.lease_held.with_label_values(&[name]);
    let holder = cx.leases.holder.as_str();
    loop {
        // Take the lease, or wait for it.
        let (token, mut valid_until) = loop {
            if cx.shutdown.is_cancelled() || cx.leases.is_abandoned() {
                return;
            }
            let asked = Instant::now();
            match cx.store.claim_lease(name, holder, ttl, None).await {
                Ok(Some(grant)) => break (grant.token, asked + ttl),
                Ok(None) => {}
                Err(e) => tracing::warn!(lease = name, error = %e, "cannot take a lease"),
            }
            tokio::select! {
                () = tokio::time::sleep(renew) => {}
                () = cx.shutdown.cancelled() => return,
            }
        };
        held.set(1);
        cx.metrics.lease_takeovers.with_label_values(&[name]).inc();
        tracing::info!(lease = name, token, holder, "lease taken; running the loop");
        let run = start();
        tokio::pin!(run);
        let ended = loop {
            // In this order: the lease's expiry is checked before the loop is polled, so a
            // holder that was not scheduled past it (a SIGSTOP, a stalled host) and may have
            // been replaced runs no further step when it is scheduled again.
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(valid_until) => {
                    break HeldUntil::Lost("the lease expired before it was renewed")
                }
                () = tokio::time::sleep(renew) => {}
                () = &mut run => break HeldUntil::LoopEnded,
            }
            if cx.leases.is_abandoned() {
                break HeldUntil::Abandoned;
            }
            let asked = Instant::now();
            let renewed = tokio::select! {
                r = cx.store.claim_lease(name, holder, ttl, Some(token)) => r,
                () = tokio::time::sleep_until(valid_until) => {
                    break HeldUntil::Lost("the renewal was not confirmed before the lease expired")
                }
            };
            match renewed {
                Ok(Some(_)) => valid_until = asked + ttl,
                Ok(None) => break HeldUntil::Lost("another replica holds the lease"),
                Err(e) if Instant::now() + renew >= valid_until => {
                    tracing::warn!(lease = name, error = %e, "cannot renew a lease");
                    break HeldUntil::Lost("the lease could not be renewed before it expires");
                }
                Err(e) => {
                    tracing::warn!(lease = name, error = %e, "cannot renew a lease; retrying")
                }
            }
        };
        held.set(0);
        match ended {
            HeldUntil::Abandoned => return,
            HeldUntil::LoopEnded if cx.leases.is_abandoned() => return,
            HeldUntil::LoopEnded => {
                if let Err(e) = cx.store.release_lease(name, holder, token).await {
                    tracing::warn!(lease = name, error = %e, "cannot release a lease");
                }
                return;
            }
            HeldUntil::Lost(why) => {
                cx.metrics.lease_lost.with_label_values(&[name]).inc();
                tracing::warn!(
                    lease = name,
                    token,
                    reason = why,
                    "lease lost; the loop stopped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ao_shared::state::sqlite::SqliteStore;
    use std::sync::atomic::AtomicU64;

    /// A holder that was not scheduled past its lease's expiry (a SIGSTOP, a stalled host)
    /// and that another replica has replaced does not run one more step of its loop when it
    /// is scheduled again: the lease's expiry is checked before the loop is polled.
    #[tokio::test]
    async fn a_holder_resumed_after_a_takeover_runs_no_further_step() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let ttl = Duration::from_millis(150);
        for round in 0..12 {
            let steps = Arc::new(AtomicU64::new(0));
            let counted = steps.clone();
            let cx = LeaseLoop {
                store: store.clone(),
                metrics: Metrics::new().unwrap(),
                ttl,
                renew: Duration::from_millis(30),
                shutdown: CancellationToken::new(),
                leases: Arc::new(Leases::default()),
            };
            let name = "test_lease";
            // Every poll of the loop is one step.
            let owner = owned(cx.clone(), name, move || {
                let counted = counted.clone();
                async move {
                    loop {
                        counted.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                    }
                }
            });
            tokio::pin!(owner);
            // Run until the lease is taken and the loop has stepped.
            let _ = tokio::time::timeout(Duration::from_millis(60), &mut owner).await;
            assert!(steps.load(Ordering::SeqCst) > 0, "round {round}: never ran");
            // Not scheduled past the expiry; another replica takes over meanwhile.
            let other = format!("other-{round}");
            let taken = loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(g) = store.claim_lease(name, &other, ttl, None).await.unwrap() {
                    break g;
                }
            };
            let before = steps.load(Ordering::SeqCst);
            // Scheduled again: the first poll must see the lease gone, not step.
            let _ = tokio::time::timeout(Duration::from_millis(5), &mut owner).await;
            assert_eq!(
                steps.load(Ordering::SeqCst),
                before,
                "round {round}: the old holder stepped after the lease went to {other}"
            );
            cx.shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_millis(100), &mut owner).await;
            store
                .release_lease(name, &other, taken.token)
                .await
                .unwrap();
        }
    }
}
