//! The GitHub API client of the App: RS256 JWTs for the App itself, installation tokens
//! cached until shortly before they expire, and every call counted, retried on 5xx and
//! backed off on rate limits (`retry-after`, `x-ratelimit-reset`). Creating calls
//! ([`Client::create`]) are retried only when GitHub certainly refused them (rate limits):
//! after a 5xx or a lost answer they may have taken effect, so the caller looks up before
//! creating again. Lists ([`Client::list`], [`Client::app_list`]) are read as octocrab
//! [`Page`]s, following each page's `next` link to the end.
//!
//! The HTTP goes through octocrab: one [`Octocrab`] holding no credential is built per
//! client, based at the configured `api_url` (GitHub Enterprise Server and the tests' fake
//! work), and each call is made by a copy of it that carries the one credential of that
//! call (an installation token or an App JWT, sent only in the `Authorization` header).
//! Calls use octocrab's generic requests (`build_request`/`execute`) rather than its
//! typed handlers, because the handlers hide the response's status and rate-limit headers
//! that the backoff and `ao_github_api_calls_total` need, and retry nothing per call; the
//! answers are read into octocrab's models (see [`super::api`]) and its [`Page`]s.

use crate::metrics::Metrics;
use ao_shared::backoff::Backoff;
use ao_shared::config::GithubSettings;
use ao_shared::secret::{SecretRef, SecretResolver};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use octocrab::{FromResponse, Octocrab, Page};
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Tokens are renewed when less than this is left of them.
const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(5 * 60);
/// How far an App JWT's `iat` is backdated against clock drift (GitHub's advice).
const JWT_BACKDATE_SECS: u64 = 60;
/// Lifetime of an App JWT (GitHub allows at most 10 minutes).
const JWT_LIFETIME_SECS: u64 = 9 * 60;
/// Attempts of one call on 5xx, transport errors and rate limits.
const MAX_ATTEMPTS: u32 = 5;
/// First delay before a failed call (transport error, 5xx, rate limit without a reset
/// time) is retried; doubled per attempt up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Longest wait for a rate limit to reset before the call fails (it is retried later by
/// whoever made it: the reporter keeps its work).
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// Limit of one HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A GitHub call that failed.
#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("the GitHub App is not configured: {0}")]
    NotConfigured(String),
    #[error("GitHub answered {status} to {route}: {message}")]
    Status {
        status: u16,
        route: &'static str,
        message: String,
    },
    #[error("GitHub call {route} failed: {message}")]
    Transport {
        route: &'static str,
        message: String,
    },
    /// Still rate-limited after the waits a call allows itself; try again later.
    #[error("GitHub rate-limits {route}: {message}")]
    RateLimited {
        route: &'static str,
        message: String,
    },
    /// GitHub answered with success, but not with the shape its description gives.
    #[error("GitHub's answer to {route} cannot be read: {message}")]
    Decode {
        route: &'static str,
        message: String,
    },
    #[error("cannot sign the App JWT: {0}")]
    Jwt(String),
}

impl GithubError {
    /// Whether asking again cannot succeed: GitHub refused this very call for good (a
    /// locked conversation or an archived repository answers 403, a repository with
    /// issues disabled 410, a missing thing 404, an invalid request 422). Rate limits
    /// and 5xx are not permanent, nor is a 403 that names a (secondary) rate limit
    /// without the headers that mark one; neither are 401s (a token is renewed).
    pub fn is_permanent(&self) -> bool {
        match self {
            GithubError::Status {
                status: 403,
                message,
                ..
            } => !message.to_ascii_lowercase().contains("rate limit"),
            GithubError::Status { status, .. } => matches!(status, 404 | 410 | 422),
            _ => false,
        }
    }

    /// Whether the call may have taken effect although it failed (no answer, or a 5xx):
    /// a creating call is looked up before it is made again.
    pub fn is_ambiguous(&self) -> bool {
        match self {
            GithubError::Transport { .. } => true,
            GithubError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Pages followed by one list call at most (with 100 items a page: 10 000 items).
const MAX_PAGES: usize = 100;

/// Permissions asked for an installation token (`permissions` of `access_tokens`).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq, Hash)]
pub struct TokenScope {
    /// Limit the token to these repository names (of the installation's owner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repositories: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<std::collections::BTreeMap<String, String>>,
}

struct CachedToken {
    token: SecretString,
    expires_at: SystemTime,
}

/// A successful response: its status and its JSON body (`Null` when empty).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// A successful response as it came: status, headers and body bytes.
struct Raw {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Raw {
    fn json(&self) -> Value {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
    }

    fn reply(self) -> Reply {
        Reply {
            status: self.status.as_u16(),
            body: self.json(),
        }
    }

    /// The response as an octocrab [`Page`] of `T` (its items and its `Link` header's
    /// `next`). `wrapper` names the field holding the items in a list GitHub wraps in an
    /// object that octocrab does not know (`check_runs`).
    async fn page<T: DeserializeOwned>(
        self,
        route: &'static str,
        wrapper: Option<&'static str>,
    ) -> Result<Page<T>, GithubError> {
        let decode = |e: &dyn std::fmt::Display| GithubError::Decode {
            route,
            message: e.to_string(),
        };
        let body = match wrapper {
            Some(field) => {
                let mut v: Value = serde_json::from_slice(&self.body).map_err(|e| decode(&e))?;
                let items = v.get_mut(field).map(Value::take).unwrap_or(Value::Null);
                Bytes::from(
                    serde_json::to_vec(&serde_json::json!({ "items": items }))
                        .map_err(|e| decode(&e))?,
                )
            }
            None => self.body,
        };
        let mut response = http::Response::new(
            http_body_util::Full::new(body)
                .map_err(|never: std::convert::Infallible| match never {}),
        );
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        Page::<T>::from_response(response)
            .await
            .map_err(|e| decode(&e))
    }
}

/// Whether a call may be made again after a failure that leaves its effect unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repeat {
    /// Reads, edits and other idempotent calls: retried on 5xx and transport errors.
    Safe,
    /// Creating calls (a comment, a pull request, a review): retried only when GitHub
    /// certainly refused them (rate limits); otherwise the caller looks up first.
    OnlyRefused,
}

/// The octocrab clients of one [`Client`], built on first use (octocrab's service needs a
/// running Tokio runtime).
struct Octo {
    /// Based at `api_url`; holds no credential.
    rest: Octocrab,
    /// Based where the GraphQL endpoint is (`/graphql` under it).
    graphql: Octocrab,
}

/// The App's client.
pub struct Client {
    octo: tokio::sync::OnceCell<Octo>,
    api_url: String,
    app_id: Option<u64>,
    key_ref: Option<SecretRef>,
    secrets: Arc<dyn SecretResolver>,
    key: tokio::sync::OnceCell<EncodingKey>,
    tokens: Mutex<HashMap<(u64, String), CachedToken>>,
    metrics: Metrics,
    /// `github.app_slug` as configured.
    slug_setting: Option<String>,
    /// The slug GitHub gave for the App (`GET /app`), once read.
    slug: tokio::sync::OnceCell<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs an App JWT with `key` (shared with the worker's credentials code in spirit;
/// the worker has its own copy so that it does not depend on the coordinator).
pub fn app_jwt(app_id: u64, key: &EncodingKey) -> Result<String, GithubError> {
    #[derive(Serialize)]
    struct Claims {
        iat: u64,
        exp: u64,
        iss: String,
    }
    let now = unix_now();
    let claims = Claims {
        iat: now.saturating_sub(JWT_BACKDATE_SECS),
        exp: now + JWT_LIFETIME_SECS,
        iss: app_id.to_string(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
        .map_err(|e| GithubError::Jwt(e.to_string()))
}

/// An octocrab client without credentials based at `base` (an absolute URL). Fails when
/// `base` is not a URL, or when no TLS root certificate can be loaded from the system.
fn octocrab_at(base: &str) -> Result<Octocrab, GithubError> {
    Octocrab::builder()
        .base_uri(base)
        .map_err(|e| GithubError::NotConfigured(format!("github.api_url {base:?}: {e}")))?
        .build()
        .map_err(|e| {
            GithubError::NotConfigured(format!("cannot build the HTTP client for {base}: {e}"))
        })
}

/// Where GitHub's GraphQL endpoint is, `/graphql` under the returned base:
/// `https://HOST/api` for a GitHub Enterprise Server's `https://HOST/api/v3`, else the
/// API's own URL (`https://api.github.com/graphql`).
fn graphql_base(api_url: &str) -> String {
    match api_url.strip_suffix("/api/v3") {
        Some(host) => format!("{host}/api"),
        None => api_url.to_string(),
    }
}

impl Client {
    pub fn new(
        settings: &GithubSettings,
        secrets: Arc<dyn SecretResolver>,
        metrics: Metrics,
    ) -> Self {
        Self {
            octo: tokio::sync::OnceCell::new(),
            api_url: settings.api_url.trim_end_matches('/').to_string(),
            app_id: settings.app_id,
            key_ref: settings.private_key.clone(),
            secrets,
            key: tokio::sync::OnceCell::new(),
            tokens: Mutex::new(HashMap::new()),
            metrics,
            slug_setting: settings.app_slug.clone().filter(|s| !s.is_empty()),
            slug: tokio::sync::OnceCell::new(),
        }
    }

    /// The App's slug (its bot is `<slug>[bot]`): `github.app_slug` when set, else the
    /// `slug` of GitHub's answer to `GET /app` (App JWT; "Get the authenticated app" in
    /// GitHub's REST description), read once and kept. `None`, with a warning, while
    /// GitHub cannot say (not configured, unreachable): the caller then knows the App's
    /// own posts by their `Bot` type alone, and a later call asks again.
    ///
    /// The answer is read for its `slug` only, not as octocrab's `models::App`, whose
    /// `owner` requires user fields GitHub's description lets be `null`.
    pub async fn app_slug(&self) -> Option<&str> {
        #[derive(serde::Deserialize)]
        struct AppSlug {
            slug: Option<String>,
        }
        if let Some(slug) = &self.slug_setting {
            return Some(slug);
        }
        let read = self
            .slug
            .get_or_try_init(|| async {
                let reply = self.app_call(Method::GET, "/app", "/app", None).await?;
                serde_json::from_value::<AppSlug>(reply.body)
                    .ok()
                    .and_then(|app| app.slug)
                    .filter(|slug| !slug.is_empty())
                    .ok_or_else(|| GithubError::NotConfigured("GET /app answered no slug".into()))
            })
            .await;
        match read {
            Ok(slug) => Some(slug),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the App's slug is not known (set github.app_slug): its own comments \
                     are told apart by their Bot type only"
                );
                None
            }
        }
    }

    /// Whether the App's id and key are configured (webhooks can be verified without).
    pub fn configured(&self) -> bool {
        self.app_id.is_some() && self.key_ref.is_some()
    }

    async fn octo(&self) -> Result<&Octo, GithubError> {
        self.octo
            .get_or_try_init(|| async {
                Ok(Octo {
                    rest: octocrab_at(&self.api_url)?,
                    graphql: octocrab_at(&graphql_base(&self.api_url))?,
                })
            })
            .await
    }

    async fn jwt(&self) -> Result<String, GithubError> {
        let (Some(app_id), Some(key_ref)) = (self.app_id, &self.key_ref) else {
            return Err(GithubError::NotConfigured(
                "set github.app_id and github.private_key".into(),
            ));
        };
        let key = self
            .key
            .get_or_try_init(|| async {
                let pem = self
                    .secrets
                    .resolve(key_ref)
                    .await
                    .map_err(|e| GithubError::NotConfigured(e.to_string()))?;
                EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes()).map_err(|e| {
                    GithubError::NotConfigured(format!(
                        "github.private_key is not an RSA private key in PEM: {e}"
                    ))
                })
            })
            .await?;
        app_jwt(app_id, key)
    }

    /// An installation token with `scope` (the installation's own permissions when empty),
    /// from the cache when it has more than a few minutes left
    /// (`POST /app/installations/{installation_id}/access_tokens`, asked with octocrab's
    /// [`octocrab::models::apps::CreateInstallationAccessToken`] and read into its
    /// [`octocrab::models::InstallationToken`]).
    pub async fn installation_token(
        &self,
        installation: u64,
        scope: &TokenScope,
    ) -> Result<SecretString, GithubError> {
        const ROUTE: &str = "/app/installations/{id}/access_tokens";
        let cache_key = (
            installation,
            serde_json::to_string(scope).unwrap_or_default(),
        );
        if let Some(t) = self.tokens.lock().get(&cache_key) {
            if t.expires_at > SystemTime::now() + TOKEN_RENEW_MARGIN {
                return Ok(t.token.clone());
            }
        }
        let jwt = SecretString::from(self.jwt().await?);
        let request = octocrab::models::apps::CreateInstallationAccessToken {
            repositories: scope.repositories.clone(),
            repository_ids: None,
            permissions: scope
                .permissions
                .as_ref()
                .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        };
        let body = serde_json::to_value(&request).unwrap_or(Value::Null);
        let raw = self
            .send(
                Method::POST,
                ROUTE,
                &format!("/app/installations/{installation}/access_tokens"),
                &jwt,
                Some(&body),
                Repeat::Safe,
            )
            .await?;
        let answer: octocrab::models::InstallationToken = serde_json::from_slice(&raw.body)
            .map_err(|e| GithubError::Decode {
                route: ROUTE,
                message: e.to_string(),
            })?;
        if answer.token.is_empty() {
            return Err(GithubError::Decode {
                route: ROUTE,
                message: "the answer has no token".into(),
            });
        }
        let expires_at = answer
            .expires_at
            .as_deref()
            .and_then(|s| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64))
            // Without an expiry, assume the documented hour minus a margin.
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(50 * 60));
        let token = SecretString::from(answer.token);
        self.tokens.lock().insert(
            cache_key,
            CachedToken {
                token: token.clone(),
                expires_at,
            },
        );
        Ok(token)
    }

    /// Drops the cached tokens of an installation (deleted or suspended).
    pub fn forget_installation(&self, installation: u64) {
        self.tokens.lock().retain(|(i, _), _| *i != installation);
    }

    /// A call as the App itself (JWT). `path` is the API path and query (`/app/…`).
    pub async fn app_call(
        &self,
        method: Method,
        route: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, GithubError> {
        let jwt = SecretString::from(self.jwt().await?);
        self.send(method, route, path, &jwt, body, Repeat::Safe)
            .await
            .map(Raw::reply)
    }

    /// Every item of a list the App itself reads (JWT): `path` and then each page's
    /// `next`, up to [`MAX_PAGES`], as octocrab [`Page`]s of `T`.
    pub async fn app_list<T: DeserializeOwned>(
        &self,
        route: &'static str,
        path: &str,
    ) -> Result<Vec<T>, GithubError> {
        let jwt = SecretString::from(self.jwt().await?);
        self.list_with(route, path, None, &jwt).await
    }

    /// Every item of a list read as an installation (see [`Client::app_list`]); a page
    /// that is an object with its items under `wrapper` (`check_runs`) is read as well.
    pub async fn list<T: DeserializeOwned>(
        &self,
        installation: u64,
        route: &'static str,
        path: &str,
        wrapper: Option<&'static str>,
    ) -> Result<Vec<T>, GithubError> {
        let token = self
            .installation_token(installation, &TokenScope::default())
            .await?;
        self.list_with(route, path, wrapper, &token).await
    }

    async fn list_with<T: DeserializeOwned>(
        &self,
        route: &'static str,
        path: &str,
        wrapper: Option<&'static str>,
        credential: &SecretString,
    ) -> Result<Vec<T>, GithubError> {
        let mut out = Vec::new();
        let mut path = path.to_string();
        for _ in 0..MAX_PAGES {
            let raw = self
                .send(Method::GET, route, &path, credential, None, Repeat::Safe)
                .await?;
            let mut page = raw.page::<T>(route, wrapper).await?;
            out.append(&mut page.take_items());
            match page.next.as_ref().map(|next| self.api_path(next)) {
                Some(Some(next)) => path = next,
                // The credential goes only where the API is.
                Some(None) => {
                    tracing::warn!(
                        route,
                        "a list's next page is not on the API's host; not followed"
                    );
                    return Ok(out);
                }
                None => return Ok(out),
            }
        }
        tracing::warn!(
            route,
            pages = MAX_PAGES,
            "a list has more pages than are read"
        );
        Ok(out)
    }

    /// The path and query of `link` under the API's URL, or `None` when it points
    /// elsewhere (another host, or outside an Enterprise Server's `/api/v3`).
    fn api_path(&self, link: &Uri) -> Option<String> {
        let link = link.to_string();
        let rest = link.strip_prefix(&self.api_url)?;
        rest.starts_with('/').then(|| rest.to_string())
    }

    /// A creating call as an installation: not repeated after a failure that may have
    /// taken effect ([`GithubError::is_ambiguous`]); the caller looks up before
    /// creating again.
    pub async fn create(
        &self,
        installation: u64,
        route: &'static str,
        path: &str,
        body: &Value,
    ) -> Result<Reply, GithubError> {
        let token = self
            .installation_token(installation, &TokenScope::default())
            .await?;
        self.send(
            Method::POST,
            route,
            path,
            &token,
            Some(body),
            Repeat::OnlyRefused,
        )
        .await
        .map(Raw::reply)
    }

    /// A call as an installation (its full token).
    pub async fn call(
        &self,
        installation: u64,
        method: Method,
        route: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, GithubError> {
        let token = self
            .installation_token(installation, &TokenScope::default())
            .await?;
        match self
            .send(method.clone(), route, path, &token, body, Repeat::Safe)
            .await
        {
            // A token revoked early: forget it and try once with a new one.
            Err(GithubError::Status { status: 401, .. }) => {
                self.tokens.lock().retain(|(i, _), _| *i != installation);
                let token = self
                    .installation_token(installation, &TokenScope::default())
                    .await?;
                self.send(method, route, path, &token, body, Repeat::Safe)
                    .await
            }
            other => other,
        }
        .map(Raw::reply)
    }

    /// A GraphQL call as an installation: `<api>/graphql`, or `https://HOST/api/graphql`
    /// when `api_url` is a GitHub Enterprise Server's `https://HOST/api/v3`.
    pub async fn graphql(
        &self,
        installation: u64,
        query: &str,
        variables: Value,
    ) -> Result<Reply, GithubError> {
        let token = self
            .installation_token(installation, &TokenScope::default())
            .await?;
        let body = serde_json::json!({ "query": query, "variables": variables });
        let octo = &self.octo().await?.graphql;
        let reply = self
            .send_with(
                octo,
                Method::POST,
                "/graphql",
                "/graphql",
                &token,
                Some(&body),
                Repeat::Safe,
            )
            .await?
            .reply();
        if let Some(errors) = reply.body.get("errors").filter(|e| !e.is_null()) {
            return Err(GithubError::Status {
                status: reply.status,
                route: "/graphql",
                message: errors.to_string().chars().take(300).collect(),
            });
        }
        Ok(reply)
    }

    /// A REST call: `path` (the API path and query, already percent-encoded) under
    /// `api_url`.
    async fn send(
        &self,
        method: Method,
        route: &'static str,
        path: &str,
        credential: &SecretString,
        body: Option<&Value>,
        repeat: Repeat,
    ) -> Result<Raw, GithubError> {
        let octo = &self.octo().await?.rest;
        self.send_with(octo, method, route, path, credential, body, repeat)
            .await
    }

    /// One attempt of a request through `base` with `credential`: the response, or the
    /// transport's error (no answer, or none within [`REQUEST_TIMEOUT`]).
    async fn attempt(
        base: &Octocrab,
        request: http::Request<octocrab::OctoBody>,
        credential: &SecretString,
    ) -> Result<(http::response::Parts, Bytes), String> {
        // A copy carrying this call's credential; octocrab puts it in the `Authorization`
        // header (marked sensitive) of requests to the base's own host only.
        let octo = base
            .user_access_token(credential.clone())
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = octo.execute(request).await.map_err(|e| e.to_string())?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok((parts, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_with(
        &self,
        octo: &Octocrab,
        method: Method,
        route: &'static str,
        path: &str,
        credential: &SecretString,
        body: Option<&Value>,
        repeat: Repeat,
    ) -> Result<Raw, GithubError> {
        let uri: Uri = path
            .parse()
            .map_err(|e: http::uri::InvalidUri| GithubError::Transport {
                route,
                message: format!("not a request path: {e}"),
            })?;
        let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let builder = http::Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(http::header::ACCEPT, "application/vnd.github+json");
            let request =
                octo.build_request(builder, body)
                    .map_err(|e| GithubError::Transport {
                        route,
                        message: e.to_string(),
                    })?;
            let (parts, bytes) = match Self::attempt(octo, request, credential).await {
                Ok(r) => r,
                Err(message) => {
                    self.count(route, "0", "transport_error");
                    if attempt < MAX_ATTEMPTS && repeat == Repeat::Safe {
                        backoff.wait().await;
                        continue;
                    }
                    return Err(GithubError::Transport { route, message });
                }
            };
            let status = parts.status;
            let headers = parts.headers;
            let remaining = header_u64(&headers, "x-ratelimit-remaining");
            if let Some(r) = remaining {
                self.metrics.github_rate_limit_remaining.set(r as i64);
            }
            let rate_limited = status == StatusCode::TOO_MANY_REQUESTS
                || (status == StatusCode::FORBIDDEN
                    && (remaining == Some(0) || headers.contains_key("retry-after")));
            let result = if status.is_success() {
                "ok"
            } else if rate_limited {
                "rate_limited"
            } else if status.is_server_error() {
                "server_error"
            } else {
                "client_error"
            };
            self.count(route, status.as_str(), result);
            if status.is_success() {
                return Ok(Raw {
                    status,
                    headers,
                    body: bytes,
                });
            }
            let text = String::from_utf8_lossy(&bytes);
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(300).collect());
            let again = rate_limited || (status.is_server_error() && repeat == Repeat::Safe);
            if attempt < MAX_ATTEMPTS && again {
                let wait = match rate_limited.then(|| rate_limit_wait(&headers)).flatten() {
                    Some(wait) => wait,
                    None => backoff.next_delay(),
                };
                if wait <= MAX_RATE_LIMIT_WAIT {
                    tracing::warn!(
                        route,
                        status = status.as_u16(),
                        wait_ms = wait.as_millis() as u64,
                        "GitHub call failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            if rate_limited {
                return Err(GithubError::RateLimited { route, message });
            }
            return Err(GithubError::Status {
                status: status.as_u16(),
                route,
                message,
            });
        }
    }

    fn count(&self, route: &str, status: &str, result: &str) {
        self.metrics
            .github_api_calls
            .with_label_values(&[route, status, result])
            .inc();
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// How long a rate-limited call should wait: `retry-after` seconds, else until
/// `x-ratelimit-reset` (a Unix time), else unknown.
fn rate_limit_wait(headers: &HeaderMap) -> Option<Duration> {
    if let Some(secs) = header_u64(headers, "retry-after") {
        return Some(Duration::from_secs(secs.max(1)));
    }
    let reset = header_u64(headers, "x-ratelimit-reset")?;
    Some(Duration::from_secs(reset.saturating_sub(unix_now()).max(1)))
}

#[cfg(test)]
mod tests {
    use super::GithubError;

    #[test]
    fn refusals_for_good_are_told_from_ones_that_pass() {
        let status = |status: u16, message: &str| GithubError::Status {
            status,
            route: "/r",
            message: message.into(),
        };
        for permanent in [
            status(403, "Unable to create comment because issue is locked."),
            status(403, "Repository was archived so is read-only."),
            status(410, "Issues are disabled for this repo"),
            status(404, "Not Found"),
            status(422, "Validation Failed"),
        ] {
            assert!(permanent.is_permanent(), "{permanent}");
            assert!(!permanent.is_ambiguous(), "{permanent}");
        }
        for passing in [
            status(403, "You have exceeded a secondary rate limit."),
            status(401, "Bad credentials"),
            status(502, "Bad Gateway"),
            GithubError::RateLimited {
                route: "/r",
                message: "API rate limit exceeded".into(),
            },
        ] {
            assert!(!passing.is_permanent(), "{passing}");
        }
        assert!(status(502, "x").is_ambiguous());
    }

    #[tokio::test]
    async fn the_next_page_is_read_from_githubs_link_header() {
        use super::Raw;
        use octocrab::Page;
        let settings = ao_shared::config::GithubSettings {
            api_url: "https://api.github.com/".into(),
            ..Default::default()
        };
        let client = super::Client::new(
            &settings,
            std::sync::Arc::new(ao_shared::secret::LocalSecrets),
            crate::metrics::Metrics::new().expect("metrics"),
        );
        let page = |link: &str| {
            let mut headers = http::HeaderMap::new();
            if let Ok(v) = link.parse() {
                headers.insert("link", v);
            }
            Raw {
                status: http::StatusCode::OK,
                headers,
                body: bytes::Bytes::from_static(b"[1, 2]"),
            }
        };
        let next = |page: Page<u32>| page.next.and_then(|n| client.api_path(&n));
        let link = "<https://api.github.com/repositories/1/issues?page=2>; rel=\"next\", \
                    <https://api.github.com/repositories/1/issues?page=5>; rel=\"last\"";
        let first = page(link).page::<u32>("/r", None).await.expect("a page");
        assert_eq!(first.items, vec![1, 2]);
        assert_eq!(
            next(first).as_deref(),
            Some("/repositories/1/issues?page=2")
        );
        let last = "<https://x/a?page=1>; rel=\"first\", <https://x/a?page=4>; rel=\"prev\"";
        let last = page(last).page::<u32>("/r", None).await.expect("a page");
        assert_eq!(next(last), None);
        let none = page("").page::<u32>("/r", None).await.expect("a page");
        assert_eq!(next(none), None);
        // A next page on another host is not followed (the token would go there).
        let elsewhere = "<https://api.github.com.evil.example/a?page=2>; rel=\"next\"";
        let elsewhere = page(elsewhere)
            .page::<u32>("/r", None)
            .await
            .expect("a page");
        assert_eq!(next(elsewhere), None);
    }
}
