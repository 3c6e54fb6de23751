//! Attacks on the Nomad hand-over, the push permit and the planner's plan, each written as
//! the attacker would try it. A test passes when the attack is held; a failing test is an
//! attack that gets through (its message says what the attacker got).

// Test helpers may panic: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use ao_shared::capability::Capability;
use ao_shared::status::TaskStatus;
use ao_shared::task::{Outcome, Planning, Task, TaskSource};
use ao_tests::stack::{NomadGithub, StackOptions, NOMAD_TOKEN};
use ao_tests::{git, script, Cluster};
use serde_json::json;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

/// Settings as the stack takes them.
fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The hostile agent: reads the sandbox's workload identity (as the existing hand-over
/// test shows it can), asks the push permit itself before the runner does, keeps the
/// answer where the test can read it, and tries to push to `main` with what it got.
/// It goes to the worker straight (`--noproxy`), as the allocation's network lets it: the
/// proxy of its environment would refuse the worker's address.
const THIEF_AGENT: &str = r#"
jwt=$(cat "$NOMAD_SECRETS_DIR/nomad_ao_handover.jwt")
base="${AO_HANDOVER_URL%/sandbox/v1/handover}"
curl -s -o "$OUT.metrics" -w '%{http_code}' --noproxy '*' "$base/metrics" > "$OUT.metrics.code"
curl -s --noproxy '*' -X POST -H "Authorization: Bearer $jwt" "$AO_HANDOVER_URL/push" > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
tok=$(sed -n 's/.*"git_token":"\([^"]*\)".*/\1/p' "$OUT")
url=$(git remote get-url origin 2>/dev/null)
echo "stolen" > stolen.txt
git add stolen.txt >/dev/null 2>&1
git -c user.name=x -c user.email=x@x commit -qm stolen >/dev/null 2>&1
if [ -n "$tok" ] && [ -n "$url" ]; then
  git -c credential.helper= -c "credential.helper=!f() { echo username=x-access-token; echo password=$tok; }; f" \
    push -q "$url" HEAD:refs/heads/main > "$OUT.push" 2>&1
  echo "rc=$?" >> "$OUT.push"
fi
echo "coder was here" > coder.txt
echo "wrote coder.txt"
"#;

async fn present(url: &str, jwt: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(jwt)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// Attack 1 (push permit theft) and attack 2 (forged identities at the listener), on one
/// stack: the real coordinator and worker, the fake GitHub, the fake Nomad running the
/// sandbox job under bwrap.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_agent_and_forged_identities_against_the_handover() {
    const REPO: &str = ao_tests::stack::REPO;
    let mut s = NomadGithub::start(StackOptions {
        pipeline: Some("code"),
        env: settings(&[]),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let (gh, fake, addr) = (&s.gh, &s.nomad, s.nomad_addr.clone());
    let c = &mut s.c;
    let out = c.dir.path().join("stolen.json");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!("OUT={}\n{THIEF_AGENT}", out.display()),
    );
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = gh.open_issue(REPO, "Add a note", "Please add a note file.", "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);

    let deadline = Instant::now() + LIMIT;
    while !out.exists() {
        assert!(Instant::now() < deadline, "no answer\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the agent finish its push attempt.
    let push_note = out.with_extension("json.push");
    let waited = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&push_note).is_ok_and(|s| s.contains("rc=")) {
        if Instant::now() > waited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap_or(json!(null));
    let pushed = std::fs::read_to_string(&push_note).unwrap_or_default();
    let main = git(&gh.repo_path(REPO), &["log", "--format=%s", "main"]);
    let m = gh.model();
    let stolen = answer["git_token"].as_str().unwrap_or_default().to_string();
    let scope = m.tokens.get(&stolen).map(|t| t.permissions.clone());
    eprintln!(
        "agent's push-permit answer: granted={} token_scope={scope:?}",
        answer["granted"]
    );
    eprintln!("agent's own push to main: {pushed:?}; main log: {main:?}");

    // Attack 2: forged and altered identities at the worker's listener. The URL is the one
    // the allocations were given.
    let url = fake.dispatches()[0].meta["handover_url"].clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let job = fake.dispatches()[0].job.clone();
    let (alloc, _, _) = fake.allocs().remove(0);
    let claims = |over: serde_json::Value| {
        let mut c = json!({
            "nomad_namespace": "default", "nomad_job_id": job,
            "nomad_allocation_id": alloc, "nomad_task": "runner",
            "aud": ["agent-orchestrator-handover"], "iat": now, "nbf": now, "exp": now + 600,
        });
        for (k, v) in over.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let jwks: serde_json::Value = reqwest::get(format!("{addr}/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_string();
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
        b64(&claims(json!({})))
    );
    // HS256 keyed with the public key's JWK text (the classic alg confusion).
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = Some(kid.clone());
    let hs256 = jsonwebtoken::encode(
        &hs,
        &claims(json!({})),
        &jsonwebtoken::EncodingKey::from_secret(jwks["keys"][0].to_string().as_bytes()),
    )
    .unwrap();
    // A token signed by a key the JWKS does not hold, under a kid it does not hold.
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = ao_tests::fake_nomad::identity::Keyring::generate(rogue_dir.path()).unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("alg none", none),
        ("HS256 with the public key", hs256),
        ("unknown kid, rogue key", rogue.sign(&claims(json!({})))),
        (
            "expired",
            fake.keyring().sign(&claims(
                json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
            )),
        ),
        (
            "not yet valid",
            fake.keyring().sign(&claims(json!({"nbf": now + 3600}))),
        ),
        (
            "other audience",
            fake.keyring()
                .sign(&claims(json!({"aud": ["nomadproject.io"]}))),
        ),
        (
            "other namespace",
            fake.keyring()
                .sign(&claims(json!({"nomad_namespace": "other"}))),
        ),
        (
            "other task of the allocation",
            fake.keyring()
                .sign(&claims(json!({"nomad_task": "sidecar"}))),
        ),
        (
            "other job",
            fake.keyring()
                .sign(&claims(json!({"nomad_job_id": "ao-sandbox-coder"}))),
        ),
    ];
    let mut accepted = Vec::new();
    for (name, jwt) in &cases {
        for path in ["", "/push"] {
            let (status, body) = present(&format!("{url}{path}"), jwt).await;
            eprintln!("{name} at {path:?}: {status} {body}");
            if (200..300).contains(&status) || body.contains(NOMAD_TOKEN) {
                accepted.push(format!("{name} {path}: {status} {body}"));
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "forged identities accepted: {accepted:#?}"
    );
    // An unsigned header's kid is the attacker's text: it must not forge a line of the
    // worker's log.
    const FORGED_LINE: &str = "ERROR forged: lease lost for every task";
    let forged_kid = format!(
        "{}.{}.c2ln",
        b64(&json!({"alg": "RS256", "typ": "JWT", "kid": format!("k\n{FORGED_LINE}\n")})),
        b64(&claims(json!({})))
    );
    let (status, body) = present(&url, &forged_kid).await;
    eprintln!("kid with a newline: {status} {body}");
    // Wait for the refusal's own log entry, which holds the kid.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.logs().contains(" in the cluster's JWKS") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = c.logs();
    let forged_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.trim_start().starts_with(FORGED_LINE))
        .collect();
    eprintln!("forged log lines: {forged_lines:?}");
    // Nothing of the worker's secrets in its log.
    for token in m.tokens.keys() {
        assert!(
            !c.logs().contains(token.as_str()),
            "a git token in the logs"
        );
    }

    // Requests with key IDs the JWKS lacks, from anyone who reaches the listener: does
    // each one make the worker read the JWKS from Nomad again?
    let before = fake.jwks_reads();
    for i in 0..20 {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = Some(format!("no-such-key-{i}"));
        let t = format!(
            "{}.{}.c2ln",
            b64(&serde_json::to_value(&h).unwrap()),
            b64(&claims(json!({})))
        );
        assert_eq!(present(&url, &t).await.0, 401);
    }
    let reads = fake.jwks_reads() - before;
    eprintln!("JWKS reads for 20 unknown key IDs: {reads}");

    // The worker's other routes on the listener the sandbox must reach.
    let metrics_code =
        std::fs::read_to_string(out.with_extension("json.metrics.code")).unwrap_or_default();
    let metrics = std::fs::read_to_string(out.with_extension("json.metrics")).unwrap_or_default();
    let series: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    eprintln!("the agent read the worker's /metrics: {metrics_code}, series {series:?}");

    // The verdicts last, so that every attack runs either way.
    let mut broke = Vec::new();
    // The hand-over shares the worker's listener, which also serves /metrics (documented
    // in docs/sandbox.md): what matters is that nothing there names another run.
    let samples: Vec<&str> = metrics.lines().filter(|l| !l.starts_with('#')).collect();
    if metrics_code == "200"
        && ["task_id", "subtask", "repository", "token"]
            .iter()
            .any(|k| samples.iter().any(|l| l.contains(k)))
    {
        broke.push(format!(
            "the worker's /metrics, reachable from the sandbox, names runs ({} series)",
            series.len()
        ));
    }
    if reads > 1 {
        broke.push(format!(
            "20 unauthenticated requests with unknown key IDs made {reads} JWKS reads from Nomad"
        ));
    }
    if !forged_lines.is_empty() {
        broke.push(format!(
            "an unverified kid wrote a line of its own in the worker's log: {forged_lines:?}"
        ));
    }
    if answer["granted"] == json!(true) || !stolen.is_empty() {
        broke.push(format!(
            "the agent got the push permit and a git token of scope {scope:?} \
             (its own push to main: {pushed:?}; main: {main:?})"
        ));
    }
    assert!(broke.is_empty(), "{broke:#?}");
}

/// A task whose pipeline is planned, on GitHub.
fn planned_task() -> Task {
    let now = ao_shared::timefmt::now();
    let pipeline = [Capability::Planner, Capability::Coder, Capability::Tester];
    Task {
        profiles: Default::default(),
        id: ao_shared::ids::TaskId::new(),
        status: TaskStatus::Queued,
        title: "t".into(),
        prompt: "p".into(),
        repository: "/tmp/r".into(),
        branch: "agent/x".into(),
        base_branch: None,
        pipeline: "code".into(),
        source: TaskSource::Api,
        created_at: now,
        updated_at: now,
        error: None,
        version: 0,
        subtasks: ao_shared::pipeline::plan_subtasks(&pipeline),
        approval: ao_shared::task::Approval::NotRequired,
        review_round: None,
        ci_round: None,
        ci_rounds: Vec::new(),
        planning: Some(Planning {
            limits: ao_shared::plan::PlanLimits {
                max_steps: 5,
                max_parallel: 2,
                allowed: vec![Capability::Coder, Capability::Tester],
                max_fix_rounds: 1,
            },
            repairs: 0,
            expanded: false,
            summary: String::new(),
            fix_rounds: 0,
            rejections: 0,
        }),
    }
}

/// The lines of `md` outside any fenced code block.
fn outside_fences(md: &str) -> Vec<&str> {
    let mut fence: Option<usize> = None;
    let mut out = Vec::new();
    for line in md.lines() {
        let t = line.trim_start();
        let ticks = t.chars().take_while(|c| *c == '`').count();
        match fence {
            Some(n) if ticks >= n && t[ticks..].trim().is_empty() => fence = None,
            Some(_) => {}
            None if ticks >= 3 => fence = Some(ticks),
            None => out.push(line),
        }
    }
    out
}

/// Attack 3a: a hostile planner's invalid plan, whose text reaches the task's error and
/// so the GitHub progress comment: can it put markup (a mention, a link) outside the
/// fence the error is shown in?
#[test]
fn a_hostile_plan_cannot_put_markup_in_the_progress_comment() {
    let injected = "x\n```\n</details>\n\n@acme/admins [approve here](https://evil.example)\n";
    let mut broke = Vec::new();
    for (what, plan) in [
        (
            "a capability",
            json!({"version": 1, "steps": [{"id": "a", "capability": injected,
                "title": "t", "instructions": "i"}]}),
        ),
        (
            "a field name",
            json!({"version": 1, "steps": [{"id": "a", "capability": "coder",
                "title": "t", "instructions": "i", injected: 1}]}),
        ),
        (
            "a step id",
            json!({"version": 1, "steps": [{"id": injected, "capability": "coder",
                "title": "t", "instructions": "i"}]}),
        ),
        (
            "a dependency",
            json!({"version": 1, "steps": [{"id": "a", "capability": "coder",
                "title": "t", "instructions": "i", "depends_on": [injected]}]}),
        ),
    ] {
        let mut t = planned_task();
        let now = ao_shared::timefmt::now();
        // The whole reply is the plan (a fenced block could not hold the fence).
        let reply = plan.to_string();
        // The first invalid plan gets a repair turn; the second fails the task.
        for attempt in 0..2 {
            let planner = t.queue_ready(now)[0];
            let a = t.subtask(planner).unwrap().attempt;
            t.apply_outcome(planner, a, Outcome::succeeded(reply.clone(), None), 3, now)
                .unwrap();
            if attempt == 0 {
                assert_ne!(t.status, TaskStatus::Failed, "{what}: repair turn");
            }
        }
        assert_eq!(t.status, TaskStatus::Failed, "{what}");
        let comment = ao_coordinator::github::progress::render(&t, None);
        eprintln!("--- {what}:\n{comment}");
        let leaked: Vec<&str> = outside_fences(&comment)
            .into_iter()
            .filter(|l| l.contains("@acme/admins") || l.contains("evil.example"))
            .collect();
        if !leaked.is_empty() {
            broke.push(format!("{what}: {leaked:?}"));
        }
    }
    assert!(
        broke.is_empty(),
        "the plan's text is markup in the progress comment: {broke:#?}"
    );
}

/// Attack 3b: plans the coordinator must refuse: too many steps, a cycle, a capability
/// the pipeline lacks (the planner itself, to plan again without end), text past the
/// bounds, a step id that would make a branch outside the task's. None may expand.
#[test]
fn a_hostile_plan_cannot_grow_the_task_or_leave_its_branch() {
    let step = |id: &str, cap: &str, deps: &[&str]| json!({"id": id, "capability": cap, "title": "t", "instructions": "i", "depends_on": deps});
    let many: Vec<_> = (0..10_000)
        .map(|i| step(&format!("s{i}"), "coder", &[]))
        .collect();
    let cases = vec![
        ("10000 steps", json!({"version": 1, "steps": many})),
        (
            "a cycle",
            json!({"version": 1, "steps": [step("a", "coder", &["b"]), step("b", "coder", &["a"])]}),
        ),
        (
            "self dependency",
            json!({"version": 1, "steps": [step("a", "coder", &["a"])]}),
        ),
        (
            "a planner step",
            json!({"version": 1, "steps": [step("a", "planner", &[])]}),
        ),
        (
            "a reviewer step outside the pipeline",
            json!({"version": 1, "steps": [step("a", "reviewer", &[])]}),
        ),
        (
            "a branch escape",
            json!({"version": 1, "steps": [step("../../main", "coder", &[])]}),
        ),
        (
            "a refname trick",
            json!({"version": 1, "steps": [step("a..b", "coder", &[])]}),
        ),
        (
            "huge instructions",
            json!({"version": 1, "steps": [{"id": "a", "capability": "coder", "title": "t",
                "instructions": "x".repeat(1 << 20)}]}),
        ),
        (
            "huge title",
            json!({"version": 1, "steps": [{"id": "a", "capability": "coder",
                "title": "x".repeat(1 << 16), "instructions": "i"}]}),
        ),
        (
            "huge paths",
            json!({"version": 1, "steps": [{"id": "a", "capability": "coder", "title": "t",
                "instructions": "i", "paths": vec!["p"; 100_000]}]}),
        ),
    ];
    for (what, plan) in cases {
        let mut t = planned_task();
        let now = ao_shared::timefmt::now();
        let reply = format!("```json\n{plan}\n```\n");
        let before = t.subtasks.len();
        for _ in 0..2 {
            let planner = t.queue_ready(now)[0];
            let a = t.subtask(planner).unwrap().attempt;
            t.apply_outcome(planner, a, Outcome::succeeded(reply.clone(), None), 3, now)
                .unwrap();
        }
        // The plan checks refuse it on their own too (not only the reply's size bound).
        let limits = t.planning.as_ref().unwrap().limits.clone();
        assert!(
            ao_shared::plan::Plan::parse(Some(&plan), &limits).is_err(),
            "{what}: the plan is accepted"
        );
        assert_eq!(t.status, TaskStatus::Failed, "{what}: {:?}", t.error);
        eprintln!("{what}: {:.300}", t.error.as_deref().unwrap_or_default());
        assert!(t.subtasks.len() <= before, "{what}: expanded");
        // The error the comment shows is bounded.
        assert!(
            t.error.as_deref().unwrap_or_default().len() < 20_000,
            "{what}: error of {} bytes",
            t.error.as_deref().unwrap_or_default().len()
        );
    }

    // A valid plan of the most steps: every branch stays under the task's, and the
    // subtasks stay within max_steps plus their merges.
    let mut t = planned_task();
    let now = ao_shared::timefmt::now();
    let steps: Vec<_> = (0..5)
        .map(|i| step(&format!("{i}-"), "coder", &[]))
        .collect();
    let reply = format!(
        "```json\n{}\n```\n",
        json!({"version": 1, "summary": "x".repeat(1 << 20), "steps": steps})
    );
    let planner = t.queue_ready(now)[0];
    t.apply_outcome(planner, 1, Outcome::succeeded(reply, None), 3, now)
        .unwrap();
    assert!(t.subtasks.len() <= 1 + 5 + 5, "{}", t.subtasks.len());
    for s in &t.subtasks {
        if let Some(ao_shared::task::Step::Plan {
            branch: Some(b), ..
        }) = &s.step
        {
            assert!(b.starts_with("agent/x-step-"), "{b}");
            let ok = std::process::Command::new("git")
                .args(["check-ref-format", "--branch", b])
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "step branch {b:?} is not a valid branch name");
        }
    }
    let summary = &t.planning.as_ref().unwrap().summary;
    assert!(summary.len() <= 2000, "summary of {} bytes", summary.len());
    // Each step's prompt stays bounded.
    for s in &t.subtasks {
        let p = t.instructions_for(s.id).unwrap_or_default();
        assert!(p.len() < 64 * 1024, "a prompt of {} bytes", p.len());
    }
}

/// Attack 3c: a hostile tester (its output is agent text too) after the last fix round:
/// its failing output reaches the task's error and the progress comment. Can it put
/// markup outside the fence?
#[test]
fn a_hostile_checker_cannot_put_markup_in_the_progress_comment() {
    let mut t = planned_task();
    let now = ao_shared::timefmt::now();
    let plan = json!({"version": 1, "steps": [{"id": "t", "capability": "tester",
        "title": "test", "instructions": "run the tests"}]});
    let planner = t.queue_ready(now)[0];
    t.apply_outcome(
        planner,
        1,
        Outcome::succeeded(plan.to_string(), None),
        3,
        now,
    )
    .unwrap();
    let failing = || {
        let mut o = Outcome::succeeded("tests fail", None);
        o.structured = Some(Box::new(json!({"verdict": "failed",
            "failures": [{"message": "test_x"}],
            "output": "@acme/admins [approve here](https://evil.example)"})));
        o
    };
    // The first failure starts the one fix round; the check after it fails again.
    let tester = t.queue_ready(now)[0];
    t.apply_outcome(tester, 1, failing(), 3, now).unwrap();
    let fix = t.queue_ready(now)[0];
    t.apply_outcome(fix, 1, Outcome::succeeded("fixed", None), 3, now)
        .unwrap();
    let again = t.queue_ready(now)[0];
    t.apply_outcome(again, 1, failing(), 3, now).unwrap();
    assert_eq!(t.status, TaskStatus::Failed, "{:#?}", t.subtasks);
    let comment = ao_coordinator::github::progress::render(&t, None);
    let leaked: Vec<&str> = outside_fences(&comment)
        .into_iter()
        .filter(|l| l.contains("@acme/admins") || l.contains("evil.example"))
        .collect();
    assert!(
        leaked.is_empty(),
        "the tester's output is markup in the progress comment: {leaked:?}\n---\n{comment}"
    );
}

/// The agent of attempt 1 waits for its worker to die and the message to be redelivered,
/// then presents its (still valid) workload identity to the new worker's hand-over.
/// Straight (`--noproxy`): its proxy died with its worker.
const REDELIVERY_AGENT: &str = r#"
jwt=$(cat "$NOMAD_SECRETS_DIR/nomad_ao_handover.jwt")
echo started > "$OUT.started"
i=0
while [ ! -f "$DIR/url" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
url=$(cat "$DIR/url")
curl -s -o "$OUT.body" -w '%{http_code}' --noproxy '*' -X POST -H "Authorization: Bearer $jwt" "$url" > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "coder was here" > coder.txt
"#;

/// Attack 1b: get the hand-over twice. The worker running an attempt dies; the message
/// is redelivered to another worker, which dispatches the same attempt (Nomad's
/// idempotency token finds the sandbox still running) and opens a hand-over for it. The
/// old sandbox's agent, which holds the identity of that very job, claims it.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_attempt_is_not_handed_over_again_to_the_old_sandbox() {
    const REPO: &str = ao_tests::stack::REPO;
    let mut s = NomadGithub::start(StackOptions {
        pipeline: Some("code"),
        env: settings(&[
            ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "4"),
            ("AO__QUEUE__HEARTBEAT_SECS", "1"),
        ]),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let (gh, fake) = (&s.gh, &s.nomad);
    let c = &mut s.c;
    let dir = c.dir.path().to_path_buf();
    let out = dir.join("second.code");
    let agent = script(
        &dir,
        "agent.sh",
        &format!(
            "OUT={}\nDIR={}\n{REDELIVERY_AGENT}",
            out.display(),
            dir.display()
        ),
    );
    c.start_in_process().await.unwrap();
    let first = c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = gh.open_issue(REPO, "Add a note", "Please add a note file.", "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);

    wait_file("the agent runs", c, &out.with_extension("code.started")).await;
    c.workers[first].kill_hard();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let f = fake.dispatches();
    let deadline = Instant::now() + LIMIT;
    let mut d = f;
    while d.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second dispatch\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        d = fake.dispatches();
    }
    eprintln!(
        "second dispatch: same job {} (existing {})",
        d[1].job == d[0].job,
        d[1].existing
    );
    std::fs::write(dir.join("url"), &d[1].meta["handover_url"]).unwrap();
    wait_file("the agent's second claim", c, &out).await;
    let code = std::fs::read_to_string(&out).unwrap();
    let body = std::fs::read_to_string(out.with_extension("code.body")).unwrap_or_default();
    let m = gh.model();
    let tokens: Vec<&String> = m
        .tokens
        .keys()
        .filter(|t| body.contains(t.as_str()))
        .collect();
    eprintln!(
        "second claim: {code}, git tokens in the answer: {}",
        tokens.len()
    );
    assert!(
        !code.starts_with('2') && tokens.is_empty(),
        "the old sandbox's agent got the redelivered attempt's hand-over ({code}), \
         with {} git token(s) in it",
        tokens.len()
    );
}

/// Waits for `path` to exist.
async fn wait_file(what: &str, c: &Cluster, path: &std::path::Path) {
    let deadline = Instant::now() + LIMIT;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what}: timed out\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent leaves a process behind that outlives it, reads the environment of every
/// process it can see until the runner's push, and keeps any git token it finds.
const STRAY_AGENT: &str = r#"
setsid sh -c '
  end=$(( $(date +%s) + 40 ))
  while [ $(date +%s) -lt $end ]; do
    date +%s.%N > "$OUT.alive"
    for e in /proc/[0-9]*/environ; do
      t=$(tr "\0" "\n" < "$e" 2>/dev/null | sed -n "s/^AO_GIT_TOKEN=//p")
      if [ -n "$t" ]; then echo "$t" > "$OUT.tmp"; mv "$OUT.tmp" "$OUT"; exit 0; fi
    done
  done' </dev/null >/dev/null 2>&1 &
echo "coder was here" > coder.txt
echo "wrote coder.txt"
"#;

/// Attack 2b: in a Nomad sandbox, the runner is not the PID namespace's init (the job
/// runs with `init = true`; the fake runs it under bubblewrap's own init), so the stray
/// processes of the agent are not stopped before the runner commits and pushes. Does a
/// stray see the fresh git token of the push?
#[tokio::test(flavor = "multi_thread")]
async fn a_stray_of_the_agent_cannot_read_the_push_token_nomad() {
    stray_reads_the_push_token("nomad").await;
}

async fn stray_reads_the_push_token(driver: &str) {
    const REPO: &str = ao_tests::stack::REPO;
    let mut s = NomadGithub::start(StackOptions {
        pipeline: Some("code"),
        env: settings(&[("AO__SANDBOX__DRIVER", driver)]),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let gh = &s.gh;
    let c = &mut s.c;
    let out = c.dir.path().join("stray.token");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!("export OUT={}\n{STRAY_AGENT}", out.display()),
    );
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = gh.open_issue(REPO, "Add a note", "Please add a note file.", "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = gh
        .wait_for("a pull request", LIMIT, |m| !m.pulls(REPO).is_empty())
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    // The stray either found a token (then it wrote it and stopped) or is gone; wait
    // for its heartbeat to stop changing, which proves it no longer runs.
    let alive = out.with_extension("token.alive");
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(50);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = std::fs::read_to_string(&alive).unwrap_or_default();
        if now == last || out.exists() || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let pushed_at = m.pulls(REPO)[0].head.clone();
    let found = std::fs::read_to_string(&out).unwrap_or_default();
    let found = found.trim();
    let m = gh.model();
    let scope = m.tokens.get(found).map(|t| t.permissions.clone());
    eprintln!(
        "{driver}: stray heartbeat after the push: {}; token found: {}; scope {scope:?}; head {pushed_at}",
        alive.exists(),
        !found.is_empty()
    );
    assert!(
        found.is_empty(),
        "{driver}: a stray of the agent read a git token of scope {scope:?} from a process of the runner"
    );
}

/// A hostile planner: its reply mentions a team and links away, beside a valid plan.
const MENTIONING_PLANNER: &str = r#"
if [ "$AO_CAPABILITY" = planner ]; then
  echo "@acme/admins please approve: [approve](https://evil.example/approve) ![](https://evil.example/pixel.png)"
  echo '```json'
  echo '{"version":1,"steps":[{"id":"a","capability":"coder","title":"t","instructions":"write a.txt"}]}'
  echo '```'
else
  echo "$AO_CAPABILITY" > "$AO_CAPABILITY.txt"
  echo "done"
fi
"#;

/// Attack 3d: the planner's reply is posted on the issue as the plan. Does its markup (a
/// team mention, links, a tracking image) reach GitHub as the App's own comment?
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_planner_cannot_mention_or_link_in_the_plan_comment() {
    use ao_tests::fake_github::FakeGithub;
    const REPO: &str = "acme/widgets";
    let tmp = tempfile::tempdir().unwrap();
    let gh = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    gh.add_installation(7, "acme");
    gh.add_repo(7, REPO, &[]);
    gh.set_role(REPO, "alice", "write");
    let mut c = gh.cluster(Some("full"), &[]);
    let agent = script(c.dir.path(), "agent.sh", MENTIONING_PLANNER);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = gh.open_issue(REPO, "Add a note", "Please add a note file.", "alice");
    assert_eq!(gh.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = gh
        .wait_for("the plan comment", LIMIT, |m| {
            m.comments.values().any(|c| c.body.contains("**Plan**"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let plan = m
        .comments
        .values()
        .find(|c| c.body.contains("**Plan**"))
        .unwrap();
    let leaked: Vec<&str> = outside_fences(&plan.body)
        .into_iter()
        .filter(|l| l.contains("@acme/admins") || l.contains("evil.example"))
        .collect();
    eprintln!("plan comment by {}:\n{}", plan.user, plan.body);
    assert!(
        leaked.is_empty(),
        "the planner's markup is in the App's comment on the issue: {leaked:?}"
    );
}
