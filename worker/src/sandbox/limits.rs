//! Resource limits of a bwrap sandbox: its cgroup (processes, memory, CPU), the size of
//! every place it can write, and the bound on one line of its output.
//!
//! Cgroups: each attempt runs in a cgroup of its own with `pids.max`
//! (`sandbox.max_processes`), a memory limit without swap (`sandbox.memory_mb`, by default
//! [`default_memory_mb`]) and a CPU quota (`sandbox.cpus`, by default [`default_cpus`]).
//! Where the cgroups come from, first match wins:
//! - `sandbox.cgroup_dir`: a cgroup v2 directory delegated to the worker;
//! - `sandbox.cgroup_v1_dirs`: directories of the cgroup v1 `pids`, `memory` and `cpu`
//!   hierarchies delegated to the worker (a v1 or hybrid host), each recognised by its
//!   file system type and control files;
//! - a worker running as root on a cgroup v2 host: `/sys/fs/cgroup/agent-orchestrator`,
//!   with the `pids`, `memory` (and `cpu` where the host has it) controllers enabled;
//! - a worker running as root on a cgroup v1 host: `agent-orchestrator` in the `pids`,
//!   `memory` (and `cpu`) hierarchies.
//!
//! Without one, the driver refuses to start where a configured limit cannot be held: a
//! root worker (RLIMIT_NPROC does not apply to root), or `sandbox.memory_mb` /
//! `sandbox.cpus` set. An unprivileged worker without a cgroup sets RLIMIT_NPROC inside
//! each sandbox's user namespace, where the kernel counts it per namespace (Linux 5.14 and
//! later, [`nproc_per_user_namespace`]): each sandbox's own bound; memory and CPU are then
//! not limited (a warning says so and what to set). On older kernels RLIMIT_NPROC counts
//! every process of the worker's host user, so concurrent sandboxes share it. With a
//! `pids` cgroup no RLIMIT_NPROC is set: the cgroup is the sandbox's own bound.

use ao_shared::config::SandboxSettings;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// How often the per-attempt cgroup removal is tried while its processes die.
const CGROUP_RMDIR_TRIES: u32 = 50;
/// The cgroup v2 mount.
const CGROUP2_ROOT: &str = "/sys/fs/cgroup";
/// Name of the worker's cgroup under a hierarchy it manages itself.
const OWN_CGROUP: &str = "agent-orchestrator";
/// CFS period of the CPU quota, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// Bounds of the default memory limit, in MiB.
const DEFAULT_MEMORY_MB: (u64, u64) = (512, 4096);
/// Longest line of a sandbox's output the worker keeps (longer lines are dropped and
/// reported), so that no output makes the worker's memory grow past a few MiB.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Why the sandbox's limits cannot be held.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{setting} {path}: {detail}")]
    Cgroup {
        setting: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "{what} is configured but this host gives the worker no {controller} cgroup to enforce \
         it: set sandbox.cgroup_dir to a cgroup v2 directory delegated to the worker (with the \
         {controller} controller in its cgroup.subtree_control), or, on a cgroup v1 host, \
         sandbox.cgroup_v1_dirs to directories of the v1 hierarchies owned by the worker's \
         user (e.g. /sys/fs/cgroup/{controller}/ao-worker){hint}"
    )]
    NoCgroup {
        what: String,
        controller: &'static str,
        hint: &'static str,
    },
    #[error(
        "sandbox.cgroup_v1_dirs: none of {dirs} is in the cgroup v1 pids hierarchy, which \
         holds sandbox.max_processes (e.g. /sys/fs/cgroup/pids/ao-worker)"
    )]
    NoV1Pids { dirs: String },
    #[error(
        "the worker's RLIMIT_NPROC ({limit}) leaves no room for worker.concurrency = \
         {concurrency} sandboxes of sandbox.max_processes = {max_processes} and the worker's \
         own {own} tasks ({needed} in all): without a cgroup every sandbox counts against \
         it, so one run could starve another. Raise the limit (LimitNPROC= in the worker's \
         unit, or limits.conf), lower those settings, or give the worker a cgroup \
         (sandbox.cgroup_dir or sandbox.cgroup_v1_dirs)"
    )]
    UserProcesses {
        limit: u64,
        concurrency: usize,
        max_processes: u64,
        own: u64,
        needed: u64,
    },
}

/// Room the worker keeps under its host user's RLIMIT_NPROC for its own threads and its
/// git and bubblewrap processes, besides its sandboxes'.
const WORKER_OWN_TASKS: u64 = 256;

/// Raises the worker's soft limit of `resource` to its hard limit (any process may), so
/// that the user namespaces it makes are bounded by the most it may have; the limit now.
fn raise_soft(resource: nix::sys::resource::Resource) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit};
    match getrlimit(resource) {
        Ok((soft, hard)) if soft < hard => match setrlimit(resource, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => nix::sys::resource::RLIM_INFINITY,
    }
}

/// For an ordinary-user worker without a cgroup: every sandbox's processes count against
/// the worker's own RLIMIT_NPROC (the bound of the user namespaces it makes, beside each
/// sandbox's own `max_processes`). Raises it to its hard limit and checks that
/// `concurrency` sandboxes of `max_processes` each fit in it with the worker's own
/// tasks; else one run could starve another. Processes of the same user outside the
/// worker count too, which no check here can see.
pub fn claim_process_limit(max_processes: u64, concurrency: usize) -> Result<(), LimitError> {
    let limit = raise_soft(nix::sys::resource::Resource::RLIMIT_NPROC);
    let needed = max_processes
        .saturating_mul(concurrency as u64)
        .saturating_add(WORKER_OWN_TASKS);
    if limit != nix::sys::resource::RLIM_INFINITY && limit < needed {
        return Err(LimitError::UserProcesses {
            limit,
            concurrency,
            max_processes,
            own: WORKER_OWN_TASKS,
            needed,
        });
    }
    Ok(())
}

/// Each sandbox's share of allowances the kernel counts per host user but also per user
/// namespace (Linux 5.14 and later): set inside a sandbox's namespace, a share bounds
/// that sandbox, so that one run cannot take the whole of the user's allowance from a
/// concurrent one. Each is the worker's limit (raised to its hard limit) over
/// `worker.concurrency`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UserShares {
    /// RLIMIT_MSGQUEUE: bytes of POSIX message queues.
    pub msgqueue_bytes: u64,
    /// RLIMIT_SIGPENDING: signals queued at once.
    pub pending_signals: u64,
}

impl UserShares {
    /// The shares for `concurrency` sandboxes; `None` on a kernel that counts these per
    /// host user only, where a share set inside would bound nothing of its own.
    pub fn claim(concurrency: usize) -> Option<Self> {
        use nix::sys::resource::Resource;
        if !nproc_per_user_namespace() {
            return None;
        }
        let share = |limit: u64| (limit / concurrency.max(1) as u64).max(1);
        Some(Self {
            msgqueue_bytes: share(raise_soft(Resource::RLIMIT_MSGQUEUE)),
            pending_signals: share(raise_soft(Resource::RLIMIT_SIGPENDING)),
        })
    }

    /// `prlimit` options setting the shares on itself (run inside the sandbox).
    pub fn prlimit_args(&self) -> [String; 2] {
        [
            format!("--msgqueue={n}:{n}", n = self.msgqueue_bytes),
            format!("--sigpending={n}:{n}", n = self.pending_signals),
        ]
    }
}

/// The limits each sandbox is held to, defaults filled in; `None`: not limited (the
/// worker has no cgroup for it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// `pids.max` (threads count), or RLIMIT_NPROC without a cgroup.
    pub max_processes: u64,
    /// Memory without swap, in MiB.
    pub memory_mb: Option<u64>,
    /// CPU time per wall time, in CPUs.
    pub cpus: Option<f64>,
}

/// The default memory limit of one sandbox, in MiB: three quarters of the host's RAM
/// (`ram_mb`) shared by `concurrency` sandboxes, kept between 512 and 4096 MiB.
pub fn default_memory_mb(ram_mb: u64, concurrency: usize) -> u64 {
    let share = ram_mb.saturating_mul(3) / 4 / concurrency.max(1) as u64;
    share.clamp(DEFAULT_MEMORY_MB.0, DEFAULT_MEMORY_MB.1)
}

/// The default CPU limit of one sandbox: the host's CPUs (`host_cpus`) shared by
/// `concurrency` sandboxes, at least one CPU.
pub fn default_cpus(host_cpus: usize, concurrency: usize) -> f64 {
    (host_cpus / concurrency.max(1)).max(1) as f64
}

/// Whether the running kernel counts RLIMIT_NPROC per user namespace: Linux 5.14 and
/// later ("ucounts: Move RLIMIT_NPROC into ucounts"). There a limit set inside a
/// sandbox's own user namespace counts that sandbox's processes only, while the host
/// user's processes as a whole stay under the limit the namespace was made with (the
/// worker's own). Before 5.14 RLIMIT_NPROC counts every process of the host user,
/// whichever namespace it is in. `false` where `/proc/sys/kernel/osrelease` cannot be read.
pub fn nproc_per_user_namespace() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|release| kernel_version(&release))
        .is_some_and(|version| version >= (5, 14))
}

/// `(major, minor)` of a kernel release string (`6.18.44-fc-v657`, `5.14.0-70.el9`).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The host's RAM in MiB (`MemTotal` of `/proc/meminfo`, in kB), if known.
fn host_ram_mb() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb >> 10)
}

/// A cgroup v1 controller the sandboxes use.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Controller {
    Pids,
    Memory,
    Cpu,
}

impl Controller {
    const ALL: [Self; 3] = [Self::Pids, Self::Memory, Self::Cpu];

    /// The control file that shows a v1 hierarchy has this controller.
    fn marker(self) -> &'static str {
        match self {
            Self::Pids => "pids.max",
            Self::Memory => "memory.limit_in_bytes",
            Self::Cpu => "cpu.cfs_quota_us",
        }
    }
}

/// Where per-attempt cgroups are made.
#[derive(Clone, Debug, PartialEq)]
pub enum Cgroups {
    /// One cgroup v2 directory holds every limit; `cpu`: its `cpu` controller is enabled.
    V2 { parent: PathBuf, cpu: bool },
    /// Separate cgroup v1 hierarchies; `pids` is always there.
    V1 {
        pids: PathBuf,
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
    },
}

impl Cgroups {
    /// Finds where per-attempt cgroups can be made, checks that one can be, and fills in
    /// the default limits it can hold. No cgroups (`None`) when the host gives none and
    /// none is required.
    pub fn detect(
        sandbox: &SandboxSettings,
        concurrency: usize,
        is_root: bool,
    ) -> Result<(Option<Self>, Limits), LimitError> {
        let found = if let Some(dir) = &sandbox.cgroup_dir {
            Some(Self::delegated_v2(dir)?)
        } else if !sandbox.cgroup_v1_dirs.is_empty() {
            Some(Self::delegated_v1(&sandbox.cgroup_v1_dirs)?)
        } else if is_root {
            Self::own_v2().or_else(Self::own_v1)
        } else {
            None
        };
        if let Some(cgroups) = &found {
            cgroups.probe()?;
        } else if is_root {
            return Err(LimitError::NoCgroup {
                what: "sandbox.max_processes".into(),
                controller: "pids",
                hint: " (RLIMIT_NPROC does not limit a worker running as root)",
            });
        } else {
            claim_process_limit(sandbox.max_processes, concurrency)?;
        }
        let (has_memory, has_cpu) = match &found {
            None => (false, false),
            Some(Self::V2 { cpu, .. }) => (true, *cpu),
            Some(Self::V1 { memory, cpu, .. }) => (memory.is_some(), cpu.is_some()),
        };
        let memory_mb = match sandbox.memory_mb {
            Some(_) if !has_memory => {
                return Err(LimitError::NoCgroup {
                    what: "sandbox.memory_mb".into(),
                    controller: "memory",
                    hint: "",
                })
            }
            Some(mb) => Some(mb),
            None if has_memory => Some(default_memory_mb(
                host_ram_mb().unwrap_or(DEFAULT_MEMORY_MB.1),
                concurrency,
            )),
            None => None,
        };
        let cpus = match sandbox.cpus {
            Some(_) if !has_cpu => {
                return Err(LimitError::NoCgroup {
                    what: "sandbox.cpus".into(),
                    controller: "cpu",
                    hint: "",
                })
            }
            Some(cpus) => Some(cpus),
            None if has_cpu => Some(default_cpus(
                std::thread::available_parallelism().map_or(1, usize::from),
                concurrency,
            )),
            None => None,
        };
        let limits = Limits {
            max_processes: sandbox.max_processes,
            memory_mb,
            cpus,
        };
        match &found {
            None if nproc_per_user_namespace() => tracing::warn!(
                max_processes = limits.max_processes,
                "no cgroup for the sandboxes: sandbox.max_processes is enforced as \
                 RLIMIT_NPROC inside each sandbox's user namespace (its processes only); \
                 memory and CPU are not limited. Set sandbox.cgroup_dir (cgroup v2) or \
                 sandbox.cgroup_v1_dirs (cgroup v1: directories in /sys/fs/cgroup/pids, \
                 memory and cpu owned by this user), see docs/sandbox-network.md#limits"
            ),
            None => tracing::warn!(
                max_processes = limits.max_processes,
                "no cgroup for the sandboxes, and a kernel older than 5.14: \
                 sandbox.max_processes is enforced as RLIMIT_NPROC, which counts every \
                 process of this host user, so one run can fork up to it and starve a \
                 concurrent one; memory and CPU are not limited. Set sandbox.cgroup_dir \
                 (cgroup v2) or sandbox.cgroup_v1_dirs (cgroup v1: directories in \
                 /sys/fs/cgroup/pids, memory and cpu owned by this user), see \
                 docs/sandbox-network.md#limits"
            ),
            Some(c) => {
                tracing::info!(
                    cgroups = ?c,
                    max_processes = limits.max_processes,
                    memory_mb = ?limits.memory_mb,
                    cpus = ?limits.cpus,
                    "sandbox limits"
                );
                if memory_mb.is_none() || cpus.is_none() {
                    tracing::warn!(
                        memory_limited = memory_mb.is_some(),
                        cpu_limited = cpus.is_some(),
                        "the sandboxes' cgroup has no memory or no cpu controller: that \
                         resource is not limited"
                    );
                }
            }
        }
        Ok((found, limits))
    }

    /// `sandbox.cgroup_dir`: must be on a cgroup v2 file system.
    fn delegated_v2(dir: &Path) -> Result<Self, LimitError> {
        let err = |detail: String| LimitError::Cgroup {
            setting: "sandbox.cgroup_dir",
            path: dir.to_path_buf(),
            detail,
        };
        match filesystem(dir).map_err(|e| err(e.to_string()))? {
            Fs::CgroupV2 => {}
            Fs::CgroupV1 => {
                return Err(err(
                    "is a cgroup v1 directory: list the v1 directories (pids, memory, cpu) in \
                     sandbox.cgroup_v1_dirs instead"
                        .into(),
                ))
            }
            Fs::Other => return Err(err("is not on a cgroup file system".into())),
        }
        let subtree = std::fs::read_to_string(dir.join("cgroup.subtree_control"))
            .map_err(|e| err(format!("cannot read cgroup.subtree_control: {e}")))?;
        let enabled: Vec<&str> = subtree.split_whitespace().collect();
        for needed in ["pids", "memory"] {
            if !enabled.contains(&needed) {
                return Err(err(format!(
                    "the {needed} controller is not enabled in its cgroup.subtree_control"
                )));
            }
        }
        Ok(Self::V2 {
            parent: dir.to_path_buf(),
            cpu: enabled.contains(&"cpu"),
        })
    }

    /// `sandbox.cgroup_v1_dirs`: each on a cgroup v1 file system, each controller once,
    /// `pids` among them.
    fn delegated_v1(dirs: &[PathBuf]) -> Result<Self, LimitError> {
        let mut found: [Option<PathBuf>; 3] = [None, None, None];
        for dir in dirs {
            let err = |detail: String| LimitError::Cgroup {
                setting: "sandbox.cgroup_v1_dirs",
                path: dir.clone(),
                detail,
            };
            match filesystem(dir).map_err(|e| err(e.to_string()))? {
                Fs::CgroupV1 => {}
                Fs::CgroupV2 => {
                    return Err(err(
                        "is a cgroup v2 directory: set it as sandbox.cgroup_dir instead".into(),
                    ))
                }
                Fs::Other => return Err(err("is not on a cgroup file system".into())),
            }
            let mut any = false;
            for (i, c) in Controller::ALL.iter().enumerate() {
                if dir.join(c.marker()).exists() {
                    any = true;
                    if found[i].replace(dir.clone()).is_some() {
                        return Err(err(format!("a second directory for {c:?}")));
                    }
                }
            }
            if !any {
                return Err(err(
                    "is in none of the pids, memory and cpu hierarchies".into()
                ));
            }
        }
        let [pids, memory, cpu] = found;
        let pids = pids.ok_or_else(|| LimitError::NoV1Pids {
            dirs: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        Ok(Self::V1 { pids, memory, cpu })
    }

    /// The worker's own cgroup at the root of a cgroup v2 hierarchy (root only).
    fn own_v2() -> Option<Self> {
        let root = Path::new(CGROUP2_ROOT);
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
        let controllers: Vec<&str> = controllers.split_whitespace().collect();
        if !(controllers.contains(&"pids") && controllers.contains(&"memory")) {
            return None;
        }
        let cpu = controllers.contains(&"cpu");
        let wanted = if cpu {
            "+pids +memory +cpu"
        } else {
            "+pids +memory"
        };
        let _ = std::fs::write(root.join("cgroup.subtree_control"), wanted);
        let parent = root.join(OWN_CGROUP);
        std::fs::create_dir_all(&parent).ok()?;
        std::fs::write(parent.join("cgroup.subtree_control"), "+pids +memory").ok()?;
        let cpu = cpu && std::fs::write(parent.join("cgroup.subtree_control"), "+cpu").is_ok();
        Some(Self::V2 { parent, cpu })
    }

    /// The worker's own cgroups in the v1 `pids`, `memory` and (where mounted) `cpu`
    /// hierarchies (root only).
    fn own_v1() -> Option<Self> {
        let base = Path::new(CGROUP2_ROOT);
        let own = |name: &str| -> Option<PathBuf> {
            let hierarchy = base.join(name);
            if !hierarchy.join("cgroup.procs").exists() {
                return None;
            }
            let dir = hierarchy.join(OWN_CGROUP);
            std::fs::create_dir_all(&dir).ok()?;
            Some(dir)
        };
        let pids = own("pids")?;
        let memory = own("memory")?;
        Some(Self::V1 {
            pids,
            memory: Some(memory),
            cpu: own("cpu"),
        })
    }

    fn parents(&self) -> Vec<&Path> {
        match self {
            Self::V2 { parent, .. } => vec![parent],
            Self::V1 { pids, memory, cpu } => std::iter::once(pids.as_path())
                .chain(memory.as_deref())
                .chain(cpu.as_deref())
                .collect(),
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
                    setting: "sandbox cgroup",
                    path: parent.to_path_buf(),
                    detail: format!("cannot make a child cgroup: {e}"),
                })?;
        }
        Ok(())
    }

    /// Makes the cgroup(s) of one attempt with its limits. Returns the directories every
    /// process of the sandbox must join.
    pub fn make(&self, name: &str, limits: &Limits) -> std::io::Result<AttemptCgroup> {
        let name = format!("ao-{name}");
        let quota = limits
            .cpus
            .map(|cpus| ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000));
        let mut writes: Vec<(PathBuf, &str, String)> = Vec::new();
        let (dirs, memory_events) = match self {
            Self::V2 { parent, .. } => {
                let dir = parent.join(&name);
                writes.push((dir.clone(), "pids.max", limits.max_processes.to_string()));
                if let Some(mb) = limits.memory_mb {
                    writes.push((dir.clone(), "memory.max", (mb << 20).to_string()));
                    writes.push((dir.clone(), "memory.swap.max", "0".into()));
                }
                if let Some(quota) = quota {
                    writes.push((dir.clone(), "cpu.max", format!("{quota} {CPU_PERIOD_US}")));
                }
                let events = dir.join("memory.events");
                (vec![dir], Some(events))
            }
            Self::V1 { pids, memory, cpu } => {
                let p = pids.join(&name);
                writes.push((p.clone(), "pids.max", limits.max_processes.to_string()));
                let mut dirs = vec![p];
                let mut events = None;
                if let Some(memory) = memory {
                    let m = memory.join(&name);
                    if let Some(mb) = limits.memory_mb {
                        let bytes = (mb << 20).to_string();
                        writes.push((m.clone(), "memory.limit_in_bytes", bytes.clone()));
                        writes.push((m.clone(), "memory.memsw.limit_in_bytes", bytes));
                    }
                    events = Some(m.join("memory.oom_control"));
                    dirs.push(m);
                }
                if let (Some(cpu), Some(quota)) = (cpu, quota) {
                    let c = cpu.join(&name);
                    writes.push((c.clone(), "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                    writes.push((c.clone(), "cpu.cfs_quota_us", quota.to_string()));
                    dirs.push(c);
                }
                (dirs, events)
            }
        };
        let cgroup = AttemptCgroup {
            dirs,
            memory_events,
            memory_mb: limits.memory_mb,
        };
        for (i, dir) in cgroup.dirs.iter().enumerate() {
            if let Err(e) = std::fs::create_dir(dir) {
                for made in &cgroup.dirs[..i] {
                    let _ = std::fs::remove_dir(made);
                }
                return Err(e);
            }
        }
        for (dir, file, value) in writes {
            if let Err(e) = std::fs::write(dir.join(file), &value) {
                // Swap accounting may be off (no swap.max / memsw file); the rest must work.
                if !file.contains("swap") && !file.contains("memsw") {
                    for dir in &cgroup.dirs {
                        let _ = std::fs::remove_dir(dir);
                    }
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", dir.join(file).display()),
                    ));
                }
            }
        }
        Ok(cgroup)
    }
}

/// What kind of file system a path is on.
#[derive(Debug, PartialEq)]
enum Fs {
    CgroupV1,
    CgroupV2,
    Other,
}

/// The file system type of `path` (`statfs`'s magic number).
fn filesystem(path: &Path) -> nix::Result<Fs> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
    let kind = statfs(path)?.filesystem_type();
    Ok(if kind == CGROUP2_SUPER_MAGIC {
        Fs::CgroupV2
    } else if kind == CGROUP_SUPER_MAGIC {
        Fs::CgroupV1
    } else {
        Fs::Other
    })
}

/// The cgroup directories of one attempt.
#[derive(Debug)]
pub struct AttemptCgroup {
    pub dirs: Vec<PathBuf>,
    /// The file counting the memory cgroup's OOM kills (`oom_kill N`): `memory.events`
    /// on v2, `memory.oom_control` on v1.
    memory_events: Option<PathBuf>,
    /// The memory limit set, in MiB.
    memory_mb: Option<u64>,
}

/// Processes of a sandbox the kernel killed for its memory limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OomKills {
    /// How many processes were killed.
    pub count: u64,
    /// The limit they reached, in MiB.
    pub limit_mb: u64,
}

impl OomKills {
    /// The outcome's error for a run whose processes were killed, followed by `what`
    /// the run reported itself.
    pub fn explain(&self, what: Option<&str>) -> String {
        let mut text = format!(
            "out of memory: the sandbox reached its memory limit of {} MiB \
             (sandbox.memory_mb; the files it wrote in its working copy, /tmp, $HOME and \
             /dev/shm count against it, since they are memory) and the kernel killed {} of \
             its processes",
            self.limit_mb, self.count
        );
        if let Some(what) = what.filter(|w| !w.is_empty()) {
            text.push_str("; ");
            text.push_str(what);
        }
        text
    }
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

    /// The processes the kernel killed for the memory limit so far; `None` when none
    /// was (or the count cannot be read).
    pub fn oom_kills(&self) -> Option<OomKills> {
        let text = std::fs::read_to_string(self.memory_events.as_ref()?).ok()?;
        let count: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())?;
        (count > 0).then_some(OomKills {
            count,
            limit_mb: self.memory_mb?,
        })
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

    #[test]
    fn kernel_versions_are_read_from_release_strings() {
        assert_eq!(kernel_version("6.18.44-fc-v657\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.14.0-70.el9.x86_64"), Some((5, 14)));
        assert_eq!(kernel_version("4.19"), Some((4, 19)));
        assert_eq!(kernel_version("5.4.0-generic"), Some((5, 4)));
        assert!((5, 4) < (5, 14));
        assert_eq!(kernel_version("garbage"), None);
    }

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
            cpu: false,
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
    fn default_limits_share_the_host_between_concurrent_sandboxes() {
        // 24 GiB, two at once: 9 GiB each, capped at 4 GiB.
        assert_eq!(default_memory_mb(24 * 1024, 2), 4096);
        // 2 GiB, two at once: 768 MiB each.
        assert_eq!(default_memory_mb(2048, 2), 768);
        // 1 GiB, eight at once: the floor of 512 MiB.
        assert_eq!(default_memory_mb(1024, 8), 512);
        assert_eq!(default_cpus(8, 2), 4.0);
        assert_eq!(default_cpus(2, 4), 1.0);
        assert_eq!(default_cpus(0, 0), 1.0);
    }

    #[test]
    fn a_directory_off_the_cgroup_file_systems_is_refused_for_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = |v2: bool| SandboxSettings {
            cgroup_dir: v2.then(|| dir.path().to_path_buf()),
            cgroup_v1_dirs: if v2 {
                Vec::new()
            } else {
                vec![dir.path().to_path_buf()]
            },
            ..SandboxSettings::default()
        };
        for v2 in [true, false] {
            let err = Cgroups::detect(&sandbox(v2), 2, false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not on a cgroup file system"), "{err}");
            let setting = if v2 {
                "sandbox.cgroup_dir"
            } else {
                "sandbox.cgroup_v1_dirs"
            };
            assert!(err.starts_with(setting), "{err}");
        }
    }

    #[test]
    fn v1_directories_are_told_apart_from_v2_ones_and_need_pids() {
        let memory = Path::new("/sys/fs/cgroup/memory");
        if filesystem(memory).ok() != Some(Fs::CgroupV1) {
            eprintln!("skipped: no cgroup v1 memory hierarchy on this host");
            return;
        }
        let as_v2 = SandboxSettings {
            cgroup_dir: Some(memory.to_path_buf()),
            ..SandboxSettings::default()
        };
        let err = Cgroups::detect(&as_v2, 2, false).unwrap_err().to_string();
        assert!(err.contains("cgroup v1 directory"), "{err}");
        assert!(err.contains("sandbox.cgroup_v1_dirs"), "{err}");
        let without_pids = SandboxSettings {
            cgroup_v1_dirs: vec![memory.to_path_buf()],
            ..SandboxSettings::default()
        };
        let err = Cgroups::detect(&without_pids, 2, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pids hierarchy"), "{err}");
    }

    #[test]
    fn limits_set_without_a_cgroup_to_hold_them_are_refused() {
        for (memory_mb, cpus, named) in [
            (Some(512), None, "sandbox.memory_mb"),
            (None, Some(1.0), "sandbox.cpus"),
        ] {
            let sandbox = SandboxSettings {
                memory_mb,
                cpus,
                ..SandboxSettings::default()
            };
            let err = Cgroups::detect(&sandbox, 2, false).unwrap_err().to_string();
            assert!(err.starts_with(named), "{err}");
            assert!(err.contains("sandbox.cgroup_v1_dirs"), "{err}");
        }
        // Nothing set: the worker starts, without a cgroup or a memory or CPU limit.
        let (cgroups, limits) = Cgroups::detect(&SandboxSettings::default(), 2, false).unwrap();
        assert_eq!(cgroups, None);
        assert_eq!((limits.memory_mb, limits.cpus), (None, None));
    }

    #[test]
    fn each_limit_goes_to_its_v1_hierarchy() {
        let dir = tempfile::tempdir().unwrap();
        let [pids, memory, cpu] = ["pids", "memory", "cpu"].map(|h| dir.path().join(h));
        let cgroups = Cgroups::V1 {
            pids: pids.clone(),
            memory: Some(memory.clone()),
            cpu: Some(cpu.clone()),
        };
        for d in [&pids, &memory, &cpu] {
            std::fs::create_dir(d).unwrap();
        }
        let limits = Limits {
            max_processes: 40,
            memory_mb: Some(128),
            cpus: Some(0.5),
        };
        let made = cgroups.make("a-1", &limits).unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(pids.join("ao-a-1/pids.max")), "40");
        assert_eq!(
            read(memory.join("ao-a-1/memory.limit_in_bytes")),
            (128u64 << 20).to_string()
        );
        assert_eq!(read(cpu.join("ao-a-1/cpu.cfs_quota_us")), "50000");
        assert_eq!(read(cpu.join("ao-a-1/cpu.cfs_period_us")), "100000");
        assert_eq!(made.oom_kills(), None);
        std::fs::write(
            memory.join("ao-a-1/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        assert_eq!(
            made.oom_kills(),
            Some(OomKills {
                count: 3,
                limit_mb: 128
            })
        );
    }

    #[test]
    fn tmpfs_sizes_are_in_bytes() {
        let args = sized_tmpfs(2, Path::new("/tmp"));
        assert_eq!(args[1], "2097152");
    }
}
