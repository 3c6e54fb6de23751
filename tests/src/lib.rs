//! Test support for the end-to-end tests: starts the real `coordinator` and `worker`
//! binaries as processes against a fresh data directory (or the coordinator in-process,
//! [`inproc`], where no process boundary is under test), makes real git repositories,
//! and talks to the REST API over HTTP.

pub mod fake_github;
pub mod fake_nomad;
pub mod faulty_store;
pub mod hostile;
pub mod inproc;
pub mod leases;
pub mod measure;
pub mod model_server;
pub mod moto;
pub mod relay;
pub mod scenario;
pub mod stack;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The API token every test cluster uses.
pub const TOKEN: &str = "test-token-0123456789";

/// The unprivileged host user of the tests that need one (made by
/// `scripts/install-deps.sh test` when the tests run as root): the sandbox user of a root
/// worker (`sandbox.host_uid`), and the user an ordinary-user worker runs as.
pub const TEST_USER: &str = "ao-sandbox-test";

/// The uid and gid of [`TEST_USER`], if it exists.
pub fn test_user() -> Option<(u32, u32)> {
    nix::unistd::User::from_name(TEST_USER)
        .ok()
        .flatten()
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

/// Whether the tests run as root.
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The directory holding the built binaries (`target/debug`), found from the test binary.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The path of a built binary; fails clearly when `cargo build` was not run first.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (make test does)",
        path.display()
    );
    path
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A daemon started by a test; killed when dropped.
pub struct Daemon {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0))
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(self.pid(), signal);
    }

    /// Kills with SIGKILL at once and reaps.
    pub fn kill_hard(&mut self) {
        self.signal(Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `limit` for the exit code.
    pub fn terminate(&mut self, limit: Duration) -> Result<i32> {
        self.signal(Signal::SIGTERM);
        let mut child = self.child.take().context("already stopped")?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{} did not exit within {limit:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A coordinator and any number of workers sharing one data directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub env: Vec<(String, String)>,
    pub coordinator: Option<Daemon>,
    /// The coordinator when started in-process ([`Cluster::start_in_process`]).
    pub inproc: Option<inproc::InProcess>,
    pub workers: Vec<Daemon>,
    pub http: reqwest::Client,
    /// The host user the daemons run as, when not the tests' own (see [`Cluster::run_as`]).
    pub user: Option<(u32, u32)>,
}

impl Cluster {
    /// A cluster whose settings are `AO__…` variables; `extra` adds or overrides.
    ///
    /// Under root, a `bwrap` worker runs its sandboxes as [`TEST_USER`]
    /// (`sandbox.host_uid`), so the cluster's directory is left searchable by it.
    pub fn new(extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut host_user: Vec<(String, String)> = Vec::new();
        if running_as_root() {
            if let Some((uid, gid)) = test_user() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                    .expect("chmod cluster dir");
                host_user.push(("AO__SANDBOX__HOST_UID".into(), uid.to_string()));
                host_user.push(("AO__SANDBOX__HOST_GID".into(), gid.to_string()));
            }
        }
        let port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("AO__BACKEND__KIND", "local".to_string()),
            (
                "AO__LOCAL__DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
            ("AO__SERVER__LISTEN", format!("127.0.0.1:{port}")),
            ("AO__API__TOKEN", "env:AO_TEST_API_TOKEN".to_string()),
            ("AO_TEST_API_TOKEN", TOKEN.to_string()),
            ("AO__SANDBOX__DRIVER", "process".to_string()),
            // Script agents by default; the Claude Code tests set `claude`.
            ("AO__AGENT__KIND", "command".to_string()),
            (
                "AO__WORKER__WORK_DIR",
                dir.path().join("work").display().to_string(),
            ),
            ("AO__QUEUE__WAIT_SECS", "2".to_string()),
            ("AO__COORDINATOR__DEPTH_POLL_SECS", "1".to_string()),
            ("AO__COORDINATOR__SHUTDOWN_GRACE_SECS", "3".to_string()),
            ("AO__WORKER__SHUTDOWN_GRACE_SECS", "5".to_string()),
            ("RUST_LOG", "info".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(host_user)
        .collect();
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        }
        Self {
            dir,
            port,
            env,
            coordinator: None,
            inproc: None,
            workers: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            user: None,
        }
    }

    /// Runs every daemon started from now on as host user `uid`:`gid` (an ordinary-user
    /// deployment), giving it the cluster's directory (again before each start, so what
    /// the test made in between is its too).
    pub fn run_as(&mut self, uid: u32, gid: u32) {
        self.env
            .retain(|(k, _)| !k.starts_with("AO__SANDBOX__HOST_"));
        self.user = Some((uid, gid));
    }

    fn give_dir(&self) {
        let Some((uid, gid)) = self.user else { return };
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(self.dir.path())
            .status()
            .expect("chown runs");
        assert!(status.success(), "chown -R {uid}:{gid} failed");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The binary `program` as the daemons' user can run it: the built one, or, for a
    /// cluster run as another user (whose way into the build directory, under root's
    /// home say, may be shut), a copy in the cluster's directory.
    fn program(&self, program: &str) -> PathBuf {
        let built = bin(program);
        let Some((uid, gid)) = self.user else {
            return built;
        };
        let dir = self.dir.path().join("bin");
        let copy = dir.join(program);
        if !copy.exists() {
            std::fs::create_dir_all(&dir).expect("bin dir");
            // A copy, not a hard link: the cluster's directory is given to its user.
            std::fs::copy(&built, &copy).expect("copy of the binary");
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown bin dir");
        }
        copy
    }

    fn spawn(&self, program: &str, name: &str, extra: &[(&str, &str)]) -> Daemon {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        self.give_dir();
        let mut cmd = Command::new(self.program(program));
        let home = match self.user {
            // Its own home: the tests' one is not its to read.
            Some((uid, gid)) => {
                use std::os::unix::process::CommandExt;
                cmd.uid(uid).gid(gid);
                let home = self.dir.path().join("home");
                std::fs::create_dir_all(&home).expect("home dir");
                std::os::unix::fs::chown(&home, Some(uid), Some(gid)).expect("chown home");
                home.display().to_string()
            }
            None => std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // A binary just copied (see `program`) may still be open for writing in a child
        // another test forked meanwhile, until that child execs: ETXTBSY, retried.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Ok(child) => break child,
                Err(e)
                    if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
                        && tries < 50 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot start {program}: {e}"),
            }
        };
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// Starts the coordinator and waits until it is ready.
    pub async fn start_coordinator(&mut self) -> Result<()> {
        let d = self.spawn("coordinator", "coordinator", &[]);
        self.coordinator = Some(d);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("coordinator not ready: {}", self.coordinator_log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the coordinator in this process (same settings, same port) and waits until
    /// it is ready. Its context is `self.inproc.cx`.
    pub async fn start_in_process(&mut self) -> Result<()> {
        let listen = format!("127.0.0.1:{}", self.port);
        let c = inproc::InProcess::start(self.dir.path(), &self.env, &listen).await?;
        self.inproc = Some(c);
        Ok(())
    }

    /// Starts the coordinator in this process like [`Cluster::start_in_process`], with
    /// its backends passed through `wrap` first (the fault-injection point: a wrapped
    /// store or queue).
    pub async fn start_in_process_with(
        &mut self,
        wrap: impl FnOnce(ao_shared::backend::Backends) -> ao_shared::backend::Backends,
    ) -> Result<()> {
        let listen = format!("127.0.0.1:{}", self.port);
        let c = inproc::InProcess::start_with(self.dir.path(), &self.env, &listen, wrap).await?;
        self.inproc = Some(c);
        Ok(())
    }

    /// The in-process coordinator's context; panics when it was started as a process.
    pub fn cx(&self) -> &ao_coordinator::Coordinator {
        &self
            .inproc
            .as_ref()
            .expect("coordinator started in-process")
            .cx
    }

    /// Reads one sample of the coordinator's /metrics: the value of the series whose
    /// line starts with `series` (name and labels as rendered), 0 when absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0))
    }

    /// Starts a worker with extra settings; returns its index.
    pub fn start_worker(&mut self, extra: &[(&str, &str)]) -> usize {
        let n = self.workers.len();
        let id = format!("worker-{n}");
        let listen = format!("127.0.0.1:{}", free_port());
        let mut all: Vec<(&str, &str)> = vec![
            ("AO__WORKER__LISTEN", listen.as_str()),
            ("AO__WORKER__ID", id.as_str()),
        ];
        all.extend_from_slice(extra);
        let d = self.spawn("worker", &id, &all);
        self.workers.push(d);
        n
    }

    pub fn coordinator_log(&self) -> String {
        self.coordinator
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }

    /// Every daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- coordinator ---\n{}\n", self.coordinator_log());
        for w in &self.workers {
            s.push_str(&format!("--- {} ---\n{}\n", w.name, w.log_text()));
        }
        s
    }

    /// POST /api/v1/tasks; returns (status, body).
    pub async fn submit(&self, body: Value) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(self.url("/api/v1/tasks"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Submits a task of the `code` pipeline on the repository at `repo` for `branch`;
    /// its id. An answer other than 202 is an error.
    pub async fn submit_code(&self, repo: &Path, branch: &str, prompt: &str) -> Result<String> {
        let (status, task) = self
            .submit(serde_json::json!({
                "repository": repo.display().to_string(),
                "prompt": prompt,
                "pipeline": "code",
                "branch": branch,
            }))
            .await?;
        if status != 202 {
            bail!("POST task: {status} {task}");
        }
        match task["id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => bail!("POST task: no id in {task}"),
        }
    }

    /// Waits until the task ends (`succeeded` or `failed`); returns it.
    pub async fn wait_ended(&self, id: &str, limit: Duration) -> Result<Value> {
        self.wait_for_status(id, &["succeeded", "failed"], limit)
            .await
    }

    pub async fn get_json(&self, path: &str) -> Result<(u16, Value)> {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn post_json(&self, path: &str) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn task(&self, id: &str) -> Result<Value> {
        let (status, body) = self.get_json(&format!("/api/v1/tasks/{id}")).await?;
        if status != 200 {
            bail!("GET task {id}: {status} {body}");
        }
        Ok(body)
    }

    /// Waits until the task reaches one of `statuses`; returns it.
    pub async fn wait_for_status(
        &self,
        id: &str,
        statuses: &[&str],
        limit: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let task = self.task(id).await?;
            if statuses.iter().any(|s| task["status"] == *s) {
                return Ok(task);
            }
            if Instant::now() > deadline {
                bail!(
                    "task {id} is {} after {limit:?}, not {statuses:?}\n{task:#}\n{}",
                    task["status"],
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads the coordinator's /metrics.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(self.url("/metrics"))
            .send()
            .await?
            .text()
            .await?)
    }
}

/// Runs git with a fixed identity; panics with its output when it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    // The repositories of a cluster run as another user belong to that user.
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "safe.directory=*"])
        .args(args)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare repository at `<dir>/<name>.git` with one commit on `main` holding `files`.
pub fn bare_repo(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let bare = dir.join(format!("{name}.git"));
    let seed = dir.join(format!("{name}-seed"));
    std::fs::create_dir_all(&seed).expect("seed dir");
    git(&seed, &["init", "--quiet", "-b", "main"]);
    std::fs::write(seed.join("README.md"), format!("# {name}\n")).expect("readme");
    for (path, text) in files {
        let p = seed.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("dirs");
        }
        std::fs::write(p, text).expect("file");
    }
    git(&seed, &["add", "-A"]);
    git(&seed, &["commit", "--quiet", "-m", "initial"]);
    git(
        dir,
        &[
            "clone",
            "--quiet",
            "--bare",
            seed.to_str().expect("utf-8 path"),
            bare.to_str().expect("utf-8 path"),
        ],
    );
    bare
}

/// An executable script at `<dir>/<name>`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("#!/usr/bin/env bash\nset -euo pipefail\n{body}\n"),
    )
    .expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// The agent of the process-starvation tests: on `agent/hog` it forks up to 100 sleepers
/// (stopping at its limit), says `hog-forked=N`, and holds them; on any other branch it
/// forks 10 processes and commits `other-forked=10` in `other.txt` if it could.
pub const HOG_OR_OTHER: &str = r#"
set +e
if [ "$AO_BRANCH" = agent/hog ]; then
  perl -e '$| = 1; my $n = 0; for (1..100) { my $p = fork(); last unless defined $p;
    if ($p == 0) { sleep 120; exit 0 } $n++ }
    print "hog-forked=$n\n"; sleep 120;'
else
  perl -e 'my @k; for (1..10) { my $p = fork(); die "fork: $!" unless defined $p;
    if ($p == 0) { exit 0 } push @k, $p } waitpid($_, 0) for @k; print "other-forked=10\n";' > other.txt 2>&1
fi
"#;
