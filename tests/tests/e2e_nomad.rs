//! End-to-end with `sandbox.driver = "nomad"`: the real coordinator and worker, the fake
//! Nomad API (`ao_tests::fake_nomad`) with the sandbox job registered from
//! `nomad/sandbox.nomad.hcl`, each dispatched instance run by the real `worker runner`
//! under bubblewrap. Every request the driver sends is checked against Nomad's OpenAPI
//! description by the fake; each test ends by asserting it saw no invalid one.

// Test helpers may panic: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use ao_tests::fake_nomad::{jobspec, openapi, FakeNomad, Options};
use ao_tests::stack::{nomad_env, nomad_options, NomadGithub, StackOptions, NOMAD_TOKEN};
use ao_tests::{bare_repo, free_port, git, script, Cluster};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
/// The model key: the worker's `agent.api_key` only; the sandbox never gets it.
const MODEL_KEY: &str = "sk-held-by-the-worker-only";

/// Writes a file (with the model key it was given) and prints a summary line.
const WRITING_AGENT: &str = r#"
echo "working on: $1"
echo "key=${ANTHROPIC_API_KEY:-none}" > "$AO_CAPABILITY.txt"
echo "wrote $AO_CAPABILITY.txt"
"#;

fn options(c: &Cluster, slots: usize) -> Options {
    nomad_options(c.dir.path(), slots)
}

/// A cluster whose worker uses the nomad driver against `addr`; `extra` overrides.
fn cluster(addr: &str, extra: &[(&str, &str)]) -> Cluster {
    let mut env = nomad_env(addr);
    env.push(("AO__NOMAD__UNREACHABLE_SECS".into(), "5".into()));
    env.push(("AO_TEST_MODEL_KEY".into(), MODEL_KEY.into()));
    env.push(("AO__AGENT__API_KEY".into(), "env:AO_TEST_MODEL_KEY".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    // Cluster::new applies them in order: a later one wins.
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Cluster::new(&refs)
}

async fn start_fake(c: &Cluster, port: u16, slots: usize) -> FakeNomad {
    let fake = FakeNomad::start_on(port, options(c, slots)).await.unwrap();
    fake.register_sandbox_job("coder").await.unwrap();
    fake
}

/// The model key the agent had, as its file says: the attempt's proxy token, neither the
/// worker's model key nor nothing.
fn assert_agent_key_is_a_proxy_token(file: &str) {
    let key = file
        .strip_prefix("key=")
        .unwrap_or_else(|| panic!("{file}"));
    assert!(
        key != MODEL_KEY && key != "none" && !key.is_empty(),
        "{file}"
    );
}

async fn submit(c: &Cluster, repo: &std::path::Path) -> String {
    let (status, task) = c
        .submit(json!({
            "repository": repo.display().to_string(),
            "prompt": "Add a note",
            "pipeline": ["coder"],
            "branch": "agent/note"
        }))
        .await
        .unwrap();
    assert_eq!(status, 202, "{task}");
    task["id"].as_str().unwrap().to_string()
}

/// Polls `cond` until it holds.
async fn until(what: &str, c: &Cluster, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: timed out\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The running allocation of the fake, once there is one.
async fn running_alloc(c: &Cluster, fake: &FakeNomad) -> String {
    let mut found = None;
    until("a running allocation", c, || {
        found = fake
            .allocs()
            .into_iter()
            .find(|(_, _, s)| s == "running")
            .map(|(id, _, _)| id);
        found.is_some()
    })
    .await;
    found.unwrap()
}

fn assert_no_violations(fake: &FakeNomad) {
    let v = fake.violations();
    assert!(v.is_empty(), "requests outside Nomad's API: {v:#?}");
    for r in fake.requests() {
        assert!(r.token, "request without the ACL token: {r:?}");
        assert!(
            !r.query.iter().any(|(_, v)| v.contains(NOMAD_TOKEN)),
            "token in a URL: {r:?}"
        );
    }
}

#[test]
fn the_sandbox_job_file_is_a_valid_nomad_job_the_driver_can_use() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nomad/sandbox.nomad.hcl");
    let job = jobspec::load(&path, &[("capability", "tester")]).unwrap();
    let api = openapi::OpenApi::load_or_routes().unwrap();
    let errors = api.check_body("RegisterJob", &json!({ "Job": job }));
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(job["ID"], "ao-sandbox-tester");
    assert_eq!(job["Type"], "batch");
    let p = &job["ParameterizedJob"];
    // Nothing of the run travels in the dispatch: no payload, the hand-over's address.
    assert_eq!(p["Payload"], "forbidden");
    assert_eq!(
        p["MetaRequired"],
        json!(["task_id", "subtask_id", "attempt", "handover_url"])
    );
    let group = &job["TaskGroups"][0];
    assert_eq!(group["RestartPolicy"]["Attempts"], 0);
    assert_eq!(group["ReschedulePolicy"]["Attempts"], 0);
    assert_eq!(group["ReschedulePolicy"]["Unlimited"], false);
    let task = &group["Tasks"][0];
    assert_eq!(
        task["Name"], "runner",
        "the driver follows the task named runner"
    );
    assert!(task.get("DispatchPayload").is_none());
    // The identity the runner presents: named, for the worker's audience, in a file.
    assert_eq!(
        task["Identities"],
        json!([{ "Name": "ao_handover", "Audience": ["agent-orchestrator-handover"],
                 "Env": false, "File": true, "TTL": 3_600_000_000_000i64, "ChangeMode": "noop" }])
    );
    assert_eq!(task["Env"]["AO_HANDOVER_URL"], "${NOMAD_META_handover_url}");
    let args: Vec<&str> = task["Config"]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The spec comes by the hand-over, the driver reads alloc/result.json.
    assert_eq!(
        args,
        [
            "runner",
            "--handover",
            "--result",
            "${NOMAD_ALLOC_DIR}/result.json"
        ]
    );
    assert_eq!(task["KillTimeout"], 20_000_000_000i64);
    // No model key in the job at all: not in the environment, not from a variable (it
    // stays with the worker's proxy).
    let env = task["Env"].as_object().unwrap();
    assert!(!env.contains_key("ANTHROPIC_API_KEY"));
    for t in task["Templates"].as_array().into_iter().flatten() {
        let text = t["EmbeddedTmpl"].as_str().unwrap_or_default();
        assert!(
            !text.contains("nomadVar") && !text.contains("ANTHROPIC"),
            "{text}"
        );
    }
    // And a mistake is caught (by the contract check, when Nomad's description is here).
    if api.checks_contract() {
        let mut bad = job.clone();
        bad["TaskGroups"][0]["Tasks"][0]["KillTimeout"] = json!("20s");
        assert!(!api
            .check_body("RegisterJob", &json!({ "Job": bad }))
            .is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_runs_in_a_dispatched_nomad_sandbox() {
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let mut c = cluster(&addr, &[]);
    let fake = start_fake(&c, port, 2).await;
    let agent = script(c.dir.path(), "agent.sh", WRITING_AGENT);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo).await;

    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let sub = &done["subtasks"][0];
    assert_eq!(sub["attempt"], 1);
    // The push is in the bare repository; the agent got a key for its proxy, not the
    // worker's model key.
    let log = git(&repo, &["log", "--format=%s", "agent/note"]);
    assert_eq!(log.lines().next(), Some("coder: Add a note"));
    assert_agent_key_is_a_proxy_token(&git(&repo, &["show", "agent/note:coder.txt"]));
    assert_eq!(
        sub["outcome"]["commit"].as_str(),
        Some(git(&repo, &["rev-parse", "agent/note"]).as_str())
    );
    // The runner's output came back through the log stream.
    let (_, events) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .unwrap();
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "agent"
                && e["data"]["event"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("wrote coder.txt"))),
        "agent output missing: {events:#}"
    );

    // One dispatch of the capability's job, with the attempt's token and meta, no
    // payload: the spec went by the hand-over.
    let d = fake.dispatches();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].parent, "ao-sandbox-coder");
    assert_eq!(d[0].token, format!("{}-1", sub["id"].as_str().unwrap()));
    assert_eq!(d[0].meta["task_id"], id);
    assert_eq!(d[0].meta["subtask_id"], sub["id"].as_str().unwrap());
    assert_eq!(d[0].meta["attempt"], "1");
    assert!(d[0].meta["handover_url"].ends_with("/sandbox/v1/handover"));
    assert!(d[0].payload.is_empty());
    let (alloc, _, status) = fake.allocs().remove(0);
    assert_eq!(status, "complete");
    let states = &fake.alloc(&alloc).unwrap()["TaskStates"]["runner"];
    assert_eq!(states["State"], "dead");

    // Blocking queries, not polling: every follow-up query carries index and wait.
    let reqs = fake.requests();
    let alloc_queries: Vec<_> = reqs
        .iter()
        .filter(|r| r.operation == "GetAllocation")
        .collect();
    assert!(!alloc_queries.is_empty());
    let unblocked: Vec<_> = alloc_queries
        .iter()
        .filter(|r| {
            let keys: Vec<&str> = r.query.iter().map(|(k, _)| k.as_str()).collect();
            !(keys.contains(&"index") && keys.contains(&"wait"))
        })
        .collect();
    // The driver's first query, and the hand-over's checks of the presenting allocation
    // (at start and at the push permit).
    assert!(unblocked.len() <= 3, "{unblocked:#?}");
    assert!(reqs.iter().any(|r| r.operation.contains("client/fs/logs")));
    assert!(reqs.iter().any(|r| r.operation.contains("client/fs/cat")
        && r.query
            .contains(&("path".into(), "alloc/result.json".into()))));
    assert_no_violations(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_capacity_the_subtask_waits_without_using_attempts() {
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let mut c = cluster(&addr, &[("AO__NOMAD__PLACEMENT_TIMEOUT_SECS", "3")]);
    let fake = start_fake(&c, port, 0).await;
    let agent = script(c.dir.path(), "agent.sh", WRITING_AGENT);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo).await;

    // Nothing fits: the evaluation reports the failed placement and is blocked; after
    // the placement timeout the worker purges the instance and queues the same attempt.
    until("a second dispatch after a purge", &c, || {
        fake.dispatches().len() >= 2 && !fake.purged().is_empty()
    })
    .await;
    assert!(fake.evals().iter().any(|e| e["FailedTGAllocs"].is_object()
        && e["BlockedEval"].as_str().is_some_and(|b| !b.is_empty())));
    let task = c.task(&id).await.unwrap();
    assert!(
        matches!(task["status"].as_str(), Some("queued" | "running")),
        "{task:#}"
    );
    assert_eq!(task["subtasks"][0]["attempt"], 1);
    assert!(fake.dispatches().iter().all(|d| d.token.ends_with("-1")));

    // Capacity comes: the task completes, still as attempt 1.
    fake.set_slots(1);
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert_eq!(done["subtasks"][0]["attempt"], 1);
    assert_agent_key_is_a_proxy_token(&git(&repo, &["show", "agent/note:coder.txt"]));
    assert_no_violations(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_allocation_is_retried_as_a_new_attempt() {
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let mut c = cluster(&addr, &[]);
    let fake = start_fake(&c, port, 2).await;
    let marker = c.dir.path().join("first-run");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!(
            "if [ ! -e {m} ]; then touch {m}; sleep 300; fi\n{WRITING_AGENT}",
            m = marker.display()
        ),
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo).await;

    let first = running_alloc(&c, &fake).await;
    until("the agent to start", &c, || marker.exists()).await;
    assert!(fake.lose(&first));
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert_eq!(done["subtasks"][0]["attempt"], 2);
    assert_eq!(fake.alloc(&first).unwrap()["ClientStatus"], "lost");
    let tokens: Vec<String> = fake.dispatches().iter().map(|d| d.token.clone()).collect();
    assert!(
        tokens[0].ends_with("-1") && tokens[1].ends_with("-2"),
        "{tokens:?}"
    );
    assert_no_violations(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_the_task_stops_and_purges_the_allocation() {
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let mut c = cluster(&addr, &[("AO__WORKER__CANCEL_POLL_SECS", "1")]);
    let fake = start_fake(&c, port, 2).await;
    let agent = script(c.dir.path(), "agent.sh", "sleep 300");
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo).await;

    let alloc = running_alloc(&c, &fake).await;
    let pid = fake.pid(&alloc).expect("sandbox pid");
    let (status, body) = c
        .post_json(&format!("/api/v1/tasks/{id}/cancel"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let job = fake.alloc(&alloc).unwrap()["JobID"]
        .as_str()
        .unwrap()
        .to_string();
    until(
        "the job to be purged and its allocation stopped",
        &c,
        || {
            fake.purged().contains(&job)
                && fake.alloc(&alloc).is_some_and(|a| {
                    a["DesiredStatus"] == "stop" && a["ClientStatus"] == "complete"
                })
        },
    )
    .await;
    // The sandbox's processes are gone.
    until("the sandbox to die", &c, || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
    })
    .await;
    let task = c.wait_for_status(&id, &["cancelled"], LIMIT).await.unwrap();
    assert_eq!(task["status"], "cancelled");
    assert_no_violations(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_past_its_time_is_stopped_as_a_timeout() {
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let mut c = cluster(
        &addr,
        &[
            ("AO__AGENT__TIMEOUT_SECS", "1"),
            ("AO__NOMAD__TIMEOUT_MARGIN_SECS", "3"),
        ],
    );
    let fake = start_fake(&c, port, 2).await;
    let agent = script(c.dir.path(), "agent.sh", WRITING_AGENT);
    // The setup script hangs, past the agent's limit plus the margin.
    let repo = bare_repo(
        c.dir.path(),
        "project",
        &[("agent-setup.sh", "sleep 300\n")],
    );
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo).await;

    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "failed", "{done:#}");
    let outcome = &done["subtasks"][0]["outcome"];
    assert_eq!(outcome["kind"], "timeout", "{outcome}");
    assert!(outcome["error"].as_str().unwrap().contains("exceeded 4 s"));
    let (alloc, job, _) = fake.allocs().remove(0);
    assert!(fake.purged().contains(&job));
    until("the allocation to be killed", &c, || {
        fake.alloc(&alloc)
            .is_some_and(|a| a["ClientStatus"] == "complete" && a["DesiredStatus"] == "stop")
    })
    .await;
    assert_no_violations(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn nomad_being_down_is_a_retryable_failure_and_the_task_is_not_lost() {
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let mut c = cluster(
        &addr,
        &[
            ("AO__NOMAD__UNREACHABLE_SECS", "2"),
            ("AO__COORDINATOR__MAX_ATTEMPTS", "10"),
        ],
    );
    let agent = script(c.dir.path(), "agent.sh", WRITING_AGENT);
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let id = submit(&c, &repo).await;

    // Nothing listens on Nomad's port: the first attempt ends as a retryable failure.
    let deadline = Instant::now() + LIMIT;
    loop {
        let task = c.task(&id).await.unwrap();
        if task["subtasks"][0]["attempt"].as_u64().unwrap_or(0) >= 2 {
            let first = &task["subtasks"][0]["outcome"];
            assert!(
                first.is_null() || first["kind"] == "infrastructure",
                "{task:#}"
            );
            break;
        }
        assert_ne!(task["status"], "failed", "{task:#}");
        assert!(
            Instant::now() < deadline,
            "no retry: {task:#}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.logs().contains("unreachable"), "{}", c.logs());
    // Nomad comes back with the jobs and variables it had: a later attempt runs.
    let fake = FakeNomad::start_with(port, options(&c, 2), &["coder"], &[])
        .await
        .unwrap();
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert!(done["subtasks"][0]["attempt"].as_u64().unwrap() >= 2);
    assert_no_violations(&fake);
}

/// A GitHub task's agent in the Nomad sandbox: writes a file, notes how long its prompt
/// was, and presents the sandbox's workload identity to the hand-over a second time
/// (as a hostile agent would), recording the answer.
const HANDOVER_AGENT: &str = r#"
echo "coder was here" > coder.txt
jwt=$(cat "$NOMAD_SECRETS_DIR/nomad_ao_handover.jwt")
code=$(curl -s -o /dev/null -w '%{http_code}' --noproxy '*' -X POST -H "Authorization: Bearer $jwt" "$AO_HANDOVER_URL")
echo "prompt_bytes=${#AO_PROMPT} second=$code git_token=${AO_GIT_TOKEN:-none}" > handover.txt
echo "wrote coder.txt"
"#;

async fn present(url: &str, jwt: &str) -> u16 {
    reqwest::Client::new()
        .post(url)
        .bearer_auth(jwt)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_github_task_gets_its_git_token_and_long_prompt_by_the_handover_only() {
    const REPO: &str = ao_tests::stack::REPO;
    let mut s = NomadGithub::start(StackOptions {
        pipeline: Some("code"),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let (gh, fake) = (&s.gh, &s.nomad);
    let c = &mut s.c;
    let agent = script(c.dir.path(), "agent.sh", HANDOVER_AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    // A prompt of about 32 KiB: twice Nomad's dispatch payload limit.
    let body = "Please add a note file. ".repeat(31 * 1024 / 24);
    let issue = gh.open_issue(REPO, "Add a note", &body, "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = gh
        .wait_for("a pull request", LIMIT, |m| !m.pulls(REPO).is_empty())
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let pr = m.pulls(REPO)[0].clone();
    // Pushed with the repository-scoped token the worker minted, through Nomad.
    let bare = gh.repo_path(REPO);
    assert_eq!(
        git(&bare, &["show", &format!("{}:coder.txt", pr.head)]),
        "coder was here"
    );
    // The whole prompt arrived; the agent's own second presentation was refused; the
    // agent never saw the git token.
    let note = git(&bare, &["show", &format!("{}:handover.txt", pr.head)]);
    let prompt_bytes: usize = note
        .split_whitespace()
        .find_map(|w| w.strip_prefix("prompt_bytes="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(prompt_bytes > 30 * 1024, "{note}");
    assert!(note.contains("second=409"), "{note}");
    assert!(note.contains("git_token=none"), "{note}");

    // No per-attempt secret in anything the fake Nomad holds or served.
    let m = gh.model();
    assert!(!m.tokens.is_empty());
    let stored = fake.stored_bytes();
    assert!(stored.iter().any(|(w, _)| w.starts_with("dispatch meta")));
    for token in m.tokens.keys() {
        for (where_, bytes) in &stored {
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "the git token is in {where_}"
            );
        }
    }
    let d = fake.dispatches();
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].payload.is_empty());
    assert!(!d[0].meta.values().any(|v| v.contains("Please add")));

    // After the attempt, its own identity is refused; so is a validly signed one for
    // another job, and one for another audience.
    let url = d[0].meta["handover_url"].clone();
    let (_, jwt) = stored
        .iter()
        .find(|(w, _)| w.ends_with("nomad_ao_handover.jwt"))
        .unwrap();
    let jwt = String::from_utf8(jwt.clone()).unwrap();
    assert_eq!(present(&url, &jwt).await, 403);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (alloc, _, _) = fake.allocs().remove(0);
    let forged = |job: &str, aud: &str| {
        fake.keyring().sign(&json!({
            "nomad_namespace": "default", "nomad_job_id": job,
            "nomad_allocation_id": alloc, "nomad_task": "runner",
            "aud": [aud], "iat": now, "nbf": now, "exp": now + 600,
        }))
    };
    assert_eq!(
        present(
            &url,
            &forged("ao-sandbox-coder", "agent-orchestrator-handover")
        )
        .await,
        403
    );
    assert_eq!(
        present(&url, &forged(&d[0].job, "nomadproject.io")).await,
        401
    );
    assert_eq!(present(&url, "not-a-jwt").await, 401);
    assert_no_violations(fake);
}

/// An agent that runs longer than the installation token lives.
const SLOW_AGENT: &str = r#"
sleep 8
echo "coder was here" > coder.txt
echo "wrote coder.txt"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_nomad_run_longer_than_its_token_pushes_with_a_fresh_one() {
    const REPO: &str = ao_tests::stack::REPO;
    let mut s = NomadGithub::start(StackOptions {
        pipeline: Some("code"),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    // Tokens live 4 s; the agent runs 8 s.
    s.gh.set_token_ttl(Duration::from_secs(4));
    let (gh, fake) = (&s.gh, &s.nomad);
    let c = &mut s.c;
    let agent = script(c.dir.path(), "agent.sh", SLOW_AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = gh.open_issue(REPO, "Add a note", "Please add a note file.", "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = gh
        .wait_for("a pull request", LIMIT, |m| !m.pulls(REPO).is_empty())
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let pr = m.pulls(REPO)[0].clone();
    assert_eq!(
        git(
            &gh.repo_path(REPO),
            &["show", &format!("{}:coder.txt", pr.head)]
        ),
        "coder was here"
    );
    // One attempt, one dispatch; the push used a token minted after the first expired.
    assert_eq!(fake.dispatches().len(), 1);
    let scoped = m
        .token_requests
        .iter()
        .filter(|t| t.body.get("repositories").is_some())
        .count();
    assert!(
        scoped >= 2,
        "a fresh token was minted for the push: {scoped}"
    );
    assert!(m.git_refusals.is_empty(), "{:?}", m.git_refusals);
    // The fresh token is nowhere in Nomad either.
    let stored = fake.stored_bytes();
    for token in m.tokens.keys() {
        assert!(!stored
            .iter()
            .any(|(_, b)| b.windows(token.len()).any(|w| w == token.as_bytes())));
    }
    assert_no_violations(fake);
}
