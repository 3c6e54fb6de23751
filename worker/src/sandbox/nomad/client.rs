//! A small client for the parts of Nomad's HTTP API the driver uses: dispatch, blocking
//! queries (`index`/`wait`) on evaluations, a job's allocations and one allocation, the
//! allocation's logs and files, and stopping (purging) a job. The ACL token is
//! resolved from its secret reference for each request and sent as a sensitive header;
//! it never appears in a URL, an error or a log line.

use super::api::{Allocation, DispatchRequest, DispatchResponse, Evaluation};
use ao_shared::config::NomadSettings;
use ao_shared::secret::{SecretRef, SecretResolver};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

/// Time allowed to connect to Nomad.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit of a request that does not block.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Nomad adds up to wait/16 of jitter to a blocking query; this covers it and the trip.
const BLOCKING_SLACK: Duration = Duration::from_secs(15);

/// A request to Nomad that failed.
#[derive(Debug, thiserror::Error)]
pub enum NomadError {
    #[error("Nomad is unreachable at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("Nomad answered {status} to {what}: {message}")]
    Status {
        status: u16,
        what: String,
        message: String,
    },
    #[error("Nomad's answer to {what} is not understood: {detail}")]
    Decode { what: String, detail: String },
    #[error("cannot use the Nomad token: {0}")]
    Token(String),
    #[error("Nomad settings: {0}")]
    Config(String),
}

impl NomadError {
    /// Whether trying again later may help: Nomad unreachable, overloaded or failing.
    pub fn is_transient(&self) -> bool {
        match self {
            NomadError::Unreachable { .. } => true,
            NomadError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            NomadError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A response of a blocking query: the value and the index to wait on next.
pub struct Indexed<T> {
    pub value: T,
    pub index: u64,
}

/// Nomad's HTTP API.
#[derive(Clone)]
pub struct NomadClient {
    http: reqwest::Client,
    base: Url,
    token: Option<SecretRef>,
    secrets: Arc<dyn SecretResolver>,
    namespace: String,
    region: Option<String>,
    /// `wait` of a blocking query.
    pub wait: Duration,
}

impl NomadClient {
    /// Builds the client with its TLS settings; sends nothing.
    pub fn new(
        settings: &NomadSettings,
        secrets: Arc<dyn SecretResolver>,
    ) -> Result<Self, NomadError> {
        let mut base = Url::parse(settings.addr.trim_end_matches('/'))
            .map_err(|e| NomadError::Config(format!("nomad.addr {:?}: {e}", settings.addr)))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(NomadError::Config(format!(
                "nomad.addr {:?} must be an http:// or https:// URL",
                settings.addr
            )));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(NomadError::Config(
                "nomad.addr must not hold credentials; use nomad.token".into(),
            ));
        }
        base.set_path(&format!("{}/v1/", base.path().trim_end_matches('/')));
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!(
                "agent-orchestrator-worker/",
                env!("CARGO_PKG_VERSION")
            ));
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| NomadError::Config(format!("{what} {}: {e}", path.display())))
        };
        if let Some(ca) = &settings.ca_file {
            let pem = read("nomad.ca_file", ca)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| NomadError::Config(format!("nomad.ca_file: {e}")))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&settings.client_cert, &settings.client_key) {
            let mut pem = read("nomad.client_cert", cert)?;
            pem.push(b'\n');
            pem.extend(read("nomad.client_key", key)?);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| NomadError::Config(format!("nomad.client_cert/client_key: {e}")))?;
            builder = builder.identity(identity);
        }
        if settings.tls_skip_verify {
            tracing::warn!("nomad.tls_skip_verify is on: Nomad's certificate is not checked");
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| NomadError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            token: settings.token.clone(),
            secrets,
            namespace: settings.namespace.clone(),
            region: settings.region.clone(),
            wait: Duration::from_secs(settings.wait_secs),
        })
    }

    /// The API URL of `segments` (each percent-encoded, so a dispatched job's ID, which
    /// holds a `/`, stays one segment), with the namespace and region.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("namespace", &self.namespace);
            if let Some(region) = &self.region {
                q.append_pair("region", region);
            }
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        url
    }

    async fn headers(&self) -> Result<HeaderMap, NomadError> {
        let mut headers = HeaderMap::new();
        if let Some(reference) = &self.token {
            let token = self
                .secrets
                .resolve(reference)
                .await
                .map_err(|e| NomadError::Token(e.to_string()))?;
            let mut value = HeaderValue::from_str(token.expose_secret()).map_err(|_| {
                NomadError::Token(format!("{reference} is not a valid header value"))
            })?;
            value.set_sensitive(true);
            headers.insert("X-Nomad-Token", value);
        }
        Ok(headers)
    }

    /// Sends a request; returns the response when its status is a success.
    async fn send(
        &self,
        method: Method,
        url: Url,
        what: &str,
        body: Option<serde_json::Value>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, NomadError> {
        let mut req = self
            .http
            .request(method, url)
            .headers(self.headers().await?);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        Err(NomadError::Status {
            status: status.as_u16(),
            what: what.to_string(),
            message: text.trim().chars().take(500).collect(),
        })
    }

    fn unreachable(&self, e: reqwest::Error) -> NomadError {
        // reqwest's error names the URL, which holds no secret (the token is a header).
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            source = s.source();
        }
        NomadError::Unreachable {
            addr: self.base.origin().ascii_serialization(),
            detail,
        }
    }

    async fn json<T: DeserializeOwned>(
        resp: reqwest::Response,
        what: &str,
    ) -> Result<(T, u64), NomadError> {
        let index = resp
            .headers()
            .get("X-Nomad-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bytes = resp.bytes().await.map_err(|e| NomadError::Decode {
            what: what.into(),
            detail: e.to_string(),
        })?;
        let value = serde_json::from_slice(&bytes).map_err(|e| NomadError::Decode {
            what: what.into(),
            detail: e.to_string(),
        })?;
        Ok((value, index))
    }

    /// A blocking GET: answers at once when the object's index is past `index`, otherwise
    /// when it changes or after `wait`.
    async fn blocking<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        index: u64,
        wait: Duration,
        what: &str,
    ) -> Result<Indexed<T>, NomadError> {
        let mut query = Vec::new();
        if index > 0 {
            query.push(("index", index.to_string()));
            query.push(("wait", format!("{}ms", wait.as_millis().max(1))));
        }
        let url = self.url(segments, &query);
        let resp = self
            .send(Method::GET, url, what, None, Some(wait + BLOCKING_SLACK))
            .await?;
        let (value, idx) = Self::json(resp, what).await?;
        Ok(Indexed { value, index: idx })
    }

    /// The cluster's JSON Web Key Set, which verifies workload identities
    /// (`GET /.well-known/jwks.json`, beside the API, no token needed).
    pub async fn jwks(&self) -> Result<jsonwebtoken::jwk::JwkSet, NomadError> {
        let mut url = self.base.clone();
        let root = url
            .path()
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string();
        url.set_path(&format!("{root}/.well-known/jwks.json"));
        url.set_query(None);
        let resp = self
            .http
            .get(url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(NomadError::Status {
                status: status.as_u16(),
                what: "JWKS read".into(),
                message: resp
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(500)
                    .collect(),
            });
        }
        Ok(Self::json(resp, "JWKS").await?.0)
    }

    /// A registered job, as JSON (only a few fields are read).
    pub async fn job(&self, job: &str) -> Result<serde_json::Value, NomadError> {
        let url = self.url(&["job", job], &[]);
        let resp = self
            .send(Method::GET, url, "job read", None, Some(REQUEST_TIMEOUT))
            .await?;
        Ok(Self::json(resp, "job read").await?.0)
    }

    /// Dispatches the parameterized job `job` with a payload, meta and idempotency token.
    pub async fn dispatch(
        &self,
        job: &str,
        request: &DispatchRequest<'_>,
        idempotency_token: &str,
    ) -> Result<DispatchResponse, NomadError> {
        let url = self.url(
            &["job", job, "dispatch"],
            &[("idempotency_token", idempotency_token.to_string())],
        );
        let body = serde_json::to_value(request).map_err(|e| NomadError::Decode {
            what: "dispatch request".into(),
            detail: e.to_string(),
        })?;
        let what = format!("dispatch of {job}");
        let resp = self
            .send(Method::POST, url, &what, Some(body), Some(REQUEST_TIMEOUT))
            .await?;
        Ok(Self::json(resp, &what).await?.0)
    }

    pub async fn evaluation(
        &self,
        id: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<Evaluation>, NomadError> {
        self.blocking(&["evaluation", id], index, wait, "evaluation")
            .await
    }

    pub async fn job_allocations(
        &self,
        job: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<Vec<Allocation>>, NomadError> {
        self.blocking(&["job", job, "allocations"], index, wait, "job allocations")
            .await
    }

    pub async fn allocation(
        &self,
        id: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<Allocation>, NomadError> {
        self.blocking(&["allocation", id], index, wait, "allocation")
            .await
    }

    /// Opens the framed log stream of `task` (`kind` stdout or stderr) from `offset`
    /// bytes after the start, following it when `follow`.
    pub async fn logs(
        &self,
        alloc: &str,
        task: &str,
        kind: &str,
        offset: u64,
        follow: bool,
    ) -> Result<reqwest::Response, NomadError> {
        let url = self.url(
            &["client", "fs", "logs", alloc],
            &[
                ("task", task.to_string()),
                ("type", kind.to_string()),
                ("origin", "start".to_string()),
                ("offset", offset.to_string()),
                ("follow", follow.to_string()),
            ],
        );
        let timeout = (!follow).then_some(REQUEST_TIMEOUT);
        self.send(Method::GET, url, "logs", None, timeout).await
    }

    /// The last `bytes` of a task's log, without following.
    pub async fn log_tail(
        &self,
        alloc: &str,
        task: &str,
        kind: &str,
        bytes: u64,
    ) -> Result<reqwest::Response, NomadError> {
        let url = self.url(
            &["client", "fs", "logs", alloc],
            &[
                ("task", task.to_string()),
                ("type", kind.to_string()),
                ("origin", "end".to_string()),
                ("offset", bytes.to_string()),
                ("follow", "false".to_string()),
            ],
        );
        self.send(Method::GET, url, "logs", None, Some(REQUEST_TIMEOUT))
            .await
    }

    /// A file of the allocation directory (`alloc/…`, `<task>/local/…`); `None` when it
    /// does not exist.
    pub async fn cat(&self, alloc: &str, path: &str) -> Result<Option<Vec<u8>>, NomadError> {
        let url = self.url(&["client", "fs", "cat", alloc], &[("path", path.into())]);
        match self
            .send(Method::GET, url, "file read", None, Some(REQUEST_TIMEOUT))
            .await
        {
            Ok(resp) => resp
                .bytes()
                .await
                .map(|b| Some(b.to_vec()))
                .map_err(|e| self.unreachable(e)),
            // Nomad answers 404, or (older versions) 500 with the stat error.
            Err(NomadError::Status {
                status, message, ..
            }) if status == StatusCode::NOT_FOUND.as_u16() || message.contains("no such file") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Stops a job, purging it (and its allocations) from Nomad's state when `purge`.
    pub async fn stop_job(&self, job: &str, purge: bool) -> Result<(), NomadError> {
        let url = self.url(&["job", job], &[("purge", purge.to_string())]);
        match self
            .send(Method::DELETE, url, "job stop", None, Some(REQUEST_TIMEOUT))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone.
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
