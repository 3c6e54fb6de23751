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
