//! A working copy made from the worker's mirror (a warm start): `git clone --shared` of
//! the mirror, which the sandbox sees read-only, so no object is copied and the clone's
//! own writes go to its own `.git`; then `origin` is pointed at the real repository, so
//! that the task branch is fetched from it (only what the mirror lacks) and the push goes
//! there.

use super::git::git;
use super::process::run_logged;
use crate::spec::RunSpec;
use std::path::Path;
use std::time::Duration;

/// Limit of the local clone.
const CLONE_TIMEOUT: Duration = Duration::from_secs(300);

/// Makes `repo` from `mirror`; false (and nothing left in `repo`) when that fails, so
/// the caller clones in full.
/// `config` is the runner's global git configuration for the clone (it trusts the
/// mirror, which the worker's user owns, when the sandbox runs as another host user).
pub fn from_mirror(spec: &RunSpec, mirror: &Path, repo: &Path, config: &Path) -> bool {
    if spec.repository.starts_with('-') {
        return false;
    }
    let git = |dir: Option<&Path>| {
        let mut cmd = git(dir);
        cmd.env("GIT_CONFIG_GLOBAL", config);
        cmd
    };
    let mut clone = git(None);
    // No checkout: the caller's checkout of the task branch writes the working tree.
    clone.args(["clone", "--shared", "--no-checkout", "--no-tags", "--quiet"]);
    if let Some(base) = &spec.base_branch {
        clone.args(["--branch", base]);
    }
    clone.arg("--").arg(mirror).arg(repo);
    let started = std::time::Instant::now();
    let cloned = matches!(run_logged(&mut clone, CLONE_TIMEOUT), Ok(f) if f.success)
        && matches!(
            run_logged(
                git(Some(repo)).args(["remote", "set-url", "origin", &spec.repository]),
                CLONE_TIMEOUT,
            ),
            Ok(f) if f.success
        );
    if cloned {
        super::log(format!(
            "cloned from the worker's mirror in {} ms",
            started.elapsed().as_millis()
        ));
    } else {
        super::log("cannot make the working copy from the worker's mirror; cloning in full");
        let _ = std::fs::remove_dir_all(repo);
    }
    cloned
}
