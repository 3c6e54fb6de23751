//! Git credentials for subtasks of GitHub tasks. Right before a run, the worker (which
//! holds the App's private key; the sandbox never does) signs an App JWT and asks GitHub
//! for an installation token limited to the task's one repository and to what the
//! capability needs: `contents: write` for coder, tester and docs, `contents: read` for
//! planner and reviewer (the reviewer's review is posted by the coordinator), and
//! `workflows: write` for those that push when the installation granted it (read from
//! `GET /app/installations/{id}` right before). The token
//! reaches the sandbox only as `AO_GIT_TOKEN` in its environment, where the runner's git
//! credential helper reads it; it is never in a URL, an argument, a log or an event.

use crate::spec::RunSpec;
use crate::worker::Worker;
use ao_shared::capability::Capability;
use ao_shared::message::{GithubTarget, SubtaskMessage};
use ao_shared::task::{Outcome, OutcomeKind};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::OnceCell;

/// The variable the runner's git credential helper reads.
pub const GIT_TOKEN_ENV: &str = "AO_GIT_TOKEN";
/// Limit of the token request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of the token request on 5xx, rate limits and transport errors.
const ATTEMPTS: u32 = 4;

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("the task is on GitHub, but this worker has no GitHub App configured (github.app_id, github.private_key)")]
    NotConfigured,
    #[error("github.private_key: {0}")]
    Key(String),
    #[error("cannot get an installation token: {0}")]
    Token(String),
}

/// The App's identity, loaded once per worker process.
struct App {
    http: reqwest::Client,
    api_url: String,
    app_id: u64,
    key: EncodingKey,
}

static APP: OnceCell<App> = OnceCell::const_new();

async fn app(worker: &Worker) -> Result<&'static App, CredentialError> {
    APP.get_or_try_init(|| async {
        let gh = &worker.settings.github;
        let (Some(app_id), Some(key_ref)) = (gh.app_id, &gh.private_key) else {
            return Err(CredentialError::NotConfigured);
        };
        let pem = worker
            .secrets
            .resolve(key_ref)
            .await
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        let key = EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes())
            .map_err(|e| CredentialError::Key(format!("not an RSA private key in PEM: {e}")))?;
        Ok(App {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .user_agent("agent-orchestrator-worker")
                .build()
                .map_err(|e| CredentialError::Token(e.to_string()))?,
            api_url: gh.api_url.trim_end_matches('/').to_string(),
            app_id,
            key,
        })
    })
    .await
}

/// The `contents` permission a capability's token gets.
pub fn contents_permission(capability: Capability) -> &'static str {
    if capability.pushes_code() {
        "write"
    } else {
        "read"
    }
}

fn jwt(app: &App) -> Result<String, CredentialError> {
    #[derive(Serialize)]
    struct Claims {
        iat: u64,
        exp: u64,
        iss: String,
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        // Backdated against clock drift; GitHub allows at most 10 minutes of life.
        iat: now.saturating_sub(60),
        exp: now + 9 * 60,
        iss: app.app_id.to_string(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &app.key)
        .map_err(|e| CredentialError::Key(format!("cannot sign the App JWT: {e}")))
}

/// The permissions a token of `capability` asks for, given what the installation
/// granted the App (`granted`, as `GET /app/installations/{id}` lists them): `contents`
/// by capability and `metadata: read`; and `workflows: write` for a capability that
/// pushes code when the installation granted it, so that a change under
/// `.github/workflows/` pushes (GitHub refuses such a push without it). Never more than
/// granted: GitHub refuses such a token request (422).
pub fn token_permissions(
    capability: Capability,
    granted: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let mut permissions =
        json!({ "contents": contents_permission(capability), "metadata": "read" });
    if capability.pushes_code()
        && granted.get("workflows").and_then(|v| v.as_str()) == Some("write")
    {
        permissions["workflows"] = json!("write");
    }
    permissions
}

/// Mints a token for `target`'s one repository with the capability's permissions
/// ([`token_permissions`], from the installation's grants read just before).
pub async fn git_token(
    worker: &Worker,
    target: &GithubTarget,
    capability: Capability,
) -> Result<SecretString, CredentialError> {
    let app = app(worker).await?;
    let name = target
        .repo
        .split_once('/')
        .map(|(_, n)| n)
        .unwrap_or(&target.repo);
    let installation = format!(
        "{}/app/installations/{}",
        app.api_url, target.installation_id
    );
    let granted = if capability.pushes_code() {
        let v = call(app, reqwest::Method::GET, &installation, None).await?;
        v["permissions"].as_object().cloned().unwrap_or_default()
    } else {
        serde_json::Map::new()
    };
    let body = json!({
        "repositories": [name],
        "permissions": token_permissions(capability, &granted),
    });
    let v = call(
        app,
        reqwest::Method::POST,
        &format!("{installation}/access_tokens"),
        Some(&body),
    )
    .await?;
    v["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(|t| SecretString::from(t.to_string()))
        .ok_or_else(|| CredentialError::Token("the answer has no token".into()))
}

/// One App-authenticated call to GitHub (a fresh JWT each try), retried with backoff on
/// 5xx, rate limits and transport errors; returns the JSON answer.
async fn call(
    app: &App,
    method: reqwest::Method,
    url: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value, CredentialError> {
    let mut delay = Duration::from_millis(500);
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let jwt = SecretString::from(jwt(app)?);
        let mut request = app
            .http
            .request(method.clone(), url)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28")
            .bearer_auth(jwt.expose_secret());
        if let Some(body) = body {
            request = request.json(body);
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => {
                return r
                    .json()
                    .await
                    .map_err(|e| CredentialError::Token(e.without_url().to_string()));
            }
            Ok(r) => {
                let status = r.status();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let text: String = r
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect();
                last = format!("GitHub answered {status}: {text}");
                let retry = status.is_server_error()
                    || status.as_u16() == 429
                    || (status.as_u16() == 403 && retry_after.is_some());
                if !retry {
                    break;
                }
                if let Some(s) = retry_after {
                    delay = Duration::from_secs(s.clamp(1, 60));
                }
            }
            Err(e) => last = e.without_url().to_string(),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    Err(CredentialError::Token(last))
}

/// Where the runner's push gets a fresh token of `target` for `capability` (the same
/// scope as the first): minted at the moment of the push, so a run longer than a
/// token's hour still pushes.
pub fn refresher(
    worker: std::sync::Arc<Worker>,
    target: GithubTarget,
    capability: Capability,
) -> crate::spec::GitCredentials {
    crate::spec::GitCredentials(Some(std::sync::Arc::new(move || {
        let (worker, target) = (worker.clone(), target.clone());
        Box::pin(async move {
            let token = git_token(&worker, &target, capability)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(repository = %target.repo, "git token minted afresh for the push");
            Ok(token)
        })
    })))
}

/// Puts the git token of a GitHub task into the run's secret environment. A failure is
/// the attempt's outcome (infrastructure, retryable: GitHub may answer next time).
pub async fn attach(
    worker: &Worker,
    order: &SubtaskMessage,
    spec: &mut RunSpec,
) -> Result<(), Box<Outcome>> {
    let Some(target) = &order.github else {
        return Ok(());
    };
    match git_token(worker, target, order.capability).await {
        Ok(token) => {
            spec.secret_env.set(GIT_TOKEN_ENV, token);
            tracing::info!(repository = %target.repo, installation_id = target.installation_id,
                contents = contents_permission(order.capability), "scoped git token minted");
            Ok(())
        }
        Err(e) => {
            let retryable = !matches!(e, CredentialError::NotConfigured | CredentialError::Key(_));
            Err(Box::new(Outcome::failed(
                OutcomeKind::Infrastructure,
                e.to_string(),
                retryable,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(pairs: &[(&str, &str)]) -> serde_json::Map<String, serde_json::Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect()
    }

    #[test]
    fn workflows_is_asked_for_by_pushing_capabilities_only_when_granted() {
        let all = granted(&[("contents", "write"), ("workflows", "write")]);
        assert_eq!(
            token_permissions(Capability::Coder, &all),
            json!({ "contents": "write", "metadata": "read", "workflows": "write" })
        );
        assert_eq!(
            token_permissions(Capability::Reviewer, &all),
            json!({ "contents": "read", "metadata": "read" })
        );
        for without in [
            granted(&[("contents", "write")]),
            granted(&[("contents", "write"), ("workflows", "read")]),
        ] {
            assert_eq!(
                token_permissions(Capability::Coder, &without),
                json!({ "contents": "write", "metadata": "read" })
            );
        }
    }
}
