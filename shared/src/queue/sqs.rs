//! The SQS queue backend: one standard queue per capability plus the result queue, each
//! with a dead-letter queue reached through the queue's redrive policy. Names come from
//! [`crate::names`] (`<prefix>-<capability>`, `<prefix>-results`, `<name>-dlq`), the same
//! as the Terraform module's.
//!
//! - Receiving long-polls (up to 20 s) every asked queue at once, each for up to `max`
//!   messages (at most 10 per call, the SQS limit). The first poll that brings messages
//!   ends the wait; polls still running then go on in the background and make whatever
//!   they receive visible again at once, so no message stays hidden for nothing. If more
//!   than `max` messages come back, the extras are made visible again the same way. Both
//!   count as a receive in SQS, which matters only for workers that serve several queues
//!   while all of them have a backlog (production runs one worker per capability).
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
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// The longest long-poll wait SQS allows.
pub const MAX_WAIT: Duration = Duration::from_secs(20);

/// The most messages one `ReceiveMessage` returns.
pub const MAX_BATCH: usize = 10;

/// The longest a message may stay hidden after it was received (SQS's limit).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// How much longer than its wait a receive attempt may take before it is abandoned.
pub const RECEIVE_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// How long a receive that has messages waits for the other queues' polls to answer.
const COLLECT_GRACE: Duration = Duration::from_millis(25);

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
        })
    }

    fn url(&self, queue: QueueId, dead: bool) -> Result<&str, QueueError> {
        self.urls
            .get(&(queue, dead))
            .map(String::as_str)
            .ok_or_else(|| backend("lookup", format!("no URL for queue {queue}")))
    }

    /// Starts one receive in its own task; if nobody takes its result, the task makes the
    /// messages visible again.
    fn spawn_poll(
        &self,
        queue: QueueId,
        dead: bool,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<oneshot::Receiver<Result<Vec<Received>, QueueError>>, QueueError> {
        let url = self.url(queue, dead)?.to_string();
        let client = self.client.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let result = poll(&client, &url, queue, dead, max, wait, visibility).await;
            if let Err(Ok(unclaimed)) = tx.send(result) {
                if !unclaimed.is_empty() {
                    tracing::debug!(
                        %queue,
                        count = unclaimed.len(),
                        "making messages of an abandoned poll visible again"
                    );
                    release_all(&client, &url, &unclaimed).await;
                }
            }
        });
        Ok(rx)
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
        let mut polls = FuturesUnordered::new();
        for &queue in queues {
            let rx = self.spawn_poll(queue, false, max, wait, visibility)?;
            polls.push(async move { (queue, rx.await) });
        }
        let mut got: Vec<Received> = Vec::new();
        let mut first_error = None;
        while let Some((queue, result)) = polls.next().await {
            match result {
                Ok(Ok(messages)) => got.extend(messages),
                Ok(Err(e)) => {
                    tracing::warn!(%queue, error = %e, "receive failed");
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(backend("ReceiveMessage", "poll task ended"));
                }
            }
            if !got.is_empty() {
                break;
            }
        }
        // Take what the other polls already brought back; the ones still waiting are
        // dropped, which hands whatever they receive later back to the queue.
        while got.len() < max {
            match tokio::time::timeout(COLLECT_GRACE, polls.next()).await {
                Ok(Some((_, Ok(Ok(messages))))) => got.extend(messages),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        drop(polls);
        if got.is_empty() {
            return match first_error {
                Some(e) => Err(e),
                None => Ok(got),
            };
        }
        if got.len() > max {
            let surplus = got.split_off(max);
            let mut by_queue: HashMap<QueueId, Vec<Received>> = HashMap::new();
            for m in surplus {
                by_queue.entry(m.receipt.queue).or_default().push(m);
            }
            for (queue, messages) in by_queue {
                let url = self.url(queue, false)?;
                release_all(&self.client, url, &messages).await;
            }
        }
        Ok(got)
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
