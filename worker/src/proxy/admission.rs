//! Which connections a run's proxy serves, and how many at once.
//!
//! A connection is *unproven* from its accept until its first request that carries the
//! attempt's token (any request, when the proxy has no token). Unproven connections are
//! at most [`MAX_UNPROVEN`]: one more closes the one that has waited longest. Anyone who
//! reaches a TCP proxy's port can open them, so they must not take the places of the
//! attempt's own connections, and holding them idle must not lock the attempt out: a
//! flood only ever closes older unproven connections, and a client that sends its
//! request head at once is usually proven before that many newer ones arrive. Not
//! always: under load, a connection unproven for a round trip (a client answering the
//! proxy's challenge) can still be closed by a fast enough flood; the client sees a
//! closed connection and retries.
//!
//! A proven connection takes a place in the bound of [`MAX_CONNECTIONS`], which it
//! holds (and any tunnel it becomes holds) until both end; when every place is taken, its
//! request waits for one, with at most [`MAX_WAITING`] others. Only the holder of the
//! token (the run's own agent) makes proven connections, so a request beyond those is
//! refused at once ([`Busy`]) rather than queued without bound: every connection holds
//! one of the worker's file descriptors. A connection refused so stays unproven, one of
//! the [`MAX_UNPROVEN`], and is closed in its turn.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Connections one run's proxy serves at once. Bounds the worker's file descriptors per
/// run: an agent opening thousands of connections would otherwise exhaust them and hang
/// the worker.
pub const MAX_CONNECTIONS: usize = 128;
/// Connections waiting for their first request with the attempt's token; one more
/// closes the one waiting longest.
pub const MAX_UNPROVEN: usize = 128;
/// Proven connections waiting for a place; a request beyond them is refused ([`Busy`]).
pub const MAX_WAITING: usize = 256;

/// A proven connection's request found every place taken and [`MAX_WAITING`] others
/// already waiting for one.
#[derive(Debug, thiserror::Error)]
#[error("the run already has {MAX_CONNECTIONS} connections to its proxy and {MAX_WAITING} waiting")]
pub struct Busy;

/// A proven connection's place in the bound of [`MAX_CONNECTIONS`], shared by the
/// connection and the tunnel it may become.
pub type Slot = Arc<OwnedSemaphorePermit>;

/// The admission state of one proxy.
pub struct Admission {
    slots: Arc<Semaphore>,
    waiting: Arc<Semaphore>,
    unproven: Mutex<Unproven>,
    /// The most places taken at once.
    peak: AtomicUsize,
}

#[derive(Default)]
struct Unproven {
    next: u64,
    /// Oldest first: each with what closes it.
    waiting: VecDeque<(u64, CancellationToken)>,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            waiting: Arc::new(Semaphore::new(MAX_WAITING)),
            unproven: Mutex::new(Unproven::default()),
            peak: AtomicUsize::new(0),
        }
    }
}

impl Admission {
    /// Admits an accepted connection as unproven, closing the longest-waiting unproven
    /// one when there are already [`MAX_UNPROVEN`]. The connection is to be closed when
    /// [`Connection::evicted`] is cancelled.
    pub fn accept(self: &Arc<Self>) -> Connection {
        let evicted = CancellationToken::new();
        let mut unproven = self.unproven.lock();
        while unproven.waiting.len() >= MAX_UNPROVEN {
            if let Some((_, oldest)) = unproven.waiting.pop_front() {
                oldest.cancel();
            }
        }
        let id = unproven.next;
        unproven.next += 1;
        unproven.waiting.push_back((id, evicted.clone()));
        Connection {
            id,
            admission: self.clone(),
            evicted,
            slot: tokio::sync::OnceCell::new(),
        }
    }

    /// The most places taken at once so far (at most [`MAX_CONNECTIONS`]).
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    fn forget(&self, id: u64) {
        self.unproven.lock().waiting.retain(|(i, _)| *i != id);
    }
}

/// One accepted connection.
pub struct Connection {
    id: u64,
    admission: Arc<Admission>,
    evicted: CancellationToken,
    slot: tokio::sync::OnceCell<Slot>,
}

impl Connection {
    /// Cancelled when newer unproven connections push this one out.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    /// Proves the connection (its request carried the token): it is no longer evicted,
    /// and takes a place, waiting for one when all are taken. The same place on every
    /// later call. [`Busy`] when [`MAX_WAITING`] others are waiting already: the
    /// connection then stays unproven (a later request on it may try again).
    pub async fn prove(&self) -> Result<Slot, Busy> {
        if let Some(slot) = self.slot.get() {
            return Ok(slot.clone());
        }
        let admission = &self.admission;
        self.slot
            .get_or_try_init(|| async {
                let _waiting = admission.waiting.try_acquire().map_err(|_| Busy)?;
                admission.forget(self.id);
                // Never closed: the semaphore lives as long as the admission.
                let permit = admission
                    .slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Busy)?;
                let taken = MAX_CONNECTIONS - admission.slots.available_permits();
                admission.peak.fetch_max(taken, Ordering::SeqCst);
                Ok(Arc::new(permit))
            })
            .await
            .cloned()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.admission.forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_unproven_connection_beyond_the_bound_closes_the_oldest() {
        let admission = Arc::new(Admission::default());
        let first = admission.accept();
        let rest: Vec<_> = (1..MAX_UNPROVEN).map(|_| admission.accept()).collect();
        assert!(!first.evicted().is_cancelled());
        let newest = admission.accept();
        assert!(first.evicted().is_cancelled(), "the oldest is closed");
        assert!(rest.iter().all(|c| !c.evicted().is_cancelled()));
        assert!(!newest.evicted().is_cancelled());
    }

    #[tokio::test]
    async fn a_proven_connection_is_never_evicted_and_keeps_its_place() {
        let admission = Arc::new(Admission::default());
        let proven = admission.accept();
        let slot = proven.prove().await.expect("a place");
        assert!(!proven.evicted().is_cancelled());
        let again = proven.prove().await.expect("the same place");
        assert!(Arc::ptr_eq(&slot, &again));
        let flood: Vec<_> = (0..MAX_UNPROVEN * 2).map(|_| admission.accept()).collect();
        assert!(!proven.evicted().is_cancelled());
        assert!(flood[..MAX_UNPROVEN]
            .iter()
            .all(|c| c.evicted().is_cancelled()));
        assert_eq!(admission.peak(), 1);
    }

    #[tokio::test]
    async fn proven_connections_beyond_the_places_wait_and_beyond_the_waiting_are_busy() {
        let admission = Arc::new(Admission::default());
        let mut served = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let c = admission.accept();
            c.prove().await.expect("a place");
            served.push(c);
        }
        let waiters: Vec<_> = (0..MAX_WAITING)
            .map(|_| {
                let c = admission.accept();
                tokio::spawn(async move { c.prove().await.is_ok() })
            })
            .collect();
        while admission.waiting.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let late = admission.accept();
        assert!(late.prove().await.is_err(), "busy beyond the waiting ones");
        let newer: Vec<_> = (0..MAX_UNPROVEN).map(|_| admission.accept()).collect();
        assert!(
            late.evicted().is_cancelled(),
            "a busy connection stays unproven and is closed in its turn"
        );
        drop(newer);
        let late = admission.accept();
        drop(served);
        for w in waiters {
            assert!(w.await.unwrap(), "each waiting one gets a freed place");
        }
        assert!(late.prove().await.is_ok(), "a later request tries again");
        assert_eq!(admission.peak(), MAX_CONNECTIONS);
    }

    #[tokio::test]
    async fn a_closed_unproven_connection_frees_its_place_in_the_queue() {
        let admission = Arc::new(Admission::default());
        let kept = admission.accept();
        for _ in 0..MAX_UNPROVEN * 2 {
            drop(admission.accept());
        }
        assert!(
            !kept.evicted().is_cancelled(),
            "closed ones are not counted"
        );
    }
}
