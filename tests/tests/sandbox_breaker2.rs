//! Attacks on the newest sandbox limits: RLIMIT_NPROC set inside each sandbox's user
//! namespace for an ordinary-user worker without a cgroup, and the covering of what
//! others may not read under the system directories. Shell-script agents try what an
//! attacker would, against the real coordinator and worker binaries, bubblewrap and git;
//! each test asserts the attack fails. Tests of attacks that got through are marked
//! `#[ignore = "fault: …"]`.
//!
//! Files are placed under `/etc`, `/usr/local` and `/` as root: the tests that need that
//! skip (and say so) when they do not run as root.

// Test helpers unwrap: a failed setup step is a failed test, with the panic saying where.
#![allow(clippy::unwrap_used)]

use ao_tests::hostile::{
    cluster, finished, own, start, submit, tag, Placed, Worker, LIMIT, TEST_USER_PROCESSES,
};
use ao_tests::scenario::events;
use ao_tests::{bare_repo, git, script, test_user, Cluster, HOG_OR_OTHER};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Waits until the worker logs `worker started` (its walk of the system directories is
/// done by then).
async fn worker_started(c: &Cluster) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !c.logs().contains("worker started") {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never started\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent that prints each file of `paths` (or why not) into `seen.txt`.
fn reader(paths: &[String]) -> String {
    format!(
        "{{ for f in {}; do echo \"read $f: $(cat $f 2>&1)\"; done; }} > seen.txt\n",
        paths.join(" ")
    )
}

/// Runs the agent on `repo` (made before the cluster started, so that its user owns
/// it); what it wrote into `seen.txt`.
async fn read_with(c: &Cluster, repo: &Path, branch: &str) -> String {
    let id = submit(c, repo, branch).await;
    let done = finished(c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    git(repo, &["show", &format!("{branch}:seen.txt")])
}

/// Gives `uid` read access to root's 0600 `path` through a POSIX ACL
/// (`system.posix_acl_access`, written by Python: the host has no `setfacl`).
fn acl_grant_read(path: &Path, uid: u32) -> bool {
    let code = format!(
        "import os,struct\n\
         e=lambda t,p,i: struct.pack('<HHI',t,p,i)\n\
         M=0xffffffff\n\
         v=struct.pack('<I',2)+e(1,6,M)+e(2,4,{uid})+e(4,0,M)+e(0x10,4,M)+e(0x20,0,M)\n\
         os.setxattr('{}','system.posix_acl_access',v)\n",
        path.display()
    );
    std::process::Command::new("/usr/bin/python3")
        .args(["-c", &code])
        .status()
        .is_ok_and(|s| s.success())
}

/// Private files of the sandbox's host user under the system directories, reached
/// another way than their own path: a hard link in a world-readable directory, a
/// symbolic link (as `/etc/alternatives` makes), a world-readable file inside a 0700
/// directory named through a link, a root 0600 file an ACL opens to the user, and a
/// world-readable file in an `o-x` directory. None may be read; a world-readable
/// file beside them still is.
async fn system_files_reached_another_way_are_unseen(who: Worker) {
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let (uid, _) = test_user().unwrap();
    let t = tag(&format!("{who:?}"));
    let etc = Path::new("/etc").join(&t);
    let usr = Path::new("/usr/local").join(&t);
    let _placed = Placed(vec![etc.clone(), usr.clone()]);
    std::fs::create_dir_all(etc.join("closed")).unwrap();
    std::fs::create_dir_all(usr.join("noexec")).unwrap();
    own(&etc, 0o755);
    own(&usr, 0o755);
    std::fs::write(etc.join("owner.key"), "B2-OWNER-KEY-7101").unwrap();
    own(&etc.join("owner.key"), 0o600);
    std::fs::hard_link(etc.join("owner.key"), usr.join("hardlink")).unwrap();
    std::os::unix::fs::symlink(etc.join("owner.key"), usr.join("alternative")).unwrap();
    std::fs::write(etc.join("closed/inner"), "B2-CLOSED-DIR-7102").unwrap();
    own(&etc.join("closed/inner"), 0o644);
    own(&etc.join("closed"), 0o700);
    std::os::unix::fs::symlink(etc.join("closed/inner"), usr.join("into-closed")).unwrap();
    std::fs::write(etc.join("acl.key"), "B2-ACL-KEY-7103").unwrap();
    std::fs::set_permissions(etc.join("acl.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let acl = acl_grant_read(&etc.join("acl.key"), uid);
    std::fs::write(usr.join("noexec/inner"), "B2-NOEXEC-DIR-7104").unwrap();
    own(&usr.join("noexec/inner"), 0o644);
    own(&usr.join("noexec"), 0o744);
    std::fs::write(etc.join("public.txt"), "B2-PUBLIC-7100").unwrap();
    own(&etc.join("public.txt"), 0o644);
    let paths: Vec<String> = [
        usr.join("hardlink"),
        usr.join("alternative"),
        usr.join("into-closed"),
        etc.join("acl.key"),
        usr.join("noexec/inner"),
        PathBuf::from(format!(
            "/proc/self/root{}",
            etc.join("owner.key").display()
        )),
        etc.join("public.txt"),
    ]
    .iter()
    .map(|p| p.display().to_string())
    .collect();
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, &reader(&paths), &[]).await;
    let seen = read_with(&c, &repo, "agent/another-way").await;
    let mut secrets = vec![
        "B2-OWNER-KEY-7101",
        "B2-CLOSED-DIR-7102",
        "B2-NOEXEC-DIR-7104",
    ];
    if acl {
        secrets.push("B2-ACL-KEY-7103");
    } else {
        eprintln!("the ACL could not be set: that case is not tried");
    }
    for secret in secrets {
        assert!(!seen.contains(secret), "{secret} read:\n{seen}");
    }
    assert!(
        seen.contains("B2-PUBLIC-7100"),
        "world-readable hidden:\n{seen}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn system_files_reached_another_way_are_unseen_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    system_files_reached_another_way_are_unseen(Worker::Root).await
}

#[tokio::test(flavor = "multi_thread")]
async fn system_files_reached_another_way_are_unseen_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    system_files_reached_another_way_are_unseen(Worker::Ordinary).await
}

/// A top-level system root that is an absolute symbolic link (`/libx32 ->
/// /usr/local/<dir>`, as `/lib64 -> /usr/lib64` is on some hosts) is bound at its own
/// path from its target: a 0600 key of the sandbox user there, covered under `/usr`,
/// must not be read through it.
async fn a_private_file_under_an_absolutely_linked_system_root_is_unseen(who: Worker) {
    if Path::new("/libx32").exists() || std::fs::symlink_metadata("/libx32").is_ok() {
        eprintln!("skipped: /libx32 exists on this host");
        return;
    }
    let Some(mut c) = cluster(who, &[]) else {
        return;
    };
    let usr = Path::new("/usr/local").join(tag("lib"));
    let _placed = Placed(vec![usr.clone(), PathBuf::from("/libx32")]);
    std::fs::create_dir_all(&usr).unwrap();
    own(&usr, 0o755);
    std::fs::write(usr.join("owner.key"), "B2-LINKED-ROOT-7201").unwrap();
    own(&usr.join("owner.key"), 0o600);
    std::os::unix::fs::symlink(&usr, "/libx32").unwrap();
    let paths = vec![
        "/libx32/owner.key".to_string(),
        usr.join("owner.key").display().to_string(),
    ];
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, &reader(&paths), &[]).await;
    let seen = read_with(&c, &repo, "agent/linked-root").await;
    assert!(!seen.contains("B2-LINKED-ROOT-7201"), "read:\n{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_file_under_an_absolutely_linked_system_root_is_unseen_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_private_file_under_an_absolutely_linked_system_root_is_unseen(Worker::Root).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_file_under_an_absolutely_linked_system_root_is_unseen_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_private_file_under_an_absolutely_linked_system_root_is_unseen(Worker::Ordinary).await
}

/// `sandbox.ro_paths` naming a symbolic link into the system directories (`/opt/<x> ->
/// /usr/local/<dir>`): the 0600 key of the sandbox user in the target, covered under
/// `/usr`, must not be read at the link's path.
async fn a_linked_ro_path_shows_no_private_system_file(who: Worker) {
    let t = tag("ro");
    let usr = Path::new("/usr/local").join(&t);
    let link = Path::new("/opt").join(&t);
    let link_text = link.display().to_string();
    let Some(mut c) = cluster(who, &[("AO__SANDBOX__RO_PATHS", &link_text)]) else {
        return;
    };
    let _placed = Placed(vec![usr.clone(), link.clone()]);
    std::fs::create_dir_all(&usr).unwrap();
    own(&usr, 0o755);
    std::fs::write(usr.join("owner.key"), "B2-LINKED-RO-PATH-7301").unwrap();
    own(&usr.join("owner.key"), 0o600);
    std::os::unix::fs::symlink(&usr, &link).unwrap();
    let paths = vec![
        link.join("owner.key").display().to_string(),
        usr.join("owner.key").display().to_string(),
    ];
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, &reader(&paths), &[]).await;
    let seen = read_with(&c, &repo, "agent/linked-ro").await;
    assert!(!seen.contains("B2-LINKED-RO-PATH-7301"), "read:\n{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_linked_ro_path_shows_no_private_system_file_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_linked_ro_path_shows_no_private_system_file(Worker::Root).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_linked_ro_path_shows_no_private_system_file_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_linked_ro_path_shows_no_private_system_file(Worker::Ordinary).await
}

/// A private file of the sandbox user placed under `/etc` after the worker started (a
/// new key, or a world-readable file made 0600 by `chmod` after it was written, as
/// `install -m` or an editor's save does): it must not be read.
#[tokio::test(flavor = "multi_thread")]
async fn files_made_private_after_the_worker_started_are_unseen_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[]) else {
        return;
    };
    let etc = Path::new("/etc").join(tag("late"));
    let _placed = Placed(vec![etc.clone()]);
    std::fs::create_dir_all(&etc).unwrap();
    own(&etc, 0o755);
    std::fs::write(etc.join("chmodded.key"), "placeholder").unwrap();
    own(&etc.join("chmodded.key"), 0o644);
    let paths = vec![
        etc.join("new.key").display().to_string(),
        etc.join("chmodded.key").display().to_string(),
    ];
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, &reader(&paths), &[]).await;
    worker_started(&c).await;
    std::fs::write(etc.join("new.key"), "B2-LATE-NEW-7401").unwrap();
    own(&etc.join("new.key"), 0o600);
    own(&etc.join("chmodded.key"), 0o600);
    std::fs::write(etc.join("chmodded.key"), "B2-LATE-CHMOD-7402").unwrap();
    let seen = read_with(&c, &repo, "agent/late").await;
    for secret in ["B2-LATE-NEW-7401", "B2-LATE-CHMOD-7402"] {
        assert!(!seen.contains(secret), "{secret} read:\n{seen}");
    }
}

/// Covering must not break normal runs: a private file and a private directory of the
/// sandbox user under `/etc` that existed at the worker's start are removed before a
/// run (a package upgrade, a rotated key). The run still starts and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_private_system_file_removed_after_the_start_breaks_no_run_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[]) else {
        return;
    };
    let etc = Path::new("/etc").join(tag("gone"));
    let _placed = Placed(vec![etc.clone()]);
    std::fs::create_dir_all(etc.join("private.d")).unwrap();
    own(&etc, 0o755);
    own(&etc.join("private.d"), 0o700);
    std::fs::write(etc.join("rotated.key"), "old").unwrap();
    own(&etc.join("rotated.key"), 0o600);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, "echo ran > seen.txt\n", &[]).await;
    worker_started(&c).await;
    std::fs::remove_file(etc.join("rotated.key")).unwrap();
    std::fs::remove_dir(etc.join("private.d")).unwrap();
    let seen = read_with(&c, &repo, "agent/after-removal").await;
    assert_eq!(seen.trim(), "ran");
}

/// The process limit from inside, on an ordinary-user worker without a cgroup
/// (`max_processes = 40`): the agent tries to raise RLIMIT_NPROC (`ulimit -u`,
/// `prlimit` on itself, a soft limit above the hard one), to make a new user namespace
/// where the count would start again, then forks 100 processes and starts 100 threads
/// from a new session, and leaves double-forked `setsid` sleepers to outlive the run.
/// Every raise fails, fewer than 40 processes or threads are made, and no sleeper is
/// left once the run has ended.
#[tokio::test(flavor = "multi_thread")]
async fn the_process_limit_cannot_be_raised_or_outlived_from_inside_ordinary_worker() {
    let _shared = TEST_USER_PROCESSES.read().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[("AO__SANDBOX__MAX_PROCESSES", "40")]) else {
        return;
    };
    let mark = tag("outlive");
    let body = format!(
        r#"set +e
{{
echo "limit $(ulimit -u) hard $(ulimit -Hu)"
(ulimit -u unlimited 2>/dev/null && echo raised-by-ulimit)
(ulimit -Su 100000 2>/dev/null && echo raised-soft)
prlimit --pid $$ --nproc=100000:100000 2>/dev/null && echo raised-by-prlimit
unshare -U true 2>/dev/null && echo new-userns
unshare -Ur true 2>/dev/null && echo new-userns-root
setsid perl -e 'my @k; for (1..100) {{ my $p = fork(); last unless defined $p;
  if ($p == 0) {{ sleep 2; exit 0 }} push @k, $p }} print "forked=", scalar(@k), "\n";
  waitpid($_, 0) for @k;'
python3 -c '
import threading, time
ts = []
for _ in range(100):
    try:
        t = threading.Thread(target=time.sleep, args=(2,)); t.start(); ts.append(t)
    except Exception:
        break
print("threads=%d" % len(ts))
for t in ts: t.join()
'
}} > seen.txt 2>&1
wait
for i in 1 2 3; do
  setsid sh -c '(exec -a {mark} sleep 300 &) ; exit 0' </dev/null >/dev/null 2>&1
  nohup sh -c 'exec -a {mark} sleep 300' </dev/null >/dev/null 2>&1 &
done
"#
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, &body, &[]).await;
    let id = submit(&c, &repo, "agent/nproc").await;
    let done = finished(&c, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&repo, &["show", "agent/nproc:seen.txt"]);
    assert!(
        seen.contains("limit 40 hard 40"),
        "RLIMIT_NPROC inside:\n{seen}"
    );
    for raised in [
        "raised-by-ulimit",
        "raised-soft",
        "raised-by-prlimit",
        "new-userns",
    ] {
        assert!(!seen.contains(raised), "{raised}:\n{seen}");
    }
    let count = |key: &str| -> u32 {
        let at = seen
            .find(key)
            .unwrap_or_else(|| panic!("no {key}:\n{seen}"));
        seen[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    assert!(count("forked=") < 40, "{seen}");
    assert!(count("threads=") < 40, "{seen}");
    // The run has ended: its pid namespace's processes die with its init; give the
    // kernel a few seconds to reap them before saying one outlived it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = outliving(&mark);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes outlived the run: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pids whose command line names `mark`.
fn outliving(mark: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(mark) {
                found.push(pid);
            }
        }
    }
    found
}

/// Tasks (threads included: RLIMIT_NPROC counts them) of host user `uid` now.
fn tasks_of(uid: u32) -> u64 {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next().map(str::to_string))
        };
        if field("Uid:").as_deref() == Some(&uid.to_string()) {
            n += field("Threads:").and_then(|t| t.parse().ok()).unwrap_or(1);
        }
    }
    n
}

/// Starvation through the worker's own RLIMIT_NPROC: an ordinary-user worker without a
/// cgroup, two runs at once, `max_processes = 40`, whose own limit (as an operator's
/// `LimitNPROC=` or `limits.conf` sets it) leaves room for 60 more tasks than the
/// user has before the worker starts — more than one sandbox's limit, less than two. The kernel checks each sandbox's
/// count against 40 and the host user's whole count against the limit the namespace was
/// made with. A hog forks to its limit and holds; a concurrent run must still start,
/// fork 10 and succeed (the worker's checks or its error should hold it, not the hog).
#[tokio::test(flavor = "multi_thread")]
async fn a_hog_cannot_starve_a_concurrent_run_under_the_workers_own_process_limit() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some(mut c) = cluster(
        Worker::Ordinary,
        &[
            ("AO__SANDBOX__MAX_PROCESSES", "40"),
            ("AO__WORKER__CONCURRENCY", "2"),
        ],
    ) else {
        return;
    };
    let (uid, _) = test_user().unwrap();
    let root = c.dir.path().to_path_buf();
    let hog = bare_repo(&root, "hog", &[]);
    let other = bare_repo(&root, "other", &[]);
    // The worker's own soft RLIMIT_NPROC (what a user namespace it makes is bounded
    // by): 60 tasks above what the user has once the coordinator runs. Lowered on this
    // (root) process only while the worker is spawned, which inherits it; root's own
    // forks are not counted. The tests cannot set it on the running worker: they lack
    // CAP_SYS_RESOURCE here.
    let agent = script(c.dir.path(), "agent.sh", HOG_OR_OTHER);
    c.start_coordinator().await.unwrap();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NPROC).unwrap();
    let limit = tasks_of(uid) + 60;
    setrlimit(Resource::RLIMIT_NPROC, limit.min(hard), hard).unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    setrlimit(Resource::RLIMIT_NPROC, soft, hard).unwrap();
    worker_started(&c).await;
    let hog_id = submit(&c, &hog, "agent/hog").await;
    let deadline = std::time::Instant::now() + LIMIT;
    let forked: u32 = loop {
        let text = serde_json::to_string(&events(&c, &hog_id).await).unwrap();
        if let Some(at) = text.find("hog-forked=") {
            break text[at + 11..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hog never forked\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(forked < 40, "{forked} processes under a limit of 40");
    let other_id = submit(&c, &other, "agent/other").await;
    let done = finished(&c, &other_id).await;
    let _ = c.post_json(&format!("/api/v1/tasks/{hog_id}/cancel")).await;
    let _ = c
        .wait_for_status(&hog_id, &["cancelled", "failed", "succeeded"], LIMIT)
        .await;
    assert_eq!(
        done["status"],
        "succeeded",
        "the concurrent run was starved (hog forked {forked}): {done:#}\n{}",
        c.logs()
    );
}

/// Host sockets and FIFOs under the system directories, by names the worker does not
/// list: a unix socket listening on the host but renamed after it was bound (as a daemon
/// replacing its socket atomically does) and hard-linked at another path, both
/// world-connectable (`/proc/net/unix` still names the old path), and a FIFO of the
/// sandbox's host user, 0600, that a host service reads. The agent connects to each
/// socket and writes into the FIFO: nothing arrives.
#[tokio::test(flavor = "multi_thread")]
async fn host_sockets_and_fifos_under_other_names_are_unreachable_ordinary_worker() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[]) else {
        return;
    };
    let t = tag("sock");
    let usr = Path::new("/usr/local").join(&t);
    let etc = Path::new("/etc").join(&t);
    let _placed = Placed(vec![usr.clone(), etc.clone()]);
    std::fs::create_dir_all(&usr).unwrap();
    std::fs::create_dir_all(&etc).unwrap();
    own(&usr, 0o755);
    own(&etc, 0o755);
    let listener = std::os::unix::net::UnixListener::bind(usr.join("bound.sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::fs::set_permissions(
        usr.join("bound.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    std::fs::rename(usr.join("bound.sock"), usr.join("moved.sock")).unwrap();
    std::fs::hard_link(usr.join("moved.sock"), etc.join("linked.sock")).unwrap();
    let fifo = etc.join("control.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    own(&fifo, 0o600);
    // Held open for reading and writing, without blocking, by the host "service".
    let mut service = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let body = format!(
        r#"set +e
{{
for s in {u}/moved.sock {e}/linked.sock; do
  python3 -c 'import socket,sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1]); s.sendall(b"B2-SOCKET-IN"); print("connected", sys.argv[1])' $s 2>&1
done
timeout 5 sh -c 'echo B2-FIFO-IN > {e}/control.fifo' && echo "wrote the fifo"
}} > seen.txt 2>&1
exit 0
"#,
        u = usr.display(),
        e = etc.display()
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, &body, &[]).await;
    let seen = read_with(&c, &repo, "agent/sockets").await;
    let mut connections = 0;
    while listener.accept().is_ok() {
        connections += 1;
    }
    let mut got = [0u8; 64];
    let from_fifo = service.read(&mut got).unwrap_or(0);
    assert_eq!(
        connections, 0,
        "the agent connected to a host socket:\n{seen}"
    );
    assert_eq!(
        from_fifo,
        0,
        "the agent wrote {:?} into a host FIFO:\n{seen}",
        String::from_utf8_lossy(&got[..from_fifo])
    );
}

/// The agent fills its own process limit with detached sleepers and exits, so the
/// runner's git cannot fork to commit and push. That failure is the agent's: it must
/// not be recorded as `infrastructure` and retried (each attempt runs the agent, and
/// spends its model budget, again).
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_filling_its_process_limit_is_not_retried_as_infrastructure_ordinary_worker() {
    let _shared = TEST_USER_PROCESSES.read().await;
    let Some(mut c) = cluster(Worker::Ordinary, &[("AO__SANDBOX__MAX_PROCESSES", "40")]) else {
        return;
    };
    let body = r#"set +e
echo change > change.txt
setsid perl -e 'for (1..100) { my $p = fork(); last unless defined $p;
  if ($p == 0) { sleep 300; exit 0 } }' </dev/null >/dev/null 2>&1
exit 0
"#;
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(&mut c, body, &[]).await;
    let id = submit(&c, &repo, "agent/filled").await;
    let done = finished(&c, &id).await;
    let subtask = &done["subtasks"][0];
    assert_ne!(
        subtask["outcome"]["kind"], "infrastructure",
        "the agent's own doing classed as infrastructure: {done:#}"
    );
    assert_eq!(subtask["attempt"], 1, "retried: {done:#}");
}

/// Covering must not break normal runs of a root worker: a directory under `/etc`
/// that others may search but the sandbox's host user may not (its group, the host
/// user's, has no `x`: mode 0705), holding a root-only file the worker covers. The
/// host user cannot reach that file, so nothing needs covering there; the run still
/// starts and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_directory_shut_to_the_host_user_by_its_group_breaks_no_run_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let Some(mut c) = cluster(Worker::Root, &[]) else {
        return;
    };
    let (_, gid) = test_user().unwrap();
    let etc = Path::new("/etc").join(tag("groupshut"));
    let _placed = Placed(vec![etc.clone()]);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("root.key"), "B2-ROOT-ONLY-7601").unwrap();
    std::fs::set_permissions(etc.join("root.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o705)).unwrap();
    chown(&etc, Some(0), Some(gid)).unwrap();
    let repo = bare_repo(c.dir.path(), "project", &[]);
    start(
        &mut c,
        &reader(&[etc.join("root.key").display().to_string()]),
        &[],
    )
    .await;
    let seen = read_with(&c, &repo, "agent/group-shut").await;
    assert!(!seen.contains("B2-ROOT-ONLY-7601"), "read:\n{seen}");
}

/// `sandbox.ro_paths` naming a real tool directory outside the system directories
/// (`/opt/<tool>`, as the docs advise for tools installed there) that holds a 0600 key
/// of the sandbox's host user beside a world-readable file: the key must not be read
/// (the same reasoning as for the system directories: the sandbox runs as that user).
#[tokio::test(flavor = "multi_thread")]
async fn a_private_file_under_a_ro_path_is_unseen_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    let tool = Path::new("/opt").join(tag("tool"));
    let tool_text = tool.display().to_string();
    let Some(mut c) = cluster(Worker::Ordinary, &[("AO__SANDBOX__RO_PATHS", &tool_text)]) else {
        return;
    };
    let _placed = Placed(vec![tool.clone()]);
    std::fs::create_dir_all(&tool).unwrap();
    own(&tool, 0o755);
    std::fs::write(tool.join("token"), "B2-RO-PATH-TOKEN-7701").unwrap();
    own(&tool.join("token"), 0o600);
    std::fs::write(tool.join("README"), "B2-RO-PATH-PUBLIC-7700").unwrap();
    own(&tool.join("README"), 0o644);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    let paths = vec![
        tool.join("token").display().to_string(),
        tool.join("README").display().to_string(),
    ];
    start(&mut c, &reader(&paths), &[]).await;
    let seen = read_with(&c, &repo, "agent/ro-path").await;
    assert!(
        seen.contains("B2-RO-PATH-PUBLIC-7700"),
        "the tool is not shown:\n{seen}"
    );
    assert!(!seen.contains("B2-RO-PATH-TOKEN-7701"), "read:\n{seen}");
}

/// The agent of the inotify starvation test: on `agent/hog` it makes inotify instances
/// until refused, says how many, and holds them; on any other branch it makes one and
/// commits whether it could.
const INOTIFY_HOG_OR_OTHER: &str = r#"
set +e
if [ "$AO_BRANCH" = agent/hog ]; then
  python3 -c '
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 4096:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
print("hog-instances=%d" % len(fds)); sys.stdout.flush()
time.sleep(120)'
else
  python3 -c '
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
print("other-inotify=%s" % ("ok" if fd >= 0 else os.strerror(ctypes.get_errno())))' > other.txt 2>&1
fi
"#;

/// Starvation through a per-user kernel count that no cgroup and no RLIMIT bounds:
/// inotify instances (`fs.inotify.max_user_instances`, counted for the host user at
/// every user-namespace level). Two runs at once; the hog makes inotify instances until
/// refused and holds them; a concurrent run (file watchers: editors' and build tools'
/// watch modes, `tail -f`) must still get one.
async fn a_hog_cannot_take_every_inotify_instance_of_the_host_user(who: Worker) {
    hog_and_other(
        who,
        INOTIFY_HOG_OR_OTHER,
        "hog-instances=",
        "other-inotify=ok",
    )
    .await
}

/// Two runs at once on a worker of `who`: the hog (`agent` script `body` on branch
/// `agent/hog`) takes a per-user allowance until refused, says `<said>N`, and holds it; a
/// concurrent run must still get its share, committing `other.txt` = `expected`.
async fn hog_and_other(who: Worker, body: &str, said: &str, expected: &str) {
    let Some(mut c) = cluster(who, &[("AO__WORKER__CONCURRENCY", "2")]) else {
        return;
    };
    let root = c.dir.path().to_path_buf();
    let hog = bare_repo(&root, "hog", &[]);
    let other = bare_repo(&root, "other", &[]);
    start(&mut c, body, &[]).await;
    let hog_id = submit(&c, &hog, "agent/hog").await;
    let deadline = std::time::Instant::now() + LIMIT;
    let made: u32 = loop {
        let text = serde_json::to_string(&events(&c, &hog_id).await).unwrap();
        if let Some(at) = text.find(said) {
            break text[at + said.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hog never said\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let other_id = submit(&c, &other, "agent/other").await;
    let done = finished(&c, &other_id).await;
    let _ = c.post_json(&format!("/api/v1/tasks/{hog_id}/cancel")).await;
    let _ = c
        .wait_for_status(&hog_id, &["cancelled", "failed", "succeeded"], LIMIT)
        .await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let seen = git(&other, &["show", "agent/other:other.txt"]);
    assert_eq!(seen.trim(), expected, "the hog held {made}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hog_cannot_take_every_inotify_instance_of_the_host_user_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_hog_cannot_take_every_inotify_instance_of_the_host_user(Worker::Root).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hog_cannot_take_every_inotify_instance_of_the_host_user_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_hog_cannot_take_every_inotify_instance_of_the_host_user(Worker::Ordinary).await
}

/// The agent of the message-queue starvation test: on `agent/hog` it makes POSIX
/// message queues (10 messages of 8 KiB each) until refused, says how many, and holds
/// them; on any other branch it makes one and commits whether it could.
const MQUEUE_HOG_OR_OTHER: &str = r#"
set +e
cat > /tmp/mq.py <<'PY'
import ctypes, os, sys, time
rt = ctypes.CDLL("librt.so.1", use_errno=True)
class Attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long),
                ("msgsize", ctypes.c_long), ("cur", ctypes.c_long), ("pad", ctypes.c_long * 4)]
rt.mq_open.restype = ctypes.c_int
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Attr)]
attr = Attr(0, 10, 8192, 0)
def make(n):
    return rt.mq_open(("/q%d" % n).encode(), os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(attr))
if sys.argv[1] == "hog":
    n = 0
    while n < 1000 and make(n) >= 0:
        n += 1
    print("hog-queues=%d" % n); sys.stdout.flush()
    time.sleep(120)
else:
    fd = make(0)
    print("other-mqueue=%s" % ("ok" if fd >= 0 else os.strerror(ctypes.get_errno())))
PY
if [ "$AO_BRANCH" = agent/hog ]; then
  python3 /tmp/mq.py hog
else
  python3 /tmp/mq.py other > other.txt 2>&1
fi
"#;

/// Starvation through RLIMIT_MSGQUEUE, which since Linux 5.14 is counted per user
/// namespace like RLIMIT_NPROC, but whose limit the worker leaves as inherited: every
/// sandbox's queues also count against the host user's 800 KiB. Two runs at once; the
/// hog makes message queues until refused and holds them; a concurrent run must still
/// get one.
async fn a_hog_cannot_take_every_message_queue_byte_of_the_host_user(who: Worker) {
    hog_and_other(who, MQUEUE_HOG_OR_OTHER, "hog-queues=", "other-mqueue=ok").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hog_cannot_take_every_message_queue_byte_of_the_host_user_root_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_hog_cannot_take_every_message_queue_byte_of_the_host_user(Worker::Root).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hog_cannot_take_every_message_queue_byte_of_the_host_user_ordinary_worker() {
    let _alone = TEST_USER_PROCESSES.write().await;
    a_hog_cannot_take_every_message_queue_byte_of_the_host_user(Worker::Ordinary).await
}
