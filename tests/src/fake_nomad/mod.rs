//! A stateful fake of Nomad's HTTP API, for the tests of the `nomad` sandbox driver.
//!
//! It keeps jobs, evaluations, allocations and variables with Raft-like indexes per table,
//! answers blocking queries as Nomad does (`index` + `wait`, `X-Nomad-Index`), and really
//! runs dispatched jobs: the dispatched job's task (docker `command`/`args`, `env`,
//! `template`s, `dispatch_payload`, tmpfs `mount`s, `user`) is run under bubblewrap on
//! this machine, with the task's `local/`, `secrets/` and the allocation's `alloc/`
//! mounted where Docker mounts them, the host read-only, stdout and stderr captured as the
//! task's logs. Allocation and task states move as Nomad's do (pending → running →
//! complete/failed, with task events). Capacity is a number of slots: when they are all
//! taken, the evaluation completes with `FailedTGAllocs` and a blocked evaluation that is
//! placed when a slot frees.
//!
//! Every request is checked against Nomad's OpenAPI description ([`openapi`]); an invalid
//! one is answered 400 with the reasons and recorded in [`FakeNomad::violations`], as is
//! any answer of the fake that does not match the spec's response schema.

mod exec;
pub mod identity;
pub mod jobspec;
pub mod openapi;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use openapi::{percent_decode, OpenApi};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Nomad's limit on a dispatch payload.
pub const PAYLOAD_LIMIT: usize = 16 * 1024;
/// Longest blocking query Nomad allows.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Wait of a blocking query without `wait`.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// What a docker image provides inside the fake's sandbox: host files bound at paths, and
/// the image's PATH.
#[derive(Clone, Debug, Default)]
pub struct Image {
    pub binds: Vec<(PathBuf, PathBuf)>,
    pub path: String,
}

/// The fake's settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Allocations that may run at once.
    pub slots: usize,
    /// The ACL token every request must carry, when set.
    pub token: Option<String>,
    /// Docker images by name.
    pub images: HashMap<String, Image>,
    /// Host paths shown in every sandbox at the same path (`true`: writable), like host
    /// volumes of the node (the tests' local git remotes, the scripted agent).
    pub volumes: Vec<(PathBuf, bool)>,
    /// Longest kill timeout honoured when stopping a task.
    pub kill_timeout_cap: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            slots: 4,
            token: None,
            images: HashMap::new(),
            volumes: Vec::new(),
            kill_timeout_cap: Duration::from_secs(5),
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Decoded path, `/v1/...`.
    pub path: String,
    pub query: Vec<(String, String)>,
    /// The spec's operation id.
    pub operation: String,
    /// Whether `X-Nomad-Token` was sent.
    pub token: bool,
}

/// A dispatch the fake accepted.
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub parent: String,
    pub job: String,
    pub token: String,
    pub meta: BTreeMap<String, String>,
    pub payload: Vec<u8>,
    /// Whether an existing job was returned for the idempotency token.
    pub existing: bool,
}

pub(crate) enum Kill {
    Stop,
    Lost,
}

pub(crate) struct Alloc {
    pub value: Value,
    pub kill: Option<oneshot::Sender<Kill>>,
    pub dir: PathBuf,
    pub pid: Option<i32>,
}

#[derive(Default)]
pub(crate) struct Inner {
    index: u64,
    tables: HashMap<&'static str, u64>,
    pub jobs: BTreeMap<String, Value>,
    pub evals: BTreeMap<String, Value>,
    pub allocs: BTreeMap<String, Alloc>,
    blocked: VecDeque<String>,
    slots: usize,
    requests: Vec<Request>,
    /// Every request body, as received.
    bodies: Vec<Vec<u8>>,
    violations: Vec<String>,
    purged: Vec<String>,
    dispatches: Vec<Dispatch>,
    pub vars: BTreeMap<String, Value>,
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Inner {
    /// Marks a table changed; returns the new index.
    pub fn touch(&mut self, table: &'static str) -> u64 {
        self.index += 1;
        self.tables.insert(table, self.index);
        self.index
    }

    fn table(&self, table: &str) -> u64 {
        self.tables.get(table).copied().unwrap_or(1).max(1)
    }

    fn used(&self) -> usize {
        self.allocs
            .values()
            .filter(|a| {
                matches!(
                    a.value["ClientStatus"].as_str(),
                    Some("pending" | "running")
                )
            })
            .count()
    }

    fn new_eval(&mut self, job: &Value, triggered_by: &str, status: &str) -> String {
        let id = uuid();
        let idx = self.touch("evals");
        self.evals.insert(
            id.clone(),
            json!({
                "ID": id, "Namespace": job["Namespace"], "Priority": 50, "Type": job["Type"],
                "TriggeredBy": triggered_by, "JobID": job["ID"],
                "JobModifyIndex": job["ModifyIndex"], "Status": status, "StatusDescription": "",
                "CreateIndex": idx, "ModifyIndex": idx, "CreateTime": now_ns(), "ModifyTime": now_ns(),
            }),
        );
        id
    }

    fn set_eval(&mut self, id: &str, f: impl FnOnce(&mut Value)) {
        let idx = self.touch("evals");
        if let Some(e) = self.evals.get_mut(id) {
            f(e);
            e["ModifyIndex"] = json!(idx);
            e["ModifyTime"] = json!(now_ns());
        }
    }

    fn new_alloc(&mut self, root: &std::path::Path, job: &Value, eval: &str) -> String {
        let id = uuid();
        let idx = self.touch("allocs");
        let group = job["TaskGroups"][0]["Name"]
            .as_str()
            .unwrap_or("group")
            .to_string();
        let value = json!({
            "ID": id, "EvalID": eval, "Name": format!("{}.{group}[0]", job["ID"].as_str().unwrap_or("")),
            "Namespace": job["Namespace"], "NodeID": "5b4f6b7a-0000-4000-8000-000000000001",
            "NodeName": "fake-node", "JobID": job["ID"], "Job": job, "TaskGroup": group,
            "DesiredStatus": "run", "DesiredDescription": "", "ClientStatus": "pending",
            "ClientDescription": "No tasks have started", "TaskStates": {},
            "CreateIndex": idx, "ModifyIndex": idx, "AllocModifyIndex": idx,
            "CreateTime": now_ns(), "ModifyTime": now_ns(),
        });
        self.allocs.insert(
            id.clone(),
            Alloc {
                value,
                kill: None,
                dir: root.join(&id),
                pid: None,
            },
        );
        id
    }

    /// Places the evaluation's job, or blocks it for want of capacity. Returns the
    /// allocation to start.
    fn schedule(&mut self, root: &std::path::Path, eval_id: &str) -> Option<String> {
        let job_id = self.evals.get(eval_id)?["JobID"].as_str()?.to_string();
        let job = match self.jobs.get(&job_id) {
            Some(j) if j["Stop"] != json!(true) => j.clone(),
            _ => {
                self.set_eval(eval_id, |e| e["Status"] = json!("complete"));
                return None;
            }
        };
        let group = job["TaskGroups"][0]["Name"]
            .as_str()
            .unwrap_or("group")
            .to_string();
        if self.used() < self.slots {
            let alloc = self.new_alloc(root, &job, eval_id);
            self.set_eval(eval_id, |e| e["Status"] = json!("complete"));
            return Some(alloc);
        }
        let blocked = self.new_eval(&job, "queued-allocs", "blocked");
        self.set_eval(&blocked, |e| e["PreviousEval"] = json!(eval_id));
        let metric = json!({
            "NodesEvaluated": 1, "NodesFiltered": 0, "NodesAvailable": {"dc1": 1},
            "NodesExhausted": 1, "DimensionExhausted": {"cpu": 1}, "CoalescedFailures": 0,
            "AllocationTime": 1000,
        });
        self.set_eval(eval_id, |e| {
            e["Status"] = json!("complete");
            e["BlockedEval"] = json!(blocked);
            e["FailedTGAllocs"] = json!({ group.clone(): metric });
            e["QueuedAllocations"] = json!({ group: 1 });
        });
        self.blocked.push_back(blocked);
        None
    }

    /// Places blocked evaluations while slots are free.
    pub fn unblock(&mut self, root: &std::path::Path) -> Vec<String> {
        let mut started = Vec::new();
        while self.used() < self.slots {
            let Some(eval) = self.blocked.pop_front() else {
                break;
            };
            let job_id = self.evals[&eval]["JobID"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match self.jobs.get(&job_id) {
                Some(j) if j["Stop"] != json!(true) => {
                    let job = j.clone();
                    let alloc = self.new_alloc(root, &job, &eval);
                    self.set_eval(&eval, |e| e["Status"] = json!("complete"));
                    started.push(alloc);
                }
                _ => self.set_eval(&eval, |e| e["Status"] = json!("canceled")),
            }
        }
        started
    }

    /// Changes an allocation (its indexes follow).
    pub fn set_alloc(&mut self, id: &str, f: impl FnOnce(&mut Value)) {
        let idx = self.touch("allocs");
        if let Some(a) = self.allocs.get_mut(id) {
            f(&mut a.value);
            a.value["ModifyIndex"] = json!(idx);
            a.value["ModifyTime"] = json!(now_ns());
        }
    }
}

pub(crate) struct State {
    pub inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    api: OpenApi,
    pub opts: Options,
    pub root: PathBuf,
    /// Signs the tasks' workload identities.
    pub keyring: identity::Keyring,
    /// Reads of `/.well-known/jwks.json`.
    pub jwks_reads: std::sync::atomic::AtomicU64,
}

impl State {
    /// Sets a variable (as `nomad var put` would).
    fn put_var(&self, path: &str, items: Value) {
        let mut inner = self.inner.lock();
        let idx = inner.touch("vars");
        inner.vars.insert(
            path.to_string(),
            json!({ "Namespace": "default", "Path": path, "Items": items,
                    "CreateIndex": idx, "ModifyIndex": idx }),
        );
    }

    /// Wakes blocking queries after a change.
    pub fn notify(&self) {
        let index = self.inner.lock().index;
        self.changed.send_replace(index);
    }

    pub fn start_allocs(self: &Arc<Self>, ids: Vec<String>) {
        for id in ids {
            tokio::spawn(exec::run(self.clone(), id));
        }
    }
}

/// The running fake.
pub struct FakeNomad {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _root: tempfile::TempDir,
}

impl FakeNomad {
    /// Starts on a free loopback port.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        Self::start_on(0, opts).await
    }

    /// Starts on `port` (0: any free one).
    pub async fn start_on(port: u16, opts: Options) -> anyhow::Result<Self> {
        Self::start_with(port, opts, &[], &[]).await
    }

    /// Starts on `port` already holding the sandbox jobs of `capabilities` (from
    /// `nomad/sandbox.nomad.hcl`) and the variables `vars` (path, items), as a Nomad
    /// that restarts keeps its registered jobs and variables: its first answer already
    /// knows them.
    pub async fn start_with(
        port: u16,
        opts: Options,
        capabilities: &[&str],
        vars: &[(&str, Value)],
    ) -> anyhow::Result<Self> {
        let api = OpenApi::load_or_routes()?;
        let root = tempfile::Builder::new().prefix("fake-nomad-").tempdir()?;
        let (changed, _) = watch::channel(0);
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                slots: opts.slots,
                index: 1,
                ..Default::default()
            }),
            changed,
            api,
            opts,
            keyring: identity::Keyring::generate(root.path())?,
            jwks_reads: Default::default(),
            root: root.path().to_path_buf(),
        });
        for capability in capabilities {
            register(&state, json!({ "Job": sandbox_job(capability)? }));
        }
        for (path, items) in vars {
            state.put_var(path, items.clone());
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            state,
            stop: Some(tx),
            server: Some(server),
            _root: root,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers a job through the API (so its JSON is checked like any request).
    pub async fn register(&self, job: Value) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/jobs", self.url()))
            .header(
                "X-Nomad-Token",
                self.state.opts.token.clone().unwrap_or_default(),
            )
            .json(&json!({ "Job": job }))
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        anyhow::ensure!(status.is_success(), "register: {status} {text}");
        Ok(())
    }

    /// Registers the sandbox job of `capability` from `nomad/sandbox.nomad.hcl`.
    pub async fn register_sandbox_job(&self, capability: &str) -> anyhow::Result<Value> {
        let job = sandbox_job(capability)?;
        self.register(job.clone()).await?;
        Ok(job)
    }

    /// Sets a variable directly (as an operator would with `nomad var put`).
    pub fn put_var(&self, path: &str, items: Value) {
        self.state.put_var(path, items);
    }

    /// Changes the capacity; frees blocked evaluations when it grows.
    pub fn set_slots(&self, slots: usize) {
        let started = {
            let mut inner = self.state.inner.lock();
            inner.slots = slots;
            inner.unblock(&self.state.root)
        };
        self.state.start_allocs(started);
        self.state.notify();
    }

    /// Loses a running allocation with its node: its processes die, it becomes `lost`.
    pub fn lose(&self, alloc: &str) -> bool {
        let kill = self
            .state
            .inner
            .lock()
            .allocs
            .get_mut(alloc)
            .and_then(|a| a.kill.take());
        match kill {
            Some(k) => k.send(Kill::Lost).is_ok(),
            None => false,
        }
    }

    /// Every allocation: (id, job id, client status).
    pub fn allocs(&self) -> Vec<(String, String, String)> {
        self.state
            .inner
            .lock()
            .allocs
            .values()
            .map(|a| {
                (
                    a.value["ID"].as_str().unwrap_or_default().to_string(),
                    a.value["JobID"].as_str().unwrap_or_default().to_string(),
                    a.value["ClientStatus"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    /// Process id of an allocation's sandbox while it runs.
    pub fn pid(&self, alloc: &str) -> Option<i32> {
        self.state
            .inner
            .lock()
            .allocs
            .get(alloc)
            .and_then(|a| a.pid)
    }

    /// An allocation as the API shows it.
    pub fn alloc(&self, alloc: &str) -> Option<Value> {
        self.state
            .inner
            .lock()
            .allocs
            .get(alloc)
            .map(|a| a.value.clone())
    }

    /// Evaluations with their status.
    pub fn evals(&self) -> Vec<Value> {
        self.state.inner.lock().evals.values().cloned().collect()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.inner.lock().requests.clone()
    }

    pub fn dispatches(&self) -> Vec<Dispatch> {
        self.state.inner.lock().dispatches.clone()
    }

    /// Jobs purged (their IDs).
    pub fn purged(&self) -> Vec<String> {
        self.state.inner.lock().purged.clone()
    }

    /// The cluster's signing key (to forge identities in tests: a valid signature with
    /// other claims).
    pub fn keyring(&self) -> &identity::Keyring {
        &self.state.keyring
    }

    /// How many times the JWKS was read.
    pub fn jwks_reads(&self) -> u64 {
        self.state
            .jwks_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every byte the fake holds or has served: jobs, evaluations, allocations,
    /// variables, dispatches (payload and meta), request paths, queries and bodies, and
    /// every file under its data directory (task directories, logs, results), by where
    /// it was found.
    pub fn stored_bytes(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        {
            let inner = self.state.inner.lock();
            let enc = |v: &Value| serde_json::to_vec(v).unwrap_or_default();
            for (id, j) in &inner.jobs {
                out.push((format!("job {id}"), enc(j)));
            }
            for (id, e) in &inner.evals {
                out.push((format!("evaluation {id}"), enc(e)));
            }
            for (id, a) in &inner.allocs {
                out.push((format!("allocation {id}"), enc(&a.value)));
            }
            for (path, v) in &inner.vars {
                out.push((format!("variable {path}"), enc(v)));
            }
            for d in &inner.dispatches {
                out.push((format!("dispatch payload {}", d.job), d.payload.clone()));
                out.push((
                    format!("dispatch meta {}", d.job),
                    serde_json::to_vec(&d.meta).unwrap_or_default(),
                ));
            }
            for r in &inner.requests {
                out.push((
                    format!("request {} {}", r.method, r.path),
                    format!("{} {:?}", r.path, r.query).into_bytes(),
                ));
            }
            for (i, b) in inner.bodies.iter().enumerate() {
                out.push((format!("request body {i}"), b.clone()));
            }
        }
        fn walk(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    walk(&p, out);
                } else if let Ok(bytes) = std::fs::read(&p) {
                    out.push((format!("file {}", p.display()), bytes));
                }
            }
        }
        walk(&self.state.root, &mut out);
        out
    }

    /// Requests or answers that did not match Nomad's OpenAPI description.
    pub fn violations(&self) -> Vec<String> {
        self.state.inner.lock().violations.clone()
    }

    /// Stops serving and kills every sandbox.
    pub async fn shutdown(mut self) {
        self.stop_now().await;
    }

    async fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
        let kills: Vec<_> = self
            .state
            .inner
            .lock()
            .allocs
            .values_mut()
            .filter_map(|a| a.kill.take())
            .collect();
        for k in kills {
            let _ = k.send(Kill::Lost);
        }
    }
}

impl Drop for FakeNomad {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            s.abort();
        }
        for a in self.state.inner.lock().allocs.values_mut() {
            if let Some(pid) = a.pid.take() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

fn q<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Waits as a blocking query does: until `table` passes `index`, or `wait` elapses.
async fn block(state: &State, table: &'static str, query: &[(String, String)]) {
    let Some(index) = q(query, "index").and_then(|i| i.parse::<u64>().ok()) else {
        return;
    };
    let wait = q(query, "wait")
        .and_then(jobspec::duration_ns)
        .map(|ns| Duration::from_nanos(ns as u64))
        .unwrap_or(DEFAULT_WAIT)
        .min(MAX_WAIT);
    let mut rx = state.changed.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if state.inner.lock().table(table) > index {
            return;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// The stub of an allocation in lists (`AllocationListStub`).
fn stub(a: &Value) -> Value {
    let mut s = serde_json::Map::new();
    for k in [
        "ID",
        "EvalID",
        "Name",
        "Namespace",
        "NodeID",
        "NodeName",
        "JobID",
        "TaskGroup",
        "DesiredStatus",
        "DesiredDescription",
        "ClientStatus",
        "ClientDescription",
        "TaskStates",
        "CreateIndex",
        "ModifyIndex",
        "CreateTime",
        "ModifyTime",
    ] {
        if let Some(v) = a.get(k) {
            s.insert(k.to_string(), v.clone());
        }
    }
    s.insert("JobType".into(), a["Job"]["Type"].clone());
    s.insert("JobVersion".into(), json!(0));
    Value::Object(s)
}

async fn handle(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw = uri.path().to_string();
    if !body.is_empty() {
        state.inner.lock().bodies.push(body.to_vec());
    }
    if raw == "/.well-known/jwks.json" && method == Method::GET {
        state
            .jwks_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return axum::Json(state.keyring.jwks()).into_response();
    }
    let Some(rest) = raw.strip_prefix("/v1") else {
        return text(StatusCode::NOT_FOUND, "Invalid URL");
    };
    let query = query_pairs(&uri);
    let token = headers
        .get("X-Nomad-Token")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body_json: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                state
                    .inner
                    .lock()
                    .violations
                    .push(format!("{method} {raw}: body is not JSON: {e}"));
                return text(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}"));
            }
        }
    };
    let Some(m) = state.api.find(method.as_str(), rest) else {
        state
            .inner
            .lock()
            .violations
            .push(format!("{method} {raw}: no such operation in the spec"));
        return text(
            StatusCode::NOT_FOUND,
            format!("no operation {method} {raw}"),
        );
    };
    let errors = state.api.check_request(&m, &query, body_json.as_ref());
    let op = m.op.id.clone();
    {
        let mut inner = state.inner.lock();
        inner.requests.push(Request {
            method: method.to_string(),
            path: format!("/v1{}", percent_decode(rest)),
            query: query.clone(),
            operation: op.clone(),
            token: token.is_some(),
        });
        inner.violations.extend(errors.iter().cloned());
    }
    if !errors.is_empty() {
        return text(StatusCode::BAD_REQUEST, errors.join("\n"));
    }
    if let Some(expected) = &state.opts.token {
        if token.as_deref() != Some(expected.as_str()) {
            return text(StatusCode::FORBIDDEN, "Permission denied");
        }
    }
    let p = |name: &str| m.path_params.get(name).cloned().unwrap_or_default();
    let (status, table, value) = match op.as_str() {
        "RegisterJob" | "PostJob" => register(&state, body_json.unwrap_or_default()),
        "GetJob" => {
            let job = state.inner.lock().jobs.get(&p("jobName")).cloned();
            match job {
                Some(j) => (StatusCode::OK, "jobs", j),
                None => return text(StatusCode::NOT_FOUND, "job not found"),
            }
        }
        "DeleteJob" => match stop_job(&state, &p("jobName"), q(&query, "purge") == Some("true")) {
            Some(v) => (StatusCode::OK, "jobs", v),
            None => return text(StatusCode::NOT_FOUND, "job not found"),
        },
        "PostJobDispatch" => {
            let token = q(&query, "idempotency_token")
                .unwrap_or_default()
                .to_string();
            match dispatch(&state, &p("jobName"), body_json.unwrap_or_default(), token) {
                Ok(v) => (StatusCode::OK, "jobs", v),
                Err((s, msg)) => return text(s, msg),
            }
        }
        "GetEvaluation" => {
            block(&state, "evals", &query).await;
            match state.inner.lock().evals.get(&p("evalID")).cloned() {
                Some(e) => (StatusCode::OK, "evals", e),
                None => return text(StatusCode::NOT_FOUND, "eval not found"),
            }
        }
        "GetJobAllocations" => {
            block(&state, "allocs", &query).await;
            let job = p("jobName");
            let list: Vec<Value> = state
                .inner
                .lock()
                .allocs
                .values()
                .filter(|a| a.value["JobID"] == json!(job))
                .map(|a| stub(&a.value))
                .collect();
            (StatusCode::OK, "allocs", Value::Array(list))
        }
        "GetAllocation" => {
            block(&state, "allocs", &query).await;
            match state
                .inner
                .lock()
                .allocs
                .get(&p("allocID"))
                .map(|a| a.value.clone())
            {
                Some(a) => (StatusCode::OK, "allocs", a),
                None => return text(StatusCode::NOT_FOUND, "alloc not found"),
            }
        }
        "PutVariable" => {
            let path = p("path");
            let mut inner = state.inner.lock();
            let idx = inner.touch("vars");
            let mut v = body_json.unwrap_or_default();
            v["Path"] = json!(path);
            v["CreateIndex"] = json!(idx);
            v["ModifyIndex"] = json!(idx);
            inner.vars.insert(path, v.clone());
            (StatusCode::OK, "vars", v)
        }
        "GetVariableQuery" => match state.inner.lock().vars.get(&p("path")).cloned() {
            Some(v) => (StatusCode::OK, "vars", v),
            None => return text(StatusCode::NOT_FOUND, "variable not found"),
        },
        "documented /client/fs/logs/{allocID}" => {
            return exec::logs(state.clone(), &p("allocID"), &query)
        }
        "documented /client/fs/cat/{allocID}" => return exec::cat(&state, &p("allocID"), &query),
        other => {
            state
                .inner
                .lock()
                .violations
                .push(format!("the fake does not implement {other}"));
            return text(
                StatusCode::NOT_IMPLEMENTED,
                format!("{other} is not implemented"),
            );
        }
    };
    state.notify();
    let problems = state.api.check_response(m.op, status.as_u16(), &value);
    let index = state.inner.lock().table(table);
    if !problems.is_empty() {
        state
            .inner
            .lock()
            .violations
            .extend(problems.into_iter().map(|p| format!("answer: {p}")));
    }
    let mut resp = (status, axum::Json(value)).into_response();
    let h = resp.headers_mut();
    h.insert("X-Nomad-Index", index.into());
    h.insert(
        "X-Nomad-KnownLeader",
        axum::http::HeaderValue::from_static("true"),
    );
    h.insert("X-Nomad-LastContact", 0.into());
    resp
}

/// The sandbox job of `capability`, from `nomad/sandbox.nomad.hcl`.
fn sandbox_job(capability: &str) -> anyhow::Result<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nomad/sandbox.nomad.hcl");
    jobspec::load(&path, &[("capability", capability)])
}

fn register(state: &State, body: Value) -> (StatusCode, &'static str, Value) {
    let mut job = body["Job"].clone();
    let mut inner = state.inner.lock();
    let idx = inner.touch("jobs");
    job["Status"] = json!(if job.get("ParameterizedJob").is_some() {
        "running"
    } else {
        "pending"
    });
    job["Stop"] = json!(false);
    job["CreateIndex"] = json!(idx);
    job["ModifyIndex"] = json!(idx);
    job["JobModifyIndex"] = json!(idx);
    job["Version"] = json!(0);
    job["SubmitTime"] = json!(now_ns());
    let id = job["ID"].as_str().unwrap_or_default().to_string();
    inner.jobs.insert(id, job);
    (
        StatusCode::OK,
        "jobs",
        json!({ "EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": idx, "Warnings": "",
                "Index": idx, "KnownLeader": true, "LastContact": 0 }),
    )
}

fn dispatch(
    state: &Arc<State>,
    parent_id: &str,
    body: Value,
    token: String,
) -> Result<Value, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let mut inner = state.inner.lock();
    let parent = inner
        .jobs
        .get(parent_id)
        .cloned()
        .ok_or((StatusCode::NOT_FOUND, "job not found".to_string()))?;
    let Some(params) = parent
        .get("ParameterizedJob")
        .filter(|p| !p.is_null())
        .cloned()
    else {
        return Err(bad("Specified job is not a parameterized job".into()));
    };
    if parent["Stop"] == json!(true) {
        return Err(bad("Specified job is stopped".into()));
    }
    let payload = base64::engine::general_purpose::STANDARD
        .decode(body["Payload"].as_str().unwrap_or_default())
        .map_err(|e| bad(format!("payload is not base64: {e}")))?;
    match params["Payload"].as_str() {
        Some("required") if payload.is_empty() => {
            return Err(bad(
                "Payload is not provided but required by parameterized job".into(),
            ))
        }
        Some("forbidden") if !payload.is_empty() => {
            return Err(bad(
                "Payload provided but forbidden by parameterized job".into()
            ))
        }
        _ => {}
    }
    if payload.len() > PAYLOAD_LIMIT {
        return Err(bad(format!(
            "Payload exceeds maximum size; {} > {PAYLOAD_LIMIT}",
            payload.len()
        )));
    }
    let meta: BTreeMap<String, String> = body["Meta"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let names = |k: &str| -> Vec<String> {
        params[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    };
    let (required, optional) = (names("MetaRequired"), names("MetaOptional"));
    let missing: Vec<&String> = required.iter().filter(|k| !meta.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "Dispatch did not provide required meta keys: {missing:?}"
        )));
    }
    let unknown: Vec<&String> = meta
        .keys()
        .filter(|k| !required.contains(k) && !optional.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(bad(format!(
            "Dispatch provided unpermitted meta keys: {unknown:?}"
        )));
    }
    if !token.is_empty() {
        let existing = inner
            .jobs
            .values()
            .find(|j| {
                j["ParentID"] == json!(parent_id) && j["DispatchIdempotencyToken"] == json!(token)
            })
            .cloned();
        if let Some(j) = existing {
            let idx = inner.index;
            inner.dispatches.push(Dispatch {
                parent: parent_id.into(),
                job: j["ID"].as_str().unwrap_or_default().into(),
                token,
                meta,
                payload,
                existing: true,
            });
            return Ok(
                json!({ "DispatchedJobID": j["ID"], "EvalID": "", "EvalCreateIndex": 0,
                              "JobCreateIndex": j["CreateIndex"], "Index": idx }),
            );
        }
    }
    let suffix: String = uuid()
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect();
    let id = format!("{parent_id}/dispatch-{}-{suffix}", now_ns() / 1_000_000_000);
    let idx = inner.touch("jobs");
    let mut child = parent.clone();
    if let Some(o) = child.as_object_mut() {
        o.remove("ParameterizedJob");
    }
    let mut all_meta = parent["Meta"].as_object().cloned().unwrap_or_default();
    for (k, v) in &meta {
        all_meta.insert(k.clone(), json!(v));
    }
    child["ID"] = json!(id);
    child["Name"] = json!(id);
    child["ParentID"] = json!(parent_id);
    child["Dispatched"] = json!(true);
    child["DispatchIdempotencyToken"] = json!(token);
    // Nomad keeps an absent payload as empty bytes (a string in JSON).
    child["Payload"] = json!(body["Payload"].as_str().unwrap_or_default());
    child["Meta"] = Value::Object(all_meta);
    child["Status"] = json!("pending");
    child["CreateIndex"] = json!(idx);
    child["ModifyIndex"] = json!(idx);
    child["JobModifyIndex"] = json!(idx);
    inner.jobs.insert(id.clone(), child.clone());
    let eval = inner.new_eval(&child, "job-register", "pending");
    let eval_index = inner.index;
    inner.dispatches.push(Dispatch {
        parent: parent_id.into(),
        job: id.clone(),
        token,
        meta,
        payload,
        existing: false,
    });
    drop(inner);
    // The scheduler picks the evaluation up a moment later, as Nomad's does.
    let st = state.clone();
    let eval_id = eval.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = st.inner.lock().schedule(&st.root, &eval_id);
        st.start_allocs(start.into_iter().collect());
        st.notify();
    });
    Ok(
        json!({ "DispatchedJobID": id, "EvalID": eval, "EvalCreateIndex": eval_index,
               "JobCreateIndex": idx, "Index": eval_index }),
    )
}

fn stop_job(state: &Arc<State>, id: &str, purge: bool) -> Option<Value> {
    let mut inner = state.inner.lock();
    let mut job = inner.jobs.get(id)?.clone();
    let idx = inner.touch("jobs");
    job["Stop"] = json!(true);
    job["Status"] = json!("dead");
    job["ModifyIndex"] = json!(idx);
    let eval = inner.new_eval(&job, "job-deregister", "complete");
    let eval_index = inner.index;
    let running: Vec<String> = inner
        .allocs
        .values()
        .filter(|a| a.value["JobID"] == json!(id) && a.value["DesiredStatus"] == json!("run"))
        .map(|a| a.value["ID"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut kills = Vec::new();
    for a in &running {
        inner.set_alloc(a, |v| {
            v["DesiredStatus"] = json!("stop");
            v["DesiredDescription"] = json!("alloc not needed due to job update");
        });
        if let Some(k) = inner.allocs.get_mut(a).and_then(|x| x.kill.take()) {
            kills.push(k);
        } else if inner.allocs[a].value["ClientStatus"] == json!("pending") {
            inner.set_alloc(a, |v| v["ClientStatus"] = json!("complete"));
        }
    }
    if purge {
        inner.jobs.remove(id);
        inner.purged.push(id.to_string());
    } else {
        inner.jobs.insert(id.to_string(), job);
    }
    drop(inner);
    for k in kills {
        let _ = k.send(Kill::Stop);
    }
    Some(
        json!({ "EvalID": eval, "EvalCreateIndex": eval_index, "JobModifyIndex": idx,
                 "Index": eval_index, "KnownLeader": true, "LastContact": 0 }),
    )
}

/// Streams the response body of a framed log read.
pub(crate) fn stream_body<S>(s: S) -> Body
where
    S: futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    Body::from_stream(s)
}
