//! The network of a bwrap sandbox, by capability:
//! - `proxy` (the default): a network namespace of its own with only loopback, and the
//!   worker's per-run proxy (`crate::proxy`) as the one way out: the model endpoint
//!   (the key is added there, never in the sandbox) and the destinations on the run's
//!   allow-list (the repository's git host, `sandbox.allow_hosts`);
//! - `off` (`sandbox.network_off`): only loopback, no proxy;
//! - `open` (`sandbox.network_open`): the host's network, and the model key in the
//!   sandbox's environment, as before the proxy existed.
//!
//! The nomad driver uses the same proxy, options and ending ([`proxy_options`],
//! [`client_env`], [`finish_proxy`]) with the proxy on a TCP port of the worker (see
//! `nomad/mod.rs`).
//!
//! In every mode the host's unix sockets are out of reach: abstract ones live in the
//! host's network namespace (not shared but in `open`), and path sockets are files,
//! which the sandbox does not see where they live: all of `/run` is an empty tmpfs, and
//! the driver hides `/var` (with `/var/run`, `/var/tmp`, `/var/lib`, `/var/spool`),
//! `/tmp`, `/dev/shm` and the home directories as a whole, so a socket made there later,
//! or bound by a relative path, is out of reach too. Every other listening socket the
//! host lists in `/proc/net/unix` when the attempt starts (paths with spaces included)
//! is covered by an empty file.

use crate::proxy::{Destination, ModelRoute, ProxyOptions};
use crate::spec::RunSpec;
use ao_shared::config::{SandboxSettings, Settings};
use ao_shared::task::{Outcome, OutcomeKind};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where the proxy socket is inside the sandbox.
pub const INSIDE_SOCKET: &str = "/run/ao/proxy.sock";
/// The first loopback port tried for the runner's relay.
const FIRST_INSIDE_PORT: u16 = 3128;
/// The model key's variable; for `open` sandboxes only.
pub const MODEL_KEY_ENV: &str = "ANTHROPIC_API_KEY";
/// What the agent gets as its model key in `proxy` mode: not a key. Claude Code wants
/// one to start; the proxy replaces it.
pub const PLACEHOLDER_KEY: &str = "sk-ant-placeholder-the-worker-proxy-adds-the-key";
/// The model API when neither `agent.base_url` nor `ANTHROPIC_BASE_URL` says otherwise.
const DEFAULT_MODEL_URL: &str = "https://api.anthropic.com";

/// How a capability's sandbox reaches the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    Proxy,
    Off,
    Open,
}

impl NetworkMode {
    pub fn of(settings: &SandboxSettings, capability: ao_shared::capability::Capability) -> Self {
        if settings.network_off.contains(&capability) {
            Self::Off
        } else if settings.network_open.contains(&capability) {
            Self::Open
        } else {
            Self::Proxy
        }
    }
}

/// The model API the proxy forwards to.
pub fn model_upstream(settings: &Settings) -> String {
    settings
        .agent
        .base_url
        .clone()
        .or_else(|| std::env::var("ANTHROPIC_BASE_URL").ok())
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_MODEL_URL.into())
}

/// The allow-list of one run: the repository's git host and `sandbox.allow_hosts`.
/// Entries that do not parse are skipped (the configuration is checked at start).
pub fn allow_list(settings: &SandboxSettings, spec: &RunSpec) -> Vec<Destination> {
    let mut allow: Vec<Destination> = settings
        .allow_hosts
        .iter()
        .filter_map(|h| Destination::parse(h, 443))
        .collect();
    if let Some(git) = Destination::of_url(&spec.repository) {
        allow.push(git);
    }
    allow.dedup();
    allow
}

/// Checks `sandbox.allow_hosts` at start.
pub fn check_allow_hosts(settings: &SandboxSettings) -> Result<(), String> {
    for h in &settings.allow_hosts {
        if Destination::parse(h, 443).is_none() {
            return Err(format!(
                "sandbox.allow_hosts: {h:?} is not host, host:port or [v6]:port"
            ));
        }
    }
    Ok(())
}

/// The proxy's options for one run; `key` is the model key taken from the run's secrets.
pub fn proxy_options(
    settings: &Settings,
    spec: &RunSpec,
    key: Option<secrecy::SecretString>,
) -> ProxyOptions {
    let allow = allow_list(&settings.sandbox, spec);
    let mut inside_port = FIRST_INSIDE_PORT;
    while allow.iter().any(|d| d.port == inside_port) {
        inside_port += 1;
    }
    ProxyOptions {
        allow,
        inside_port,
        model: Some(ModelRoute {
            upstream: model_upstream(settings),
            key,
            budget_usd: spec.agent.profile.as_ref().and_then(|p| p.max_cost_usd),
        }),
        token: None,
        advertised_host: None,
    }
}

/// Ends a run's proxy and puts what it saw into the run's outcome: its metering
/// ([`apply_metering`]) and the destinations it refused (`network_refused`). The one
/// ending of every driver's proxy.
pub async fn finish_proxy(proxy: crate::proxy::RunProxy, outcome: &mut Outcome) {
    let (metered, refused) = proxy.stop().await;
    apply_metering(outcome, metered);
    if refused.total > 0 {
        outcome.network_refused = Some(refused);
    }
}

/// Puts the proxy's metering into the outcome: its cost and tokens are the run's (the
/// agent's own report could be forged), and a call refused for the budget makes the
/// outcome `budget_exceeded`.
pub fn apply_metering(outcome: &mut Outcome, metered: crate::proxy::meter::Metered) {
    outcome.cost_usd = metered.cost_usd;
    outcome.tokens = metered.tokens;
    if let Some(why) = metered.budget_refusal {
        if outcome.kind != OutcomeKind::Cancelled {
            let mut over = outcome.failed_after(OutcomeKind::BudgetExceeded, why, false);
            over.commit = outcome.commit.take();
            *outcome = over;
        }
    }
}

/// bubblewrap's network arguments: the namespace, the hidden `/run`, the proxy socket
/// and the covered host sockets. `hidden` says whether a host path is already covered.
pub fn bwrap_args(
    mode: NetworkMode,
    proxy_socket: Option<&Path>,
    hidden: &dyn Fn(&Path) -> bool,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    if mode != NetworkMode::Open {
        a.push("--unshare-net".into());
    }
    for run in ["/run", "/var/run"] {
        let p = Path::new(run);
        // /var/run is most often a link to /run, covered with it.
        if p.is_dir() && !p.is_symlink() {
            a.extend(["--tmpfs".into(), run.into()]);
        }
    }
    for socket in host_socket_paths() {
        if !hidden(&socket) && !socket.starts_with("/run") && !socket.starts_with("/var/run") {
            a.extend(["--ro-bind".into(), "/dev/null".into(), socket.into()]);
        }
    }
    if let Some(socket) = proxy_socket {
        a.extend([
            "--bind".into(),
            socket.as_os_str().to_owned(),
            INSIDE_SOCKET.into(),
        ]);
    }
    // `/run` is made read-only by the driver once everything it puts there is mounted.
    a
}

/// The environment of a `proxy` sandbox: the proxy for every common client, and Claude
/// Code's model endpoint.
pub fn proxy_env(inside_port: u16) -> Vec<(&'static str, String)> {
    let proxy = format!("http://127.0.0.1:{inside_port}");
    let mut env = client_env(&proxy, &proxy, PLACEHOLDER_KEY);
    env.push((crate::runner::relay::SOCKET_ENV, INSIDE_SOCKET.into()));
    env.push((
        crate::runner::relay::LISTEN_ENV,
        format!("127.0.0.1:{inside_port}"),
    ));
    env
}

/// The environment that sends every common client through a proxy: `proxy` (the proxy's
/// URL as clients use it, with credentials if it wants them) for HTTP(S), and Claude
/// Code's model endpoint `model_url` with `model_key` as its key (the proxy adds the
/// real one).
pub fn client_env(proxy: &str, model_url: &str, model_key: &str) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k, proxy.to_string()))
    .collect();
    env.push(("NO_PROXY", String::new()));
    env.push(("no_proxy", String::new()));
    env.push(("ANTHROPIC_BASE_URL", model_url.to_string()));
    env.push((MODEL_KEY_ENV, model_key.to_string()));
    env
}

/// The path of one line of `/proc/net/unix` (`Num RefCount Protocol Flags Type St Inode
/// Path`, the kernel's `unix_seq_show`): everything after the seventh field and one
/// space, as it is (a path may hold spaces); `None` for an unnamed socket.
fn socket_path_of(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..7 {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ')?;
        rest = &rest[end..];
    }
    rest.strip_prefix(' ').filter(|p| !p.is_empty())
}

/// Paths of the unix sockets bound on the host (in the worker's network namespace) that
/// exist as files, from `/proc/net/unix`. A socket bound by a relative path is listed
/// by that path, which names no file here: it is not found (the places such sockets
/// live are hidden as a whole, see the module documentation).
pub fn host_socket_paths() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = text
        .lines()
        .skip(1)
        .filter_map(socket_path_of)
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .filter(|p| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
        })
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_of_the_host_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(host_socket_paths().contains(&path));
    }

    #[test]
    fn a_socket_whose_path_has_spaces_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a  socket with spaces.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let found = host_socket_paths();
        assert!(found.contains(&path), "{found:?}");
    }

    #[test]
    fn lines_of_proc_net_unix_are_parsed() {
        let line = "0000000000000000: 00000002 00000000 00010000 0001 01  1234 /run/a b.sock";
        assert_eq!(socket_path_of(line), Some("/run/a b.sock"));
        let unnamed = "0000000000000000: 00000003 00000000 00000000 0001 03 56789";
        assert_eq!(socket_path_of(unnamed), None);
        let wide = "0000000000000000: 00000002 00000000 00010000 0001 01 123456789 rel.sock";
        assert_eq!(socket_path_of(wide), Some("rel.sock"));
    }
}
