//! The coordinator: accepts tasks (REST API, GitHub webhooks), plans them into subtasks on
//! the capability queues, applies the workers' results, and serves health, metrics, task
//! state and the dashboard.
//!
//! Shape (after tokio-rs/mini-redis's server): build one [`Coordinator`] context, bind a
//! listener, and call [`run`] with a shutdown future. The binary's `main` does only that;
//! the tests do the same in-process, on port 0.
//!
//! Layers, each importing only those below it:
//! - the edges: [`http`] (REST API, dashboard, health) and the GitHub adapter
//!   ([`webhook`], [`github`]);
//! - the core: [`orchestrator`] (the only writer of tasks, publishing every change on the
//!   [`bus`]), [`results`], [`spend`], [`recovery`], [`dead_letters`], [`monitor`],
//!   [`once`] (its run-once keys);
//! - the context ([`context`]), [`bus`], [`supervisor`], [`lease`] (which loops run on one
//!   replica only) and [`metrics`].
//!
//! Nothing in the core imports `github`: the GitHub reporter, wait list and budget booking
//! follow the bus.
#![forbid(unsafe_code)]

pub mod bus;
pub mod context;
pub mod dead_letters;
pub mod github;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod monitor;
pub mod once;
pub mod orchestrator;
#[cfg(test)]
mod proptest_webhook;
pub mod recovery;
pub mod results;
pub mod spend;
pub mod supervisor;
pub mod webhook;

pub use context::Coordinator;

use anyhow::Context as _;
use ao_shared::backend::Backends;
use ao_shared::config::Settings;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

impl Coordinator {
    /// Opens the backends that `settings` name and builds the context.
    pub async fn open(settings: Settings) -> anyhow::Result<Arc<Self>> {
        let backends = Backends::open(&settings).await?;
        let metrics = metrics::Metrics::new()?;
        Ok(Self::new(settings, backends, metrics))
    }
}

/// Serves `listener` and runs the background loops until `shutdown` completes (or the
/// context's shutdown token is cancelled); then stops accepting, tells the loops to stop,
/// and waits for them at most `coordinator.shutdown_grace_secs`.
pub async fn run(
    cx: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = Duration::from_secs(cx.settings.coordinator.shutdown_grace_secs);
    let local = listener.local_addr()?;
    spawn_core_loops(&cx);
    let gh = github::Github::new(cx.clone());
    gh.spawn_loops();
    monitor::poll(&cx).await;
    cx.set_ready(true);
    tracing::info!(address = %local, "coordinator listening");

    let stop = cx.shutdown.clone();
    let router = http::router(cx.clone(), webhook::routes(cx.clone(), &gh.inbox));
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                () = shutdown => {}
                () = stop.cancelled() => {}
            }
            stop.cancel();
        })
        .await
        .context("HTTP server failed")?;
    cx.set_ready(false);
    cx.shutdown.cancel();
    tracing::info!(grace_secs = grace.as_secs(), "draining background loops");
    if !cx.loops.drain(grace).await {
        tracing::warn!("background loops did not stop within the grace period");
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// The core's loops, under the supervisor.
fn spawn_core_loops(cx: &Arc<Coordinator>) {
    let c = cx.clone();
    cx.loops
        .spawn("result_consumer", move || results::run(c.clone()));
    let c = cx.clone();
    cx.loops
        .spawn("dead_letters", move || dead_letters::run(c.clone()));
    let c = cx.clone();
    cx.loops
        .spawn("metrics_poller", move || monitor::run(c.clone()));
    let c = cx.clone();
    cx.loops.spawn("recovery", move || {
        let c = c.clone();
        lease::owned(c.lease_loop(), lease::RECOVERY, move || {
            recovery::run(c.clone())
        })
    });
}
