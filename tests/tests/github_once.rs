//! GitHub posts that must appear once (the progress comment, the plan, the review), in
//! process against the fake GitHub and real git: when two coordinator replicas report the
//! same task at once, and when GitHub made a post but its answer was lost.

use ao_tests::fake_github::{Failure, FakeGithub, BOT_LOGIN};
use ao_tests::inproc::InProcess;
use ao_tests::script;
use std::time::Duration;

const REPO: &str = "acme/widgets";
const LIMIT: Duration = Duration::from_secs(90);

/// The planner writes a one-step plan; the coder a file; the reviewer approves.
const AGENT: &str = r#"
case "$AO_CAPABILITY" in
planner)
  echo 'The plan:'
  echo '```json'
  echo '{"version": 1, "summary": "PLAN: add NOTE.md with one line.", "steps": [{"id": "note", "capability": "coder", "title": "Add NOTE.md", "instructions": "Write NOTE.md with one line."}]}'
  echo '```'
  ;;
reviewer)
  echo 'REVIEWED: looks right.'
  echo '```json'
  echo '{"verdict": "approve"}'
  echo '```'
  ;;
*)
  echo "note $RANDOM" > NOTE.md
  echo "wrote NOTE.md"
  ;;
esac
"#;

async fn fake(tmp: &tempfile::TempDir, files: &[(&str, &str)]) -> FakeGithub {
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, files);
    fake.set_role(REPO, "alice", "write");
    fake
}

/// The App's comments on an issue, oldest first.
fn ours(m: &ao_tests::fake_github::Model, n: u64) -> Vec<ao_tests::fake_github::Comment> {
    m.comments_on(REPO, n)
        .into_iter()
        .filter(|c| c.user == BOT_LOGIN)
        .collect()
}

/// Two replicas on one store: the first is making the progress comment (GitHub is slow to
/// answer) when the second, starting, passes over the same queued task. Before, both made
/// one: two progress comments on the issue.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_reporting_one_task_make_one_progress_comment() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake(&tmp, &[]).await;
    // No worker: the task stays queued, and nothing but the reporters touches the issue.
    let mut c = fake.cluster(Some("code"), &[]);
    c.start_in_process().await.unwrap();
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    fake.fail(
        &format!("POST /repos/{REPO}/issues/{issue}/comments"),
        1,
        Failure::Slow { ms: 4000 },
    );
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    fake.wait_for("the first replica's comment under way", LIMIT, |m| {
        m.calls.iter().any(|c| c.ends_with("(slow, begun)"))
    })
    .await
    .unwrap();
    let b = InProcess::start(c.dir.path(), &c.env, "127.0.0.1:0")
        .await
        .unwrap();
    // The second replica either makes a comment of its own or, knowing the first one's,
    // brings it up to date.
    let m = fake
        .wait_for("the second replica's pass", LIMIT, |m| {
            let ours = ours(m, issue);
            ours.len() >= 2 || ours.iter().any(|c| c.edits >= 1)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let bodies: Vec<String> = ours(&m, issue).into_iter().map(|c| c.body).collect();
    assert_eq!(bodies.len(), 1, "one progress comment: {bodies:#?}");
    b.stop().await.unwrap();
}

/// GitHub posts the plan but its answer is lost: the reporter looks for the plan before
/// posting it again. Before, the plan was on the issue twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_whose_answer_was_lost_is_on_the_issue_once() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake(
        &tmp,
        &[(
            ".agent-orchestrator.toml",
            "default_pipeline = \"plan-code\"\nrequire_approval = true\n\
             [pipelines]\nplan-code = [\"planner\", \"coder\"]\n",
        )],
    )
    .await;
    let mut c = fake.cluster(None, &[]);
    let agent = script(c.dir.path(), "agent.sh", AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    fake.fail_with_body(
        &format!("POST /repos/{REPO}/issues/{issue}/comments"),
        "**Plan**",
        1,
        Failure::LostAnswer,
    );
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    // The pass that gets past the plan brings the progress comment to the approval wait.
    let m = fake
        .wait_for("the progress comment waiting for approval", LIMIT, |m| {
            ours(m, issue)
                .iter()
                .any(|c| c.body.contains("waiting for `/agent approve`"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    assert_eq!(fake.faults_left(), 0, "the plan's answer was lost");
    let plans: Vec<String> = ours(&m, issue)
        .into_iter()
        .map(|c| c.body)
        .filter(|b| b.contains("**Plan**"))
        .collect();
    assert_eq!(plans.len(), 1, "the plan once: {plans:#?}");
}

/// GitHub makes the reviewer's review but its answer is lost: the reporter looks for it
/// before posting it again. Before, the pull request had the review twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_review_whose_answer_was_lost_is_on_the_pull_request_once() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake(&tmp, &[]).await;
    let mut c = fake.cluster(Some("code-review"), &[]);
    let agent = script(c.dir.path(), "agent.sh", AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    fake.fail_with_body(
        &format!("POST /repos/{REPO}/pulls/"),
        "REVIEWED: looks right.",
        1,
        Failure::LostAnswer,
    );
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    // The pass that gets past the review marks the pull request ready and the issue done.
    let m = fake
        .wait_for("the ready pull request", LIMIT, |m| {
            m.pulls(REPO).iter().any(|p| !p.draft)
                && m.issue(REPO, issue)
                    .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    assert_eq!(fake.faults_left(), 0, "the review's answer was lost");
    let reviews: Vec<&str> = m
        .reviews
        .iter()
        .filter(|r| r.repo == REPO && r.body.contains("REVIEWED"))
        .map(|r| r.body.as_str())
        .collect();
    assert_eq!(reviews.len(), 1, "the review once: {reviews:#?}");
}
