//! The sandbox's seccomp filter: the usual container deny-list, compiled to BPF with
//! `seccompiler` and handed to bubblewrap (`--add-seccomp-fd`), which installs it before
//! the runner starts, so it holds for the runner, the agent and everything they start.
//!
//! Denied (the call fails with `EPERM`): new namespaces (`unshare`, `setns`, and `clone`
//! with a `CLONE_NEW*` flag — no nested user namespace, which bubblewrap's
//! `--disable-userns` also forbids), `ptrace` and cross-process memory access (the runner
//! holds the git token), mounts and the new mount API, keyrings, `bpf`,
//! `perf_event_open`, `userfaultfd`, kernel modules, `kexec`, `reboot`, swap, clocks,
//! `acct`, `quotactl`, file handles (`open_by_handle_at`), raw I/O ports, `syslog`,
//! `personality` changes, `io_uring` (a large kernel attack surface that Docker's and
//! Kubernetes' default profiles deny; programs fall back to ordinary I/O), Linux AIO
//! (`io_setup` and the calls on its contexts: the contexts are counted host-wide against
//! `fs.aio-max-nr`, so one sandbox could take every one of the host's; the C library's
//! POSIX AIO uses threads, not these) and `ioctl(TIOCSTI)` (typing into a terminal). `clone3` fails
//! with `ENOSYS`, as on an older kernel, so that the C library falls back to `clone`,
//! whose flags the filter can see (`clone3` passes them in memory).
//!
//! Everything else is allowed: the filter narrows what the kernel offers to an
//! unprivileged process; it is not the sandbox's only wall.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Why the filter cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the sandbox's seccomp filter: {0}")]
pub struct SeccompError(String);

/// System calls denied outright.
const DENIED: &[i64] = &[
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_syslog,
    libc::SYS_chroot,
    libc::SYS_vhangup,
    libc::SYS_fanotify_init,
    libc::SYS_lookup_dcookie,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_submit,
    libc::SYS_io_cancel,
    libc::SYS_io_getevents,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
];

/// `clone` flags that make a namespace.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// `personality` values a process may set: the default and the query (0xffffffff).
const PERSONALITY_ALLOWED: &[u64] = &[0, 0x0008, 0x20000, 0x20008, 0xffff_ffff];

fn err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError(e.to_string())
}

fn arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(err)
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(err)
}

/// The main filter: matches are refused with `EPERM`.
// `TIOCSTI`'s type differs between targets (u64 here, u32 elsewhere).
#[allow(clippy::unnecessary_cast)]
fn deny_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
    // clone(flags, …): any namespace flag.
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            SeccompRule::new(vec![condition(0, SeccompCmpOp::MaskedEq(*flag), *flag)?]).map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    // ioctl(fd, TIOCSTI, …).
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![condition(
            1,
            SeccompCmpOp::MaskedEq(0xffff_ffff),
            libc::TIOCSTI as u64,
        )?])
        .map_err(err)?],
    );
    // personality(x) for any x not in the allowed list: one rule whose conditions
    // (all must hold) say "none of them".
    let not_allowed = PERSONALITY_ALLOWED
        .iter()
        .map(|v| condition(0, SeccompCmpOp::Ne, *v))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(
        libc::SYS_personality,
        vec![SeccompRule::new(not_allowed).map_err(err)?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// The second filter: `clone3` answers `ENOSYS`.
fn clone3_filter() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// The programs as bubblewrap reads them (`struct sock_filter` array, native byte order),
/// one per `--add-seccomp-fd`.
pub fn programs() -> Result<Vec<Vec<u8>>, SeccompError> {
    [deny_filter()?, clone3_filter()?]
        .into_iter()
        .map(|program| {
            let mut bytes = Vec::with_capacity(program.len() * 8);
            for insn in program {
                bytes.extend_from_slice(&insn.code.to_ne_bytes());
                bytes.push(insn.jt);
                bytes.push(insn.jf);
                bytes.extend_from_slice(&insn.k.to_ne_bytes());
            }
            Ok(bytes)
        })
        .collect()
}

/// The programs in memory files the child inherits (close-on-exec cleared), for
/// `--add-seccomp-fd N`. The files must stay open until the child has started.
pub fn program_files() -> Result<Vec<std::fs::File>, SeccompError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use std::io::{Seek, SeekFrom, Write};
    programs()?
        .into_iter()
        .map(|bytes| {
            let fd = memfd_create("ao-seccomp", MFdFlags::MFD_CLOEXEC).map_err(err)?;
            let mut file = std::fs::File::from(fd);
            file.write_all(&bytes).map_err(err)?;
            file.seek(SeekFrom::Start(0)).map_err(err)?;
            fcntl(&file, FcntlArg::F_SETFD(FdFlag::empty())).map_err(err)?;
            Ok(file)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_to_whole_instructions() {
        let programs = programs().unwrap();
        assert_eq!(programs.len(), 2);
        for p in programs {
            assert!(!p.is_empty());
            assert_eq!(p.len() % 8, 0);
        }
    }
}
