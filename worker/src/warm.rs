//! Warm starts for one run: before the sandbox starts, the repository's mirror is brought
//! up to date and leased (see `mirror.rs`) and the setup cache looked up (see
//! `setup_cache.rs`); the run spec then names both. While the run goes, its event stream
//! is watched for the runner's report of a setup result; after it, that result is stored.
//! Anything that fails here only makes the run cold: it never fails the run.

use crate::mirror::{MirrorLease, Mirrors};
use crate::setup_cache::{SetupCache, Stored};
use crate::spec::{RunSpec, RunnerEvent, SetupCacheSpec, SETUP_STORED_EVENT};
use crate::worker::Worker;
use ao_shared::config::Settings;
use ao_shared::message::SubtaskMessage;
use ao_shared::queue::{QueueId, Received};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// The warm stores of a worker; both absent when turned off or for the `nomad` driver
/// (whose sandboxes run on other hosts and clone for themselves).
#[derive(Clone, Debug, Default)]
pub struct Warm {
    mirrors: Option<Mirrors>,
    setup: Option<SetupCache>,
}

/// What one run holds: the mirror lease (released when dropped) and what it needs to
/// store a setup result afterwards.
#[derive(Default)]
pub struct RunWarm {
    lease: Option<MirrorLease>,
    setup: Option<SetupCacheSpec>,
    stored: Arc<Mutex<Option<Stored>>>,
    /// What the preparation did and how long it took, for the run's event stream.
    pub summary: Option<String>,
}

const MIB: u64 = 1024 * 1024;

impl Warm {
    /// From `[warm]`; `local_driver` is false for drivers whose sandbox cannot see the
    /// worker's files.
    pub fn new(settings: &Settings, local_driver: bool) -> Self {
        let w = &settings.warm;
        let data = &settings.local.data_dir;
        let mirrors = (local_driver && w.mirrors)
            .then(|| Mirrors::new(data.join("mirrors"), w.mirror_max_mb.saturating_mul(MIB)));
        let setup = (mirrors.is_some() && w.setup_cache).then(|| {
            SetupCache::new(
                data.join("setup-cache"),
                w.setup_cache_max_mb.saturating_mul(MIB),
                w.setup_cache_entry_max_mb.saturating_mul(MIB),
            )
        });
        Self { mirrors, setup }
    }

    /// Prepares the mirror and the setup cache of `spec`'s repository and names them in
    /// `spec.warm`. The git token, if the run has one, is taken from its secrets.
    pub async fn prepare(&self, spec: &mut RunSpec) -> RunWarm {
        let Some(mirrors) = self.mirrors.clone() else {
            return RunWarm::default();
        };
        let setup = self.setup.clone();
        let repository = spec.repository.clone();
        let token = spec
            .secret_env
            .get(crate::credentials::GIT_TOKEN_ENV)
            .cloned();
        let rev_candidates = start_revs(spec);
        // The whole id: its first digits are a time, shared by subtasks started together.
        let run_id = format!("{}-{}", spec.subtask_id, spec.attempt);
        let started = Instant::now();
        let prepared = tokio::task::spawn_blocking(move || {
            let (lease, how) = mirrors.prepare(&repository, token.as_ref())?;
            let removed = mirrors.evict(&Mirrors::id(&repository));
            if !removed.is_empty() {
                tracing::info!(count = removed.len(), "mirrors evicted");
            }
            let cache = setup.and_then(|c| {
                let rev = rev_candidates
                    .iter()
                    .find(|r| crate::mirror::has_commit(&lease.path, r))?;
                c.lookup(&repository, &lease.path, rev, &run_id)
            });
            Ok::<_, crate::mirror::MirrorError>((lease, how, cache))
        })
        .await;
        match prepared {
            Ok(Ok((lease, how, cache))) => {
                let setup_cache = match &cache {
                    Some(c) if c.restore.is_some() => "hit",
                    Some(_) => "miss",
                    None => "none",
                };
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(
                    mirror = how.as_str(),
                    setup_cache,
                    ms,
                    "warm start prepared"
                );
                spec.warm.mirror = Some(lease.path.clone());
                spec.warm.setup = cache.clone();
                RunWarm {
                    lease: Some(lease),
                    setup: cache,
                    stored: Arc::default(),
                    summary: Some(format!(
                        "warm start prepared in {ms} ms (mirror {}, setup cache {setup_cache})",
                        how.as_str()
                    )),
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "no mirror for this run; the runner clones in full");
                RunWarm::default()
            }
            Err(e) => {
                tracing::warn!(error = %e, "mirror preparation stopped");
                RunWarm::default()
            }
        }
    }

    /// Whether this worker should leave `order` to the worker its task prefers (the one
    /// holding its working state): only on the message's first receive, and only when this
    /// worker has no mirror of the repository; a warm worker takes it anyway.
    pub fn leaves_to_preferred(&self, me: &str, order: &SubtaskMessage, receives: u32) -> bool {
        let Some(mirrors) = &self.mirrors else {
            return false;
        };
        receives <= 1
            && order.prefer_worker.as_deref().is_some_and(|w| w != me)
            && !mirrors.path(&order.repository).join("HEAD").is_file()
    }

    /// Stores the setup result the runner reported, if any, and forgets the run's
    /// incoming directory. Call after the sandbox has ended.
    pub async fn finish(&self, spec: &RunSpec, run: RunWarm) {
        if let (Some(mirrors), Some(lease)) = (self.mirrors.clone(), run.lease) {
            // The full check, off the way to the next run's start; the lease keeps the
            // mirror from being removed meanwhile.
            tokio::task::spawn_blocking(move || mirrors.check(&lease));
        }
        let (Some(cache), Some(setup)) = (self.setup.clone(), run.setup) else {
            return;
        };
        let stored = run.stored.lock().take();
        let repository = spec.repository.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(stored) = stored {
                match cache.accept(&repository, &setup, &stored) {
                    Ok(()) => {
                        tracing::info!(bytes = stored.bytes, "setup result stored in the cache")
                    }
                    Err(e) => tracing::warn!(error = %e, "setup result not stored"),
                }
            }
            cache.discard(&setup);
        })
        .await;
    }
}

impl RunWarm {
    /// Passes the run's events on to `events`, keeping the first setup-result report
    /// (the runner sends it before the agent starts; the agent cannot write on the
    /// runner's event stream).
    pub fn tap(&self, events: mpsc::Sender<RunnerEvent>) -> mpsc::Sender<RunnerEvent> {
        if self.setup.as_ref().is_none_or(|s| s.store.is_none()) {
            return events;
        }
        let (tx, mut rx) = mpsc::channel::<RunnerEvent>(256);
        let stored = self.stored.clone();
        tokio::spawn(async move {
            let mut seen = false;
            while let Some(event) = rx.recv().await {
                if event.kind == SETUP_STORED_EVENT {
                    if !seen {
                        seen = true;
                        *stored.lock() = serde_json::from_value(event.data.clone()).ok();
                    }
                    continue;
                }
                if events.send(event).await.is_err() {
                    break;
                }
            }
        });
        tx
    }
}

/// Puts a fresh copy of `order` without its preference back on its queue and deletes the
/// received one, so that the preferred worker may take it now and any worker (this one
/// included) later; a fresh copy, so that no receive counts towards the dead-letter
/// queue. On a queue error the received message is released instead.
pub async fn leave_to_preferred(worker: &Worker, message: &Received, mut order: SubtaskMessage) {
    tracing::info!(task_id = %order.task_id, subtask_id = %order.subtask_id,
        prefer = order.prefer_worker.as_deref().unwrap_or(""),
        "left to the worker holding the task's working state");
    order.prefer_worker = None;
    let sent = match order.encode() {
        Ok(body) => worker
            .queue
            .send(QueueId::Capability(order.capability), &body)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match sent {
        Ok(_) => {
            if let Err(e) = worker.queue.delete(&message.receipt).await {
                tracing::warn!(error = %e, "cannot delete the message left to another worker");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot requeue; releasing the message instead");
            let _ = worker.queue.release(&message.receipt).await;
        }
    }
}

/// The commits the run may start from, first match wins, as the runner picks them: the
/// task branch if it exists, else the base branch, else the default branch.
fn start_revs(spec: &RunSpec) -> Vec<String> {
    let mut revs = vec![format!("refs/heads/{}", spec.branch)];
    if let Some(base) = &spec.base_branch {
        revs.push(format!("refs/heads/{base}"));
    }
    revs.push("HEAD".into());
    revs
}
