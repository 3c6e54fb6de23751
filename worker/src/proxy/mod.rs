//! The worker's per-run network proxy: the only way out of a sandbox whose network is
//! the allow-list mode (the default). The sandbox has its own network namespace with
//! nothing but loopback; this proxy listens on a unix socket that is bind-mounted into
//! it, and the runner relays a loopback port to that socket (`runner::relay`). One HTTP
//! server answers three kinds of request:
//!
//! - `CONNECT host:port` (HTTPS and any TCP through a proxy): tunnelled when the
//!   destination is on the run's allow-list, else refused (403) and reported;
//! - an absolute-form request (`GET http://host:port/…`, plain HTTP through a proxy, e.g.
//!   git's smart HTTP): forwarded under the same rule;
//! - an origin-form request (`POST /v1/messages`), or one addressed to the proxy's own
//!   address inside the sandbox: the model endpoint. Only the calls the proxy meters
//!   are forwarded ([`METERED_PATHS`]: `POST /v1/messages` and its free
//!   `count_tokens`); any other path gets 404, since it would spend the worker's key
//!   unmetered. A forwarded call gets the worker's key (`x-api-key`; whatever key the
//!   agent sent is dropped), its answer is metered ([`meter`]), and once the run's
//!   metered cost has reached its budget every further call is refused (403, `budget
//!   exceeded`). While a budget is set, one Messages call runs at a time: each is
//!   checked against the budget only after every earlier one was metered, so concurrent
//!   calls cannot all pass the check before any is charged (the run can go over its
//!   budget by at most the one call that crossed it). A call that asks the model API
//!   to act on its own (server tools, MCP servers by URL) is refused (400,
//!   [`server_tools`]): it would reach the network past the allow-list and cost beyond
//!   the metered tokens.
//!
//! Destinations are matched by the name and port the agent asked for, not by address;
//! names are resolved here, outside the sandbox. Each refusal becomes a
//! `network_denied` event of the run (host, port, time), at most [`MAX_DENIAL_EVENTS`];
//! when the proxy stops, one [`REFUSED_EVENT`] lists every refused destination with its
//! count and first and last time ([`NetworkRefused`]), so the refusals can be shown with
//! the run's result.
//!
//! Two ways in: a unix socket bound into a bwrap sandbox ([`RunProxy::start`]), or a TCP
//! port the allocations of a Nomad sandbox reach across the network
//! ([`RunProxy::start_tcp`]). A TCP proxy is reachable by more than its sandbox, so it
//! takes only requests that carry the attempt's proxy token ([`ProxyOptions::token`]):
//! as the proxy credentials (`Proxy-Authorization: Basic`, any user name and the token as
//! the password, or `Bearer`), or, on the model endpoint, as the model key (`x-api-key`,
//! `Authorization: Bearer`). Anything else is refused (407, or 401 on the model
//! endpoint) and never forwarded; the token itself is never sent on.

mod admission;
pub mod meter;
mod server_tools;

use crate::spec::RunnerEvent;
#[cfg(test)]
use admission::MAX_CONNECTIONS;
use admission::{Admission, Slot};
use ao_shared::task::{NetworkRefused, RefusedDestination};
use bytes::Bytes;
use futures::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use meter::{CallMeter, Meter, Metered};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Refusals reported as events per run; later ones are only counted in the log.
pub const MAX_DENIAL_EVENTS: usize = 100;
/// The event kind of a refused destination.
pub const DENIED_EVENT: &str = "network_denied";
/// The event kind of the list of every refused destination, sent when the proxy stops.
pub const REFUSED_EVENT: &str = "network_refused";
/// Destinations listed in the [`REFUSED_EVENT`] at most (the rest are counted), so that
/// the event stays far below the event size bound even with 253-byte host names.
pub const MAX_REFUSED_LISTED: usize = ao_shared::task::MAX_REFUSED_LISTED;
/// The model API paths the proxy forwards: the ones it meters. Anything else under the
/// model endpoint (`/v1/complete`, batches, files, …) would use the key unmetered.
pub const METERED_PATHS: &[&str] = &["/v1/messages", "/v1/messages/count_tokens"];
/// The one path whose calls cost money and so pass the budget gate.
const MESSAGES_PATH: &str = "/v1/messages";
/// The model API's limit on a Messages request (Anthropic's API reference, "Request
/// size limits": 32 MB for the Messages endpoint).
const MAX_MODEL_REQUEST_BYTES: usize = 32 * 1024 * 1024;
/// The header that switches beta features of the model API on, comma-separated.
const BETA_HEADER: &str = "anthropic-beta";
/// How long the proxy's stop waits to hand its [`REFUSED_EVENT`] to the run's events.
const REFUSED_EVENT_WAIT: Duration = Duration::from_secs(5);
/// Limit of connecting to a destination or the model API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The socket's name in the proxy's directory.
const SOCKET_NAME: &str = "proxy.sock";

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A destination as the agent names it: host (lower case) and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub host: String,
    pub port: u16,
}

impl Destination {
    /// Parses `host:port`, `[v6]:port` or `host` (then `default_port`).
    pub fn parse(text: &str, default_port: u16) -> Option<Self> {
        let text = text.trim();
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => default_port,
                None => return None,
            };
            (host.to_string(), port)
        } else {
            match text.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()?),
                Some(_) => return None,
                None => (text.to_string(), default_port),
            }
        };
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return None;
        }
        Some(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host and port of an `http(s)://` URL (a git remote, the model API).
    pub fn of_url(url: &str) -> Option<Self> {
        let u = reqwest::Url::parse(url).ok()?;
        if !matches!(u.scheme(), "http" | "https") {
            return None;
        }
        Some(Self {
            host: u.host_str()?.trim_matches(['[', ']']).to_ascii_lowercase(),
            port: u.port_or_known_default()?,
        })
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The model endpoint behind the proxy.
pub struct ModelRoute {
    /// The model API's base URL (`https://api.anthropic.com`).
    pub upstream: String,
    /// The key added to every call.
    pub key: Option<SecretString>,
    /// The run's budget in dollars: calls are refused once the metered cost reaches it.
    pub budget_usd: Option<f64>,
}

/// What one run's proxy lets through.
pub struct ProxyOptions {
    /// Destinations reachable with `CONNECT` or plain HTTP.
    pub allow: Vec<Destination>,
    /// The port the runner relays inside the sandbox (`127.0.0.1:port`): requests
    /// addressed there are the model endpoint's.
    pub inside_port: u16,
    pub model: Option<ModelRoute>,
    /// The attempt's proxy token, required on every request when set (see the module
    /// documentation); `None` for a unix socket only the sandbox reaches.
    pub token: Option<SecretString>,
    /// The host name the sandbox reaches a TCP proxy by (set by [`RunProxy::start_tcp`]):
    /// requests addressed to it and `inside_port` are the model endpoint's too.
    pub advertised_host: Option<String>,
}

/// A refused destination, as reported to the run's events.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NetworkDenied {
    pub host: String,
    pub port: u16,
    /// `CONNECT`, or the method of a plain HTTP request.
    pub method: String,
    /// RFC 3339.
    pub at: String,
}

impl NetworkDenied {
    pub fn into_event(self) -> RunnerEvent {
        RunnerEvent {
            kind: DENIED_EVENT.into(),
            data: serde_json::to_value(&self).unwrap_or_default(),
        }
    }
}

/// What the proxy does with its list of refused destinations.
trait RefusedList {
    /// Counts one refusal of `dest` at `at`.
    fn note(&mut self, dest: &Destination, at: &str);
    /// The [`REFUSED_EVENT`] carrying the list.
    fn into_event(self) -> RunnerEvent;
}

impl RefusedList for NetworkRefused {
    fn note(&mut self, dest: &Destination, at: &str) {
        self.total += 1;
        if let Some(r) = self
            .refused
            .iter_mut()
            .find(|r| r.host == dest.host && r.port == dest.port)
        {
            r.count += 1;
            r.last_at = at.to_string();
        } else if self.refused.len() < MAX_REFUSED_LISTED {
            self.refused.push(RefusedDestination {
                host: dest.host.clone(),
                port: dest.port,
                count: 1,
                first_at: at.to_string(),
                last_at: at.to_string(),
            });
        } else {
            self.unlisted += 1;
        }
    }

    fn into_event(self) -> RunnerEvent {
        RunnerEvent {
            kind: REFUSED_EVENT.into(),
            data: serde_json::to_value(&self).unwrap_or_default(),
        }
    }
}

struct Ctx {
    options: ProxyOptions,
    http: reqwest::Client,
    meter: Arc<Meter>,
    events: mpsc::Sender<RunnerEvent>,
    denials: AtomicUsize,
    /// Every refused destination so far.
    refused: parking_lot::Mutex<NetworkRefused>,
    /// Held by the Messages call in flight while the run has a budget (see the module
    /// documentation).
    budget_gate: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
    /// Model answers being read to their end for the meter, and what ends those reads.
    drains: tokio_util::task::TaskTracker,
    drain_stop: CancellationToken,
    /// Which connections are served, and how many at once.
    admission: Arc<Admission>,
}

/// One run's proxy; stops when [`RunProxy::stop`] is called or it is dropped.
pub struct RunProxy {
    /// The socket's directory (a proxy on a unix socket).
    dir: Option<tempfile::TempDir>,
    /// The bound address (a proxy on TCP).
    addr: Option<std::net::SocketAddr>,
    ctx: Arc<Ctx>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot make the proxy socket in {dir}: {source}")]
    Socket {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make the proxy's HTTP client: {0}")]
    Client(String),
    #[error("cannot listen on {addr} for the proxy: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// The accepting end of a proxy: a unix socket or a TCP port.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

type Stream = tokio_util::either::Either<tokio::net::UnixStream, TcpStream>;

impl Listener {
    async fn accept(&self) -> std::io::Result<Stream> {
        use tokio_util::either::Either;
        match self {
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Either::Left(s)),
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Either::Right(s)
            }),
        }
    }
}

impl RunProxy {
    /// Starts a proxy listening on a fresh socket under `parent`. Refusals are sent to
    /// `events` (the run's event stream).
    pub fn start(
        parent: &Path,
        options: ProxyOptions,
        events: mpsc::Sender<RunnerEvent>,
    ) -> Result<Self, ProxyError> {
        let socket_err = |source| ProxyError::Socket {
            dir: parent.to_path_buf(),
            source,
        };
        let dir = tempfile::Builder::new()
            .prefix("net-")
            .tempdir_in(parent)
            .map_err(socket_err)?;
        let path = dir.path().join(SOCKET_NAME);
        let listener = UnixListener::bind(&path).map_err(socket_err)?;
        // The sandbox user may be another host user than the worker's: it needs write
        // permission to connect. Only this socket file is shown to the sandbox.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .map_err(socket_err)?;
        let (ctx, server) = Self::serve_on(Listener::Unix(listener), options, events)?;
        Ok(Self {
            dir: Some(dir),
            addr: None,
            ctx,
            server: Some(server),
        })
    }

    /// Starts a proxy listening on TCP at `bind` (port 0: an ephemeral one), reached by
    /// the sandbox as `advertised_host` and the bound port: requests addressed there are
    /// the model endpoint's (`options.inside_port` is replaced by the bound port).
    /// `options.token` should be set: anything that reaches the port could use it.
    pub async fn start_tcp(
        bind: &str,
        advertised_host: &str,
        mut options: ProxyOptions,
        events: mpsc::Sender<RunnerEvent>,
    ) -> Result<Self, ProxyError> {
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| ProxyError::Listen {
                addr: bind.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Listen {
            addr: bind.to_string(),
            source,
        })?;
        options.inside_port = addr.port();
        options.advertised_host = Some(
            advertised_host
                .trim_matches(['[', ']'])
                .to_ascii_lowercase(),
        );
        let (ctx, server) = Self::serve_on(Listener::Tcp(listener), options, events)?;
        Ok(Self {
            dir: None,
            addr: Some(addr),
            ctx,
            server: Some(server),
        })
    }

    fn serve_on(
        listener: Listener,
        options: ProxyOptions,
        events: mpsc::Sender<RunnerEvent>,
    ) -> Result<(Arc<Ctx>, tokio::task::JoinHandle<()>), ProxyError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ProxyError::Client(e.to_string()))?;
        let ctx = Arc::new(Ctx {
            options,
            http,
            meter: Arc::new(Meter::default()),
            events,
            denials: AtomicUsize::new(0),
            admission: Arc::new(Admission::default()),
            refused: parking_lot::Mutex::new(NetworkRefused::default()),
            budget_gate: Arc::new(tokio::sync::Semaphore::new(1)),
            drains: tokio_util::task::TaskTracker::new(),
            drain_stop: CancellationToken::new(),
            stop: CancellationToken::new(),
        });
        let server = tokio::spawn(serve(listener, ctx.clone()));
        Ok((ctx, server))
    }

    /// The most connections served at once so far (at most [`MAX_CONNECTIONS`]).
    #[cfg(test)]
    pub fn peak_connections(&self) -> usize {
        self.ctx.admission.peak()
    }

    /// The socket to bind into the sandbox (empty for a proxy on TCP).
    pub fn socket(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join(SOCKET_NAME))
            .unwrap_or_default()
    }

    /// The bound address of a proxy on TCP.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.addr
    }

    /// Stops serving, ends every open tunnel, sends the [`REFUSED_EVENT`] when anything
    /// was refused, and returns the run's metering and the refused destinations.
    pub async fn stop(mut self) -> (Metered, NetworkRefused) {
        self.ctx.stop.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        // Model answers the agent hung up on are still being read for the meter.
        self.ctx.drains.close();
        if tokio::time::timeout(METER_DRAIN_WAIT, self.ctx.drains.wait())
            .await
            .is_err()
        {
            tracing::warn!("model answers still unread at the run's end are not metered whole");
            self.ctx.drain_stop.cancel();
        }
        tracing::debug!(
            peak = self.ctx.admission.peak(),
            "the sandbox's proxy stopped; most connections served at once"
        );
        let refused = std::mem::take(&mut *self.ctx.refused.lock());
        if refused.total > 0 {
            let sent = tokio::time::timeout(
                REFUSED_EVENT_WAIT,
                self.ctx.events.send(refused.clone().into_event()),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::warn!("the list of refused destinations could not be reported");
            }
        }
        (self.ctx.meter.summary(), refused)
    }
}

impl Drop for RunProxy {
    fn drop(&mut self) {
        self.ctx.stop.cancel();
        self.ctx.drain_stop.cancel();
    }
}

/// How long a connection may take to send its request head before it is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (the worker out of descriptors, say), so that the loop
/// does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

async fn serve(listener: Listener, ctx: Arc<Ctx>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "the sandbox's proxy cannot accept a connection");
                tokio::select! {
                    _ = ctx.stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_RETRY) => continue,
                }
            }
        };
        // Unproven until a request carries the token (see `admission`).
        let connection = Arc::new(ctx.admission.accept());
        let ctx = ctx.clone();
        connections.spawn(async move {
            let stop = ctx.stop.clone();
            let evicted = connection.evicted().clone();
            let served = ctx.clone();
            let service = hyper::service::service_fn(move |req| {
                handle(req, served.clone(), connection.clone())
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
                _ = evicted.cancelled() => {}
            }
        });
        // Reap finished connections as we go.
        while connections.try_join_next().is_some() {}
        // Let the connection just spawned read its request head before the next accept:
        // in a burst of accepted connections, one whose request has arrived is proven
        // before newer ones can push it out of the unproven.
        tokio::task::yield_now().await;
    }
    connections.shutdown().await;
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// An error in the Messages API's shape, so the agent reports it as such.
fn api_error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let body =
        serde_json::json!({ "type": "error", "error": { "type": kind, "message": message } });
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    ctx: Arc<Ctx>,
    connection: Arc<admission::Connection>,
) -> Result<Response<Body>, Infallible> {
    // A request with the token proves its connection, which then takes its place in the
    // bound (waiting for one when all are taken); one without stays unproven and is
    // refused below, whatever it asks for.
    let slot = if ctx.authorized(req.headers(), true) {
        match connection.prove().await {
            Ok(slot) => Some(slot),
            Err(busy) => return Ok(text(StatusCode::SERVICE_UNAVAILABLE, &busy.to_string())),
        }
    } else {
        None
    };
    if req.method() == Method::CONNECT {
        return Ok(connect(req, ctx, slot).await);
    }
    let uri = req.uri();
    let Some(scheme) = uri.scheme_str() else {
        return Ok(model(req, ctx).await);
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let Some(dest) = uri
        .authority()
        .and_then(|a| Destination::parse(a.as_str(), default_port))
    else {
        return Ok(text(StatusCode::BAD_REQUEST, "no destination"));
    };
    if ctx.is_self(&dest) {
        return Ok(model(req, ctx).await);
    }
    if scheme != "http" {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "only http:// is proxied in absolute form; use CONNECT",
        ));
    }
    if !ctx.authorized(req.headers(), false) {
        return Ok(proxy_auth_required());
    }
    if !ctx.allowed(&dest) {
        return Ok(ctx.deny(dest, req.method().as_str()));
    }
    Ok(forward_plain(req, ctx).await)
}

/// The answer to a proxy request without the attempt's token.
fn proxy_auth_required() -> Response<Body> {
    let mut r = text(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "this proxy takes only requests with the attempt's proxy token",
    );
    r.headers_mut().insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"agent-orchestrator\""),
    );
    r
}

/// Whether `given` is `token`, in constant time.
fn same_token(given: &str, token: &SecretString) -> bool {
    subtle::ConstantTimeEq::ct_eq(given.trim().as_bytes(), token.expose_secret().as_bytes()).into()
}

/// The token in a credentials header: `Bearer <token>`, or `Basic` of `user:<token>`
/// (or of the token alone).
fn credential_token(value: &HeaderValue) -> Option<String> {
    use base64::Engine;
    let value = value.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    Some(match decoded.split_once(':') {
        Some((_, password)) => password.to_string(),
        None => decoded,
    })
}

impl Ctx {
    /// Whether `dest` is the proxy's own address as the sandbox reaches it.
    fn is_self(&self, dest: &Destination) -> bool {
        dest.port == self.options.inside_port
            && (matches!(dest.host.as_str(), "127.0.0.1" | "localhost")
                || self.options.advertised_host.as_deref() == Some(dest.host.as_str()))
    }

    /// Whether a request carries the attempt's token (always, when no token is set): as
    /// proxy credentials, or on the model endpoint (`model`) as its key.
    fn authorized(&self, headers: &HeaderMap, model: bool) -> bool {
        let Some(token) = &self.options.token else {
            return true;
        };
        let proxy = headers
            .get_all(header::PROXY_AUTHORIZATION)
            .iter()
            .filter_map(credential_token)
            .any(|t| same_token(&t, token));
        if proxy || !model {
            return proxy;
        }
        let key = headers
            .get_all("x-api-key")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|t| same_token(t, token));
        key || headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(credential_token)
            .any(|t| same_token(&t, token))
    }

    fn allowed(&self, dest: &Destination) -> bool {
        self.options.allow.iter().any(|a| a == dest)
    }

    /// Reports and refuses a destination.
    fn deny(&self, dest: Destination, method: &str) -> Response<Body> {
        let n = self.denials.fetch_add(1, Ordering::Relaxed);
        tracing::info!(host = %dest.host, port = dest.port, method, "sandbox network request refused");
        let at = ao_shared::timefmt::now()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        self.refused.lock().note(&dest, &at);
        if n < MAX_DENIAL_EVENTS {
            let event = NetworkDenied {
                host: dest.host.clone(),
                port: dest.port,
                method: method.to_string(),
                at,
            };
            let _ = self.events.try_send(event.into_event());
        }
        text(
            StatusCode::FORBIDDEN,
            &format!("{dest} is not on this run's network allow-list"),
        )
    }
}

async fn connect(req: Request<Incoming>, ctx: Arc<Ctx>, slot: Option<Slot>) -> Response<Body> {
    let Some(dest) = req
        .uri()
        .authority()
        .and_then(|a| Destination::parse(a.as_str(), 443))
    else {
        return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    // Before anything is opened, even a tunnel to the proxy itself: a tunnel holds a
    // connection's place for its whole life.
    let (true, Some(slot)) = (ctx.authorized(req.headers(), false), slot) else {
        return proxy_auth_required();
    };
    if ctx.is_self(&dest) {
        // A client that tunnels even plain HTTP (Node's proxy agents do) asks for the
        // proxy itself: the tunnel is served as the model endpoint.
        let stop = ctx.stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(upgraded) = hyper::upgrade::on(req).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| model_only(req, ctx.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(upgraded, service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
        return Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    }
    if !ctx.allowed(&dest) {
        return ctx.deny(dest, "CONNECT");
    }
    let upstream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((dest.host.as_str(), dest.port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return text(StatusCode::BAD_GATEWAY, &format!("{dest}: {e}")),
        Err(_) => return text(StatusCode::GATEWAY_TIMEOUT, &format!("{dest}: timed out")),
    };
    let stop = ctx.stop.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        let mut upstream = upstream;
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            _ = stop.cancelled() => {}
        }
    });
    Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync())
}

/// Headers that belong to one hop, or to the proxy, never forwarded.
const HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for h in HOP_HEADERS {
        out.remove(*h);
    }
    out
}

fn request_body(body: Incoming) -> reqwest::Body {
    reqwest::Body::wrap_stream(body.into_data_stream())
}

/// The answer of the next hop, streamed back, each chunk also handed to `observe`.
fn relay_answer(
    answer: reqwest::Response,
    mut observe: impl FnMut(&[u8]) + Send + 'static,
) -> Response<Body> {
    let status = answer.status();
    let headers = forwardable(answer.headers());
    let stream = answer.bytes_stream().map(move |chunk| match chunk {
        Ok(bytes) => {
            observe(&bytes);
            Ok(Frame::data(bytes))
        }
        Err(e) => Err(std::io::Error::other(e.without_url().to_string())),
    });
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

/// Chunks of a metered answer waiting for the client.
const METERED_CHUNKS: usize = 16;
/// How long the proxy's stop waits for model answers still being read for the meter.
const METER_DRAIN_WAIT: Duration = Duration::from_secs(30);

/// Like [`relay_answer`], but the answer is read to its end by the proxy whatever the
/// client does: a client that hangs up after the text still has the rest (where the
/// model reports the output tokens, in `message_delta`) metered, and `observe` (with the
/// call's budget permit) is dropped only then. [`RunProxy::stop`] waits for these reads
/// (up to [`METER_DRAIN_WAIT`]) before it sums up the run's metering.
fn relay_metered_answer(
    answer: reqwest::Response,
    mut observe: impl FnMut(&[u8]) + Send + 'static,
    ctx: &Ctx,
) -> Response<Body> {
    let status = answer.status();
    let headers = forwardable(answer.headers());
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(METERED_CHUNKS);
    let stop = ctx.drain_stop.clone();
    ctx.drains.spawn(async move {
        let mut upstream = answer.bytes_stream();
        let mut client = Some(tx);
        loop {
            let next = tokio::select! {
                n = upstream.next() => n,
                () = stop.cancelled() => break,
            };
            let Some(chunk) = next else { break };
            let item = match chunk {
                Ok(bytes) => {
                    observe(&bytes);
                    Ok(Frame::data(bytes))
                }
                Err(e) => Err(std::io::Error::other(e.without_url().to_string())),
            };
            let failed = item.is_err();
            if let Some(tx) = &client {
                if tx.send(item).await.is_err() {
                    // The client hung up: go on reading, for the meter only.
                    client = None;
                }
            }
            if failed {
                break;
            }
        }
    });
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = StreamBody::new(chunks);
    let mut r = Response::new(BodyExt::boxed_unsync(body));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

async fn forward_plain(req: Request<Incoming>, ctx: Arc<Ctx>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let sent = ctx
        .http
        .request(parts.method, parts.uri.to_string())
        .headers(forwardable(&parts.headers))
        .body(request_body(body))
        .send()
        .await;
    match sent {
        Ok(answer) => relay_answer(answer, |_| {}),
        Err(e) => text(StatusCode::BAD_GATEWAY, &e.without_url().to_string()),
    }
}

async fn model_only(req: Request<Incoming>, ctx: Arc<Ctx>) -> Result<Response<Body>, Infallible> {
    Ok(model(req, ctx).await)
}

async fn model(req: Request<Incoming>, ctx: Arc<Ctx>) -> Response<Body> {
    if !ctx.authorized(req.headers(), true) {
        tracing::info!("model call refused: without the attempt's proxy token");
        return api_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "the model endpoint takes only calls with the attempt's proxy token as the key",
        );
    }
    let Some(route) = &ctx.options.model else {
        return text(StatusCode::NOT_FOUND, "this run has no model endpoint");
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let bare = req.uri().path().trim_end_matches('/');
    if req.method() != Method::POST || !METERED_PATHS.contains(&bare) {
        tracing::info!(method = %req.method(), path = bare, "model call refused: not metered");
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!(
                "the worker's model proxy forwards only POST /v1/messages and POST \
                 /v1/messages/count_tokens (the calls it meters), not {} {bare}",
                req.method()
            ),
        );
    }
    // While a budget is set, one Messages call at a time, checked once every earlier
    // one was metered; the permit goes with the answer and is released when it ends.
    let mut permit = None;
    if route.budget_usd.is_some() && bare == MESSAGES_PATH {
        match ctx.budget_gate.clone().acquire_owned().await {
            Ok(p) => permit = Some(p),
            Err(_) => return api_error(StatusCode::SERVICE_UNAVAILABLE, "api_error", "stopping"),
        }
    }
    if let Some(budget) = route.budget_usd {
        let spent = ctx.meter.cost_usd();
        if spent >= budget {
            let why = format!(
                "the run's model budget of ${budget:.2} is spent (${spent:.2} metered by the worker)"
            );
            ctx.meter.refuse(why.clone());
            tracing::info!(spent, budget, "model call refused: budget spent");
            return api_error(StatusCode::FORBIDDEN, "permission_error", &why);
        }
    }
    let (parts, body) = req.into_parts();
    // The body is read whole (the model API takes at most [`MAX_MODEL_REQUEST_BYTES`]):
    // what it asks the model API to do is checked before it is sent.
    let body = match Limited::new(body, MAX_MODEL_REQUEST_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "the request body is unreadable or over the model API's 32 MB limit",
            )
        }
    };
    if let Some(why) = server_tools::refusal(&body) {
        tracing::info!(reason = %why, "model call refused: server-side tools");
        return api_error(StatusCode::BAD_REQUEST, "invalid_request_error", &why);
    }
    let mut headers = forwardable(&parts.headers);
    let betas: Vec<String> = headers
        .get_all(BETA_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(server_tools::client_betas)
        .collect();
    headers.remove(BETA_HEADER);
    for beta in betas {
        if let Ok(v) = HeaderValue::from_str(&beta) {
            headers.append(BETA_HEADER, v);
        }
    }
    headers.remove("x-api-key");
    headers.remove(header::AUTHORIZATION);
    // The meter reads the answer's bytes: a compressed answer (asked for by the agent)
    // would pass unmetered, so the model is asked for plain ones.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if let Some(key) = &route.key {
        match HeaderValue::from_str(key.expose_secret()) {
            Ok(mut v) => {
                v.set_sensitive(true);
                headers.insert("x-api-key", v);
            }
            Err(_) => {
                return api_error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "the worker's model key is not a valid header value",
                )
            }
        }
    }
    let url = format!("{}{}", route.upstream.trim_end_matches('/'), path);
    let request = ctx
        .http
        .request(parts.method, url)
        .headers(headers)
        .body(body);
    // Once sent, the call is the model API's to bill: it is seen through (its answer read
    // and metered, its budget permit held until then) on a task of its own. Were it this
    // handler's, an agent hanging up before the answer began would drop it, and the meter
    // with it: a free call past the budget. A call still unanswered when the run ends is
    // dropped then (a silent model would otherwise hold the run's end); one whose answer
    // has begun is read to its end for the meter, as any answer.
    let relay_ctx = ctx.clone();
    let call = ctx.drains.spawn(async move {
        let sent = tokio::select! {
            sent = request.send() => sent,
            () = relay_ctx.stop.cancelled() => {
                return api_error(StatusCode::SERVICE_UNAVAILABLE, "api_error", "the run ended");
            }
        };
        let answer = match sent {
            Ok(a) => a,
            Err(e) => {
                return api_error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    &format!("the model API is unreachable: {}", e.without_url()),
                )
            }
        };
        let streamed = answer
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"));
        let mut call = Metering {
            call: CallMeter::new(relay_ctx.meter.clone(), streamed, String::new()),
            _permit: permit,
        };
        relay_metered_answer(answer, move |bytes| call.feed(bytes), &relay_ctx)
    });
    match call.await {
        Ok(answer) => answer,
        Err(_) => api_error(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "the model call was stopped",
        ),
    }
}

/// One answer's meter and the budget permit of its call: the call is recorded (the
/// meter dropped, fields drop in order) before the permit lets the next call be checked
/// against the budget. Fed through its own method, so a closure holds it whole.
struct Metering {
    call: CallMeter,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Metering {
    fn feed(&mut self, bytes: &[u8]) {
        self.call.feed(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent opening far more connections than [`MAX_CONNECTIONS`] to the proxy's
    /// socket, each with a request, gets every one answered in the end, but never more
    /// than the bound served at once (each holds one of the worker's descriptors).
    /// Before the bound, all were accepted at once.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_flood_of_connections_is_served_at_most_the_bound_at_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (events, _rx) = mpsc::channel(16);
        let options = ProxyOptions {
            allow: Vec::new(),
            inside_port: 1,
            model: None,
            token: None,
            advertised_host: None,
        };
        let proxy = RunProxy::start(dir.path(), options, events).unwrap();
        let socket = proxy.socket();
        let clients = MAX_CONNECTIONS + 150;
        let mut held = Vec::new();
        for _ in 0..clients {
            let mut c = tokio::net::UnixStream::connect(&socket).await.unwrap();
            c.write_all(b"GET http://refused.invalid/ HTTP/1.1\r\nHost: refused.invalid\r\n\r\n")
                .await
                .unwrap();
            held.push(c);
        }
        // Each answer read, its connection is closed, making room for a waiting one.
        for mut c in held {
            let mut head = [0u8; 12];
            tokio::time::timeout(Duration::from_secs(30), c.read_exact(&mut head))
                .await
                .expect("answered")
                .unwrap();
            assert_eq!(&head, b"HTTP/1.1 403");
        }
        let peak = proxy.peak_connections();
        assert!(peak <= MAX_CONNECTIONS, "{peak} connections served at once");
        proxy.stop().await;
    }

    /// The first 12 bytes (`HTTP/1.1 NNN`) of the answer to `request` at `addr`.
    async fn status_of(addr: std::net::SocketAddr, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(30), c.read_exact(&mut head))
            .await
            .expect("answered")
            .unwrap();
        String::from_utf8_lossy(&head).to_string()
    }

    /// A proxy on TCP (a Nomad sandbox's) answers only requests with the attempt's
    /// token: as proxy credentials, or as the key on the model endpoint. Without it, or
    /// with another, 407 (401 on the model endpoint), whatever the destination.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_tcp_proxy_serves_only_requests_with_the_attempts_token() {
        use base64::Engine;
        let (events, _rx) = mpsc::channel(16);
        let options = ProxyOptions {
            allow: Vec::new(),
            inside_port: 1,
            model: None,
            token: Some("tok-0123".to_string().into()),
            advertised_host: None,
        };
        let proxy = RunProxy::start_tcp("127.0.0.1:0", "127.0.0.1", options, events)
            .await
            .unwrap();
        let addr = proxy.local_addr().unwrap();
        let basic = |cred: &str| {
            format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(cred)
            )
        };
        let connect = |auth: &str| {
            format!("CONNECT off.invalid:443 HTTP/1.1\r\nHost: off.invalid:443\r\n{auth}\r\n")
        };
        let plain = |auth: &str| {
            format!("GET http://off.invalid/ HTTP/1.1\r\nHost: off.invalid\r\n{auth}\r\n")
        };
        let model = |auth: &str| {
            format!(
                "POST /v1/messages HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 2\r\n\r\n{{}}"
            )
        };
        for refused in [
            connect(""),
            connect(&basic("ao:wrong")),
            plain(""),
            plain("Proxy-Authorization: Bearer wrong\r\n"),
            // The model key header is no proxy credential.
            plain("x-api-key: tok-0123\r\n"),
        ] {
            assert_eq!(status_of(addr, &refused).await, "HTTP/1.1 407", "{refused}");
        }
        for unauthorized in [model(""), model("x-api-key: wrong\r\n")] {
            assert_eq!(
                status_of(addr, &unauthorized).await,
                "HTTP/1.1 401",
                "{unauthorized}"
            );
        }
        // With the token, the request is judged on its destination: off the allow-list.
        for authorized in [
            connect(&basic("ao:tok-0123")),
            plain(&basic("anyone:tok-0123")),
            plain("Proxy-Authorization: Bearer tok-0123\r\n"),
        ] {
            assert_eq!(
                status_of(addr, &authorized).await,
                "HTTP/1.1 403",
                "{authorized}"
            );
        }
        // And on the model endpoint (this run has none).
        for authorized in [
            model("x-api-key: tok-0123\r\n"),
            model("Authorization: Bearer tok-0123\r\n"),
            model(&basic("ao:tok-0123")),
        ] {
            assert_eq!(
                status_of(addr, &authorized).await,
                "HTTP/1.1 404",
                "{authorized}"
            );
        }
        proxy.stop().await;
    }

    #[test]
    fn refusals_are_listed_by_destination_and_bounded() {
        let mut list = NetworkRefused::default();
        let d = |host: &str, port| Destination {
            host: host.into(),
            port,
        };
        list.note(&d("a.example", 443), "t1");
        list.note(&d("a.example", 443), "t2");
        list.note(&d("a.example", 80), "t3");
        for i in 0..MAX_REFUSED_LISTED {
            list.note(&d(&format!("h{i}.example"), 443), "t4");
        }
        assert_eq!(list.total, 3 + MAX_REFUSED_LISTED as u64);
        assert_eq!(list.refused.len(), MAX_REFUSED_LISTED);
        assert_eq!(list.unlisted, 2);
        let a = &list.refused[0];
        assert_eq!(
            (a.count, a.first_at.as_str(), a.last_at.as_str()),
            (2, "t1", "t2")
        );
        assert_eq!(list.refused[1].port, 80);
    }

    #[test]
    fn destinations_parse() {
        let d = |h: &str, p| {
            Some(Destination {
                host: h.into(),
                port: p,
            })
        };
        assert_eq!(
            Destination::parse("Registry.npmjs.org", 443),
            d("registry.npmjs.org", 443)
        );
        assert_eq!(
            Destination::parse("127.0.0.1:8080", 443),
            d("127.0.0.1", 8080)
        );
        assert_eq!(Destination::parse("[::1]:22", 443), d("::1", 22));
        assert_eq!(Destination::parse("a:b", 443), None);
        assert_eq!(Destination::parse("user@host:1", 443), None);
        assert_eq!(
            Destination::of_url("https://github.com/o/r.git"),
            d("github.com", 443)
        );
        assert_eq!(
            Destination::of_url("http://127.0.0.1:3000/o/r.git"),
            d("127.0.0.1", 3000)
        );
        assert_eq!(Destination::of_url("/srv/repo.git"), None);
    }
}
