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
//!
//! A local repository's bundle travels the same way ([`BundleChannel`], the runner's
//! [`BUNDLE_FD`]): the worker copies it, at most [`BUNDLE_LIMIT`] bytes, into a private
//! file of its own; so does a setup result for the warm setup cache ([`FileChannel`],
//! [`SETUP_FD`]), into the worker's incoming file. The sandbox needs no writable host
//! directory at all.

use command_fds::{CommandFdExt, FdMapping};
use nix::fcntl::OFlag;
use std::os::fd::OwnedFd;
use std::path::Path;
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
/// The runner's file descriptor of the bundle channel's write end.
pub const BUNDLE_FD: i32 = 4;
/// Largest bundle accepted, in bytes.
pub const BUNDLE_LIMIT: u64 = 512 * 1024 * 1024;
/// The runner's file descriptor of the setup-result channel's write end.
pub const SETUP_FD: i32 = 5;
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
    #[error("the runner's {what} is larger than {limit} bytes")]
    FileTooLarge { what: &'static str, limit: u64 },
    #[error("cannot keep the runner's bundle: {0}")]
    Keep(std::io::Error),
}

/// A pipe whose write end goes to the runner as `child_fd` (writable by the sandbox's
/// host user, see [`ResultChannel::attach`]); returns the read end and the mapping.
fn channel_pipe(child_fd: i32) -> Result<(OwnedFd, FdMapping), ChannelError> {
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ChannelError::Setup(e.to_string()))?;
    nix::sys::stat::fchmod(&write, nix::sys::stat::Mode::from_bits_truncate(0o622))
        .map_err(|e| ChannelError::Setup(e.to_string()))?;
    Ok((
        read,
        FdMapping {
            parent_fd: write,
            child_fd,
        },
    ))
}

/// Waits for a channel's reader at most [`RESULT_GRACE`] (the runner has ended).
async fn finish_reading<T>(
    mut reading: JoinHandle<Result<T, ChannelError>>,
) -> Result<T, ChannelError> {
    match tokio::time::timeout(RESULT_GRACE, &mut reading).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(ChannelError::Read(std::io::Error::other(e.to_string()))),
        Err(_) => {
            reading.abort();
            Err(ChannelError::Stuck)
        }
    }
}

/// A channel whose bytes the worker copies into a file of its own: what the runner
/// writes to its `child_fd` lands in `file`, at most `limit` bytes.
pub struct FileChannel {
    reading: JoinHandle<Result<u64, ChannelError>>,
}

impl FileChannel {
    /// Makes the pipe and starts copying it into `file` (`what` names it in errors).
    /// Returns the channel and the mapping to hand to the runner's command with
    /// [`ResultChannel::attach`].
    pub fn open(
        file: std::fs::File,
        child_fd: i32,
        limit: u64,
        what: &'static str,
    ) -> Result<(Self, FdMapping), ChannelError> {
        let (read, mapping) = channel_pipe(child_fd)?;
        let receiver =
            pipe::Receiver::from_owned_fd(read).map_err(|e| ChannelError::Setup(e.to_string()))?;
        let reading = tokio::spawn(async move {
            let mut out = tokio::fs::File::from_std(file);
            let copied = tokio::io::copy(&mut receiver.take(limit + 1), &mut out)
                .await
                .map_err(ChannelError::Read)?;
            if copied > limit {
                return Err(ChannelError::FileTooLarge { what, limit });
            }
            use tokio::io::AsyncWriteExt;
            out.flush().await.map_err(ChannelError::Keep)?;
            Ok(copied)
        });
        Ok((Self { reading }, mapping))
    }

    /// How many bytes the runner wrote, once it has ended.
    pub async fn finish(self) -> Result<u64, ChannelError> {
        finish_reading(self.reading).await
    }
}

/// The worker's end of one attempt's bundle channel: what the runner writes to
/// [`BUNDLE_FD`] lands in a private file of the worker's.
pub struct BundleChannel {
    channel: FileChannel,
    path: tempfile::TempPath,
}

impl BundleChannel {
    /// Makes the pipe and starts copying it into a fresh file in `private_dir` (a
    /// directory no sandbox sees). Returns the channel and the mapping to hand to the
    /// runner's command with [`ResultChannel::attach`].
    pub fn open(private_dir: &Path) -> Result<(Self, FdMapping), ChannelError> {
        let file = tempfile::Builder::new()
            .prefix(".bundle-")
            .tempfile_in(private_dir)
            .map_err(ChannelError::Keep)?;
        let (file, path) = file.into_parts();
        let (channel, mapping) = FileChannel::open(file, BUNDLE_FD, BUNDLE_LIMIT, "bundle")?;
        Ok((Self { channel, path }, mapping))
    }

    /// The bundle the runner wrote (`None` when it wrote none), once it has ended.
    pub async fn finish(self) -> Result<Option<tempfile::TempPath>, ChannelError> {
        let copied = self.channel.finish().await?;
        Ok((copied > 0).then_some(self.path))
    }
}

/// The worker's end of one attempt's result channel.
pub struct ResultChannel {
    reading: JoinHandle<Result<Vec<u8>, ChannelError>>,
}

impl ResultChannel {
    /// Makes the pipe, hands its write end to `cmd` as [`RESULT_FD`], with the `extra`
    /// descriptors (a [`BundleChannel`]'s), all kept by `cmd` until it is dropped: drop
    /// it right after spawning. Starts reading.
    pub fn attach(cmd: &mut Command, extra: Vec<FdMapping>) -> Result<Self, ChannelError> {
        // The runner reopens its end through /proc/self/fd; under a root worker it runs
        // as another user than the pipe's owner, so the write end is made writable to
        // it. Nothing else can reach the pipe: it is open only in the runner (not
        // dumpable, so its /proc/<pid>/fd is closed to others) and the worker.
        let (read, mapping) = channel_pipe(RESULT_FD)?;
        let mut mappings = vec![mapping];
        mappings.extend(extra);
        cmd.fd_mappings(mappings)
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
        match finish_reading(self.reading).await {
            Ok(text) if text.is_empty() => Err(ChannelError::Empty),
            other => other,
        }
    }
}
