//! A state store that fails on purpose, wrapped around a real one: the fault-injection
//! point of the in-process tests of the result path (store outages, writes that commit
//! and then report an error). Everything it does not fail goes to the real store.

use ao_shared::ids::{DeliveryId, TaskId};
use ao_shared::state::{
    Event, InboxDelivery, InboxOutcome, LeaseGrant, NewEvent, StateStore, StoreError, TaskPage,
    TaskQuery,
};
use ao_shared::status::TaskStatus;
use ao_shared::task::Task;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The switches of a [`FaultyStore`], shared with the test.
#[derive(Default)]
pub struct Faults {
    /// While set, every task write (`update_task`) fails without writing: an outage.
    pub refuse_writes: AtomicBool,
    /// Task writes (`update_task`) that still commit but then report an error (a timeout
    /// or a 5xx after the service applied the call); counted down.
    pub commit_then_fail: AtomicU32,
    /// How many writes committed and then reported an error.
    pub committed_but_failed: AtomicU32,
    /// Reads of tasks (`get_task`) that fail right after each write that committed and
    /// reported an error: the store stays unreadable for a while.
    pub unreadable_after_commit: AtomicU32,
    /// Reads still to fail.
    reads_to_fail: AtomicU32,
}

/// A [`StateStore`] that injects [`Faults`] into a real store.
pub struct FaultyStore {
    inner: Arc<dyn StateStore>,
    faults: Arc<Faults>,
}

impl FaultyStore {
    /// Wraps `inner`; the test keeps `faults` to turn faults on and off.
    pub fn wrap(inner: Arc<dyn StateStore>, faults: Arc<Faults>) -> Arc<dyn StateStore> {
        Arc::new(Self { inner, faults })
    }
}

fn injected(what: &str) -> StoreError {
    StoreError::Backend(format!("injected fault: {what}"))
}

#[async_trait]
impl StateStore for FaultyStore {
    async fn create_task(
        &self,
        task: &Task,
        delivery: Option<&DeliveryId>,
        events: &[NewEvent],
    ) -> Result<Task, StoreError> {
        self.inner.create_task(task, delivery, events).await
    }

    async fn get_task(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        let failing = self
            .faults
            .reads_to_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(injected("the store is unavailable"));
        }
        self.inner.get_task(id).await
    }

    async fn update_task(&self, task: &Task, events: &[NewEvent]) -> Result<Task, StoreError> {
        if self.faults.refuse_writes.load(Ordering::SeqCst) {
            return Err(injected("the store is unavailable"));
        }
        let stored = self.inner.update_task(task, events).await?;
        let armed = self
            .faults
            .commit_then_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if armed {
            self.faults
                .committed_but_failed
                .fetch_add(1, Ordering::SeqCst);
            let unreadable = self.faults.unreadable_after_commit.load(Ordering::SeqCst);
            self.faults
                .reads_to_fail
                .store(unreadable, Ordering::SeqCst);
            return Err(injected("timed out after the write was applied"));
        }
        Ok(stored)
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        self.inner.list_tasks(query).await
    }

    async fn count_tasks(&self, status: TaskStatus) -> Result<u64, StoreError> {
        self.inner.count_tasks(status).await
    }

    async fn record_delivery(&self, delivery: &DeliveryId) -> Result<bool, StoreError> {
        self.inner.record_delivery(delivery).await
    }

    async fn append_events(&self, task: TaskId, events: &[NewEvent]) -> Result<(), StoreError> {
        self.inner.append_events(task, events).await
    }

    async fn append_events_once(
        &self,
        task: TaskId,
        marker: &DeliveryId,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        self.inner.append_events_once(task, marker, events).await
    }

    async fn events(
        &self,
        task: TaskId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.events(task, after, limit).await
    }

    async fn add_spend(&self, account: &str, month: &str, micros: u64) -> Result<u64, StoreError> {
        self.inner.add_spend(account, month, micros).await
    }

    async fn add_spend_once(
        &self,
        account: &str,
        month: &str,
        marker: &DeliveryId,
        micros: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.inner
            .add_spend_once(account, month, marker, micros)
            .await
    }

    async fn spend(&self, account: &str, month: &str) -> Result<u64, StoreError> {
        self.inner.spend(account, month).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.acquire_lease(name, holder, ttl).await
    }

    async fn claim_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
        held: Option<u64>,
    ) -> Result<Option<LeaseGrant>, StoreError> {
        self.inner.claim_lease(name, holder, ttl, held).await
    }

    async fn release_lease(&self, name: &str, holder: &str, token: u64) -> Result<(), StoreError> {
        self.inner.release_lease(name, holder, token).await
    }

    async fn put_inbox(&self, delivery: &InboxDelivery) -> Result<bool, StoreError> {
        self.inner.put_inbox(delivery).await
    }

    async fn claim_inbox(
        &self,
        id: &DeliveryId,
        hold: Duration,
    ) -> Result<Option<InboxDelivery>, StoreError> {
        self.inner.claim_inbox(id, hold).await
    }

    async fn finish_inbox(
        &self,
        id: &DeliveryId,
        outcome: &InboxOutcome,
    ) -> Result<(), StoreError> {
        self.inner.finish_inbox(id, outcome).await
    }

    async fn pending_inbox(&self, limit: usize) -> Result<Vec<DeliveryId>, StoreError> {
        self.inner.pending_inbox(limit).await
    }
}
