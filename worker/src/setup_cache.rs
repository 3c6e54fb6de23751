//! The worker's setup cache: what a repository's `agent-setup.sh` produced (the paths its
//! `[setup] cache` names, as one tar archive), kept under
//! `<local.data_dir>/setup-cache/<repository id>/<key>.tar` so that a later run with the
//! same key restores it instead of running the setup.
//!
//! - Keyed by [`ao_shared::setup::cache_key`]: the repository's identity, the setup
//!   script, the cached paths and the key files' contents, read by the worker from its
//!   mirror at the commit the run starts from. Entries live in one directory per
//!   repository, and the repository is part of the key, so an entry is never restored
//!   into another repository.
//! - Written by the worker only. The runner archives the setup's result, before the
//!   agent starts, into the run's `incoming/<run>/<key>.tar` (under the `bwrap` driver
//!   through a pipe the worker copies into that file, bounded by
//!   `warm.setup_cache_entry_max_mb`: the sandbox never sees the directory) and reports
//!   the archive's SHA-256 on its event stream, which the agent cannot write to; the
//!   worker takes the
//!   archive only if it is a regular file (no link followed) of at most
//!   `warm.setup_cache_entry_max_mb` with that hash. So what the agent does later cannot
//!   change what is stored.
//! - Never executed or unpacked outside a sandbox: the worker moves files; the runner
//!   unpacks inside the sandbox, where the archive is read-only.
//! - No secret: the setup runs with none of the run's secrets in its environment.
//! - Bounded by `warm.setup_cache_max_mb`: least recently used entries (by the file's
//!   time, renewed at each restore) are removed past it.

use crate::spec::SetupCacheSpec;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Largest key file or repository config read from the mirror.
const MAX_KEY_FILE: u64 = 64 * 1024 * 1024;

/// The setup caches of every repository a worker serves.
#[derive(Clone, Debug)]
pub struct SetupCache {
    root: PathBuf,
    max_bytes: u64,
    entry_max_bytes: u64,
}

/// What the runner reported about a setup result it archived.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Stored {
    pub key: String,
    pub sha256: String,
    pub bytes: u64,
}

/// Why a reported result was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the reported key is not the run's")]
    OtherKey,
    #[error("the archive is {0} bytes, over the entry bound")]
    TooLarge(u64),
    #[error("the archive is not a regular file")]
    NotAFile,
    #[error("the archive's hash is not the one reported before the agent ran")]
    Hash,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl SetupCache {
    pub fn new(root: PathBuf, max_bytes: u64, entry_max_bytes: u64) -> Self {
        Self {
            root,
            max_bytes,
            entry_max_bytes,
        }
    }

    fn repo_dir(&self, repository: &str) -> PathBuf {
        self.root.join(crate::mirror::Mirrors::id(repository))
    }

    /// The cache for a run starting from `rev` of `mirror`: a hit to restore, or a place
    /// to store into; `None` when the repository declares no `[setup] cache` or has no
    /// setup script. Blocking.
    pub fn lookup(
        &self,
        repository: &str,
        mirror: &Path,
        rev: &str,
        run_id: &str,
    ) -> Option<SetupCacheSpec> {
        let mut read = |path: &str| read_blob(mirror, rev, path);
        let config = read(ao_shared::setup::REPO_CONFIG_PATH)?;
        let config =
            ao_shared::setup::SetupConfig::from_repo_config(std::str::from_utf8(&config).ok()?)?;
        let key = ao_shared::setup::cache_key(repository, &config, &mut read)?;
        let dir = self.repo_dir(repository);
        let entry = dir.join(format!("{key}.tar"));
        if entry.is_file() {
            // Its time is its last use, for eviction.
            let _ = std::fs::File::options()
                .write(true)
                .open(&entry)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Some(SetupCacheSpec {
                key,
                restore: Some(entry),
                store: None,
            });
        }
        let incoming = dir.join("incoming").join(run_id);
        std::fs::create_dir_all(&incoming).ok()?;
        Some(SetupCacheSpec {
            key,
            restore: None,
            store: Some(incoming),
        })
    }

    /// Takes the archive the runner reported into the cache, then evicts past the bound.
    pub fn accept(
        &self,
        repository: &str,
        run: &SetupCacheSpec,
        reported: &Stored,
    ) -> Result<(), StoreError> {
        let Some(store) = &run.store else {
            return Err(StoreError::OtherKey);
        };
        if reported.key != run.key {
            return Err(StoreError::OtherKey);
        }
        let archive = store.join(format!("{}.tar", run.key));
        let mut file = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&archive)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile);
        }
        if meta.len() > self.entry_max_bytes {
            return Err(StoreError::TooLarge(meta.len()));
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut read_total = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            read_total += n as u64;
            if read_total > self.entry_max_bytes {
                return Err(StoreError::TooLarge(read_total));
            }
            hasher.update(&buf[..n]);
        }
        if hex::encode(hasher.finalize()) != reported.sha256 {
            return Err(StoreError::Hash);
        }
        let dir = self.repo_dir(repository);
        let entry = dir.join(format!("{}.tar", run.key));
        // A copy, not a rename: the archive's inode was writable inside the sandbox. Named
        // after the run's own incoming directory, so that runs of other workers on this
        // data dir taking in the same key at once each copy to their own file; the last
        // rename wins, whole.
        let run_name = store
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let partial = dir.join(format!("{}.{run_name}.partial", run.key));
        std::fs::copy(&archive, &partial)?;
        let copied = Sha256::digest(std::fs::read(&partial)?);
        if hex::encode(copied) != reported.sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(StoreError::Hash);
        }
        std::fs::rename(&partial, &entry)?;
        self.evict();
        Ok(())
    }

    /// Removes a run's incoming directory.
    pub fn discard(&self, run: &SetupCacheSpec) {
        if let Some(store) = &run.store {
            let _ = std::fs::remove_dir_all(store);
        }
    }

    /// Removes least recently used entries, any repository, until all fit the bound.
    /// Archives waiting in `incoming/` and copies being taken in (`.partial`) count too and
    /// go the same way, oldest first: one
    /// left by a run whose worker was killed before it was taken in would otherwise stay
    /// for good, outside the bound (a run whose archive goes this way only misses being
    /// stored).
    pub fn evict(&self) -> Vec<PathBuf> {
        let mut entries: Vec<(std::time::SystemTime, PathBuf, u64)> = Vec::new();
        let add = |e: std::fs::DirEntry, entries: &mut Vec<_>| {
            let path = e.path();
            // A `.partial` copy counts too: one a killed worker left would stay for good.
            if path
                .extension()
                .is_some_and(|x| x == "tar" || x == "partial")
            {
                // Not followed: an archive is a plain file, never a link.
                if let Ok(m) = std::fs::symlink_metadata(&path) {
                    if m.is_file() {
                        let used = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                        entries.push((used, path, m.len()));
                    }
                }
            }
        };
        for repo in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            for e in std::fs::read_dir(repo.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                add(e, &mut entries);
            }
            for run in std::fs::read_dir(repo.path().join("incoming"))
                .into_iter()
                .flatten()
                .flatten()
            {
                for e in std::fs::read_dir(run.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    add(e, &mut entries);
                }
            }
        }
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        entries.sort();
        let mut removed = Vec::new();
        for (_, path, size) in entries {
            if total <= self.max_bytes {
                break;
            }
            // A run restoring it has it open (or bound): removing the name is harmless.
            if std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(size);
                tracing::info!(entry = %path.display(), bytes = size, "least recently used setup cache entry removed");
                removed.push(path);
            }
        }
        removed
    }
}

/// A file of `rev` in `mirror` (`None`: absent or too large).
fn read_blob(mirror: &Path, rev: &str, path: &str) -> Option<Vec<u8>> {
    let object = format!("{rev}:{path}");
    let size = crate::mirror::git(None)
        .arg("--git-dir")
        .arg(mirror)
        .args(["cat-file", "-s", &object])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let size: u64 = String::from_utf8_lossy(&size.stdout).trim().parse().ok()?;
    if size > MAX_KEY_FILE {
        return None;
    }
    let out = crate::mirror::git(None)
        .arg("--git-dir")
        .arg(mirror)
        .args(["cat-file", "blob", &object])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cache: &SetupCache, repo: &str, key: &str, bytes: usize) -> PathBuf {
        let dir = cache.repo_dir(repo);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{key}.tar"));
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        path
    }

    fn store(cache: &SetupCache, repo: &str, key: &str, content: &[u8]) -> Result<(), StoreError> {
        let incoming = cache.repo_dir(repo).join("incoming").join("run");
        std::fs::create_dir_all(&incoming).unwrap();
        std::fs::write(incoming.join(format!("{key}.tar")), content).unwrap();
        let run = SetupCacheSpec {
            key: key.into(),
            restore: None,
            store: Some(incoming),
        };
        cache.accept(
            repo,
            &run,
            &Stored {
                key: key.into(),
                sha256: hex::encode(Sha256::digest(b"what the runner archived")),
                bytes: content.len() as u64,
            },
        )
    }

    /// Two workers on one data dir take in results of the same key at once, each from its
    /// own run's incoming directory: one of them is stored whole. Before, both copied to
    /// the one `<key>.partial`, each found the other's bytes there, and neither was
    /// stored (seen under load in `p_breaker`).
    #[test]
    fn concurrent_results_of_one_key_leave_one_whole_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache =
            std::sync::Arc::new(SetupCache::new(dir.path().to_path_buf(), 1 << 30, 1 << 30));
        for round in 0..20 {
            let key = format!("k{round}");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let runs: Vec<_> = (0..2u8)
                .map(|n| {
                    let incoming = cache.repo_dir("r").join("incoming").join(format!("run{n}"));
                    std::fs::create_dir_all(&incoming).unwrap();
                    let content = vec![n; 4 << 20];
                    std::fs::write(incoming.join(format!("{key}.tar")), &content).unwrap();
                    let sha256 = hex::encode(Sha256::digest(&content));
                    let (cache, barrier, key) = (cache.clone(), barrier.clone(), key.clone());
                    std::thread::spawn(move || {
                        let run = SetupCacheSpec {
                            key: key.clone(),
                            restore: None,
                            store: Some(incoming),
                        };
                        let stored = Stored {
                            key,
                            sha256,
                            bytes: 4 << 20,
                        };
                        barrier.wait();
                        cache.accept("r", &run, &stored).map(|()| n)
                    })
                })
                .collect();
            let results: Vec<_> = runs.into_iter().map(|t| t.join().unwrap()).collect();
            let entry = cache.repo_dir("r").join(format!("{key}.tar"));
            let bytes = std::fs::read(&entry)
                .unwrap_or_else(|e| panic!("round {round}: no entry ({e}); {results:?}"));
            assert!(
                bytes.len() == 4 << 20
                    && (bytes.iter().all(|b| *b == 0) || bytes.iter().all(|b| *b == 1)),
                "round {round}: the entry mixes both results"
            );
        }
    }

    /// A copy a killed worker left while taking a result in counts in the bound and goes
    /// first when it is the oldest. Before, `.partial` files stayed for good, uncounted.
    #[test]
    fn a_killed_worker_s_partial_copy_counts_in_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SetupCache::new(dir.path().to_path_buf(), 150, 1000);
        let left = cache.repo_dir("a").join("k1.run0.partial");
        std::fs::create_dir_all(left.parent().unwrap()).unwrap();
        std::fs::write(&left, vec![0u8; 100]).unwrap();
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&left)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let kept = entry(&cache, "a", "k2", 100);
        assert_eq!(cache.evict(), vec![left.clone()]);
        assert!(!left.exists() && kept.exists());
    }

    #[test]
    fn least_recently_used_entries_go_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SetupCache::new(dir.path().to_path_buf(), 250, 1000);
        let old = entry(&cache, "a", "k1", 100);
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let newer = entry(&cache, "b", "k2", 100);
        assert!(cache.evict().is_empty(), "200 bytes fit in 250");
        let newest = entry(&cache, "a", "k3", 100);
        assert_eq!(cache.evict(), vec![old.clone()]);
        assert!(!old.exists() && newer.exists() && newest.exists());
    }

    #[test]
    fn only_the_reported_archive_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SetupCache::new(dir.path().to_path_buf(), 1 << 20, 1 << 10);
        assert!(matches!(
            store(&cache, "r", "k", b"changed by the agent"),
            Err(StoreError::Hash)
        ));
        assert!(matches!(
            store(&cache, "r", "k", &[0u8; 2048]),
            Err(StoreError::TooLarge(_))
        ));
        assert!(store(&cache, "r", "k", b"what the runner archived").is_ok());
        assert!(cache.repo_dir("r").join("k.tar").is_file());
    }

    #[test]
    fn a_linked_archive_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SetupCache::new(dir.path().to_path_buf(), 1 << 20, 1 << 10);
        let incoming = dir.path().join("in");
        std::fs::create_dir_all(&incoming).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", incoming.join("k.tar")).unwrap();
        let run = SetupCacheSpec {
            key: "k".into(),
            restore: None,
            store: Some(incoming),
        };
        let reported = Stored {
            key: "k".into(),
            sha256: String::new(),
            bytes: 0,
        };
        assert!(cache.accept("r", &run, &reported).is_err());
    }
}
