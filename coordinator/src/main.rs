//! The coordinator daemon: accepts tasks (REST API, later webhooks), plans them into
//! subtasks on the capability queues, applies the workers' results, and serves health,
//! metrics and task state.
#![forbid(unsafe_code)]

mod app;
mod dead_letters;
mod github;
mod http;
mod metrics;
mod monitor;
mod orchestrator;
#[cfg(test)]
mod proptest_webhook;
mod recovery;
mod results;
mod webhook;

use anyhow::Context;
use ao_shared::backend::Backends;
use ao_shared::config::Settings;
use ao_shared::names::ResourceNames;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// The agent-orchestrator coordinator.
///
/// Configuration: built-in defaults, then the TOML file given with --config, then
/// environment variables AO__SECTION__KEY (e.g. AO__API__TOKEN=env:AO_API_TOKEN,
/// AO__BACKEND__KIND=aws). See the README for every key.
#[derive(Parser)]
#[command(name = "coordinator", version, about, long_about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short, env = "AO_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Serve,
    /// Print the AWS queue and table names derived from the configuration, as JSON.
    ResourceNames,
    /// Load and check the configuration, print it (secrets appear only as references).
    CheckConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref()).context("cannot load configuration")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::ResourceNames => {
            let names = ResourceNames::derive(&settings.aws.queue_prefix, &settings.aws.table);
            println!("{}", serde_json::to_string_pretty(&names)?);
            Ok(())
        }
        Command::CheckConfig => {
            println!("{}", serde_json::to_string_pretty(&settings)?);
            Ok(())
        }
        Command::Serve => serve(settings).await,
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    ao_shared::telemetry::init(&settings.log);
    if settings.api.token.is_none() {
        tracing::warn!(
            "api.token is not set: the REST API refuses every call. \
            Set it to a secret reference, e.g. AO__API__TOKEN=env:AO_API_TOKEN"
        );
    }
    if settings.github.webhook_secret.is_none() {
        tracing::warn!("github.webhook_secret is not set: GitHub webhooks are refused (401)");
    }
    let backends = Backends::open(&settings).await?;
    let metrics = metrics::Metrics::new()?;
    let listen = settings.server.listen.clone();
    let grace = Duration::from_secs(settings.coordinator.shutdown_grace_secs);
    let app = app::App::new(settings, backends, metrics);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    let local = listener.local_addr()?;

    let loops = vec![
        tokio::spawn(results::run(app.clone())),
        tokio::spawn(dead_letters::run(app.clone())),
        tokio::spawn(monitor::run(app.clone())),
        tokio::spawn(github::handle::run(app.clone())),
        tokio::spawn(github::reporter::run(app.clone())),
        tokio::spawn(github::reconcile::run(app.clone())),
        tokio::spawn(github::limits::run(app.clone())),
        tokio::spawn(recovery::run(app.clone())),
    ];
    monitor::poll(&app).await;
    app.set_ready(true);
    tracing::info!(address = %local, "coordinator listening");

    let shutdown = app.shutdown.clone();
    let server =
        axum::serve(listener, http::router(app.clone())).with_graceful_shutdown(async move {
            ao_shared::shutdown::signal().await;
            shutdown.cancel();
        });
    server.await.context("HTTP server failed")?;
    app.set_ready(false);
    app.shutdown.cancel();
    tracing::info!(grace_secs = grace.as_secs(), "draining background loops");
    let drain = futures::future::join_all(loops);
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!("background loops did not stop within the grace period");
    }
    tracing::info!("coordinator stopped");
    Ok(())
}
