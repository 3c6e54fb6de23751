//! The worker daemon: serves the queues of its capabilities, running each subtask in a
//! sandbox; and, as `worker runner`, the program that runs inside the sandbox.
#![forbid(unsafe_code)]

mod cancel_watch;
mod consumer;
mod credentials;
mod heartbeat;
mod job;
mod metrics;
mod mirror;
mod preflight;
mod profile;
mod proxy;
mod push_permit;
mod redact;
mod runner;
mod sandbox;
mod secret_files;
mod setup_cache;
mod spec;
mod spend_ledger;
mod warm;
mod worker;

use anyhow::Context;
use ao_shared::backend::Backends;
use ao_shared::config::{SandboxDriverKind, Settings};
use axum::routing::get;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;

/// The agent-orchestrator worker.
///
/// Configuration: built-in defaults, then the TOML file given with --config, then
/// environment variables AO__SECTION__KEY (e.g. AO__WORKER__CAPABILITIES=coder,tester).
/// Every key: docs/configuration.md.
#[derive(Parser)]
#[command(name = "worker", version, about, long_about)]
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
    /// Run one attempt inside a sandbox (started by a sandbox driver, not by hand).
    Runner {
        /// The run spec (JSON)…
        #[arg(
            long,
            required_unless_present = "handover",
            conflicts_with = "handover"
        )]
        spec: Option<PathBuf>,
        /// …or get it, with the attempt's secrets, from the worker's hand-over at
        /// $AO_HANDOVER_URL by presenting the sandbox's Nomad workload identity.
        #[arg(long)]
        handover: bool,
        /// Where to write the outcome (JSON): a file (the nomad driver's)…
        #[arg(
            long,
            conflicts_with = "result_fd",
            required_unless_present = "result_fd"
        )]
        result: Option<PathBuf>,
        /// …or a file descriptor inherited from the worker (the local drivers' result
        /// channel), which the runner closes to every program it starts.
        #[arg(long)]
        result_fd: Option<i32>,
        /// Where to make the working copy; the spec's directory when absent.
        #[arg(long, env = "AO_WORKSPACE_DIR")]
        workspace: Option<PathBuf>,
        /// A file descriptor inherited from the worker that a bundle delivery is written
        /// to (the bwrap driver's bundle channel), closed to every program the runner
        /// starts; without it the bundle is a file beside the spec.
        #[arg(long)]
        bundle_fd: Option<i32>,
        /// A file descriptor inherited from the worker that a setup result for the
        /// setup cache is written to (the bwrap driver's), closed to every program the
        /// runner starts; without it the result is a file in the spec's store directory.
        #[arg(long)]
        setup_fd: Option<i32>,
    },
    /// Write a sandbox's shares of the host user's inotify allowances into its user
    /// namespace (started by the bwrap driver, not by hand).
    #[command(name = "share-ucounts", hide = true)]
    ShareUcounts {
        /// A process of the sandbox.
        #[arg(long)]
        pid: i32,
        /// `setting=value` under /proc/sys/user.
        sets: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Runner {
            spec,
            handover,
            result,
            result_fd,
            workspace,
            bundle_fd,
            setup_fd,
        } => {
            let sink = match (result, result_fd) {
                (Some(path), _) => runner::ResultSink::File(path),
                (None, Some(fd)) => runner::ResultSink::Fd(fd),
                // clap requires one of them.
                (None, None) => anyhow::bail!("--result or --result-fd is required"),
            };
            let source = match (spec, handover) {
                (Some(path), _) => runner::SpecSource::File(path),
                (None, true) => runner::SpecSource::Handover,
                // clap requires one of them.
                (None, false) => anyhow::bail!("--spec or --handover is required"),
            };
            std::process::exit(runner::main(source, sink, workspace, bundle_fd, setup_fd));
        }
        // Before any thread is started: a process must be single-threaded to enter a
        // user namespace.
        Command::ShareUcounts { pid, sets } => {
            sandbox::ucounts::enter_and_write(pid, &sets)?;
            Ok(())
        }
        Command::Serve => {
            let settings =
                Settings::load(cli.config.as_deref()).context("cannot load configuration")?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(settings))
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    ao_shared::telemetry::init(&settings.log);
    let backends = Backends::open(&settings).await?;
    // Every `file:` secret, of the configuration or resolved later, is hidden from the
    // sandboxes.
    let secret_files = secret_files::SecretFiles::from_settings(&settings);
    let secrets: Arc<dyn ao_shared::secret::SecretResolver> = Arc::new(secret_files::Recording {
        inner: backends.secrets.clone(),
        files: secret_files.clone(),
    });
    let metrics = metrics::Metrics::new()?;
    let work_root = match &settings.worker.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join("agent-orchestrator-work"),
    };
    // The nomad driver's hand-over, served on the worker's listener.
    let mut sandbox_routes: Option<axum::Router> = None;
    let driver: Arc<dyn sandbox::SandboxDriver> = match settings.sandbox.driver {
        SandboxDriverKind::Process => {
            tracing::warn!(
                "sandbox.driver = \"process\": agents run as plain child processes \
                WITHOUT ANY ISOLATION, with this worker's user and file access. \
                Use it only on a machine you do not mind the agent changing."
            );
            Arc::new(sandbox::process::ProcessDriver::new(work_root.clone())?)
        }
        SandboxDriverKind::Bwrap => Arc::new(
            sandbox::bwrap::BwrapDriver::new(work_root.clone(), &settings, secret_files.clone())
                .context("cannot use the bwrap sandbox driver")?,
        ),
        SandboxDriverKind::Nomad => {
            let driver = sandbox::nomad::NomadDriver::new(&settings, secrets.clone())
                .context("cannot use the nomad sandbox driver")?;
            sandbox_routes = Some(driver.handover_routes());
            Arc::new(driver)
        }
    };
    let listen = settings.worker.listen.clone();
    let profiles = profile::Profiles::load(&settings.agent).context("bad agent profile")?;
    preflight::check(&settings, &profiles, nix::unistd::geteuid().as_raw())
        .context("this worker cannot serve its configuration")?;
    if settings.agent.kind == ao_shared::config::AgentKind::Claude
        && settings.agent.api_key.is_none()
    {
        tracing::warn!(
            "agent.api_key is not set: Claude Code gets no model key unless sandbox.env_pass \
             names one (e.g. AO__AGENT__API_KEY=env:ANTHROPIC_API_KEY)"
        );
    }
    let warm = warm::Warm::new(
        &settings,
        settings.sandbox.driver != SandboxDriverKind::Nomad,
    );
    let spend_ledger = spend_ledger::SpendLedger::open(&work_root)
        .with_context(|| format!("cannot make the spend ledger under {}", work_root.display()))?;
    let worker = Arc::new(worker::Worker {
        id: settings.worker_id(),
        spend_ledger,
        settings,
        queue: backends.queue,
        driver,
        metrics: metrics.clone(),
        store: backends.store,
        secrets,
        profiles,
        warm,
    });
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (worker.listen)"))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let http = axum::Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }
            }),
        );
    let http = match sandbox_routes {
        Some(routes) => http.merge(routes),
        None => http,
    };
    let http_stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, http)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
    });
    tracing::info!(worker_id = %worker.id, address = %listen,
        capabilities = ?worker.settings.worker.capabilities,
        concurrency = worker.settings.worker.concurrency,
        sandbox = worker.driver.name(), agent = %worker.settings.agent.command, "worker started");
    // What runs of workers that died before reporting had spent.
    tokio::spawn({
        let worker = worker.clone();
        async move { spend_ledger::replay(&worker, &work_root).await }
    });
    let consumer = tokio::spawn(consumer::run(worker.clone(), shutdown.clone()));
    ao_shared::shutdown::signal().await;
    shutdown.cancel();
    consumer.await.context("consumer failed")?;
    let _ = server.await;
    tracing::info!("worker stopped");
    Ok(())
}
