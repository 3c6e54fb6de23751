//! The repository's setup in the runner: `agent-setup.sh`, run with none of the run's
//! secrets in its environment, or — when the worker has a cached result for the same key
//! (see `setup_cache.rs` in the worker) — that result unpacked instead. After a setup that
//! succeeded and whose key the worker asked to store, the paths of `[setup] cache` are
//! archived into the worker's incoming directory and the archive's SHA-256 reported on
//! the event stream, all before the agent starts.

use super::process;
use crate::spec::{RunSpec, SetupCacheSpec, SETUP_STORED_EVENT};
use ao_shared::setup::{cache_key, SetupConfig, REPO_CONFIG_PATH, SETUP_SCRIPT};
use ao_shared::task::{Outcome, OutcomeKind};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Limit of the repository's `agent-setup.sh`.
const SETUP_TIMEOUT: Duration = Duration::from_secs(900);
/// Limit of packing or unpacking a cached result.
const TAR_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs (or restores) the setup in `repo`. An error is the run's outcome. A result to
/// store goes to `channel` when the worker gave one, else into the store directory.
pub fn run(
    spec: &RunSpec,
    repo: &Path,
    channel: Option<std::fs::File>,
) -> Result<(), Box<Outcome>> {
    if !repo.join(SETUP_SCRIPT).is_file() {
        return Ok(());
    }
    let cached = spec
        .warm
        .setup
        .as_ref()
        .and_then(|c| working_copy_config(spec, repo, c));
    if let Some((cache, _)) = &cached {
        if let Some(archive) = &cache.restore {
            let t = Instant::now();
            match untar(archive, repo) {
                Ok(()) => {
                    super::log(format!(
                        "setup result restored from the cache in {} ms; agent-setup.sh not run",
                        t.elapsed().as_millis()
                    ));
                    return Ok(());
                }
                Err(e) => super::log(format!("cannot restore the cached setup ({e}); running it")),
            }
        }
    }
    super::log("running agent-setup.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(SETUP_SCRIPT).current_dir(repo);
    // The setup is the repository's code: it gets no secret of the run.
    for name in super::agent::secret_names() {
        cmd.env_remove(name);
    }
    // The model credentials too, even the placeholder the proxy mode sets: the setup has
    // no business with the model.
    for name in super::agent::AGENT_SECRETS {
        cmd.env_remove(name);
    }
    cmd.env_remove(crate::credentials::GIT_TOKEN_ENV)
        .env_remove(crate::spec::SECRET_NAMES_VAR);
    let t = Instant::now();
    match process::run_logged(&mut cmd, SETUP_TIMEOUT) {
        Ok(r) if r.success => super::log(format!(
            "agent-setup.sh done in {} ms",
            t.elapsed().as_millis()
        )),
        Ok(r) => {
            return Err(Box::new(Outcome::failed(
                OutcomeKind::AgentError,
                format!("agent-setup.sh failed ({}): {}", r.status, r.tail()),
                false,
            )))
        }
        Err(e) => {
            return Err(Box::new(Outcome::failed(
                OutcomeKind::Infrastructure,
                format!("agent-setup.sh: {e}"),
                true,
            )))
        }
    }
    if let Some((cache, config)) = cached {
        if let Some(store) = &cache.store {
            let out = match channel {
                Some(file) => ArchiveOut::Channel(file),
                None => ArchiveOut::File(store.join(format!("{}.tar", cache.key))),
            };
            match archive(repo, &config, out) {
                Ok(Some((sha256, bytes))) => super::emit(
                    SETUP_STORED_EVENT,
                    serde_json::json!({ "key": cache.key, "sha256": sha256, "bytes": bytes }),
                ),
                Ok(None) => super::log("the setup produced none of the cached paths"),
                Err(e) => super::log(format!("cannot archive the setup result: {e}")),
            }
        }
    }
    Ok(())
}

/// The working copy's `[setup]`, when its key is the one the worker computed (the
/// upstream may have moved between the worker's fetch and the clone).
fn working_copy_config<'a>(
    spec: &RunSpec,
    repo: &Path,
    cache: &'a SetupCacheSpec,
) -> Option<(&'a SetupCacheSpec, SetupConfig)> {
    let mut read = |path: &str| read_head(repo, path);
    let text = read(REPO_CONFIG_PATH)?;
    let config = SetupConfig::from_repo_config(std::str::from_utf8(&text).ok()?)?;
    let key = cache_key(&spec.repository, &config, &mut read)?;
    if key != cache.key {
        super::log("the setup inputs changed since the worker looked; no cache for this run");
        return None;
    }
    Some((cache, config))
}

/// A file of the commit the run starts from, as git stores it.
fn read_head(repo: &Path, path: &str) -> Option<Vec<u8>> {
    let out = Command::new("git")
        .args(["-c", "core.hooksPath=/dev/null", "cat-file", "blob"])
        .arg(format!("HEAD:{path}"))
        .current_dir(repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// Archives `present` (paths in `repo`) into `channel` as tar's output passes, hashing
/// it; returns its SHA-256 and size. Nothing of it is a file the agent could reach.
fn archive_to(
    repo: &Path,
    present: &[&String],
    mut channel: std::fs::File,
) -> Result<(String, u64), String> {
    use std::io::Write;
    let mut child = Command::new("tar")
        .args(["--create", "--file", "-", "--directory"])
        .arg(repo)
        .arg("--")
        .args(present.iter().map(|p| p.as_str()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| "tar: no output".to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    let copied = loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e.to_string()),
        };
        bytes += n as u64;
        h.update(&buf[..n]);
        if let Err(e) = channel.write_all(&buf[..n]) {
            break Err(format!("cannot send the setup result: {e}"));
        }
    };
    if copied.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| format!("tar: {e}"))?;
    copied?;
    if !status.success() {
        return Err(format!("tar failed ({status})"));
    }
    Ok((hex::encode(h.finalize()), bytes))
}

fn tar(args: &mut Command) -> Result<(), String> {
    match process::run_logged(args, TAR_TIMEOUT) {
        Ok(r) if r.success => Ok(()),
        Ok(r) => Err(format!("tar failed ({}): {}", r.status, r.tail())),
        Err(e) => Err(format!("tar: {e}")),
    }
}

fn untar(archive: &Path, repo: &Path) -> Result<(), String> {
    tar(Command::new("tar")
        .args(["--extract", "--no-same-owner", "--file"])
        .arg(archive)
        .arg("--directory")
        .arg(repo))
}

/// Where a setup result goes.
enum ArchiveOut {
    /// The setup channel inherited from the worker (the bwrap driver's).
    Channel(std::fs::File),
    /// A file (`store/<key>.tar`).
    File(std::path::PathBuf),
}

/// Archives the existing cached paths; returns the archive's SHA-256 and size, or
/// `None` when none of the paths exists.
fn archive(
    repo: &Path,
    config: &SetupConfig,
    out: ArchiveOut,
) -> Result<Option<(String, u64)>, String> {
    let present: Vec<&String> = config
        .cache
        .iter()
        .filter(|p| std::fs::symlink_metadata(repo.join(p.as_str())).is_ok())
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let file = match out {
        ArchiveOut::File(file) => file,
        ArchiveOut::Channel(channel) => return archive_to(repo, &present, channel).map(Some),
    };
    tar(Command::new("tar")
        .args(["--create", "--file"])
        .arg(&file)
        .arg("--directory")
        .arg(repo)
        .arg("--")
        .args(present))?;
    let mut f = std::fs::File::open(&file).map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        h.update(&buf[..n]);
    }
    Ok(Some((hex::encode(h.finalize()), bytes)))
}
