//! The `process` driver: the runner as a child process of the worker, in its own process
//! group, with a cleared environment. It does not isolate anything: use it only where
//! bubblewrap is unavailable.
//!
//! It also holds what every local driver shares: [`Attempt`] (a fresh directory with the
//! run spec in it) and [`supervise`] (spawn the command, forward its event lines, stop it
//! on cancel or timeout, read the outcome from the result channel). The `bwrap` driver
//! differs only in the command it hands to [`supervise`].

use super::result_channel::{ResultChannel, RESULT_FD};
use super::SandboxDriver;
use crate::spec::{RunSpec, RunnerEvent};
use ao_shared::task::{Outcome, OutcomeKind};
use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Extra time the runner gets beyond the agent's limit (clone, setup, push).
pub(super) const RUNNER_MARGIN: Duration = Duration::from_secs(1200);
/// How long a runner may take to stop after SIGTERM before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Environment variables passed through to the runner.
pub(super) const ENV_ALLOW: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ", "HOME", "USER", "TMPDIR"];

pub struct ProcessDriver {
    /// Where attempt directories are made.
    pub work_root: PathBuf,
    /// The worker executable (it contains the runner).
    pub runner_exe: PathBuf,
}

impl ProcessDriver {
    pub fn new(work_root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&work_root)?;
        Ok(Self {
            work_root,
            runner_exe: std::env::current_exe()?,
        })
    }
}

pub(super) fn infra(message: impl Into<String>, retryable: bool) -> Outcome {
    Outcome::failed(OutcomeKind::Infrastructure, message, retryable)
}

/// The directory of one attempt, removed when dropped: the run spec and the clone.
pub(super) struct Attempt {
    pub dir: tempfile::TempDir,
    pub spec: PathBuf,
}

impl Attempt {
    /// Makes a fresh directory under `work_root` and writes the spec into it.
    pub async fn prepare(work_root: &Path, spec: &RunSpec) -> Result<Self, Outcome> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-{}-", spec.subtask_id.short(), spec.attempt))
            .tempdir_in(work_root)
            .map_err(|e| infra(format!("cannot make a work directory: {e}"), true))?;
        let spec_path = dir.path().join("spec.json");
        let text = serde_json::to_string(spec)
            .map_err(|e| infra(format!("cannot encode the run spec: {e}"), false))?;
        tokio::fs::write(&spec_path, text)
            .await
            .map_err(|e| infra(format!("cannot write the run spec: {e}"), true))?;
        Ok(Self {
            dir,
            spec: spec_path,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The runner's arguments that name its spec and its result channel.
pub(super) fn runner_args(attempt: &Attempt) -> Vec<std::ffi::OsString> {
    vec![
        "runner".into(),
        "--spec".into(),
        attempt.spec.clone().into(),
        "--result-fd".into(),
        RESULT_FD.to_string().into(),
    ]
}

/// Runs `cmd` (which starts the runner with [`runner_args`]) in its own process group:
/// forwards its standard output lines as events, kills the whole group on cancel or
/// after `limit`, and turns what came over the result channel into the outcome. Never
/// panics.
pub(super) async fn supervise(
    mut cmd: Command,
    limit: Duration,
    events: mpsc::Sender<RunnerEvent>,
    cancel: CancellationToken,
) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let channel = match ResultChannel::attach(&mut cmd) {
        Ok(c) => c,
        Err(e) => return infra(e.to_string(), true),
    };
    let spawned = cmd.spawn();
    // The command holds the channel's write end: without dropping it the channel would
    // never reach its end.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return infra(format!("cannot start the runner: {e}"), true),
    };
    let pgid = child.id().unwrap_or(0) as i32;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let forward = tokio::spawn(async move {
        let Some(out) = stdout else { return };
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let event = serde_json::from_str::<RunnerEvent>(&line).unwrap_or(RunnerEvent {
                kind: "log".into(),
                data: serde_json::json!({ "message": line }),
            });
            if events.send(event).await.is_err() {
                break;
            }
        }
    });
    let stderr_tail = tokio::spawn(async move {
        let mut tail: Vec<String> = Vec::new();
        if let Some(err) = stderr {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "runner", "{line}");
                tail.push(line);
                if tail.len() > 30 {
                    tail.remove(0);
                }
            }
        }
        tail.join("\n")
    });
    let stopped = tokio::select! {
        status = child.wait() => Ok(status),
        _ = cancel.cancelled() => Err(OutcomeKind::Cancelled),
        _ = tokio::time::sleep(limit) => Err(OutcomeKind::Timeout),
    };
    let status = match stopped {
        Ok(status) => status,
        Err(kind) => {
            if pgid > 0 {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
            }
            if tokio::time::timeout(KILL_GRACE, child.wait())
                .await
                .is_err()
                && pgid > 0
            {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                let _ = child.wait().await;
            }
            let _ = forward.await;
            return Outcome::failed(
                kind,
                match kind {
                    OutcomeKind::Cancelled => "the run was cancelled".to_string(),
                    _ => format!("the run exceeded {} s", limit.as_secs()),
                },
                false,
            );
        }
    };
    if pgid > 0 {
        // Nothing the runner started outlives it.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    let _ = forward.await;
    let tail = stderr_tail.await.unwrap_or_default();
    match channel.finish().await {
        Ok(text) => serde_json::from_slice::<Outcome>(&text)
            .unwrap_or_else(|e| infra(format!("the runner's result is unreadable: {e}"), true)),
        Err(e) => {
            tracing::warn!(error = %e, "no result from the runner");
            let status = status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            infra(
                format!("the runner ended ({status}) without a result ({e}): {tail}"),
                true,
            )
        }
    }
}

#[async_trait]
impl SandboxDriver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
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
        let mut cmd = Command::new(&self.runner_exe);
        cmd.args(runner_args(&attempt)).env_clear().envs(
            ENV_ALLOW
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))),
        );
        spec.secret_env.apply(&mut cmd);
        let limit = Duration::from_secs(spec.agent.timeout_secs) + RUNNER_MARGIN;
        supervise(cmd, limit, events, cancel).await
    }
}
