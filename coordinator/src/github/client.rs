//! The GitHub API client of the App: RS256 JWTs for the App itself, installation tokens
//! cached until shortly before they expire, and every call counted, retried on 5xx and
//! backed off on rate limits (`retry-after`, `x-ratelimit-reset`). Creating calls
//! ([`Client::create`]) are retried only when GitHub certainly refused them (rate limits):
//! after a 5xx or a lost answer they may have taken effect, so the caller looks up before
//! creating again. Lists ([`Client::list`], [`Client::app_list`]) follow the `Link`
//! header's `next` pages to the end.
//!
//! Built on reqwest rather than octocrab: every call here must see the response's
//! rate-limit headers and status (for backoff and metrics), and several calls need
//! request shapes octocrab does not model directly (scoped `access_tokens`, hook
//! deliveries, GraphQL "ready for review"); octocrab would also bring a second HTTP
//! stack (hyper, reqwest 0.13) into a workspace that already has reqwest 0.12.
//! The `api_url` is configurable, so GitHub Enterprise Server and the tests' fake work.

use crate::metrics::Metrics;
use ao_shared::backoff::Backoff;
use ao_shared::config::GithubSettings;
use ao_shared::secret::{SecretRef, SecretResolver};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
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

/// A successful response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    /// The `rel="next"` URL of the `Link` header: the next page of a list.
    pub next: Option<String>,
}

/// The `rel="next"` target of a `Link` header (RFC 8288, as GitHub writes it:
/// `<url>; rel="next", <url>; rel="last"`).
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim();
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
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

/// The App's client.
pub struct Client {
    http: reqwest::Client,
    api_url: String,
    app_id: Option<u64>,
    key_ref: Option<SecretRef>,
    secrets: Arc<dyn SecretResolver>,
    key: tokio::sync::OnceCell<EncodingKey>,
    tokens: Mutex<HashMap<(u64, String), CachedToken>>,
    metrics: Metrics,
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

impl Client {
    pub fn new(
        settings: &GithubSettings,
        secrets: Arc<dyn SecretResolver>,
        metrics: Metrics,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent("agent-orchestrator")
            .build()
            .unwrap_or_default();
        Self {
            http,
            api_url: settings.api_url.trim_end_matches('/').to_string(),
            app_id: settings.app_id,
            key_ref: settings.private_key.clone(),
            secrets,
            key: tokio::sync::OnceCell::new(),
            tokens: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Whether the App's id and key are configured (webhooks can be verified without).
    pub fn configured(&self) -> bool {
        self.app_id.is_some() && self.key_ref.is_some()
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
    /// from the cache when it has more than a few minutes left.
    pub async fn installation_token(
        &self,
        installation: u64,
        scope: &TokenScope,
    ) -> Result<SecretString, GithubError> {
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
        let body = serde_json::to_value(scope).unwrap_or(Value::Null);
        let reply = self
            .send(
                Method::POST,
                "/app/installations/{id}/access_tokens",
                &format!("/app/installations/{installation}/access_tokens"),
                &jwt,
                Some(&body),
            )
            .await?;
        let token = reply.body["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| GithubError::Transport {
                route: "/app/installations/{id}/access_tokens",
                message: "the answer has no token".into(),
            })?
            .to_string();
        let expires_at = reply.body["expires_at"]
            .as_str()
            .and_then(|s| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64))
            // Without an expiry, assume the documented hour minus a margin.
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(50 * 60));
        let token = SecretString::from(token);
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

    /// A call as the App itself (JWT).
    pub async fn app_call(
        &self,
        method: Method,
        route: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, GithubError> {
        let jwt = SecretString::from(self.jwt().await?);
        self.send(method, route, path, &jwt, body).await
    }

    /// Every item of a list the App itself reads (JWT): `path` and then each `Link`
    /// `next` page, up to [`MAX_PAGES`]; `items` picks a page's items from its body.
    pub async fn app_list(
        &self,
        route: &'static str,
        path: &str,
        items: fn(Value) -> Vec<Value>,
    ) -> Result<Vec<Value>, GithubError> {
        let jwt = SecretString::from(self.jwt().await?);
        self.list_with(route, path, items, &jwt).await
    }

    /// Every item of a list read as an installation (see [`Client::app_list`]).
    pub async fn list(
        &self,
        installation: u64,
        route: &'static str,
        path: &str,
        items: fn(Value) -> Vec<Value>,
    ) -> Result<Vec<Value>, GithubError> {
        let token = self
            .installation_token(installation, &TokenScope::default())
            .await?;
        self.list_with(route, path, items, &token).await
    }

    async fn list_with(
        &self,
        route: &'static str,
        path: &str,
        items: fn(Value) -> Vec<Value>,
        credential: &SecretString,
    ) -> Result<Vec<Value>, GithubError> {
        let mut out = Vec::new();
        let mut url = format!("{}{}", self.api_url, path);
        for _ in 0..MAX_PAGES {
            let reply = self
                .send_url(Method::GET, route, url, credential, None, Repeat::Safe)
                .await?;
            out.extend(items(reply.body));
            match reply.next {
                // The credential goes only where the API is.
                Some(next) if next.starts_with(&format!("{}/", self.api_url)) => url = next,
                Some(_) => {
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
        let url = format!("{}{}", self.api_url, path);
        self.send_url(
            Method::POST,
            route,
            url,
            &token,
            Some(body),
            Repeat::OnlyRefused,
        )
        .await
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
        match self.send(method.clone(), route, path, &token, body).await {
            // A token revoked early: forget it and try once with a new one.
            Err(GithubError::Status { status: 401, .. }) => {
                self.tokens.lock().retain(|(i, _), _| *i != installation);
                let token = self
                    .installation_token(installation, &TokenScope::default())
                    .await?;
                self.send(method, route, path, &token, body).await
            }
            other => other,
        }
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
        let url = match self.api_url.strip_suffix("/api/v3") {
            Some(host) => format!("{host}/api/graphql"),
            None => format!("{}/graphql", self.api_url),
        };
        let body = serde_json::json!({ "query": query, "variables": variables });
        let reply = self
            .send_url(
                Method::POST,
                "/graphql",
                url,
                &token,
                Some(&body),
                Repeat::Safe,
            )
            .await?;
        if let Some(errors) = reply.body.get("errors").filter(|e| !e.is_null()) {
            return Err(GithubError::Status {
                status: reply.status,
                route: "/graphql",
                message: errors.to_string().chars().take(300).collect(),
            });
        }
        Ok(reply)
    }

    async fn send(
        &self,
        method: Method,
        route: &'static str,
        path: &str,
        credential: &SecretString,
        body: Option<&Value>,
    ) -> Result<Reply, GithubError> {
        let url = format!("{}{}", self.api_url, path);
        self.send_url(method, route, url, credential, body, Repeat::Safe)
            .await
    }

    async fn send_url(
        &self,
        method: Method,
        route: &'static str,
        url: String,
        credential: &SecretString,
        body: Option<&Value>,
        repeat: Repeat,
    ) -> Result<Reply, GithubError> {
        let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", "2022-11-28")
                .bearer_auth(credential.expose_secret());
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    self.count(route, "0", "transport_error");
                    if attempt < MAX_ATTEMPTS && repeat == Repeat::Safe {
                        backoff.wait().await;
                        continue;
                    }
                    return Err(GithubError::Transport {
                        route,
                        message: e.without_url().to_string(),
                    });
                }
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            let remaining = header_u64(&headers, "x-ratelimit-remaining");
            if let Some(r) = remaining {
                self.metrics.github_rate_limit_remaining.set(r as i64);
            }
            let text = resp.text().await.unwrap_or_default();
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
                let body = if text.trim().is_empty() {
                    Value::Null
                } else {
                    serde_json::from_str(&text).unwrap_or(Value::String(text))
                };
                let next = headers
                    .get("link")
                    .and_then(|v| v.to_str().ok())
                    .and_then(next_link);
                return Ok(Reply {
                    status: status.as_u16(),
                    body,
                    next,
                });
            }
            let message = serde_json::from_str::<Value>(&text)
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

fn header_u64(headers: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// How long a rate-limited call should wait: `retry-after` seconds, else until
/// `x-ratelimit-reset` (a Unix time), else unknown.
fn rate_limit_wait(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(secs) = header_u64(headers, "retry-after") {
        return Some(Duration::from_secs(secs.max(1)));
    }
    let reset = header_u64(headers, "x-ratelimit-reset")?;
    Some(Duration::from_secs(reset.saturating_sub(unix_now()).max(1)))
}

#[cfg(test)]
mod tests {
    use super::{next_link, GithubError};

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

    #[test]
    fn the_next_page_is_read_from_githubs_link_header() {
        let link = "<https://api.github.com/repositories/1/issues?page=2>; rel=\"next\", \
                    <https://api.github.com/repositories/1/issues?page=5>; rel=\"last\"";
        assert_eq!(
            next_link(link).as_deref(),
            Some("https://api.github.com/repositories/1/issues?page=2")
        );
        let last = "<https://x/a?page=1>; rel=\"first\", <https://x/a?page=4>; rel=\"prev\"";
        assert_eq!(next_link(last), None);
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("garbage; rel=\"next\""), None);
    }
}
