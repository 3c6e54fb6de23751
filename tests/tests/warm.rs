//! Warm workers end to end, with the real binaries and bubblewrap: the per-worker mirror
//! (shared by concurrent runs, following a force-push, rebuilt when damaged, read-only to
//! the agent) and the setup cache (setup paid once per content, never restored into
//! another repository). Agents are shell scripts that record what they saw in a file the
//! runner commits, so each test reads it back from the pushed branch.

use ao_tests::{bare_repo, git, script, Cluster};
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

/// The agent: records the commit it started from, whether the mirror its clone borrows
/// from can be written, and what the setup left in `deps/stamp`.
const PROBE: &str = r#"
set +e
begin=$(date +%s%N)
sleep SLEEP
alt=$(cat .git/objects/info/alternates 2>/dev/null)
if [ -n "$alt" ]; then
  if ( echo x > "$alt/ao-planted" ) 2>/dev/null; then w=writable; else w=read-only; fi
else
  w=none
fi
{
  echo "start=$(git rev-parse HEAD)"
  echo "mirror=$w"
  echo "stamp=$(cat deps/stamp 2>/dev/null)"
  echo "begin=$begin"
  echo "end=$(date +%s%N)"
} > probe.txt
"#;

/// A setup that takes its time and leaves a unique stamp.
const SETUP: &str = "mkdir -p deps && date +%s%N > deps/stamp && echo \"$RANDOM\" >> deps/stamp\n";

const SETUP_CONFIG: &str = "[setup]\ncache = [\"deps\"]\nkey = [\"deps.lock\"]\n";

/// A cluster of bwrap workers whose agent is [`PROBE`], taking `sleep` seconds.
fn cluster(concurrency: &str, sleep: u32) -> Cluster {
    let mut c = Cluster::new(&[
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__WORKER__CONCURRENCY", concurrency),
    ]);
    let agent = script(
        c.dir.path(),
        "probe.sh",
        &PROBE.replace("SLEEP", &sleep.to_string()),
    );
    c.env
        .push(("AO__AGENT__COMMAND".into(), agent.display().to_string()));
    c
}

async fn run(c: &Cluster, repo: &Path, branch: &str) -> String {
    let id = submit(c, repo, branch).await;
    finish(c, &id).await;
    probe(repo, branch)
}

async fn submit(c: &Cluster, repo: &Path, branch: &str) -> String {
    c.submit_code(repo, branch, "probe").await.expect("submit")
}

async fn finish(c: &Cluster, id: &str) {
    let task = c.wait_ended(id, LIMIT).await.expect("task ends");
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
}

/// What the agent recorded on `branch`.
fn probe(repo: &Path, branch: &str) -> String {
    git(repo, &["show", &format!("{branch}:probe.txt")])
}

fn field<'a>(probe: &'a str, name: &str) -> &'a str {
    probe
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {probe}"))
}

fn mirrors(c: &Cluster) -> Vec<PathBuf> {
    let dir = c.dir.path().join("data").join("mirrors");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "git"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_runs_share_one_read_only_mirror() {
    // Each run lasts long enough for the other to start meanwhile.
    let mut c = cluster("2", 2);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    let a = submit(&c, &repo, "agent/a").await;
    let b = submit(&c, &repo, "agent/b").await;
    finish(&c, &a).await;
    finish(&c, &b).await;
    let main = git(&repo, &["rev-parse", "main"]);
    let mut spans = Vec::new();
    for branch in ["agent/a", "agent/b"] {
        let p = probe(&repo, branch);
        assert_eq!(field(&p, "start"), main, "{p}");
        assert_eq!(field(&p, "mirror"), "read-only", "{p}");
        let t = |n| field(&p, n).parse::<u128>().expect("time");
        spans.push((t("begin"), t("end")));
    }
    assert!(
        spans[0].0 < spans[1].1 && spans[1].0 < spans[0].1,
        "the runs did not overlap: {spans:?}"
    );
    let m = mirrors(&c);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(!m[0].join("objects").join("ao-planted").exists());
    git(&m[0], &["fsck", "--connectivity-only"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_force_push_between_runs_is_followed() {
    let mut c = cluster("1", 0);
    let repo = bare_repo(c.dir.path(), "project", &[("a.txt", "one\n")]);
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    let first = run(&c, &repo, "agent/first").await;
    let seed = c.dir.path().join("project-seed");
    std::fs::write(seed.join("a.txt"), "rewritten\n").expect("write");
    git(
        &seed,
        &["commit", "--quiet", "-a", "--amend", "-m", "rewritten"],
    );
    git(
        &seed,
        &[
            "push",
            "--quiet",
            "--force",
            repo.to_str().expect("utf-8"),
            "main",
        ],
    );
    let rewritten = git(&repo, &["rev-parse", "main"]);
    assert_ne!(field(&first, "start"), rewritten);
    let second = run(&c, &repo, "agent/second").await;
    assert_eq!(field(&second, "start"), rewritten, "{second}");
    assert_eq!(field(&second, "mirror"), "read-only", "{second}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_mirror_is_rebuilt_and_the_run_goes_on() {
    let mut c = cluster("1", 0);
    let repo = bare_repo(c.dir.path(), "project", &[("a.txt", "one\n")]);
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    run(&c, &repo, "agent/first").await;
    let m = mirrors(&c);
    assert_eq!(m.len(), 1, "{m:?}");
    // Every object file overwritten: the refs point at objects that cannot be read.
    for entry in walk(&m[0].join("objects")) {
        if entry.is_file() {
            std::fs::write(&entry, b"damaged").expect("damage");
        }
    }
    let second = run(&c, &repo, "agent/second").await;
    assert_eq!(field(&second, "start"), git(&repo, &["rev-parse", "main"]));
    assert_eq!(field(&second, "mirror"), "read-only", "{second}");
    assert!(c.logs().contains("rebuilding"), "{}", c.logs());
    git(&m[0], &["fsck", "--connectivity-only"]);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn setup_repo(dir: &Path, name: &str) -> PathBuf {
    bare_repo(
        dir,
        name,
        &[
            ("agent-setup.sh", SETUP),
            (".agent-orchestrator.toml", SETUP_CONFIG),
            ("deps.lock", "v1\n"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_runs_once_per_content() {
    let mut c = cluster("1", 0);
    let repo = setup_repo(c.dir.path(), "project");
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    let first = run(&c, &repo, "agent/first").await;
    let stamp = field(&first, "stamp").to_string();
    assert!(!stamp.is_empty(), "{first}");
    let second = run(&c, &repo, "agent/second").await;
    assert_eq!(field(&second, "stamp"), stamp, "the setup ran again");
    // A key file changes upstream: the setup runs again.
    let seed = c.dir.path().join("project-seed");
    std::fs::write(seed.join("deps.lock"), "v2\n").expect("write");
    git(&seed, &["commit", "--quiet", "-a", "-m", "v2"]);
    git(
        &seed,
        &["push", "--quiet", repo.to_str().expect("utf-8"), "main"],
    );
    let third = run(&c, &repo, "agent/third").await;
    assert_ne!(field(&third, "stamp"), stamp, "a stale setup was restored");
    assert!(!field(&third, "stamp").is_empty(), "{third}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setup_cache_is_never_restored_into_another_repository() {
    let mut c = cluster("1", 0);
    // Two repositories with the very same files, so the same setup inputs.
    let one = setup_repo(c.dir.path(), "one");
    let two = setup_repo(c.dir.path(), "two");
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    let a = run(&c, &one, "agent/a").await;
    let b = run(&c, &two, "agent/b").await;
    assert!(!field(&a, "stamp").is_empty(), "{a}");
    assert!(!field(&b, "stamp").is_empty(), "{b}");
    assert_ne!(
        field(&a, "stamp"),
        field(&b, "stamp"),
        "one repository's setup result was restored into the other"
    );
    // Each is cached on its own: a second run of `one` restores its own result.
    let again = run(&c, &one, "agent/again").await;
    assert_eq!(field(&again, "stamp"), field(&a, "stamp"));
}
