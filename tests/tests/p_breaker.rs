//! Attacks on the warm workers (the per-worker mirror and the setup cache), with the real
//! binaries, real git and bubblewrap: a hostile agent writing into the cache it restored
//! from, damage a killed worker leaves in a mirror (stale ref locks, an emptied `HEAD`, a
//! removed directory), a worker killed while a setup result is on its way into the cache,
//! and two workers sharing one data dir on one repository at once.

use ao_tests::{bare_repo, git, script, Cluster};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// The agent: records where it started, what the setup left, and (when it restored a
/// cached setup result) whether it could change that cached archive.
const AGENT: &str = r#"
set +e
sleep "$(cat nap 2>/dev/null || echo SLEEP)"
cached=none
for f in $(awk '{print $5}' /proc/self/mountinfo | grep '/setup-cache/.*\.tar$'); do
  cached=read-only
  if ( printf 'planted' >> "$f" ) 2>/dev/null; then cached=writable; fi
  if ( : > "$(dirname "$f")/planted.tar" ) 2>/dev/null; then cached=writable; fi
done
{
  echo "start=$(git rev-parse HEAD)"
  echo "stamp=$(head -n 1 deps/stamp 2>/dev/null)"
  echo "cached=$cached"
} > probe.txt
"#;

/// A setup leaving a unique stamp and `MB` MiB of noise, so that storing takes a moment.
const SETUP: &str =
    "mkdir -p deps && echo \"$(date +%s%N)-$RANDOM\" > deps/stamp && head -c MB000000 /dev/urandom > deps/blob\n";

const SETUP_CONFIG: &str = "[setup]\ncache = [\"deps\"]\nkey = [\"deps.lock\"]\n";

fn cluster(concurrency: &str, sleep: u32, extra: &[(&str, &str)]) -> Cluster {
    let mut env = vec![
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__WORKER__CONCURRENCY", concurrency),
    ];
    env.extend_from_slice(extra);
    let mut c = Cluster::new(&env);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &AGENT.replace("SLEEP", &sleep.to_string()),
    );
    c.env
        .push(("AO__AGENT__COMMAND".into(), agent.display().to_string()));
    c
}

fn setup_repo(dir: &Path, name: &str, mb: u32) -> PathBuf {
    bare_repo(
        dir,
        name,
        &[
            ("agent-setup.sh", &SETUP.replace("MB", &mb.to_string())),
            (".agent-orchestrator.toml", SETUP_CONFIG),
            ("deps.lock", "v1\n"),
        ],
    )
}

async fn submit(c: &Cluster, repo: &Path, branch: &str) -> String {
    c.submit_code(repo, branch, "probe").await.expect("submit")
}

async fn finish(c: &Cluster, id: &str) {
    let task = c.wait_ended(id, LIMIT).await.expect("task ends");
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
}

async fn run(c: &Cluster, repo: &Path, branch: &str) -> String {
    let id = submit(c, repo, branch).await;
    finish(c, &id).await;
    git(repo, &["show", &format!("{branch}:probe.txt")])
}

fn field<'a>(probe: &'a str, name: &str) -> &'a str {
    probe
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {probe}"))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn the_mirror(c: &Cluster) -> PathBuf {
    let m: Vec<PathBuf> = walk(&c.dir.path().join("data").join("mirrors"))
        .into_iter()
        .filter_map(|p| {
            p.ancestors()
                .find(|a| a.extension().is_some_and(|x| x == "git"))
                .map(Path::to_path_buf)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(m.len(), 1, "{m:?}");
    m[0].clone()
}

fn cache_entries(c: &Cluster) -> Vec<PathBuf> {
    walk(&c.dir.path().join("data").join("setup-cache"))
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|x| x == "tar")
                && !p.components().any(|c| c.as_os_str() == "incoming")
        })
        .collect()
}

fn push_new_commit(c: &Cluster, name: &str, file: &str, text: &str) -> String {
    let seed = c.dir.path().join(format!("{name}-seed"));
    std::fs::write(seed.join(file), text).expect("write");
    git(&seed, &["add", file]);
    git(&seed, &["commit", "--quiet", "-m", text.trim()]);
    let repo = c.dir.path().join(format!("{name}.git"));
    git(
        &seed,
        &["push", "--quiet", repo.to_str().expect("utf-8"), "main"],
    );
    git(&repo, &["rev-parse", "main"])
}

/// An agent that restored a cached setup result tries to append to the archive it was
/// given and to plant a new entry beside it; the next run must restore the original.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_poison_the_setup_cache_it_restored_from() {
    let mut c = cluster("1", 0, &[]);
    let repo = setup_repo(c.dir.path(), "project", 0);
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    let first = run(&c, &repo, "agent/first").await;
    let stamp = field(&first, "stamp").to_string();
    assert!(!stamp.is_empty(), "{first}");
    let entries = cache_entries(&c);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let before = std::fs::read(&entries[0]).expect("entry");
    let second = run(&c, &repo, "agent/second").await;
    assert_eq!(field(&second, "stamp"), stamp, "not restored: {second}");
    assert_eq!(field(&second, "cached"), "read-only", "{second}");
    assert_eq!(std::fs::read(&entries[0]).expect("entry"), before);
    assert_eq!(cache_entries(&c), entries, "an entry was planted");
    let third = run(&c, &repo, "agent/third").await;
    assert_eq!(field(&third, "stamp"), stamp, "{third}");
}

/// A worker killed in the middle of a fetch leaves git's ref locks in the mirror (and
/// the same for a `HEAD` emptied by a crash, or the whole directory removed by an
/// operator): the next run still starts from the current upstream, from a mirror.
#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_left_damaged_by_a_crash_is_repaired_for_the_next_run() {
    let mut c = cluster("1", 0, &[]);
    let repo = bare_repo(c.dir.path(), "project", &[("a.txt", "one\n")]);
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    run(&c, &repo, "agent/first").await;
    let mirror = the_mirror(&c);

    // Stale locks, as an interrupted `git fetch` leaves them.
    for lock in ["refs/heads/main.lock", "packed-refs.lock", "shallow.lock"] {
        let p = mirror.join(lock);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, "").expect("lock");
    }
    let main = push_new_commit(&c, "project", "a.txt", "two\n");
    let second = run(&c, &repo, "agent/second").await;
    assert_eq!(field(&second, "start"), main, "stale locks: {second}");
    assert_eq!(git(&the_mirror(&c), &["rev-parse", "main"]), main);

    // `HEAD` emptied.
    std::fs::write(mirror.join("HEAD"), "").expect("truncate");
    let main = push_new_commit(&c, "project", "a.txt", "three\n");
    let third = run(&c, &repo, "agent/third").await;
    assert_eq!(field(&third, "start"), main, "empty HEAD: {third}");
    git(&the_mirror(&c), &["fsck", "--connectivity-only"]);

    // Every ref file truncated (a crash before the data reached the disk).
    for p in walk(&mirror.join("refs")) {
        if p.is_file() {
            std::fs::write(&p, "").expect("truncate");
        }
    }
    let _ = std::fs::write(mirror.join("packed-refs"), "");
    let main = push_new_commit(&c, "project", "a.txt", "four\n");
    let fourth = run(&c, &repo, "agent/fourth").await;
    assert_eq!(field(&fourth, "start"), main, "truncated refs: {fourth}");

    // The directory removed under the running worker.
    std::fs::remove_dir_all(&mirror).expect("remove");
    let main = push_new_commit(&c, "project", "a.txt", "five\n");
    let fifth = run(&c, &repo, "agent/fifth").await;
    assert_eq!(field(&fifth, "start"), main, "removed mirror: {fifth}");
    git(&the_mirror(&c), &["fsck", "--connectivity-only"]);
}

/// The worker is killed while a run's setup result sits in the cache's incoming
/// directory (stored after the run). After a restart and another run, what the killed
/// run left must not stay on disk forever, uncounted by the cache's bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_setup_result_left_by_a_killed_worker_does_not_outlive_the_bound() {
    let mut c = cluster("1", 8, &[("AO__WARM__SETUP_CACHE_MAX_MB", "5")]);
    let repo = setup_repo(c.dir.path(), "project", 3);
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    let killed = submit(&c, &repo, "agent/killed").await;
    // Wait for the whole archive in the incoming directory (the agent then sleeps).
    let cache = c.dir.path().join("data").join("setup-cache");
    let deadline = Instant::now() + LIMIT;
    let left = loop {
        let full = walk(&cache).into_iter().find(|p| {
            p.components().any(|c| c.as_os_str() == "incoming")
                && std::fs::metadata(p).is_ok_and(|m| m.len() >= 3_000_000)
        });
        if let Some(p) = full {
            break p;
        }
        assert!(Instant::now() < deadline, "no archive\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Killed while the archive may still grow: whole or not, it is left in `incoming/`.
    c.workers[0].kill_hard();
    // The killed run is never run again (cancelled while no worker is up), so nothing
    // but a sweep of the incoming directory could remove what it left.
    let (status, body) = c
        .post_json(&format!("/api/v1/tasks/{killed}/cancel"))
        .await
        .expect("cancel");
    assert!(status < 300, "{status} {body}");
    c.wait_for_status(&killed, &["cancelled", "failed"], LIMIT)
        .await
        .expect("cancelled");
    c.start_worker(&[]);
    // A run of another repository (so another incoming directory, which the killed
    // run's cannot be confused with): its result is stored and the cache evicted.
    let second = setup_repo(c.dir.path(), "second", 3);
    let other = run(&c, &second, "agent/other").await;
    assert!(!field(&other, "stamp").is_empty(), "{other}");
    let total: u64 = walk(&cache)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    assert!(
        !left.exists() || total <= 5 * 1024 * 1024,
        "{} left by the killed run; the setup cache holds {total} bytes over its 5 MiB bound:\n{:#?}",
        left.display(),
        walk(&cache)
    );
}

/// Two worker processes on one data dir, two runs of one repository at once, both
/// missing the setup cache with the same key: both succeed, the mirror stays whole, and
/// the one stored entry is a result one of them produced, which a third run restores.
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_on_one_data_dir_share_mirror_and_cache_safely() {
    let mut c = cluster("1", 2, &[]);
    let repo = setup_repo(c.dir.path(), "project", 4);
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    c.start_worker(&[]);
    let a = submit(&c, &repo, "agent/a").await;
    let b = submit(&c, &repo, "agent/b").await;
    finish(&c, &a).await;
    finish(&c, &b).await;
    let show = |branch: &str| git(&repo, &["show", &format!("{branch}:probe.txt")]);
    let (pa, pb) = (show("agent/a"), show("agent/b"));
    git(&the_mirror(&c), &["fsck", "--connectivity-only"]);
    let entries = cache_entries(&c);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let third = run(&c, &repo, "agent/third").await;
    let stamp = field(&third, "stamp");
    assert!(
        stamp == field(&pa, "stamp") || stamp == field(&pb, "stamp"),
        "restored {stamp:?}, produced {pa} and {pb}"
    );
    let listed = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&entries[0])
        .output()
        .expect("tar");
    assert!(listed.status.success(), "the stored entry is no archive");
    let names = String::from_utf8_lossy(&listed.stdout);
    assert!(names.contains("deps/blob"), "{names}");
}

/// Two runs of one repository at once with different setup keys, both missing the
/// cache: each run's result must be stored. The run that ends first must not discard
/// the other's incoming result (before, the incoming directory was named by the subtask
/// id's first 8 hex digits, a UUIDv7 time prefix shared by every subtask of ~65 s).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_runs_with_different_keys_each_store_their_setup() {
    let mut c = cluster("2", 0, &[]);
    let repo = setup_repo(c.dir.path(), "project", 0);
    // Branch `agent/b`: another key, and an agent that takes longer.
    let seed = c.dir.path().join("project-seed");
    git(&seed, &["checkout", "--quiet", "-b", "agent/b"]);
    std::fs::write(seed.join("deps.lock"), "v2\n").expect("write");
    std::fs::write(seed.join("nap"), "5\n").expect("write");
    git(&seed, &["add", "-A"]);
    git(&seed, &["commit", "--quiet", "-m", "v2"]);
    git(
        &seed,
        &["push", "--quiet", repo.to_str().expect("utf-8"), "agent/b"],
    );
    c.start_coordinator().await.expect("coordinator");
    c.start_worker(&[]);
    let b = submit(&c, &repo, "agent/b").await;
    let a = submit(&c, &repo, "agent/a").await;
    finish(&c, &a).await;
    finish(&c, &b).await;
    let entries = cache_entries(&c);
    assert_eq!(
        entries.len(),
        2,
        "one run's setup result was lost: {entries:?}\n{}",
        c.logs()
    );
}
