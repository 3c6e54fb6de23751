//! Configuration: built-in defaults, then a TOML file (`--config`), then environment
//! variables `AO__SECTION__KEY` (e.g. `AO__BACKEND__KIND=aws`). Secrets appear only as
//! references (see [`crate::secret`]).

use crate::capability::Capability;
use crate::secret::SecretRef;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A configuration that cannot be loaded or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub api: ApiSettings,
    pub github: GithubSettings,
    pub backend: BackendSettings,
    pub local: LocalSettings,
    pub aws: AwsSettings,
    pub sandbox: SandboxSettings,
    pub nomad: NomadSettings,
    pub agent: AgentSettings,
    pub worker: WorkerSettings,
    pub queue: QueueSettings,
    pub coordinator: CoordinatorSettings,
    /// What a planner's plan may hold (see docs/agent.md).
    pub planner: PlannerSettings,
    /// How a planned task's checks are answered.
    pub pipeline: PipelineSettings,
    pub log: LogSettings,
    /// Warm workers: the per-worker git mirrors and setup cache.
    pub warm: WarmSettings,
    /// Named pipelines: the capabilities a task runs through, in order.
    pub pipelines: BTreeMap<String, Vec<Capability>>,
}

impl Default for Settings {
    fn default() -> Self {
        let mut pipelines = BTreeMap::new();
        pipelines.insert("full".to_string(), Capability::ALL.to_vec());
        pipelines.insert("code".to_string(), vec![Capability::Coder]);
        pipelines.insert(
            "code-review".to_string(),
            vec![Capability::Coder, Capability::Reviewer],
        );
        Self {
            server: Default::default(),
            api: Default::default(),
            github: Default::default(),
            backend: Default::default(),
            local: Default::default(),
            aws: Default::default(),
            sandbox: Default::default(),
            nomad: Default::default(),
            agent: Default::default(),
            worker: Default::default(),
            queue: Default::default(),
            coordinator: Default::default(),
            planner: Default::default(),
            pipeline: Default::default(),
            log: Default::default(),
            warm: Default::default(),
            pipelines,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Coordinator HTTP address.
    pub listen: String,
    /// Largest REST API request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Secret reference of the REST API bearer token; without it the API refuses all calls.
    pub token: Option<SecretRef>,
    /// Pipeline used when a request names none.
    pub default_pipeline: String,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            token: None,
            default_pipeline: "full".into(),
        }
    }
}

/// The GitHub App: webhooks in, reports out. See docs/github-app.md.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GithubSettings {
    /// Secret reference of the webhook secret; without any secret, webhooks are refused.
    pub webhook_secret: Option<SecretRef>,
    /// More accepted webhook secrets, so that the secret can be rotated without downtime
    /// (a delivery is accepted when it verifies against any of them).
    pub webhook_secrets: Vec<SecretRef>,
    /// Largest webhook body accepted, in bytes (GitHub caps payloads at 25 MB).
    pub max_webhook_bytes: usize,
    /// GitHub API base URL (`https://HOST/api/v3` for GitHub Enterprise Server).
    pub api_url: String,
    /// Where repositories are cloned from: `<git_url>/<owner>/<repo>.git`.
    pub git_url: String,
    pub app_id: Option<u64>,
    /// Secret reference of the App's private key (PEM). Coordinator and workers need it;
    /// it never enters a sandbox.
    pub private_key: Option<SecretRef>,
    /// The label that starts a task with `default_pipeline`; `<label>:<name>` starts the
    /// pipeline `<name>`, or the single capability `<name>`.
    pub trigger_label: String,
    /// Pipeline of the plain trigger label.
    pub default_pipeline: String,
    /// Whether a task waits for `/agent approve` before anything is coded.
    pub require_approval: bool,
    /// Review rounds the agent answers on its own pull request before it stops.
    pub max_review_iterations: u32,
    /// How often missed deliveries and labelled issues without a task are looked for
    /// (0: only at start-up).
    pub reconcile_secs: u64,
    /// GitHub tasks queued or running at once in one repository (0: no cap); more wait,
    /// labelled `agent:queued`, and start in order as others end.
    pub max_active_per_repo: usize,
    /// The same for all repositories of one installation (0: no cap).
    pub max_active_per_installation: usize,
    /// Monthly cost budget of one installation in US dollars (0: none). Notices go to
    /// the issue at 80, 90 and 100 %; at 100 % new tasks are refused with a comment.
    pub monthly_budget_usd: f64,
    /// Bot logins (`renovate[bot]`) whose labels and commands are acted on, when the bot
    /// has write access like a person would need; any other bot's trigger is answered
    /// with one comment saying why nothing runs. This App's own events are never acted on.
    pub allowed_bots: Vec<String>,
    /// The App's slug (`https://github.com/apps/<slug>`): its own bot, `<slug>[bot]`, is
    /// told apart from other bots, so that its own comments and labels trigger nothing
    /// and are not answered. Unset: the App's own events are refused as any other bot's.
    pub app_slug: Option<String>,
    /// Whether the agent's pull request is marked ready for review only once the checks
    /// on its head pass: no check run or commit status failing or still running.
    pub ready_waits_for_checks: bool,
    /// Checks (check-run names or commit-status contexts) that must have reported and
    /// passed on the pull request's head before it is marked ready, besides none failing.
    pub required_checks: Vec<String>,
    /// Delay before a stored webhook delivery whose handling failed is tried again, in
    /// milliseconds; doubled per attempt up to 60 times this. After 6 attempts it is kept
    /// as failed (`ao_webhook_deliveries_total{result="given_up"}`). The inbox is swept
    /// for due retries every 2 times this, at most every 10 s.
    pub delivery_retry_ms: u64,
}

impl Default for GithubSettings {
    fn default() -> Self {
        Self {
            webhook_secret: None,
            webhook_secrets: Vec::new(),
            max_webhook_bytes: 25 * 1024 * 1024 + 64 * 1024,
            api_url: "https://api.github.com".into(),
            git_url: "https://github.com".into(),
            app_id: None,
            private_key: None,
            trigger_label: "agent".into(),
            default_pipeline: "full".into(),
            require_approval: false,
            max_review_iterations: 3,
            reconcile_secs: 300,
            max_active_per_repo: 2,
            max_active_per_installation: 10,
            monthly_budget_usd: 0.0,
            allowed_bots: Vec::new(),
            app_slug: None,
            ready_waits_for_checks: true,
            required_checks: Vec::new(),
            delivery_retry_ms: 5000,
        }
    }
}

impl GithubSettings {
    /// Every accepted webhook secret reference: `webhook_secret` first, then the rest.
    pub fn webhook_secret_refs(&self) -> Vec<SecretRef> {
        self.webhook_secret
            .iter()
            .chain(self.webhook_secrets.iter())
            .cloned()
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// SQLite queue and state in `local.data_dir`.
    #[default]
    Local,
    /// SQS, DynamoDB and Secrets Manager.
    Aws,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendSettings {
    pub kind: BackendKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalSettings {
    pub data_dir: PathBuf,
    /// Days after which task events (agent output, state changes) are deleted from the
    /// SQLite store; 0 keeps them for ever. Default 90, as `aws.event_retention_days`.
    pub event_retention_days: u64,
    /// Days after which webhook delivery records are deleted; 0 keeps them for ever.
    /// Default 30, as `aws.delivery_retention_days` (GitHub redelivers for a few days).
    pub delivery_retention_days: u64,
}

impl Default for LocalSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./.data"),
            event_retention_days: 90,
            delivery_retention_days: 30,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub queue_prefix: String,
    pub table: String,
    /// Create the queues and the table when they are missing (tests and development).
    /// In production the Terraform module creates them, and a missing one is an error.
    pub create_resources: bool,
    /// How long a secret read from Secrets Manager is used before it is read again, so
    /// that a rotated secret is picked up without a restart.
    pub secret_refresh_secs: u64,
    /// Days after which task events expire (DynamoDB TTL).
    pub event_retention_days: u64,
    /// Days after which webhook delivery records expire (DynamoDB TTL).
    pub delivery_retention_days: u64,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            region: None,
            queue_prefix: "agent-orchestrator".into(),
            table: "agent-orchestrator".into(),
            create_resources: false,
            secret_refresh_secs: 300,
            event_retention_days: 90,
            delivery_retention_days: 30,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SandboxDriverKind {
    #[default]
    Bwrap,
    Nomad,
    /// A plain child process: no isolation at all.
    Process,
}

/// How agents are isolated. Every key but `driver` applies to the `bwrap` driver.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSettings {
    pub driver: SandboxDriverKind,
    /// The bubblewrap program.
    pub bwrap: PathBuf,
    /// User id of the agent inside the sandbox (never 0: Claude Code refuses to skip
    /// permission prompts as root).
    pub uid: u32,
    /// Group id of the agent inside the sandbox.
    pub gid: u32,
    /// The unprivileged host user id the sandbox runs as when the worker runs as root
    /// (root is never a sandbox user: as host root the agent could read every root-only
    /// file, and no process limit would apply). A dedicated user
    /// (`useradd --system ao-sandbox`) or an id of root's subordinate range
    /// (`/etc/subuid`). Required for a root worker with the `bwrap` driver; unused
    /// otherwise (the sandbox then runs as the worker's own user).
    pub host_uid: Option<u32>,
    /// The host group id that goes with `host_uid`.
    pub host_gid: Option<u32>,
    /// The agent's home directory inside the sandbox: an empty tmpfs for each attempt.
    pub home: PathBuf,
    /// Names of the worker's environment variables passed into the sandbox (when set),
    /// besides PATH, LANG, LC_ALL, TZ. Nothing else of the worker's environment enters.
    pub env_pass: Vec<String>,
    /// Capabilities whose sandboxes have no network at all (not even loopback, nor the
    /// model proxy).
    pub network_off: Vec<Capability>,
    /// Capabilities whose sandboxes share the host's network and get the model key in
    /// their environment (the behaviour before the egress proxy). Every other capability
    /// not in `network_off` gets the allow-list proxy (see `docs/sandbox-network.md`).
    pub network_open: Vec<Capability>,
    /// Destinations (`host:port`, or `host` for port 443) the egress proxy lets every
    /// sandbox reach, besides the repository's git host (package registries, …).
    pub allow_hosts: Vec<String>,
    /// More host paths hidden from the sandbox (a directory becomes an empty tmpfs, a file
    /// an empty file). The data dir, the work dir, home directories, `/root`, `/run/secrets`,
    /// the shadow files and secret files named in the configuration are always hidden.
    pub hide: Vec<PathBuf>,
    /// Host paths shown read-only inside the `bwrap` sandbox, which otherwise sees only
    /// the host's system directories (`/usr`, `/bin`, `/lib*`, `/etc`): e.g. a tool
    /// installed under `/opt`, or an agent below a home directory.
    pub ro_paths: Vec<PathBuf>,
    /// Memory limit of one sandbox in MiB (no swap), held by its cgroup. When absent and
    /// the worker has a memory cgroup, three quarters of the host's RAM shared by
    /// `worker.concurrency` sandboxes, between 512 and 4096 MiB. Set while the worker has
    /// no memory cgroup, the worker refuses to start.
    pub memory_mb: Option<u64>,
    /// CPU limit of one sandbox, in CPUs (`1.5` = one and a half CPUs of time per wall
    /// second), held by its cgroup (`cpu.max`, or `cpu.cfs_quota_us` on cgroup v1). When
    /// absent and the worker has a cpu cgroup, the host's CPUs shared by
    /// `worker.concurrency` sandboxes, at least one. Set while the worker has no cpu
    /// cgroup, the worker refuses to start.
    pub cpus: Option<f64>,
    /// Processes limit: `pids.max` of each sandbox's cgroup; without a cgroup, RLIMIT_NPROC
    /// (which counts every process of the host user, so concurrent sandboxes share it).
    pub max_processes: u64,
    /// Open files limit of each process in the sandbox (RLIMIT_NOFILE).
    pub max_open_files: u64,
    /// A cgroup v2 directory delegated to the worker (writable, with the `pids`, `memory`
    /// and, for `cpus`, `cpu` controllers enabled in its `cgroup.subtree_control`). Each
    /// sandbox then runs in a child cgroup with `pids.max`, `memory.max` and `cpu.max`.
    pub cgroup_dir: Option<PathBuf>,
    /// On a cgroup v1 or hybrid host: directories in the v1 `pids`, `memory` and `cpu`
    /// hierarchies delegated to the worker (owned by its user, e.g.
    /// `/sys/fs/cgroup/pids/ao-worker`); each is recognised by its file system and its
    /// control files. The `pids` one is required; each sandbox runs in a child of each.
    /// Not together with `cgroup_dir`.
    pub cgroup_v1_dirs: Vec<PathBuf>,
    /// Size bound of the sandbox's working copy (a tmpfs), in MiB.
    pub workspace_mb: u64,
    /// Size bound of `/tmp` inside the sandbox, in MiB.
    pub tmp_mb: u64,
    /// Size bound of the agent's `$HOME` inside the sandbox, in MiB.
    pub home_mb: u64,
    /// Size bound of `/dev/shm` inside the sandbox, in MiB.
    pub shm_mb: u64,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            driver: SandboxDriverKind::default(),
            bwrap: PathBuf::from("bwrap"),
            uid: 1000,
            gid: 1000,
            host_uid: None,
            host_gid: None,
            home: PathBuf::from("/home/agent"),
            // The model key is not passed from the worker's environment: it comes from
            // `agent.api_key` (a secret ref), and the runner keeps it out of its output.
            env_pass: [
                "ANTHROPIC_BASE_URL",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
                "CLAUDE_CODE_MAX_RETRIES",
                "DISABLE_AUTOUPDATER",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            network_off: Vec::new(),
            network_open: Vec::new(),
            allow_hosts: Vec::new(),
            hide: Vec::new(),
            ro_paths: Vec::new(),
            memory_mb: None,
            cpus: None,
            max_processes: 1024,
            max_open_files: 8192,
            cgroup_dir: None,
            cgroup_v1_dirs: Vec::new(),
            workspace_mb: 4096,
            tmp_mb: 1024,
            home_mb: 1024,
            shm_mb: 64,
        }
    }
}

/// The `nomad` sandbox driver: where Nomad is and how the sandbox jobs are named. Each
/// attempt dispatches the parameterized job `<job_prefix>-sandbox-<capability>`
/// (`nomad/sandbox.nomad.hcl`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NomadSettings {
    /// Nomad's HTTP API address (`https://` with TLS).
    pub addr: String,
    /// Secret reference of the ACL token (sent as `X-Nomad-Token`, never logged).
    pub token: Option<SecretRef>,
    /// Namespace of the sandbox jobs.
    pub namespace: String,
    /// Region, when not the agent's own.
    pub region: Option<String>,
    /// Prefix of the sandbox job IDs.
    pub job_prefix: String,
    /// PEM file of the CA that signed Nomad's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, when Nomad verifies clients (`verify_https_client`).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Accept any server certificate. Off by default; never in production.
    pub tls_skip_verify: bool,
    /// Longest wait of one blocking query (`wait`), in seconds.
    pub wait_secs: u64,
    /// How long a dispatched sandbox may wait for capacity before the worker stops it and
    /// puts the subtask back on the queue (without using up an attempt).
    pub placement_timeout_secs: u64,
    /// How long Nomad may be unreachable (retried with backoff) before the attempt ends
    /// as a retryable infrastructure failure.
    pub unreachable_secs: u64,
    /// Time a sandbox gets beyond `agent.timeout_secs` (clone, setup, push) before the
    /// worker stops it.
    pub timeout_margin_secs: u64,
    /// The worker's hand-over address as the sandbox allocations reach it (an `http://`
    /// or `https://` base URL, e.g. `http://10.0.3.7:9090`): each dispatched sandbox
    /// presents its Nomad workload identity there to receive its run spec and secrets.
    /// Default: `http://` + `worker.listen`, which suits one machine only.
    pub handover_url: Option<String>,
    /// Where the worker listens for the network proxy of each Nomad sandbox (an IP
    /// address, or `address:port`; port 0 or none: an ephemeral port per attempt). The
    /// sandbox reaches it by the host of the hand-over address. Default: that host.
    pub proxy_listen: Option<String>,
}

impl Default for NomadSettings {
    fn default() -> Self {
        Self {
            addr: "http://127.0.0.1:4646".into(),
            token: None,
            namespace: "default".into(),
            region: None,
            job_prefix: "ao".into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            tls_skip_verify: false,
            wait_secs: 60,
            placement_timeout_secs: 600,
            unreachable_secs: 120,
            timeout_margin_secs: 1200,
            handover_url: None,
            proxy_listen: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// `claude`: Claude Code with the capability's profile, its stream-json output parsed;
    /// `command`: any program, given the prompt as its last argument, output kept as text.
    pub kind: AgentKind,
    /// The agent program.
    pub command: String,
    /// More arguments: for `command`, put before the prompt; for `claude`, after the
    /// profile's options.
    pub args: Vec<String>,
    /// Wall-clock limit of one agent run, in seconds (a profile may set its own).
    pub timeout_secs: u64,
    /// Seconds without any output from the agent before it is killed as `stalled`
    /// (0: no idle limit; a profile may set its own).
    pub idle_timeout_secs: u64,
    /// Largest file, in bytes, the runner commits: a bigger one the agent left in the
    /// working copy (a build cache, a tool's database) is left out of the commit, and
    /// the outcome names it (0: no limit). Git hosts refuse pushes holding files past
    /// their own limit (GitHub: 100 MB), for good.
    pub max_file_bytes: u64,
    /// Most agent events one run stores (each output line of a command agent is one, so
    /// is each stream event of Claude Code); 0: no limit. Past it the worker keeps the
    /// first events and the last [`KEPT_TAIL_EVENTS`] and stores one `events_dropped`
    /// event counting what it left out between them.
    pub max_events: u64,
    /// Secret reference of the model API key. The worker's model proxy adds it to the
    /// agent's model calls (`x-api-key`); it enters a sandbox's environment (as
    /// `ANTHROPIC_API_KEY`) only for the `process` driver and `sandbox.network_open`.
    pub api_key: Option<SecretRef>,
    /// The model API the worker's proxy forwards to; when absent, the worker's
    /// `ANTHROPIC_BASE_URL`, else `https://api.anthropic.com`.
    pub base_url: Option<String>,
    /// A directory of `<capability>.toml` profiles replacing the built-in ones.
    pub profiles_dir: Option<PathBuf>,
    /// Field overrides per capability, applied last (`[agent.profiles.coder] model = …`).
    pub profiles: BTreeMap<Capability, crate::profile::ProfileOverride>,
}

/// Default of [`AgentSettings::max_file_bytes`]: 10 MiB, well under the file limits of
/// git hosts (GitHub refuses files over 100 MB and warns over 50 MB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;

/// Default of [`AgentSettings::max_events`]: room for a long Claude Code run (a 500-turn
/// run makes about 2,000 stream events) while a flood of output lines stays bounded.
pub const DEFAULT_MAX_EVENTS: u64 = 10_000;

/// How many of a run's last events are kept when it has more than
/// [`AgentSettings::max_events`]: the end of a run (its result, its last errors) is what a
/// reader looks for.
pub const KEPT_TAIL_EVENTS: u64 = 100;

/// How the agent's output is understood.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentKind {
    #[default]
    Claude,
    Command,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            kind: AgentKind::default(),
            command: "claude".into(),
            args: Vec::new(),
            timeout_secs: 3600,
            idle_timeout_secs: 600,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_events: DEFAULT_MAX_EVENTS,
            api_key: None,
            base_url: None,
            profiles_dir: None,
            profiles: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Capabilities this worker serves.
    pub capabilities: Vec<Capability>,
    /// Subtasks run at once.
    pub concurrency: usize,
    /// Health and metrics address.
    pub listen: String,
    /// Name in results and logs; host name and process id when absent.
    pub id: Option<String>,
    /// Where working copies are made; a temporary directory when absent.
    pub work_dir: Option<PathBuf>,
    /// How long in-flight work may take to finish on SIGTERM before it is released.
    pub shutdown_grace_secs: u64,
    /// How often a running subtask's state is read to notice a cancel (seconds).
    pub cancel_poll_secs: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            capabilities: Capability::ALL.to_vec(),
            concurrency: 2,
            listen: "127.0.0.1:9090".into(),
            id: None,
            work_dir: None,
            shutdown_grace_secs: 30,
            cancel_poll_secs: 3,
        }
    }
}

/// Warm workers (`[warm]`): what a worker keeps between runs so that a subtask on a
/// repository it has served starts without a full clone and without paying the
/// repository's setup again. Both stores live under `local.data_dir`, are written by the
/// worker only, and reach a sandbox read-only.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmSettings {
    /// Keep a bare mirror per repository and make working copies from it (bwrap and
    /// process drivers). Default `true`.
    pub mirrors: bool,
    /// Bound of all mirrors together, in MiB; the least recently used are removed past
    /// it (never one a run is using). Default 10240.
    pub mirror_max_mb: u64,
    /// Restore what a repository's setup produces (`[setup]` in its
    /// `.agent-orchestrator.toml`) instead of running the setup again. Default `true`.
    pub setup_cache: bool,
    /// Bound of the setup cache, all repositories together, in MiB; least recently used
    /// entries are removed past it. Default 4096.
    pub setup_cache_max_mb: u64,
    /// Largest single setup cache entry, in MiB; a larger one is not stored. Default 1024.
    pub setup_cache_entry_max_mb: u64,
}

impl Default for WarmSettings {
    fn default() -> Self {
        Self {
            mirrors: true,
            mirror_max_mb: 10 * 1024,
            setup_cache: true,
            setup_cache_max_mb: 4 * 1024,
            setup_cache_entry_max_mb: 1024,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// How long a received message stays hidden before another consumer may take it.
    pub visibility_timeout_secs: u64,
    /// How often a worker extends the visibility of the message it works on.
    pub heartbeat_secs: u64,
    /// Long-poll wait of one receive.
    pub wait_secs: u64,
    /// Receives after which a message is moved to the dead-letter queue.
    pub max_receives: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            visibility_timeout_secs: 120,
            heartbeat_secs: 30,
            wait_secs: 20,
            max_receives: 3,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// Attempts of a subtask whose failures are retryable.
    pub max_attempts: u32,
    /// How often queue depths are read for the metrics.
    pub depth_poll_secs: u64,
    pub shutdown_grace_secs: u64,
    /// Which work orphaned by a crash is recovered (see `coordinator/src/recovery.rs`).
    pub recovery: RecoveryMode,
    /// How long a queued or running subtask must have been left alone before `stale`
    /// recovery touches it; also the interval of the periodic sweep.
    pub recovery_stale_secs: u64,
    /// How long a lease on a singleton loop lasts without renewal, in milliseconds: the
    /// longest a dead replica's loop stays unowned before another replica takes it over.
    pub lease_ttl_ms: u64,
    /// How often the holder renews its leases, in milliseconds (below `lease_ttl_ms`);
    /// also how often a replica without the lease tries to take it.
    pub lease_renew_ms: u64,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            depth_poll_secs: 5,
            shutdown_grace_secs: 10,
            recovery: RecoveryMode::default(),
            recovery_stale_secs: 300,
            lease_ttl_ms: 15_000,
            lease_renew_ms: 5_000,
        }
    }
}

/// How a planned task's checks are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Fix rounds (a coder given the findings, then the same check again) that failing
    /// tests or a review asking for changes may start in one task, in all.
    pub max_fix_rounds: u32,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self { max_fix_rounds: 2 }
    }
}

/// The bounds of a planner's plan. A repository's `[planner]` may only narrow them
/// ([`PlannerSettings::narrowed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlannerSettings {
    /// Steps in a plan at most; a longer plan is invalid.
    pub max_steps: u32,
    /// Subtasks of one planned task queued or running at once at most.
    pub max_parallel: u32,
}

impl Default for PlannerSettings {
    fn default() -> Self {
        Self {
            max_steps: 12,
            max_parallel: 4,
        }
    }
}

impl PlannerSettings {
    /// These bounds narrowed by a repository's (never widened; a zero is ignored).
    pub fn narrowed(self, repo: Option<PlannerSettings>) -> Self {
        let Some(r) = repo else { return self };
        let narrow = |ours: u32, theirs: u32| if theirs == 0 { ours } else { ours.min(theirs) };
        Self {
            max_steps: narrow(self.max_steps, r.max_steps),
            max_parallel: narrow(self.max_parallel, r.max_parallel),
        }
    }
}

/// Recovery of work orphaned by a crash, at coordinator start-up and then periodically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryMode {
    /// Only orphans left alone longer than `coordinator.recovery_stale_secs`.
    #[default]
    Stale,
    /// At start-up every orphan whatever its age; afterwards as `stale`.
    All,
    /// No recovery.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,ao_worker=debug`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Settings {
    /// Loads defaults, then the file (if any), then `AO__…` variables from the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.display().to_string(),
                    message: "no such file".into(),
                });
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("AO__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("AO")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("worker.capabilities")
                .with_list_parse_key("agent.args")
                .with_list_parse_key("sandbox.env_pass")
                .with_list_parse_key("sandbox.network_off")
                .with_list_parse_key("sandbox.network_open")
                .with_list_parse_key("sandbox.allow_hosts")
                .with_list_parse_key("sandbox.hide")
                .with_list_parse_key("sandbox.ro_paths")
                .with_list_parse_key("sandbox.cgroup_v1_dirs")
                .with_list_parse_key("github.webhook_secrets")
                .with_list_parse_key("github.allowed_bots")
                .with_list_parse_key("github.required_checks")
                .try_parsing(true)
                .source(Some(env)),
        );
        let merged = builder.build().map_err(|e| ConfigError::File {
            path: file.map(|p| p.display().to_string()).unwrap_or_default(),
            message: e.to_string(),
        })?;
        let settings: Settings = merged
            .try_deserialize()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.worker.concurrency == 0 {
            return bad("worker.concurrency must be at least 1".into());
        }
        if self.worker.capabilities.is_empty() {
            return bad("worker.capabilities must name at least one capability".into());
        }
        let sb = &self.sandbox;
        if let Some(cpus) = sb.cpus {
            if !(cpus.is_finite() && cpus >= 0.01) {
                return bad(format!("sandbox.cpus must be at least 0.01 (got {cpus})"));
            }
        }
        if sb.memory_mb == Some(0) || sb.max_processes == 0 {
            return bad("sandbox.memory_mb and sandbox.max_processes must be at least 1".into());
        }
        if sb.cgroup_dir.is_some() && !sb.cgroup_v1_dirs.is_empty() {
            return bad(
                "set sandbox.cgroup_dir (cgroup v2) or sandbox.cgroup_v1_dirs (cgroup v1), \
                 not both"
                    .into(),
            );
        }
        let q = &self.queue;
        if q.heartbeat_secs == 0 || q.heartbeat_secs * 2 > q.visibility_timeout_secs {
            return bad(format!(
                "queue.heartbeat_secs ({}) must be at least 1 and at most half of \
                 queue.visibility_timeout_secs ({})",
                q.heartbeat_secs, q.visibility_timeout_secs
            ));
        }
        if q.visibility_timeout_secs > 12 * 3600 {
            return bad("queue.visibility_timeout_secs may be at most 43200 (12 h)".into());
        }
        if q.max_receives < 1 {
            return bad("queue.max_receives must be at least 1".into());
        }
        if self.coordinator.recovery_stale_secs == 0 {
            return bad("coordinator.recovery_stale_secs must be at least 1".into());
        }
        if self.coordinator.lease_renew_ms == 0
            || self.coordinator.lease_renew_ms >= self.coordinator.lease_ttl_ms
        {
            return bad(
                "coordinator.lease_renew_ms must be at least 1 and below coordinator.lease_ttl_ms"
                    .into(),
            );
        }
        if self.coordinator.max_attempts == 0 {
            return bad("coordinator.max_attempts must be at least 1".into());
        }
        if self.planner.max_steps == 0 || self.planner.max_steps > 30 {
            return bad("planner.max_steps must be between 1 and 30".into());
        }
        if self.planner.max_parallel == 0 {
            return bad("planner.max_parallel must be at least 1".into());
        }
        for (name, caps) in &self.pipelines {
            if caps.is_empty() {
                return bad(format!("pipeline {name:?} has no steps"));
            }
        }
        if !self.pipelines.contains_key(&self.api.default_pipeline) {
            return bad(format!(
                "api.default_pipeline {:?} is not a configured pipeline",
                self.api.default_pipeline
            ));
        }
        if !self.pipelines.contains_key(&self.github.default_pipeline) {
            return bad(format!(
                "github.default_pipeline {:?} is not a configured pipeline",
                self.github.default_pipeline
            ));
        }
        if self.github.trigger_label.trim().is_empty() {
            return bad("github.trigger_label must not be empty".into());
        }
        if self.agent.command.trim().is_empty() {
            return bad("agent.command must not be empty".into());
        }
        let n = &self.nomad;
        if n.wait_secs == 0 || n.wait_secs > 600 {
            return bad(
                "nomad.wait_secs must be between 1 and 600 (Nomad caps waits at 10 min)".into(),
            );
        }
        if n.client_cert.is_some() != n.client_key.is_some() {
            return bad("nomad.client_cert and nomad.client_key go together".into());
        }
        Ok(())
    }

    /// The worker's name: configured, or host name and process id.
    pub fn worker_id(&self) -> String {
        self.worker.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_design() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert_eq!(s.github.api_url, "https://api.github.com");
        assert_eq!(s.backend.kind, BackendKind::Local);
        assert_eq!(s.local.data_dir, PathBuf::from("./.data"));
        assert_eq!(s.sandbox.driver, SandboxDriverKind::Bwrap);
        assert_eq!(s.agent.command, "claude");
        assert_eq!(s.worker.capabilities, Capability::ALL.to_vec());
        assert_eq!(s.worker.concurrency, 2);
        assert_eq!(s.worker.listen, "127.0.0.1:9090");
        assert!(s.api.token.is_none());
        assert!(s.github.webhook_secret.is_none());
    }

    #[test]
    fn file_then_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[backend]\nkind = \"aws\"\n[aws]\nqueue_prefix = \"from-file\"\ntable = \"t\"\n\
             [worker]\nconcurrency = 4\n[api]\ntoken = \"env:API_TOKEN\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&path),
            env(&[
                ("AO__AWS__QUEUE_PREFIX", "from-env"),
                ("AO__WORKER__CAPABILITIES", "coder,docs"),
                ("AO__SANDBOX__DRIVER", "process"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.backend.kind, BackendKind::Aws);
        assert_eq!(s.aws.queue_prefix, "from-env");
        assert_eq!(s.aws.table, "t");
        assert_eq!(s.worker.concurrency, 4);
        assert_eq!(
            s.worker.capabilities,
            vec![Capability::Coder, Capability::Docs]
        );
        assert_eq!(s.sandbox.driver, SandboxDriverKind::Process);
        assert_eq!(s.api.token, Some(SecretRef::Env("API_TOKEN".into())));
    }

    #[test]
    fn a_repository_may_only_narrow_the_planner_bounds() {
        let ours = PlannerSettings {
            max_steps: 8,
            max_parallel: 3,
        };
        let wider = PlannerSettings {
            max_steps: 20,
            max_parallel: 1,
        };
        assert_eq!(
            ours.narrowed(Some(wider)),
            PlannerSettings {
                max_steps: 8,
                max_parallel: 1
            }
        );
        let zero = PlannerSettings {
            max_steps: 0,
            max_parallel: 0,
        };
        assert_eq!(ours.narrowed(Some(zero)), ours);
        assert_eq!(ours.narrowed(None), ours);
        let mut s = Settings::default();
        s.planner.max_parallel = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn mistakes_are_reported_clearly() {
        let err = Settings::load_from(None, env(&[("AO__BACKEND__KIND", "azure")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("azure"), "{err}");
        let err = Settings::load_from(None, env(&[("AO__WORKER__CONCURRENCY", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.concurrency"), "{err}");
        let err = Settings::load_from(None, env(&[("AO__API__TOKEN", "plaintext-secret")]))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("plaintext-secret"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[sever]\nlisten = \"x\"\n").unwrap();
        let err = Settings::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sever"), "{err}");
        assert!(Settings::load_from(Some(Path::new("/nonexistent.toml")), env(&[])).is_err());
    }
}
