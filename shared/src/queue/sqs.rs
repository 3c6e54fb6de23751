//! The SQS queue backend: one standard queue per capability plus the result queue, each
//! with a dead-letter queue reached through the queue's redrive policy. Names come from
//! [`crate::names`] (`<prefix>-<capability>`, `<prefix>-results`, `<name>-dlq`), the same
//! as the Terraform module's.
//!
//! - Receiving long-polls (up to 20 s) every asked queue at once, each for up to `max`
//!   messages (at most 10 per call, the SQS limit). The first poll that brings messages
//!   ends the wait; polls still running then go on in the background. Every message a
//!   poll brings is kept in the backend's inbox, whoever is waiting: a receive hands out
//!   what the inbox holds for its queues (at most `max`) before it polls again, and the
//!   rest waits for the next receive. Nothing received is dropped, and nothing is made
//!   visible again, which would count a receive towards the dead-letter queue. Only a
//!   message nobody asked for within [`MAX_HOLD`] (or half its visibility timeout) is
//!   made visible again, so that it is not hidden for nothing.
//! - Every receive has an attempt timeout longer than its wait, so a lost connection
//!   cannot hang a long poll.
//! - A heartbeat is `ChangeMessageVisibility`. SQS refuses to keep a message hidden for
//!   more than 12 hours after it was received; the receipt remembers when that was, and a
//!   heartbeat is cut to what is left (and refused once nothing is).
//! - The receipt handle of the newest receive is the one used to delete; an expired or
//!   superseded handle is [`QueueError::ReceiptExpired`].
//! - Depth is `ApproximateNumberOfMessages`, `…NotVisible` and the dead-letter queue's
//!   count; SQS cannot tell the age of the oldest message without CloudWatch.
//! - Queues are looked up by name when the backend opens (`GetQueueUrl`), and a missing
//!   one is an error naming it; with `aws.create_resources` they are created instead.

use super::{Depth, Queue, QueueError, QueueId, Receipt, Received};
use crate::aws::error_code;
use crate::message::MAX_MESSAGE_BYTES;
use crate::names::{dead_letter_queue_name, queue_name};
use crate::timefmt::{now, unix_ms};
use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use aws_sdk_sqs::Client;
use aws_smithy_types::timeout::TimeoutConfig;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The longest long-poll wait SQS allows.
pub const MAX_WAIT: Duration = Duration::from_secs(20);

/// The most messages one `ReceiveMessage` returns.
pub const MAX_BATCH: usize = 10;

/// The longest a message may stay hidden after it was received (SQS's limit).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// How much longer than its wait a receive attempt may take before it is abandoned.
pub const RECEIVE_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// How much longer than its wait a receive waits for its polls to answer.
const ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// The longest a received message waits in the inbox for a receive that takes it,
/// before it is made visible again (and at most half its visibility timeout, so that its
/// taker has time to start extending it).
pub const MAX_HOLD: Duration = Duration::from_secs(30);

/// Kept clear of [`MAX_VISIBILITY`] so that clock skew cannot push a heartbeat past it.
const VISIBILITY_SAFETY: Duration = Duration::from_secs(30);

/// How long messages stay in a queue created by this backend (14 days, the SQS maximum).
const RETENTION_SECS: &str = "1209600";

/// The SQS queue backend.
#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    /// Queue URLs by (queue, is the dead-letter queue).
    urls: Arc<HashMap<(QueueId, bool), String>>,
    /// Messages received and not yet handed out, and the polls running.
    inbox: Arc<Mutex<Inbox>>,
    /// Woken when a poll ends.
    arrived: Arc<Notify>,
}

/// What background polls brought and nobody has taken yet.
#[derive(Default)]
struct Inbox {
    /// Messages in arrival order, each with when to give it back if nobody takes it.
    held: Vec<(Instant, Received)>,
    /// Queues with a `ReceiveMessage` call running.
    polling: HashSet<QueueId>,
    /// The newest poll failure per queue, until a receive reports it.
    errors: HashMap<QueueId, String>,
}

/// What a queue was created or found with.
#[derive(Clone, Debug)]
pub struct SqsOptions {
    pub prefix: String,
    /// Receives after which SQS moves a message to the dead-letter queue (only used when
    /// the backend creates the queues).
    pub max_receives: u32,
    /// Default visibility timeout of created queues.
    pub visibility_timeout: Duration,
    /// Create missing queues instead of failing.
    pub create: bool,
}

fn backend(op: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(format!("{op}: {e}"))
}

/// Maps an SQS error, recognizing the ones that say a receipt is no longer valid.
fn sqs_error<E>(
    op: &str,
    err: aws_sdk_sqs::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> QueueError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, message) = error_code(&err);
    let lower = message.to_ascii_lowercase();
    if code.contains("ReceiptHandleIsInvalid")
        || code.contains("MessageNotInflight")
        || (code.contains("InvalidParameterValue") && lower.contains("receipt handle"))
    {
        return QueueError::ReceiptExpired;
    }
    QueueError::Backend(format!("SQS {op}: {code}: {message}"))
}

/// Whole seconds, rounded up, as SQS takes them.
fn secs_ceil(d: Duration) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(i32::MAX)
}

/// The receipt handle given out: the receive time (ms) and SQS's own handle.
fn wrap_handle(received_ms: i64, handle: &str) -> String {
    format!("{received_ms}:{handle}")
}

/// SQS's handle and, when known, the receive time (ms) of a receipt.
fn unwrap_handle(handle: &str) -> (Option<i64>, &str) {
    match handle.split_once(':') {
        Some((ms, rest)) if !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()) => {
            (ms.parse().ok(), rest)
        }
        _ => (None, handle),
    }
}

impl SqsQueue {
    /// Finds (or, with `options.create`, creates) every queue and its dead-letter queue.
    pub async fn open(client: Client, options: &SqsOptions) -> Result<Self, QueueError> {
        let mut urls = HashMap::new();
        for queue in QueueId::all() {
            let name = queue_name(&options.prefix, queue);
            let dlq_name = dead_letter_queue_name(&options.prefix, queue);
            let (url, dlq_url) = if options.create {
                create_queue_pair(&client, &name, &dlq_name, options).await?
            } else {
                (
                    queue_url(&client, &name).await?,
                    queue_url(&client, &dlq_name).await?,
                )
            };
            urls.insert((queue, false), url);
            urls.insert((queue, true), dlq_url);
        }
        Ok(Self {
            client,
            urls: Arc::new(urls),
            inbox: Arc::default(),
            arrived: Arc::new(Notify::new()),
        })
    }

    fn url(&self, queue: QueueId, dead: bool) -> Result<&str, QueueError> {
        self.urls
            .get(&(queue, dead))
            .map(String::as_str)
            .ok_or_else(|| backend("lookup", format!("no URL for queue {queue}")))
    }

    /// Starts one `ReceiveMessage` of `queue` in its own task, unless one is running; what
    /// it brings goes to the inbox, whether or not anyone still waits for it.
    fn start_poll(
        &self,
        inbox: &mut Inbox,
        queue: QueueId,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        if inbox.polling.contains(&queue) {
            return Ok(());
        }
        let url = self.url(queue, false)?.to_string();
        inbox.polling.insert(queue);
        let (client, shared, arrived) = (
            self.client.clone(),
            self.inbox.clone(),
            self.arrived.clone(),
        );
        let hold = MAX_HOLD.min(visibility / 2);
        tokio::spawn(async move {
            let result = poll(&client, &url, queue, false, max, wait, visibility).await;
            {
                let mut inbox = shared.lock();
                inbox.polling.remove(&queue);
                match result {
                    Ok(messages) => {
                        let until = Instant::now() + hold;
                        let handles: Vec<String> =
                            messages.iter().map(|m| m.receipt.handle.clone()).collect();
                        inbox.held.extend(messages.into_iter().map(|m| (until, m)));
                        if !handles.is_empty() {
                            // Given back on time even when no receive comes (every slot of
                            // the worker busy): else the message would stay hidden for its
                            // whole visibility timeout.
                            tokio::spawn(give_back_at(until, handles, client, url, shared.clone()));
                        }
                    }
                    Err(e) => {
                        inbox.errors.insert(queue, e.to_string());
                    }
                }
            }
            arrived.notify_waiters();
        });
        Ok(())
    }

    /// Gives back messages held past their time, grouped by queue.
    async fn release_expired(&self, expired: Vec<Received>) {
        if expired.is_empty() {
            return;
        }
        tracing::debug!(
            count = expired.len(),
            "making received messages nobody took visible again"
        );
        let mut by_queue: HashMap<QueueId, Vec<Received>> = HashMap::new();
        for m in expired {
            by_queue.entry(m.receipt.queue).or_default().push(m);
        }
        for (queue, messages) in by_queue {
            if let Ok(url) = self.url(queue, false) {
                release_all(&self.client, url, &messages).await;
            }
        }
    }

    async fn change_visibility(
        &self,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        let url = self.url(receipt.queue, receipt.dead_letter)?;
        let (_, handle) = unwrap_handle(&receipt.handle);
        self.client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(handle)
            .visibility_timeout(secs_ceil(visibility))
            .send()
            .await
            .map_err(|e| sqs_error("ChangeMessageVisibility", e))?;
        Ok(())
    }
}

async fn queue_url(client: &Client, name: &str) -> Result<String, QueueError> {
    let out = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| {
            let (code, message) = error_code(&e);
            QueueError::Backend(format!(
                "SQS queue {name:?} not found or not accessible ({code}: {message}); \
                 create it with the Terraform module, or set aws.create_resources = true \
                 for development"
            ))
        })?;
    out.queue_url
        .ok_or_else(|| backend("GetQueueUrl", format!("no URL returned for {name}")))
}

async fn create_queue_pair(
    client: &Client,
    name: &str,
    dlq_name: &str,
    options: &SqsOptions,
) -> Result<(String, String), QueueError> {
    let dlq_url = client
        .create_queue()
        .queue_name(dlq_name)
        .attributes(QueueAttributeName::MessageRetentionPeriod, RETENTION_SECS)
        .send()
        .await
        .map_err(|e| sqs_error("CreateQueue", e))?
        .queue_url
        .ok_or_else(|| backend("CreateQueue", "no queue URL returned"))?;
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| sqs_error("GetQueueAttributes", e))?
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| backend("GetQueueAttributes", "no QueueArn returned"))?;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": options.max_receives,
    })
    .to_string();
    let url = client
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::RedrivePolicy, redrive)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            secs_ceil(options.visibility_timeout).to_string(),
        )
        .attributes(QueueAttributeName::MessageRetentionPeriod, RETENTION_SECS)
        .send()
        .await
        .map_err(|e| sqs_error("CreateQueue", e))?
        .queue_url
        .ok_or_else(|| backend("CreateQueue", "no queue URL returned"))?;
    Ok((url, dlq_url))
}

/// One `ReceiveMessage` call.
async fn poll(
    client: &Client,
    url: &str,
    queue: QueueId,
    dead: bool,
    max: usize,
    wait: Duration,
    visibility: Duration,
) -> Result<Vec<Received>, QueueError> {
    let wait_secs = secs_ceil(wait.min(MAX_WAIT));
    let attempt_timeout = Duration::from_secs(wait_secs as u64) + RECEIVE_TIMEOUT_MARGIN;
    let out = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max.clamp(1, MAX_BATCH) as i32)
        .wait_time_seconds(wait_secs)
        .visibility_timeout(secs_ceil(visibility.min(MAX_VISIBILITY)))
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .customize()
        .config_override(
            aws_sdk_sqs::config::Builder::default().timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(attempt_timeout)
                    .build(),
            ),
        )
        .send()
        .await
        .map_err(|e| sqs_error("ReceiveMessage", e))?;
    let received_ms = unix_ms(now());
    let mut got = Vec::new();
    for m in out.messages.unwrap_or_default() {
        let (Some(handle), Some(id)) = (m.receipt_handle, m.message_id) else {
            continue;
        };
        let receive_count = m
            .attributes
            .as_ref()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        got.push(Received {
            message_id: id,
            receipt: Receipt {
                queue,
                dead_letter: dead,
                handle: wrap_handle(received_ms, &handle),
            },
            body: m.body.unwrap_or_default(),
            receive_count,
        });
    }
    Ok(got)
}

/// At `until`, makes visible again those of the messages received with `handles` (all of
/// one queue, at `url`) that are still held in `inbox`, untaken.
async fn give_back_at(
    until: Instant,
    handles: Vec<String>,
    client: Client,
    url: String,
    inbox: Arc<Mutex<Inbox>>,
) {
    tokio::time::sleep_until(until.into()).await;
    let expired: Vec<Received> = {
        let mut inbox = inbox.lock();
        let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut inbox.held)
            .into_iter()
            .partition(|(_, m)| handles.contains(&m.receipt.handle));
        inbox.held = kept;
        expired.into_iter().map(|(_, m)| m).collect()
    };
    if !expired.is_empty() {
        tracing::debug!(
            count = expired.len(),
            "making received messages nobody took visible again"
        );
        release_all(&client, &url, &expired).await;
    }
}

/// Makes messages visible again at once; failures only delay them until their visibility
/// timeout ends, so they are logged, not returned.
async fn release_all(client: &Client, url: &str, messages: &[Received]) {
    let calls = messages.iter().map(|m| {
        let (_, handle) = unwrap_handle(&m.receipt.handle);
        client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(handle)
            .visibility_timeout(0)
            .send()
    });
    for (m, r) in messages.iter().zip(futures::future::join_all(calls).await) {
        if let Err(e) = r {
            tracing::warn!(
                message_id = %m.message_id,
                error = %sqs_error("ChangeMessageVisibility", e),
                "could not make a surplus message visible again; it returns after its \
                 visibility timeout"
            );
        }
    }
}

#[async_trait]
impl Queue for SqsQueue {
    async fn send(&self, queue: QueueId, body: &str) -> Result<String, QueueError> {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(QueueError::TooLarge(body.len()));
        }
        let out = self
            .client
            .send_message()
            .queue_url(self.url(queue, false)?)
            .message_body(body)
            .send()
            .await
            .map_err(|e| sqs_error("SendMessage", e))?;
        Ok(out.message_id.unwrap_or_default())
    }

    async fn receive(
        &self,
        queues: &[QueueId],
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        if queues.is_empty() || max == 0 {
            return Ok(Vec::new());
        }
        // A poll answering later than this leaves its messages in the inbox for the next
        // receive.
        let deadline = Instant::now() + wait.min(MAX_WAIT) + ANSWER_MARGIN;
        let mut polled = false;
        loop {
            // Registered before the inbox is read, so that no arrival is missed.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let (got, expired, failure, running) = {
                let mut inbox = self.inbox.lock();
                let now = Instant::now();
                let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut inbox.held)
                    .into_iter()
                    .partition(|(until, _)| *until <= now);
                let mut got = Vec::new();
                for (until, m) in kept {
                    if got.len() < max && queues.contains(&m.receipt.queue) {
                        got.push(m);
                    } else {
                        inbox.held.push((until, m));
                    }
                }
                let expired: Vec<Received> = expired.into_iter().map(|(_, m)| m).collect();
                let mut failure = None;
                if got.is_empty() && !polled {
                    polled = true;
                    for &queue in queues {
                        self.start_poll(&mut inbox, queue, max, wait, visibility)?;
                    }
                } else if got.is_empty() {
                    for queue in queues {
                        if let Some(e) = inbox.errors.remove(queue) {
                            failure.get_or_insert(e);
                        }
                    }
                }
                let running = queues.iter().any(|q| inbox.polling.contains(q));
                (got, expired, failure, running)
            };
            self.release_expired(expired).await;
            if !got.is_empty() {
                return Ok(got);
            }
            if let Some(e) = failure {
                return Err(QueueError::Backend(e));
            }
            if !running || Instant::now() >= deadline {
                // Every poll of this call answered with nothing (or the wait is over).
                return Ok(Vec::new());
            }
            let _ = tokio::time::timeout_at(deadline.into(), arrived).await;
        }
    }

    async fn receive_dead_letters(
        &self,
        queue: QueueId,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let url = self.url(queue, true)?;
        poll(
            &self.client,
            url,
            queue,
            true,
            max,
            Duration::ZERO,
            visibility,
        )
        .await
    }

    async fn extend(&self, receipt: &Receipt, visibility: Duration) -> Result<Receipt, QueueError> {
        let (received_ms, _) = unwrap_handle(&receipt.handle);
        let mut visibility = visibility.min(MAX_VISIBILITY - VISIBILITY_SAFETY);
        if let Some(received_ms) = received_ms {
            let elapsed = Duration::from_millis((unix_ms(now()) - received_ms).max(0) as u64);
            let left = MAX_VISIBILITY.saturating_sub(elapsed + VISIBILITY_SAFETY);
            if left.is_zero() {
                return Err(QueueError::Backend(format!(
                    "message has been in flight for {} s; SQS keeps a message hidden for \
                     at most 12 hours after it was received",
                    elapsed.as_secs()
                )));
            }
            visibility = visibility.min(left);
        }
        self.change_visibility(receipt, visibility).await?;
        // SQS keeps the handle across visibility changes.
        Ok(receipt.clone())
    }

    async fn delete(&self, receipt: &Receipt) -> Result<(), QueueError> {
        let url = self.url(receipt.queue, receipt.dead_letter)?;
        let (_, handle) = unwrap_handle(&receipt.handle);
        self.client
            .delete_message()
            .queue_url(url)
            .receipt_handle(handle)
            .send()
            .await
            .map_err(|e| sqs_error("DeleteMessage", e))?;
        Ok(())
    }

    async fn release(&self, receipt: &Receipt) -> Result<(), QueueError> {
        self.change_visibility(receipt, Duration::ZERO).await
    }

    async fn take_held(&self) -> Vec<Received> {
        // A poll ends within its wait plus its attempt timeout.
        let deadline = Instant::now() + MAX_WAIT + RECEIVE_TIMEOUT_MARGIN + ANSWER_MARGIN;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut inbox = self.inbox.lock();
                if inbox.polling.is_empty() || Instant::now() >= deadline {
                    return std::mem::take(&mut inbox.held)
                        .into_iter()
                        .map(|(_, m)| m)
                        .collect();
                }
            }
            let _ = tokio::time::timeout_at(deadline.into(), arrived).await;
        }
    }

    async fn depth(&self, queue: QueueId) -> Result<Depth, QueueError> {
        let (main, dead) = futures::try_join!(
            counts(&self.client, self.url(queue, false)?),
            counts(&self.client, self.url(queue, true)?),
        )?;
        Ok(Depth {
            visible: main.0,
            in_flight: main.1,
            dead: dead.0 + dead.1,
            oldest_age: None,
        })
    }
}

/// (visible, not visible) messages of one queue.
async fn counts(client: &Client, url: &str) -> Result<(u64, u64), QueueError> {
    let attrs = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|e| sqs_error("GetQueueAttributes", e))?
        .attributes
        .unwrap_or_default();
    let get = |name: &QueueAttributeName| {
        attrs
            .get(name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((
        get(&QueueAttributeName::ApproximateNumberOfMessages),
        get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_carry_their_receive_time() {
        let h = wrap_handle(1234, "AQEB+abc/def==");
        assert_eq!(unwrap_handle(&h), (Some(1234), "AQEB+abc/def=="));
        assert_eq!(unwrap_handle("AQEB+abc"), (None, "AQEB+abc"));
        assert_eq!(unwrap_handle("x:y"), (None, "x:y"));
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(secs_ceil(Duration::from_millis(1)), 1);
        assert_eq!(secs_ceil(Duration::from_secs(20)), 20);
        assert_eq!(secs_ceil(Duration::ZERO), 0);
    }
}
