//! The `process` driver: the runner as a child process of the worker, in its own process
//! group, with a cleared environment. It does not isolate anything: use it only where
//! bubblewrap is unavailable.
//!
//! It also holds what every local driver shares: [`Attempt`] (a fresh directory with the
//! run spec in it) and [`supervise`] (spawn the command, forward its event lines, stop it
//! on cancel or timeout, read the outcome from the result channel). The `bwrap` driver
//! differs only in the command it hands to [`supervise`].

use super::limits::{read_bounded_line, Line, MAX_LINE_BYTES};
use super::result_channel::{ResultChannel, RESULT_FD};
use super::SandboxDriver;
use crate::push_permit;
use crate::spec::{LeaseSlot, RunSpec, RunnerEvent};
use ao_shared::task::{Outcome, OutcomeKind};
use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::BufReader;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Extra time the runner gets beyond the agent's limit (clone, setup, push).
pub(super) const RUNNER_MARGIN: Duration = Duration::from_secs(1200);
/// How long a runner may take to stop after SIGTERM before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Longest standard error line of the runner kept for the error message.
const STDERR_LINE_BYTES: usize = 16 * 1024;
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
    /// The lease the runner's push is fenced by (see `push_permit.rs`).
    pub lease: LeaseSlot,
    /// Mints the git token of the push (see `push_permit.rs`).
    pub git_credentials: crate::spec::GitCredentials,
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
            lease: spec.lease.clone(),
            git_credentials: spec.git_credentials.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Attempt {
    /// Removes the directory whatever the agent left in it: directories it made
    /// unreadable or unwritable (`chmod 555`, `000`) are opened to their owner first,
    /// which an ordinary-user worker needs (root removes them anyway).
    fn drop(&mut self) {
        let path = self.dir.path();
        open_up(path);
        if let Err(e) = std::fs::remove_dir_all(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove the attempt directory");
            }
        }
    }
}

/// Gives the owner read, write and search permission on `dir` and every directory under
/// it, never following a link, so that the tree can be removed. Called once every
/// process of the attempt is gone.
fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                open_up(&entry.path());
            }
        }
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

/// Runs `cmd` (which starts the runner for `attempt` with [`runner_args`]) in its own
/// process group: forwards its standard output lines as events, kills the whole group on
/// cancel or after `limit`, and turns what came over the result channel into the outcome.
/// `inherited` are files the command must inherit, closed here as soon as it has started;
/// `channels` more descriptors mapped into it (a bundle channel's); `gate` holds a
/// bubblewrap sandbox until its user namespace's shares are written. Never panics.
#[allow(clippy::too_many_arguments)]
pub(super) async fn supervise(
    mut cmd: Command,
    attempt: &Attempt,
    limit: Duration,
    events: mpsc::Sender<RunnerEvent>,
    cancel: CancellationToken,
    inherited: Vec<std::fs::File>,
    channels: Vec<command_fds::FdMapping>,
    gate: Option<super::ucounts::StartGate>,
) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if attempt.lease.0.is_some() {
        push_permit::configure(&mut cmd);
    }
    let channel = match ResultChannel::attach(&mut cmd, channels) {
        Ok(c) => c,
        Err(e) => return infra(e.to_string(), true),
    };
    let spawned = cmd.spawn();
    drop(inherited);
    // The command holds the channel's write end: without dropping it the channel would
    // never reach its end.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return infra(format!("cannot start the runner: {e}"), true),
    };
    let pgid = child.id().unwrap_or(0) as i32;
    if let Some(mut gate) = gate {
        // The gate comes back with the result: on an error it is dropped (and so opened)
        // only after the sandbox is killed. Past the timeout it stays with its thread,
        // which ends once the killed sandbox closes the info pipe.
        let released = tokio::time::timeout(
            super::ucounts::GATE_TIMEOUT,
            tokio::task::spawn_blocking(move || {
                let result = gate.release();
                (gate, result)
            }),
        )
        .await;
        let (gate, error) = match released {
            Ok(Ok((gate, Ok(())))) => (Some(gate), None),
            Ok(Ok((gate, Err(e)))) => (Some(gate), Some(e.to_string())),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(_) => (
                None,
                Some(format!(
                    "the sandbox did not report its pid within {} s",
                    super::ucounts::GATE_TIMEOUT.as_secs()
                )),
            ),
        };
        if let Some(error) = error {
            if pgid > 0 {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            let _ = child.wait().await;
            drop(gate);
            // What bubblewrap said, if it failed on its own.
            let mut said = String::new();
            if let Some(stderr) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = stderr.take(4096).read_to_string(&mut said).await;
            }
            let said = said.trim();
            return infra(
                if said.is_empty() {
                    error
                } else {
                    format!("{error} (bubblewrap: {said})")
                },
                true,
            );
        }
        drop(gate);
    }
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    // Permit requests leave the event stream here and are answered on the runner's stdin.
    let (permit_tx, permit_rx) = mpsc::channel::<()>(4);
    let permits = match (attempt.lease.0.clone(), child.stdin.take()) {
        (Some(lease), Some(stdin)) => Some(tokio::spawn(push_permit::serve(
            lease,
            attempt.git_credentials.clone(),
            stdin,
            permit_rx,
        ))),
        _ => None,
    };
    let forward = tokio::spawn(async move {
        let Some(out) = stdout else { return };
        let mut reader = BufReader::new(out);
        while let Ok(Some(line)) = read_bounded_line(&mut reader, MAX_LINE_BYTES).await {
            let event = match line {
                Line::Text(line) => {
                    serde_json::from_str::<RunnerEvent>(&line).unwrap_or(RunnerEvent {
                        kind: "log".into(),
                        data: serde_json::json!({ "message": line }),
                    })
                }
                Line::TooLong(bytes) => RunnerEvent {
                    kind: "log".into(),
                    data: serde_json::json!({ "message": format!(
                        "an output line of {bytes} bytes was dropped (longer than {MAX_LINE_BYTES})"
                    ) }),
                },
            };
            if event.kind == push_permit::REQUEST_KIND {
                let _ = permit_tx.send(()).await;
                continue;
            }
            if events.send(event).await.is_err() {
                break;
            }
        }
    });
    let stderr_tail = tokio::spawn(async move {
        let mut tail: Vec<String> = Vec::new();
        if let Some(err) = stderr {
            let mut reader = BufReader::new(err);
            while let Ok(Some(line)) = read_bounded_line(&mut reader, STDERR_LINE_BYTES).await {
                let line = match line {
                    Line::Text(line) => line,
                    Line::TooLong(bytes) => format!("[a line of {bytes} bytes]"),
                };
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
            // The runner puts each of its children in a process group of its own: every
            // group of the runner's process tree is stopped, not only the runner's.
            let groups = if pgid > 0 {
                tree_groups(pgid)
            } else {
                Vec::new()
            };
            signal_groups(&groups, Signal::SIGTERM);
            if tokio::time::timeout(KILL_GRACE, child.wait())
                .await
                .is_err()
                && pgid > 0
            {
                signal_groups(&tree_groups(pgid), Signal::SIGKILL);
                let _ = child.wait().await;
            }
            signal_groups(&groups, Signal::SIGKILL);
            if let Some(p) = permits {
                p.abort();
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
    if let Some(p) = permits {
        p.abort();
    }
    let _ = forward.await;
    let tail = stderr_tail.await.unwrap_or_default();
    match channel.finish().await {
        Ok(text) => super::runner_outcome(&text),
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

/// The process groups of `root` (a process group leader) and of every process descending
/// from it, read from `/proc`; never the caller's own group.
fn tree_groups(root: i32) -> Vec<i32> {
    // (pid, parent, group) of every process.
    let mut procs: Vec<(i32, i32, i32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(ppid), Some(pgrp)) = (
                fields.get(1).and_then(|f| f.parse().ok()),
                fields.get(2).and_then(|f| f.parse().ok()),
            ) {
                procs.push((pid, ppid, pgrp));
            }
        }
    }
    let own = nix::unistd::getpgrp().as_raw();
    let mut tree = vec![root];
    let mut groups = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for &(pid, ppid, pgrp) in &procs {
            if ppid == parent && !tree.contains(&pid) {
                tree.push(pid);
                if pgrp != own && pgrp > 0 && !groups.contains(&pgrp) {
                    groups.push(pgrp);
                }
            }
        }
        i += 1;
    }
    groups
}

/// Sends `signal` to every group in `groups`, ignoring groups that are gone.
fn signal_groups(groups: &[i32], signal: Signal) {
    for &g in groups {
        let _ = killpg(Pid::from_raw(g), signal);
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
        supervise(
            cmd,
            &attempt,
            limit,
            events,
            cancel,
            Vec::new(),
            Vec::new(),
            None,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a process is gone (or a zombie nobody reaped yet).
    fn dead(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rfind(')')
                .is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z')),
        }
    }

    #[test]
    fn an_attempt_with_locked_directories_is_removed() {
        use std::os::unix::fs::PermissionsExt;
        let work = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir_in(work.path()).unwrap();
        let path = dir.path().to_path_buf();
        let inner = path.join("locked/inner");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::write(inner.join("file"), "x").unwrap();
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(path.join("locked"), std::fs::Permissions::from_mode(0o555))
            .unwrap();
        drop(Attempt {
            spec: path.join("spec.json"),
            lease: LeaseSlot::default(),
            git_credentials: Default::default(),
            dir,
        });
        assert!(!path.exists(), "the attempt directory was left");
    }

    #[tokio::test]
    async fn cancel_kills_the_process_groups_the_runner_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("bg.pid");
        let attempt = Attempt {
            spec: dir.path().join("spec.json"),
            lease: LeaseSlot::default(),
            git_credentials: Default::default(),
            dir,
        };
        // `set -m`: the background job gets a process group of its own, as the runner's
        // children do.
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(format!(
            "set -m; sleep 300 & echo $! > {}; wait",
            pid_file.display()
        ));
        let (tx, _rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let run = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                supervise(
                    cmd,
                    &attempt,
                    Duration::from_secs(60),
                    tx,
                    cancel,
                    Vec::new(),
                    Vec::new(),
                    None,
                )
                .await
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "no background job");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        cancel.cancel();
        let outcome = run.await.unwrap();
        assert_eq!(outcome.kind, OutcomeKind::Cancelled);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dead(pid) {
            if std::time::Instant::now() > deadline {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                panic!("the runner's background process group outlived the cancelled run");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
