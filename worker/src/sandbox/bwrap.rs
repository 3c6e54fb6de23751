//! The `bwrap` driver, the default on one machine: the runner (and so the agent) runs in a
//! bubblewrap sandbox made fresh for each attempt.
//!
//! What the sandbox is:
//! - new user, pid, ipc, uts and (when the kernel allows) cgroup namespaces; the runner is
//!   pid 1 (`--as-pid-1`: no bubblewrap monitor inside whose environment, holding the run's
//!   secrets, the agent could read), so when the runner exits everything it left behind
//!   dies with the namespace. Orphans that exit earlier stay zombies until then, within
//!   the process limit. `--die-with-parent` ties it to the worker, `--new-session` takes
//!   the controlling terminal away.
//! - an unprivileged user inside (`sandbox.uid`/`sandbox.gid`, 1000 by default), mapped
//!   by the user namespace to an unprivileged host user: the worker's own user, or, for
//!   a worker running as root, `sandbox.host_uid` (see [`super::host_user`]); root is
//!   never a sandbox user.
//! - of the host's file system, only the system directories ([`SYSTEM_PATHS`]: `/usr`,
//!   `/bin`, `/lib*`, `/etc`, ...) and `sandbox.ro_paths`, read-only, on a read-only root;
//!   a fresh `/proc`, a minimal `/dev`, an empty tmpfs `/tmp` and `$HOME`. Home
//!   directories, `/opt`, `/srv`, `/var`, the worker's data and work dirs and any other
//!   file of the worker's user are not there. Inside what is shown, the worker's private
//!   places are hidden under empty read-only tmpfs mounts (every `file:` secret of the
//!   configuration and every one the worker resolved (see [`crate::secret_files`]),
//!   `sandbox.hide`, `/root`, `/home`, `/var`, `/run/secrets`) and the shadow files
//!   replaced by empty ones. A secret under a path shown again inside (a local
//!   repository, a mirror) is covered again above it.
//! - no writable host place: the attempt is a size-limited tmpfs at the neutral
//!   [`INSIDE_ATTEMPT`] holding the run spec (read-only) and the working copy (a tmpfs of
//!   its own); the runner is shown at [`INSIDE_RUNNER`], so the sandbox's init names no
//!   host path of the worker. A repository given as a local path or `file://` URL is
//!   shown read-only; the runner hands its commits back as a bundle over a pipe, which
//!   the worker pushes (see [`super::local_repo`]). The outcome travels over a pipe too
//!   (see [`super::result_channel`]), and so does a setup result for the warm setup
//!   cache.
//! - the environment rebuilt from an allow-list: PATH, LANG, LC_ALL, TZ, HOME, USER, LOGNAME,
//!   TMPDIR and the names in `sandbox.env_pass`. Values travel in bubblewrap's environment
//!   (never `--setenv`, which would show them in `/proc/*/cmdline`); bubblewrap hands its
//!   environment to the sandbox unchanged, and it gets nothing else from the worker.
//! - network: by default a namespace of its own with only loopback, and the worker's
//!   per-run proxy as the one way out (model endpoint with the key added, allow-listed
//!   destinations); none at all for `sandbox.network_off`, the host's for
//!   `sandbox.network_open`. Host unix sockets are covered in every mode. See
//!   [`super::network`] and `crate::proxy`.
//! - a seccomp filter ([`super::seccomp`]) and `--disable-userns`: no nested namespaces,
//!   no ptrace, no mounts, keyrings, bpf, perf, kexec, modules.
//! - limits ([`super::limits`]): a cgroup per attempt (`pids.max`, memory, CPU; a run
//!   killed for its memory limit fails as such), `prlimit` (util-linux) for RLIMIT_NOFILE
//!   (and, inside the sandbox's user namespace, RLIMIT_NPROC where no cgroup holds the
//!   process limit: counted per user namespace, so per sandbox), and a size bound on every
//!   writable place: the working copy, `/tmp`, `$HOME` and `/dev/shm` are size-limited
//!   tmpfs mounts, and the rest of `/dev` is read-only.

use super::host_user::{HostUser, HostUserError};
use super::limits::{self, AttemptCgroup, Cgroups, Limits, UserShares};
use super::local_repo::{self, local_repository};
use super::network::{self, NetworkMode};
use super::private_paths::{self, Viewer};
use super::process::{infra, supervise, Attempt, RUNNER_MARGIN};
use super::result_channel::{BundleChannel, FileChannel, BUNDLE_FD, RESULT_FD, SETUP_FD};
use super::ucounts::{StartGate, UcountShares, BLOCK_FD, INFO_FD};
use super::SandboxDriver;
use crate::proxy::RunProxy;
use crate::secret_files::SecretFiles;
use crate::spec::{Delivery, RunSpec, RunnerEvent};
use ao_shared::capability::Capability;
use ao_shared::config::{SandboxSettings, Settings};
use ao_shared::task::{FailureCause, Outcome, OutcomeKind};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Host paths hidden from every sandbox when they exist.
const ALWAYS_HIDDEN: &[&str] = &[
    "/root",
    "/home",
    "/run/secrets",
    "/var/run/secrets",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    // Where services and users keep sockets and state (`/var/run`, `/var/tmp`,
    // `/var/lib`, `/var/spool`): hidden as a whole, so a socket made there after the
    // sandbox started, or bound by a relative path, is out of reach too.
    "/var",
];
/// The host's program, library and system configuration directories: all the sandbox is
/// shown of the host's file system (read-only), besides what a run is given
/// (`sandbox.ro_paths`, the agent program, a local repository, the mirror, a cached
/// setup result). The rest of the host (home directories, `/opt`, `/srv`, `/var`, `/mnt`,
/// data disks, the worker's own files wherever they are) does not exist inside. A
/// top-level link (`/bin` → `usr/bin` on a merged-`/usr` system) is made as the same link.
const SYSTEM_PATHS: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/nix/store",
];
/// The worker's variables passed in besides `sandbox.env_pass`.
const ENV_BASE: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];
/// PATH inside when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The user name inside.
const SANDBOX_USER: &str = "agent";
/// The working copy's directory in the attempt directory: a size-limited tmpfs.
const WORKSPACE_DIR: &str = "ws";
/// Where the runner is shown inside: a neutral path naming nothing of the host.
pub const INSIDE_RUNNER: &str = "/run/ao/runner";
/// Where the attempt directory is inside: a size-limited tmpfs with the run spec
/// (read-only) and the working copy in it.
pub const INSIDE_ATTEMPT: &str = "/run/ao/attempt";
/// Size of the tmpfs at [`INSIDE_ATTEMPT`] around the working copy, in MiB: nothing but
/// the spec belongs there.
const ATTEMPT_TMPFS_MB: u64 = 16;

/// Why the driver cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BwrapError {
    #[error("sandbox.uid and sandbox.gid must not be 0: the agent never runs as root")]
    RootUser,
    #[error("cannot prepare the work directory {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find the worker executable: {0}")]
    Exe(std::io::Error),
    #[error(
        "bubblewrap does not work here ({program}): {detail}; install it \
         (apt-get install bubblewrap) or choose another sandbox.driver"
    )]
    Unusable { program: String, detail: String },
    #[error(
        "bubblewrap cannot make a network namespace here (--unshare-net: {detail}), which \
         the {capabilities} sandboxes need ({why}): every such run would fail. Run the \
         worker where network namespaces work, or serve only capabilities listed in \
         sandbox.network_open"
    )]
    NoNetworkNamespace {
        capabilities: String,
        why: &'static str,
        detail: String,
    },
    #[error("prlimit (util-linux) is needed by the bwrap driver: {0}")]
    Prlimit(String),
    #[error(transparent)]
    Limits(#[from] limits::LimitError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Seccomp(#[from] super::seccomp::SeccompError),
    #[error(transparent)]
    HostUser(#[from] HostUserError),
    #[error(
        "the work directory {0} cannot be reached by sandbox.host_uid: make it and the \
         directories above it searchable (o+x), or set worker.work_dir elsewhere"
    )]
    WorkDirUnreachable(PathBuf),
    #[error("cannot stage the runner for sandbox.host_uid in {path}: {source}")]
    StageRunner {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the agent command {0} cannot be reached by sandbox.host_uid: install it where \
         that user can read and run it (e.g. under /usr/local), or set agent.command"
    )]
    AgentUnreachable(PathBuf),
}

/// The bubblewrap sandbox driver.
pub struct BwrapDriver {
    /// Where attempt directories are made (canonical).
    work_root: PathBuf,
    /// The worker executable, which contains the runner (canonical).
    runner_exe: PathBuf,
    /// `prlimit` by its real path, for use inside the sandbox: the worker's `PATH` may
    /// name directories the sandbox does not show.
    prlimit: PathBuf,
    settings: SandboxSettings,
    /// Host paths covered inside, parents first.
    hidden: Vec<PathBuf>,
    /// How to find what of the shown host directories the sandbox user must not see,
    /// walked before each sandbox (see [`super::private_paths`]).
    private: Arc<private_paths::Plan>,
    /// Each sandbox's share of the host user's message-queue and pending-signal
    /// allowances, where the kernel can hold it.
    shares: Option<UserShares>,
    /// Each sandbox's share of the host user's inotify instances and watches, written
    /// into its user namespace before it starts; `None` where the probe at the start
    /// could not.
    ucounts: Option<UcountShares>,
    /// Where per-attempt cgroups are made, if anywhere.
    cgroups: Option<Cgroups>,
    /// What each sandbox is held to, defaults filled in.
    limits: Limits,
    /// The whole configuration, for the model proxy's options.
    all: Settings,
    /// Secret files, more of which become known as the worker resolves them.
    secret_files: SecretFiles,
    /// The unprivileged host user of the sandboxes of a root worker.
    host: Option<HostUser>,
}

impl BwrapDriver {
    /// Checks that bubblewrap and prlimit work and works out what to hide.
    pub fn new(
        work_root: PathBuf,
        settings: &Settings,
        secret_files: SecretFiles,
    ) -> Result<Self, BwrapError> {
        let sandbox = settings.sandbox.clone();
        if sandbox.uid == 0 || sandbox.gid == 0 {
            return Err(BwrapError::RootUser);
        }
        let host = HostUser::for_worker(
            nix::unistd::geteuid().as_raw(),
            sandbox.host_uid,
            sandbox.host_gid,
        )?;
        std::fs::create_dir_all(&work_root)
            .and_then(|_| work_root.canonicalize())
            .map_err(|source| BwrapError::WorkDir {
                path: work_root.clone(),
                source,
            })
            .and_then(|work_root| {
                let mut runner_exe = std::env::current_exe()
                    .and_then(|p| p.canonicalize())
                    .map_err(BwrapError::Exe)?;
                if let Some(host) = host {
                    if !host.can_reach(&work_root.join("attempt")) {
                        return Err(BwrapError::WorkDirUnreachable(work_root));
                    }
                    if !host.can_run(&runner_exe) {
                        runner_exe = stage_runner(&runner_exe, &work_root)?;
                    }
                    if let Some((found, real)) = resolve_program(&settings.agent.command) {
                        if !host.can_run(&real) {
                            return Err(BwrapError::AgentUnreachable(found));
                        }
                    }
                }
                let hidden = hidden_paths(settings, &work_root);
                let private = Arc::new(private_paths(settings, host.as_ref()));
                network::check_allow_hosts(&sandbox).map_err(BwrapError::Config)?;
                check_ro_paths(&sandbox.ro_paths).map_err(BwrapError::Config)?;
                let (cgroups, limits) = Cgroups::detect(
                    &sandbox,
                    settings.worker.concurrency,
                    nix::unistd::geteuid().is_root(),
                )?;
                let mut driver = Self {
                    work_root,
                    runner_exe,
                    prlimit: resolve_program("prlimit")
                        .map(|(_, real)| real)
                        .unwrap_or_else(|| PathBuf::from("prlimit")),
                    settings: sandbox,
                    hidden,
                    private,
                    shares: UserShares::claim(settings.worker.concurrency),
                    ucounts: None,
                    cgroups,
                    limits,
                    all: settings.clone(),
                    secret_files,
                    host,
                };
                driver.probe()?;
                driver.ucounts = driver.probe_ucounts(settings.worker.concurrency);
                Ok(driver)
            })
    }

    /// Runs `true` in a minimal sandbox, so a broken setup fails at start, not per task:
    /// once as every sandbox runs, and once more with a network namespace when a served
    /// capability needs one (`sandbox.network_off`, or the allow-list proxy), so that a
    /// host that refuses `--unshare-net` (some containers, gVisor) is named as the cause.
    fn probe(&self) -> Result<(), BwrapError> {
        let s = &self.settings;
        // Fresh filter files per probe: bubblewrap reads each to its end.
        self.probe_with(&super::seccomp::program_files()?, false)
            .map_err(|detail| BwrapError::Unusable {
                program: s.bwrap.display().to_string(),
                detail,
            })?;
        let needing: Vec<(Capability, NetworkMode)> = self
            .all
            .worker
            .capabilities
            .iter()
            .map(|c| (*c, NetworkMode::of(s, *c)))
            .filter(|(_, mode)| *mode != NetworkMode::Open)
            .collect();
        if !needing.is_empty() {
            let seccomp = super::seccomp::program_files()?;
            self.probe_with(&seccomp, true).map_err(|detail| {
                let off = needing.iter().any(|(_, m)| *m == NetworkMode::Off);
                BwrapError::NoNetworkNamespace {
                    capabilities: needing
                        .iter()
                        .map(|(c, _)| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    why: if off {
                        "no network at all for sandbox.network_off, only the allow-list proxy for the rest"
                    } else {
                        "network only through the allow-list proxy"
                    },
                    detail,
                }
            })?;
        }
        let ok = std::process::Command::new("prlimit")
            .arg("--nofile")
            .arg(&self.runner_exe)
            .arg("--version")
            .output()
            .map_err(|e| BwrapError::Prlimit(e.to_string()))?;
        if !ok.status.success() {
            return Err(BwrapError::Prlimit(
                String::from_utf8_lossy(&ok.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    /// Each sandbox's share of the host user's inotify allowances, when a probe sandbox
    /// shows they can be written into its user namespace (see [`super::ucounts`]);
    /// otherwise `None`, with a warning saying what that leaves open.
    fn probe_ucounts(&self, concurrency: usize) -> Option<UcountShares> {
        use command_fds::CommandFdExt;
        use std::os::unix::process::CommandExt;
        let shares = UcountShares::claim(concurrency)?;
        let tried = (|| {
            let (gate, mappings) = StartGate::open(&shares).map_err(|e| e.to_string())?;
            let mut probe = self.probe_command(&[], false);
            probe
                .args(["--info-fd", &INFO_FD.to_string()])
                .args(["--block-fd", &BLOCK_FD.to_string()])
                .arg(&self.runner_exe)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .process_group(0)
                .fd_mappings(mappings.into())
                .map_err(|e| e.to_string())?;
            let mut child = probe.spawn().map_err(|e| e.to_string())?;
            // The command holds the info pipe's write end: dropped, the info can end.
            drop(probe);
            let mut gate = gate;
            if let Err(e) = gate.release() {
                // The whole group, before the gate opens as it is dropped.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.wait();
                return Err(e.to_string());
            }
            drop(gate);
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
            }
            Ok(())
        })();
        match tried {
            Ok(()) => Some(shares),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "each sandbox's share of the host user's inotify instances and watches \
                     cannot be set; one run can take them all from a concurrent one \
                     (raise fs.inotify.max_user_instances, or run one sandbox per host user)"
                );
                None
            }
        }
    }

    /// Runs the worker's own program (`--version`: found whatever the `PATH`) in a
    /// minimal sandbox (with a network namespace when `unshare_net`);
    /// bubblewrap's complaint when it fails.
    fn probe_with(&self, seccomp: &[std::fs::File], unshare_net: bool) -> Result<(), String> {
        let out = self
            .probe_command(seccomp, unshare_net)
            .arg(&self.runner_exe)
            .arg("--version")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(())
    }

    /// A minimal sandbox's bubblewrap command (with a network namespace when
    /// `unshare_net`), up to the program it is to run.
    fn probe_command(&self, seccomp: &[std::fs::File], unshare_net: bool) -> std::process::Command {
        let s = &self.settings;
        let mut probe = self.as_host_user(s.bwrap.as_os_str());
        probe.args(["--unshare-user", "--unshare-pid", "--disable-userns"]);
        if unshare_net {
            probe.arg("--unshare-net");
        }
        for file in seccomp {
            use std::os::fd::AsRawFd;
            probe.args(["--add-seccomp-fd", &file.as_raw_fd().to_string()]);
        }
        probe.args(limits::sized_tmpfs(1, Path::new("/tmp")));
        probe
            .arg("--uid")
            .arg(s.uid.to_string())
            .arg("--gid")
            .arg(s.gid.to_string())
            .args(["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]);
        probe
    }

    /// `program` run as the sandbox's host user (itself for an ordinary worker).
    fn as_host_user(&self, program: &std::ffi::OsStr) -> std::process::Command {
        match &self.host {
            Some(host) => {
                let argv = host.setpriv();
                let mut cmd = std::process::Command::new(&argv[0]);
                cmd.args(&argv[1..]).arg(program);
                cmd
            }
            None => std::process::Command::new(program),
        }
    }

    /// What is hidden in this attempt: the fixed list and every secret file known now,
    /// canonical, parents first; for a root worker, only what its host user could reach.
    fn hidden_now(&self) -> Vec<PathBuf> {
        let mut hidden = self.hidden.clone();
        hidden.extend(
            self.secret_files
                .paths()
                .into_iter()
                .filter_map(|p| p.canonicalize().ok())
                .filter(|p| p.parent().is_some()),
        );
        hidden.sort_by_key(|p| (p.components().count(), p.clone()));
        hidden.dedup();
        if let Some(host) = &self.host {
            hidden.retain(|p| host.can_reach(p));
        }
        hidden
    }

    /// Whether the host's `path` is out of the agent's sight before a run's own paths
    /// are shown: outside the system directories and `sandbox.ro_paths`, hidden, or
    /// under the fresh `/tmp` or home.
    fn is_hidden(&self, hidden: &[PathBuf], path: &Path) -> bool {
        !self.shown_roots().any(|root| path.starts_with(root))
            || path.starts_with("/tmp")
            || path.starts_with(&self.settings.home)
            || hidden.iter().any(|h| path.starts_with(h))
    }

    /// The host directories every sandbox is shown: [`SYSTEM_PATHS`] and
    /// `sandbox.ro_paths`.
    fn shown_roots(&self) -> impl Iterator<Item = &Path> {
        SYSTEM_PATHS
            .iter()
            .map(Path::new)
            .chain(self.settings.ro_paths.iter().map(PathBuf::as_path))
    }

    /// bubblewrap's arguments for one attempt, up to and including the runner's.
    fn bwrap_args(
        &self,
        spec: &RunSpec,
        attempt: &Attempt,
        run: &RunSetup,
    ) -> Vec<std::ffi::OsString> {
        let s = &self.settings;
        let mut a = Args::default();
        a.flags(&[
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--disable-userns",
        ]);
        for fd in &run.seccomp_fds {
            a.flag_val("--add-seccomp-fd", fd.to_string());
        }
        // `--as-pid-1`: the runner itself is the namespace's init, not a bubblewrap monitor
        // whose /proc/1/environ (the run's secrets) the agent could read. The runner makes
        // itself non-dumpable; its end still ends every process in the namespace.
        a.flags(&["--die-with-parent", "--new-session", "--as-pid-1"]);
        if run.gated {
            a.flags(&["--info-fd", &INFO_FD.to_string()]);
            a.flags(&["--block-fd", &BLOCK_FD.to_string()]);
        }
        a.flag_val("--uid", s.uid.to_string());
        a.flag_val("--gid", s.gid.to_string());
        a.flag_val("--hostname", "agent-sandbox");
        // The root is bubblewrap's empty tmpfs (made read-only once everything is
        // mounted on it), with the system directories shown on it.
        // Each is bound from the directory the private-file walk saw (`run.walked`).
        for path in SYSTEM_PATHS.iter().map(Path::new) {
            match std::fs::read_link(path) {
                Ok(target) if target.is_relative() => a.two("--symlink", &target, path),
                _ => {
                    if let Some(real) = run.walked.real(path) {
                        a.two("--ro-bind", real, path);
                    }
                }
            }
        }
        a.flag_val("--proc", "/proc");
        a.flag_val("--dev", "/dev");
        a.0.extend(limits::sized_tmpfs(s.shm_mb, Path::new("/dev/shm")));
        a.0.extend(limits::sized_tmpfs(s.tmp_mb, Path::new("/tmp")));
        let hidden = self.hidden_now();
        a.0.extend(network::bwrap_args(
            run.network,
            run.proxy_socket.as_deref(),
            &|p| self.is_hidden(&hidden, p),
        ));
        // Hidden places are covered: those inside a shown directory (the shadow files
        // under `/etc`, a secret under `sandbox.ro_paths`), and those not there to begin
        // with, whose path a mount below them (a mirror in the data dir) would otherwise
        // make a writable directory.
        let mut covered: Vec<&PathBuf> = Vec::new();
        for path in &hidden {
            if path.is_dir() {
                a.flag_val("--tmpfs", path);
            } else {
                a.two("--ro-bind", Path::new("/dev/null"), path);
            }
            covered.push(path);
        }
        a.0.extend(limits::sized_tmpfs(s.home_mb, &s.home));
        // The runner at a neutral path; what must stay visible under a hidden directory:
        // the agent and configured tool paths. Paths shown again are noted, to cover
        // the secrets under them once more.
        a.two("--ro-bind", &self.runner_exe, Path::new(INSIDE_RUNNER));
        let mut shown: Vec<PathBuf> = Vec::new();
        if let Some((found, real)) = resolve_program(&spec.agent.command) {
            if self.is_hidden(&hidden, &found) {
                a.two("--ro-bind", &real, &found);
                shown.push(found);
            }
        }
        for path in &s.ro_paths {
            if let Some(real) = run.walked.real(path) {
                a.two("--ro-bind", real, path);
                shown.push(path.clone());
            }
        }
        let inside = Path::new(INSIDE_ATTEMPT);
        a.0.extend(limits::sized_tmpfs(ATTEMPT_TMPFS_MB, inside));
        a.two("--ro-bind", &attempt.spec, &inside.join("spec.json"));
        // Warm start (see `warm.rs`): the mirror and a cached setup result read-only (a
        // setup result to store leaves over a pipe).
        let warm = &spec.warm;
        let setup = warm.setup.as_ref();
        for path in warm
            .mirror
            .iter()
            .chain(setup.and_then(|s| s.restore.as_ref()))
        {
            a.two("--ro-bind", path, path);
            shown.push(path.clone());
        }
        let workspace = inside.join(WORKSPACE_DIR);
        a.0.extend(limits::sized_tmpfs(s.workspace_mb, &workspace));
        if let Some(repo) = local_repository(&spec.repository) {
            a.two("--ro-bind", &repo, &repo);
            shown.push(repo);
        }
        // A hidden path under a path shown again would be visible through that mount
        // (a secret file inside the local repository, say): covered once more.
        for path in hidden
            .iter()
            .filter(|h| shown.iter().any(|s| h.starts_with(s) && *h != s))
        {
            if path.is_dir() {
                a.flag_val("--tmpfs", path);
            } else {
                a.two("--ro-bind", Path::new("/dev/null"), path);
            }
            covered.push(path);
        }
        // What of the shown directories only the sandbox's user (or its group) may see,
        // once every shown directory is bound.
        for path in private_paths::present(&run.walked.private) {
            if path.is_dir() {
                a.flag_val("--tmpfs", path);
            } else {
                a.two("--ro-bind", Path::new("/dev/null"), path);
            }
            covered.push(path);
        }
        // Covering directories are read-only too (only after the binds under them are
        // made, since their mount points are created in them); so are `/run`, `/dev` and
        // the root itself, on which bubblewrap made every mount point.
        covered.sort();
        covered.dedup();
        for path in covered.iter().filter(|p| p.is_dir()) {
            a.flag_val("--remount-ro", path);
        }
        if Path::new("/run").is_dir() {
            a.flag_val("--remount-ro", "/run");
        }
        a.flag_val("--remount-ro", "/dev");
        a.flag_val("--remount-ro", "/");
        a.flag_val("--chdir", inside);
        a.flags(&["--"]);
        // Limits set inside the sandbox's user namespace, after bubblewrap made it: the
        // kernel counts these per user namespace (since Linux 5.14), so each bounds this
        // sandbox alone. Set on bubblewrap instead, each would count everything of the
        // host user, and one run could starve a concurrent one. `prlimit` sets them on
        // itself, then becomes the runner (pid 1 stays the runner).
        let mut inside_limits: Vec<String> = Vec::new();
        if run.cgroup.is_none() {
            // No cgroup holds the process limit: RLIMIT_NPROC.
            inside_limits.push(format!("--nproc={n}:{n}", n = self.settings.max_processes));
        }
        if let Some(shares) = &self.shares {
            inside_limits.extend(shares.prlimit_args());
        }
        if !inside_limits.is_empty() {
            a.0.push(self.prlimit.clone().into());
            a.0.extend(inside_limits.into_iter().map(Into::into));
            a.flags(&["--"]);
        }
        a.flags(&[INSIDE_RUNNER, "runner", "--spec"]);
        a.0.push(inside.join("spec.json").into());
        a.flags(&["--result-fd", &RESULT_FD.to_string()]);
        if run.bundle.is_some() {
            a.flags(&["--bundle-fd", &BUNDLE_FD.to_string()]);
        }
        if run.setup.is_some() {
            a.flags(&["--setup-fd", &SETUP_FD.to_string()]);
        }
        a.flags(&["--workspace"]);
        a.0.push(workspace.into());
        a.0
    }

    /// The whole command: [cgroup entry,] prlimit, bubblewrap, the runner; with the
    /// environment rebuilt from the allow-list.
    fn command(&self, spec: &RunSpec, attempt: &Attempt, run: &RunSetup) -> Command {
        let s = &self.settings;
        let mut prlimit: Vec<std::ffi::OsString> = vec![
            "prlimit".into(),
            format!("--nofile={n}:{n}", n = s.max_open_files).into(),
        ];
        if let Some(host) = &self.host {
            prlimit.extend(host.setpriv());
        }
        prlimit.push(s.bwrap.clone().into());
        prlimit.extend(self.bwrap_args(spec, attempt, run));
        let mut cmd = match &run.cgroup {
            Some(cgroup) => cgroup.wrap(&prlimit),
            None => {
                let mut c = Command::new(&prlimit[0]);
                c.args(&prlimit[1..]);
                c
            }
        };
        cmd.env_clear();
        for name in ENV_BASE
            .iter()
            .copied()
            .chain(s.env_pass.iter().map(String::as_str))
        {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", DEFAULT_PATH);
        }
        cmd.env("HOME", &s.home)
            .env("USER", SANDBOX_USER)
            .env("LOGNAME", SANDBOX_USER)
            .env("TMPDIR", "/tmp");
        spec.secret_env.apply(&mut cmd);
        if let Some(port) = run.inside_port {
            for (name, value) in network::proxy_env(port) {
                cmd.env(name, value);
            }
        }
        cmd
    }
}

/// What one attempt's sandbox is set up with besides the spec.
struct RunSetup {
    network: NetworkMode,
    /// The worker's proxy socket, bound into the sandbox (`proxy` mode).
    proxy_socket: Option<PathBuf>,
    /// The loopback port the runner relays to it (`proxy` mode).
    inside_port: Option<u16>,
    cgroup: Option<AttemptCgroup>,
    /// Inherited descriptors of the seccomp programs.
    seccomp_fds: Vec<i32>,
    /// The bundle channel (a local repository's run).
    bundle: Option<BundleChannel>,
    /// The setup-result channel (a run that may store its setup in the cache).
    setup: Option<FileChannel>,
    /// The shown host directories as walked for this sandbox, and what of them to cover.
    walked: private_paths::Walked,
    /// Whether bubblewrap reports its pid and waits at a [`StartGate`].
    gated: bool,
}

/// A failed run some of whose processes the kernel killed for the memory limit fails
/// for that reason, not retried (the same work would reach the same limit), with what
/// the run reported after it. A run that succeeded all the same keeps its outcome.
fn out_of_memory(outcome: Outcome, killed: limits::OomKills) -> Outcome {
    tracing::warn!(
        killed = killed.count,
        limit_mb = killed.limit_mb,
        "sandbox processes killed for the memory limit"
    );
    if matches!(
        outcome.kind,
        OutcomeKind::Succeeded | OutcomeKind::Cancelled
    ) {
        return outcome;
    }
    let mut oom = outcome.failed_after(
        OutcomeKind::AgentError,
        killed.explain(outcome.error.as_deref()),
        false,
    );
    oom.cause = Some(FailureCause::OutOfMemory);
    oom.network_refused = outcome.network_refused;
    oom
}

/// How a process start refused for the process limit reads (EAGAIN from `fork` or
/// `clone`, as bubblewrap, the shell and git report it).
const PROCESS_LIMIT_REFUSAL: &str = "Resource temporarily unavailable";

/// Without a cgroup, on a kernel before 5.14, the process limit is RLIMIT_NPROC, which
/// counts every process of the host user: a run that failed because a process could not
/// be started says so, and what gives each sandbox a limit of its own.
fn explain_shared_process_limit(outcome: &mut Outcome, max_processes: u64) {
    if outcome.kind == OutcomeKind::Succeeded
        || !outcome
            .error
            .as_deref()
            .is_some_and(|e| e.contains(PROCESS_LIMIT_REFUSAL))
    {
        return;
    }
    let why = format!(
        " (a process could not be started: without a cgroup the sandbox's process limit is \
         RLIMIT_NPROC = sandbox.max_processes = {max_processes}, which counts every process \
         of the worker's host user, a concurrent run's too; give the worker a cgroup with \
         sandbox.cgroup_dir or sandbox.cgroup_v1_dirs, see docs/sandbox-network.md#limits)"
    );
    if let Some(error) = outcome.error.as_mut() {
        error.push_str(&why);
    }
    outcome.summary.push_str(&why);
}

/// bubblewrap's argument list.
#[derive(Default)]
struct Args(Vec<std::ffi::OsString>);

impl Args {
    fn flags(&mut self, flags: &[&str]) {
        self.0.extend(flags.iter().map(Into::into));
    }
    fn flag_val(&mut self, flag: &str, value: impl AsRef<std::ffi::OsStr>) {
        self.0.push(flag.into());
        self.0.push(value.as_ref().to_owned());
    }
    fn two(&mut self, flag: &str, a: &Path, b: &Path) {
        self.0.push(flag.into());
        self.0.push(a.as_os_str().to_owned());
        self.0.push(b.as_os_str().to_owned());
    }
}

/// Everything of the worker the sandbox must not see, canonical, parents first.
fn hidden_paths(settings: &Settings, work_root: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = ALWAYS_HIDDEN.iter().map(PathBuf::from).collect();
    paths.push(settings.local.data_dir.clone());
    paths.push(work_root.to_path_buf());
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        if home.parent().is_some() {
            paths.push(home);
        }
    }
    paths.extend(settings.sandbox.hide.iter().cloned());
    let mut real: Vec<PathBuf> = paths
        .into_iter()
        .filter_map(|p| p.canonicalize().ok())
        .filter(|p| p.parent().is_some())
        .collect();
    real.sort_by_key(|p| (p.components().count(), p.clone()));
    real.dedup();
    real
}

/// Refuses `sandbox.ro_paths` under `/proc`, `/sys` or `/dev`: the sandbox has its own
/// (`--proc`, `--dev`; no `/sys`), and binding the host's would show its processes and
/// devices, with thousands of private entries no sandbox can cover one by one.
fn check_ro_paths(ro_paths: &[PathBuf]) -> Result<(), String> {
    for path in ro_paths {
        let real = path.canonicalize().unwrap_or_else(|_| path.clone());
        for pseudo in ["/proc", "/sys", "/dev"] {
            if path.starts_with(pseudo) || real.starts_with(pseudo) {
                return Err(format!(
                    "sandbox.ro_paths names {}, under {pseudo}: the sandbox has its own \
                     {pseudo} or none, and the host's may not be shown; remove it",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

/// How to find what of the system directories and `sandbox.ro_paths` the sandbox's host
/// user must not see (see [`super::private_paths`]); never the agent program.
fn private_paths(settings: &Settings, host: Option<&HostUser>) -> private_paths::Plan {
    let roots = SYSTEM_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(settings.sandbox.ro_paths.iter().cloned())
        .collect();
    let keep: Vec<PathBuf> = resolve_program(&settings.agent.command)
        .map(|(found, real)| vec![found, real])
        .unwrap_or_default();
    private_paths::Plan {
        roots,
        // The Nix store is world-readable by construction (Nix canonicalises every store
        // path to 0444/0555, owned by root), and can hold millions of files.
        unwalked: vec![PathBuf::from("/nix/store")],
        viewer: Viewer::of(host),
        keep,
    }
}

/// Where a root worker keeps the copy of its executable that its sandboxes run, under
/// the work directory: owned by root, read-only, in a directory only root writes.
const STAGED_RUNNER: &str = "bin/ao-runner";

/// Makes the worker executable `exe` runnable by the host user, whose way to it is shut
/// (a build under root's home, say): a hard link, or a copy across file systems, at
/// [`STAGED_RUNNER`] under `work_root`, replaced atomically. The copy is the running
/// worker's own binary, so an upgrade of the installed one mid-life cannot pair a new
/// runner with an old worker.
fn stage_runner(exe: &Path, work_root: &Path) -> Result<PathBuf, BwrapError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let target = work_root.join(STAGED_RUNNER);
    let err = |source| BwrapError::StageRunner {
        path: target.clone(),
        source,
    };
    let dir = target.parent().unwrap_or(work_root);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    let temp = dir.join(format!(".ao-runner.{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let runnable_by_all = std::fs::metadata(exe)
        .map(|m| m.permissions().mode() & 0o005 == 0o005)
        .unwrap_or(false);
    if !runnable_by_all || std::fs::hard_link(exe, &temp).is_err() {
        std::fs::copy(exe, &temp).map_err(err)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o555)).map_err(err)?;
    }
    std::fs::rename(&temp, &target).map_err(err)?;
    Ok(target)
}

/// Where a program is found (as the runner will find it) and what that really is.
fn resolve_program(command: &str) -> Option<(PathBuf, PathBuf)> {
    let found = if command.contains('/') {
        let p = PathBuf::from(command);
        p.is_absolute().then_some(p)?
    } else {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(command))
            .find(|p| p.is_file())?
    };
    let real = found.canonicalize().ok()?;
    Some((found, real))
}

#[async_trait]
impl SandboxDriver for BwrapDriver {
    fn name(&self) -> &'static str {
        "bwrap"
    }

    async fn run(
        &self,
        spec: &RunSpec,
        events: mpsc::Sender<RunnerEvent>,
        cancel: CancellationToken,
    ) -> Outcome {
        let local = local_repository(&spec.repository);
        let mut spec = spec.clone();
        if local.is_some() {
            spec.delivery = Delivery::Bundle;
        }
        let attempt = match Attempt::prepare(&self.work_root, &spec).await {
            Ok(a) => a,
            Err(outcome) => return outcome,
        };
        if let Some(host) = &self.host {
            // The attempt directory (the spec, which bubblewrap binds as the host user)
            // and the setup cache's incoming directory (the runner's setup result).
            let incoming = spec.warm.setup.as_ref().and_then(|s| s.store.as_deref());
            for dir in std::iter::once(attempt.path()).chain(incoming) {
                if let Err(e) = host.own(dir) {
                    return infra(
                        format!("cannot give {} to sandbox.host_uid: {e}", dir.display()),
                        true,
                    );
                }
            }
        }
        let network = NetworkMode::of(&self.settings, spec.capability);
        let mut proxy = None;
        let mut inside_port = None;
        if network == NetworkMode::Proxy {
            // The model key stays with the proxy; the sandbox never sees it.
            let key = spec.secret_env.take(network::MODEL_KEY_ENV);
            let options = network::proxy_options(&self.all, &spec, key);
            inside_port = Some(options.inside_port);
            match RunProxy::start(&self.work_root, options, events.clone()) {
                Ok(p) => proxy = Some(p),
                Err(e) => return infra(format!("cannot start the sandbox's proxy: {e}"), true),
            }
        }
        let cgroup = match &self.cgroups {
            Some(c) => {
                let name = attempt
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| "attempt".into());
                match c.make(&name, &self.limits) {
                    Ok(c) => Some(c),
                    Err(e) => return infra(format!("cannot set up the sandbox cgroup: {e}"), true),
                }
            }
            None => None,
        };
        let seccomp = match super::seccomp::program_files() {
            Ok(f) => f,
            Err(e) => return infra(e.to_string(), false),
        };
        let mut channels = Vec::new();
        let gate = match &self.ucounts {
            Some(shares) => match StartGate::open(shares) {
                Ok((gate, mappings)) => {
                    channels.extend(mappings);
                    Some(gate)
                }
                Err(e) => return infra(e.to_string(), true),
            },
            None => None,
        };
        let bundle = match local {
            Some(_) => match BundleChannel::open(&self.work_root) {
                Ok((bundle, mapping)) => {
                    channels.push(mapping);
                    Some(bundle)
                }
                Err(e) => return infra(e.to_string(), true),
            },
            None => None,
        };
        // A setup result to store comes over a pipe into the incoming file the worker
        // checks afterwards (see `warm.rs`); the sandbox never sees the directory.
        let stored = match spec
            .warm
            .setup
            .as_ref()
            .and_then(|s| Some((s.store.as_ref()?, &s.key)))
        {
            Some((store, key)) => {
                use std::os::unix::fs::OpenOptionsExt;
                let limit = self
                    .all
                    .warm
                    .setup_cache_entry_max_mb
                    .saturating_mul(1 << 20);
                let opened = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(store.join(format!("{key}.tar")))
                    .map_err(|e| e.to_string())
                    .and_then(|file| {
                        FileChannel::open(file, SETUP_FD, limit, "setup result")
                            .map_err(|e| e.to_string())
                    });
                match opened {
                    Ok((channel, mapping)) => {
                        channels.push(mapping);
                        Some(channel)
                    }
                    Err(e) => return infra(format!("cannot open the setup channel: {e}"), true),
                }
            }
            None => None,
        };
        // Walked now, not at the worker's start: files installed or made private since
        // are covered too.
        let plan = self.private.clone();
        let started = std::time::Instant::now();
        let walked = match tokio::task::spawn_blocking(move || plan.walk()).await {
            Ok(walked) => walked,
            Err(e) => return infra(format!("cannot walk the shown directories: {e}"), true),
        };
        if walked.private.len() > private_paths::MAX_COVERED {
            return infra(
                format!(
                    "{} private files and directories lie directly in the shown directories, \
                     more than the {} a sandbox can cover one by one: make them readable to \
                     all users, move them into a directory of their own, or drop that \
                     directory from sandbox.ro_paths",
                    walked.private.len(),
                    private_paths::MAX_COVERED
                ),
                false,
            );
        }
        tracing::debug!(
            covered = walked.private.len(),
            ms = started.elapsed().as_millis() as u64,
            "private files of the shown directories found"
        );
        let mut setup = RunSetup {
            network,
            proxy_socket: proxy.as_ref().map(RunProxy::socket),
            inside_port,
            cgroup,
            seccomp_fds: seccomp
                .iter()
                .map(std::os::fd::AsRawFd::as_raw_fd)
                .collect(),
            bundle,
            setup: stored,
            walked,
            gated: gate.is_some(),
        };
        let cmd = self.command(&spec, &attempt, &setup);
        let limit = Duration::from_secs(spec.agent.timeout_secs) + RUNNER_MARGIN;
        let mut outcome = supervise(
            cmd, &attempt, limit, events, cancel, seccomp, channels, gate,
        )
        .await;
        if let Some(killed) = setup.cgroup.as_ref().and_then(AttemptCgroup::oom_kills) {
            outcome = out_of_memory(outcome, killed);
        }
        if self.cgroups.is_none() && !limits::nproc_per_user_namespace() {
            explain_shared_process_limit(&mut outcome, self.limits.max_processes);
        }
        let bundle = match setup.bundle.take() {
            Some(channel) => channel.finish().await.map_err(|e| e.to_string()),
            None => Ok(None),
        };
        if let Some(channel) = setup.setup.take() {
            // A result that did not arrive whole fails the cache's hash check later.
            if let Err(e) = channel.finish().await {
                tracing::warn!(error = %e, "the setup result did not arrive");
            }
        }
        if let Some(proxy) = proxy {
            network::finish_proxy(proxy, &mut outcome).await;
        }
        if let Some(cgroup) = setup.cgroup {
            cgroup.remove().await;
        }
        if let Some(repo) = &local {
            let bundle = bundle.as_ref().map(Option::as_deref).map_err(Clone::clone);
            outcome = deliver_bundle(&spec, repo, bundle, outcome).await;
        }
        outcome
    }
}

/// Puts the work of a run on a local repository into it from the runner's `bundle` (see
/// [`local_repo`]): a succeeded run's commit onto the task branch; the commits of a run
/// whose branch moved under a conflicting change (cause `branch_moved`) onto its side
/// branch. A branch that moved after the runner looked gets the work on the side branch
/// too, and the run fails for good with cause `branch_moved`, as the runner's own push
/// would: the agent is not run again. Any other failure to deliver is retryable.
async fn deliver_bundle(
    spec: &RunSpec,
    repo: &Path,
    bundle: Result<Option<&Path>, String>,
    outcome: Outcome,
) -> Outcome {
    let failed = |kind, error: String, retryable| outcome.failed_after(kind, error, retryable);
    let delivers = outcome.kind == OutcomeKind::Succeeded && outcome.commit.is_some();
    let keeps = outcome.cause == Some(FailureCause::BranchMoved);
    let bundle = match bundle {
        Ok(bundle) => bundle,
        Err(e) if delivers || keeps => return failed(OutcomeKind::Infrastructure, e, true),
        Err(_) => return outcome,
    };
    let kept_at = crate::runner::git::side_branch(spec);
    if keeps {
        return match local_repo::keep_aside(bundle, repo, &kept_at).await {
            Ok(()) => outcome,
            Err(e) => failed(
                OutcomeKind::Infrastructure,
                format!("the work could not be kept at {kept_at}: {e}"),
                true,
            ),
        };
    }
    let (Some(commit), true) = (outcome.commit.clone(), delivers) else {
        return outcome;
    };
    match local_repo::deliver(bundle, repo, &spec.branch, &commit).await {
        Ok(()) => {
            tracing::info!(%commit, branch = %spec.branch, "bundle pushed into the local repository");
            outcome
        }
        Err(moved @ local_repo::DeliveryError::Moved { .. }) => {
            match local_repo::keep_aside(bundle, repo, &kept_at).await {
                Ok(()) => failed(
                    OutcomeKind::AgentError,
                    format!("branch moved, work kept at {kept_at}: {moved}"),
                    false,
                )
                .with_cause(FailureCause::BranchMoved),
                Err(e) => failed(
                    OutcomeKind::Infrastructure,
                    format!("{moved}, and the work could not be kept at {kept_at}: {e}"),
                    true,
                ),
            }
        }
        Err(e) => failed(OutcomeKind::Infrastructure, e.to_string(), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_out_of_the_host_users_reach_is_staged_for_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let private = dir.path().join("home");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let exe = private.join("worker");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let host = HostUser {
            uid: 4242,
            gid: 4242,
        };
        assert!(!host.can_run(&exe));
        let staged = stage_runner(&exe, &work).unwrap();
        assert!(host.can_run(&staged), "{}", staged.display());
        assert_eq!(std::fs::read(&staged).unwrap(), b"#!/bin/sh\n");
        // Staging again (a restart) replaces the copy.
        std::fs::remove_file(&exe).unwrap();
        std::fs::write(&exe, b"#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)).unwrap();
        let again = stage_runner(&exe, &work).unwrap();
        assert_eq!(again, staged);
        assert!(
            host.can_run(&again),
            "a private executable is copied runnable"
        );
        assert_eq!(std::fs::read(&again).unwrap(), b"#!/bin/sh\nexit 0\n");
    }

    #[test]
    fn hidden_paths_put_parents_first() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("data").join("work");
        std::fs::create_dir_all(&work).unwrap();
        let mut settings = Settings::default();
        settings.local.data_dir = dir.path().join("data");
        settings.sandbox.hide = vec![dir.path().join("missing")];
        let hidden = hidden_paths(&settings, &work);
        let data = dir.path().join("data").canonicalize().unwrap();
        let work = work.canonicalize().unwrap();
        let d = hidden.iter().position(|p| *p == data).unwrap();
        let w = hidden.iter().position(|p| *p == work).unwrap();
        assert!(d < w, "{hidden:?}");
        assert!(!hidden.iter().any(|p| p.ends_with("missing")));
    }
}
