//! What the tests of hostile command agents under `bwrap` share: a cluster whose worker
//! runs as root or as [`TEST_USER`], an agent started from a shell body, tasks submitted
//! and followed to their end, and files placed on the host as the sandbox's user and
//! removed afterwards. The tests place files as root: [`cluster`] skips (and says so)
//! when they do not run as root.

use crate::{running_as_root, script, test_user, Cluster, TEST_USER};
use serde_json::{json, Value};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a task may take to end.
pub const LIMIT: Duration = Duration::from_secs(120);

/// Who runs the worker.
#[derive(Clone, Copy, Debug)]
pub enum Worker {
    /// The worker runs as root; its sandboxes as `sandbox.host_uid`.
    Root,
    /// The worker runs as [`TEST_USER`]; its sandboxes as that user.
    Ordinary,
}

/// Every scenario's processes run as [`TEST_USER`]: tests that take that user's
/// allowances, or place files under the system directories, hold it for writing; the
/// others for reading. One per test binary.
pub static TEST_USER_PROCESSES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A `bwrap` cluster whose worker runs as `who`, with `extra` settings; `None`
/// (skipped, saying why) when the tests do not run as root.
///
/// # Panics
/// When [`TEST_USER`] is missing (`scripts/install-deps.sh test` makes it).
pub fn cluster(who: Worker, extra: &[(&str, &str)]) -> Option<Cluster> {
    if !running_as_root() {
        eprintln!("skipped: these attacks place files as root and run the worker as {TEST_USER}");
        return None;
    }
    let (uid, gid) = test_user().unwrap_or_else(|| {
        panic!("user {TEST_USER} is missing: run scripts/install-deps.sh test (as root)")
    });
    let mut settings = vec![("AO__SANDBOX__DRIVER", "bwrap")];
    settings.extend_from_slice(extra);
    let mut c = Cluster::new(&settings);
    if let Worker::Ordinary = who {
        c.run_as(uid, gid);
    }
    Some(c)
}

/// A name unique to this test process and call, for what a test places on the host.
pub fn tag(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("ao-hostile-{what}-{}-{nanos}", std::process::id())
}

/// Submits a `code` task on `repo` with the task branch `branch`; its id.
pub async fn submit(c: &Cluster, repo: &Path, branch: &str) -> String {
    let (status, task) = c
        .submit(json!({
            "repository": repo.display().to_string(),
            "prompt": "attack the sandbox",
            "pipeline": "code",
            "branch": branch,
        }))
        .await
        .expect("the coordinator answers");
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().expect("a task id").to_string()
}

/// Task `id` once it succeeded or failed (within [`LIMIT`]).
pub async fn finished(c: &Cluster, id: &str) -> Value {
    c.wait_for_status(id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends")
}

/// Starts the coordinator and one worker whose agent is the shell `body`, with `extra`
/// settings.
pub async fn start(c: &mut Cluster, body: &str, extra: &[(&str, &str)]) {
    let agent = script(c.dir.path(), "agent.sh", body);
    c.start_coordinator().await.expect("the coordinator starts");
    let command = agent.display().to_string();
    let mut settings = vec![("AO__AGENT__COMMAND", command.as_str())];
    settings.extend_from_slice(extra);
    c.start_worker(&settings);
}

/// Waits (within [`LIMIT`]) until the events of task `id` hold `said`; the text of the
/// events then.
pub async fn said(c: &Cluster, id: &str, said: &str) -> String {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let text =
            serde_json::to_string(&crate::scenario::events(c, id).await).expect("events are JSON");
        if text.contains(said) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never said {said}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sets `mode` and gives `path` to [`TEST_USER`].
pub fn own(path: &Path, mode: u32) {
    let (uid, gid) = test_user().expect("the test user");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    chown(path, Some(uid), Some(gid)).expect("chown");
}

/// Removes what a test placed on the host when dropped.
pub struct Placed(pub Vec<PathBuf>);

impl Drop for Placed {
    fn drop(&mut self) {
        for path in &self.0 {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::remove_dir_all(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
