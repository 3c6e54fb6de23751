//! The `nomad` driver, for production: each attempt runs as a dispatched instance of the
//! capability's parameterized batch job `<nomad.job_prefix>-sandbox-<capability>`
//! (`nomad/sandbox.nomad.hcl`), followed over Nomad's HTTP API.
//!
//! Why dispatch rather than register a job per subtask: the sandbox's definition (image,
//! user, hardening, resources) is written once, reviewed and registered by the operator;
//! a worker can only fill in the payload and the declared meta, so it needs the
//! `dispatch-job` capability and not `submit-job` (a compromised worker cannot run
//! arbitrary jobs). Dispatch also
//! gives an idempotency token and Nomad's 16 KiB payload file for free, and keeps the
//! job list readable (children under their parent).
//!
//! One attempt:
//! 1. The dispatch carries nothing secret and no run spec: no payload, meta `task_id`,
//!    `subtask_id`, `attempt` and `handover_url`. The runner gets the whole run spec and
//!    the attempt's secrets from this worker by presenting the sandbox's Nomad workload
//!    identity ([`handover`]), so a per-attempt secret (a repository-scoped git token)
//!    never reaches Nomad, and the prompt's length is not bound by the 16 KiB payload
//!    limit. The idempotency token `<subtask_id>-<attempt>` makes a redelivered
//!    message (its worker died) find the instance already dispatched for that attempt
//!    instead of starting a second one. Such an instance is followed but never handed
//!    over to: it takes its spec from the worker that dispatched it.
//! 2. The dispatch evaluation and then the job's allocations are followed with blocking
//!    queries (`index` + `wait`), never a tight poll. When the evaluation reports
//!    `FailedTGAllocs` (no capacity, or no node fits), Nomad keeps a blocked evaluation
//!    and places the allocation when capacity frees; the driver waits up to
//!    `nomad.placement_timeout_secs`, then stops and purges the instance and reports
//!    "not placed" ([`super::not_placed`]), which the worker turns into a fresh copy of
//!    the same message on the queue: no attempt is used up.
//! 3. Once the task has started, its stdout (the runner's JSON event lines) is streamed
//!    and forwarded as events ([`logs`]). The allocation is followed until it ends, or
//!    until `agent.timeout_secs + nomad.timeout_margin_secs` from placement (timeout), or
//!    until the worker's cancel token fires (cancelled); in both latter cases the job is
//!    stopped and purged.
//! 4. The outcome: the runner's `result.json` in the allocation directory
//!    (`alloc/result.json`, read through `/v1/client/fs/cat`). Without one: an allocation
//!    lost with its node is a retryable infrastructure failure; a task that could not
//!    start (driver, setup, template failures) likewise; a task that ran and died without
//!    a result is an agent error (out of memory said so).
//! 5. Nomad unreachable or failing (connection errors, 5xx, 429) is retried with
//!    exponential backoff for up to `nomad.unreachable_secs`, then the attempt ends as a
//!    retryable infrastructure failure.
//!
//! The network: for a capability in the allow-list mode (the default, see
//! [`super::network`]) the driver starts the attempt's proxy (`crate::proxy`) on a TCP
//! port of this worker (`nomad.proxy_listen`, by default the host of the hand-over
//! address, an ephemeral port) before the dispatch, and hands its address and a random
//! per-attempt token to the runner with the spec ([`handover::ProxyGrant`]). The model key
//! (`agent.api_key`) stays in the worker: the proxy adds it to the agent's model calls,
//! meters them (the run's cost and tokens are the proxy's, a call past the budget is
//! refused and the run is `budget_exceeded`), and refuses destinations off the run's
//! allow-list (reported as events and in the outcome's `network_refused`). The proxy
//! stops when the attempt ends, and its token with it. The allocation's direct egress
//! must be closed by the cluster (docs/sandbox-network.md, "Nomad"): the job cannot.
//! `sandbox.network_open` hands the model key over instead, as before the proxy;
//! `sandbox.network_off` neither.
//!
//! Nomad's own restarts and reschedules are off in the job (`attempts = 0`): retries are
//! the queue's alone, one dispatch per attempt. The driver checks the registered jobs at
//! start and warns when they differ.

mod api;
mod client;
pub mod handover;
mod logs;

use super::network::{self, NetworkMode};
use super::process::infra;
use super::SandboxDriver;
use crate::proxy::RunProxy;
use crate::spec::{RunSpec, RunnerEvent};
use ao_shared::capability::Capability;
use ao_shared::config::{NomadSettings, Settings};
use ao_shared::secret::SecretResolver;
use ao_shared::task::{Outcome, OutcomeKind};
use api::{Allocation, DispatchRequest};
use async_trait::async_trait;
pub use client::NomadError;
use client::{Indexed, NomadClient};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The task of the sandbox job that runs the runner (`task "runner"`).
pub const TASK: &str = "runner";
/// Where the runner leaves its outcome, relative to the allocation directory
/// (`${NOMAD_ALLOC_DIR}/result.json` in the job).
pub const RESULT_PATH: &str = "alloc/result.json";
/// First pause before a failed request is retried; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long the rest of the log may take to arrive once the allocation has ended.
const LOG_DRAIN: Duration = Duration::from_secs(30);
/// Bytes of the task's stderr quoted when it died without a result.
const STDERR_TAIL: u64 = 2048;

/// The Nomad sandbox driver.
pub struct NomadDriver {
    client: NomadClient,
    settings: NomadSettings,
    /// The attempts whose sandboxes may claim their run spec.
    handovers: Arc<handover::Handovers>,
    /// The hand-over endpoint as the allocations reach it.
    handover_url: String,
    /// Where the attempts' proxies listen, and the host the allocations reach them by.
    proxy_bind: String,
    proxy_host: String,
    /// The whole configuration, for the proxy's options.
    all: Arc<Settings>,
}

/// How following an instance ended.
enum Ended {
    /// The allocation ended by itself: this is the outcome.
    Done(Outcome),
    /// The instance must be stopped and purged; then this is the outcome.
    Stop(Outcome),
}

impl NomadDriver {
    /// Builds the client (TLS, token reference); checks the sandbox jobs of
    /// `capabilities` in the background.
    pub fn new(settings: &Settings, secrets: Arc<dyn SecretResolver>) -> Result<Self, NomadError> {
        let client = NomadClient::new(&settings.nomad, secrets)?;
        let handover_url = handover_url(settings)?;
        network::check_allow_hosts(&settings.sandbox).map_err(NomadError::Config)?;
        let (proxy_bind, proxy_host) = proxy_address(settings, &handover_url)?;
        let driver = Self {
            handovers: handover::Handovers::new(client.clone(), settings.nomad.namespace.clone()),
            client,
            settings: settings.nomad.clone(),
            handover_url,
            proxy_bind,
            proxy_host,
            all: Arc::new(settings.clone()),
        };
        let jobs: Vec<String> = settings
            .worker
            .capabilities
            .iter()
            .map(|c| driver.job_id(*c))
            .collect();
        let client = driver.client.clone();
        tokio::spawn(async move {
            for job in jobs {
                check_job(&client, &job).await;
            }
        });
        Ok(driver)
    }

    /// The hand-over endpoint, to serve on the worker's HTTP listener.
    pub fn handover_routes(&self) -> axum::Router {
        self.handovers.routes()
    }

    /// The parameterized job of a capability.
    pub fn job_id(&self, capability: Capability) -> String {
        format!("{}-sandbox-{}", self.settings.job_prefix, capability)
    }

    /// Runs `op` until it succeeds, fails for good, or Nomad has been unreachable for
    /// `nomad.unreachable_secs` (exponential backoff in between).
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, NomadError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, NomadError>>,
    {
        let deadline = Instant::now() + Duration::from_secs(self.settings.unreachable_secs);
        let mut delay = BACKOFF_START;
        loop {
            match op().await {
                Err(e) if e.is_transient() && Instant::now() + delay < deadline => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                        "Nomad {what} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
                other => return other,
            }
        }
    }

    /// A blocking query's next index: Nomad never answers 0, but a broken proxy could;
    /// then the next query waits a little instead of spinning.
    async fn next_index<T>(r: &Indexed<T>) -> u64 {
        if r.index == 0 {
            tokio::time::sleep(BACKOFF_START).await;
        }
        r.index
    }

    /// Follows a dispatched instance from its evaluation to its end.
    async fn follow(
        &self,
        spec: &RunSpec,
        job: &str,
        eval_id: &str,
        events: &mpsc::Sender<RunnerEvent>,
    ) -> Ended {
        let wait = self.client.wait;
        let placement = Duration::from_secs(self.settings.placement_timeout_secs);
        let placement_deadline = Instant::now() + placement;
        let mut why_waiting: Option<String> = None;

        // The scheduler's verdict on the dispatch. (No evaluation: Nomad returned the
        // instance already dispatched for this attempt.)
        if !eval_id.is_empty() {
            let mut index = 0;
            loop {
                let r = match self
                    .retry("evaluation query", || {
                        self.client.evaluation(eval_id, index, wait)
                    })
                    .await
                {
                    Ok(r) => r,
                    Err(e) => return failure("following the evaluation", e),
                };
                let eval = &r.value;
                if let Some(why) = eval.placement_failures() {
                    if why_waiting.is_none() {
                        let _ = events
                            .send(log_event(format!(
                                "waiting for Nomad capacity (up to {} s): {why}",
                                placement.as_secs()
                            )))
                            .await;
                        tracing::info!(job, reason = %why, "sandbox waiting for capacity");
                    }
                    why_waiting = Some(why);
                }
                if eval.status == "failed" {
                    return Ended::Stop(infra(
                        format!(
                            "Nomad could not evaluate the sandbox job: {}",
                            eval.status_description
                        ),
                        true,
                    ));
                }
                if eval.is_done() {
                    break;
                }
                if Instant::now() >= placement_deadline {
                    return Ended::Stop(not_placed(placement, why_waiting.as_deref()));
                }
                index = Self::next_index(&r).await;
            }
        }

        // The allocation (at once, or when a blocked evaluation is placed).
        let mut index = 0;
        let alloc_id = loop {
            let remaining = placement_deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ended::Stop(not_placed(placement, why_waiting.as_deref()));
            }
            let r = match self
                .retry("allocations query", || {
                    self.client.job_allocations(job, index, wait.min(remaining))
                })
                .await
            {
                Ok(r) => r,
                Err(e) => return failure("waiting for the allocation", e),
            };
            if let Some(a) = r.value.iter().max_by_key(|a| a.create_index) {
                break a.id.clone();
            }
            index = Self::next_index(&r).await;
        };
        tracing::info!(job, alloc = %alloc_id, "sandbox placed");

        // The allocation until it ends, with the runner's output forwarded.
        let limit =
            Duration::from_secs(spec.agent.timeout_secs + self.settings.timeout_margin_secs);
        let deadline = Instant::now() + limit;
        let (done_tx, done_rx) = watch::channel(false);
        let mut log_task: Option<AbortOnDrop> = None;
        let start_logs = || {
            AbortOnDrop(tokio::spawn(logs::follow(
                self.client.clone(),
                alloc_id.clone(),
                TASK,
                events.clone(),
                done_rx.clone(),
            )))
        };
        let mut index = 0;
        let alloc = loop {
            let r = tokio::select! {
                r = self.retry("allocation query", || self.client.allocation(&alloc_id, index, wait)) => r,
                _ = tokio::time::sleep_until(deadline) => {
                    return Ended::Stop(Outcome::failed(
                        OutcomeKind::Timeout,
                        format!("the run exceeded {} s", limit.as_secs()),
                        false,
                    ));
                }
            };
            let r = match r {
                Ok(r) => r,
                Err(e) => return failure("following the allocation", e),
            };
            if log_task.is_none() && r.value.task(TASK).is_some_and(|t| t.has_started()) {
                log_task = Some(start_logs());
            }
            if r.value.is_terminal() {
                break r.value;
            }
            index = Self::next_index(&r).await;
        };
        let _ = done_tx.send(true);
        if let Some(mut handle) = log_task {
            if tokio::time::timeout(LOG_DRAIN, &mut handle.0)
                .await
                .is_err()
            {
                tracing::warn!(alloc = %alloc_id, "the sandbox's log did not end in time");
            }
        }
        Ended::Done(self.outcome(&alloc).await)
    }

    /// The outcome of an allocation that ended by itself.
    async fn outcome(&self, alloc: &Allocation) -> Outcome {
        if alloc.client_status == "lost" {
            return infra(
                format!(
                    "the sandbox's allocation {} was lost with its node {} ({})",
                    alloc.id, alloc.node_id, alloc.client_description
                ),
                true,
            );
        }
        match self
            .retry("result read", || self.client.cat(&alloc.id, RESULT_PATH))
            .await
        {
            Ok(Some(bytes)) => super::runner_outcome(&bytes),
            Ok(None) => self.without_result(alloc).await,
            Err(e) => infra(format!("cannot read the runner's result: {e}"), true),
        }
    }

    /// Why an allocation ended without a result.
    async fn without_result(&self, alloc: &Allocation) -> Outcome {
        let events = alloc.task(TASK).map(|t| t.events()).unwrap_or_default();
        if matches!(alloc.desired_status.as_str(), "stop" | "evict") {
            return infra(
                format!(
                    "Nomad stopped the sandbox before the runner finished ({})",
                    alloc.desired_description
                ),
                true,
            );
        }
        if events
            .iter()
            .any(|e| e.detail("oom_killed") == Some("true") || e.kind == "OOM Killed")
        {
            return Outcome::failed(
                OutcomeKind::AgentError,
                "the sandbox ran out of memory (raise the capability's memory in the sandbox job)",
                false,
            );
        }
        const START_FAILURES: &[&str] = &[
            "Driver Failure",
            "Setup Failure",
            "Failed Validation",
            "Failed Artifact Download",
            "Template",
        ];
        if let Some(e) = events
            .iter()
            .rev()
            .find(|e| START_FAILURES.contains(&e.kind.as_str()))
        {
            let detail = [&e.display_message, &e.driver_error, &e.setup_error]
                .into_iter()
                .find(|s| !s.is_empty())
                .cloned()
                .unwrap_or_default();
            return infra(
                format!("the sandbox could not start ({}: {detail})", e.kind),
                true,
            );
        }
        let tail = self.stderr_tail(&alloc.id).await;
        match events.iter().rev().find(|e| e.kind == "Terminated") {
            Some(e) => Outcome::failed(
                OutcomeKind::AgentError,
                format!(
                    "the runner exited with code {} (signal {}) without a result: {tail}",
                    e.exit_code, e.signal
                ),
                false,
            ),
            None => infra(
                format!(
                    "the sandbox ended ({}: {}) without a result: {tail}",
                    alloc.client_status, alloc.client_description
                ),
                true,
            ),
        }
    }

    /// The end of the task's stderr, for error messages.
    async fn stderr_tail(&self, alloc: &str) -> String {
        let Ok(resp) = self
            .client
            .log_tail(alloc, TASK, "stderr", STDERR_TAIL)
            .await
        else {
            return String::new();
        };
        let Ok(body) = resp.bytes().await else {
            return String::new();
        };
        let data = logs::FrameDecoder::default().push(&body).concat();
        String::from_utf8_lossy(&data).trim().to_string()
    }

    /// Stops and purges a dispatched instance (its allocation is killed).
    async fn stop(&self, job: &str) {
        match self
            .retry("job stop", || self.client.stop_job(job, true))
            .await
        {
            Ok(()) => tracing::info!(job, "sandbox job stopped and purged"),
            Err(e) => tracing::warn!(job, error = %e,
                "cannot stop the sandbox job; it ends at its own timeout"),
        }
    }
}

/// Aborts a spawned task when dropped (the log follower of a cancelled run).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn log_event(message: String) -> RunnerEvent {
    RunnerEvent {
        kind: "log".into(),
        data: serde_json::json!({ "message": message }),
    }
}

fn not_placed(waited: Duration, why: Option<&str>) -> Outcome {
    super::not_placed(format!(
        "no Nomad capacity for the sandbox within {} s ({})",
        waited.as_secs(),
        why.unwrap_or("no allocation was made")
    ))
}

/// A request that failed for good while following an instance.
fn failure(doing: &str, e: NomadError) -> Ended {
    // Unreachable past the budget, a server error, or the instance purged by someone
    // else: another attempt may work. Other refusals (403: the token may not read) will
    // not get better by retrying.
    let retryable = e.is_transient() || e.status() == Some(404);
    Ended::Stop(infra(format!("Nomad, {doing}: {e}"), retryable))
}

/// The hand-over endpoint's URL as allocations reach it: `nomad.handover_url`, or the
/// worker's own listener.
fn handover_url(settings: &Settings) -> Result<String, NomadError> {
    let base = match &settings.nomad.handover_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let listen = &settings.worker.listen;
            if listen.starts_with("0.0.0.0") || listen.starts_with("[::]") {
                tracing::warn!(listen = %listen, "nomad.handover_url is not set and worker.listen \
                    is a wildcard address: sandboxes cannot reach the hand-over; set nomad.handover_url");
            }
            format!("http://{listen}")
        }
    };
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(NomadError::Config(format!(
            "nomad.handover_url {base:?} must be an http:// or https:// URL"
        )));
    }
    Ok(format!("{base}{}", handover::START_PATH))
}

/// Where the attempts' proxies listen (`nomad.proxy_listen`, port 0 when it names none)
/// and the host the allocations reach them by (the hand-over address's).
fn proxy_address(settings: &Settings, handover_url: &str) -> Result<(String, String), NomadError> {
    let host = reqwest::Url::parse(handover_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .ok_or_else(|| {
            NomadError::Config(format!(
                "nomad.handover_url {handover_url:?} names no host for the sandboxes' proxy"
            ))
        })?;
    let bind = match settings.nomad.proxy_listen.as_deref().map(str::trim) {
        None | Some("") => format!("{host}:0"),
        Some(listen) if listen.parse::<std::net::SocketAddr>().is_ok() => listen.to_string(),
        Some(listen) => match listen.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, 0).to_string(),
            Err(_) => {
                return Err(NomadError::Config(format!(
                    "nomad.proxy_listen {listen:?} is not an IP address or address:port"
                )))
            }
        },
    };
    Ok((bind, host))
}

/// Why a dispatch failed for good, as an outcome.
fn dispatch_failure(job: &str, namespace: &str, e: NomadError) -> Outcome {
    match e.status() {
        Some(404) => infra(
            format!(
                "the sandbox job {job} is not registered in Nomad namespace {namespace} \
                 (nomad job run nomad/sandbox.nomad.hcl): {e}"
            ),
            false,
        ),
        Some(400) | Some(403) => infra(format!("Nomad refused the dispatch of {job}: {e}"), false),
        _ => infra(format!("cannot dispatch {job}: {e}"), e.is_transient()),
    }
}

/// Warns when a registered sandbox job is missing, not parameterized, or lets Nomad
/// restart or reschedule it (retries must be the queue's alone).
async fn check_job(client: &NomadClient, job: &str) {
    let value = match client.job(job).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(job, error = %e, "cannot read the sandbox job from Nomad");
            return;
        }
    };
    if value.get("ParameterizedJob").is_none_or(|p| p.is_null()) {
        tracing::warn!(
            job,
            "the sandbox job is not parameterized; dispatches will fail"
        );
    }
    for group in value["TaskGroups"].as_array().into_iter().flatten() {
        let restarts = group["RestartPolicy"]["Attempts"].as_i64().unwrap_or(0);
        let reschedules = group["ReschedulePolicy"]["Attempts"].as_i64().unwrap_or(0);
        let unlimited = group["ReschedulePolicy"]["Unlimited"]
            .as_bool()
            .unwrap_or(false);
        if restarts != 0 || reschedules != 0 || unlimited {
            tracing::warn!(
                job,
                restarts,
                reschedules,
                unlimited,
                "the sandbox job lets Nomad restart or reschedule it: an attempt may run twice"
            );
        }
    }
}

#[async_trait]
impl SandboxDriver for NomadDriver {
    fn name(&self) -> &'static str {
        "nomad"
    }

    async fn run(
        &self,
        spec: &RunSpec,
        events: mpsc::Sender<RunnerEvent>,
        cancel: CancellationToken,
    ) -> Outcome {
        let started = std::time::Instant::now();
        let parent = self.job_id(spec.capability);
        let token = format!("{}-{}", spec.subtask_id, spec.attempt);
        // The model key stays here, with the attempt's proxy (see the module docs).
        let mut spec = spec.clone();
        let key = spec.secret_env.take(network::MODEL_KEY_ENV);
        let mut proxy = None;
        let mut grant = None;
        match NetworkMode::of(&self.all.sandbox, spec.capability) {
            NetworkMode::Proxy => {
                let secret = uuid::Uuid::new_v4().simple().to_string();
                let mut options = network::proxy_options(&self.all, &spec, key);
                options.token = Some(secret.clone().into());
                match RunProxy::start_tcp(
                    &self.proxy_bind,
                    &self.proxy_host,
                    options,
                    events.clone(),
                )
                .await
                {
                    Ok(p) => {
                        let port = p.local_addr().map(|a| a.port()).unwrap_or_default();
                        grant = Some(handover::ProxyGrant {
                            url: format!("http://{}:{port}", self.proxy_host),
                            token: secret,
                        });
                        proxy = Some(p);
                    }
                    Err(e) => return infra(format!("cannot start the sandbox's proxy: {e}"), true),
                }
            }
            NetworkMode::Open => {
                if let Some(key) = key {
                    spec.secret_env.set(network::MODEL_KEY_ENV, key);
                }
            }
            NetworkMode::Off => {}
        }
        let spec = &spec;
        // Open for the sandbox's claim until this run ends (dropped on every return).
        let mut registration = Some(self.handovers.register(&token, spec, grant));
        let mut meta = BTreeMap::new();
        meta.insert("task_id", spec.task_id.to_string());
        meta.insert("subtask_id", spec.subtask_id.to_string());
        meta.insert("attempt", spec.attempt.to_string());
        meta.insert(handover::META_KEY, self.handover_url.clone());
        let request = DispatchRequest {
            job_id: &parent,
            payload: String::new(),
            meta,
        };
        let dispatched = tokio::select! {
            r = self.retry("dispatch", || self.client.dispatch(&parent, &request, &token)) => r,
            _ = cancel.cancelled() => {
                return Outcome::failed(OutcomeKind::Cancelled, "the run was cancelled", false);
            }
        };
        let dispatched = match dispatched {
            Ok(d) => d,
            Err(e) => return dispatch_failure(&parent, &self.settings.namespace, e),
        };
        let job = dispatched.dispatched_job_id;
        if dispatched.eval_id.is_empty() {
            // Nomad returned the instance already dispatched for this attempt: its worker
            // died and the message was redelivered here. That sandbox takes its spec from
            // the worker that dispatched it, never from this one: its agent holds the
            // identity of that very job, so a hand-over here would give it the attempt's
            // secrets a second time. It is followed (its result is read as any other), not
            // handed over to.
            drop(registration.take());
            tracing::info!(job = %job,
                "a sandbox of this attempt already runs, dispatched by another worker; \
                 following it without a hand-over");
        } else if let Some(r) = &registration {
            r.dispatched(&job);
        }
        tracing::info!(job = %job, eval = %dispatched.eval_id, "sandbox dispatched");
        let ended = tokio::select! {
            e = self.follow(spec, &job, &dispatched.eval_id, &events) => e,
            _ = cancel.cancelled() => {
                Ended::Stop(Outcome::failed(OutcomeKind::Cancelled, "the run was cancelled", false))
            }
        };
        let mut outcome = match ended {
            Ended::Done(outcome) => outcome,
            Ended::Stop(outcome) => {
                self.stop(&job).await;
                outcome
            }
        };
        match proxy {
            // The sandbox is gone: what the proxy metered and refused is the run's.
            Some(proxy) if registration.is_some() => {
                network::finish_proxy(proxy, &mut outcome).await;
            }
            // A sandbox of another worker's dispatch uses that worker's proxy.
            Some(proxy) => drop(proxy),
            None => {}
        }
        if outcome.duration_ms == 0 {
            outcome.duration_ms = started.elapsed().as_millis() as u64;
        }
        outcome
    }
}
