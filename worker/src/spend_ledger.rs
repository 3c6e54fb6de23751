//! The spend ledger: what each run in progress has spent so far, kept on disk under the
//! worker's work directory (`<work_dir>/.spend-ledger/`), so that a worker killed in the
//! middle of a run (SIGKILL, the OOM killer, a lost host) does not lose it and budgets do
//! not under-count.
//!
//! Each worker process owns one directory, locked (an exclusive `flock`) for as long as
//! the process lives. A run's entry is the `Spent` report ([`ResultMessage::Spent`]) the
//! run would send if nothing else reported its spend: written when the run learns what it
//! spent (its agent's `result`), rewritten with the final figure and the very `at` of the
//! report that carries it (`Finished` or `Spent`) just before that report is sent, and
//! removed once it is sent. At start, a worker sends the entries of every directory whose
//! lock no live process holds, then removes them. The coordinator books a report once
//! per task, subtask, attempt, worker and `at` (`coordinator/src/spend.rs`), so an entry
//! sent after its report had already gone out books nothing twice.

use ao_shared::message::{ResultMessage, SubtaskMessage};
use ao_shared::timefmt::Timestamp;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The ledger's directory under the work directory.
const LEDGER_DIR: &str = ".spend-ledger";
/// The lock file of a process's directory.
const LOCK_FILE: &str = "lock";

/// This worker process's ledger directory, locked while it lives.
pub struct SpendLedger {
    dir: PathBuf,
    /// Held open: the exclusive lock lasts as long as the process.
    _lock: File,
}

impl SpendLedger {
    /// Makes and locks a fresh directory for this process under `work_root`.
    ///
    /// Errors: the directory or its lock cannot be made (a work directory that is not
    /// writable).
    pub fn open(work_root: &Path) -> io::Result<Self> {
        let name = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let root = work_root.join(LEDGER_DIR);
        // Made and locked under a hidden name, then renamed into place: a worker starting
        // at the same moment on the same work dir (see [`abandoned`], which skips hidden
        // names) never sees it without its lock, so never takes it for a dead one's.
        let making = root.join(format!(".{name}"));
        std::fs::create_dir_all(&making)?;
        let lock = File::create(making.join(LOCK_FILE))?;
        lock.try_lock()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let dir = root.join(name);
        std::fs::rename(&making, &dir)?;
        Ok(Self { dir, _lock: lock })
    }

    /// The entry of one run of `order` by `worker`.
    pub fn entry(&self, order: &SubtaskMessage, worker: &str) -> LedgerEntry {
        LedgerEntry {
            path: self.dir.join(format!(
                "{}.{}.{}.{}.json",
                order.task_id,
                order.subtask_id,
                order.attempt,
                uuid::Uuid::new_v4().simple()
            )),
            order: order.clone(),
            worker: worker.to_string(),
        }
    }
}

/// One run's entry in the ledger.
pub struct LedgerEntry {
    path: PathBuf,
    order: SubtaskMessage,
    worker: String,
}

impl LedgerEntry {
    /// The `Spent` report of `cost_usd` dollars at `at` for this run.
    pub fn report(&self, cost_usd: f64, at: Timestamp) -> ResultMessage {
        ResultMessage::Spent {
            task_id: self.order.task_id,
            subtask_id: self.order.subtask_id,
            attempt: self.order.attempt,
            worker: self.worker.clone(),
            cost_usd,
            at,
        }
    }

    /// Records that the run has spent `cost_usd` dollars, to be reported with `at`
    /// (replacing what was recorded before). Nothing is written for no spend. A failure
    /// to write is logged: the run goes on, its spend is then only as durable as before.
    pub fn record(&self, cost_usd: f64, at: Timestamp) {
        if !(cost_usd.is_finite() && cost_usd > 0.0) {
            return;
        }
        let written = self
            .report(cost_usd, at)
            .encode()
            .map_err(io::Error::other)
            .and_then(|body| {
                let tmp = self.path.with_extension("tmp");
                std::fs::write(&tmp, body)?;
                std::fs::rename(&tmp, &self.path)
            });
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot record the run's spend in the ledger");
        }
    }

    /// Removes the entry: its spend was reported.
    pub fn clear(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, path = %self.path.display(),
                "cannot remove a reported ledger entry; it may be reported again (booked once)"),
        }
    }
}

/// The ledger directories under `work_root` that no live process holds, each with the
/// paths of its entries.
pub fn abandoned(work_root: &Path) -> Vec<(PathBuf, Vec<PathBuf>)> {
    let Ok(dirs) = std::fs::read_dir(work_root.join(LEDGER_DIR)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // A hidden name is a directory still being made (see [`SpendLedger::open`]).
    let visible = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
    };
    for dir in dirs
        .flatten()
        .map(|d| d.path())
        .filter(|p| p.is_dir() && visible(p))
    {
        let free = File::options()
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map(|f| f.try_lock().is_ok())
            // No lock file: a directory whose making was cut short.
            .unwrap_or(true);
        if !free {
            continue;
        }
        let entries = std::fs::read_dir(&dir)
            .map(|es| {
                es.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        out.push((dir, entries));
    }
    out
}

/// Sends the entries of the ledgers of dead worker processes under `work_root` and
/// removes them; an entry that cannot be sent stays for the next start.
pub async fn replay(worker: &crate::worker::Worker, work_root: &Path) {
    for (dir, entries) in abandoned(work_root) {
        let mut kept = 0;
        for path in entries {
            let report = std::fs::read_to_string(&path)
                .ok()
                .and_then(|body| ResultMessage::decode(&body).ok());
            let Some(report @ ResultMessage::Spent { .. }) = report else {
                tracing::warn!(path = %path.display(), "unreadable spend ledger entry; removed");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            match worker.report_reliably(&report).await {
                Ok(()) => {
                    tracing::info!(task_id = %report.task_id(), "spend of a run cut short by the worker's end reported");
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    kept += 1;
                    tracing::warn!(error = %e, "cannot report the spend of a run cut short; kept for the next start");
                }
            }
        }
        if kept == 0 {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ao_shared::capability::Capability;

    fn order() -> SubtaskMessage {
        SubtaskMessage::decode(
            &serde_json::json!({
                "task_id": ao_shared::ids::TaskId::default(),
                "subtask_id": ao_shared::ids::SubtaskId::default(),
                "attempt": 2, "capability": Capability::Coder,
                "repository": "/r.git", "branch": "agent/x", "title": "t", "prompt": "p",
                "enqueued_at": "2026-01-01T00:00:00Z",
                "version": ao_shared::message::MESSAGE_VERSION
            })
            .to_string(),
        )
        .expect("a work order")
    }

    /// A live process's entries are not taken; a dead one's are, as the report it would
    /// have sent; a reported entry is gone.
    #[test]
    fn only_the_entries_of_dead_processes_are_replayed() {
        let root = tempfile::tempdir().unwrap();
        let live = SpendLedger::open(root.path()).unwrap();
        let running = live.entry(&order(), "w-live");
        running.record(0.5, ao_shared::timefmt::now());
        assert!(abandoned(root.path()).is_empty(), "a live ledger was taken");

        let dead = SpendLedger::open(root.path()).unwrap();
        let at = ao_shared::timefmt::now();
        let cut = dead.entry(&order(), "w-dead");
        cut.record(0.1, at);
        cut.record(0.25, at);
        let done = dead.entry(&order(), "w-dead");
        done.record(1.0, at);
        done.clear();
        drop(dead);
        let found = abandoned(root.path());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].1.len(), 1, "{found:?}");
        let report = ResultMessage::decode(&std::fs::read_to_string(&found[0].1[0]).unwrap());
        assert_eq!(report.unwrap(), cut.report(0.25, at));
    }

    /// Workers starting at once on one work dir, while another's start scans for dead
    /// ledgers and removes them: no starting worker loses its ledger or fails to lock it.
    #[test]
    fn workers_starting_at_once_keep_their_ledgers() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().to_path_buf();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scanner = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    for (dir, _) in abandoned(&path) {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
            })
        };
        let starters: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .map(|_| SpendLedger::open(&path).map_err(|e| e.to_string()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut kept = Vec::new();
        for s in starters {
            for opened in s.join().unwrap() {
                kept.push(opened.expect("a starting worker made and locked its ledger"));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        scanner.join().unwrap();
        for ledger in &kept {
            assert!(
                ledger.dir.join(LOCK_FILE).exists(),
                "a live ledger was removed"
            );
        }
    }
}
