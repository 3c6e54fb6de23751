//! What of the host directories a `bwrap` sandbox is shown it must still not see.
//!
//! The sandbox runs as a host user (an ordinary worker's own, a root worker's
//! `sandbox.host_uid`), so within the directories it is shown read-only (the system
//! directories, `sandbox.ro_paths`) that user's permissions would open its own files and
//! its groups' to the agent. The rule: the sandbox sees there only what every user of the
//! host may see. Before each sandbox starts, each shown directory is walked ([`Plan`]),
//! and these are covered in it (an empty file or an empty tmpfs at the same place):
//! - a directory others may not read and enter, or that the sandbox user may not (its
//!   owner, group or other bits, whichever apply to it): covered whole, not walked into;
//!   so no mount point ever has to be made where the user cannot reach;
//! - a file, FIFO or device others may not read (whatever the owner: an ACL may open it);
//! - every socket (a service listening under a name `/proc/net/unix` no longer shows,
//!   renamed or linked after its `bind`).
//!
//! A shown directory reached by an absolute link (`/lib64 -> /usr/lib64`, a
//! `sandbox.ro_paths` entry linking elsewhere) is bound again at its own path, so what is
//! found under its target is covered at that path. Symbolic links inside are not followed.
//! Each covered path is a mount and arguments of bubblewrap's, which takes a bounded
//! number: a directory with many private entries is covered whole instead (see
//! [`MAX_PRIVATE_PER_DIR`], [`MAX_COVERED`]).
//!
//! A path removed since the walk is passed over (see [`present`]). The walk is taken per
//! sandbox, not once at the worker's start, so a file installed, or made private, while
//! the worker runs is covered from the next sandbox on.

use super::host_user::HostUser;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The host user the sandboxes run as, whose permissions the walk judges by.
#[derive(Clone, Debug)]
pub struct Viewer {
    uid: u32,
    /// Its primary group and, for an ordinary worker, its supplementary groups (a root
    /// worker's sandboxes run with none: `setpriv --clear-groups`).
    gids: Vec<u32>,
}

impl Viewer {
    /// A root worker's `host` user, or the worker's own user.
    pub fn of(host: Option<&HostUser>) -> Self {
        match host {
            Some(h) => Self {
                uid: h.uid,
                gids: vec![h.gid],
            },
            None => {
                let mut gids: Vec<u32> = nix::unistd::getgroups()
                    .map(|g| g.iter().map(|g| g.as_raw()).collect())
                    .unwrap_or_default();
                gids.push(nix::unistd::getegid().as_raw());
                Self {
                    uid: nix::unistd::geteuid().as_raw(),
                    gids,
                }
            }
        }
    }

    /// The `rwx` bits of `meta` that apply to this user: its owner's, else its group's,
    /// else the others'.
    fn bits(&self, meta: &std::fs::Metadata) -> u32 {
        let mode = meta.mode();
        if meta.uid() == self.uid {
            (mode >> 6) & 0o7
        } else if self.gids.contains(&meta.gid()) {
            (mode >> 3) & 0o7
        } else {
            mode & 0o7
        }
    }

    /// Whether an entry of a shown directory is covered (see the module documentation).
    fn hides(&self, meta: &std::fs::Metadata) -> bool {
        let kind = meta.file_type();
        let others = meta.mode() & 0o7;
        if kind.is_symlink() {
            false
        } else if kind.is_dir() {
            others & 0o5 != 0o5 || self.bits(meta) & 0o5 != 0o5
        } else if kind.is_socket() {
            true
        } else {
            others & 0o4 == 0
        }
    }
}

/// A host directory shown in the sandbox: `real` on the host, bound at `inside`.
#[derive(Clone, Debug, PartialEq)]
pub struct Shown {
    pub real: PathBuf,
    pub inside: PathBuf,
}

impl Shown {
    /// How `path` (a system directory, or a `sandbox.ro_paths` entry) is shown: `None`
    /// for a relative link (made as the same link inside, its target walked as part of
    /// another root) or a path that is not there.
    pub fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).ok()?;
            if target.is_relative() && path.parent() == Some(Path::new("/")) {
                return None;
            }
        }
        Some(Self {
            real: path.canonicalize().ok()?,
            inside: path.to_path_buf(),
        })
    }
}

/// What a walk covers, fixed at the worker's start: the directories shown (the system
/// directories and `sandbox.ro_paths`, each as given), whose permissions judge them, and
/// the paths never to cover.
#[derive(Clone, Debug)]
pub struct Plan {
    pub roots: Vec<PathBuf>,
    /// Roots shown but not walked (each as given among `roots`).
    pub unwalked: Vec<PathBuf>,
    pub viewer: Viewer,
    pub keep: Vec<PathBuf>,
}

/// One sandbox's walk: the roots as resolved for it, and what to cover under them.
#[derive(Clone, Debug, Default)]
pub struct Walked {
    /// Each root present now, with the real directory that was walked: the sandbox must
    /// bind that one, not resolve the root again (a link switched after the walk would
    /// show a directory nobody walked).
    pub shown: Vec<Shown>,
    /// The paths inside the sandbox to cover.
    pub private: Vec<PathBuf>,
}

impl Walked {
    /// The real directory walked for the root `inside`, if it was there.
    pub fn real(&self, inside: &Path) -> Option<&Path> {
        self.shown
            .iter()
            .find(|s| s.inside == inside)
            .map(|s| s.real.as_path())
    }
}

impl Plan {
    /// The roots as they resolve now and the paths to cover under them, for a sandbox
    /// starting now (see [`walk`]). Blocking: walks whole directory trees (about 0.4 s
    /// for a usual `/usr`).
    pub fn walk(&self) -> Walked {
        let shown: Vec<Shown> = self.roots.iter().filter_map(|r| Shown::of(r)).collect();
        let walked: Vec<Shown> = shown
            .iter()
            .filter(|s| !self.unwalked.contains(&s.inside))
            .cloned()
            .collect();
        let private = walk(&walked, &self.viewer, &self.keep);
        Walked { shown, private }
    }
}

/// The paths inside the sandbox to cover under each of `shown` (walked on the host at
/// its `real` path), never `keep` nor a directory holding it (the agent program, which
/// must stay runnable), nor a shown root itself (which the operator asked for).
/// Blocking: walks whole directory trees.
pub fn walk(shown: &[Shown], viewer: &Viewer, keep: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in shown {
        if !root.real.is_dir() {
            continue;
        }
        let mut walk = walkdir::WalkDir::new(&root.real)
            .follow_links(false)
            .min_depth(1)
            .into_iter();
        while let Some(entry) = walk.next() {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if !viewer.hides(&meta) || keep.iter().any(|k| k.starts_with(entry.path())) {
                continue;
            }
            if meta.is_dir() {
                // Covered whole: nothing under it is walked.
                walk.skip_current_dir();
            }
            if let Ok(below) = entry.path().strip_prefix(&root.real) {
                found.push(root.inside.join(below));
            }
        }
    }
    found.sort();
    found.dedup();
    let roots: Vec<&Path> = shown.iter().map(|s| s.inside.as_path()).collect();
    collapse(found, &roots, keep)
}

/// Private entries of one directory beyond which the directory is covered whole.
pub const MAX_PRIVATE_PER_DIR: usize = 64;
/// Paths covered in one sandbox at most, where directories can be covered instead:
/// each is a mount and three of bubblewrap's arguments, and bubblewrap takes at most
/// 9,000 arguments (its `MAX_ARGS`), the kernel about 2 MiB of them (`ARG_MAX`).
pub const MAX_COVERED: usize = 1000;

/// Covers a directory whole instead of its private entries where they are many: any
/// directory with more than [`MAX_PRIVATE_PER_DIR`], then the fullest ones until at
/// most [`MAX_COVERED`] paths are left. Never a shown root (which the operator asked
/// for) nor a directory holding `keep`. What is covered only grows: the sandbox then
/// also loses the public files of such a directory.
fn collapse(found: Vec<PathBuf>, roots: &[&Path], keep: &[PathBuf]) -> Vec<PathBuf> {
    use std::collections::{BTreeMap, BTreeSet};
    let coverable = |dir: &Path| {
        !roots.contains(&dir)
            && roots.iter().any(|r| dir.starts_with(r))
            && !keep.iter().any(|k| k.starts_with(dir))
    };
    let mut found: BTreeSet<PathBuf> = found.into_iter().collect();
    // Each pass folds entries into their parents, one level up at most: as many passes
    // as the tree is deep, each O(n log n).
    loop {
        let mut per_dir: BTreeMap<PathBuf, usize> = BTreeMap::new();
        for path in &found {
            if let Some(parent) = path.parent().filter(|p| coverable(p)) {
                *per_dir.entry(parent.to_path_buf()).or_default() += 1;
            }
        }
        let mut full: Vec<PathBuf> = per_dir
            .iter()
            .filter(|(_, n)| **n > MAX_PRIVATE_PER_DIR)
            .map(|(d, _)| d.clone())
            .collect();
        // Still too many: the fullest directories, until the count would fit.
        let mut left = found.len() - full.iter().map(|d| per_dir[d] - 1).sum::<usize>();
        if left > MAX_COVERED {
            let mut by_count: Vec<(&PathBuf, &usize)> = per_dir
                .iter()
                .filter(|(_, n)| **n > 1 && **n <= MAX_PRIVATE_PER_DIR)
                .collect();
            by_count.sort_by(|a, b| b.1.cmp(a.1));
            for (dir, n) in by_count {
                if left <= MAX_COVERED {
                    break;
                }
                full.push(dir.clone());
                left -= n - 1;
            }
        }
        if full.is_empty() {
            return found.into_iter().collect();
        }
        let full: BTreeSet<PathBuf> = full.into_iter().collect();
        found.retain(|p| !p.parent().is_some_and(|d| full.contains(d)));
        found.extend(full);
        // A covered directory hides what is under it: drop whatever has a covered
        // ancestor (checked by ancestors, as deep as the path).
        let snapshot = found.clone();
        found.retain(|p| !p.ancestors().skip(1).any(|a| snapshot.contains(a)));
    }
}

/// Those of `paths` still on the host: covering one removed since the walk would make
/// bubblewrap fail to make its mount point in a read-only directory, and with it every
/// run.
pub fn present(paths: &[PathBuf]) -> impl Iterator<Item = &PathBuf> {
    paths
        .iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_directory_of_many_private_files_is_covered_whole_never_a_root() {
        let root = Path::new("/etc");
        let many: Vec<PathBuf> = (0..=MAX_PRIVATE_PER_DIR)
            .map(|i| root.join("spool").join(format!("f{i}")))
            .chain([root.join("spool/sub/deep"), root.join("ssl/private")])
            .chain((0..=MAX_PRIVATE_PER_DIR).map(|i| root.join(format!("k{i}"))))
            .collect();
        let mut found = collapse(many, &[root], &[]);
        found.sort();
        assert_eq!(found.len(), 2 + MAX_PRIVATE_PER_DIR + 1, "{found:?}");
        assert!(found.contains(&root.join("spool")));
        assert!(found.contains(&root.join("ssl/private")));
        assert!(!found.iter().any(|p| p.starts_with(root.join("spool/sub"))));
        let kept = collapse(
            (0..=MAX_PRIVATE_PER_DIR)
                .map(|i| root.join("tools").join(format!("f{i}")))
                .collect(),
            &[root],
            &[root.join("tools/agent")],
        );
        assert_eq!(
            kept.len(),
            MAX_PRIVATE_PER_DIR + 1,
            "the agent's directory stays"
        );
    }

    #[test]
    fn thousands_of_small_private_directories_are_folded_to_the_bound_quickly() {
        let root = Path::new("/opt/tools");
        let many: Vec<PathBuf> = (0..50)
            .flat_map(|g| (0..100).map(move |d| (g, d)))
            .flat_map(|(g, d)| (0..3).map(move |f| root.join(format!("g{g}/d{d}/f{f}"))))
            .collect();
        let found = collapse(many, &[root], &[]);
        assert_eq!(found.len(), 50, "each group covered whole");
        assert!(found.iter().all(|p| p.starts_with(root) && p != root));
        // Directly under a root nothing folds: more than the bound stays more.
        let flat: Vec<PathBuf> = (0..5000).map(|d| root.join(format!("d{d}"))).collect();
        assert_eq!(collapse(flat, &[root], &[]).len(), 5000);
    }

    #[test]
    fn what_others_may_not_read_is_found_under_the_inside_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let private_dir = root.join("private");
        std::fs::create_dir_all(&private_dir).unwrap();
        std::fs::write(private_dir.join("inner"), "x").unwrap();
        chmod(&private_dir, 0o700);
        std::fs::write(root.join("key"), "x").unwrap();
        chmod(&root.join("key"), 0o600);
        std::fs::write(root.join("public"), "x").unwrap();
        chmod(&root.join("public"), 0o644);
        let agent = root.join("agent");
        std::fs::create_dir_all(&agent).unwrap();
        std::fs::write(agent.join("run"), "x").unwrap();
        chmod(&agent, 0o700);
        let viewer = Viewer {
            uid: 4242,
            gids: vec![4242],
        };
        let shown = [Shown {
            real: root.clone(),
            inside: PathBuf::from("/lib64"),
        }];
        let found = walk(&shown, &viewer, &[agent.join("run")]);
        assert_eq!(
            found,
            vec![PathBuf::from("/lib64/key"), PathBuf::from("/lib64/private")]
        );
    }

    #[test]
    fn a_directory_shut_to_the_viewer_by_its_group_is_covered_whole() {
        let dir = tempfile::tempdir().unwrap();
        let shut = dir.path().join("shut");
        std::fs::create_dir_all(&shut).unwrap();
        chmod(&shut, 0o705);
        let gid = std::fs::metadata(&shut).unwrap().gid();
        let member = Viewer {
            uid: 4242,
            gids: vec![gid],
        };
        let stranger = Viewer {
            uid: 4242,
            gids: vec![gid.wrapping_add(1)],
        };
        let shown = [Shown {
            real: dir.path().to_path_buf(),
            inside: dir.path().to_path_buf(),
        }];
        assert_eq!(walk(&shown, &member, &[]), vec![shut.clone()]);
        assert!(walk(&shown, &stranger, &[]).is_empty());
    }

    #[test]
    fn paths_removed_since_the_walk_are_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let there = dir.path().join("there");
        std::fs::write(&there, "x").unwrap();
        let paths = vec![there.clone(), dir.path().join("gone")];
        assert_eq!(present(&paths).collect::<Vec<_>>(), vec![&there]);
    }
}
