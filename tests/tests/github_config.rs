//! A repository's `.agent-orchestrator.toml` (read from its default branch through the
//! contents API): its own pipeline with plan approval — the plan is posted on the issue
//! and nothing is coded until `/agent approve` — and an invalid file reported on the issue.

use ao_tests::fake_github::{FakeGithub, BOT_LOGIN};
use ao_tests::script;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const AGENT: &str = r#"
if [[ "$AO_CAPABILITY" == planner ]]; then
  echo 'The plan:'
  echo '```json'
  echo '{"version": 1, "summary": "PLAN: add NOTE.md with one line.", "steps": [{"id": "note", "capability": "coder", "title": "Add NOTE.md", "instructions": "Write NOTE.md with one line."}]}'
  echo '```'
else
  echo note > NOTE.md
  echo "wrote NOTE.md"
fi
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_pipeline_waits_for_plan_approval() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    let good = "acme/careful";
    let bad = "acme/broken";
    fake.add_repo(
        7,
        good,
        &[(
            ".agent-orchestrator.toml",
            "default_pipeline = \"plan-code\"\nrequire_approval = true\n\
             [pipelines]\nplan-code = [\"planner\", \"coder\"]\n",
        )],
    );
    fake.add_repo(7, bad, &[(".agent-orchestrator.toml", "pipeline = 1\n")]);
    for r in [good, bad] {
        fake.set_role(r, "alice", "maintain");
    }
    let mut c = fake.cluster(None, &[]);
    let agent = script(c.dir.path(), "agent.sh", AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    // An invalid file: said on the issue, no task.
    let broken = fake.open_issue(bad, "Anything", "", "alice");
    assert_eq!(fake.label_issue(bad, broken, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the invalid-config comment", LIMIT, |m| {
            !m.comments_on(bad, broken).is_empty()
        })
        .await
        .unwrap();
    let said = &m.comments_on(bad, broken)[0].body;
    assert!(said.contains(".agent-orchestrator.toml"), "{said}");
    assert!(said.contains("unknown field `pipeline`"), "{said}");

    // The repository's pipeline: planner, then wait.
    let issue = fake.open_issue(good, "Add a note", "Please.", "alice");
    assert_eq!(fake.label_issue(good, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the plan on the issue", LIMIT, |m| {
            m.comments_on(good, issue)
                .iter()
                .any(|c| c.user == BOT_LOGIN && c.body.contains("PLAN: add NOTE.md"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let plan = m
        .comments_on(good, issue)
        .into_iter()
        .find(|c| c.body.contains("**Plan**"))
        .unwrap();
    assert!(plan.body.contains("/agent approve"), "{}", plan.body);
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    let tasks = list["tasks"].as_array().unwrap();
    assert_eq!(
        tasks.len(),
        1,
        "only the good repository has a task: {list:#}"
    );
    let id = tasks[0]["id"].as_str().unwrap().to_string();
    let t = c
        .wait_for_status(&id, &["awaiting_approval"], LIMIT)
        .await
        .unwrap();
    assert_eq!(t["subtasks"][1]["status"], "pending", "{t:#}");
    // Nothing was coded: no pull request, no branch.
    assert!(fake.model().pulls(good).is_empty());

    // Approval by a maintainer: the coder runs and the pull request follows.
    assert_eq!(
        fake.comment(good, issue, "/agent approve", "alice").await,
        202
    );
    let t = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(t["status"], "succeeded", "{t:#}\n{}", c.logs());
    fake.wait_for("the pull request", LIMIT, |m| {
        m.pulls(good).len() == 1
            && m.issue(good, issue)
                .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
    })
    .await
    .unwrap();
}

/// The planner of [`a_rejected_plan_is_planned_again_from_the_feedback`]: a first plan;
/// a second only when its prompt carries the feedback and the rejected plan; a third
/// likewise after a second rejection.
const REPLANNING_AGENT: &str = r#"
prompt="${@: -1}"
if [[ "$AO_CAPABILITY" == planner ]]; then
  echo 'The plan:'
  echo '```json'
  if [[ "$prompt" == *"Name them in capitals"* && "$prompt" == *'"id": "one"'* ]]; then
    echo '{"version": 1, "summary": "PLAN v3: ONE.md and TWO.md, in capitals.", "steps": [{"id": "one", "capability": "coder", "title": "First note", "instructions": "Write ONE.md in capitals."}, {"id": "two", "capability": "coder", "title": "Second note", "instructions": "Write TWO.md in capitals."}]}'
  elif [[ "$prompt" == *"Use TWO notes"* && "$prompt" == *'"id": "note"'* ]]; then
    echo '{"version": 1, "summary": "PLAN v2: ONE.md and TWO.md.", "steps": [{"id": "one", "capability": "coder", "title": "First note", "instructions": "Write ONE.md with one line."}, {"id": "two", "capability": "coder", "title": "Second note", "instructions": "Write TWO.md with one line."}]}'
  else
    echo '{"version": 1, "summary": "PLAN v1: one note.", "steps": [{"id": "note", "capability": "coder", "title": "Note for @acme/admins", "instructions": "Write NOTE.md with one line."}]}'
  fi
  echo '```'
elif [[ "$prompt" == *"Write ONE.md"* ]]; then
  echo ONE > ONE.md; echo "wrote ONE.md"
elif [[ "$prompt" == *"Write TWO.md"* ]]; then
  echo TWO > TWO.md; echo "wrote TWO.md"
else
  echo note > NOTE.md; echo "wrote NOTE.md"
fi
"#;

/// `/agent reject <feedback>` and `POST /api/v1/tasks/{id}/reject`: the plan goes back to
/// the planner, whose new run is given the feedback and the rejected plan; the new plan
/// waits for approval in turn, with each step's title and instructions on the progress
/// comment. Rejecting what waits for no plan is refused (409), and so is empty feedback.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_plan_is_planned_again_from_the_feedback() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
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
    let agent = script(c.dir.path(), "agent.sh", REPLANNING_AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = fake.open_issue(repo, "Add a note", "Please.", "alice");
    let bot_comment = |m: &ao_tests::fake_github::Model, needle: &str| {
        m.comments_on(repo, issue)
            .into_iter()
            .find(|c| c.user == BOT_LOGIN && c.body.contains(needle))
    };
    assert_eq!(fake.label_issue(repo, issue, "agent", "alice").await, 202);
    fake.wait_for("the first plan", LIMIT, |m| {
        bot_comment(m, "PLAN v1").is_some()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    let id = list["tasks"][0]["id"].as_str().unwrap().to_string();
    c.wait_for_status(&id, &["awaiting_approval"], LIMIT)
        .await
        .unwrap();
    // The approver sees the step's title and instructions, as written.
    let m = fake
        .wait_for("the plan on the progress comment", LIMIT, |m| {
            bot_comment(m, "The plan to approve").is_some_and(|c| c.body.contains("NOTE.md"))
        })
        .await
        .unwrap();
    let progress = bot_comment(&m, "The plan to approve").unwrap().body;
    assert!(
        progress.contains("```text\nNote for @acme/admins\n\nWrite NOTE.md with one line.\n```"),
        "{progress}"
    );

    // No feedback: said so, nothing changes.
    let reject = |body: serde_json::Value| {
        c.http
            .post(c.url(&format!("/api/v1/tasks/{id}/reject")))
            .bearer_auth(ao_tests::TOKEN)
            .json(&body)
            .send()
    };
    let r = reject(serde_json::json!({ "feedback": "  " }))
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        fake.comment(repo, issue, "/agent reject", "alice").await,
        202
    );
    fake.wait_for("the answer to an empty rejection", LIMIT, |m| {
        bot_comment(m, "Say what to change in the plan").is_some()
    })
    .await
    .unwrap();

    // Rejected on the issue: a new plan from the feedback and the rejected plan.
    assert_eq!(
        fake.comment(
            repo,
            issue,
            "Not like this.\n/agent reject Use TWO notes,\none per file.",
            "alice"
        )
        .await,
        202
    );
    fake.wait_for("the second plan", LIMIT, |m| {
        bot_comment(m, "PLAN v2").is_some()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
    let t = c
        .wait_for_status(&id, &["awaiting_approval"], LIMIT)
        .await
        .unwrap();
    assert_eq!(t["planning"]["rejections"], 1, "{t:#}");
    let steps: Vec<&str> = t["subtasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["step"]["id"].as_str())
        .collect();
    assert_eq!(
        steps,
        ["one", "two"],
        "the rejected plan's steps are gone: {t:#}"
    );

    // Rejected through the API: a third plan, which waits too.
    let r = reject(serde_json::json!({ "feedback": "Name them in capitals." }))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after: serde_json::Value = r.json().await.unwrap();
    assert_eq!(after["status"], "queued", "{after:#}");
    fake.wait_for("the third plan", LIMIT, |m| {
        bot_comment(m, "PLAN v3").is_some()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
    let t = c
        .wait_for_status(&id, &["awaiting_approval"], LIMIT)
        .await
        .unwrap();
    assert_eq!(t["planning"]["rejections"], 2, "{t:#}");
    fake.wait_for("the third plan on the progress comment", LIMIT, |m| {
        bot_comment(m, "The plan to approve").is_some_and(|c| {
            c.body.contains("Write TWO.md in capitals.") && !c.body.contains("NOTE.md")
        })
    })
    .await
    .unwrap();

    // Approved: the approved plan is what runs.
    assert_eq!(
        fake.comment(repo, issue, "/agent approve", "alice").await,
        202
    );
    let t = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(t["status"], "succeeded", "{t:#}\n{}", c.logs());
    let summaries: Vec<&str> = t["subtasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["outcome"]["summary"].as_str())
        .collect();
    for wrote in ["wrote ONE.md", "wrote TWO.md"] {
        assert!(summaries.iter().any(|s| s.contains(wrote)), "{t:#}");
    }
    assert!(!summaries.iter().any(|s| s.contains("NOTE.md")), "{t:#}");

    // Nothing waits for approval now: refused, in both places.
    let r = reject(serde_json::json!({ "feedback": "again" }))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(err["code"], "conflict", "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("not waiting for approval"),
        "{err}"
    );
    assert_eq!(
        fake.comment(repo, issue, "/agent reject again", "alice")
            .await,
        202
    );
    fake.wait_for("the refusal", LIMIT, |m| {
        bot_comment(m, "Cannot do that: the task is succeeded").is_some()
    })
    .await
    .unwrap();
}
