//! The GitHub App: the API client, the consumer of webhook deliveries (labels and
//! commands → tasks), the reporter (task state → pull request, progress comment, labels,
//! reviews), and the sweep for missed deliveries.
//!
//! Shape: the webhook route only verifies, parses and queues ([`crate::webhook`]); one
//! consumer handles deliveries one at a time, each in a tracing span ([`handle`]); every
//! change of a GitHub-sourced task wakes the reporter ([`reporter`]), which brings GitHub
//! in line with the stored task and retries with backoff until it has. GitHub is reached
//! over HTTP only (no trait): tests point `github.api_url` at a fake server.

pub mod api;
pub mod client;
pub mod handle;
pub mod limits;
pub mod progress;
pub mod reconcile;
pub mod repo_config;
pub mod reporter;

use crate::metrics::Metrics;
use crate::webhook::event::RepoName;
use crate::webhook::Inbox;
use ao_shared::config::Settings;
use ao_shared::secret::SecretResolver;
use ao_shared::task::{Task, TaskSource};
use std::sync::Arc;

/// Everything GitHub-related the coordinator holds.
pub struct Github {
    pub client: Arc<client::Client>,
    pub inbox: Inbox,
    pub reporter: reporter::Handle,
    /// Held while an issue's tasks are looked up and a task is created, so that the
    /// webhook consumer and the missed-delivery sweep never both start one.
    pub start_lock: tokio::sync::Mutex<()>,
    /// Start requests waiting for a free slot.
    pub waiting: limits::WaitList,
    /// Told when a GitHub task ended, so that waiting requests are looked at.
    pub slots_changed: tokio::sync::Notify,
    /// Asks the missed-delivery sweep to run now (a new installation or repository).
    pub sweep_now: tokio::sync::Notify,
}

impl Github {
    pub fn new(settings: &Settings, secrets: Arc<dyn SecretResolver>, metrics: Metrics) -> Self {
        Self {
            client: Arc::new(client::Client::new(&settings.github, secrets, metrics)),
            inbox: Inbox::default(),
            reporter: reporter::Handle::default(),
            start_lock: tokio::sync::Mutex::new(()),
            waiting: limits::WaitList::default(),
            slots_changed: tokio::sync::Notify::new(),
            sweep_now: tokio::sync::Notify::new(),
        }
    }

    /// Wakes the reporter for a task that came from GitHub.
    pub fn task_changed(&self, task: &Task) {
        if matches!(task.source, TaskSource::Github { .. }) {
            self.reporter.notify(task.id);
            if task.status.is_terminal() {
                self.slots_changed.notify_one();
            }
        }
    }
}

/// The clone URL of a repository: `<github.git_url>/<owner>/<name>.git`.
pub fn clone_url(settings: &Settings, repo: &RepoName) -> String {
    format!(
        "{}/{}/{}.git",
        settings.github.git_url.trim_end_matches('/'),
        repo.owner,
        repo.name
    )
}

/// The GitHub side of a task: installation, repository, issue.
pub fn source(task: &Task) -> Option<(u64, RepoName, u64)> {
    match &task.source {
        TaskSource::Github {
            installation_id,
            repo,
            issue,
            ..
        } => Some((*installation_id, RepoName::parse(repo)?, *issue)),
        TaskSource::Api => None,
    }
}
