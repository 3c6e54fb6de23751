//! Attacks on three sandbox defences: the model/egress proxy's admission of connections
//! (unproven until a request carries the attempt's token, a bound of places, a bounded
//! queue), each `bwrap` sandbox's share of the host user's inotify allowances (written
//! into its user namespace at a start gate), and the walk of the shown system
//! directories for private files before each sandbox. Hostile agents and hostile
//! parties on the cluster try what an attacker would, against the real coordinator and
//! worker binaries, bubblewrap, the fake Nomad and the real Claude Code CLI; each test
//! asserts the attack fails. Tests of attacks that got through are marked
//! `#[ignore = "fault: …"]`.
//!
//! The `bwrap` attacks place files under `/etc` and `/opt` as root: they skip (and say
//! so) when they do not run as root.

// Test helpers unwrap: a failed setup step is a failed test, with the panic saying where.
#![allow(clippy::unwrap_used)]

use ao_tests::fake_nomad::FakeNomad;
use ao_tests::hostile::{
    cluster, finished, own, said, start, submit, tag, Placed, Worker, LIMIT, TEST_USER_PROCESSES,
};
use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::stack::{nomad_env, nomad_options};
use ao_tests::{bare_repo, free_port, git, test_user, Cluster};
use serde_json::{json, Value};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The number after `key` in `text`.
fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"));
    text[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key} in:\n{text}"))
}

/// Two runs at once on a worker of `who`: the hog (`agent` script `body` on branch
/// `agent/hog`) takes an allowance until refused, says `<said>N`, and holds it; a
/// concurrent run (any other branch) commits `other.txt`. What the hog said it took,
/// the concurrent run's final state and its `other.txt`.
async fn hog_and_other(who: Worker, body: &str, said_key: &str) -> Option<(u64, Value, String)> {
    let mut c = cluster(who, &[("AO__WORKER__CONCURRENCY", "2")])?;
    let root = c.dir.path().to_path_buf();
    let hog = bare_repo(&root, "hog", &[]);
    let other = bare_repo(&root, "other", &[]);
    start(&mut c, body, &[]).await;
    let hog_id = submit(&c, &hog, "agent/hog").await;
    let text = said(&c, &hog_id, said_key).await;
    let made = number_after(&text, said_key);
    let other_id = submit(&c, &other, "agent/other").await;
    let done = finished(&c, &other_id).await;
    let _ = c.post_json(&format!("/api/v1/tasks/{hog_id}/cancel")).await;
    let _ = c
        .wait_for_status(&hog_id, &["cancelled", "failed", "succeeded"], LIMIT)
        .await;
    let seen = if done["status"] == "succeeded" {
        git(&other, &["show", "agent/other:other.txt"])
    } else {
        format!("(the run failed)\n{}", c.logs())
    };
    Some((made, done, seen))
}

// ---------------------------------------------------------------------------------
// The inotify shares, and per-user or per-host counts the shares do not cover.

/// The agent tries to raise its namespace's inotify share back: writing the setting
/// (shell and `open(2)`), the host-wide `fs.inotify` setting, the worker's own
/// `share-ucounts` subcommand (the sandbox's runner is the worker's program) on itself
/// and on pid 1, and a nested user namespace where it would own the setting. Each
/// fails; the share reads the same after; it makes no more instances than the share.
async fn the_inotify_share_cannot_be_raised_from_inside(who: Worker) {
    let Some(mut c) = cluster(who, &[("AO__WORKER__CONCURRENCY", "2")]) else {
        return;
    };
    let body = r#"set +e
{
echo "share-before=$(cat /proc/sys/user/max_inotify_instances)"
echo 100000 > /proc/sys/user/max_inotify_instances 2>/dev/null && echo RAISED-BY-WRITE
echo 100000 > /proc/sys/fs/inotify/max_user_instances 2>/dev/null && echo RAISED-GLOBAL
python3 -c 'import os; fd = os.open("/proc/sys/user/max_inotify_instances", os.O_WRONLY); os.write(fd, b"100000"); print("RAISED-BY-OPEN")' 2>/dev/null
for pid in 1 $$; do
  /run/ao/runner share-ucounts --pid $pid max_inotify_instances=100000 max_inotify_watches=10000000 2>/dev/null && echo RAISED-BY-RUNNER-$pid
done
unshare -Ur sh -c 'echo 100000 > /proc/sys/user/max_inotify_instances && echo RAISED-NESTED' 2>/dev/null
echo "share-after=$(cat /proc/sys/user/max_inotify_instances)"
python3 -c '
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 4096:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
print("made=%d" % len(fds))'
} > seen.txt 2>&1
exit 0
"#;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, body, &[]).await;
    let id = submit(&c, &repo, "agent/raise").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&repo, &["show", "agent/raise:seen.txt"]);
    assert!(!seen.contains("RAISED"), "{seen}");
    // The agent runs in a namespace nested in the sandbox's (bubblewrap's
    // `--disable-userns`), whose own setting is unbounded: the share above bounds it.
    let before = number_after(&seen, "share-before=");
    let after = number_after(&seen, "share-after=");
    assert_eq!(before, after, "{seen}");
    let host: u64 = std::fs::read_to_string("/proc/sys/user/max_inotify_instances")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let share = (host - host / 8) / 2;
    assert!(
        number_after(&seen, "made=") <= share,
        "share {share}:\n{seen}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inotify_share_cannot_be_raised_from_inside_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    the_inotify_share_cannot_be_raised_from_inside(Worker::Ordinary).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inotify_share_cannot_be_raised_from_inside_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    the_inotify_share_cannot_be_raised_from_inside(Worker::Root).await
}

/// The inotify starvation by watches rather than instances
/// (`user.max_inotify_watches`, shared out like the instances): the hog adds watches
/// on 2,000 files from as many instances as it may until refused, and holds them; a
/// concurrent run must still add one watch.
const WATCH_HOG_OR_OTHER: &str = r#"
set +e
cat > /tmp/w.py <<'PY'
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if sys.argv[1] == "hog":
    os.makedirs("/tmp/w", exist_ok=True)
    files = []
    for i in range(2000):
        p = "/tmp/w/%d" % i
        open(p, "w").close()
        files.append(p.encode())
    n, full, fds = 0, False, []
    while not full and len(fds) < 1000:
        fd = libc.inotify_init1(0)
        if fd < 0:
            break
        fds.append(fd)
        for p in files:
            if libc.inotify_add_watch(fd, p, 2) < 0:
                full = True
                break
            n += 1
    print("hog-watches=%d" % n); sys.stdout.flush()
    time.sleep(120)
else:
    fd = libc.inotify_init1(0)
    w = libc.inotify_add_watch(fd, b".", 2) if fd >= 0 else -1
    print("other-watch=%s" % ("ok" if w >= 0 else os.strerror(ctypes.get_errno())))
PY
if [ "$AO_BRANCH" = agent/hog ]; then
  python3 /tmp/w.py hog
else
  python3 /tmp/w.py other > other.txt 2>&1
fi
"#;

async fn a_hog_cannot_take_every_inotify_watch_of_the_host_user(who: Worker) {
    let Some((made, done, seen)) = hog_and_other(who, WATCH_HOG_OR_OTHER, "hog-watches=").await
    else {
        return;
    };
    assert_eq!(done["status"], "succeeded", "{done:#}\n{seen}");
    assert_eq!(seen.trim(), "other-watch=ok", "the hog held {made} watches");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hog_cannot_take_every_inotify_watch_of_the_host_user_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_hog_cannot_take_every_inotify_watch_of_the_host_user(Worker::Ordinary).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hog_cannot_take_every_inotify_watch_of_the_host_user_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_hog_cannot_take_every_inotify_watch_of_the_host_user(Worker::Root).await
}

/// Pipe buffers: the kernel counts the pages of every pipe of a host user
/// (`fs.pipe-user-pages-soft`, 16,384 pages by default), for the user on the host
/// whatever namespace it is in; past that, each new pipe of the user gets two pages
/// instead of sixteen and may not be grown. The hog makes 3,000 empty pipes (no memory
/// used: the pages are counted when the pipe is made) and holds them; a concurrent
/// run's new pipe must still have the usual 64 KiB and grow to 1 MiB.
const PIPE_HOG_OR_OTHER: &str = r#"
set +e
cat > /tmp/p.py <<'PY'
import fcntl, os, sys, time
if sys.argv[1] == "hog":
    ps = []
    while len(ps) < 3000:
        try:
            ps.append(os.pipe())
        except OSError:
            break
    print("hog-pipes=%d" % len(ps)); sys.stdout.flush()
    time.sleep(120)
else:
    r, w = os.pipe()
    size = fcntl.fcntl(w, 1032)
    try:
        fcntl.fcntl(w, 1031, 1 << 20)
        grown = "ok"
    except OSError as e:
        grown = e.strerror
    print("other-pipe=%d grow=%s" % (size, grown))
PY
if [ "$AO_BRANCH" = agent/hog ]; then
  python3 /tmp/p.py hog
else
  python3 /tmp/p.py other > other.txt 2>&1
fi
"#;

async fn a_hog_cannot_take_every_pipe_page_of_the_host_user(who: Worker) {
    let Some((made, done, seen)) = hog_and_other(who, PIPE_HOG_OR_OTHER, "hog-pipes=").await else {
        return;
    };
    assert_eq!(done["status"], "succeeded", "{done:#}\n{seen}");
    assert_eq!(
        seen.trim(),
        "other-pipe=65536 grow=ok",
        "the hog held {made} pipes"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "fault: one sandbox's empty pipes take the host user's fs.pipe-user-pages-soft; every other run's pipes shrink to 8 KiB and cannot grow"]
async fn a_hog_cannot_take_every_pipe_page_of_the_host_user_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_hog_cannot_take_every_pipe_page_of_the_host_user(Worker::Ordinary).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "fault: one sandbox's empty pipes take the host user's fs.pipe-user-pages-soft; every other run's pipes shrink to 8 KiB and cannot grow"]
async fn a_hog_cannot_take_every_pipe_page_of_the_host_user_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_hog_cannot_take_every_pipe_page_of_the_host_user(Worker::Root).await
}

/// Asynchronous I/O contexts: `fs.aio-max-nr` (65,536 events) bounds the whole host,
/// not a user or a namespace, and `io_setup` is not denied. The hog sets up contexts
/// until refused and holds them; a concurrent run must still set up one (databases and
/// emulators use them).
const AIO_HOG_OR_OTHER: &str = r#"
set +e
cat > /tmp/a.py <<'PY'
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def setup(n):
    ctx = ctypes.c_ulong(0)
    ok = libc.syscall(206, ctypes.c_long(n), ctypes.byref(ctx)) == 0
    return ctx if ok else None
if sys.argv[1] == "hog":
    held = []
    for n in (4096, 256, 1):
        while len(held) < 100000:
            c = setup(n)
            if c is None:
                break
            held.append(c)
    print("hog-contexts=%d" % len(held)); sys.stdout.flush()
    time.sleep(120)
else:
    c = setup(1)
    print("other-aio=%s" % ("ok" if c is not None else os.strerror(ctypes.get_errno())))
PY
if [ "$AO_BRANCH" = agent/hog ]; then
  python3 /tmp/a.py hog
else
  python3 /tmp/a.py other > other.txt 2>&1
fi
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_hog_cannot_take_every_aio_context_of_the_host_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some((made, done, seen)) =
        hog_and_other(Worker::Ordinary, AIO_HOG_OR_OTHER, "hog-contexts=").await
    else {
        return;
    };
    assert_eq!(done["status"], "succeeded", "{done:#}\n{seen}");
    // A hog that could set up none shows AIO is out of reach altogether.
    assert!(
        made == 0 || seen.trim() == "other-aio=ok",
        "the hog held {made} contexts: {seen}"
    );
}

/// Pseudo-terminals: `kernel.pty.max` (4,096) bounds the whole host, and every devpts
/// instance but the host's first shares what `kernel.pty.reserve` leaves (3,072);
/// bubblewrap's `--dev` makes one such instance per sandbox, with no `max=` of its own.
/// The hog opens `/dev/ptmx` until refused and holds them; a concurrent run must still
/// open one pty (`script`, `expect`, test runners that need a terminal).
const PTY_HOG_OR_OTHER: &str = r#"
set +e
cat > /tmp/t.py <<'PY'
import os, sys, time
if sys.argv[1] == "hog":
    fds = []
    while len(fds) < 6000:
        try:
            fds.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
        except OSError:
            break
    print("hog-ptys=%d" % len(fds)); sys.stdout.flush()
    time.sleep(120)
else:
    try:
        os.openpty()
        print("other-pty=ok")
    except OSError as e:
        print("other-pty=%s" % e.strerror)
PY
if [ "$AO_BRANCH" = agent/hog ]; then
  python3 /tmp/t.py hog
else
  python3 /tmp/t.py other > other.txt 2>&1
fi
"#;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "fault: bubblewrap's devpts has no max=; one sandbox takes every pty the host leaves to non-initial devpts instances"]
async fn a_hog_cannot_take_every_pseudo_terminal_of_the_host_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some((made, done, seen)) =
        hog_and_other(Worker::Ordinary, PTY_HOG_OR_OTHER, "hog-ptys=").await
    else {
        return;
    };
    assert_eq!(done["status"], "succeeded", "{done:#}\n{seen}");
    // A hog that could open none shows ptys are out of reach altogether.
    assert!(
        made == 0 || seen.trim() == "other-pty=ok",
        "the hog held {made} ptys: {seen}"
    );
}

/// File descriptors in flight over unix sockets: the kernel counts them per host user
/// (`user_struct.unix_inflight`, whatever namespace), and refuses to pass more
/// (`ETOOMANYREFS`) once that count exceeds the sender's RLIMIT_NOFILE. The hog sends
/// its own descriptors over socket pairs it never reads until refused, and holds them;
/// a concurrent run must still pass one descriptor (headless browsers, language
/// servers and build tools pass descriptors so).
const INFLIGHT_HOG_OR_OTHER: &str = r#"
set +e
cat > /tmp/f.py <<'PY'
import os, socket, sys, time
if sys.argv[1] == "hog":
    n, pairs, err = 0, [], ""
    while n < 100000 and not err:
        a, b = socket.socketpair()
        a.setblocking(False)
        pairs.append((a, b))
        while True:
            try:
                socket.send_fds(a, [b"x"], [b.fileno()] * 250)
                n += 250
            except BlockingIOError:
                break
            except OSError as e:
                err = e.strerror
                break
    print("hog-inflight=%d %s" % (n, err)); sys.stdout.flush()
    time.sleep(120)
else:
    a, b = socket.socketpair()
    try:
        socket.send_fds(a, [b"x"], [b.fileno()])
        print("other-pass=ok")
    except OSError as e:
        print("other-pass=%s" % e.strerror)
PY
if [ "$AO_BRANCH" = agent/hog ]; then
  python3 /tmp/f.py hog
else
  python3 /tmp/f.py other > other.txt 2>&1
fi
"#;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "fault: descriptors in flight are counted per host user: one sandbox's unread SCM_RIGHTS make every other run's fd passing fail (ETOOMANYREFS)"]
async fn a_hog_cannot_take_every_descriptor_in_flight_of_the_host_user_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some((made, done, seen)) =
        hog_and_other(Worker::Ordinary, INFLIGHT_HOG_OR_OTHER, "hog-inflight=").await
    else {
        return;
    };
    assert_eq!(done["status"], "succeeded", "{done:#}\n{seen}");
    assert_eq!(
        seen.trim(),
        "other-pass=ok",
        "the hog held {made} in flight"
    );
}

/// Per-user kernel counts the shares leave out must be out of the agent's reach
/// altogether: keys (`kernel.keys.maxkeys`/`maxbytes`, per host uid in every
/// namespace) through `add_key` and `keyctl`, and fanotify groups
/// (`user.max_fanotify_groups`) through `fanotify_init`. Each call is refused.
#[tokio::test(flavor = "multi_thread")]
async fn keys_and_fanotify_groups_are_out_of_reach_ordinary_worker() {
    let _shared = TEST_USER_PROCESSES.read().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[]) else {
        return;
    };
    let body = r#"set +e
python3 -c '
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def tried(name, r):
    print("%s=%s" % (name, "ALLOWED" if r >= 0 else os.strerror(ctypes.get_errno())))
# add_key("user", "k", "v", 1, KEY_SPEC_SESSION_KEYRING)
tried("add_key", libc.syscall(248, b"user", b"k", b"v", ctypes.c_size_t(1), ctypes.c_int(-3)))
# keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)
tried("keyctl", libc.syscall(250, 1, None))
# fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID, O_RDONLY)
tried("fanotify_init", libc.syscall(300, 0x200, 0))
' > seen.txt 2>&1
exit 0
"#;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, body, &[]).await;
    let id = submit(&c, &repo, "agent/keys").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&repo, &["show", "agent/keys:seen.txt"]);
    assert!(seen.contains("fanotify_init="), "{seen}");
    assert!(!seen.contains("ALLOWED"), "{seen}");
}

// ---------------------------------------------------------------------------------
// The walk for private files.

/// A private file of the sandbox's host user placed under `/etc` while a run is under
/// way (after its walk and its mounts): the agent, which waits for it, must not read it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "fault: files made private after a sandbox's walk stay readable for that whole run (the walk is per sandbox; nothing covers later files)"]
async fn a_private_file_placed_during_the_run_is_unseen_ordinary_worker() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[]) else {
        return;
    };
    let etc = Path::new("/etc").join(tag("during"));
    let _placed = Placed(vec![etc.clone()]);
    std::fs::create_dir_all(&etc).unwrap();
    own(&etc, 0o755);
    let key = etc.join("late.key");
    let body = format!(
        r#"set +e
echo agent-ready
for i in $(seq 1 200); do
  if [ -s {k} ]; then sleep 0.2; cat {k} > seen.txt 2>&1; break; fi
  sleep 0.1
done
[ -f seen.txt ] || echo never-appeared > seen.txt
exit 0
"#,
        k = key.display()
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, &body, &[]).await;
    let id = submit(&c, &repo, "agent/during").await;
    said(&c, &id, "agent-ready").await;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .unwrap();
    own(&key, 0o600);
    f.write_all(b"O3-DURING-RUN-9101").unwrap();
    drop(f);
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&repo, &["show", "agent/during:seen.txt"]);
    assert!(!seen.contains("O3-DURING-RUN-9101"), "read:\n{seen}");
}

/// Many private files of the host user under `/etc` (40,000 files of mode 0600 in one
/// world-readable directory, as a cache or a mail spool kept there would hold): each
/// is covered by a mount of its own, on bubblewrap's command line. A run must still
/// start and succeed (covering the directory, or failing clearly, not every run).
#[tokio::test(flavor = "multi_thread")]
async fn many_private_files_under_a_system_directory_break_no_run_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[("AO__COORDINATOR__MAX_ATTEMPTS", "1")]) else {
        return;
    };
    let (uid, gid) = test_user().unwrap();
    let etc = Path::new("/etc").join(tag("many"));
    let _placed = Placed(vec![etc.clone()]);
    std::fs::create_dir_all(&etc).unwrap();
    own(&etc, 0o755);
    for i in 0..40_000 {
        use std::os::unix::fs::OpenOptionsExt;
        let p = etc.join(format!("f{i:05}"));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        chown(&p, Some(uid), Some(gid)).unwrap();
    }
    let body = format!(
        "set +e\n{{ cat {}/f00000 2>&1 && echo READ; echo ran; }} > seen.txt\nexit 0\n",
        etc.display()
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, &body, &[]).await;
    let id = submit(&c, &repo, "agent/many").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&repo, &["show", "agent/many:seen.txt"]);
    assert!(seen.contains("ran") && !seen.contains("READ"), "{seen}");
}

/// `sandbox.ro_paths` naming a link (`/opt/<x>/tool`) that the host retargets while a
/// sandbox is being made: the walk judges the target it found (a directory of public
/// files), the bind shows the target found later (a directory with a 0600 key of the
/// host user). The retargeting is timed by the walk itself: the test waits for the
/// walk to open the first target, then switches the link. The key must not be read.
#[tokio::test(flavor = "multi_thread")]
async fn a_ro_path_link_switched_during_the_walk_shows_no_private_file_ordinary_worker() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let _alone = TEST_USER_PROCESSES.write().await;
    let base = Path::new("/opt").join(tag("switch"));
    let link = base.join("tool");
    let link_text = link.display().to_string();
    let Some(mut c) = cluster(Worker::Ordinary, &[("AO__SANDBOX__RO_PATHS", &link_text)]) else {
        return;
    };
    let _placed = Placed(vec![base.clone()]);
    let (public, private) = (base.join("public"), base.join("private"));
    for d in [&base, &public, &private] {
        std::fs::create_dir_all(d).unwrap();
        own(d, 0o755);
    }
    std::fs::write(public.join("key"), "O3-PUBLIC-9300").unwrap();
    own(&public.join("key"), 0o644);
    // Enough public files that the walk is still in this directory when the link moves.
    for i in 0..30_000 {
        std::fs::File::create(public.join(format!("p{i:05}"))).unwrap();
    }
    std::fs::write(private.join("key"), "O3-SWITCHED-KEY-9301").unwrap();
    own(&private.join("key"), 0o600);
    std::os::unix::fs::symlink(&public, &link).unwrap();
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(
        &mut c,
        &format!(
            "set +e\ncat {}/key > seen.txt 2>&1\nexit 0\n",
            link.display()
        ),
        &[],
    )
    .await;
    // Watches the public target for the walk's opening of it, then switches the link.
    let watch = Inotify::init(InitFlags::empty()).unwrap();
    watch.add_watch(&public, AddWatchFlags::IN_OPEN).unwrap();
    let switch = {
        let (private, link) = (private.clone(), link.clone());
        std::thread::spawn(move || {
            let _ = watch.read_events();
            let temp = link.with_extension("new");
            std::os::unix::fs::symlink(&private, &temp).unwrap();
            std::fs::rename(&temp, &link).unwrap();
        })
    };
    let id = submit(&c, &repo, "agent/switch").await;
    let done = finished(&c, &id).await;
    let switched = switch.is_finished();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&repo, &["show", "agent/switch:seen.txt"]);
    assert!(switched, "the walk never opened the link's target:\n{seen}");
    assert!(!seen.contains("O3-SWITCHED-KEY-9301"), "read:\n{seen}");
}

// ---------------------------------------------------------------------------------
// The proxy's admission, on the Nomad driver's per-attempt TCP proxy.
//
// One attempt runs for all of these tests (and a concurrent one of another task): the
// real coordinator and worker on the `nomad` driver, the fake Nomad running the real
// `worker runner` with the real Claude Code CLI against the scripted model server. The
// agent dumps its environment (where the test reads the proxy's address and token) and
// waits until every attack has run; each test attacks the live proxy from outside.

/// The model key: the worker's `agent.api_key` only.
const MODEL_KEY: &str = "sk-ant-o-breaker3-0123456789abcdef";
/// The proxy tests of this file and whether each is ignored: the attempt ends once all
/// of those this run selects are done.
const PROXY_TESTS: &[(&str, bool)] = &[
    (
        "a_flood_of_connections_without_the_token_does_not_close_the_attempts_own",
        true,
    ),
    (
        "token_less_connections_kept_busy_with_refused_requests_are_still_closed",
        false,
    ),
    (
        "a_flood_does_not_close_the_attempts_connections_during_the_proxy_challenge",
        true,
    ),
    (
        "connections_refused_as_busy_hold_no_descriptors_of_the_worker",
        false,
    ),
];

/// The proxy tests this run of the test binary selects (its filters, `--skip`,
/// `--exact`, `--ignored`, `--include-ignored`).
fn selection() -> Vec<&'static str> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let (ignored, include, exact) = (
        flag("--ignored"),
        flag("--include-ignored"),
        flag("--exact"),
    );
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--skip" => skips.extend(it.next().cloned()),
            "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" => {
                it.next();
            }
            a if a.starts_with('-') => {}
            a => filters.push(a.to_string()),
        }
    }
    let matches = |name: &str, f: &String| {
        if exact {
            name == f
        } else {
            name.contains(f.as_str())
        }
    };
    PROXY_TESTS
        .iter()
        .filter(|(_, ig)| if ignored { *ig } else { include || !*ig })
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| matches(name, f)))
        .filter(|(name, _)| !skips.iter().any(|f| matches(name, f)))
        .map(|(name, _)| *name)
        .collect()
}

/// The running attempt and what the attacks need of it.
struct Fixture {
    /// The proxy's `host:port`.
    proxy: String,
    token: String,
    worker_pid: i32,
    /// A concurrent attempt of another task on the same worker: its proxy and token.
    other_proxy: String,
    other_token: String,
    /// Kept running for the attempt.
    _model: ModelServer,
    _fake: FakeNomad,
    task_ids: Vec<String>,
    cluster: Mutex<Cluster>,
    /// Signals the end of the attacks; answered when the attempt is over.
    finish: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    finished: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

static FIXTURE: OnceLock<&'static Fixture> = OnceLock::new();
static DONE: AtomicUsize = AtomicUsize::new(0);
/// The attacks hold the proxy alone.
static FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held by each proxy test; the last one to end lets the attempt finish and waits.
struct Use(&'static Fixture);

impl Drop for Use {
    fn drop(&mut self) {
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 == selection().len() {
            if let Some(tx) = self.0.finish.lock().unwrap().take() {
                let _ = tx.send(());
            }
            if let Some(rx) = self.0.finished.lock().unwrap().take() {
                let _ = rx.recv_timeout(Duration::from_secs(90));
            }
        }
    }
}

fn fixture() -> Use {
    Use(FIXTURE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run_fixture(tx));
        });
        rx.recv_timeout(Duration::from_secs(180))
            .expect("the attempt did not start")
    }))
}

async fn run_fixture(ready: std::sync::mpsc::Sender<&'static Fixture>) {
    let nomad_port = free_port();
    let addr = format!("http://127.0.0.1:{nomad_port}");
    let env = nomad_env(&addr);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    let fake = FakeNomad::start_on(nomad_port, nomad_options(c.dir.path(), 2))
        .await
        .unwrap();
    fake.register_sandbox_job("coder").await.unwrap();
    let env_dir = c.dir.path().join("agent-envs");
    std::fs::create_dir_all(&env_dir).unwrap();
    std::fs::set_permissions(&env_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let go = c.dir.path().join("attacks-done");
    let wait = format!(
        "env > $(mktemp {env}/env-XXXXXX); for i in $(seq 1 2400); do [ -f {go} ] && break; sleep 0.1; done; \
         echo waited",
        env = env_dir.display(),
        go = go.display()
    );
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool("Bash", json!({ "command": wait, "timeout": 300000 })),
            10,
            10,
        ),
        Turn::new(Step::text("done"), 10, 1),
    ])
    .await;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let cli = claude_cli().display().to_string();
    c.start_coordinator().await.unwrap();
    c.start_worker(&[
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__COMMAND", cli.as_str()),
        ("AO_TEST_MODEL_KEY", MODEL_KEY),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ("AO__AGENT__BASE_URL", model.url.as_str()),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
        ("AO__WORKER__CONCURRENCY", "2"),
    ]);
    let mut task_ids = Vec::new();
    for branch in ["agent/breaker", "agent/other"] {
        let (status, task) = c
            .submit(json!({
                "repository": repo.display().to_string(),
                "prompt": "Add a note",
                "pipeline": ["coder"],
                "branch": branch
            }))
            .await
            .unwrap();
        assert_eq!(status, 202, "{task}");
        task_ids.push(task["id"].as_str().unwrap().to_string());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    // The proxy and token of each attempt, from its agent's environment.
    let mut attempts: Vec<(String, String)> = loop {
        let found: Vec<(String, String)> = std::fs::read_dir(&env_dir)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .filter_map(|t| {
                let token = t
                    .lines()
                    .find_map(|l| l.strip_prefix("ANTHROPIC_API_KEY="))?;
                let base = t
                    .lines()
                    .find_map(|l| l.strip_prefix("ANTHROPIC_BASE_URL="))?;
                t.contains("HTTPS_PROXY=").then(|| {
                    (
                        base.trim_start_matches("http://")
                            .trim_end_matches('/')
                            .to_string(),
                        token.to_string(),
                    )
                })
            })
            .collect();
        if found.len() == 2 {
            break found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agents never ran:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (other_proxy, other_token) = attempts.pop().unwrap();
    let (proxy, token) = attempts.pop().unwrap();
    assert_ne!(proxy, other_proxy);
    let (finish_tx, finish_rx) = std::sync::mpsc::channel();
    let (finished_tx, finished_rx) = std::sync::mpsc::channel();
    let worker_pid = c.workers[0].pid().as_raw();
    let f: &'static Fixture = Box::leak(Box::new(Fixture {
        proxy,
        token,
        worker_pid,
        other_proxy,
        other_token,
        _model: model,
        _fake: fake,
        task_ids,
        cluster: Mutex::new(c),
        finish: Mutex::new(Some(finish_tx)),
        finished: Mutex::new(Some(finished_rx)),
    }));
    ready.send(f).unwrap();
    let _ = tokio::task::spawn_blocking(move || finish_rx.recv()).await;
    std::fs::write(&go, "go").unwrap();
    for id in &f.task_ids {
        let (http, url) = {
            let c = f.cluster.lock().unwrap();
            (c.http.clone(), c.url(&format!("/api/v1/tasks/{id}")))
        };
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < end {
            let status = match http.get(&url).bearer_auth(ao_tests::TOKEN).send().await {
                Ok(r) => r.json::<Value>().await.unwrap_or_default()["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                Err(_) => String::new(),
            };
            if matches!(status.as_str(), "succeeded" | "failed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Stop the daemons before the test process exits.
    let mut c = f.cluster.lock().unwrap();
    for w in c.workers.iter_mut() {
        w.kill_hard();
    }
    if let Some(d) = c.coordinator.as_mut() {
        d.kill_hard();
    }
    drop(c);
    let _ = finished_tx.send(());
}

/// Sends `request` raw to `addr` and returns what came back within `limit` (up to the
/// end of the answer's head).
async fn raw_at(addr: &str, request: &[u8], limit: Duration) -> String {
    let Ok(Ok(mut s)) = tokio::time::timeout(limit, TcpStream::connect(addr)).await else {
        return "connect failed".into();
    };
    if s.write_all(request).await.is_err() {
        return "write failed".into();
    }
    read_head(&mut s, limit).await
}

/// What `s` answers within `limit`, up to the end of one answer's head.
async fn read_head(s: &mut TcpStream, limit: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

/// The status code of an HTTP answer's head (0 when there is none).
fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A keep-alive call of the model endpoint the proxy answers itself (404) with `token`
/// as the key: it proves the connection.
fn own_call(token: &str) -> Vec<u8> {
    format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {token}\r\n\r\n").into_bytes()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Raises this process's soft limit of open files to its hard limit; the soft limit.
fn raise_own_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let soft = hard.min(65536);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    soft
}

/// Floods `f`'s proxy from `loops` loops of connections without the token (each loop
/// keeping its newest 100 open) while the attempt makes `calls` calls, each on a fresh
/// connection: with the token at once, or (`challenged`) first without it (answered
/// 407, as a client that waits for the proxy's challenge) and then with it. The calls
/// not answered 404, and how many connections the flood opened.
async fn flooded(
    f: &Fixture,
    loops: usize,
    calls: usize,
    challenged: bool,
) -> (Vec<(usize, String)>, usize) {
    raise_own_nofile();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for _ in 0..loops {
        let (stop, opened, proxy) = (stop.clone(), opened.clone(), f.proxy.clone());
        flooders.push(tokio::spawn(async move {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(s) = TcpStream::connect(&proxy).await {
                    opened.fetch_add(1, Ordering::SeqCst);
                    held.push_back(s);
                    if held.len() > 100 {
                        held.pop_front();
                    }
                }
            }
        }));
    }
    // The flood under way first.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while opened.load(Ordering::SeqCst) < 500 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut failed = Vec::new();
    let limit = Duration::from_secs(5);
    for i in 0..calls {
        let began = std::time::Instant::now();
        let a = if challenged {
            match tokio::time::timeout(limit, TcpStream::connect(&f.proxy)).await {
                Ok(Ok(mut s)) => {
                    let _ = s
                        .write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
                        .await;
                    let challenge = read_head(&mut s, limit).await;
                    if status(&challenge) == 407 {
                        let _ = s.write_all(&own_call(&f.token)).await;
                        read_head(&mut s, limit).await
                    } else {
                        format!("no challenge: {challenge}")
                    }
                }
                _ => "connect failed".into(),
            }
        } else {
            raw_at(&f.proxy, &own_call(&f.token), limit).await
        };
        if status(&a) != 404 {
            failed.push((i, format!("after {:?}: {a:?}", began.elapsed())));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for fl in flooders {
        let _ = fl.await;
    }
    (failed, opened.load(Ordering::SeqCst))
}

/// Another party on the cluster that reaches the proxy's port without the token opens
/// connections as fast as it can (eight loops) while the attempt makes 300 calls, each sending its
/// request at once. Every call of the attempt must be answered: the flood may close
/// only its own connections.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "fault: under load a flood of token-less connections still evicts, now and then, an attempt's connection that is unproven for a round trip (1 of 300 calls in a CI run)"]
async fn a_flood_of_connections_without_the_token_does_not_close_the_attempts_own() {
    let u = fixture();
    let _flood = FLOOD.lock().await;
    let (failed, flood) = flooded(u.0, 8, 300, false).await;
    assert!(
        failed.is_empty(),
        "{} of the attempt's 300 calls failed during a flood of {flood} connections: {:?}",
        failed.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
}

/// The same flood while the attempt's client answers the proxy's
/// challenge: its connection stays unproven for a round trip. Every call of the
/// attempt must still be answered.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "fault: under load a flood of token-less connections still evicts, now and then, an attempt's connection that is unproven for a round trip (1 of 300 calls in a CI run)"]
async fn a_flood_does_not_close_the_attempts_connections_during_the_proxy_challenge() {
    let u = fixture();
    let _flood = FLOOD.lock().await;
    let (failed, flood) = flooded(u.0, 8, 300, true).await;
    assert!(
        failed.is_empty(),
        "{} of the attempt's 300 challenged calls failed during a flood of {flood} \
         connections: {:?}",
        failed.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
}

/// 128 connections without the token that keep sending requests (each answered 407,
/// pipelined two at a time) must not hold the attempt out, nor be kept open by their
/// requests: the attempt's own connection after them is answered, and the oldest of
/// them is then closed.
#[tokio::test(flavor = "multi_thread")]
async fn token_less_connections_kept_busy_with_refused_requests_are_still_closed() {
    let u = fixture();
    let _flood = FLOOD.lock().await;
    let f = u.0;
    raise_own_nofile();
    let refused = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: wrong\r\n\r\n\
                    GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let mut busy = Vec::new();
    for _ in 0..128 {
        let mut s = TcpStream::connect(&f.proxy).await.unwrap();
        s.write_all(refused).await.unwrap();
        busy.push(s);
    }
    // Each answered (the model endpoint's refusal first), so each is served and open.
    let first = read_head(&mut busy[0], Duration::from_secs(5)).await;
    assert!(
        matches!(status(&first), 401 | 403 | 407),
        "a request without the token: {first:?}"
    );
    let a = raw_at(&f.proxy, &own_call(&f.token), Duration::from_secs(5)).await;
    assert_eq!(status(&a), 404, "the attempt's own call: {a:?}");
    // The oldest busy one is closed by the newer connection, whatever it sent.
    let oldest = &mut busy[0];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match oldest.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {
                    if oldest.write_all(refused).await.is_err() {
                        return true;
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the oldest token-less connection is still served");
}

/// The attempt's own agent (it holds the token), with the worker at the usual service
/// limit of 1024 open files: it keeps 128 connections (every place, its own client's
/// included), 256 more whose calls wait for a place, and then opens more whose calls are refused as busy (503),
/// keeping each open. Those refused must not hold the worker's descriptors (at most
/// the places, the waiting and the unproven are held), and the concurrent attempt's
/// call to its own proxy must still be answered.
#[tokio::test(flavor = "multi_thread")]
async fn connections_refused_as_busy_hold_no_descriptors_of_the_worker() {
    let u = fixture();
    let _flood = FLOOD.lock().await;
    let f = u.0;
    let own_limit = raise_own_nofile() as usize;
    let set = std::process::Command::new("prlimit")
        .args(["--pid", &f.worker_pid.to_string(), "--nofile=1024:"])
        .status()
        .unwrap();
    assert!(set.success(), "prlimit failed");
    let before = open_fds(f.worker_pid);
    let mut held = Vec::new();
    // The agent's own client may keep a place too: 120 answered, the rest wait.
    for i in 0..120 {
        let mut s = TcpStream::connect(&f.proxy).await.unwrap();
        s.write_all(&own_call(&f.token)).await.unwrap();
        let a = read_head(&mut s, Duration::from_secs(5)).await;
        assert_eq!(
            status(&a),
            404,
            "call {i} kept open (worker at {} files): {a:?}",
            open_fds(f.worker_pid)
        );
        held.push(s);
    }
    for _ in 0..8 + 256 {
        let mut s = TcpStream::connect(&f.proxy).await.unwrap();
        s.write_all(&own_call(&f.token)).await.unwrap();
        held.push(s);
    }
    // Until the worker holds them all (their calls wait), so that each next call is busy.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_fds(f.worker_pid) < before + 380 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut refused, mut unanswered) = (0, 0);
    for _ in 0..own_limit.saturating_sub(512).min(2000) {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&f.proxy)).await
        else {
            break;
        };
        if s.write_all(&own_call(&f.token)).await.is_err() {
            break;
        }
        let a = read_head(&mut s, Duration::from_secs(2)).await;
        match status(&a) {
            503 => refused += 1,
            // Waiting after all, or never accepted (the worker out of descriptors).
            0 if unanswered < 5 => unanswered += 1,
            _ => break,
        }
        held.push(s);
    }
    let peak = open_fds(f.worker_pid);
    let other = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\r\n",
        f.other_token
    );
    let a = raw_at(&f.other_proxy, other.as_bytes(), Duration::from_secs(5)).await;
    drop(held);
    let grown = peak.saturating_sub(before);
    assert!(
        grown <= 128 + 256 + 128 + 32 && status(&a) == 404,
        "{refused} connections refused as busy; the worker holds {grown} more descriptors \
         ({before} → {peak}); the other attempt's call: {a:?}"
    );
}

/// The same as the agent of a `bwrap` sandbox (its proxy has no token: every request
/// proves its connection): it connects to the proxy's socket 3,000 times, each sending
/// a call at once and keeping the connection open, and holds them. The worker may hold
/// at most the places, the waiting and the unproven for that proxy.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_make_the_worker_hold_its_refused_connections_ordinary_worker() {
    let _shared = TEST_USER_PROCESSES.read().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[]) else {
        return;
    };
    let body = r#"set +e
python3 -c '
import socket, sys, time
call = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: x\r\n\r\n"
held = []
for i in range(3000):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect("/run/ao/proxy.sock")
        s.sendall(call)
    except OSError as e:
        print("stopped: %s" % e)
        break
    held.append(s)
time.sleep(2)
print("agent-held=%d" % len(held)); sys.stdout.flush()
time.sleep(120)'
"#;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, body, &[]).await;
    let worker = c.workers[0].pid().as_raw();
    let id = submit(&c, &repo, "agent/connections").await;
    let text = said(&c, &id, "agent-held=").await;
    let held = number_after(&text, "agent-held=");
    let peak = std::fs::read_dir(format!("/proc/{worker}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let _ = c.post_json(&format!("/api/v1/tasks/{id}/cancel")).await;
    let _ = c
        .wait_for_status(&id, &["cancelled", "failed", "succeeded"], LIMIT)
        .await;
    assert!(
        peak <= 128 + 256 + 128 + 200,
        "the agent held {held} connections; the worker has {peak} files open"
    );
}
