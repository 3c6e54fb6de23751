//! AWS SDK clients for the AWS backends: one [`SdkConfig`] built from `aws.endpoint_url`
//! and `aws.region` (credentials from the SDK's default chain), the SQS, DynamoDB and
//! Secrets Manager clients made from it, and [`ApiCalls`], an interceptor that counts the
//! requests each client sends by operation (for metrics and the cost benchmark).

use crate::config::AwsSettings;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Loads the SDK configuration: region and endpoint from the settings when given, the
/// rest (credentials, retries) from the SDK's defaults and the environment.
pub async fn sdk_config(settings: &AwsSettings) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &settings.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url.clone());
    }
    loader.load().await
}

/// The three clients the AWS backends use.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
}

impl AwsClients {
    /// Clients for `config`; with `calls`, every request they send is counted.
    pub fn new(config: &SdkConfig, calls: Option<&ApiCalls>) -> Self {
        let mut sqs = aws_sdk_sqs::config::Builder::from(config);
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(config);
        let mut secrets = aws_sdk_secretsmanager::config::Builder::from(config);
        if let Some(calls) = calls {
            sqs = sqs.interceptor(calls.clone());
            dynamodb = dynamodb.interceptor(calls.clone());
            secrets = secrets.interceptor(calls.clone());
        }
        Self {
            sqs: aws_sdk_sqs::Client::from_conf(sqs.build()),
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
            secrets: aws_sdk_secretsmanager::Client::from_conf(secrets.build()),
        }
    }

    /// Loads the configuration from `settings` and makes the clients.
    pub async fn from_settings(settings: &AwsSettings, calls: Option<&ApiCalls>) -> Self {
        Self::new(&sdk_config(settings).await, calls)
    }
}

/// One request as the counter saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Requests sent (each retry attempt is a billed request, so it counts).
    pub requests: u64,
    /// Bytes of the request bodies.
    pub request_bytes: u64,
    /// Bytes of the response bodies.
    pub response_bytes: u64,
}

/// Counts the requests of the clients it is attached to, by `Service.Operation`.
#[derive(Clone, Debug, Default)]
pub struct ApiCalls {
    counts: Arc<Mutex<BTreeMap<String, CallStats>>>,
    bodies: Arc<Mutex<Option<Vec<RecordedCall>>>>,
}

/// A request and its response body, kept only while recording is switched on.
#[derive(Clone, Debug)]
pub struct RecordedCall {
    pub operation: String,
    pub request: Vec<u8>,
    pub response: Vec<u8>,
}

impl ApiCalls {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counts so far, keyed `Service.Operation` (e.g. `SQS.ReceiveMessage`).
    pub fn snapshot(&self) -> BTreeMap<String, CallStats> {
        self.counts.lock().clone()
    }

    /// Forgets the counts so far.
    pub fn reset(&self) {
        self.counts.lock().clear();
        if let Some(b) = self.bodies.lock().as_mut() {
            b.clear();
        }
    }

    /// Keeps every request and response body from now on (for estimating request units).
    pub fn record_bodies(&self) {
        *self.bodies.lock() = Some(Vec::new());
    }

    /// The bodies recorded since [`ApiCalls::record_bodies`] or the last reset.
    pub fn recorded(&self) -> Vec<RecordedCall> {
        self.bodies.lock().clone().unwrap_or_default()
    }

    /// The total number of requests so far.
    pub fn total(&self) -> u64 {
        self.counts.lock().values().map(|c| c.requests).sum()
    }

    fn operation(cfg: &ConfigBag) -> String {
        match cfg.load::<Metadata>() {
            Some(m) => format!("{}.{}", service_label(m.service()), m.name()),
            None => "unknown".into(),
        }
    }
}

/// A short service label: `SQS`, `DynamoDB`, `SecretsManager`.
fn service_label(service: &str) -> &str {
    let lower = service.to_ascii_lowercase();
    if lower.contains("sqs") {
        "SQS"
    } else if lower.contains("dynamodb") {
        "DynamoDB"
    } else if lower.contains("secrets") {
        "SecretsManager"
    } else {
        service
    }
}

/// The body of the request being sent, kept for [`ApiCalls::record_bodies`].
#[derive(Clone, Debug)]
struct RequestBody(Vec<u8>);

impl Storable for RequestBody {
    type Storer = StoreReplace<Self>;
}

impl Intercept for ApiCalls {
    fn name(&self) -> &'static str {
        "ApiCalls"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = Self::operation(cfg);
        let body = context.request().body().bytes().unwrap_or_default();
        let len = body.len() as u64;
        if self.bodies.lock().is_some() {
            cfg.interceptor_state()
                .store_put(RequestBody(body.to_vec()));
        }
        let mut counts = self.counts.lock();
        let stats = counts.entry(op).or_default();
        stats.requests += 1;
        stats.request_bytes += len;
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = Self::operation(cfg);
        let response = context
            .response()
            .and_then(|r| r.body().bytes())
            .unwrap_or_default()
            .to_vec();
        if let Some(stats) = self.counts.lock().get_mut(&op) {
            stats.response_bytes += response.len() as u64;
        }
        if let Some(bodies) = self.bodies.lock().as_mut() {
            let request = cfg
                .load::<RequestBody>()
                .map(|b| b.0.clone())
                .unwrap_or_default();
            bodies.push(RecordedCall {
                operation: op,
                request,
                response,
            });
        }
        Ok(())
    }
}

/// The error code and message of an SDK error, for matching and logging.
pub(crate) fn error_code<E>(
    err: &aws_smithy_runtime_api::client::result::SdkError<
        E,
        aws_smithy_runtime_api::http::Response,
    >,
) -> (String, String)
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_smithy_runtime_api::client::result::SdkError;
    match err {
        SdkError::ServiceError(e) => (
            e.err().code().unwrap_or("Unknown").to_string(),
            e.err().message().unwrap_or("").to_string(),
        ),
        other => ("Transport".to_string(), display_chain(other)),
    }
}

/// An error and its sources on one line (SDK errors say little at the top level).
pub(crate) fn display_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
