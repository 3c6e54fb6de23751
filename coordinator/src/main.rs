//! The coordinator daemon's entry point: parses the command line, loads the settings, and
//! runs [`ao_coordinator::run`] until SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use anyhow::Context;
use ao_coordinator::Coordinator;
use ao_shared::config::Settings;
use ao_shared::names::ResourceNames;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The agent-orchestrator coordinator.
///
/// Configuration: built-in defaults, then the TOML file given with --config, then
/// environment variables AO__SECTION__KEY (e.g. AO__API__TOKEN=env:AO_API_TOKEN,
/// AO__BACKEND__KIND=aws). Every key: docs/configuration.md.
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
    let listen = settings.server.listen.clone();
    let cx = Coordinator::open(settings).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    ao_coordinator::run(cx, listener, ao_shared::shutdown::signal()).await
}
