//! The lease on a received message and the heartbeat that keeps it.
//!
//! A worker holds a subtask message for as long as the message stays hidden: its lease.
//! The heartbeat extends the visibility every `queue.heartbeat_secs` and always holds the
//! newest receipt. The lease is **lost** when an extension is refused because the receipt is
//! no longer valid (the visibility ran out and another worker received the message, or it
//! was deleted), or when no extension succeeded for a whole visibility timeout (a network
//! stall, a denied `ChangeMessageVisibility`, a worker paused with SIGSTOP): from then on
//! another worker may hold the same attempt. A lost lease cancels the run
//! ([`Lease::lost`]), and nothing the run did is reported.
//!
//! [`Lease::confirm`] is the fence: one fresh, successful extension right now. The runner
//! asks for it before it pushes (see [`crate::push_permit`]) and the worker before it
//! reports, so a run whose worker was paused past its lease is refused once it resumes.

use crate::metrics::Metrics;
use ao_shared::queue::{Queue, QueueError, Receipt};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Pause between tries of a confirmation whose extension failed for a transient reason.
const CONFIRM_RETRY: Duration = Duration::from_millis(500);
/// A lease is taken as lost this long before its visibility would run out, for the time
/// a request takes and for clock differences between the worker and the queue.
const LEASE_SAFETY: Duration = Duration::from_secs(2);

/// Why a lease cannot be confirmed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// The message is someone else's now, or may be: the run must not push or report.
    #[error("lease lost: {0}")]
    Lost(String),
}

/// A handle on the lease of one received message; cheap to clone.
#[derive(Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Arc<dyn Queue>,
    /// The newest receipt; held across an extension so that extensions never overlap.
    receipt: tokio::sync::Mutex<Receipt>,
    visibility: Duration,
    /// When the last extension (or the receive) succeeded.
    last_ok: Mutex<Instant>,
    lost: CancellationToken,
    why: Mutex<Option<String>>,
    metrics: Metrics,
}

impl Lease {
    /// The lease of a message received just now with `receipt`, hidden for `visibility`.
    pub fn new(
        queue: Arc<dyn Queue>,
        receipt: Receipt,
        visibility: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue,
                receipt: tokio::sync::Mutex::new(receipt),
                visibility,
                last_ok: Mutex::new(Instant::now()),
                lost: CancellationToken::new(),
                why: Mutex::new(None),
                metrics,
            }),
        }
    }

    /// Fires when the lease is lost.
    pub fn lost(&self) -> CancellationToken {
        self.inner.lost.clone()
    }

    pub fn is_lost(&self) -> bool {
        self.inner.lost.is_cancelled()
    }

    /// Why the lease was lost, once it was.
    pub fn why(&self) -> Option<String> {
        self.inner.why.lock().clone()
    }

    /// The newest receipt.
    pub async fn receipt(&self) -> Receipt {
        self.inner.receipt.lock().await.clone()
    }

    fn lose(&self, why: String) -> LeaseError {
        self.inner.why.lock().get_or_insert(why.clone());
        self.inner.lost.cancel();
        LeaseError::Lost(why)
    }

    /// Whether the last successful extension still covers now.
    fn still_covered(&self) -> bool {
        self.inner.last_ok.lock().elapsed() + LEASE_SAFETY < self.inner.visibility
    }

    /// One extension. `Ok(false)`: it failed for a reason that may pass while the lease
    /// still holds; `Err`: the lease is lost.
    async fn renew(&self) -> Result<bool, LeaseError> {
        if let Some(why) = self.why() {
            return Err(LeaseError::Lost(why));
        }
        let mut receipt = self.inner.receipt.lock().await;
        // Measured before the call: the new visibility counts from no later than this.
        let asked = Instant::now();
        match self
            .inner
            .queue
            .extend(&receipt, self.inner.visibility)
            .await
        {
            Ok(newer) => {
                *receipt = newer;
                *self.inner.last_ok.lock() = asked;
                self.inner
                    .metrics
                    .heartbeats
                    .with_label_values(&["ok"])
                    .inc();
                Ok(true)
            }
            Err(e) => {
                self.inner
                    .metrics
                    .heartbeats
                    .with_label_values(&["error"])
                    .inc();
                if matches!(e, QueueError::ReceiptExpired) {
                    return Err(self.lose(e.to_string()));
                }
                if !self.still_covered() {
                    return Err(self.lose(format!(
                        "no visibility extension succeeded for {} s (last error: {e})",
                        self.inner.visibility.as_secs()
                    )));
                }
                tracing::warn!(error = %e, "heartbeat failed; the lease still holds");
                Ok(false)
            }
        }
    }

    /// Confirms the lease with a fresh, successful extension: `Ok` means that at this
    /// moment no other worker holds the message, and none can for a visibility timeout.
    /// Transient failures are retried while the last extension still covers the lease.
    pub async fn confirm(&self) -> Result<(), LeaseError> {
        loop {
            if self.renew().await? {
                return Ok(());
            }
            tokio::time::sleep(CONFIRM_RETRY).await;
        }
    }
}

/// A running heartbeat; stop it with [`Heartbeat::stop`] to get the newest receipt.
pub struct Heartbeat {
    lease: Lease,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    /// Extends `lease` every `every` until stopped or until the lease is lost.
    pub fn start(lease: Lease, every: Duration) -> Self {
        let stop = CancellationToken::new();
        let task = {
            let (lease, stop) = (lease.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.cancelled() => return,
                    }
                    if let Err(e) = lease.renew().await {
                        tracing::warn!(error = %e,
                            "lease lost: the run is stopped and nothing of it is reported");
                        return;
                    }
                }
            })
        };
        Self { lease, stop, task }
    }

    /// Stops extending and returns the newest receipt.
    pub async fn stop(self) -> Receipt {
        self.stop.cancel();
        let _ = self.task.await;
        self.lease.receipt().await
    }
}
