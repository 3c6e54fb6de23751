//! The coordinator in-process: the same `ao_coordinator::run` the binary calls, started
//! on a loopback listener inside the test against a temporary SQLite data directory,
//! with the settings a [`crate::Cluster`] would give the process. It starts in
//! milliseconds, its context ([`Coordinator`]) is at hand for assertions and fault
//! injection, and it stops cleanly.
//!
//! Secret references of the form `env:NAME` whose value is among the settings are
//! written to files in the test's directory and referred to as `file:…`, so that no test
//! changes the process environment (tests run in parallel threads).

use anyhow::{bail, Context, Result};
use ao_coordinator::Coordinator;
use ao_shared::backend::Backends;
use ao_shared::config::Settings;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A coordinator running in this test process.
pub struct InProcess {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    /// The running coordinator's context.
    pub cx: Arc<Coordinator>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<Result<()>>>,
}

/// Starts logging to the test output once per test process (`RUST_LOG`, default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// `env` with `env:NAME` secret references resolved from `env` itself into files under
/// `dir` (mode 0600), as `file:` references.
fn secrets_as_files(dir: &Path, env: &[(String, String)]) -> Result<Vec<(String, String)>> {
    use std::os::unix::fs::PermissionsExt;
    let secrets = dir.join("inproc-secrets");
    std::fs::create_dir_all(&secrets)?;
    let mut out = Vec::new();
    for (k, v) in env {
        let value = match v.strip_prefix("env:") {
            Some(name) if k.starts_with("AO__") => {
                match env.iter().rev().find(|(n, _)| n == name) {
                    Some((_, secret)) => {
                        let path = secrets.join(name);
                        std::fs::write(&path, secret)?;
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                        format!("file:{}", path.display())
                    }
                    None => v.clone(),
                }
            }
            _ => v.clone(),
        };
        out.push((k.clone(), value));
    }
    Ok(out)
}

/// The backends `settings` name. On AWS, the SDK gets the static credentials that
/// `env` gives the processes (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`): this
/// process's own environment is not the cluster's.
pub async fn open_backends(settings: &Settings, env: &[(String, String)]) -> Result<Backends> {
    if settings.backend.kind != ao_shared::config::BackendKind::Aws {
        return Ok(Backends::open(settings).await?);
    }
    let var = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            id, secret, None, None, "cluster",
        ));
    }
    if let Some(region) = &settings.aws.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &settings.aws.endpoint_url {
        loader = loader.endpoint_url(url.clone());
    }
    let clients = ao_shared::aws::AwsClients::new(&loader.load().await, None);
    Ok(Backends::open_aws(settings, &clients).await?)
}

impl InProcess {
    /// Starts a coordinator with the settings `env` (`AO__…` variables and the values of
    /// the `env:` secrets they name) listening on `listen` (`127.0.0.1:0` for any port),
    /// and waits until `/readyz` answers 200.
    pub async fn start(dir: &Path, env: &[(String, String)], listen: &str) -> Result<Self> {
        Self::start_with(dir, env, listen, |b| b).await
    }

    /// Like [`InProcess::start`], with the backends passed through `wrap` before the
    /// coordinator gets them (to inject faults into the store or the queue).
    pub async fn start_with(
        dir: &Path,
        env: &[(String, String)],
        listen: &str,
        wrap: impl FnOnce(Backends) -> Backends,
    ) -> Result<Self> {
        init_logging();
        let env = secrets_as_files(dir, env)?;
        let settings = Settings::load_from(None, env.clone()).context("settings")?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        let backends = wrap(open_backends(&settings, &env).await?);
        let metrics = ao_coordinator::metrics::Metrics::new()?;
        let cx = Coordinator::new(settings, backends, metrics);
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(ao_coordinator::run(cx.clone(), listener, async move {
            let _ = stopped.await;
        }));
        let me = Self {
            url,
            cx,
            stop: Some(stop),
            served: Some(served),
        };
        me.wait_ready(Duration::from_secs(30)).await?;
        Ok(me)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.url)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("in-process coordinator not ready within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops it as SIGKILL would as far as the other replicas can tell: its leases are
    /// neither renewed nor released (they stay in the store until they expire); then its
    /// loops and server stop and it is waited for.
    pub async fn kill(self) -> Result<()> {
        self.cx.leases.abandon();
        self.stop().await
    }

    /// Stops it as SIGTERM would and waits until it has stopped.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.served.take() {
            Some(served) => served.await.context("coordinator task")?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Stops serving and the loops; the runtime reaps the rest.
        self.cx.shutdown.cancel();
    }
}
