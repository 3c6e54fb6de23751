//! The channel the runner's outcome travels on: a pipe the worker makes for each attempt,
//! whose write end the runner inherits as file descriptor [`RESULT_FD`] and makes
//! close-on-exec before it starts anything else, so no process of the repository or the
//! agent ever holds it. The runner is the sandbox's init and not dumpable, so its open
//! files cannot be reached through `/proc` either.
//!
//! Nothing of it is a path: the agent cannot write the outcome in the runner's place,
//! block the runner's write, or point the worker at a host file, a FIFO or `/dev/zero`.
//! The worker reads at most [`RESULT_LIMIT`] bytes, without blocking its runtime, and
//! stops waiting [`RESULT_GRACE`] after the runner ended.

use command_fds::{CommandFdExt, FdMapping};
use nix::fcntl::OFlag;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio::task::JoinHandle;

/// The runner's file descriptor of the channel's write end (after standard input,
/// output and error).
pub const RESULT_FD: i32 = 3;
/// Largest outcome accepted, in bytes (summaries are cut to a few KiB by the runner).
pub const RESULT_LIMIT: u64 = 1024 * 1024;
/// How long the worker still reads after the runner ended; only a process that escaped
/// the sandbox's end could hold the write end that long.
pub const RESULT_GRACE: Duration = Duration::from_secs(5);

/// Why no outcome came over the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot make the result channel: {0}")]
    Setup(String),
    #[error("the runner's result is larger than {RESULT_LIMIT} bytes")]
    TooLarge,
    #[error("cannot read the runner's result: {0}")]
    Read(std::io::Error),
    #[error("the runner wrote no result")]
    Empty,
    #[error("the result channel stayed open {} s after the runner ended", RESULT_GRACE.as_secs())]
    Stuck,
}

/// The worker's end of one attempt's result channel.
pub struct ResultChannel {
    reading: JoinHandle<Result<Vec<u8>, ChannelError>>,
}

impl ResultChannel {
    /// Makes the pipe, hands its write end to `cmd` as [`RESULT_FD`] (kept by `cmd`
    /// until it is dropped: drop it right after spawning), and starts reading.
    pub fn attach(cmd: &mut Command) -> Result<Self, ChannelError> {
        let (read, write): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ChannelError::Setup(e.to_string()))?;
        // The runner reopens its end through /proc/self/fd; under a root worker it runs
        // as another user than the pipe's owner, so the write end is made writable to
        // it. Nothing else can reach the pipe: it is open only in the runner (not
        // dumpable, so its /proc/<pid>/fd is closed to others) and the worker.
        nix::sys::stat::fchmod(&write, nix::sys::stat::Mode::from_bits_truncate(0o622))
            .map_err(|e| ChannelError::Setup(e.to_string()))?;
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: write,
            child_fd: RESULT_FD,
        }])
        .map_err(|e| ChannelError::Setup(e.to_string()))?;
        let receiver =
            pipe::Receiver::from_owned_fd(read).map_err(|e| ChannelError::Setup(e.to_string()))?;
        let reading = tokio::spawn(async move {
            let mut text = Vec::new();
            receiver
                .take(RESULT_LIMIT + 1)
                .read_to_end(&mut text)
                .await
                .map_err(ChannelError::Read)?;
            if text.len() as u64 > RESULT_LIMIT {
                return Err(ChannelError::TooLarge);
            }
            Ok(text)
        });
        Ok(Self { reading })
    }

    /// The bytes the runner wrote, once the runner has ended.
    pub async fn finish(self) -> Result<Vec<u8>, ChannelError> {
        let mut reading = self.reading;
        match tokio::time::timeout(RESULT_GRACE, &mut reading).await {
            Ok(Ok(Ok(text))) if text.is_empty() => Err(ChannelError::Empty),
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(ChannelError::Read(std::io::Error::other(e.to_string()))),
            Err(_) => {
                reading.abort();
                Err(ChannelError::Stuck)
            }
        }
    }
}
