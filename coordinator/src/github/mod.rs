//! The GitHub App: the API client, the consumer of webhook deliveries (labels and
//! commands → tasks), the reporter (task state → pull request, progress comment, labels,
//! reviews), and the sweep for missed deliveries.
//!
//! Shape: the webhook route only verifies, parses and stores ([`crate::webhook`]); one
//! consumer per replica handles stored deliveries one at a time, each in a tracing span
//! ([`handle`]); every
//! change of a GitHub-sourced task, published on the core's task-change bus
//! ([`crate::bus`]), wakes the reporter ([`reporter`]), which brings GitHub
//! in line with the stored task and retries with backoff until it has. GitHub is reached
//! over HTTP only (no trait): tests point `github.api_url` at a fake server.

pub mod api;
pub mod checks;
pub mod client;
pub mod handle;
pub mod limits;
pub mod once;
pub mod progress;
pub mod reconcile;
pub mod repo_config;
pub mod reporter;
pub mod review;
pub mod untrusted;

use crate::context::Coordinator;
use crate::webhook::event::RepoName;
use crate::webhook::Inbox;
use ao_shared::config::Settings;
use ao_shared::task::{Task, TaskSource};
use std::ops::Deref;
use std::sync::Arc;

/// The GitHub adapter: the coordinator's context plus everything GitHub-related it holds.
/// It reads the core's parts through `Deref` (`gh.store`, `gh.settings`), and hands
/// itself to the core's functions as a `&Coordinator`.
pub struct Github {
    core: Arc<Coordinator>,
    pub client: Arc<client::Client>,
    pub inbox: Inbox,
    pub reporter: reporter::Handle,
    /// Held while an issue's tasks are looked up and a task is created, so that the
    /// webhook consumer and the missed-delivery sweep never both start one.
    pub start_lock: tokio::sync::Mutex<()>,
    /// Start requests waiting for a free slot.
    pub waiting: limits::WaitList,
    /// Asks the missed-delivery sweep to run now (a new installation or repository).
    pub sweep_now: tokio::sync::Notify,
}

impl Deref for Github {
    type Target = Coordinator;

    fn deref(&self) -> &Coordinator {
        &self.core
    }
}

impl Github {
    pub fn new(core: Arc<Coordinator>) -> Arc<Self> {
        let client = client::Client::new(
            &core.settings.github,
            core.secrets.clone(),
            core.metrics.clone(),
        );
        Arc::new(Self {
            core,
            client: Arc::new(client),
            inbox: Inbox::default(),
            reporter: reporter::Handle::default(),
            start_lock: tokio::sync::Mutex::new(()),
            waiting: limits::WaitList::default(),
            sweep_now: tokio::sync::Notify::new(),
        })
    }

    /// Starts the GitHub loops under the coordinator's supervisor: the webhook consumer,
    /// the reporter, the wait list, budget booking and the missed-delivery sweep. The
    /// loops that follow the task-change bus subscribe here, before they first run.
    pub fn spawn_loops(self: &Arc<Self>) {
        let gh = self.clone();
        self.loops
            .spawn("webhook_consumer", move || handle::run(gh.clone()));
        let gh = self.clone();
        self.loops.spawn("github_reporter", move || {
            reporter::run(gh.clone(), gh.bus.subscribe())
        });
        let gh = self.clone();
        self.loops.spawn("github_reconcile", move || {
            let gh = gh.clone();
            crate::lease::owned(
                gh.core.lease_loop(),
                crate::lease::GITHUB_RECONCILE,
                move || reconcile::run(gh.clone()),
            )
        });
        let gh = self.clone();
        self.loops.spawn("github_wait_list", move || {
            handle::start::run_wait_list(gh.clone(), gh.bus.subscribe())
        });
        let gh = self.clone();
        self.loops.spawn("github_budget", move || {
            limits::book_spend(gh.clone(), gh.bus.subscribe())
        });
    }
}

/// Whether a task came from GitHub.
pub fn is_github(task: &Task) -> bool {
    matches!(task.source, TaskSource::Github { .. })
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
