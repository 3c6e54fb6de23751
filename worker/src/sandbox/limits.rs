//! Resource limits of a bwrap sandbox: its cgroup (processes and memory), the size of
//! every place it can write, and the bound on one line of its output.
//!
//! Cgroups: each attempt runs in a cgroup of its own with `pids.max`
//! (`sandbox.max_processes`) and, when `sandbox.memory_mb` is set, a memory limit without
//! swap. Where the cgroups come from, first match wins:
//! - `sandbox.cgroup_dir`: a cgroup v2 directory delegated to the worker;
//! - a worker running as root on a cgroup v2 host: `/sys/fs/cgroup/agent-orchestrator`,
//!   with the `pids` and `memory` controllers enabled for it;
//! - a worker running as root on a cgroup v1 host: `agent-orchestrator` in the `pids` and
//!   `memory` hierarchies.
//!
//! Without one, the driver refuses to start where a configured limit cannot be held: a
//! root worker (RLIMIT_NPROC does not apply to root), or `sandbox.memory_mb` set. An
//! unprivileged worker without a cgroup keeps RLIMIT_NPROC, which counts every process of
//! the worker's host user, so concurrent sandboxes share it (a warning says so).

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// How often the per-attempt cgroup removal is tried while its processes die.
const CGROUP_RMDIR_TRIES: u32 = 50;
/// The cgroup v2 mount.
const CGROUP2_ROOT: &str = "/sys/fs/cgroup";
/// Name of the worker's cgroup under a hierarchy it manages itself.
const OWN_CGROUP: &str = "agent-orchestrator";
/// Longest line of a sandbox's output the worker keeps (longer lines are dropped and
/// reported), so that no output makes the worker's memory grow past a few MiB.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Why the sandbox's limits cannot be held.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("sandbox.cgroup_dir {path}: {detail}")]
    Cgroup { path: PathBuf, detail: String },
    #[error(
        "{what} is configured but this host gives the worker no cgroup to enforce it: set \
         sandbox.cgroup_dir to a cgroup v2 directory delegated to the worker (with the pids \
         and memory controllers in its cgroup.subtree_control){hint}"
    )]
    NoCgroup { what: String, hint: &'static str },
}

/// Where per-attempt cgroups are made.
#[derive(Clone, Debug, PartialEq)]
pub enum Cgroups {
    /// One cgroup v2 directory holds both limits.
    V2 { parent: PathBuf },
    /// Separate cgroup v1 hierarchies.
    V1 { pids: PathBuf, memory: PathBuf },
}

impl Cgroups {
    /// Finds where per-attempt cgroups can be made, and checks that one can be.
    /// `None` when the host gives none and none is required.
    pub fn detect(
        configured: Option<&Path>,
        memory_mb: Option<u64>,
        is_root: bool,
    ) -> Result<Option<Self>, LimitError> {
        let found = match configured {
            Some(dir) => Some(Self::V2 {
                parent: dir.to_path_buf(),
            }),
            None if is_root => Self::own_v2().or_else(Self::own_v1),
            None => None,
        };
        let Some(cgroups) = found else {
            if is_root {
                return Err(LimitError::NoCgroup {
                    what: "sandbox.max_processes".into(),
                    hint: " (RLIMIT_NPROC does not limit a worker running as root)",
                });
            }
            if memory_mb.is_some() {
                return Err(LimitError::NoCgroup {
                    what: "sandbox.memory_mb".into(),
                    hint: "",
                });
            }
            tracing::warn!(
                "no cgroup for the sandboxes (sandbox.cgroup_dir): sandbox.max_processes is \
                 enforced as RLIMIT_NPROC, shared by every process of this host user, and \
                 memory is not limited"
            );
            return Ok(None);
        };
        cgroups.probe()?;
        Ok(Some(cgroups))
    }

    /// The worker's own cgroup at the root of a cgroup v2 hierarchy (root only).
    fn own_v2() -> Option<Self> {
        let root = Path::new(CGROUP2_ROOT);
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
        if !(controllers.contains("pids") && controllers.contains("memory")) {
            return None;
        }
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+pids +memory");
        let parent = root.join(OWN_CGROUP);
        std::fs::create_dir_all(&parent).ok()?;
        std::fs::write(parent.join("cgroup.subtree_control"), "+pids +memory").ok()?;
        Some(Self::V2 { parent })
    }

    /// The worker's own cgroups in the v1 `pids` and `memory` hierarchies (root only).
    fn own_v1() -> Option<Self> {
        let base = Path::new(CGROUP2_ROOT);
        let pids = base.join("pids");
        let memory = base.join("memory");
        if !pids.join("cgroup.procs").exists() || !memory.join("cgroup.procs").exists() {
            return None;
        }
        let pids = pids.join(OWN_CGROUP);
        let memory = memory.join(OWN_CGROUP);
        std::fs::create_dir_all(&pids).ok()?;
        std::fs::create_dir_all(&memory).ok()?;
        Some(Self::V1 { pids, memory })
    }

    fn parents(&self) -> Vec<&Path> {
        match self {
            Self::V2 { parent } => vec![parent],
            Self::V1 { pids, memory } => vec![pids, memory],
        }
    }

    /// Makes and removes a child cgroup, so a broken setup fails at start. The probe is
    /// named after the worker's process, so that workers starting at once on one host do
    /// not collide; one left by an earlier process of the same id (killed in between) is
    /// removed first.
    fn probe(&self) -> Result<(), LimitError> {
        for parent in self.parents() {
            let probe = parent.join(format!("ao-probe-{}", std::process::id()));
            let _ = std::fs::remove_dir(&probe);
            std::fs::create_dir(&probe)
                .and_then(|_| std::fs::remove_dir(&probe))
                .map_err(|e| LimitError::Cgroup {
                    path: parent.to_path_buf(),
                    detail: format!("cannot make a child cgroup: {e}"),
                })?;
        }
        Ok(())
    }

    /// Makes the cgroup(s) of one attempt with its limits. Returns the directories every
    /// process of the sandbox must join.
    pub fn make(
        &self,
        name: &str,
        max_processes: u64,
        memory_mb: Option<u64>,
    ) -> std::io::Result<AttemptCgroup> {
        let name = format!("ao-{name}");
        let mut limits: Vec<(PathBuf, &str, String)> = Vec::new();
        let dirs = match self {
            Self::V2 { parent } => {
                let dir = parent.join(&name);
                limits.push((dir.clone(), "pids.max", max_processes.to_string()));
                if let Some(mb) = memory_mb {
                    limits.push((dir.clone(), "memory.max", (mb << 20).to_string()));
                    limits.push((dir.clone(), "memory.swap.max", "0".into()));
                }
                vec![dir]
            }
            Self::V1 { pids, memory } => {
                let p = pids.join(&name);
                let m = memory.join(&name);
                limits.push((p.clone(), "pids.max", max_processes.to_string()));
                if let Some(mb) = memory_mb {
                    limits.push((m.clone(), "memory.limit_in_bytes", (mb << 20).to_string()));
                    limits.push((
                        m.clone(),
                        "memory.memsw.limit_in_bytes",
                        (mb << 20).to_string(),
                    ));
                }
                vec![p, m]
            }
        };
        let cgroup = AttemptCgroup { dirs };
        for dir in &cgroup.dirs {
            std::fs::create_dir(dir)?;
        }
        for (dir, file, value) in limits {
            if let Err(e) = std::fs::write(dir.join(file), &value) {
                // Swap accounting may be off (no swap.max / memsw file); the rest must work.
                if !file.contains("swap") && !file.contains("memsw") {
                    for dir in &cgroup.dirs {
                        let _ = std::fs::remove_dir(dir);
                    }
                    return Err(e);
                }
            }
        }
        Ok(cgroup)
    }
}

/// The cgroup directories of one attempt.
#[derive(Debug)]
pub struct AttemptCgroup {
    pub dirs: Vec<PathBuf>,
}

impl AttemptCgroup {
    /// A shell that moves itself into every directory, then becomes `command`: so every
    /// process of the sandbox starts inside them.
    pub fn wrap(&self, command: &[std::ffi::OsString]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c")
            .arg(
                "while [ \"$1\" != -- ]; do echo $$ > \"$1/cgroup.procs\" || exit 125; shift; \
                 done; shift; exec \"$@\"",
            )
            .arg("sh")
            .args(&self.dirs)
            .arg("--")
            .args(command);
        c
    }

    /// Removes the cgroups once their processes are gone.
    pub async fn remove(self) {
        for dir in &self.dirs {
            let mut removed = false;
            for _ in 0..CGROUP_RMDIR_TRIES {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    removed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !removed {
                tracing::warn!(cgroup = %dir.display(), "cannot remove the sandbox cgroup");
            }
        }
    }
}

/// bubblewrap's arguments for a tmpfs of at most `mb` MiB at `path`.
pub fn sized_tmpfs(mb: u64, path: &Path) -> [std::ffi::OsString; 4] {
    [
        "--size".into(),
        (mb << 20).to_string().into(),
        "--tmpfs".into(),
        path.as_os_str().to_owned(),
    ]
}

/// One line read by [`read_bounded_line`].
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A whole line (without its newline), lossily decoded.
    Text(String),
    /// A line longer than the bound, dropped; its length in bytes.
    TooLong(usize),
}

/// Reads the next line of at most `max` bytes, never holding more than `max` bytes of
/// it: a longer one is skipped to its end and reported as [`Line::TooLong`]. `None` at
/// the end of the stream.
pub async fn read_bounded_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<Line>> {
    let mut line: Vec<u8> = Vec::new();
    // Bytes of the line so far (without its newline), and whether anything was read.
    let mut total = 0usize;
    let mut any = false;
    loop {
        let buf = reader.fill_buf().await?;
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
        } else {
            line = Vec::new();
        }
        let used = newline.map(|i| i + 1).unwrap_or(buf.len());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if total > max {
        return Ok(Some(Line::TooLong(total)));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(Line::Text(
        String::from_utf8_lossy(&line).into_owned(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_dropped_without_being_held() {
        let mut input = Vec::new();
        input.extend_from_slice(b"short\n");
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\n\nlast");
        let mut reader = tokio::io::BufReader::with_capacity(8, &input[..]);
        let mut lines = Vec::new();
        while let Some(l) = read_bounded_line(&mut reader, 10).await.unwrap() {
            lines.push(l);
        }
        assert_eq!(
            lines,
            vec![
                Line::Text("short".into()),
                Line::TooLong(100),
                Line::Text(String::new()),
                Line::Text("last".into()),
            ]
        );
    }

    #[test]
    fn workers_starting_at_once_do_not_collide_in_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let cgroups = Cgroups::V2 {
            parent: dir.path().to_path_buf(),
        };
        // Another worker's probe in progress, and one left by a killed worker of this
        // process id.
        std::fs::create_dir(dir.path().join("ao-probe")).unwrap();
        std::fs::create_dir(dir.path().join(format!("ao-probe-{}", std::process::id()))).unwrap();
        cgroups.probe().unwrap();
        assert!(
            dir.path().join("ao-probe").exists(),
            "another's probe is left alone"
        );
    }

    #[test]
    fn tmpfs_sizes_are_in_bytes() {
        let args = sized_tmpfs(2, Path::new("/tmp"));
        assert_eq!(args[1], "2097152");
    }
}
