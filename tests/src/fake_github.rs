//! A stateful fake of GitHub for the tests: the REST routes the App uses (installations,
//! App JWTs checked with the App's public key, installation tokens with their repository
//! and permission scope enforced, issues, comments, labels, collaborator permissions,
//! pull requests, reviews, contents, hook deliveries and redelivery), GraphQL's
//! "ready for review", and real git over smart HTTP ([`git_http`]). It also plays
//! GitHub's webhook sender: test actions (label an issue, comment, review) change the
//! model and deliver a signed webhook to the coordinator, recording the delivery (a
//! failed one too, as GitHub does). Tests assert on the in-memory [`Model`].
//!
//! Shapes follow GitHub's REST docs; only the fields the coordinator reads are filled,
//! plus the identifying ones (`id`, `node_id`, `number`, `html_url`).
//!
//! Every REST request and every JSON answer is checked against GitHub's own REST
//! description ([`openapi`]); what does not match is recorded in
//! [`FakeGithub::violations`], a request that does not match is answered 422 as GitHub
//! does, and a fake dropped with violations fails the test.

mod git_http;
pub mod openapi;
pub use git_http::{MAX_FILE_BYTES_FILE, PROTECTED_BRANCHES_FILE};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Json, Router};
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The App's bot account, as GitHub names it.
pub const BOT_LOGIN: &str = "agent-orchestrator[bot]";

/// A permission level of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Perm {
    Read,
    Write,
}

fn perm(s: &str) -> Option<Perm> {
    match s {
        "read" => Some(Perm::Read),
        "write" | "admin" => Some(Perm::Write),
        _ => None,
    }
}

#[derive(Clone, Debug)]
pub struct Installation {
    pub id: u64,
    pub account: String,
    /// Full names of the repositories it may reach.
    pub repos: Vec<String>,
    /// The App's permissions on this installation (e.g. `contents` → `write`).
    pub permissions: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct Token {
    pub installation: u64,
    /// Repository names (without owner) the token is limited to; all when `None`.
    pub repositories: Option<Vec<String>>,
    pub permissions: BTreeMap<String, String>,
    /// When GitHub stops accepting it (an hour after it was issued, unless
    /// [`Model::token_ttl`] says otherwise).
    pub expires: std::time::Instant,
}

/// An access-token request as received.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub installation: u64,
    pub body: Value,
}

#[derive(Clone, Debug)]
pub struct Issue {
    pub number: u64,
    pub title: String,
    pub body: String,
    pub state: String,
    pub user: String,
    pub labels: Vec<String>,
    /// Issue events (`labeled` and `unlabeled`), oldest first.
    pub events: Vec<Value>,
    /// A locked conversation: GitHub refuses new comments (403).
    pub locked: bool,
}

#[derive(Clone, Debug)]
pub struct Comment {
    pub id: u64,
    pub repo: String,
    pub issue: u64,
    pub user: String,
    pub body: String,
    /// How often it was edited.
    pub edits: u32,
}

#[derive(Clone, Debug)]
pub struct Pull {
    pub number: u64,
    pub node_id: String,
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
    pub state: String,
    /// Closed by a merge (`state` is then `closed`).
    pub merged: bool,
    pub user: String,
}

#[derive(Clone, Debug)]
pub struct Review {
    pub id: u64,
    pub repo: String,
    pub pull: u64,
    pub user: String,
    pub body: String,
    pub event: String,
    /// Its line comments, as posted in `comments[]`.
    pub comments: Vec<ReviewComment>,
}

/// A check run on a commit (GitHub's checks API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRun {
    pub id: u64,
    pub repo: String,
    pub head_sha: String,
    pub head_branch: String,
    pub name: String,
    /// `queued`, `in_progress` or `completed`.
    pub status: String,
    /// When completed: `success`, `failure`, …
    pub conclusion: Option<String>,
    pub output_title: String,
    pub output_summary: String,
}

/// A commit status (GitHub's older statuses API: one state per `context` and commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitStatus {
    pub id: u64,
    pub repo: String,
    pub sha: String,
    pub context: String,
    /// `pending`, `success`, `failure` or `error`.
    pub state: String,
    pub description: String,
}

/// A line comment of a review.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewComment {
    pub path: String,
    pub line: u64,
    /// `LEFT` or `RIGHT`.
    pub side: String,
    pub body: String,
}

/// The request body of `POST /repos/{owner}/{repo}/pulls/{pull_number}/reviews`, as
/// GitHub's REST description (`@octokit/openapi`, operation `pulls/create-review`)
/// gives it; `side` and `start_side` are described there in prose as `LEFT` or `RIGHT`,
/// which is written here as an enum.
fn create_review_schema() -> Value {
    let side = json!({ "type": "string", "enum": ["LEFT", "RIGHT"] });
    json!({
        "type": "object",
        "properties": {
            "commit_id": { "type": "string" },
            "body": { "type": "string" },
            "event": { "type": "string", "enum": ["APPROVE", "REQUEST_CHANGES", "COMMENT"] },
            "comments": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "path": { "type": "string" },
                        "position": { "type": "integer" },
                        "body": { "type": "string" },
                        "line": { "type": "integer" },
                        "side": side,
                        "start_line": { "type": "integer" },
                        "start_side": side
                    },
                    "required": ["path", "body"]
                }
            }
        }
    })
}

/// The lines of the new version of each file that a diff shows (`RIGHT`: added and
/// context lines), by file, from `git diff` output.
fn right_lines(diff: &str) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    let mut file = String::new();
    let mut next: Option<u64> = None;
    for line in diff.lines() {
        if line.starts_with("diff --git ") {
            next = None;
        } else if let Some(f) = line.strip_prefix("+++ b/") {
            file = f.to_string();
        } else if let Some(h) = line.strip_prefix("@@ -") {
            next = h
                .split(" +")
                .nth(1)
                .and_then(|p| p.split([',', ' ']).next())
                .and_then(|n| n.parse().ok());
        } else if let Some(n) = next.as_mut() {
            if !line.starts_with('-') && !line.starts_with('\\') {
                out.entry(file.clone()).or_default().push(*n);
                *n += 1;
            }
        }
    }
    out
}

#[derive(Clone, Debug)]
pub struct Repo {
    pub full_name: String,
    pub default_branch: String,
    /// Role by login: `admin`, `maintain`, `write`, `triage`, `read`.
    pub collaborators: HashMap<String, String>,
    pub issues: BTreeMap<u64, Issue>,
    pub pulls: BTreeMap<u64, Pull>,
    /// Issues and pull requests share one number sequence.
    pub next_number: u64,
}

/// One webhook delivery attempt, as `GET /app/hook/deliveries` lists it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: u64,
    pub guid: String,
    pub event: String,
    pub action: Option<String>,
    /// 0 when the connection failed.
    pub status_code: u16,
    pub redelivery: bool,
    pub payload: Value,
}

/// The whole in-memory state; tests read it through [`FakeGithub::model`].
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub installations: BTreeMap<u64, Installation>,
    pub repos: BTreeMap<String, Repo>,
    pub comments: BTreeMap<u64, Comment>,
    pub reviews: Vec<Review>,
    /// Check runs, in the order created.
    pub check_runs: Vec<CheckRun>,
    /// Commit statuses, in the order created (the newest of a context counts).
    pub statuses: Vec<CommitStatus>,
    pub tokens: HashMap<String, Token>,
    /// Lifetime of the installation tokens issued from now on (GitHub's: one hour).
    pub token_ttl: Option<Duration>,
    pub token_requests: Vec<TokenRequest>,
    pub deliveries: Vec<Delivery>,
    /// Why git requests were refused.
    pub git_refusals: Vec<String>,
    /// Every API request: `METHOD path`.
    pub calls: Vec<String>,
    /// The `user` a comment or review list shows for a login instead of a whole
    /// `simple-user` (a deleted account's `null`, a user without a `gravatar_id`).
    pub user_shapes: HashMap<String, Value>,
    next_id: u64,
}

impl Model {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Comments on an issue, oldest first.
    pub fn comments_on(&self, repo: &str, issue: u64) -> Vec<Comment> {
        self.comments
            .values()
            .filter(|c| c.repo == repo && c.issue == issue)
            .cloned()
            .collect()
    }

    pub fn issue(&self, repo: &str, n: u64) -> Option<&Issue> {
        self.repos.get(repo)?.issues.get(&n)
    }

    pub fn pulls(&self, repo: &str) -> Vec<Pull> {
        self.repos
            .get(repo)
            .map(|r| r.pulls.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// A failure the fake answers with instead of serving a request (GitHub's bad days).
#[derive(Clone, Debug)]
pub enum Failure {
    /// 502 Bad Gateway.
    ServerError,
    /// 403 with `x-ratelimit-remaining: 0` and a reset this many seconds ahead.
    RateLimited { reset_in_secs: u64 },
    /// 429 with `retry-after`.
    TooManyRequests { retry_after_secs: u64 },
    /// 422 Unprocessable Entity: a client error, not retried.
    Unprocessable,
    /// 403 without rate-limit headers: what an archived repository answers to writes.
    Forbidden,
    /// 410 Gone: what a repository with issues disabled answers to its issue routes.
    Gone,
    /// The request is carried out, but the answer is lost: 502 (a gateway that timed out
    /// after GitHub acted).
    LostAnswer,
    /// The request is carried out and answered, this many milliseconds late (a slow
    /// GitHub: a second caller may act meanwhile).
    Slow { ms: u64 },
}

/// An injected failure: the next `times` requests whose `METHOD path` contains `matches`
/// (and, when `body` is set, whose body contains it).
#[derive(Clone, Debug)]
pub struct Fault {
    pub matches: String,
    pub body: Option<String>,
    pub times: u32,
    pub failure: Failure,
}

/// The server's shared state.
pub struct Fake {
    pub model: Mutex<Model>,
    faults: Mutex<Vec<Fault>>,
    /// Requests left in the fake's rate-limit window, reported on every answer.
    remaining: std::sync::atomic::AtomicU64,
    app_id: u64,
    public_key: DecodingKey,
    git_root: PathBuf,
    webhook: Mutex<Option<(String, String)>>,
    base_url: String,
    http: reqwest::Client,
    /// Requests and answers that do not match GitHub's REST description.
    violations: Mutex<Vec<String>>,
}

type ApiResult = Result<Response, (StatusCode, Json<Value>)>;

fn err(status: StatusCode, message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(
            json!({ "message": message.into(), "documentation_url": "https://docs.github.com/rest" }),
        ),
    )
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("token "))
        .map(str::to_string)
}

impl Fake {
    fn check_jwt(&self, headers: &HeaderMap) -> Result<(), (StatusCode, Json<Value>)> {
        #[derive(serde::Deserialize)]
        struct Claims {
            iat: u64,
            exp: u64,
            iss: Value,
        }
        let Some(jwt) = bearer(headers) else {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "A JSON web token could not be decoded",
            ));
        };
        let mut v = Validation::new(Algorithm::RS256);
        v.set_required_spec_claims(&["exp", "iat", "iss"]);
        let data = jsonwebtoken::decode::<Claims>(&jwt, &self.public_key, &v).map_err(|e| {
            err(
                StatusCode::UNAUTHORIZED,
                format!("'Issued at' claim or signature: {e}"),
            )
        })?;
        let c = data.claims;
        let iss = c
            .iss
            .as_u64()
            .or_else(|| c.iss.as_str().and_then(|s| s.parse().ok()));
        if iss != Some(self.app_id) {
            return Err(err(StatusCode::UNAUTHORIZED, "JWT issuer is not this App"));
        }
        if c.exp <= c.iat || c.exp - c.iat > 11 * 60 {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "'Expiration time' claim ('exp') is too far in the future",
            ));
        }
        Ok(())
    }

    /// Checks a token against a repository (`owner/name`) and a permission.
    pub fn check_token(
        &self,
        token: &str,
        repo: &str,
        permission: &str,
        need: Perm,
    ) -> Result<u64, (u16, String)> {
        let m = self.model.lock();
        let Some(t) = m
            .tokens
            .get(token)
            .filter(|t| t.expires > std::time::Instant::now())
        else {
            return Err((401, "Bad credentials".into()));
        };
        let inst = &m.installations[&t.installation];
        if !inst.repos.iter().any(|r| r == repo) {
            return Err((404, format!("{repo} is not in the installation")));
        }
        let name = repo.split_once('/').map(|(_, n)| n).unwrap_or(repo);
        if let Some(only) = &t.repositories {
            if !only.iter().any(|r| r == name) {
                return Err((404, format!("the token is not scoped to {repo}")));
            }
        }
        let have = t.permissions.get(permission).and_then(|p| perm(p));
        if have.is_none_or(|h| h < need) {
            return Err((
                403,
                format!("Resource not accessible by integration ({permission}: {need:?} needed)"),
            ));
        }
        Ok(t.installation)
    }

    fn auth(
        &self,
        headers: &HeaderMap,
        repo: &str,
        permission: &str,
        need: Perm,
    ) -> Result<u64, (StatusCode, Json<Value>)> {
        let token = bearer(headers)
            .ok_or_else(|| err(StatusCode::UNAUTHORIZED, "Requires authentication"))?;
        self.check_token(&token, repo, permission, need)
            .map_err(|(s, m)| err(StatusCode::from_u16(s).unwrap_or(StatusCode::FORBIDDEN), m))
    }

    fn record(&self, method: &Method, uri: &Uri) {
        self.model
            .lock()
            .calls
            .push(format!("{method} {}", uri.path()));
    }

    fn issue_json(&self, repo: &str, i: &Issue) -> Value {
        json!({
            "id": i.number * 1000, "node_id": format!("I_{}", i.number), "number": i.number,
            "title": i.title, "body": i.body, "state": i.state,
            "html_url": format!("{}/{repo}/issues/{}", self.base_url, i.number),
            "user": user_json(&i.user),
            "labels": i.labels.iter().map(|l| json!({ "name": l })).collect::<Vec<_>>(),
        })
    }

    fn repo_json(&self, r: &Repo) -> Value {
        let (owner, name) = r.full_name.split_once('/').unwrap_or(("", ""));
        json!({
            "id": 1, "node_id": "R_1", "name": name, "full_name": r.full_name, "private": true,
            "owner": { "login": owner, "type": "Organization" },
            "default_branch": r.default_branch,
            "clone_url": format!("{}/{}.git", self.base_url, r.full_name),
        })
    }

    /// A pull request as the issue routes and `issue*` webhooks show it.
    fn pull_as_issue_json(&self, repo: &str, p: &Pull, labels: &[&str]) -> Value {
        json!({
            "id": p.number * 1000, "node_id": format!("I_{}", p.number), "number": p.number,
            "title": p.title, "body": p.body, "state": p.state,
            "html_url": format!("{}/{repo}/pull/{}", self.base_url, p.number),
            "user": user_json(&p.user),
            "labels": labels.iter().map(|l| json!({ "name": l })).collect::<Vec<_>>(),
            "pull_request": {
                "url": format!("{}/repos/{repo}/pulls/{}", self.base_url, p.number),
                "html_url": format!("{}/{repo}/pull/{}", self.base_url, p.number),
            },
        })
    }

    /// `git diff base...head` of a pull request, as its files and review lines follow
    /// it (empty when git cannot tell).
    fn pull_diff(&self, repo: &str, base: &str, head: &str) -> String {
        std::process::Command::new("git")
            .arg("--git-dir")
            .arg(self.git_root.join(format!("{repo}.git")))
            .args(["diff", "--no-color", "--no-ext-diff", "-U3"])
            .arg(format!("{base}...{head}"))
            .arg("--")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn pull_json(&self, repo: &str, p: &Pull) -> Value {
        let owner = repo.split('/').next().unwrap_or("");
        let sha = |r: &str| resolve(self, repo, r).unwrap_or_else(|| "0".repeat(40));
        json!({
            "id": p.number * 1000, "node_id": p.node_id, "number": p.number, "title": p.title,
            "body": p.body, "draft": p.draft, "state": p.state, "merged": p.merged,
            "locked": false,
            "url": format!("{}/repos/{repo}/pulls/{}", self.base_url, p.number),
            "html_url": format!("{}/{repo}/pull/{}", self.base_url, p.number),
            "head": { "ref": p.head, "sha": sha(&p.head), "label": format!("{owner}:{}", p.head) },
            "base": { "ref": p.base, "sha": sha(&p.base), "label": format!("{owner}:{}", p.base) },
            "user": user_json(&p.user),
        })
    }
}

/// The running fake.
pub struct FakeGithub {
    pub fake: Arc<Fake>,
    pub url: String,
    pub app_id: u64,
    /// The App's private key file (PEM), generated for this run.
    pub private_key_path: PathBuf,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.server.abort();
        openapi::save_called();
        let v = self.violations();
        if v.is_empty() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("the fake GitHub's contract violations:\n{}", v.join("\n"));
        } else {
            panic!(
                "the fake GitHub saw {} request(s) or answer(s) not matching GitHub's REST \
                 description:\n{}",
                v.len(),
                v.join("\n")
            );
        }
    }
}

/// Makes an RSA key pair with openssl (PKCS#1, as GitHub hands them out); returns the
/// private key's path and the public key in PEM.
pub fn generate_app_key(dir: &FsPath) -> Result<(PathBuf, String)> {
    let key = dir.join("app-private-key.pem");
    let out = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .context("openssl runs")?;
    if !out.status.success() {
        bail!("openssl genrsa: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = std::process::Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&key)
        .output()
        .context("openssl runs")?;
    if !out.status.success() {
        bail!("openssl rsa: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((key, String::from_utf8(out.stdout)?))
}

/// `sha256=<hex>` of `body` with `secret`, as GitHub signs deliveries.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl FakeGithub {
    /// Starts the fake with its git repositories under `dir`.
    pub async fn start(dir: &FsPath, app_id: u64) -> Result<Self> {
        // Read GitHub's description before serving, so no request waits for it.
        tokio::task::spawn_blocking(|| {
            openapi::rest();
        })
        .await?;
        let (private_key_path, public_pem) = generate_app_key(dir)?;
        let git_root = dir.join("github-git");
        std::fs::create_dir_all(&git_root)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let fake = Arc::new(Fake {
            model: Mutex::new(Model::default()),
            faults: Mutex::new(Vec::new()),
            remaining: std::sync::atomic::AtomicU64::new(5000),
            app_id,
            public_key: DecodingKey::from_rsa_pem(public_pem.as_bytes())?,
            git_root,
            webhook: Mutex::new(None),
            base_url: url.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()?,
            violations: Mutex::new(Vec::new()),
        });
        let app = router(fake.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            fake,
            url,
            app_id,
            private_key_path,
            server,
        })
    }

    /// Makes the next `times` requests matching `matches` (in `METHOD path`) fail.
    pub fn fail(&self, matches: &str, times: u32, failure: Failure) {
        self.fake.faults.lock().push(Fault {
            matches: matches.into(),
            body: None,
            times,
            failure,
        });
    }

    /// Like [`FakeGithub::fail`], only for requests whose body contains `body` too.
    pub fn fail_with_body(&self, matches: &str, body: &str, times: u32, failure: Failure) {
        self.fake.faults.lock().push(Fault {
            matches: matches.into(),
            body: Some(body.into()),
            times,
            failure,
        });
    }

    /// Requests the project made and answers the fake gave that do not match GitHub's
    /// REST description (empty when the description is not installed).
    pub fn violations(&self) -> Vec<String> {
        self.fake.violations.lock().clone()
    }

    /// Drops every injected failure not yet used up.
    pub fn clear_faults(&self) {
        self.fake.faults.lock().clear();
    }

    /// Injected failures not yet used up.
    pub fn faults_left(&self) -> u32 {
        self.fake.faults.lock().iter().map(|f| f.times).sum()
    }

    /// A copy of the model.
    pub fn model(&self) -> Model {
        self.fake.model.lock().clone()
    }

    /// Where webhooks go, and the secret they are signed with.
    pub fn set_webhook(&self, url: &str, secret: &str) {
        *self.fake.webhook.lock() = Some((url.to_string(), secret.to_string()));
    }

    /// An installation of the App with GitHub's usual permissions for such an App.
    pub fn add_installation(&self, id: u64, account: &str) {
        let permissions = [
            ("contents", "write"),
            ("issues", "write"),
            ("pull_requests", "write"),
            ("metadata", "read"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        self.fake.model.lock().installations.insert(
            id,
            Installation {
                id,
                account: account.into(),
                repos: Vec::new(),
                permissions,
            },
        );
    }

    /// Sets what the owner of `installation` granted the App on `permission` (`read`,
    /// `write`; `None` takes it away), as in the installation's settings on GitHub.
    pub fn grant(&self, installation: u64, permission: &str, level: Option<&str>) {
        let mut m = self.fake.model.lock();
        let i = m
            .installations
            .get_mut(&installation)
            .expect("installation");
        match level {
            Some(l) => {
                i.permissions.insert(permission.into(), l.into());
            }
            None => {
                i.permissions.remove(permission);
            }
        }
    }

    /// A repository with one commit on `main` holding `files`, reachable by `installation`.
    pub fn add_repo(&self, installation: u64, full_name: &str, files: &[(&str, &str)]) -> PathBuf {
        let (owner, name) = full_name.split_once('/').expect("owner/name");
        let owner_dir = self.fake.git_root.join(owner);
        std::fs::create_dir_all(&owner_dir).expect("owner dir");
        let bare = crate::bare_repo(&owner_dir, name, files);
        git_http::install_workflows_guard(&bare);
        let mut m = self.fake.model.lock();
        m.repos.insert(
            full_name.to_string(),
            Repo {
                full_name: full_name.into(),
                default_branch: "main".into(),
                collaborators: HashMap::new(),
                issues: BTreeMap::new(),
                pulls: BTreeMap::new(),
                next_number: 1,
            },
        );
        if let Some(i) = m.installations.get_mut(&installation) {
            i.repos.push(full_name.into());
        }
        bare
    }

    /// The bare repository behind `full_name`.
    pub fn repo_path(&self, full_name: &str) -> PathBuf {
        self.fake.git_root.join(format!("{full_name}.git"))
    }

    /// Makes the installation tokens issued from now on expire after `ttl` (GitHub's
    /// are an hour).
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.fake.model.lock().token_ttl = Some(ttl);
    }

    pub fn set_role(&self, repo: &str, user: &str, role: &str) {
        self.fake
            .model
            .lock()
            .repos
            .get_mut(repo)
            .expect("repo")
            .collaborators
            .insert(user.into(), role.into());
    }

    /// Opens an issue (no webhook: tests label it next).
    pub fn open_issue(&self, repo: &str, title: &str, body: &str, user: &str) -> u64 {
        let mut m = self.fake.model.lock();
        let r = m.repos.get_mut(repo).expect("repo");
        let n = r.next_number;
        r.next_number += 1;
        r.issues.insert(
            n,
            Issue {
                number: n,
                title: title.into(),
                body: body.into(),
                state: "open".into(),
                user: user.into(),
                labels: Vec::new(),
                events: Vec::new(),
                locked: false,
            },
        );
        n
    }

    /// Makes comment and review lists show `user` for `login` instead of a whole
    /// `simple-user` (e.g. `null` for a deleted account).
    pub fn set_user_shape(&self, login: &str, user: Value) {
        self.fake
            .model
            .lock()
            .user_shapes
            .insert(login.into(), user);
    }

    /// Deletes a comment, as a person with write access may (no webhook).
    pub fn delete_comment(&self, id: u64) {
        self.fake.model.lock().comments.remove(&id);
    }

    /// Locks an issue's conversation: GitHub then refuses new comments on it.
    pub fn lock_issue(&self, repo: &str, issue: u64) {
        let mut m = self.fake.model.lock();
        if let Some(i) = m.repos.get_mut(repo).and_then(|r| r.issues.get_mut(&issue)) {
            i.locked = true;
        }
    }

    /// Puts `label` on an issue as `sender` without a webhook (one that never arrived).
    pub fn label_silently(&self, repo: &str, issue: u64, label: &str, sender: &str) {
        let mut m = self.fake.model.lock();
        let id = m.id();
        let i = m
            .repos
            .get_mut(repo)
            .and_then(|r| r.issues.get_mut(&issue))
            .expect("issue");
        if !i.labels.iter().any(|l| l == label) {
            i.labels.push(label.into());
        }
        i.events.push(
            json!({ "id": id, "event": "labeled", "label": { "name": label },
                               "actor": Self::sender(sender) }),
        );
    }

    /// Adds an issue event without a webhook (`event`: `labeled` or `unlabeled`).
    pub fn add_issue_event(&self, repo: &str, issue: u64, event: &str, label: &str, actor: &str) {
        let mut m = self.fake.model.lock();
        let id = m.id();
        let i = m
            .repos
            .get_mut(repo)
            .and_then(|r| r.issues.get_mut(&issue))
            .expect("issue");
        i.events.push(
            json!({ "id": id, "event": event, "label": { "name": label },
                               "actor": Self::sender(actor) }),
        );
    }

    /// Closes an issue as `sender` and delivers `issues.closed`.
    pub async fn close_issue(&self, repo: &str, issue: u64, sender: &str) -> u16 {
        let inst = self.installation_of(repo);
        let issue_json = {
            let mut m = self.fake.model.lock();
            let i = m
                .repos
                .get_mut(repo)
                .and_then(|r| r.issues.get_mut(&issue))
                .expect("issue");
            i.state = "closed".into();
            let i = i.clone();
            self.fake.issue_json(repo, &i)
        };
        let mut p = self.base_payload(repo, inst, sender);
        p.insert("action".into(), json!("closed"));
        p.insert("issue".into(), issue_json);
        self.deliver("issues", Value::Object(p)).await
    }

    /// Labels a pull request as `sender` and delivers `issues.labeled` for it (GitHub
    /// sends pull requests' labels as issue events with `issue.pull_request` set).
    pub async fn label_pull(&self, repo: &str, pull: u64, label: &str, sender: &str) -> u16 {
        let inst = self.installation_of(repo);
        let issue_json = {
            let m = self.fake.model.lock();
            let p = m.repos[repo]
                .pulls
                .get(&pull)
                .cloned()
                .expect("pull request");
            self.fake.pull_as_issue_json(repo, &p, &[label])
        };
        let mut p = self.base_payload(repo, inst, sender);
        p.insert("action".into(), json!("labeled"));
        p.insert("issue".into(), issue_json);
        p.insert("label".into(), json!({ "name": label, "color": "ededed" }));
        self.deliver("issues", Value::Object(p)).await
    }

    /// Merges a pull request: its head goes onto its base in git, and it is closed as
    /// merged. No webhook.
    pub fn merge_pull(&self, repo: &str, pull: u64) {
        let p = self.model().repos[repo].pulls[&pull].clone();
        let bare = self.repo_path(repo);
        let out = std::process::Command::new("git")
            .arg("--git-dir")
            .arg(&bare)
            .args([
                "update-ref",
                &format!("refs/heads/{}", p.base),
                &format!("refs/heads/{}", p.head),
            ])
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut m = self.fake.model.lock();
        let p = m
            .repos
            .get_mut(repo)
            .and_then(|r| r.pulls.get_mut(&pull))
            .expect("pull");
        p.state = "closed".into();
        p.merged = true;
    }

    /// Records a webhook delivery as GitHub lists it, without sending it (`status_code`
    /// 0: the connection failed); returns its id.
    pub fn record_delivery(&self, event: &str, payload: Value, status_code: u16) -> u64 {
        let mut m = self.fake.model.lock();
        let id = m.id();
        m.deliveries.push(Delivery {
            id,
            guid: uuid::Uuid::new_v4().to_string(),
            event: event.into(),
            action: payload["action"].as_str().map(str::to_string),
            status_code,
            redelivery: false,
            payload,
        });
        id
    }

    /// The `issues.labeled` payload GitHub would send for `label` on `issue` by `sender`.
    pub fn labeled_payload(&self, repo: &str, issue: u64, label: &str, sender: &str) -> Value {
        let inst = self.installation_of(repo);
        let issue_json = {
            let m = self.fake.model.lock();
            self.fake.issue_json(repo, &m.repos[repo].issues[&issue])
        };
        let mut p = self.base_payload(repo, inst, sender);
        p.insert("action".into(), json!("labeled"));
        p.insert("issue".into(), issue_json);
        p.insert("label".into(), json!({ "name": label, "color": "ededed" }));
        Value::Object(p)
    }

    fn sender(login: &str) -> Value {
        let bot = login.ends_with("[bot]");
        json!({ "login": login, "id": 5, "type": if bot { "Bot" } else { "User" } })
    }

    fn base_payload(
        &self,
        repo: &str,
        installation: u64,
        sender: &str,
    ) -> serde_json::Map<String, Value> {
        let m = self.fake.model.lock();
        let r = &m.repos[repo];
        let mut p = serde_json::Map::new();
        p.insert("repository".into(), self.fake.repo_json(r));
        p.insert("sender".into(), Self::sender(sender));
        p.insert(
            "installation".into(),
            json!({ "id": installation, "node_id": "MDIz" }),
        );
        p
    }

    fn installation_of(&self, repo: &str) -> u64 {
        let m = self.fake.model.lock();
        m.installations
            .values()
            .find(|i| i.repos.iter().any(|r| r == repo))
            .map(|i| i.id)
            .expect("repository is installed")
    }

    /// Labels an issue as `sender` and delivers `issues.labeled`; returns the delivery's
    /// HTTP status (0: not delivered).
    pub async fn label_issue(&self, repo: &str, issue: u64, label: &str, sender: &str) -> u16 {
        let inst = self.installation_of(repo);
        let issue_json = {
            let mut m = self.fake.model.lock();
            let id = m.id();
            let i = m
                .repos
                .get_mut(repo)
                .and_then(|r| r.issues.get_mut(&issue))
                .expect("issue");
            if !i.labels.iter().any(|l| l == label) {
                i.labels.push(label.into());
            }
            i.events.push(
                json!({ "id": id, "event": "labeled", "label": { "name": label },
                                   "actor": Self::sender(sender) }),
            );
            let i = i.clone();
            self.fake.issue_json(repo, &i)
        };
        let mut p = self.base_payload(repo, inst, sender);
        p.insert("action".into(), json!("labeled"));
        p.insert("issue".into(), issue_json);
        p.insert("label".into(), json!({ "name": label, "color": "ededed" }));
        self.deliver("issues", Value::Object(p)).await
    }

    /// Comments on an issue (or pull request) as `sender` and delivers `issue_comment`.
    pub async fn comment(&self, repo: &str, issue: u64, body: &str, sender: &str) -> u16 {
        let inst = self.installation_of(repo);
        let (comment_id, issue_json) = {
            let mut m = self.fake.model.lock();
            let id = m.id();
            m.comments.insert(
                id,
                Comment {
                    id,
                    repo: repo.into(),
                    issue,
                    user: sender.into(),
                    body: body.into(),
                    edits: 0,
                },
            );
            let r = &m.repos[repo];
            let issue_json = match r.issues.get(&issue) {
                Some(i) => self.fake.issue_json(repo, i),
                None => {
                    let p = r.pulls.get(&issue).expect("issue or pull request");
                    self.fake.pull_as_issue_json(repo, p, &[])
                }
            };
            (id, issue_json)
        };
        let mut p = self.base_payload(repo, inst, sender);
        p.insert("action".into(), json!("created"));
        p.insert("issue".into(), issue_json);
        p.insert(
            "comment".into(),
            json!({ "id": comment_id, "body": body,
                                           "user": Self::sender(sender) }),
        );
        self.deliver("issue_comment", Value::Object(p)).await
    }

    /// CI reports on the head of `branch`: a check run `name` created (`conclusion`
    /// `None`: in progress) or completed, then the `check_run` webhook
    /// (`created`/`completed`) as GitHub delivers it. Returns the delivery's status.
    pub async fn check_run(
        &self,
        repo: &str,
        branch: &str,
        name: &str,
        conclusion: Option<&str>,
        summary: &str,
    ) -> u16 {
        let inst = self.installation_of(repo);
        let run = self.record_check_run(repo, branch, name, conclusion, summary);
        let mut p = self.base_payload(repo, inst, "github-actions[bot]");
        p.insert(
            "action".into(),
            json!(if conclusion.is_some() {
                "completed"
            } else {
                "created"
            }),
        );
        p.insert("check_run".into(), check_run_json(&run));
        self.deliver("check_run", Value::Object(p)).await
    }

    /// The same check run as [`FakeGithub::check_run`], but its webhook never arrives
    /// (the App was not subscribed, or GitHub did not send it).
    pub fn check_run_undelivered(
        &self,
        repo: &str,
        branch: &str,
        name: &str,
        conclusion: Option<&str>,
        summary: &str,
    ) {
        self.record_check_run(repo, branch, name, conclusion, summary);
    }

    fn record_check_run(
        &self,
        repo: &str,
        branch: &str,
        name: &str,
        conclusion: Option<&str>,
        summary: &str,
    ) -> CheckRun {
        let sha = resolve(&self.fake, repo, branch).expect("the branch exists");
        let mut m = self.fake.model.lock();
        let id = m.id();
        let run = CheckRun {
            id,
            repo: repo.into(),
            head_sha: sha,
            head_branch: branch.into(),
            name: name.into(),
            status: if conclusion.is_some() {
                "completed"
            } else {
                "in_progress"
            }
            .into(),
            conclusion: conclusion.map(str::to_string),
            output_title: format!("{name}: {}", conclusion.unwrap_or("running")),
            output_summary: summary.into(),
        };
        // A run of the same name on the same commit is updated, not added.
        m.check_runs
            .retain(|c| !(c.repo == run.repo && c.head_sha == run.head_sha && c.name == run.name));
        m.check_runs.push(run.clone());
        run
    }

    /// CI reports a commit status `context` = `state` (`pending`, `success`, `failure`,
    /// `error`) on the head of `branch`, then the `status` webhook as GitHub delivers it
    /// (with the branches whose head is that commit). Returns the delivery's status.
    pub async fn commit_status(
        &self,
        repo: &str,
        branch: &str,
        context: &str,
        state: &str,
        description: &str,
    ) -> u16 {
        let inst = self.installation_of(repo);
        let sha = resolve(&self.fake, repo, branch).expect("the branch exists");
        let status = {
            let mut m = self.fake.model.lock();
            let status = CommitStatus {
                id: m.id(),
                repo: repo.into(),
                sha: sha.clone(),
                context: context.into(),
                state: state.into(),
                description: description.into(),
            };
            m.statuses.push(status.clone());
            status
        };
        let mut p = self.base_payload(repo, inst, "ci-bot[bot]");
        let at = "2026-11-30T00:00:00Z";
        let commit_url = format!("{}/repos/{repo}/commits/{sha}", self.url);
        p.insert("id".into(), json!(status.id));
        p.insert("sha".into(), json!(sha));
        p.insert("name".into(), json!(repo));
        p.insert("context".into(), json!(context));
        p.insert("state".into(), json!(state));
        p.insert("description".into(), json!(description));
        p.insert("target_url".into(), Value::Null);
        p.insert("avatar_url".into(), Value::Null);
        p.insert("created_at".into(), json!(at));
        p.insert("updated_at".into(), json!(at));
        p.insert(
            "branches".into(),
            json!([{ "name": branch, "protected": false,
                     "commit": { "sha": sha, "url": commit_url } }]),
        );
        p.insert(
            "commit".into(),
            json!({ "sha": sha, "node_id": format!("C_{sha}"), "url": commit_url,
                    "html_url": commit_url, "comments_url": format!("{commit_url}/comments"),
                    "author": null, "committer": null, "parents": [],
                    "commit": { "message": "", "url": commit_url, "comment_count": 0,
                                "author": { "name": "a", "email": "a@example.com", "date": at },
                                "committer": { "name": "a", "email": "a@example.com", "date": at },
                                "tree": { "sha": sha, "url": commit_url } } }),
        );
        self.deliver("status", Value::Object(p)).await
    }

    /// Submits a review on a pull request and delivers `pull_request_review.submitted`.
    pub async fn review(
        &self,
        repo: &str,
        pull: u64,
        state: &str,
        body: &str,
        sender: &str,
    ) -> u16 {
        let inst = self.installation_of(repo);
        let pr = {
            let mut m = self.fake.model.lock();
            let p = m.repos[repo]
                .pulls
                .get(&pull)
                .cloned()
                .expect("pull request");
            let id = m.id();
            m.reviews.push(Review {
                id,
                repo: repo.into(),
                pull,
                user: sender.into(),
                body: body.into(),
                event: state.to_ascii_uppercase(),
                comments: Vec::new(),
            });
            self.fake.pull_json(repo, &p)
        };
        let mut p = self.base_payload(repo, inst, sender);
        p.insert("action".into(), json!("submitted"));
        p.insert(
            "review".into(),
            json!({ "id": 77, "body": body, "state": state,
                                          "user": Self::sender(sender) }),
        );
        p.insert("pull_request".into(), pr);
        self.deliver("pull_request_review", Value::Object(p)).await
    }

    /// Delivers a webhook as GitHub does, recording the attempt.
    pub async fn deliver(&self, event: &str, payload: Value) -> u16 {
        let guid = uuid::Uuid::new_v4().to_string();
        deliver(&self.fake, event, &guid, payload, false).await
    }
}

async fn deliver(
    fake: &Arc<Fake>,
    event: &str,
    guid: &str,
    payload: Value,
    redelivery: bool,
) -> u16 {
    let target = fake.webhook.lock().clone();
    let body = payload.to_string();
    let status = match &target {
        Some((url, secret)) => {
            let sent = fake
                .http
                .post(url)
                .header("content-type", "application/json")
                .header("x-github-event", event)
                .header("x-github-delivery", guid)
                .header("x-hub-signature-256", sign(secret, body.as_bytes()))
                .header("user-agent", "GitHub-Hookshot/fake")
                .body(body)
                .send()
                .await;
            sent.map(|r| r.status().as_u16()).unwrap_or(0)
        }
        None => 0,
    };
    let mut m = fake.model.lock();
    let id = m.id();
    m.deliveries.push(Delivery {
        id,
        guid: guid.into(),
        event: event.into(),
        action: payload["action"].as_str().map(str::to_string),
        status_code: status,
        redelivery,
        payload,
    });
    status
}

fn router(fake: Arc<Fake>) -> Router {
    Router::new()
        .route("/app", get(get_app))
        .route("/app/installations", get(list_installations))
        .route("/app/installations/{id}", get(get_installation))
        .route("/app/installations/{id}/access_tokens", post(access_token))
        .route("/app/hook/deliveries", get(list_deliveries))
        .route("/app/hook/deliveries/{id}/attempts", post(redeliver))
        .route("/installation/repositories", get(installation_repositories))
        .route(
            "/repos/{o}/{r}/collaborators/{u}/permission",
            get(permission),
        )
        .route("/repos/{o}/{r}/issues", get(list_issues))
        .route(
            "/repos/{o}/{r}/issues/{n}/comments",
            post(create_comment).get(list_comments),
        )
        .route("/repos/{o}/{r}/issues/comments/{id}", patch(edit_comment))
        .route("/repos/{o}/{r}/issues/{n}/labels", post(add_labels))
        .route(
            "/repos/{o}/{r}/issues/{n}/labels/{name}",
            delete(remove_label),
        )
        .route("/repos/{o}/{r}/issues/{n}/events", get(issue_events))
        .route("/repos/{o}/{r}/pulls", post(create_pull).get(list_pulls))
        .route("/repos/{o}/{r}/pulls/{n}", get(get_pull).patch(update_pull))
        .route(
            "/repos/{o}/{r}/pulls/{n}/reviews",
            post(create_review).get(list_reviews),
        )
        .route("/repos/{o}/{r}/pulls/{n}/files", get(pull_files))
        .route(
            "/repos/{o}/{r}/commits/{git_ref}/check-runs",
            get(list_check_runs),
        )
        .route(
            "/repos/{o}/{r}/commits/{git_ref}/status",
            get(combined_status),
        )
        .route("/repos/{o}/{r}/contents/{*path}", get(contents))
        .route("/graphql", post(graphql))
        .fallback(git_or_404)
        .layer(axum::middleware::from_fn_with_state(
            fake.clone(),
            faults_and_limits,
        ))
        .layer(axum::middleware::from_fn_with_state(fake.clone(), contract))
        .with_state(fake)
}

/// The largest body the contract check reads.
const CONTRACT_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// Checks a REST request, and the fake's JSON answer to it, against GitHub's REST
/// description ([`openapi`]). Git over HTTP and GraphQL are not REST and pass unchecked.
async fn contract(
    State(f): S,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_string();
    let Some(api) = openapi::rest() else {
        return next.run(request).await;
    };
    if path.contains(".git/") || path == "/graphql" {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let what = format!("{method} {path}");
    let Some((op, _)) = api.find(method.as_str(), &path) else {
        f.violations.lock().push(format!(
            "{what}: no such operation in GitHub's REST description"
        ));
        return err(StatusCode::NOT_FOUND, format!("Not Found: {what}")).into_response();
    };
    let query: Vec<(String, String)> = request
        .uri()
        .query()
        .and_then(|q| reqwest::Url::parse(&format!("http://fake/?{q}")).ok())
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, CONTRACT_BODY_LIMIT).await else {
        return err(StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    };
    let json_body: Option<Value> = if bytes.is_empty() {
        None
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                f.violations
                    .lock()
                    .push(format!("{what}: the body is not JSON: {e}"));
                return err(StatusCode::BAD_REQUEST, "Problems parsing JSON").into_response();
            }
        }
    };
    openapi::note_called(op);
    let errors = api.check_request(op, &query, json_body.as_ref());
    if !errors.is_empty() {
        let message = errors.join("; ");
        f.violations.lock().push(format!("{what}: {message}"));
        return err(StatusCode::UNPROCESSABLE_ENTITY, message).into_response();
    }
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return response;
    }
    let status = response.status().as_u16();
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, CONTRACT_BODY_LIMIT).await else {
        f.violations
            .lock()
            .push(format!("{what}: the answer is too large to check"));
        return (StatusCode::INTERNAL_SERVER_ERROR, "answer too large").into_response();
    };
    let Ok(mut answer) = serde_json::from_slice::<Value>(&bytes) else {
        f.violations
            .lock()
            .push(format!("{what}: the answer ({status}) is not JSON"));
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    api.complete(op, status, &mut answer);
    let errors = api.check_response(op, status, &answer);
    if !errors.is_empty() {
        f.violations.lock().extend(
            errors
                .into_iter()
                .map(|e| format!("{what}: the fake's answer: {e}")),
        );
    }
    parts.headers.remove("content-length");
    let body = serde_json::to_vec(&answer).unwrap_or_else(|_| bytes.to_vec());
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Answers injected failures, and puts GitHub's rate-limit headers on every API answer.
async fn faults_and_limits(
    State(f): S,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use std::sync::atomic::Ordering;
    let what = format!("{} {}", request.method(), request.uri().path());
    let reset = (time::OffsetDateTime::now_utc().unix_timestamp() + 3600).to_string();
    // The body is read only when a fault looks at it.
    let wants_body = f
        .faults
        .lock()
        .iter()
        .any(|x| x.times > 0 && x.body.is_some() && what.contains(&x.matches));
    let (request, body) = if wants_body {
        let (parts, body) = request.into_parts();
        let bytes = axum::body::to_bytes(body, 64 << 20)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        (
            axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)),
            text,
        )
    } else {
        (request, String::new())
    };
    let failure = {
        let mut faults = f.faults.lock();
        let hit = faults.iter_mut().find(|x| {
            x.times > 0
                && what.contains(&x.matches)
                && x.body.as_deref().is_none_or(|b| body.contains(b))
        });
        hit.map(|x| {
            x.times -= 1;
            x.failure.clone()
        })
    };
    if let Some(Failure::Slow { ms }) = failure {
        f.model.lock().calls.push(format!("{what} (slow, begun)"));
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return next.run(request).await;
    }
    if let Some(Failure::LostAnswer) = failure {
        let _ = next.run(request).await;
        f.model.lock().calls.push(format!("{what} (answer lost)"));
        return (StatusCode::BAD_GATEWAY, "upstream timed out").into_response();
    }
    if let Some(failure) = failure {
        f.model
            .lock()
            .calls
            .push(format!("{what} (failed: {failure:?})"));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        return match failure {
            Failure::ServerError => (StatusCode::BAD_GATEWAY, "upstream trouble").into_response(),
            Failure::RateLimited { reset_in_secs } => (
                StatusCode::FORBIDDEN,
                [
                    ("x-ratelimit-remaining", "0".to_string()),
                    (
                        "x-ratelimit-reset",
                        (now + reset_in_secs as i64).to_string(),
                    ),
                ],
                Json(json!({ "message": "API rate limit exceeded" })),
            )
                .into_response(),
            Failure::Unprocessable => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({ "message": "Validation Failed" })),
            )
                .into_response(),
            Failure::Forbidden => (
                StatusCode::FORBIDDEN,
                Json(json!({ "message": "Repository was archived so is read-only." })),
            )
                .into_response(),
            Failure::LostAnswer | Failure::Slow { .. } => {
                (StatusCode::BAD_GATEWAY, "upstream timed out").into_response()
            }
            Failure::Gone => (
                StatusCode::GONE,
                Json(json!({ "message": "Issues are disabled for this repo" })),
            )
                .into_response(),
            Failure::TooManyRequests { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", retry_after_secs.to_string())],
                Json(json!({ "message": "You have exceeded a secondary rate limit" })),
            )
                .into_response(),
        };
    }
    let mut response = next.run(request).await;
    if !what.contains(".git/") {
        let left = f
            .remaining
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        let h = response.headers_mut();
        if let Ok(v) = left.to_string().parse() {
            h.insert("x-ratelimit-remaining", v);
        }
        if let Ok(v) = reset.parse() {
            h.insert("x-ratelimit-reset", v);
        }
    }
    response
}

type S = State<Arc<Fake>>;

/// An API call as every handler sees it: the fake, and the request's method, path and
/// headers. Each handler starts by recording it, with or without a credential check.
struct Call {
    f: Arc<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl FromRequestParts<Arc<Fake>> for Call {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, f: &Arc<Fake>) -> Result<Self, Infallible> {
        Ok(Call {
            f: f.clone(),
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        })
    }
}

impl Call {
    /// Records the call; returns the fake and the request's headers.
    fn recorded(self) -> (Arc<Fake>, HeaderMap) {
        self.f.record(&self.method, &self.uri);
        (self.f, self.headers)
    }

    /// Records the call and checks the App's JWT.
    fn app(self) -> Result<Arc<Fake>, (StatusCode, Json<Value>)> {
        let (f, headers) = self.recorded();
        f.check_jwt(&headers)?;
        Ok(f)
    }

    /// Records the call and checks that its installation token reaches `o/r` with `need`
    /// on `permission`; returns the fake and the repository's full name.
    fn repo(
        self,
        o: &str,
        r: &str,
        permission: &str,
        need: Perm,
    ) -> Result<(Arc<Fake>, String), (StatusCode, Json<Value>)> {
        let (f, headers) = self.recorded();
        let repo = format!("{o}/{r}");
        f.auth(&headers, &repo, permission, need)?;
        Ok((f, repo))
    }
}

async fn git_or_404(
    State(f): S,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path().contains(".git/") {
        return git_http::serve(f, method, uri, headers, body).await;
    }
    f.record(&method, &uri);
    err(
        StatusCode::NOT_FOUND,
        format!("Not Found: {method} {}", uri.path()),
    )
    .into_response()
}

/// Items per page when a request names none, and the most it may ask for (GitHub's).
const DEFAULT_PER_PAGE: usize = 30;
const MAX_PER_PAGE: usize = 100;

/// One page of `items` as GitHub serves a list: `per_page` (default 30, at most 100)
/// and `page` (from 1) from the query, a `Link` header naming the `next` and `last`
/// pages (and `prev`, `first`), each with the request's other parameters kept. `wrap`
/// shapes the page's body (a bare array for most routes).
fn paginate(
    f: &Fake,
    uri: &Uri,
    q: &HashMap<String, String>,
    items: Vec<Value>,
    wrap: impl FnOnce(Vec<Value>, usize) -> Value,
) -> Response {
    paginate_as(f, uri, q, items, wrap, Pages::Numbered)
}

/// How a list names its pages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pages {
    /// `page=N`, with `next`, `last`, `prev` and `first` links.
    Numbered,
    /// An opaque `cursor=…` (the App's webhook deliveries), with `next` and `prev`
    /// links only.
    Cursor,
}

/// The cursor of page `n` (GitHub's are opaque strings).
fn cursor_of(n: usize) -> String {
    format!("v1_{n}")
}

/// [`paginate`], with the pages named as `pages` says.
fn paginate_as(
    f: &Fake,
    uri: &Uri,
    q: &HashMap<String, String>,
    items: Vec<Value>,
    wrap: impl FnOnce(Vec<Value>, usize) -> Value,
    pages: Pages,
) -> Response {
    let per_page = q
        .get("per_page")
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(DEFAULT_PER_PAGE)
        .min(MAX_PER_PAGE);
    let page = match pages {
        Pages::Numbered => q.get("page").cloned(),
        Pages::Cursor => q
            .get("cursor")
            .and_then(|c| c.strip_prefix("v1_"))
            .map(str::to_string),
    };
    let page = page
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(1);
    let total = items.len();
    let last = total.div_ceil(per_page).max(1);
    let at = |n: usize| {
        let mut u = reqwest::Url::parse(&format!("{}{}", f.base_url, uri.path()))
            .expect("the fake's own URL");
        {
            let mut pairs = u.query_pairs_mut();
            let mut keys: Vec<_> = q
                .iter()
                .filter(|(k, _)| *k != "page" && *k != "cursor" && *k != "per_page")
                .collect();
            keys.sort();
            for (k, v) in keys {
                pairs.append_pair(k, v);
            }
            pairs.append_pair("per_page", &per_page.to_string());
            match pages {
                Pages::Numbered => pairs.append_pair("page", &n.to_string()),
                Pages::Cursor => pairs.append_pair("cursor", &cursor_of(n)),
            };
        }
        u.to_string()
    };
    let mut links = Vec::new();
    if page < last {
        links.push(format!("<{}>; rel=\"next\"", at(page + 1)));
        if pages == Pages::Numbered {
            links.push(format!("<{}>; rel=\"last\"", at(last)));
        }
    }
    if page > 1 {
        links.push(format!("<{}>; rel=\"prev\"", at(page - 1)));
        if pages == Pages::Numbered {
            links.push(format!("<{}>; rel=\"first\"", at(1)));
        }
    }
    let chunk: Vec<Value> = items
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .collect();
    let mut r = Json(wrap(chunk, total)).into_response();
    if !links.is_empty() {
        if let Ok(v) = links.join(", ").parse() {
            r.headers_mut().insert("link", v);
        }
    }
    r
}

/// A bare JSON array page.
fn array(items: Vec<Value>, _total: usize) -> Value {
    Value::Array(items)
}

async fn list_installations(call: Call, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let uri = call.uri.clone();
    let f = call.app()?;
    let m = f.model.lock();
    let list: Vec<Value> = m
        .installations
        .values()
        .map(|i| json!({ "id": i.id, "account": { "login": i.account }, "permissions": i.permissions }))
        .collect();
    Ok(paginate(&f, &uri, &q, list, array))
}

/// `GET /app` (App JWT): the App itself (`integration`), its slug the bot login's.
async fn get_app(call: Call) -> ApiResult {
    let f = call.app()?;
    let slug = BOT_LOGIN.trim_end_matches("[bot]");
    Ok(Json(json!({
        "id": f.app_id, "slug": slug, "node_id": format!("A_{}", f.app_id),
        "client_id": format!("Iv1.{}", f.app_id),
        "owner": user_json("acme"), "name": "Agent Orchestrator",
        "description": "Plans, codes, tests and reviews labelled issues.",
        "external_url": "https://example.com/agent-orchestrator",
        "html_url": format!("https://github.com/apps/{slug}"),
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        "permissions": { "issues": "write", "contents": "write", "pull_requests": "write",
                         "checks": "read", "metadata": "read" },
        "events": ["issues", "issue_comment", "pull_request_review", "pull_request_review_comment"],
    }))
    .into_response())
}

/// `GET /app/installations/{id}` (App JWT): the installation with the permissions its
/// owner granted the App, as GitHub shows them (`{"contents": "write", …}`).
async fn get_installation(call: Call, Path(id): Path<u64>) -> ApiResult {
    let f = call.app()?;
    let m = f.model.lock();
    let Some(i) = m.installations.get(&id) else {
        return Err(err(StatusCode::NOT_FOUND, "Not Found"));
    };
    Ok(Json(json!({
        "id": i.id, "account": { "login": i.account, "type": "Organization" },
        "app_id": f.app_id, "target_type": "Organization",
        "repository_selection": "selected", "permissions": i.permissions,
        "events": ["issues", "issue_comment", "pull_request_review", "pull_request_review_comment"],
    }))
    .into_response())
}

/// `POST /app/installations/{id}/access_tokens`: a token limited to the repositories and
/// permissions asked, refused (422, as GitHub does) when either is more than the
/// installation has.
async fn access_token(call: Call, Path(id): Path<u64>, body: Bytes) -> ApiResult {
    let f = call.app()?;
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?
    };
    let mut m = f.model.lock();
    m.token_requests.push(TokenRequest {
        installation: id,
        body: body.clone(),
    });
    let Some(inst) = m.installations.get(&id).cloned() else {
        return Err(err(StatusCode::NOT_FOUND, "Not Found"));
    };
    let repositories = match body.get("repositories") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => {
            let names: Vec<String> = a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            for n in &names {
                if !inst
                    .repos
                    .iter()
                    .any(|r| r.split_once('/').map(|(_, x)| x) == Some(n.as_str()))
                {
                    return Err(err(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("There is at least one repository that does not exist or is not accessible to the parent installation: {n}"),
                    ));
                }
            }
            Some(names)
        }
        Some(_) => {
            return Err(err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "repositories must be an array",
            ))
        }
    };
    let mut permissions = inst.permissions.clone();
    if let Some(asked) = body.get("permissions").and_then(Value::as_object) {
        permissions = BTreeMap::new();
        for (k, v) in asked {
            let v = v.as_str().unwrap_or("");
            let have = inst.permissions.get(k).and_then(|p| perm(p));
            if perm(v).is_none() || have.is_none_or(|h| Some(h) < perm(v)) {
                return Err(err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "The permissions requested are not granted to this installation: {k}={v}"
                    ),
                ));
            }
            permissions.insert(k.clone(), v.to_string());
        }
    }
    let token = format!("ghs_{}", uuid::Uuid::new_v4().simple());
    let ttl = m.token_ttl.unwrap_or(Duration::from_secs(3600));
    m.tokens.insert(
        token.clone(),
        Token {
            installation: id,
            repositories: repositories.clone(),
            permissions: permissions.clone(),
            expires: std::time::Instant::now() + ttl,
        },
    );
    let expires = time::OffsetDateTime::now_utc() + ttl;
    let expires = expires
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(json!({ "token": token, "expires_at": expires, "permissions": permissions,
                     "repository_selection": if repositories.is_some() { "selected" } else { "all" } })),
    )
        .into_response())
}

async fn list_deliveries(call: Call, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let uri = call.uri.clone();
    let f = call.app()?;
    let m = f.model.lock();
    let list: Vec<Value> = m
        .deliveries
        .iter()
        .rev()
        .map(|d| {
            json!({ "id": d.id, "guid": d.guid, "event": d.event, "action": d.action,
                    "status_code": d.status_code, "redelivery": d.redelivery,
                    "status": if (200..300).contains(&d.status_code) { "OK" } else { "failed" },
                    "delivered_at": "2026-01-01T00:00:00Z", "duration": 0.1,
                    "installation_id": d.payload["installation"]["id"],
                    "repository_id": 1 })
        })
        .collect();
    Ok(paginate_as(&f, &uri, &q, list, array, Pages::Cursor))
}

async fn redeliver(call: Call, Path(id): Path<u64>) -> ApiResult {
    let f = call.app()?;
    let d = f
        .model
        .lock()
        .deliveries
        .iter()
        .find(|d| d.id == id)
        .cloned()
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "Not Found"))?;
    let fake = f.clone();
    // GitHub answers at once and delivers in the background.
    tokio::spawn(async move {
        deliver(&fake, &d.event, &d.guid, d.payload, true).await;
    });
    Ok((StatusCode::ACCEPTED, Json(json!({}))).into_response())
}

async fn installation_repositories(
    call: Call,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let uri = call.uri.clone();
    let (f, headers) = call.recorded();
    let token =
        bearer(&headers).ok_or_else(|| err(StatusCode::UNAUTHORIZED, "Requires authentication"))?;
    let m = f.model.lock();
    let t = m
        .tokens
        .get(&token)
        .filter(|t| t.expires > std::time::Instant::now())
        .ok_or_else(|| err(StatusCode::UNAUTHORIZED, "Bad credentials"))?;
    let inst = &m.installations[&t.installation];
    let repos: Vec<Value> = inst
        .repos
        .iter()
        .filter(|full| {
            t.repositories.as_ref().is_none_or(|only| {
                only.iter()
                    .any(|n| full.split_once('/').map(|(_, x)| x) == Some(n.as_str()))
            })
        })
        .filter_map(|full| m.repos.get(full))
        .map(|r| f.repo_json(r))
        .collect();
    Ok(paginate(
        &f,
        &uri,
        &q,
        repos,
        |page, total| json!({ "total_count": total, "repositories": page }),
    ))
}

async fn permission(call: Call, Path((o, r, u)): Path<(String, String, String)>) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "metadata", Perm::Read)?;
    let m = f.model.lock();
    let role = m
        .repos
        .get(&repo)
        .and_then(|r| r.collaborators.get(&u))
        .cloned();
    let Some(role) = role else {
        return Err(err(StatusCode::NOT_FOUND, format!("{u} is not a user")));
    };
    let permission = match role.as_str() {
        "admin" => "admin",
        "maintain" | "write" => "write",
        "triage" | "read" => "read",
        _ => "none",
    };
    Ok(Json(json!({ "permission": permission, "role_name": role,
                    "user": user_json(&u) }))
    .into_response())
}

async fn list_issues(
    call: Call,
    Path((o, r)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let uri = call.uri.clone();
    let (f, repo) = call.repo(&o, &r, "issues", Perm::Read)?;
    let m = f.model.lock();
    let state = q.get("state").cloned().unwrap_or_else(|| "open".into());
    let want: Vec<String> = q
        .get("labels")
        .map(|l| l.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let list: Vec<Value> = m.repos[&repo]
        .issues
        .values()
        .filter(|i| state == "all" || i.state == state)
        .filter(|i| want.iter().all(|w| i.labels.contains(w)))
        .map(|i| f.issue_json(&repo, i))
        .collect();
    Ok(paginate(&f, &uri, &q, list, array))
}

async fn issue_events(
    call: Call,
    Path((o, r, n)): Path<(String, String, u64)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let uri = call.uri.clone();
    let (f, repo) = call.repo(&o, &r, "issues", Perm::Read)?;
    let m = f.model.lock();
    let i = m
        .issue(&repo, n)
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "Not Found"))?;
    Ok(paginate(&f, &uri, &q, i.events.clone(), array))
}

fn body_field(body: &Bytes) -> Result<Value, (StatusCode, Json<Value>)> {
    serde_json::from_slice(body).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("Problems parsing JSON: {e}"),
        )
    })
}

/// The `body` a comment request must carry.
fn comment_body(body: &Bytes) -> Result<String, (StatusCode, Json<Value>)> {
    let v = body_field(body)?;
    v["body"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| err(StatusCode::UNPROCESSABLE_ENTITY, "body is missing"))
}

/// Issue `n` of `repo`, to change it; 404 when there is none.
fn issue_mut<'a>(
    m: &'a mut Model,
    repo: &str,
    n: u64,
) -> Result<&'a mut Issue, (StatusCode, Json<Value>)> {
    m.repos
        .get_mut(repo)
        .and_then(|x| x.issues.get_mut(&n))
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "Not Found"))
}

/// An issue's labels, as the label routes answer them.
fn labels_json(issue: &Issue) -> Response {
    let out: Vec<Value> = issue.labels.iter().map(|l| json!({ "name": l })).collect();
    Json(Value::Array(out)).into_response()
}

async fn create_comment(
    call: Call,
    Path((o, r, n)): Path<(String, String, u64)>,
    body: Bytes,
) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "issues", Perm::Write)?;
    let text = comment_body(&body)?;
    let mut m = f.model.lock();
    let known = m
        .repos
        .get(&repo)
        .is_some_and(|x| x.issues.contains_key(&n) || x.pulls.contains_key(&n));
    if !known {
        return Err(err(StatusCode::NOT_FOUND, "Not Found"));
    }
    if m.issue(&repo, n).is_some_and(|i| i.locked) {
        return Err(err(
            StatusCode::FORBIDDEN,
            "Unable to create comment because issue is locked.",
        ));
    }
    let id = m.id();
    let comment = Comment {
        id,
        repo: repo.clone(),
        issue: n,
        user: BOT_LOGIN.into(),
        body: text,
        edits: 0,
    };
    let answer = comment_json(&f.base_url, &comment);
    m.comments.insert(id, comment);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// A `simple-user` of a login: a `Bot` when it is an App's (`<slug>[bot]`).
/// Every field of the description's `simple-user` is given (octocrab's `Author` model
/// requires them), with an id derived from the login.
pub fn user_json(login: &str) -> Value {
    let kind = if login.ends_with("[bot]") {
        "Bot"
    } else {
        "User"
    };
    let id = login
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        % 1_000_000_000;
    // As GitHub writes a bot's URLs: `agent-orchestrator%5Bbot%5D`.
    let path = login.replace('[', "%5B").replace(']', "%5D");
    let api = format!("https://api.github.com/users/{path}");
    json!({
        "login": login, "id": id, "node_id": format!("U_{id}"), "type": kind,
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}"),
        "gravatar_id": "", "url": api, "html_url": format!("https://github.com/{path}"),
        "followers_url": format!("{api}/followers"),
        "following_url": format!("{api}/following{{/other_user}}"),
        "gists_url": format!("{api}/gists{{/gist_id}}"),
        "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{api}/subscriptions"),
        "organizations_url": format!("{api}/orgs"),
        "repos_url": format!("{api}/repos"),
        "events_url": format!("{api}/events{{/privacy}}"),
        "received_events_url": format!("{api}/received_events"),
        "site_admin": false,
    })
}

/// An `issue-comment` of the description, every required field given.
fn comment_json(base_url: &str, c: &Comment) -> Value {
    let at = "2026-01-01T00:00:00Z";
    json!({
        "id": c.id, "node_id": format!("IC_{}", c.id), "body": c.body,
        "url": format!("{base_url}/repos/{}/issues/comments/{}", c.repo, c.id),
        "html_url": format!("{base_url}/{}/issues/{}#issuecomment-{}", c.repo, c.issue, c.id),
        "issue_url": format!("{base_url}/repos/{}/issues/{}", c.repo, c.issue),
        "user": user_json(&c.user), "created_at": at, "updated_at": at,
        "author_association": "NONE",
    })
}

/// `GET /repos/{owner}/{repo}/pulls/{pull_number}/reviews`, oldest first, paged.
async fn list_reviews(
    call: Call,
    Path((o, r, n)): Path<(String, String, u64)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let uri = call.uri.clone();
    let (f, repo) = call.repo(&o, &r, "pull_requests", Perm::Read)?;
    let m = f.model.lock();
    let list: Vec<Value> = m
        .reviews
        .iter()
        .filter(|x| x.repo == repo && x.pull == n)
        .map(|x| {
            let state = if x.event == "COMMENT" { "COMMENTED" } else { &x.event };
            json!({ "id": x.id, "node_id": format!("PRR_{}", x.id), "body": x.body,
                    "state": state, "user": m.user_shapes.get(&x.user).cloned().unwrap_or_else(|| user_json(&x.user)),
                    "html_url": format!("https://github.com/{repo}/pull/{n}#pullrequestreview-{}", x.id),
                    "pull_request_url": format!("https://api.github.com/repos/{repo}/pulls/{n}"),
                    "author_association": "NONE", "commit_id": null,
                    "_links": { "html": { "href": format!("https://github.com/{repo}/pull/{n}") },
                                "pull_request": { "href": format!("https://api.github.com/repos/{repo}/pulls/{n}") } } })
        })
        .collect();
    Ok(paginate(&f, &uri, &q, list, array))
}

async fn list_comments(
    call: Call,
    Path((o, r, n)): Path<(String, String, u64)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let uri = call.uri.clone();
    let (f, repo) = call.repo(&o, &r, "issues", Perm::Read)?;
    let m = f.model.lock();
    let list: Vec<Value> = m
        .comments_on(&repo, n)
        .iter()
        .map(|c| {
            let mut v = comment_json(&f.base_url, c);
            if let Some(u) = m.user_shapes.get(&c.user) {
                v["user"] = u.clone();
            }
            v
        })
        .collect();
    Ok(paginate(&f, &uri, &q, list, array))
}

async fn edit_comment(
    call: Call,
    Path((o, r, id)): Path<(String, String, u64)>,
    body: Bytes,
) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "issues", Perm::Write)?;
    let text = comment_body(&body)?;
    let mut m = f.model.lock();
    let c = m
        .comments
        .get_mut(&id)
        .filter(|c| c.repo == repo)
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "Not Found"))?;
    if c.user != BOT_LOGIN {
        return Err(err(
            StatusCode::FORBIDDEN,
            "an App may edit only its own comments",
        ));
    }
    c.body = text;
    c.edits += 1;
    let answer = comment_json(&f.base_url, c);
    Ok(Json(answer).into_response())
}

async fn add_labels(
    call: Call,
    Path((o, r, n)): Path<(String, String, u64)>,
    body: Bytes,
) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "issues", Perm::Write)?;
    let v = body_field(&body)?;
    let labels: Vec<String> = v["labels"]
        .as_array()
        .ok_or_else(|| err(StatusCode::UNPROCESSABLE_ENTITY, "labels must be an array"))?
        .iter()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect();
    let mut m = f.model.lock();
    let issue = issue_mut(&mut m, &repo, n)?;
    for l in labels {
        if !issue.labels.contains(&l) {
            issue.labels.push(l.clone());
            issue
                .events
                .push(json!({ "event": "labeled", "label": { "name": l },
                                      "actor": { "login": BOT_LOGIN, "type": "Bot" } }));
        }
    }
    Ok(labels_json(issue))
}

async fn remove_label(
    call: Call,
    Path((o, r, n, name)): Path<(String, String, u64, String)>,
) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "issues", Perm::Write)?;
    let mut m = f.model.lock();
    let issue = issue_mut(&mut m, &repo, n)?;
    if !issue.labels.contains(&name) {
        return Err(err(StatusCode::NOT_FOUND, "Label does not exist"));
    }
    issue.labels.retain(|l| *l != name);
    Ok(labels_json(issue))
}

fn branch_exists(f: &Fake, repo: &str, branch: &str) -> bool {
    std::process::Command::new("git")
        .arg("--git-dir")
        .arg(f.git_root.join(format!("{repo}.git")))
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("refs/heads/{branch}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

async fn create_pull(call: Call, Path((o, r)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "pull_requests", Perm::Write)?;
    let v = body_field(&body)?;
    let (Some(head), Some(base), Some(title)) =
        (v["head"].as_str(), v["base"].as_str(), v["title"].as_str())
    else {
        return Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "head, base and title are required",
        ));
    };
    let head = head
        .split_once(':')
        .map(|(_, b)| b)
        .unwrap_or(head)
        .to_string();
    if !branch_exists(&f, &repo, &head) || !branch_exists(&f, &repo, base) {
        return Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Validation Failed: head or base does not exist",
        ));
    }
    let mut m = f.model.lock();
    let x = m
        .repos
        .get_mut(&repo)
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "Not Found"))?;
    if x.pulls
        .values()
        .any(|p| p.head == head && p.state == "open")
    {
        return Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("A pull request already exists for {o}:{head}."),
        ));
    }
    let n = x.next_number;
    x.next_number += 1;
    let p = Pull {
        number: n,
        node_id: format!("PR_{n}"),
        head,
        base: base.into(),
        title: title.into(),
        body: v["body"].as_str().unwrap_or("").into(),
        draft: v["draft"].as_bool().unwrap_or(false),
        state: "open".into(),
        merged: false,
        user: BOT_LOGIN.into(),
    };
    x.pulls.insert(n, p.clone());
    Ok((StatusCode::CREATED, Json(f.pull_json(&repo, &p))).into_response())
}

async fn list_pulls(
    call: Call,
    Path((o, r)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let uri = call.uri.clone();
    let (f, repo) = call.repo(&o, &r, "pull_requests", Perm::Read)?;
    let m = f.model.lock();
    let state = q.get("state").cloned().unwrap_or_else(|| "open".into());
    let head = q.get("head").map(|h| {
        h.split_once(':')
            .map(|(_, b)| b.to_string())
            .unwrap_or(h.clone())
    });
    let list: Vec<Value> = m.repos[&repo]
        .pulls
        .values()
        .filter(|p| state == "all" || p.state == state)
        .filter(|p| head.as_ref().is_none_or(|h| *h == p.head))
        .map(|p| f.pull_json(&repo, p))
        .collect();
    Ok(paginate(&f, &uri, &q, list, array))
}

async fn get_pull(call: Call, Path((o, r, n)): Path<(String, String, u64)>) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "pull_requests", Perm::Read)?;
    let m = f.model.lock();
    let p = m.repos[&repo]
        .pulls
        .get(&n)
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "Not Found"))?;
    Ok(Json(f.pull_json(&repo, p)).into_response())
}

async fn update_pull(
    call: Call,
    Path((o, r, n)): Path<(String, String, u64)>,
    body: Bytes,
) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "pull_requests", Perm::Write)?;
    let v = body_field(&body)?;
    let mut m = f.model.lock();
    let p = m
        .repos
        .get_mut(&repo)
        .and_then(|x| x.pulls.get_mut(&n))
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "Not Found"))?;
    if let Some(text) = v.get("body") {
        p.body = text.as_str().unwrap_or_default().to_string();
    }
    if let Some(title) = v["title"].as_str() {
        p.title = title.to_string();
    }
    let p = p.clone();
    drop(m);
    Ok(Json(f.pull_json(&repo, &p)).into_response())
}

async fn create_review(
    call: Call,
    Path((o, r, n)): Path<(String, String, u64)>,
    body: Bytes,
) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "pull_requests", Perm::Write)?;
    let v = body_field(&body)?;
    // The request as GitHub's REST description has it.
    let schema = create_review_schema();
    let validator = jsonschema::options()
        .build(&schema)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(e) = validator.iter_errors(&v).next() {
        return Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("Invalid request: {e} at {}", e.instance_path()),
        ));
    }
    let event = v["event"].as_str().unwrap_or("COMMENT").to_string();
    let pull = f.model.lock().repos[&repo].pulls.get(&n).cloned();
    let Some(pull) = pull else {
        return Err(err(StatusCode::NOT_FOUND, "Not Found"));
    };
    let mut comments = Vec::new();
    if let Some(list) = v["comments"].as_array().filter(|l| !l.is_empty()) {
        // As GitHub does: a line comment must be on a line the pull request's diff shows.
        let shown = right_lines(&f.pull_diff(&repo, &pull.base, &pull.head));
        for c in list {
            let path = c["path"].as_str().unwrap_or_default().to_string();
            let side = c["side"].as_str().unwrap_or("RIGHT").to_string();
            let Some(line) = c["line"].as_u64() else {
                return Err(err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Unprocessable Entity: this fake takes line comments by `line` only",
                ));
            };
            if side != "RIGHT" || !shown.get(&path).is_some_and(|l| l.contains(&line)) {
                return Err(err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "Unprocessable Entity: pull_request_review_thread.line must be part of \
                         the diff ({path}:{line}, {side})"
                    ),
                ));
            }
            comments.push(ReviewComment {
                path,
                line,
                side,
                body: c["body"].as_str().unwrap_or_default().to_string(),
            });
        }
    }
    let mut m = f.model.lock();
    let id = m.id();
    m.reviews.push(Review {
        id,
        repo,
        pull: n,
        user: BOT_LOGIN.into(),
        body: v["body"].as_str().unwrap_or("").into(),
        event: event.clone(),
        comments,
    });
    Ok(
        Json(json!({ "id": id, "state": if event == "COMMENT" { "COMMENTED" } else { &event } }))
            .into_response(),
    )
}

/// The commit a ref (a branch or a sha) of a repository names, if any.
fn resolve(f: &Fake, repo: &str, git_ref: &str) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(f.git_root.join(format!("{repo}.git")))
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("{git_ref}^{{commit}}"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn check_run_json(run: &CheckRun) -> Value {
    json!({
        "id": run.id, "node_id": format!("CR_{}", run.id), "name": run.name,
        "head_sha": run.head_sha, "status": run.status, "conclusion": run.conclusion,
        "output": { "title": run.output_title, "summary": run.output_summary, "text": null },
        "check_suite": { "id": run.id * 10, "head_branch": run.head_branch, "head_sha": run.head_sha },
        "pull_requests": [],
    })
}

/// `GET /repos/{owner}/{repo}/commits/{ref}/check-runs` (permission `checks: read`).
async fn list_check_runs(
    call: Call,
    Path((o, r, git_ref)): Path<(String, String, String)>,
) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "checks", Perm::Read)?;
    let Some(sha) = resolve(&f, &repo, &git_ref) else {
        return Err(err(StatusCode::NOT_FOUND, "No commit found for SHA"));
    };
    let m = f.model.lock();
    let runs: Vec<Value> = m
        .check_runs
        .iter()
        .filter(|c| c.repo == repo && c.head_sha == sha)
        .map(check_run_json)
        .collect();
    Ok(Json(json!({ "total_count": runs.len(), "check_runs": runs })).into_response())
}

/// `GET /repos/{owner}/{repo}/commits/{ref}/status` (permission `statuses: read`): the
/// newest status of each context on the commit, and the combined state as GitHub
/// documents it: `failure` if any is `error` or `failure`, `pending` if there are none or
/// any is `pending`, else `success`.
async fn combined_status(
    call: Call,
    Path((o, r, git_ref)): Path<(String, String, String)>,
) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "statuses", Perm::Read)?;
    let Some(sha) = resolve(&f, &repo, &git_ref) else {
        return Err(err(StatusCode::NOT_FOUND, "No commit found for SHA"));
    };
    let m = f.model.lock();
    let mut latest: Vec<&CommitStatus> = Vec::new();
    for s in m
        .statuses
        .iter()
        .rev()
        .filter(|s| s.repo == repo && s.sha == sha)
    {
        if !latest.iter().any(|l| l.context == s.context) {
            latest.push(s);
        }
    }
    let states: Vec<&str> = latest.iter().map(|s| s.state.as_str()).collect();
    let state = if states.iter().any(|s| *s == "failure" || *s == "error") {
        "failure"
    } else if states.is_empty() || states.contains(&"pending") {
        "pending"
    } else {
        "success"
    };
    let url = format!("{}/repos/{repo}/commits/{sha}/status", f.base_url);
    let statuses: Vec<Value> = latest
        .iter()
        .map(|s| {
            json!({ "id": s.id, "node_id": format!("SC_{}", s.id), "context": s.context,
                    "state": s.state, "description": s.description, "target_url": null,
                    "avatar_url": null, "url": url,
                    "created_at": "2026-11-30T00:00:00Z", "updated_at": "2026-11-30T00:00:00Z" })
        })
        .collect();
    Ok(Json(
        json!({ "state": state, "sha": sha, "total_count": statuses.len(),
                    "statuses": statuses, "commit_url": url, "url": url }),
    )
    .into_response())
}

/// `GET /repos/{owner}/{repo}/pulls/{pull_number}/files`: each changed file with its
/// `patch` (the hunks of `git diff base...head`), one page.
async fn pull_files(call: Call, Path((o, r, n)): Path<(String, String, u64)>) -> ApiResult {
    let (f, repo) = call.repo(&o, &r, "pull_requests", Perm::Read)?;
    let pull = f.model.lock().repos[&repo].pulls.get(&n).cloned();
    let Some(pull) = pull else {
        return Err(err(StatusCode::NOT_FOUND, "Not Found"));
    };
    let diff = f.pull_diff(&repo, &pull.base, &pull.head);
    let mut files = Vec::new();
    for part in diff.split("diff --git ").skip(1) {
        let name = part
            .lines()
            .find_map(|l| {
                l.strip_prefix("+++ b/")
                    .or_else(|| l.strip_prefix("--- a/"))
            })
            .unwrap_or_default();
        let patch = part
            .find("\n@@")
            .map(|at| part[at + 1..].trim_end_matches('\n'));
        files.push(json!({ "filename": name, "status": "modified", "patch": patch }));
    }
    Ok(Json(Value::Array(files)).into_response())
}

async fn contents(
    call: Call,
    Path((o, r, path)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    use base64::Engine;
    let (f, repo) = call.repo(&o, &r, "contents", Perm::Read)?;
    let reference = q.get("ref").cloned().unwrap_or_else(|| "main".into());
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(f.git_root.join(format!("{repo}.git")))
        .arg("show")
        .arg(format!("{reference}:{path}"))
        .output()
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !out.status.success() {
        return Err(err(StatusCode::NOT_FOUND, "Not Found"));
    }
    let content = base64::engine::general_purpose::STANDARD.encode(&out.stdout);
    Ok(Json(
        json!({ "type": "file", "encoding": "base64", "path": path, "content": content,
                    "size": out.stdout.len() }),
    )
    .into_response())
}

async fn graphql(call: Call, body: Bytes) -> ApiResult {
    let (f, headers) = call.recorded();
    let v = body_field(&body)?;
    let query = v["query"].as_str().unwrap_or("");
    if !query.contains("markPullRequestReadyForReview") {
        return Ok(Json(json!({ "errors": [{ "message": "the fake knows only markPullRequestReadyForReview" }] })).into_response());
    }
    let node = v["variables"]["id"].as_str().unwrap_or("").to_string();
    let repo = {
        let m = f.model.lock();
        m.repos
            .values()
            .find(|r| r.pulls.values().any(|p| p.node_id == node))
            .map(|r| r.full_name.clone())
    };
    let Some(repo) = repo else {
        return Ok(Json(json!({ "errors": [{ "message": format!("Could not resolve to a node with the global id of '{node}'") }] })).into_response());
    };
    f.auth(&headers, &repo, "pull_requests", Perm::Write)?;
    let mut m = f.model.lock();
    if let Some(p) = m
        .repos
        .get_mut(&repo)
        .and_then(|r| r.pulls.values_mut().find(|p| p.node_id == node))
    {
        p.draft = false;
    }
    Ok(Json(json!({ "data": { "markPullRequestReadyForReview": { "pullRequest": { "isDraft": false } } } })).into_response())
}

/// The webhook secret the GitHub tests use.
pub const WEBHOOK_SECRET: &str = "test-webhook-secret-42";

impl FakeGithub {
    /// Settings that point a coordinator or worker at this fake as its GitHub App.
    pub fn settings(&self) -> Vec<(String, String)> {
        [
            (
                "AO__GITHUB__WEBHOOK_SECRET",
                "env:AO_TEST_WEBHOOK_SECRET".to_string(),
            ),
            ("AO_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET.to_string()),
            ("AO__GITHUB__API_URL", self.url.clone()),
            ("AO__GITHUB__GIT_URL", self.url.clone()),
            ("AO__GITHUB__APP_ID", self.app_id.to_string()),
            (
                "AO__GITHUB__PRIVATE_KEY",
                format!("file:{}", self.private_key_path.display()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A cluster whose coordinator is this App's, with `pipeline` for the plain trigger
    /// label (`None`: the coordinator's default), no periodic reconcile, and `extra`
    /// settings; this fake's webhooks go to it.
    pub fn cluster(&self, pipeline: Option<&str>, extra: &[(&str, &str)]) -> crate::Cluster {
        let mut env = self.settings();
        if let Some(p) = pipeline {
            env.push(("AO__GITHUB__DEFAULT_PIPELINE".into(), p.into()));
        }
        env.push(("AO__GITHUB__RECONCILE_SECS".into(), "0".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let c = crate::Cluster::new(&refs);
        self.set_webhook(&c.url("/webhooks/github"), WEBHOOK_SECRET);
        c
    }

    /// Polls the model until `check` holds, or fails with the model after `limit`.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&Model) -> bool,
    ) -> Result<Model> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let m = self.model();
            if check(&m) {
                return Ok(m);
            }
            if std::time::Instant::now() > deadline {
                bail!("fake GitHub: {what} did not happen within {limit:?}; model: {m:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
