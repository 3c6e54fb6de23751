//! Attacks on the GitHub reporter's once-only posts and its reading of GitHub's answers, in
//! process against the fake GitHub and real git: comment lists holding users GitHub's
//! description allows but that are not whole (a deleted account's `null`, no
//! `gravatar_id`), and other users' comments quoting the App's hidden progress marker.

// Test helpers may panic: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use ao_tests::fake_github::{user_json, Failure, FakeGithub, BOT_LOGIN};
use ao_tests::script;
use serde_json::Value;
use std::time::Duration;

const REPO: &str = "acme/widgets";
const LIMIT: Duration = Duration::from_secs(20);

/// The coder writes a file.
const AGENT: &str = r#"
echo "note $RANDOM" > NOTE.md
echo "wrote NOTE.md"
"#;

async fn fake(tmp: &tempfile::TempDir) -> FakeGithub {
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
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

/// A whole `simple-user` of GitHub's description for `login`, with `gravatar_id` null
/// (the description marks it nullable).
fn user_without_gravatar(login: &str) -> Value {
    let mut user = user_json(login);
    user["gravatar_id"] = Value::Null;
    user
}

/// Labels an issue that already has a comment by `login` (listed with `shape` as its user)
/// and waits for the App's progress comment and queued label.
async fn progress_despite_commenter(login: &str, shape: Value) {
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake(&tmp).await;
    // No worker: the task stays queued; only the reporter touches the issue.
    let mut c = fake.cluster(Some("code"), &[]);
    c.start_in_process().await.unwrap();
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    fake.comment(REPO, issue, "Same here, thanks!", login).await;
    fake.set_user_shape(login, shape);
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the progress comment and the queued label", LIMIT, |m| {
            ours(m, issue).iter().any(|c| c.body.contains("queued"))
                && m.issue(REPO, issue)
                    .is_some_and(|i| i.labels.iter().any(|l| l == "agent:queued"))
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{}\n{}",
                e.to_string().lines().next().unwrap_or(""),
                c.logs()
            )
        })
        .unwrap();
    assert_eq!(ours(&m, issue).len(), 1, "one progress comment");
    let v = fake.violations();
    assert!(
        v.is_empty(),
        "the fake's answers fit GitHub's description: {v:#?}"
    );
}

/// A comment by a deleted account is listed with `user: null` (`nullable-simple-user` in
/// GitHub's description of `issue-comment`). The reporter reads the issue's comments
/// before making the progress comment; that list must not stop it.
#[tokio::test(flavor = "multi_thread")]
async fn a_comment_by_a_deleted_account_does_not_stop_the_progress_comment() {
    progress_despite_commenter("ghost", Value::Null).await;
}

/// A commenter whose `gravatar_id` is null (nullable in `simple-user`).
#[tokio::test(flavor = "multi_thread")]
async fn a_commenter_without_a_gravatar_id_does_not_stop_the_progress_comment() {
    progress_despite_commenter("bob", user_without_gravatar("bob")).await;
}

/// A person and another App's bot quote the App's progress comment, hidden marker and
/// all; then the App's comment is deleted and the answer to its re-creation is lost, so
/// the reporter looks for it by marker. Neither quote may be taken for the App's: the
/// App's own comment must end showing the task done.
#[tokio::test(flavor = "multi_thread")]
async fn quotes_of_the_progress_marker_are_never_taken_for_the_apps_comment() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake(&tmp).await;
    let mut c = fake.cluster(Some("code"), &[]);
    let agent = script(c.dir.path(), "agent.sh", AGENT);
    c.start_in_process().await.unwrap();
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the queued progress comment", LIMIT, |m| {
            ours(m, issue).iter().any(|c| c.body.contains("queued"))
        })
        .await
        .unwrap();
    let first = ours(&m, issue).remove(0);
    let quote = format!("> {}\n\nWhy is this queued?", first.body);
    fake.comment(REPO, issue, &quote, "mallory").await;
    fake.comment(REPO, issue, &quote, "triage-helper[bot]")
        .await;
    fake.delete_comment(first.id);
    fake.fail_with_body(
        &format!("POST /repos/{REPO}/issues/{issue}/comments"),
        "agent-orchestrator:progress",
        1,
        Failure::LostAnswer,
    );
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let m = fake
        .wait_for("the App's progress comment showing done", LIMIT, |m| {
            m.issue(REPO, issue)
                .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
                && ours(m, issue).iter().any(|c| c.body.contains("✅ done"))
        })
        .await
        .map_err(|e| {
            let m = fake.model();
            anyhow::anyhow!(
                "{}\ncomments: {:#?}\ncalls: {:#?}",
                e.to_string().lines().next().unwrap_or(""),
                m.comments_on(REPO, issue),
                m.calls
                    .iter()
                    .filter(|c| c.contains("comments"))
                    .collect::<Vec<_>>()
            )
        })
        .unwrap();
    assert_eq!(fake.faults_left(), 0, "the re-creation's answer was lost");
    let progress: Vec<_> = ours(&m, issue)
        .into_iter()
        .filter(|c| c.body.contains("agent-orchestrator:progress"))
        .collect();
    assert_eq!(progress.len(), 1, "one progress comment: {progress:#?}");
    for other in m
        .comments_on(REPO, issue)
        .iter()
        .filter(|c| c.user != BOT_LOGIN)
    {
        assert_eq!(other.body, quote, "{}'s comment untouched", other.user);
    }
}

/// The reviewer takes its time, so that a person reviews the draft first.
const REVIEWING_AGENT: &str = r#"
case "$AO_CAPABILITY" in
reviewer)
  sleep 4
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

/// A person (listed without a `gravatar_id`) reviews the agent's draft pull request; then
/// the answer to the reviewer's review is lost, so the reporter reads the pull request's
/// reviews before posting it again. The person's review must not stop the task's report.
#[tokio::test(flavor = "multi_thread")]
async fn a_reviewer_without_a_gravatar_id_does_not_stop_the_review_lookup() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake(&tmp).await;
    let mut c = fake.cluster(Some("code-review"), &[]);
    let agent = script(c.dir.path(), "agent.sh", REVIEWING_AGENT);
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
    let m = fake
        .wait_for("the draft pull request", LIMIT, |m| {
            !m.pulls(REPO).is_empty()
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{}\n{}",
                e.to_string().lines().next().unwrap_or(""),
                c.logs()
            )
        })
        .unwrap();
    let pull = m.pulls(REPO)[0].number;
    fake.set_user_shape("carol", user_without_gravatar("carol"));
    fake.review(REPO, pull, "commented", "Looking at it too.", "carol")
        .await;
    let m = fake
        .wait_for("the ready pull request and the done label", LIMIT, |m| {
            m.pulls(REPO).iter().any(|p| !p.draft)
                && m.issue(REPO, issue)
                    .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{}\n{}",
                e.to_string().lines().next().unwrap_or(""),
                c.logs()
            )
        })
        .unwrap();
    assert_eq!(fake.faults_left(), 0, "the review's answer was lost");
    let reviews = m
        .reviews
        .iter()
        .filter(|r| r.repo == REPO && r.body.contains("REVIEWED"))
        .count();
    assert_eq!(reviews, 1, "the review once");
}
