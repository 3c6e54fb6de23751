//! Child processes of the runner: run with a timeout in their own process group, killed
//! whole; and the runner's own exit when the worker that started it dies.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The process group of the child now running, so it can be killed if the runner must stop.
static CHILD_GROUP: AtomicU32 = AtomicU32::new(0);

/// Output kept of a child for error messages.
const TAIL_LINES: usize = 30;

/// What a finished child left.
pub struct Finished {
    pub success: bool,
    pub status: String,
    pub lines: Vec<String>,
}

impl Finished {
    /// The last lines of output, for error messages.
    pub fn tail(&self) -> String {
        let start = self.lines.len().saturating_sub(TAIL_LINES);
        self.lines[start..].join("\n")
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Kills a process group, ignoring a group that is already gone.
pub fn kill_group(pgid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

/// Runs a command in its own process group, logging its output lines as events, killing
/// the group after `timeout`.
pub fn run_logged(cmd: &mut Command, timeout: Duration) -> std::io::Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pgid = child.id();
    CHILD_GROUP.store(pgid, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        })
    })
    .collect();
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            super::emit("log", serde_json::json!({ "message": line }));
            lines.push(line);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            kill_group(pgid, Signal::SIGKILL);
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "timed out after {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever the command left running in its group goes with it.
    kill_group(pgid, Signal::SIGKILL);
    CHILD_GROUP.store(0, Ordering::SeqCst);
    for r in readers {
        let _ = r.join();
    }
    lines.extend(rx.try_iter());
    Ok(Finished {
        success: status.success(),
        status: describe(status),
        lines,
    })
}

/// Exits the runner (and its process group) when the process that started it dies, so a
/// worker killed with SIGKILL leaves no agent running behind its back.
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if std::os::unix::process::parent_id() != parent {
            // Not eprintln!: with the worker gone its pipe has no reader, and a failed
            // write must not panic this thread before it has stopped the run.
            let _ = writeln!(
                std::io::stderr(),
                "runner: the worker that started this run is gone; stopping"
            );
            let child = CHILD_GROUP.load(Ordering::SeqCst);
            if child != 0 {
                kill_group(child, Signal::SIGKILL);
            }
            kill_group(std::process::id(), Signal::SIGKILL);
            std::process::exit(137);
        }
    });
}
