//! The Secrets Manager resolver: `aws-sm:NAME_OR_ARN` references are read with
//! `GetSecretValue` (the secret's string value) and kept for a refresh interval, after
//! which the next use reads the secret again, so a rotated secret is picked up without a
//! restart. `env:` and `file:` references go to [`LocalSecrets`]. No secret value is ever
//! logged or put into an error.

use crate::aws::error_code;
use crate::secret::{LocalSecrets, SecretError, SecretRef, SecretResolver};
use async_trait::async_trait;
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Resolves `aws-sm:` references through Secrets Manager, the others locally.
#[derive(Clone)]
pub struct AwsSecrets {
    client: aws_sdk_secretsmanager::Client,
    refresh: Duration,
    cache: Arc<Mutex<HashMap<String, Cached>>>,
}

#[derive(Clone)]
struct Cached {
    value: SecretString,
    read_at: Instant,
}

impl AwsSecrets {
    /// A resolver that reads a secret again once it is older than `refresh`.
    pub fn new(client: aws_sdk_secretsmanager::Client, refresh: Duration) -> Self {
        Self {
            client,
            refresh,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn fetch(&self, id: &str, reference: &str) -> Result<SecretString, SecretError> {
        let out = self
            .client
            .get_secret_value()
            .secret_id(id)
            .send()
            .await
            .map_err(|e| {
                let (code, message) = error_code(&e);
                SecretError::Backend {
                    reference: reference.to_string(),
                    message: format!("Secrets Manager GetSecretValue: {code}: {message}"),
                }
            })?;
        let value = out.secret_string.ok_or_else(|| SecretError::Backend {
            reference: reference.to_string(),
            message: "the secret has no string value (binary secrets are not supported)".into(),
        })?;
        let value = value.trim_end_matches(['\n', '\r']).to_string();
        if value.is_empty() {
            return Err(SecretError::Empty {
                reference: reference.to_string(),
            });
        }
        Ok(SecretString::from(value))
    }
}

#[async_trait]
impl SecretResolver for AwsSecrets {
    async fn resolve(&self, reference: &SecretRef) -> Result<SecretString, SecretError> {
        let SecretRef::AwsSecretsManager(id) = reference else {
            return LocalSecrets::resolve_now(reference);
        };
        let cached = self.cache.lock().get(id).cloned();
        if let Some(c) = &cached {
            if c.read_at.elapsed() < self.refresh {
                return Ok(c.value.clone());
            }
        }
        let name = reference.to_string();
        match self.fetch(id, &name).await {
            Ok(value) => {
                let rotated = cached
                    .as_ref()
                    .is_some_and(|c| c.value.expose_secret() != value.expose_secret());
                if rotated {
                    tracing::info!(secret = %name, "secret value changed; using the new one");
                }
                self.cache.lock().insert(
                    id.clone(),
                    Cached {
                        value: value.clone(),
                        read_at: Instant::now(),
                    },
                );
                Ok(value)
            }
            // A passing outage should not take the secret away: keep the last value.
            Err(e) => match cached {
                Some(c) => {
                    tracing::warn!(
                        secret = %name,
                        error = %e,
                        "cannot refresh the secret; still using the value read before"
                    );
                    Ok(c.value)
                }
                None => Err(e),
            },
        }
    }
}

impl std::fmt::Debug for AwsSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsSecrets")
            .field("refresh", &self.refresh)
            .field("cached", &self.cache.lock().len())
            .finish()
    }
}
