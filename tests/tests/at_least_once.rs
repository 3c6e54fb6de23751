//! At-least-once delivery without its failure modes, with real processes: a worker paused
//! past its lease does not push (exactly one run of an attempt pushes); a redelivered
//! attempt whose push already landed does not push again; shutdowns do not use up a
//! subtask's receives; an agent's unbounded output neither blocks its result nor loses
//! its events.

use ao_tests::scenario::{start_agent_worker, submit_code, wait_for_file, wait_succeeded};
use ao_tests::{bare_repo, git, script, Cluster};
use nix::sys::signal::Signal;
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

/// Short visibility so that a paused or stopped worker's message comes back quickly.
const FAST_REDELIVERY: [(&str, &str); 2] = [
    ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "4"),
    ("AO__QUEUE__HEARTBEAT_SECS", "1"),
];

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A repository whose every accepted push appends a line to the returned file.
fn counting_repo(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let repo = bare_repo(dir, "project", &[]);
    let pushes = dir.join("pushes.log");
    let hook = repo.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!("#!/usr/bin/env bash\necho push >> {}\n", pushes.display()),
    )
    .expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("hook mode");
    (repo, pushes)
}

async fn wait_until(what: &str, c: &Cluster, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first worker is SIGSTOPped while its agent runs, past the visibility timeout; its
/// agent finishes meanwhile. A second worker receives the same attempt and completes it.
/// The paused worker's runner waits for a push permit the stopped worker cannot give, and
/// is refused when the worker resumes: one push for the attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_paused_past_its_lease_does_not_push() {
    let mut c = Cluster::new(&FAST_REDELIVERY);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let go = dir.join("go");
    let agent = script(
        &dir,
        "agent.sh",
        &format!(
            "echo run >> {runs}\n\
             if [ \"$(wc -l < {runs})\" = 1 ]; then\n\
               while [ ! -e {go} ]; do sleep 0.1; done; echo first > first.txt\n\
             else echo second > second.txt; fi",
            runs = runs.display(),
            go = go.display()
        ),
    );
    let (repo, pushes) = counting_repo(&dir);
    c.start_coordinator().await.expect("coordinator");
    let paused = start_agent_worker(&mut c, &agent);
    let id = submit_code(&c, &repo, "fence", "agent/fence").await;
    wait_for_file(&c, &runs, LIMIT).await;
    c.workers[paused].signal(Signal::SIGSTOP);
    // The paused worker's agent ends while its worker cannot answer.
    std::fs::write(&go, "").expect("go");
    start_agent_worker(&mut c, &agent);
    let done = wait_succeeded(&c, &id, LIMIT).await;
    assert_eq!(done["subtasks"][0]["worker"], "worker-1", "{done:#}");
    assert_eq!(done["subtasks"][0]["attempt"], 1);
    c.workers[paused].signal(Signal::SIGCONT);
    // Once resumed, the worker finds its lease gone and stops its run.
    wait_until(
        &format!(
            "the resumed worker did not notice its lost lease ({} pushes)",
            lines(&pushes)
        ),
        &c,
        Duration::from_secs(30),
        || c.workers[paused].log_text().contains("lease lost"),
    )
    .await;
    wait_until(
        "the paused worker's run ended unreported",
        &c,
        Duration::from_secs(30),
        || {
            c.workers[paused]
                .log_text()
                .contains("only its spend is reported")
        },
    )
    .await;
    assert_eq!(lines(&pushes), 1, "pushes for one attempt\n{}", c.logs());
    assert_eq!(git(&repo, &["show", "agent/fence:second.txt"]), "second");
    let files = git(&repo, &["ls-tree", "--name-only", "agent/fence"]);
    assert!(!files.contains("first.txt"), "{files}");
    assert_eq!(lines(&runs), 2);
}

/// Three workers in a row are stopped by SIGTERM with their run cut by the end of the
/// grace period; with `queue.max_receives = 3`, each release would have counted a receive
/// and the subtask would be dead-lettered. A fourth worker completes it, same attempt.
#[tokio::test(flavor = "multi_thread")]
async fn shutdowns_do_not_use_up_a_subtasks_receives() {
    let mut c = Cluster::new(&[
        FAST_REDELIVERY[0],
        FAST_REDELIVERY[1],
        ("AO__QUEUE__MAX_RECEIVES", "3"),
        ("AO__WORKER__SHUTDOWN_GRACE_SECS", "1"),
    ]);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let agent = script(
        &dir,
        "agent.sh",
        &format!(
            "echo run >> {runs}\nif [ \"$(wc -l < {runs})\" -le 3 ]; then sleep 600; fi\n\
             echo ok > ok.txt",
            runs = runs.display()
        ),
    );
    let repo = bare_repo(&dir, "project", &[]);
    c.start_coordinator().await.expect("coordinator");
    let id = submit_code(&c, &repo, "survive restarts", "agent/restarts").await;
    for round in 1..=3 {
        let w = start_agent_worker(&mut c, &agent);
        wait_until(&format!("run {round} started"), &c, LIMIT, || {
            lines(&runs) >= round
        })
        .await;
        let code = c.workers[w]
            .terminate(Duration::from_secs(30))
            .expect("the worker stops");
        assert_eq!(code, 0, "{}", c.logs());
    }
    start_agent_worker(&mut c, &agent);
    let done = wait_succeeded(&c, &id, LIMIT).await;
    assert_eq!(done["subtasks"][0]["attempt"], 1, "{done:#}");
    assert_eq!(lines(&runs), 4);
}

/// A command agent prints 100 lines of 5 kB (batches of them exceed the message limit)
/// and ends with one line of 1 MB (its summary): the result is sent and the task
/// succeeds, the summary is cut with a visible marker, and every line reaches the events.
#[tokio::test(flavor = "multi_thread")]
async fn unbounded_agent_output_is_cut_at_the_source_and_never_lost() {
    let mut c = Cluster::new(&FAST_REDELIVERY);
    let dir = c.dir.path().to_path_buf();
    let agent = script(
        &dir,
        "agent.sh",
        "pad=$(head -c 5000 /dev/zero | tr '\\0' y)\n\
         for i in $(seq 1 100); do echo \"line-$i $pad\"; done\n\
         echo ok > ok.txt\n\
         head -c 1048576 /dev/zero | tr '\\0' x; echo",
    );
    let repo = bare_repo(&dir, "project", &[]);
    c.start_coordinator().await.expect("coordinator");
    start_agent_worker(&mut c, &agent);
    let id = submit_code(&c, &repo, "talk a lot", "agent/talk").await;
    let done = wait_succeeded(&c, &id, LIMIT).await;
    let summary = done["subtasks"][0]["outcome"]["summary"]
        .as_str()
        .expect("summary")
        .to_string();
    assert!(summary.len() < 64 * 1024, "{} bytes", summary.len());
    assert!(ao_shared::bounded::is_truncated(&summary), "{summary:.200}");
    let (_, events) = c
        .get_json(&format!("/api/v1/tasks/{id}/events?limit=10000"))
        .await
        .expect("events");
    let messages: Vec<String> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["data"]["event"]["message"].as_str().map(str::to_string))
        .collect();
    for i in 1..=100 {
        let prefix = format!("line-{i} ");
        assert!(
            messages.iter().any(|m| m.starts_with(&prefix)),
            "event of line {i} lost"
        );
    }
    let long = messages
        .iter()
        .find(|m| m.starts_with("xxxx"))
        .expect("the 1 MB line's event");
    assert!(ao_shared::bounded::is_truncated(long));
    assert_eq!(
        done["subtasks"][0]["attempt"], 1,
        "the result was sent at the first run"
    );
}

/// A worker is SIGKILLed right after its push lands (by the repository's post-receive
/// hook), before it reports. The next delivery of the same attempt runs the agent again,
/// finds this attempt's commit on the branch before pushing, and reports that commit
/// instead of pushing a second one.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_attempt_whose_push_landed_does_not_push_again() {
    let mut c = Cluster::new(&FAST_REDELIVERY);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    // Each run writes something new: a second push would make a second commit.
    let agent = script(
        &dir,
        "agent.sh",
        &format!(
            "echo run >> {runs}\necho \"run $(wc -l < {runs})\" > result.txt",
            runs = runs.display()
        ),
    );
    let (repo, pushes) = counting_repo(&dir);
    let killed = dir.join("killed");
    let pid_file = dir.join("worker.pid");
    let hook = repo.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/usr/bin/env bash\necho push >> {pushes}\n\
             if [ ! -e {killed} ]; then touch {killed}; kill -9 \"$(cat {pid})\"; fi\n",
            pushes = pushes.display(),
            killed = killed.display(),
            pid = pid_file.display()
        ),
    )
    .expect("hook");
    c.start_coordinator().await.expect("coordinator");
    let first = start_agent_worker(&mut c, &agent);
    std::fs::write(&pid_file, c.workers[first].pid().as_raw().to_string()).expect("pid file");
    let id = submit_code(&c, &repo, "once", "agent/pushed-once").await;
    wait_until("the first push landed", &c, LIMIT, || killed.exists()).await;
    let deadline = Instant::now() + LIMIT;
    while c.workers[first]
        .child
        .as_mut()
        .is_some_and(|ch| ch.try_wait().ok().flatten().is_none())
    {
        assert!(Instant::now() < deadline, "the first worker is still alive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start_agent_worker(&mut c, &agent);
    let done = wait_succeeded(&c, &id, LIMIT).await;
    let sub = &done["subtasks"][0];
    assert_eq!(sub["attempt"], 1, "{done:#}");
    assert_eq!(lines(&runs), 2, "the agent ran again on the redelivery");
    assert_eq!(lines(&pushes), 1, "one push for one attempt\n{}", c.logs());
    let log = git(&repo, &["log", "--format=%s", "agent/pushed-once"]);
    assert_eq!(log.lines().count(), 2, "{log}");
    assert_eq!(
        git(&repo, &["show", "agent/pushed-once:result.txt"]),
        "run 1"
    );
    assert_eq!(
        sub["outcome"]["commit"].as_str(),
        Some(git(&repo, &["rev-parse", "agent/pushed-once"]).as_str()),
        "the reported commit is the one pushed by the first run: {sub:#}"
    );
}

/// What the API account has booked this month, read from the store, in millionths of a
/// dollar.
async fn booked_micros(c: &Cluster) -> u64 {
    let settings = ao_shared::config::Settings::load_from(None, c.env.clone()).expect("settings");
    let b = ao_tests::inproc::open_backends(&settings, &c.env)
        .await
        .expect("backends");
    let now = time::OffsetDateTime::now_utc();
    let month = format!("{:04}-{:02}", now.year(), u8::from(now.month()));
    b.store.spend("api", &month).await.expect("spend")
}

/// A stream-json agent (`agent.kind = "claude"`) whose first run waits for `go` and
/// reports $0.25, later runs $0.50 at once.
fn paying_agent(dir: &Path, runs: &Path, go: &Path) -> std::path::PathBuf {
    script(
        dir,
        "agent.sh",
        &format!(
            "cat > /dev/null || true\necho run >> {runs}\n\
             if [ \"$(wc -l < {runs})\" = 1 ]; then\n\
               while [ ! -e {go} ]; do sleep 0.1; done; cost=0.25; echo first > first.txt\n\
             else cost=0.5; echo second > second.txt; fi\n\
             echo '{{\"type\":\"system\",\"subtype\":\"init\",\"model\":\"claude-sonnet-4-5\"}}'\n\
             echo \"{{\\\"type\\\":\\\"result\\\",\\\"subtype\\\":\\\"success\\\",\\\"is_error\\\":false,\
\\\"result\\\":\\\"done\\\",\\\"num_turns\\\":1,\\\"total_cost_usd\\\":$cost}}\"",
            runs = runs.display(),
            go = go.display()
        ),
    )
}

/// The worker of a run is SIGSTOPped past its lease; another worker completes the attempt
/// ($0.50). The paused run ends when its worker resumes ($0.25) and reports no outcome,
/// but what it spent is booked: $0.75 in all. Before, a run whose lease was lost reported
/// nothing and its spend was never booked.
#[tokio::test(flavor = "multi_thread")]
async fn the_spend_of_a_run_whose_lease_was_lost_is_booked() {
    let mut c = Cluster::new(&[
        FAST_REDELIVERY[0],
        FAST_REDELIVERY[1],
        ("AO__AGENT__KIND", "claude"),
        // Claude Code refuses `bypassPermissions` as root; the script does not care.
        ("AO__AGENT__PROFILES__CODER__PERMISSION_MODE", "acceptEdits"),
        ("AO__WORKER__CAPABILITIES", "coder"),
    ]);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let go = dir.join("go");
    let agent = paying_agent(&dir, &runs, &go);
    let repo = bare_repo(&dir, "project", &[]);
    c.start_coordinator().await.expect("coordinator");
    let paused = start_agent_worker(&mut c, &agent);
    let id = submit_code(&c, &repo, "pay", "agent/pay").await;
    wait_for_file(&c, &runs, LIMIT).await;
    c.workers[paused].signal(Signal::SIGSTOP);
    std::fs::write(&go, "").expect("go");
    start_agent_worker(&mut c, &agent);
    wait_succeeded(&c, &id, LIMIT).await;
    c.workers[paused].signal(Signal::SIGCONT);
    wait_until(
        "the paused worker's run ended unreported",
        &c,
        Duration::from_secs(30),
        || {
            c.workers[paused]
                .log_text()
                .contains("only its spend is reported")
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let booked = booked_micros(&c).await;
        if booked == 750_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "booked {booked} micro-dollars, not 750000 ($0.25 + $0.50)\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(lines(&runs), 2);
}

/// A worker is SIGKILLed after its agent reported $0.25 (the repository's post-receive
/// hook kills it as the push lands, before the result is sent). The next worker replays
/// the dead worker's spend ledger, and the redelivered attempt's second run ($0.50)
/// reports the pushed commit: $0.75 booked. Before, what the killed run spent was lost.
#[tokio::test(flavor = "multi_thread")]
async fn the_spend_of_a_run_whose_worker_was_killed_is_booked() {
    let mut c = Cluster::new(&[
        FAST_REDELIVERY[0],
        FAST_REDELIVERY[1],
        ("AO__AGENT__KIND", "claude"),
        // Claude Code refuses `bypassPermissions` as root; the script does not care.
        ("AO__AGENT__PROFILES__CODER__PERMISSION_MODE", "acceptEdits"),
        ("AO__WORKER__CAPABILITIES", "coder"),
    ]);
    let dir = c.dir.path().to_path_buf();
    let runs = dir.join("runs.log");
    let go = dir.join("go");
    std::fs::write(&go, "").expect("go");
    let agent = paying_agent(&dir, &runs, &go);
    let repo = bare_repo(&dir, "project", &[]);
    let killed = dir.join("killed");
    let pid_file = dir.join("worker.pid");
    let hook = repo.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/usr/bin/env bash\n\
             if [ ! -e {killed} ]; then touch {killed}; kill -9 \"$(cat {pid})\"; fi\n",
            killed = killed.display(),
            pid = pid_file.display()
        ),
    )
    .expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("hook mode");
    c.start_coordinator().await.expect("coordinator");
    let first = start_agent_worker(&mut c, &agent);
    std::fs::write(&pid_file, c.workers[first].pid().as_raw().to_string()).expect("pid file");
    let id = submit_code(&c, &repo, "pay", "agent/killed-pay").await;
    wait_until("the first push landed", &c, LIMIT, || killed.exists()).await;
    let deadline = Instant::now() + LIMIT;
    while c.workers[first]
        .child
        .as_mut()
        .is_some_and(|ch| ch.try_wait().ok().flatten().is_none())
    {
        assert!(Instant::now() < deadline, "the first worker is still alive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start_agent_worker(&mut c, &agent);
    wait_succeeded(&c, &id, LIMIT).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let booked = booked_micros(&c).await;
        if booked == 750_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "booked {booked} micro-dollars, not 750000 ($0.25 + $0.50)\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(lines(&runs), 2);
}
