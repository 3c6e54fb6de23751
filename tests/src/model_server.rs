//! A scripted Anthropic Messages API for the real Claude Code CLI (`ANTHROPIC_BASE_URL`).
//! `POST /v1/messages` answers with the streaming SSE shape of the real API
//! (`message_start`, `content_block_*` with `text_delta` / `input_json_delta`,
//! `message_delta` with usage, `message_stop`). The step answered is the number of
//! assistant messages already in the request's conversation, so the script advances
//! with the agent's turns and a retried request gets the same answer. Every request
//! is recorded for the tests to inspect.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The model name the tests give Claude Code (priced $3 / $15 per million tokens).
pub const MODEL: &str = "claude-sonnet-4-5";

/// What the model does at one step of the conversation.
#[derive(Clone, Debug)]
pub enum Step {
    /// Calls a tool (`Bash`, `Write`, `Edit`, …) with this input.
    Tool { name: String, input: Value },
    /// Answers with text and ends its turn.
    Text(String),
    /// Fails with this HTTP status and API error type, every time.
    Error { status: u16, kind: String },
    /// Answers 200 with a stream that is not valid JSON.
    Malformed,
    /// Never answers.
    Hang,
    /// Waits, then does the inner step.
    Delay(Duration, Box<Step>),
}

impl Step {
    pub fn tool(name: &str, input: Value) -> Self {
        Step::Tool {
            name: name.into(),
            input,
        }
    }
    pub fn text(t: &str) -> Self {
        Step::Text(t.into())
    }
    pub fn error(status: u16, kind: &str) -> Self {
        Step::Error {
            status,
            kind: kind.into(),
        }
    }
}

/// One step with the usage it reports.
#[derive(Clone, Debug)]
pub struct Turn {
    pub step: Step,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Turn {
    pub fn new(step: Step, input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            step,
            input_tokens,
            output_tokens,
        }
    }
}

/// A request the server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub api_key: Option<String>,
    /// The `Accept-Encoding` the request asked for.
    pub accept_encoding: Option<String>,
    pub body: Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Inner {
    script: Vec<Turn>,
    /// Scripts chosen by the conversation: the first whose needle appears in the first
    /// user message answers it; else `script`.
    routes: Vec<(String, Vec<Turn>)>,
    requests: Vec<Recorded>,
    /// Requests to any other path: `(method, path and query, x-api-key)`.
    other: Vec<(String, String, Option<String>)>,
}

/// A running scripted model server; stops when dropped.
pub struct ModelServer {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl ModelServer {
    pub async fn start(script: Vec<Turn>) -> Self {
        Self::start_routed(script, Vec::new()).await
    }

    /// A server for several agents at once: a conversation follows the script of the
    /// first route whose needle is in its first user message or in its system prompt (a
    /// capability's prompt); any other follows `script`.
    pub async fn start_routed(script: Vec<Turn>, routes: Vec<(String, Vec<Turn>)>) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            script,
            routes,
            requests: Vec::new(),
            other: Vec::new(),
        }));
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .fallback(other)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the model server");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Self { url, inner, stop }
    }

    /// Every `POST /v1/messages` so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner
            .lock()
            .expect("model server lock")
            .requests
            .clone()
    }

    /// Requests that were part of the agent's conversation (they carry tools).
    pub fn agent_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.body.get("tools").is_some_and(|t| t.is_array()))
            .collect()
    }

    /// Every request to a path other than `POST /v1/messages`: `(method, path and
    /// query, the x-api-key it carried)`. Each was answered 200 with `{}`.
    pub fn other_requests(&self) -> Vec<(String, String, Option<String>)> {
        self.inner.lock().expect("model server lock").other.clone()
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

async fn other(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    inner
        .lock()
        .expect("model server lock")
        .other
        .push((method.to_string(), path, key));
    axum::Json(json!({})).into_response()
}

fn sse(event: &str, data: Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

async fn messages(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let step_index = body["messages"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] == "assistant").count())
        .unwrap_or(0);
    let model = body["model"].as_str().unwrap_or(MODEL).to_string();
    let turn = {
        let mut inner = inner.lock().expect("model server lock");
        inner.requests.push(Recorded {
            path: "/v1/messages".into(),
            api_key: headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            accept_encoding: headers
                .get("accept-encoding")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: body.clone(),
            at: std::time::Instant::now(),
        });
        let first = body["messages"][0]["content"].to_string();
        let system = body["system"].to_string();
        inner
            .routes
            .iter()
            .find(|(needle, _)| first.contains(needle.as_str()) || system.contains(needle.as_str()))
            .map_or(&inner.script, |(_, script)| script)
            .get(step_index)
            .cloned()
            .unwrap_or_else(|| Turn::new(Step::text("Done."), 10, 10))
    };
    answer(
        turn.step,
        step_index,
        &model,
        turn.input_tokens,
        turn.output_tokens,
    )
    .await
}

async fn answer(
    mut step: Step,
    index: usize,
    model: &str,
    input_tokens: u64,
    output_tokens: u64,
) -> Response {
    while let Step::Delay(d, inner) = step {
        tokio::time::sleep(d).await;
        step = *inner;
    }
    let message = json!({
        "id": format!("msg_{index:04}"), "type": "message", "role": "assistant",
        "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": { "input_tokens": input_tokens, "output_tokens": 1 }
    });
    let mut out = sse(
        "message_start",
        json!({ "type": "message_start", "message": message }),
    );
    let stop_reason = match step {
        Step::Hang => {
            std::future::pending::<()>().await;
            unreachable!("pending never resolves")
        }
        Step::Error { status, kind } => {
            let body = json!({ "type": "error",
                "error": { "type": kind, "message": "scripted failure" } });
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, axum::Json(body)).into_response();
        }
        Step::Malformed => {
            return Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from("event: message_start\ndata: {not json\n\n"))
                .unwrap_or_default();
        }
        Step::Text(text) => {
            out += &sse(
                "content_block_start",
                json!({ "type": "content_block_start",
                "index": 0, "content_block": { "type": "text", "text": "" } }),
            );
            out += &sse(
                "content_block_delta",
                json!({ "type": "content_block_delta",
                "index": 0, "delta": { "type": "text_delta", "text": text } }),
            );
            "end_turn"
        }
        Step::Tool { name, input } => {
            out += &sse(
                "content_block_start",
                json!({ "type": "content_block_start",
                "index": 0, "content_block": { "type": "tool_use",
                "id": format!("toolu_{index:04}"), "name": name, "input": {} } }),
            );
            out += &sse(
                "content_block_delta",
                json!({ "type": "content_block_delta",
                "index": 0, "delta": { "type": "input_json_delta",
                "partial_json": input.to_string() } }),
            );
            "tool_use"
        }
        Step::Delay(..) => unreachable!("delays are unwrapped above"),
    };
    out += &sse(
        "content_block_stop",
        json!({ "type": "content_block_stop", "index": 0 }),
    );
    out += &sse(
        "message_delta",
        json!({ "type": "message_delta",
            "delta": { "stop_reason": stop_reason, "stop_sequence": null },
            "usage": { "output_tokens": output_tokens } }),
    );
    out += &sse("message_stop", json!({ "type": "message_stop" }));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(out))
        .unwrap_or_default()
}

/// Where the Claude Code CLI is on `PATH`, if it is installed.
pub fn find_claude_cli() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("claude"))
        .find(|p| p.is_file())
}

/// Where the Claude Code CLI is; `make test` installs it.
pub fn claude_cli() -> std::path::PathBuf {
    find_claude_cli()
        .expect("the Claude Code CLI is not on PATH: run `make test` (it installs it with npm)")
}
