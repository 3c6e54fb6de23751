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
//! - an unprivileged user inside (`sandbox.uid`/`sandbox.gid`, 1000 by default). With a
//!   user namespace the worker's own uid is mapped to it, so the attempt directory the
//!   worker made is owned by the sandbox user whether the worker runs as root or not; no
//!   chown is needed.
//! - the host root read-only, a fresh `/proc`, a minimal `/dev`, an empty tmpfs `/tmp` and
//!   `$HOME`; the worker's private places hidden under empty tmpfs mounts (its data dir with
//!   the SQLite files, its whole work root, `/root`, `/home`, the worker's `$HOME`,
//!   `/run/secrets`, secret files named in the configuration, `sandbox.hide`), read-only,
//!   and the shadow files replaced by empty ones.
//! - exactly two writable places: the attempt directory (run spec, result file, clone), and
//!   — only when the repository is a local path or `file://` URL — that repository, since
//!   the runner must push into it. The agent can therefore write to a local remote as well;
//!   over HTTPS or SSH nothing of the remote is visible.
//! - the environment rebuilt from an allow-list: PATH, LANG, LC_ALL, TZ, HOME, USER, LOGNAME,
//!   TMPDIR and the names in `sandbox.env_pass`. Values travel in bubblewrap's environment
//!   (never `--setenv`, which would show them in `/proc/*/cmdline`); bubblewrap hands its
//!   environment to the sandbox unchanged, and it gets nothing else from the worker.
//! - network shared with the host, or none at all (`--unshare-net`, not even loopback) for
//!   the capabilities in `sandbox.network_off`.
//! - limits: `prlimit` (util-linux) wraps bubblewrap and sets RLIMIT_NPROC
//!   (`sandbox.max_processes`) and RLIMIT_NOFILE (`sandbox.max_open_files`). RLIMIT_NPROC
//!   counts every process of the worker's real user and does not apply to root, so under a
//!   root worker only a cgroup limits processes. Memory is limited only with
//!   `sandbox.cgroup_dir`, a delegated cgroup v2 directory: each sandbox then runs in a
//!   child cgroup with `memory.max` and `pids.max` (address-space limits break Node-based
//!   agents, so none is set).
//!
//! A limit of running the worker as root: the sandbox user maps to host uid 0, so files
//! readable only by root stay readable to the agent unless hidden. Run the worker as an
//! unprivileged user where you can.

use super::process::{infra, supervise, Attempt, RUNNER_MARGIN};
use super::SandboxDriver;
use crate::spec::{RunSpec, RunnerEvent};
use ao_shared::config::{SandboxSettings, Settings};
use ao_shared::secret::SecretRef;
use ao_shared::task::Outcome;
use async_trait::async_trait;
use std::path::{Path, PathBuf};
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
];
/// The worker's variables passed in besides `sandbox.env_pass`.
const ENV_BASE: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];
/// PATH inside when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The user name inside.
const SANDBOX_USER: &str = "agent";
/// How often the per-attempt cgroup removal is tried while its processes die.
const CGROUP_RMDIR_TRIES: u32 = 50;

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
    #[error("prlimit (util-linux) is needed by the bwrap driver: {0}")]
    Prlimit(String),
    #[error("sandbox.cgroup_dir {path}: {detail}")]
    Cgroup { path: PathBuf, detail: String },
}

/// The bubblewrap sandbox driver.
pub struct BwrapDriver {
    /// Where attempt directories are made (canonical).
    work_root: PathBuf,
    /// The worker executable, which contains the runner (canonical).
    runner_exe: PathBuf,
    settings: SandboxSettings,
    /// Host paths covered inside, parents first.
    hidden: Vec<PathBuf>,
}

impl BwrapDriver {
    /// Checks that bubblewrap and prlimit work and works out what to hide.
    pub fn new(work_root: PathBuf, settings: &Settings) -> Result<Self, BwrapError> {
        let sandbox = settings.sandbox.clone();
        if sandbox.uid == 0 || sandbox.gid == 0 {
            return Err(BwrapError::RootUser);
        }
        std::fs::create_dir_all(&work_root)
            .and_then(|_| work_root.canonicalize())
            .map_err(|source| BwrapError::WorkDir {
                path: work_root.clone(),
                source,
            })
            .and_then(|work_root| {
                let runner_exe = std::env::current_exe()
                    .and_then(|p| p.canonicalize())
                    .map_err(BwrapError::Exe)?;
                let hidden = hidden_paths(settings, &work_root);
                let driver = Self {
                    work_root,
                    runner_exe,
                    settings: sandbox,
                    hidden,
                };
                driver.probe()?;
                Ok(driver)
            })
    }

    /// Runs `true` in a minimal sandbox, so a broken setup fails at start, not per task.
    fn probe(&self) -> Result<(), BwrapError> {
        let s = &self.settings;
        let out = std::process::Command::new(&s.bwrap)
            .args(["--unshare-user", "--unshare-pid", "--uid"])
            .arg(s.uid.to_string())
            .arg("--gid")
            .arg(s.gid.to_string())
            .args([
                "--ro-bind",
                "/",
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "true",
            ])
            .output()
            .map_err(|e| BwrapError::Unusable {
                program: s.bwrap.display().to_string(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(BwrapError::Unusable {
                program: s.bwrap.display().to_string(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let ok = std::process::Command::new("prlimit")
            .args(["--nofile", "true"])
            .output()
            .map_err(|e| BwrapError::Prlimit(e.to_string()))?;
        if !ok.status.success() {
            return Err(BwrapError::Prlimit(
                String::from_utf8_lossy(&ok.stderr).trim().to_string(),
            ));
        }
        if let Some(dir) = &s.cgroup_dir {
            let probe = dir.join("ao-probe");
            std::fs::create_dir(&probe)
                .and_then(|_| std::fs::remove_dir(&probe))
                .map_err(|e| BwrapError::Cgroup {
                    path: dir.clone(),
                    detail: format!("cannot make a child cgroup: {e}"),
                })?;
        }
        Ok(())
    }

    /// Whether `path` is covered inside: hidden, or under the fresh `/tmp` or home.
    fn is_hidden(&self, path: &Path) -> bool {
        path.starts_with("/tmp")
            || path.starts_with(&self.settings.home)
            || self.hidden.iter().any(|h| path.starts_with(h))
    }

    /// bubblewrap's arguments for one attempt, up to and including the runner's.
    fn bwrap_args(&self, spec: &RunSpec, attempt: &Attempt) -> Vec<std::ffi::OsString> {
        let s = &self.settings;
        let mut a = Args::default();
        a.flags(&[
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ]);
        if s.network_off.contains(&spec.capability) {
            a.flags(&["--unshare-net"]);
        }
        // `--as-pid-1`: the runner itself is the namespace's init, not a bubblewrap monitor
        // whose /proc/1/environ (the run's secrets) the agent could read. The runner makes
        // itself non-dumpable; its end still ends every process in the namespace.
        a.flags(&["--die-with-parent", "--new-session", "--as-pid-1"]);
        a.flag_val("--uid", s.uid.to_string());
        a.flag_val("--gid", s.gid.to_string());
        a.flag_val("--hostname", "agent-sandbox");
        a.two("--ro-bind", Path::new("/"), Path::new("/"));
        a.flag_val("--proc", "/proc");
        a.flag_val("--dev", "/dev");
        a.flag_val("--tmpfs", "/tmp");
        for path in &self.hidden {
            if path.is_dir() {
                a.flag_val("--tmpfs", path);
            } else {
                a.two("--ro-bind", Path::new("/dev/null"), path);
            }
        }
        a.flag_val("--tmpfs", &s.home);
        // What must stay visible under a hidden directory: the runner, the agent, and
        // configured tool paths.
        if self.is_hidden(&self.runner_exe) {
            a.two("--ro-bind", &self.runner_exe, &self.runner_exe);
        }
        if let Some((found, real)) = resolve_program(&spec.agent.command) {
            if self.is_hidden(&found) {
                a.two("--ro-bind", &real, &found);
            }
        }
        for path in &s.ro_paths {
            if let Ok(real) = path.canonicalize() {
                a.two("--ro-bind", &real, path);
            }
        }
        a.two("--bind", attempt.path(), attempt.path());
        // Warm start (see `warm.rs`): the mirror and a cached setup result read-only, the
        // setup result's incoming directory writable.
        let warm = &spec.warm;
        let setup = warm.setup.as_ref();
        for path in warm
            .mirror
            .iter()
            .chain(setup.and_then(|s| s.restore.as_ref()))
        {
            a.two("--ro-bind", path, path);
        }
        if let Some(store) = setup.and_then(|s| s.store.as_ref()) {
            a.two("--bind", store, store);
        }
        if let Some(repo) = local_repository(&spec.repository) {
            a.two("--bind", &repo, &repo);
        }
        // Hidden directories are read-only too (only after the binds under them are made,
        // since their mount points are created in them).
        for path in self.hidden.iter().filter(|p| p.is_dir()) {
            a.flag_val("--remount-ro", path);
        }
        a.flag_val("--chdir", attempt.path());
        a.flags(&["--"]);
        a.0.push(self.runner_exe.clone().into());
        a.flags(&["runner", "--spec"]);
        a.0.push(attempt.spec.clone().into());
        a.flags(&["--result"]);
        a.0.push(attempt.result.clone().into());
        a.0
    }

    /// The whole command: [cgroup entry,] prlimit, bubblewrap, the runner; with the
    /// environment rebuilt from the allow-list.
    fn command(&self, spec: &RunSpec, attempt: &Attempt, cgroup: Option<&Path>) -> Command {
        let s = &self.settings;
        let mut prlimit: Vec<std::ffi::OsString> = vec![
            "prlimit".into(),
            format!("--nproc={n}:{n}", n = s.max_processes).into(),
            format!("--nofile={n}:{n}", n = s.max_open_files).into(),
            s.bwrap.clone().into(),
        ];
        prlimit.extend(self.bwrap_args(spec, attempt));
        let mut cmd = match cgroup {
            // The shell moves itself into the cgroup before it becomes prlimit, so every
            // process of the sandbox starts inside it.
            Some(dir) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"")
                    .arg("sh")
                    .arg(dir)
                    .args(&prlimit);
                c
            }
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
        cmd
    }

    /// Makes the attempt's cgroup with its limits, when `sandbox.cgroup_dir` is set.
    fn make_cgroup(&self, attempt: &Attempt) -> std::io::Result<Option<PathBuf>> {
        let Some(parent) = &self.settings.cgroup_dir else {
            return Ok(None);
        };
        let name = attempt
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "attempt".into());
        let dir = parent.join(format!("ao-{name}"));
        std::fs::create_dir(&dir)?;
        let mut limits = vec![("pids.max", self.settings.max_processes.to_string())];
        if let Some(mb) = self.settings.memory_mb {
            limits.push(("memory.max", (mb * 1024 * 1024).to_string()));
            limits.push(("memory.swap.max", "0".into()));
        }
        for (file, value) in limits {
            if let Err(e) = std::fs::write(dir.join(file), &value) {
                // memory.swap.max is absent without swap accounting; the rest must work.
                if file != "memory.swap.max" {
                    let _ = std::fs::remove_dir(&dir);
                    return Err(e);
                }
            }
        }
        Ok(Some(dir))
    }
}

/// Removes an attempt's cgroup once its processes are gone.
async fn remove_cgroup(dir: &Path) {
    for _ in 0..CGROUP_RMDIR_TRIES {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(cgroup = %dir.display(), "cannot remove the sandbox cgroup");
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
    for secret in [
        &settings.api.token,
        &settings.github.webhook_secret,
        &settings.github.private_key,
    ]
    .into_iter()
    .flatten()
    {
        if let SecretRef::File(path) = secret {
            paths.push(path.clone());
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

/// The directory of a repository given as a local path or `file://` URL.
fn local_repository(repository: &str) -> Option<PathBuf> {
    let path = repository.strip_prefix("file://").unwrap_or(repository);
    if !path.starts_with('/') {
        return None;
    }
    let real = Path::new(path).canonicalize().ok()?;
    real.is_dir().then_some(real)
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
        let attempt = match Attempt::prepare(&self.work_root, spec).await {
            Ok(a) => a,
            Err(outcome) => return outcome,
        };
        let cgroup = match self.make_cgroup(&attempt) {
            Ok(c) => c,
            Err(e) => return infra(format!("cannot set up the sandbox cgroup: {e}"), true),
        };
        let cmd = self.command(spec, &attempt, cgroup.as_deref());
        let limit = Duration::from_secs(spec.agent.timeout_secs) + RUNNER_MARGIN;
        let outcome = supervise(cmd, &attempt, limit, events, cancel).await;
        if let Some(dir) = cgroup {
            remove_cgroup(&dir).await;
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_repositories_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let url = format!("file://{}", dir.path().display());
        assert_eq!(local_repository(&url), Some(real.clone()));
        assert_eq!(
            local_repository(&dir.path().display().to_string()),
            Some(real)
        );
        assert_eq!(local_repository("https://example.com/a/b.git"), None);
        assert_eq!(local_repository("git@example.com:a/b.git"), None);
        assert_eq!(local_repository("/nonexistent/repo.git"), None);
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
