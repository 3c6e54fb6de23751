//! Hostile and careless input to the plan, its approval and rejection, the checkers'
//! verdicts and the CI checks of the agent's pull request: every client mistake is a
//! clear 4xx, every hostile text stays inert on GitHub and within GitHub's limits, and
//! no flood of events runs more fix rounds than `pipeline.max_fix_rounds`.

use ao_tests::fake_github::{FakeGithub, BOT_LOGIN};
use ao_tests::{bare_repo, script, Cluster, TOKEN};
use serde_json::{json, Value};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
/// GitHub's limit on a comment's body, in characters ("body is too long (maximum is
/// 65536 characters)").
const GITHUB_MAX_BODY_CHARS: usize = 65_536;

/// `POST /api/v1/tasks/{id}/reject` with a raw body and content type.
async fn reject_raw(c: &Cluster, id: &str, content_type: &str, body: &str) -> (u16, Value) {
    let r = c
        .http
        .post(c.url(&format!("/api/v1/tasks/{id}/reject")))
        .bearer_auth(TOKEN)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .expect("the request is answered");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A new user's mistakes on reject and approve: a body that is not JSON, not an object,
/// feedback that is not text, a task that has no plan, an unknown task; each a 4xx with
/// a JSON error naming the problem, and the task unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn every_malformed_rejection_is_a_clear_client_error() {
    let mut c = Cluster::new(&[]);
    c.start_in_process().await.unwrap();
    let (_, task) = c
        .submit(json!({ "repository": "/tmp/nowhere.git", "prompt": "p", "pipeline": ["coder"] }))
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    for (ct, body) in [
        ("application/json", "{\"feedback\": "),
        ("application/json", "[\"feedback\"]"),
        ("application/json", "{\"feedback\": 42}"),
        ("application/json", "{\"feedback\": null}"),
        ("application/json", "\"just text\""),
        ("application/json", ""),
        ("text/plain", "smaller steps"),
    ] {
        let (status, err) = reject_raw(&c, &id, ct, body).await;
        assert!(
            (400..500).contains(&status),
            "{ct} {body:?} → {status} {err}"
        );
        assert!(
            err["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{ct} {body:?} → {status} {err}"
        );
    }
    // Feedback at the limit counts bytes, not characters: 1,025 four-byte characters are
    // 4,100 bytes.
    let (status, err) = reject_raw(
        &c,
        &id,
        "application/json",
        &json!({ "feedback": "😀".repeat(1025) }).to_string(),
    )
    .await;
    assert_eq!(status, 422, "{err}");
    // Exactly at the limit: accepted as feedback, refused because nothing waits.
    let (status, err) = reject_raw(
        &c,
        &id,
        "application/json",
        &json!({ "feedback": "😀".repeat(1024) }).to_string(),
    )
    .await;
    assert_eq!(status, 409, "{err}");
    // A task with no planner waits for no plan: a conflict, twice, not a 500.
    for _ in 0..2 {
        let (status, err) = reject_raw(
            &c,
            &id,
            "application/json",
            &json!({ "feedback": "smaller steps" }).to_string(),
        )
        .await;
        assert_eq!(status, 409, "{err}");
    }
    let (status, _) = c
        .post_json(&format!("/api/v1/tasks/{id}/approve"))
        .await
        .unwrap();
    assert_eq!(status, 409);
    // Unknown or malformed task ids.
    for other in [
        "0190f6a2-7c3e-7d4a-9b1e-2f3a4b5c6d7e",
        "not-an-id",
        "..%2F..%2Fetc",
    ] {
        let (status, err) = reject_raw(
            &c,
            other,
            "application/json",
            &json!({ "feedback": "x" }).to_string(),
        )
        .await;
        assert_eq!(status, 404, "{other} → {err}");
    }
    let after = c.task(&id).await.unwrap();
    assert_eq!(after["status"], "queued", "{after:#}");
}

/// The planner of [`a_hostile_plan_fails_clearly_after_one_repair_turn`]: first a plan
/// whose step depends on itself and whose paths climb out of the repository, then (the
/// repair turn) a plan with more steps than allowed.
const CYCLIC_PLANNER: &str = r#"
prompt="${@: -1}"
if [[ "$AO_CAPABILITY" != planner ]]; then echo "not a planner: $AO_CAPABILITY"; exit 0; fi
echo '```json'
if [[ "$prompt" == *"cycle"* ]]; then
  printf '{"version": 1, "steps": ['
  for i in $(seq 1 40); do
    [[ $i -gt 1 ]] && printf ','
    printf '{"id": "s%d", "capability": "coder", "title": "t", "instructions": "i"}' "$i"
  done
  printf ']}\n'
else
  echo '{"version": 1, "steps": [{"id": "a", "capability": "coder", "title": "A", "instructions": "do a", "depends_on": ["b"], "paths": ["../../etc/passwd"]}, {"id": "b", "capability": "coder", "title": "B", "instructions": "do b", "depends_on": ["a", "b"]}]}'
fi
echo '```'
"#;

/// A plan with a cycle and a self-dependency gets one repair turn (told of the cycle);
/// a repaired plan with too many steps fails the task for good, saying why; nothing of
/// either plan runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_plan_fails_clearly_after_one_repair_turn() {
    let mut c = Cluster::new(&[]);
    let repo = bare_repo(c.dir.path(), "plan", &[]);
    let agent = script(c.dir.path(), "agent.sh", CYCLIC_PLANNER);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let (status, task) = c
        .submit(
            json!({ "repository": repo.to_str().unwrap(), "prompt": "Add a note",
            "pipeline": ["planner", "coder"] }),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap();
    let t = c
        .wait_for_status(id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(t["status"], "failed", "{t:#}");
    let error = t["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("40 steps") && error.contains("at most 12"),
        "{t:#}"
    );
    assert_eq!(t["planning"]["repairs"], 1, "{t:#}");
    let subtasks = t["subtasks"].as_array().unwrap();
    assert!(
        subtasks.iter().all(|s| s["capability"] == "planner"
            || s["status"] != "succeeded" && s["outcome"].is_null()),
        "a step of an invalid plan ran: {t:#}"
    );
}

/// The agent of [`a_finding_with_an_absurd_line_still_asks_for_changes`]: a plan of a
/// coder step and a reviewer step; the reviewer always asks for changes, with a finding
/// whose line no file has (negative, and beyond `u32`).
const ABSURD_REVIEWER: &str = r#"
prompt="${@: -1}"
case "$AO_CAPABILITY" in
planner)
  echo '```json'
  echo '{"version": 1, "steps": [{"id": "code", "capability": "coder", "title": "Code", "instructions": "Write NOTE.md."}, {"id": "review", "capability": "reviewer", "title": "Review", "instructions": "Review it.", "depends_on": ["code"]}]}'
  echo '```'
  ;;
reviewer)
  echo 'Two problems.'
  echo '```json'
  echo '{"verdict": "request_changes", "findings": [{"file": "NOTE.md", "line": -1, "message": "NEGATIVE-LINE finding"}, {"file": "NOTE.md", "line": 99999999999, "message": "HUGE-LINE finding"}]}'
  echo '```'
  ;;
*)
  echo "note $RANDOM" >> NOTE.md
  echo "wrote NOTE.md"
  ;;
esac
"#;

/// A reviewer's finding whose line is absurd is still a finding: the verdict asks for
/// changes, a fix round runs (at most `pipeline.max_fix_rounds`), and the task fails
/// naming the findings, rather than the whole verdict being dropped and the review
/// counting as an approval.
#[tokio::test(flavor = "multi_thread")]
async fn a_finding_with_an_absurd_line_still_asks_for_changes() {
    let mut c = Cluster::new(&[("AO__PIPELINE__MAX_FIX_ROUNDS", "1")]);
    let repo = bare_repo(c.dir.path(), "review", &[]);
    let agent = script(c.dir.path(), "agent.sh", ABSURD_REVIEWER);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let (status, task) = c
        .submit(
            json!({ "repository": repo.to_str().unwrap(), "prompt": "Add a note",
            "pipeline": ["planner", "coder", "reviewer"] }),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap();
    let t = c
        .wait_for_status(id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(t["planning"]["fix_rounds"], 1, "{t:#}\n{}", c.logs());
    assert_eq!(t["status"], "failed", "{t:#}");
    let error = t["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("NEGATIVE-LINE finding") && error.contains("HUGE-LINE finding"),
        "{t:#}"
    );
}

/// An issue whose text is one long run of backticks, on a repository that asks for
/// approval: the progress comment shows the agent's text in a fence the text cannot
/// close, and the whole comment still fits GitHub's limit on a comment's body (else
/// GitHub refuses it and the approver sees nothing).
#[tokio::test(flavor = "multi_thread")]
async fn a_progress_comment_with_hostile_fences_fits_githubs_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    fake.add_installation(7, "acme");
    let repo = "acme/careful";
    fake.add_repo(
        7,
        repo,
        &[(".agent-orchestrator.toml", "require_approval = true\n")],
    );
    fake.set_role(repo, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[]);
    c.start_in_process().await.unwrap();
    let body = format!("@acme/admins\n{}\n<img src=x>", "`".repeat(40_000));
    let issue = fake.open_issue(repo, "Fences", &body, "alice");
    assert_eq!(fake.label_issue(repo, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the progress comment asking for approval", LIMIT, |m| {
            m.comments_on(repo, issue)
                .iter()
                .any(|c| c.user == BOT_LOGIN && c.body.contains("waiting for `/agent approve`"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let comment = m
        .comments_on(repo, issue)
        .into_iter()
        .find(|c| c.user == BOT_LOGIN && c.body.contains("waiting for `/agent approve`"))
        .unwrap();
    let chars = comment.body.chars().count();
    assert!(
        chars <= GITHUB_MAX_BODY_CHARS,
        "the progress comment is {chars} characters; GitHub refuses more than {GITHUB_MAX_BODY_CHARS}"
    );
}

const CI_AGENT: &str = r#"
echo "$RANDOM" >> note.txt
echo "wrote note.txt"
"#;

/// CI checks as an attacker would send them: a failing check on a branch that is not
/// the agent's starts nothing; a flood of failing checks on one head starts one round;
/// once the rounds are used up, a check named to inject markup is named inertly in the
/// App's answer.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_and_flooding_checks_stay_within_the_rounds_and_inert() {
    const REPO: &str = "acme/widgets";
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    fake.add_installation(7, "acme");
    fake.grant(7, "checks", Some("read"));
    fake.grant(7, "statuses", Some("read"));
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[("AO__PIPELINE__MAX_FIX_ROUNDS", "1")]);
    let agent = script(c.dir.path(), "agent.sh", CI_AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the first run done", LIMIT, |m| {
            m.pulls(REPO).len() == 1
                && m.issue(REPO, issue)
                    .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let pr = m.pulls(REPO)[0].clone();
    let rounds = |list: &Value| {
        list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["ci_round"].is_number())
            .count()
    };

    // Not the agent's branch: delivered before the flood below, it starts no round of
    // its own (the one round counted at the end is the flood's).
    assert_eq!(
        fake.check_run(REPO, "main", "unit", Some("failure"), "FAIL on main")
            .await,
        202
    );

    // A flood of failing checks on one head: one round.
    let flood: Vec<_> = (0..15)
        .map(|i| {
            let name = format!("lint-{i}");
            let (fake, head) = (&fake, pr.head.clone());
            async move {
                fake.check_run(REPO, &head, &name, Some("failure"), "FAIL")
                    .await
            }
        })
        .collect();
    for status in futures::future::join_all(flood).await {
        assert_eq!(status, 202);
    }
    let round = loop {
        let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
        let found = list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["ci_round"] == 1)
            .cloned();
        if let Some(t) = found {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let prompt = round["prompt"].as_str().unwrap_or_default();
    assert!(
        prompt.contains("Failing check: lint-") && !prompt.contains("FAIL on main"),
        "{prompt}"
    );
    let round = round["id"].as_str().unwrap().to_string();
    let done = c
        .wait_for_status(&round, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());

    // The new head fails too, on a check named to inject markup: no second round, and
    // the App's answer names the check without a mention, a link or HTML.
    let evil =
        "unit\n\n@acme/admins [click](https://evil.example) <img src=x onerror=alert(1)>\n\n";
    assert_eq!(
        fake.check_run(REPO, &pr.head, evil, Some("failure"), "FAIL")
            .await,
        202
    );
    let m = fake
        .wait_for("the answer that the rounds are used up", LIMIT, |m| {
            m.comments_on(REPO, pr.number)
                .iter()
                .any(|c| c.user == BOT_LOGIN && c.body.contains("still fail after"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let answer = m
        .comments_on(REPO, pr.number)
        .into_iter()
        .find(|c| c.user == BOT_LOGIN && c.body.contains("still fail after"))
        .unwrap()
        .body;
    // The name, on one line, in a code span it cannot leave.
    assert!(
        answer.contains(
            "`unit  @acme/admins [click](https://evil.example) <img src=x onerror=alert(1)>`"
        ) && !answer.contains("\n\n@acme"),
        "markup from a check's name reaches the App's comment:\n{answer}"
    );
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    assert_eq!(rounds(&list), 1, "{list:#}");
}

/// A pull request merged (or closed) by a person is no longer the agent's to fix: a
/// check that fails on its branch afterwards (a re-run, a late runner) starts no fix
/// round that would push to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_check_after_the_pull_request_is_merged_starts_no_round() {
    const REPO: &str = "acme/widgets";
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    fake.add_installation(7, "acme");
    fake.grant(7, "checks", Some("read"));
    fake.grant(7, "statuses", Some("read"));
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[]);
    let agent = script(c.dir.path(), "agent.sh", CI_AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the first run done", LIMIT, |m| {
            m.pulls(REPO).len() == 1
                && m.issue(REPO, issue)
                    .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let pr = m.pulls(REPO)[0].clone();
    fake.merge_pull(REPO, pr.number);
    assert_eq!(
        fake.check_run(REPO, &pr.head, "unit", Some("failure"), "FAIL late")
            .await,
        202
    );
    // Deliveries are handled in order: once `/agent status` is answered, the check's
    // delivery was handled before it.
    let before = fake
        .model()
        .comments_on(REPO, issue)
        .iter()
        .filter(|c| c.user == BOT_LOGIN)
        .count();
    assert_eq!(
        fake.comment(REPO, issue, "/agent status", "alice").await,
        202
    );
    fake.wait_for("the answer to /agent status", LIMIT, |m| {
        m.comments_on(REPO, issue)
            .iter()
            .filter(|c| c.user == BOT_LOGIN)
            .count()
            > before
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    let rounds: Vec<&Value> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["ci_round"].is_number())
        .collect();
    assert!(
        rounds.is_empty(),
        "a fix round for a merged pull request: {rounds:#?}"
    );
}

const ONE_PLAN: &str = r#"
if [[ "$AO_CAPABILITY" == planner ]]; then
  echo '```json'
  echo '{"version": 1, "summary": "ONE-PLAN", "steps": [{"id": "note", "capability": "coder", "title": "Note", "instructions": "Write NOTE.md."}]}'
  echo '```'
else
  echo note > NOTE.md; echo "wrote NOTE.md"
fi
"#;

/// Two rejections of the same plan at the same moment: one is taken, the other is a
/// conflict (the task no longer waits); the planner plans again once, not twice.
#[tokio::test(flavor = "multi_thread")]
async fn two_rejections_at_once_replan_once() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    fake.add_installation(7, "acme");
    let repo = "acme/careful";
    fake.add_repo(
        7,
        repo,
        &[(
            ".agent-orchestrator.toml",
            "default_pipeline = \"plan-code\"\nrequire_approval = true\n\
             [pipelines]\nplan-code = [\"planner\", \"coder\"]\n",
        )],
    );
    fake.set_role(repo, "alice", "maintain");
    let mut c = fake.cluster(None, &[]);
    let agent = script(c.dir.path(), "agent.sh", ONE_PLAN);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = fake.open_issue(repo, "Add a note", "Please.", "alice");
    assert_eq!(fake.label_issue(repo, issue, "agent", "alice").await, 202);
    let id = loop {
        let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
        if let Some(id) = list["tasks"][0]["id"].as_str() {
            break id.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.wait_for_status(&id, &["awaiting_approval"], LIMIT)
        .await
        .unwrap();
    let body = json!({ "feedback": "smaller" }).to_string();
    let (a, b) = tokio::join!(
        reject_raw(&c, &id, "application/json", &body),
        reject_raw(&c, &id, "application/json", &body)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let t = c
        .wait_for_status(&id, &["awaiting_approval"], LIMIT)
        .await
        .unwrap();
    assert_eq!(t["planning"]["rejections"], 1, "{t:#}");
}
