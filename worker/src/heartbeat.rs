//! Keeps a received message hidden while its subtask runs, by extending its visibility
//! every `queue.heartbeat_secs`, and always holding the newest receipt.

use crate::metrics::Metrics;
use ao_shared::queue::{Queue, Receipt};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A running heartbeat; stop it with [`Heartbeat::stop`] to get the newest receipt.
pub struct Heartbeat {
    receipt: Arc<Mutex<Receipt>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub fn start(
        queue: Arc<dyn Queue>,
        receipt: Receipt,
        every: Duration,
        visibility: Duration,
        metrics: Metrics,
    ) -> Self {
        let receipt = Arc::new(Mutex::new(receipt));
        let stop = CancellationToken::new();
        let task = {
            let (receipt, stop) = (receipt.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.cancelled() => return,
                    }
                    let current = receipt.lock().clone();
                    match queue.extend(&current, visibility).await {
                        Ok(newer) => {
                            *receipt.lock() = newer;
                            metrics.heartbeats.with_label_values(&["ok"]).inc();
                        }
                        Err(e) => {
                            metrics.heartbeats.with_label_values(&["error"]).inc();
                            tracing::warn!(error = %e, "heartbeat failed");
                        }
                    }
                }
            })
        };
        Self {
            receipt,
            stop,
            task,
        }
    }

    /// Stops extending and returns the newest receipt.
    pub async fn stop(self) -> Receipt {
        self.stop.cancel();
        let _ = self.task.await;
        let r = self.receipt.lock().clone();
        r
    }
}
