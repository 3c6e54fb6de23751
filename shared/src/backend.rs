//! Builds the queue, state store and secret resolver that `backend.kind` selects.

use crate::config::{BackendKind, Settings};
use crate::queue::sqlite::SqliteQueue;
use crate::queue::Queue;
use crate::secret::{LocalSecrets, SecretResolver};
use crate::state::sqlite::SqliteStore;
use crate::state::StateStore;
use std::sync::Arc;

/// The seams a daemon works through.
#[derive(Clone)]
pub struct Backends {
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn StateStore>,
    pub secrets: Arc<dyn SecretResolver>,
}

/// A backend that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the {kind} backend: {message}")]
pub struct BackendError {
    pub kind: &'static str,
    pub message: String,
}

impl Backends {
    /// Opens the backends `settings.backend.kind` names.
    pub async fn open(settings: &Settings) -> Result<Self, BackendError> {
        match settings.backend.kind {
            BackendKind::Local => {
                let err = |e: &dyn std::fmt::Display| BackendError {
                    kind: "local",
                    message: format!("{} ({})", e, settings.local.data_dir.display()),
                };
                let queue =
                    SqliteQueue::open(&settings.local.data_dir, settings.queue.max_receives)
                        .map_err(|e| err(&e))?;
                let store = SqliteStore::open(&settings.local.data_dir).map_err(|e| err(&e))?;
                Ok(Self {
                    queue: Arc::new(queue),
                    store: Arc::new(store),
                    secrets: Arc::new(LocalSecrets),
                })
            }
            BackendKind::Aws => Err(BackendError {
                kind: "aws",
                message: "the AWS backends are not built into this version yet".into(),
            }),
        }
    }
}
