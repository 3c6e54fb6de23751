//! Builds the queue, state store and secret resolver that `backend.kind` selects.

use crate::aws::AwsClients;
use crate::aws_secrets::AwsSecrets;
use crate::config::{BackendKind, Settings};
use crate::queue::sqlite::SqliteQueue;
use crate::queue::sqs::{SqsOptions, SqsQueue};
use crate::queue::Queue;
use crate::secret::{LocalSecrets, SecretResolver};
use crate::state::dynamo::{DynamoOptions, DynamoStore};
use crate::state::sqlite::{Retention, SqliteStore};
use crate::state::StateStore;
use std::sync::Arc;

/// The seams a daemon works through.
#[derive(Clone)]
pub struct Backends {
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn StateStore>,
    pub secrets: Arc<dyn SecretResolver>,
}

/// A backend that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the {kind} backend: {message}")]
pub struct BackendError {
    pub kind: &'static str,
    pub message: String,
}

impl Backends {
    /// Opens the backends `settings.backend.kind` names.
    pub async fn open(settings: &Settings) -> Result<Self, BackendError> {
        match settings.backend.kind {
            BackendKind::Local => {
                let err = |e: &dyn std::fmt::Display| BackendError {
                    kind: "local",
                    message: format!("{} ({})", e, settings.local.data_dir.display()),
                };
                let queue =
                    SqliteQueue::open(&settings.local.data_dir, settings.queue.max_receives)
                        .map_err(|e| err(&e))?;
                let day = std::time::Duration::from_secs(86_400);
                let days = |n: u64| (n > 0).then(|| day * n.min(36_500) as u32);
                let store = SqliteStore::open(&settings.local.data_dir)
                    .map_err(|e| err(&e))?
                    .with_retention(Retention {
                        events: days(settings.local.event_retention_days),
                        deliveries: days(settings.local.delivery_retention_days),
                    });
                Ok(Self {
                    queue: Arc::new(queue),
                    store: Arc::new(store),
                    secrets: Arc::new(LocalSecrets),
                })
            }
            BackendKind::Aws => {
                let clients = AwsClients::from_settings(&settings.aws, None).await;
                Self::open_aws(settings, &clients).await
            }
        }
    }

    /// Opens the SQS queue, the DynamoDB store and the Secrets Manager resolver with the
    /// given clients (which may count their calls).
    pub async fn open_aws(settings: &Settings, clients: &AwsClients) -> Result<Self, BackendError> {
        let err = |e: &dyn std::fmt::Display| BackendError {
            kind: "aws",
            message: e.to_string(),
        };
        let aws = &settings.aws;
        let day = std::time::Duration::from_secs(86_400);
        let queue = SqsQueue::open(
            clients.sqs.clone(),
            &SqsOptions {
                prefix: aws.queue_prefix.clone(),
                max_receives: settings.queue.max_receives,
                visibility_timeout: std::time::Duration::from_secs(
                    settings.queue.visibility_timeout_secs,
                ),
                create: aws.create_resources,
            },
        )
        .await
        .map_err(|e| err(&e))?;
        let store = DynamoStore::open(
            clients.dynamodb.clone(),
            &DynamoOptions {
                table: aws.table.clone(),
                create: aws.create_resources,
                event_retention: day * aws.event_retention_days.min(36_500) as u32,
                delivery_retention: day * aws.delivery_retention_days.min(36_500) as u32,
            },
        )
        .await
        .map_err(|e| err(&e))?;
        let secrets = AwsSecrets::new(
            clients.secrets.clone(),
            std::time::Duration::from_secs(aws.secret_refresh_secs),
        );
        Ok(Self {
            queue: Arc::new(queue),
            store: Arc::new(store),
            secrets: Arc::new(secrets),
        })
    }
}
