//! Child processes of the runner: run with a timeout in their own process group, killed
//! whole; and the runner's own exit when the worker that started it dies.

use ao_shared::bounded::{truncate_bytes, MAX_AGENT_TEXT_BYTES};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The process group of the child now running, so it can be killed if the runner must stop.
static CHILD_GROUP: AtomicU32 = AtomicU32::new(0);

/// Longest output line of a child kept (a longer one is dropped and reported), so that
/// no output grows the runner's memory or the events it emits.
const MAX_LINE_BYTES: usize = 512 * 1024;
/// Output kept of a child for error messages.
const TAIL_LINES: usize = 30;
/// How long output is still read after a child exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);
/// The longest wait between two looks for the exit of a command whose output is closed.
const EXIT_POLL_MAX: Duration = Duration::from_millis(20);

/// What a finished child left.
pub struct Finished {
    pub success: bool,
    pub status: String,
    pub lines: Vec<String>,
}

impl Finished {
    /// The last lines of output, for error messages: at most [`MAX_AGENT_TEXT_BYTES`]
    /// bytes, the end kept (a marker says how much of the start was cut).
    pub fn tail(&self) -> String {
        let start = self.lines.len().saturating_sub(TAIL_LINES);
        let tail = self.lines[start..].join("\n");
        if tail.len() <= MAX_AGENT_TEXT_BYTES {
            return tail;
        }
        let mut cut = tail.len() - MAX_AGENT_TEXT_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        format!("[truncated: {cut} earlier bytes] …{}", &tail[cut..])
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
    let limits = Limits {
        timeout,
        idle: None,
        stdin: None,
        finish_grace: FINISH_GRACE,
    };
    match run_streaming(cmd, &limits, &mut |line| {
        super::emit(
            "log",
            serde_json::json!({ "message": truncate_bytes(line, MAX_AGENT_TEXT_BYTES) }),
        );
        Control::Continue
    }) {
        Ok(f) => Ok(f),
        Err(RunError::Spawn(e)) => Err(e),
        Err(other) => Err(std::io::Error::other(other.to_string())),
    }
}

/// Limits of a streamed child.
pub struct Limits {
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Longest time without an output line.
    pub idle: Option<Duration>,
    /// Written to the child's standard input, which is then closed.
    pub stdin: Option<String>,
    /// How long a child whose handler said [`Control::Finish`] may take to exit before its
    /// group is ended (the output it gave stands either way).
    pub finish_grace: Duration,
}

/// Default of [`Limits::finish_grace`]: Claude Code flushes and exits within a second of
/// its final `result` when it exits at all.
pub const FINISH_GRACE: Duration = Duration::from_secs(3);

/// What the line handler wants next.
pub enum Control {
    Continue,
    /// Kill the child now, for this reason.
    Stop(String),
    /// The child has said its last (its final result): let it exit within
    /// [`Limits::finish_grace`], then end its group; the run counts as finished, not
    /// stalled, whatever it does meanwhile.
    Finish,
}

/// Why a streamed child did not end by itself.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start: {0}")]
    Spawn(std::io::Error),
    #[error("timed out after {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("no output for {} s", .0.as_secs())]
    Idle(Duration),
    #[error("{0}")]
    Stopped(String),
    #[error("cannot wait for the child: {0}")]
    Wait(std::io::Error),
}

/// Runs a command in its own process group, handing each line of standard output to
/// `on_stdout` and logging standard error lines as events; kills the group on the
/// wall-clock or idle limit, or when the handler says stop. Whatever the command left
/// running in its group is killed when it ends.
pub fn run_streaming(
    cmd: &mut Command,
    limits: &Limits,
    on_stdout: &mut dyn FnMut(&str) -> Control,
) -> Result<Finished, RunError> {
    cmd.stdin(if limits.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let pgid = child.id();
    CHILD_GROUP.store(pgid, Ordering::SeqCst);
    if let (Some(text), Some(mut stdin)) = (limits.stdin.clone(), child.stdin.take()) {
        // A child that stops reading early only makes this write fail; nothing to do then.
        std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    let (tx, rx) = std::sync::mpsc::channel::<(bool, String)>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| (true, Box::new(s) as Box<dyn Read + Send>)),
        child
            .stderr
            .take()
            .map(|s| (false, Box::new(s) as Box<dyn Read + Send>)),
    ]
    .into_iter()
    .flatten()
    .map(|(is_stdout, stream)| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            while let Ok(Some(line)) = read_bounded_line(&mut reader, MAX_LINE_BYTES) {
                // A line over the bound keeps its beginning, marked as cut.
                let line = line.unwrap_or_else(|cut| cut);
                if tx.send((is_stdout, line)).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);
    let started = Instant::now();
    let deadline = started + limits.timeout;
    let mut last_output = started;
    let mut lines = Vec::new();
    let mut handle = |is_stdout: bool, line: String, lines: &mut Vec<String>| -> Control {
        // Kept for summaries and error tails: bounded, like everything the agent writes.
        let kept = truncate_bytes(&line, MAX_AGENT_TEXT_BYTES);
        let control = if is_stdout {
            on_stdout(&line)
        } else {
            super::emit(
                "log",
                serde_json::json!({ "message": kept, "stream": "stderr" }),
            );
            Control::Continue
        };
        lines.push(kept);
        if lines.len() > 4 * TAIL_LINES {
            lines.drain(..lines.len() - TAIL_LINES);
        }
        control
    };
    let mut failure: Option<RunError> = None;
    // Set once the handler said Finish: the child must be gone by then.
    let mut finish_by: Option<Instant> = None;
    // Once the output is closed: how long to wait before looking for the exit again.
    let mut exit_poll: Option<Duration> = None;
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((is_stdout, line)) => {
                last_output = Instant::now();
                match handle(is_stdout, line, &mut lines) {
                    Control::Stop(reason) => failure = Some(RunError::Stopped(reason)),
                    Control::Finish => {
                        finish_by.get_or_insert(Instant::now() + limits.finish_grace);
                    }
                    Control::Continue => {}
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The output is closed: the process is ending, or goes on without it.
                // Its exit is looked for at once, then at growing intervals (1 ms up to
                // EXIT_POLL_MAX), so a short command is not held up by a fixed sleep.
                if let Some(wait) = exit_poll {
                    std::thread::sleep(wait);
                }
                exit_poll = Some(
                    exit_poll.map_or(Duration::from_millis(1), |w| (w * 2).min(EXIT_POLL_MAX)),
                );
            }
        }
        if finish_by.is_some_and(|by| failure.is_none() && Instant::now() >= by) {
            // Finished but still there: the result stands; the process goes.
            kill_group(pgid, Signal::SIGKILL);
            let status = child.wait().map_err(RunError::Wait)?;
            CHILD_GROUP.store(0, Ordering::SeqCst);
            return Ok(Finished {
                success: true,
                status: format!(
                    "{}, ended by the runner after its final result",
                    describe(status)
                ),
                lines,
            });
        }
        if failure.is_none() && finish_by.is_none() {
            if Instant::now() >= deadline {
                failure = Some(RunError::Timeout(limits.timeout));
            } else if let Some(idle) = limits.idle.filter(|i| last_output.elapsed() >= *i) {
                failure = Some(RunError::Idle(idle));
            }
        }
        if let Some(f) = failure.take() {
            kill_group(pgid, Signal::SIGKILL);
            let _ = child.wait();
            CHILD_GROUP.store(0, Ordering::SeqCst);
            return Err(f);
        }
        if let Some(status) = child.try_wait().map_err(RunError::Wait)? {
            break status;
        }
    };
    // Whatever the command left running in its group goes with it.
    kill_group(pgid, Signal::SIGKILL);
    CHILD_GROUP.store(0, Ordering::SeqCst);
    // The lines still buffered when it exited (the handler may no longer stop anything).
    // A process that left the group (setsid) may hold the pipes open: wait for the
    // readers only briefly; the sandbox's end takes such a process with it.
    let drain_until = Instant::now() + OUTPUT_DRAIN;
    while let Some(left) = drain_until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((is_stdout, line)) => {
                let _ = handle(is_stdout, line, &mut lines);
            }
            Err(_) => break,
        }
    }
    for r in readers.into_iter().filter(|r| r.is_finished()) {
        let _ = r.join();
    }
    Ok(Finished {
        success: status.success(),
        status: describe(status),
        lines,
    })
}

/// Reads the next line of at most `max` bytes (without its newline, lossily decoded);
/// a longer line is read to its end holding only its first
/// [`ao_shared::bounded::MAX_AGENT_TEXT_BYTES`], and comes back as that beginning with a
/// visible truncation marker (`Err`). `None` at the end of the stream.
pub fn read_bounded_line(
    reader: &mut impl BufRead,
    max: usize,
) -> std::io::Result<Option<Result<String, String>>> {
    let keep = max.min(ao_shared::bounded::MAX_AGENT_TEXT_BYTES);
    let mut line: Vec<u8> = Vec::new();
    let mut total = 0usize;
    let mut any = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            if !any {
                return Ok(None);
            }
            break;
        }
        any = true;
        let newline = buf.iter().position(|b| *b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        total += chunk.len();
        if total <= max {
            line.extend_from_slice(chunk);
        } else if line.len() > keep {
            line.truncate(keep);
        } else if line.len() < keep {
            let room = keep - line.len();
            line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        let used = newline.map(|i| i + 1).unwrap_or(buf.len());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if total > max {
        let kept = String::from_utf8_lossy(&line).into_owned();
        let more = total.saturating_sub(line.len());
        return Ok(Some(Err(format!("{kept}… [truncated: {more} more bytes]"))));
    }
    Ok(Some(Ok(String::from_utf8_lossy(&line).into_owned())))
}

/// Kills every process the agent left behind, so that nothing of it runs beside the
/// runner's commit and push (where the git token is in the environment of git).
///
/// - As its pid namespace's init (the bwrap driver): every other process of the sandbox,
///   even in another session (`kill(-1)`).
/// - Otherwise (a Nomad allocation, whose init is the task driver's; the process
///   driver): every descendant of the runner. The runner is a child subreaper
///   ([`become_subreaper`]), so a process the agent double-forked or moved to another
///   session is re-parented to it, not to the init, and stays a descendant. `kill(-1)`
///   there would reach every process of the user.
pub fn kill_strays() {
    if std::process::id() == 1 {
        let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
        // Every orphan of the namespace is the init's child: reaped here, or each stays a
        // zombie that still counts against the sandbox's process limit, and an agent
        // that filled it would leave the runner's git unable to start.
        reap_all(STRAYS_REAPED_WITHIN);
        return;
    }
    // Killing a process re-parents its children to the runner: go round until none is
    // left (bounded: a fork bomb is also bounded by the sandbox's process limit).
    for _ in 0..STRAY_ROUNDS {
        let strays = descendants(std::process::id());
        if strays.is_empty() {
            return;
        }
        let pids: Vec<Pid> = strays.iter().map(|&p| Pid::from_raw(p as i32)).collect();
        for &pid in &pids {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
        // Reap those that were the runner's children (the rest answer ECHILD at once),
        // so that the next round does not count zombies; no other child is touched.
        for &pid in &pids {
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

/// How long [`kill_strays`] waits, as the namespace's init, for the killed processes to
/// be gone (a process in an uninterruptible wait dies only when it returns).
const STRAYS_REAPED_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Reaps every child of this process (the init's: every process left in the namespace)
/// until none is left or `within` has passed. Only called once every other process was
/// killed, so no child another part of the runner waits for is taken.
fn reap_all(within: std::time::Duration) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = std::time::Instant::now() + within;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if std::time::Instant::now() > deadline {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return, // ECHILD: none left.
        }
    }
}

/// Rounds of [`kill_strays`] outside a pid namespace of the runner's own.
const STRAY_ROUNDS: usize = 20;

/// Makes the runner the child subreaper of everything it starts (`PR_SET_CHILD_SUBREAPER`,
/// prctl(2)): orphaned descendants are re-parented to it, so [`kill_strays`] finds them.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        let _ = writeln!(
            std::io::stderr(),
            "runner: cannot become the subreaper of the agent's processes: {e}"
        );
    }
}

/// The live descendants of `root` (not `root`), from `/proc/<pid>/stat`, zombies left
/// out. A process that ends while it is read is skipped.
fn descendants(root: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parent = std::collections::HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses: read after
        // the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let Some(ppid) = fields.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if state != "Z" {
            parent.insert(pid, ppid);
        }
    }
    let mut out = Vec::new();
    for (&pid, _) in parent.iter() {
        let mut at = pid;
        // A chain longer than the table is a cycle of pid reuse: stop.
        for _ in 0..parent.len() {
            match parent.get(&at) {
                Some(&p) if p == root => {
                    out.push(pid);
                    break;
                }
                Some(&p) => at = p,
                None => break,
            }
        }
    }
    out
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
