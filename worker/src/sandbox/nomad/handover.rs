//! The hand-over: how a Nomad sandbox receives its run spec and the attempt's secrets
//! (a repository-scoped git token, the address and token of the attempt's network proxy)
//! without either ever passing through Nomad — no dispatch payload, meta, job, variable,
//! allocation or log holds them. The model key is not among them: it stays with the
//! worker's proxy, which adds it to the agent's model calls (see [`ProxyGrant`]).
//!
//! The mechanism, by Nomad workload identity:
//! 1. Before dispatching an attempt, the driver [registers](Handovers::register) it here;
//!    once Nomad has answered the dispatch it records the dispatched child job's ID. The
//!    dispatch carries only non-secret meta (`task_id`, `subtask_id`, `attempt`) and
//!    `handover_url`, this worker's address of the hand-over endpoint.
//! 2. The sandbox task declares a named workload identity ([`IDENTITY`], audience
//!    [`AUDIENCE`], `file = true`): Nomad signs a JWT (RS256) whose claims name the
//!    namespace, the job, the allocation and the task (`nomad_namespace`,
//!    `nomad_job_id`, `nomad_allocation_id`, `nomad_task`), and writes it to
//!    `secrets/nomad_<name>.jwt` (and `NOMAD_TOKEN_<name>` with `env = true`).
//! 3. The runner, first thing at start, presents that JWT (`Authorization: Bearer`) to
//!    `POST handover_url` ([`START_PATH`]). The worker checks the signature against the
//!    cluster's JWKS (`/.well-known/jwks.json` of Nomad's address, cached by key ID,
//!    fetched again for an unknown one), the audience, the expiry and not-before, that
//!    the namespace and task are the sandbox's, that the job is exactly the dispatched
//!    child job of an attempt this worker is running now, and that Nomad places the
//!    allocation in that job and it has not ended. Then it answers the full run spec and
//!    the secret environment as JSON, once.
//!
//! 4. At the push, the runner asks `POST handover_url/push` the same way, once, with the
//!    attempt's push key (a random value handed over with the spec and kept in the
//!    runner's memory only: the identity file is readable by the agent, the key is not):
//!    the worker confirms the key and the attempt's lease and mints a fresh git token for
//!    the push (the push permit of `push_permit.rs`, with an installation token that
//!    lives as long as the run needs, whatever the run's length).
//!
//! Properties: the hand-over is bound to one attempt (the job ID is unique per dispatch
//! and only the attempt's child job matches), usable once (a second presentation is
//! refused with 409, whoever makes it), useless to any other allocation (another job's
//! or namespace's identity does not match; forging one needs the cluster's signing key),
//! and gone when the attempt ends (the registration is dropped with the run, and a lost
//! lease refuses it). The run spec's length is not bound by Nomad's 16 KiB payload limit.
//! The answer travels over the worker's HTTP listener: across machines, put it on a
//! network only the Nomad clients reach, or behind TLS (`nomad.handover_url` names the
//! address as the allocations see it).

use super::client::NomadClient;
use super::TASK;
use crate::spec::RunSpec;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The name of the sandbox task's workload identity (its `identity { name = … }`).
pub const IDENTITY: &str = "ao_handover";
/// The audience of that identity (`aud`), which the worker requires.
pub const AUDIENCE: &str = "agent-orchestrator-handover";
/// The worker's hand-over endpoint.
pub const START_PATH: &str = "/sandbox/v1/handover";
/// The push permit at the hand-over (`handover_url` + `/push`).
pub const PUSH_PATH: &str = "/sandbox/v1/handover/push";
/// The dispatch meta key (and the runner's variable, `AO_HANDOVER_URL`) naming it.
pub const META_KEY: &str = "handover_url";
pub const URL_ENV: &str = "AO_HANDOVER_URL";
/// How long a presentation waits for the dispatch answer naming its job (the sandbox may
/// start before the worker has read Nomad's answer).
const APPEAR_WAIT: Duration = Duration::from_secs(15);
/// How long the allocation check may take.
const ALLOC_CHECK: Duration = Duration::from_secs(10);

/// What the worker hands over: the run spec and its secret environment (name → value).
/// Deliberately not `Debug`.
#[derive(Serialize, Deserialize)]
pub struct Handed {
    pub spec: RunSpec,
    pub env: BTreeMap<String, String>,
    /// The attempt's push key: a random capability made at the hand-over that the runner
    /// keeps in memory only and sends with its push permit request ([`PUSH_KEY_HEADER`]).
    /// The workload identity alone does not buy a push permit, since anything in the
    /// allocation that reads the identity file could present it.
    pub push_key: String,
    /// The attempt's network proxy on the worker, when the capability's network is the
    /// allow-list proxy (the default).
    #[serde(default)]
    pub proxy: Option<ProxyGrant>,
}

/// The attempt's network proxy as the sandbox reaches it (`crate::proxy`, on TCP): the
/// way out for HTTP(S) and the model endpoint, which adds the model key. Deliberately
/// not `Debug`.
#[derive(Clone, Serialize, Deserialize)]
pub struct ProxyGrant {
    /// `http://host:port`, without credentials.
    pub url: String,
    /// The attempt's proxy token: random, required on every request to the proxy, and
    /// useless once the attempt ends (its proxy stops with it).
    pub token: String,
}

impl ProxyGrant {
    /// The proxy's URL with the token as its credentials (`http://ao:<token>@host:port`),
    /// as HTTP clients take it from `HTTPS_PROXY`.
    pub fn with_credentials(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(mut u) => {
                let _ = u.set_username("ao");
                let _ = u.set_password(Some(&self.token));
                u.to_string().trim_end_matches('/').to_string()
            }
            Err(_) => self.url.clone(),
        }
    }
}

/// The header of the push permit request that carries the attempt's push key.
pub const PUSH_KEY_HEADER: &str = "x-ao-push-key";

/// The claims of a Nomad workload identity the worker reads (Nomad's documented names).
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub nomad_namespace: String,
    pub nomad_job_id: String,
    pub nomad_allocation_id: String,
    pub nomad_task: String,
}

/// One attempt waiting for (or past) its hand-over.
struct Entry {
    /// The dispatched child job, once Nomad said it.
    job: Option<String>,
    spec: RunSpec,
    handed: bool,
    pushed: bool,
    /// Made at the hand-over; required by the push permit.
    push_key: Option<String>,
    /// The attempt's proxy, handed over with the spec.
    proxy: Option<ProxyGrant>,
}

/// The attempts of this worker's Nomad driver that a sandbox may claim.
pub struct Handovers {
    client: NomadClient,
    namespace: String,
    entries: Mutex<HashMap<String, Entry>>,
    changed: watch::Sender<u64>,
    keys: tokio::sync::Mutex<KeyCache>,
}

/// The cluster's JWKS as last read, and when.
#[derive(Default)]
struct KeyCache {
    set: Option<JwkSet>,
    fetched: Option<tokio::time::Instant>,
}

/// The JWKS is read again for an unknown key at most this often: identities that name
/// unknown keys cannot make the worker hammer Nomad (Nomad publishes a new signing key
/// in the JWKS before it signs with it, so a real key is found on the next read).
const JWKS_REFRESH_MIN: Duration = Duration::from_secs(10);

/// Why a presentation is refused: status, code and a message for the runner's log.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message, "code": self.code })),
        )
            .into_response()
    }
}

/// An attempt's registration; dropping it ends the attempt's hand-over.
pub struct Registration {
    owner: Arc<Handovers>,
    key: String,
}

impl Registration {
    /// Records the dispatched child job of the attempt.
    pub fn dispatched(&self, job: &str) {
        if let Some(e) = self.owner.entries.lock().get_mut(&self.key) {
            e.job = Some(job.to_string());
        }
        self.owner.changed.send_modify(|n| *n += 1);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.owner.entries.lock().remove(&self.key);
        self.owner.changed.send_modify(|n| *n += 1);
    }
}

impl Handovers {
    pub fn new(client: NomadClient, namespace: String) -> Arc<Self> {
        Arc::new(Self {
            client,
            namespace,
            entries: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
            keys: tokio::sync::Mutex::new(KeyCache::default()),
        })
    }

    /// Opens the hand-over of one attempt (`key`: unique per attempt), with its proxy.
    pub fn register(
        self: &Arc<Self>,
        key: &str,
        spec: &RunSpec,
        proxy: Option<ProxyGrant>,
    ) -> Registration {
        self.entries.lock().insert(
            key.to_string(),
            Entry {
                job: None,
                spec: spec.clone(),
                handed: false,
                pushed: false,
                push_key: None,
                proxy,
            },
        );
        Registration {
            owner: self.clone(),
            key: key.to_string(),
        }
    }

    /// The routes of the hand-over, for the worker's HTTP listener.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(START_PATH, axum::routing::post(start))
            .route(PUSH_PATH, axum::routing::post(push))
            .with_state(self.clone())
    }

    /// The verification key of `kid`, from the cached JWKS or a fresh one.
    async fn key(&self, kid: &str) -> Result<DecodingKey, Refusal> {
        let mut cached = self.keys.lock().await;
        let mut fresh = false;
        loop {
            if let Some(jwk) = cached.set.as_ref().and_then(|set| set.find(kid)) {
                return DecodingKey::from_jwk(jwk).map_err(|e| {
                    Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "bad_jwks",
                        format!("the cluster's key {kid:?} is unusable: {e}"),
                    )
                });
            }
            let recent = cached
                .fetched
                .is_some_and(|at| at.elapsed() < JWKS_REFRESH_MIN);
            if fresh || recent {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "unknown_key",
                    format!("no key {kid:?} in the cluster's JWKS"),
                ));
            }
            let set = self.client.jwks().await.map_err(|e| {
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "jwks_unavailable",
                    format!("cannot read the cluster's JWKS: {e}"),
                )
            })?;
            cached.set = Some(set);
            cached.fetched = Some(tokio::time::Instant::now());
            fresh = true;
        }
    }

    /// Checks a workload identity's signature, audience and lifetime; returns its claims.
    pub async fn verify(&self, jwt: &str) -> Result<Claims, Refusal> {
        let unauthorized =
            |what: String| Refusal::new(StatusCode::UNAUTHORIZED, "bad_identity", what);
        let header = jsonwebtoken::decode_header(jwt)
            .map_err(|e| unauthorized(format!("not a JWT: {e}")))?;
        if header.alg != Algorithm::RS256 {
            return Err(unauthorized(format!(
                "identity signed with {:?}, not RS256",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| unauthorized("the identity names no key (kid)".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        jsonwebtoken::decode::<Claims>(jwt, &key, &validation)
            .map(|d| d.claims)
            .map_err(|e| unauthorized(format!("the identity does not verify: {e}")))
    }

    /// The attempt dispatched as `job`, waiting a little for the dispatch answer.
    async fn attempt_of(&self, job: &str) -> Option<String> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + APPEAR_WAIT;
        loop {
            let found = self
                .entries
                .lock()
                .iter()
                .find(|(_, e)| e.job.as_deref() == Some(job))
                .map(|(k, _)| k.clone());
            if found.is_some() {
                return found;
            }
            // Nothing pending a dispatch answer: no point in waiting.
            if !self.entries.lock().values().any(|e| e.job.is_none()) {
                return None;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Checks a presentation: a valid identity of the sandbox task of a live allocation of
    /// the dispatched job of an attempt this worker runs. Returns the attempt's key, the
    /// job and the allocation.
    async fn check(&self, jwt: &str) -> Result<(String, String, String), Refusal> {
        let claims = self.verify(jwt).await?;
        let forbidden = |m: String| Refusal::new(StatusCode::FORBIDDEN, "not_this_attempt", m);
        if claims.nomad_namespace != self.namespace || claims.nomad_task != TASK {
            return Err(forbidden(format!(
                "the identity is task {} of namespace {}, not the sandbox's",
                claims.nomad_task, claims.nomad_namespace
            )));
        }
        let job = &claims.nomad_job_id;
        let Some(key) = self.attempt_of(job).await else {
            return Err(forbidden(format!(
                "job {job} is no attempt this worker is running"
            )));
        };
        let alloc = tokio::time::timeout(
            ALLOC_CHECK,
            self.client
                .allocation(&claims.nomad_allocation_id, 0, ALLOC_CHECK),
        )
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "nomad_unavailable",
                "Nomad did not answer the allocation check in time",
            )
        })?
        .map_err(|e| forbidden(format!("allocation {}: {e}", claims.nomad_allocation_id)))?
        .value;
        if alloc.job_id != *job || alloc.namespace != self.namespace || alloc.is_terminal() {
            return Err(forbidden(format!(
                "allocation {} is not a live allocation of job {job}",
                alloc.id
            )));
        }
        Ok((key, job.clone(), alloc.id))
    }

    /// The whole check of one presentation; on success the attempt is marked handed.
    async fn hand_over(&self, jwt: &str) -> Result<Handed, Refusal> {
        let (key, job, alloc) = self.check(jwt).await?;
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get_mut(&key) else {
            return Err(Refusal::new(
                StatusCode::GONE,
                "attempt_ended",
                "the attempt has ended",
            ));
        };
        if entry.handed {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "already_handed_over",
                "this attempt's run spec was handed over already",
            ));
        }
        if entry.spec.lease.0.as_ref().is_some_and(|l| l.is_lost()) {
            return Err(Refusal::new(
                StatusCode::GONE,
                "attempt_ended",
                "the attempt's lease is lost",
            ));
        }
        entry.handed = true;
        let push_key = uuid::Uuid::new_v4().simple().to_string();
        entry.push_key = Some(push_key.clone());
        let env = entry
            .spec
            .secret_env
            .pairs()
            .map(|(n, v)| (n.to_string(), v.expose_secret().to_string()))
            .collect();
        tracing::info!(job = %job, alloc = %alloc, "run spec handed over to the sandbox");
        Ok(Handed {
            spec: entry.spec.clone(),
            env,
            push_key,
            proxy: entry.proxy.clone(),
        })
    }
}

impl Handovers {
    /// The push permit of one presentation, once per attempt, after the hand-over.
    async fn permit(
        &self,
        jwt: &str,
        push_key: Option<&str>,
    ) -> Result<crate::push_permit::Answer, Refusal> {
        let (key, job, alloc) = self.check(jwt).await?;
        let (lease, credentials) = {
            let mut entries = self.entries.lock();
            let Some(entry) = entries.get_mut(&key) else {
                return Err(Refusal::new(
                    StatusCode::GONE,
                    "attempt_ended",
                    "the attempt has ended",
                ));
            };
            let key_matches = match (entry.push_key.as_deref(), push_key) {
                (Some(mine), Some(theirs)) => {
                    subtle::ConstantTimeEq::ct_eq(mine.as_bytes(), theirs.as_bytes()).into()
                }
                _ => false,
            };
            if !key_matches {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "no_push_key",
                    "a push permit needs the attempt's push key from the hand-over",
                ));
            }
            if !entry.handed || entry.pushed {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    "not_now",
                    "a push permit follows the hand-over, once",
                ));
            }
            entry.pushed = true;
            (
                entry.spec.lease.0.clone(),
                entry.spec.git_credentials.clone(),
            )
        };
        let answer = crate::push_permit::decide(lease.as_ref(), &credentials).await;
        tracing::info!(job = %job, alloc = %alloc, granted = answer.granted, "push permit answered");
        Ok(answer)
    }
}

/// The bearer token of a request.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// `POST /sandbox/v1/handover`.
async fn start(State(h): State<Arc<Handovers>>, headers: HeaderMap) -> Response {
    let Some(jwt) = bearer(&headers) else {
        return Refusal::new(
            StatusCode::UNAUTHORIZED,
            "no_identity",
            "present the sandbox's workload identity as a bearer token",
        )
        .into_response();
    };
    match h.hand_over(jwt).await {
        Ok(handed) => axum::Json(handed).into_response(),
        Err(refusal) => {
            tracing::warn!(status = refusal.status.as_u16(), code = refusal.code,
                reason = %refusal.message, "hand-over refused");
            refusal.into_response()
        }
    }
}

/// `POST /sandbox/v1/handover/push`.
async fn push(State(h): State<Arc<Handovers>>, headers: HeaderMap) -> Response {
    let Some(jwt) = bearer(&headers) else {
        return Refusal::new(
            StatusCode::UNAUTHORIZED,
            "no_identity",
            "present the sandbox's workload identity as a bearer token",
        )
        .into_response();
    };
    let push_key = headers.get(PUSH_KEY_HEADER).and_then(|v| v.to_str().ok());
    match h.permit(jwt, push_key).await {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(refusal) => {
            tracing::warn!(status = refusal.status.as_u16(), code = refusal.code,
                reason = %refusal.message, "push permit refused");
            refusal.into_response()
        }
    }
}

/// In the runner: the identity presented at start, kept for the push.
static PRESENTED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// In the runner: the attempt's push key from the hand-over, in memory only.
static PUSH_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// In the runner: whether the run spec came by the hand-over.
pub fn active() -> bool {
    PRESENTED.get().is_some()
}

/// In the runner: asks the hand-over for the push permit (and a fresh git token). The
/// identity is read again from its file (Nomad renews it), else the one presented at start.
pub fn ask_push() -> Result<crate::push_permit::Answer, String> {
    let jwt = identity()
        .ok()
        .or_else(|| PRESENTED.get().cloned())
        .ok_or("no workload identity for the push permit")?;
    let url = format!(
        "{}/push",
        std::env::var(URL_ENV)
            .unwrap_or_default()
            .trim_end_matches('/')
    );
    let key = PUSH_KEY
        .get()
        .ok_or("no push key: the run spec did not come by the hand-over")?;
    post(&url, &jwt, Some(key))
}

/// In the runner: POSTs the identity to `url` and reads the JSON answer, retrying
/// connection failures and 5xx answers (Nomad's JWKS or allocation unreadable for a
/// moment) a few times; refusals (4xx) are final.
fn post<T: serde::de::DeserializeOwned>(
    url: &str,
    jwt: &str,
    push_key: Option<&str>,
) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the hand-over client: {e}"))?;
    rt.block_on(async move {
        // Straight to the worker: the proxy variables the runner sets are for the agent
        // and git, and the hand-over is on no allow-list.
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot build the hand-over client: {e}"))?;
        let mut delay = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = http.post(url).bearer_auth(jwt);
            if let Some(key) = push_key {
                request = request.header(PUSH_KEY_HEADER, key);
            }
            match request.send().await {
                Ok(r) if r.status().is_success() => {
                    return r
                        .json::<T>()
                        .await
                        .map_err(|e| format!("unreadable hand-over answer: {e}"));
                }
                Ok(r) if r.status().is_server_error() && attempt < 5 => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Ok(r) => {
                    let status = r.status();
                    let text: String = r
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(500)
                        .collect();
                    return Err(format!("the worker refused ({status}): {text}"));
                }
                Err(_) if attempt < 5 => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    return Err(format!(
                        "cannot reach the worker's hand-over: {}",
                        e.without_url()
                    ))
                }
            }
        }
    })
}

/// In the runner: the sandbox's workload identity, from `NOMAD_TOKEN_<name>` or the file
/// `secrets/nomad_<name>.jwt` Nomad writes. Both are removed from the environment so that
/// nothing the runner starts inherits the variable.
pub fn identity() -> Result<String, String> {
    let var = format!("NOMAD_TOKEN_{IDENTITY}");
    let from_env = std::env::var(&var).ok().filter(|t| !t.trim().is_empty());
    std::env::remove_var(&var);
    if let Some(t) = from_env {
        return Ok(t.trim().to_string());
    }
    let dir = std::env::var("NOMAD_SECRETS_DIR").unwrap_or_else(|_| "secrets".into());
    let path = std::path::Path::new(&dir).join(format!("nomad_{IDENTITY}.jwt"));
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            format!(
                "no workload identity {IDENTITY} ({var} or {}): {e}",
                path.display()
            )
        })
}

/// In the runner: presents the identity at `AO_HANDOVER_URL` and returns what the worker
/// hands over.
pub fn fetch() -> Result<Handed, String> {
    let url = std::env::var(URL_ENV)
        .ok()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| format!("{URL_ENV} is not set: no hand-over address"))?;
    let jwt = identity()?;
    let handed: Handed = post(&url, &jwt, None).map_err(|e| format!("hand-over: {e}"))?;
    let _ = PRESENTED.set(jwt);
    let _ = PUSH_KEY.set(handed.push_key.clone());
    Ok(handed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handovers() -> Arc<Handovers> {
        let settings = ao_shared::config::NomadSettings::default();
        let client =
            NomadClient::new(&settings, Arc::new(ao_shared::secret::LocalSecrets)).unwrap();
        Handovers::new(client, "default".into())
    }

    fn spec() -> RunSpec {
        serde_json::from_value(serde_json::json!({
            "task_id": ao_shared::ids::TaskId::new(),
            "subtask_id": ao_shared::ids::SubtaskId::new(),
            "attempt": 1,
            "capability": "coder",
            "repository": "https://example.invalid/r.git",
            "branch": "agent/x",
            "title": "t",
            "prompt": "p",
            "agent": { "command": "claude", "timeout_secs": 60 },
        }))
        .unwrap()
    }

    #[test]
    fn only_a_bearer_token_is_an_identity() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Bearer a.b.c".parse().unwrap());
        assert_eq!(bearer(&h), Some("a.b.c"));
    }

    #[tokio::test]
    async fn an_identity_not_signed_rs256_is_refused_before_any_key_is_read() {
        let h = handovers();
        let claims = serde_json::json!({ "nomad_namespace": "default", "nomad_job_id": "j",
            "nomad_allocation_id": "a", "nomad_task": "runner", "aud": [AUDIENCE],
            "exp": 4_000_000_000u64 });
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"guessable"),
        )
        .unwrap();
        let refused = h.verify(&hs).await.unwrap_err();
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
        let refused = h.verify("not-a-jwt").await.unwrap_err();
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    }

    #[tokio::test]
    async fn an_attempt_is_claimable_only_while_it_runs_and_by_its_own_job() {
        let h = handovers();
        let reg = h.register("s-1", &spec(), None);
        reg.dispatched("ao-sandbox-coder/dispatch-1");
        assert_eq!(
            h.attempt_of("ao-sandbox-coder/dispatch-1").await.as_deref(),
            Some("s-1")
        );
        // Another job is no attempt (and with nothing awaiting a dispatch answer, the
        // answer comes at once).
        assert_eq!(h.attempt_of("ao-sandbox-coder/dispatch-2").await, None);
        drop(reg);
        assert_eq!(h.attempt_of("ao-sandbox-coder/dispatch-1").await, None);
        assert!(h.entries.lock().is_empty());
    }

    #[tokio::test]
    async fn a_presentation_waits_for_the_dispatch_answer() {
        let h = handovers();
        let reg = h.register("s-1", &spec(), None);
        let waiting = tokio::spawn({
            let h = h.clone();
            async move { h.attempt_of("ao-sandbox-coder/dispatch-1").await }
        });
        tokio::task::yield_now().await;
        reg.dispatched("ao-sandbox-coder/dispatch-1");
        assert_eq!(waiting.await.unwrap().as_deref(), Some("s-1"));
    }
}
