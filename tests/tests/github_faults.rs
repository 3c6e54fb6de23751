//! Reporting survives GitHub's bad days: 502s, the primary rate limit (403 with
//! `x-ratelimit-remaining: 0`) and the secondary one (429 with `retry-after`) on the very
//! calls the reporter makes. The report still ends complete and exactly once: one pull
//! request, one progress comment, the final label — and the metrics show what happened.

use ao_tests::fake_github::{Failure, FakeGithub, BOT_LOGIN};
use ao_tests::script;
use std::time::Duration;

const REPO: &str = "acme/widgets";
const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn the_report_survives_server_errors_and_rate_limits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[]);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "echo note > NOTE.md\necho wrote NOTE.md",
    );
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    // 502s on creating the comment: a creating call is not repeated blindly (it may
    // have taken effect), so the reporter's own retry, which looks for the comment
    // first, has to finish the job.
    fake.fail(
        "POST /repos/acme/widgets/issues/1/comments",
        3,
        Failure::ServerError,
    );
    fake.fail(
        "POST /repos/acme/widgets/pulls",
        2,
        Failure::TooManyRequests {
            retry_after_secs: 1,
        },
    );
    fake.fail(
        "POST /repos/acme/widgets/issues/1/labels",
        1,
        Failure::RateLimited { reset_in_secs: 1 },
    );
    fake.fail(
        "DELETE /repos/acme/widgets/issues/1/labels/",
        2,
        Failure::ServerError,
    );
    fake.fail("/access_tokens", 1, Failure::ServerError);
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);

    let m = fake
        .wait_for("the complete report", LIMIT, |m| {
            m.pulls(REPO).iter().any(|p| !p.draft)
                && m.issue(REPO, issue)
                    .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
                && m.comments_on(REPO, issue)
                    .iter()
                    .any(|c| c.body.contains("### Agent: ✅ done"))
                && fake.faults_left() == 0
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let failed: Vec<_> = m.calls.iter().filter(|c| c.contains("(failed")).collect();
    assert_eq!(
        fake.faults_left(),
        0,
        "every injected failure was met: {failed:#?}"
    );
    assert_eq!(m.pulls(REPO).len(), 1);
    let ours: Vec<_> = m
        .comments_on(REPO, issue)
        .into_iter()
        .filter(|c| c.user == BOT_LOGIN)
        .collect();
    assert_eq!(ours.len(), 1, "{ours:#?}");
    let labels = &m.issue(REPO, issue).unwrap().labels;
    let status: Vec<_> = labels.iter().filter(|l| l.starts_with("agent:")).collect();
    assert_eq!(status, vec!["agent:done"]);

    let metrics = c.metrics().await.unwrap();
    for needle in [
        "result=\"server_error\"",
        "result=\"rate_limited\"",
        "result=\"ok\",route=\"/repos/{o}/{r}/issues/{n}/comments\",status=\"201\"",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("ao_github_api_calls_total") && l.contains(needle)),
            "{needle} missing:\n{metrics}"
        );
    }
    let remaining: f64 = metrics
        .lines()
        .find(|l| l.starts_with("ao_github_rate_limit_remaining "))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("rate-limit gauge");
    assert!(remaining < 5000.0 && remaining > 4000.0, "{remaining}");
}

/// An agent's change to `.github/workflows/` is refused by GitHub for want of the
/// `workflows` permission (the fake refuses it in GitHub's words): the attempt is not
/// retried (it would fail the same way), the task fails, and the issue is told why once.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_refused_for_workflows_is_explained_and_not_retried() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[]);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "mkdir -p .github/workflows\necho 'on: push' > .github/workflows/ci.yml\necho added CI",
    );
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    let issue = fake.open_issue(REPO, "Add CI", "Please add a workflow.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the failure explained", LIMIT, |m| {
            m.issue(REPO, issue)
                .is_some_and(|i| i.labels.iter().any(|l| l == "agent:failed"))
                && m.comments_on(REPO, issue)
                    .iter()
                    .any(|c| c.body.contains("**workflows** permission"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let notices: Vec<_> = m
        .comments_on(REPO, issue)
        .into_iter()
        .filter(|c| c.body.contains("**workflows** permission"))
        .collect();
    assert_eq!(notices.len(), 1);
    // It says what is missing: the installation's grant, not the token's choice.
    assert!(
        notices[0]
            .body
            .contains("installation on this repository lacks"),
        "{}",
        notices[0].body
    );
    // The token asked for no more than the installation grants (GitHub would refuse it).
    assert!(m
        .token_requests
        .iter()
        .all(|t| t.body["permissions"].get("workflows").is_none()));
    assert!(m.pulls(REPO).is_empty(), "nothing was pushed to open one");
    let tasks: serde_json::Value = c
        .http
        .get(c.url("/api/v1/tasks"))
        .bearer_auth(ao_tests::TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let subtask = &tasks["tasks"][0]["subtasks"][0];
    assert_eq!(subtask["attempt"], 1, "not retried: {tasks:#}");
    assert_eq!(
        subtask["outcome"]["cause"], "workflows_permission",
        "{tasks:#}"
    );
}

/// When the installation grants Workflows, a coder's token carries `workflows: write`,
/// so its change under `.github/workflows/` pushes and becomes a pull request.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_to_workflows_pushes_when_the_installation_grants_workflows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.grant(7, "workflows", Some("write"));
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[]);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "mkdir -p .github/workflows\necho 'on: push' > .github/workflows/ci.yml\necho added CI",
    );
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    let issue = fake.open_issue(REPO, "Add CI", "Please add a workflow.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the pull request", LIMIT, |m| {
            m.issue(REPO, issue).is_some_and(|i| {
                i.labels
                    .iter()
                    .any(|l| l == "agent:done" || l == "agent:failed")
            })
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    assert!(m.git_refusals.is_empty(), "{:?}", m.git_refusals);
    let pulls = m.pulls(REPO);
    assert_eq!(pulls.len(), 1, "{}", c.logs());
    let ci = ao_tests::git(
        &fake.repo_path(REPO),
        &[
            "show",
            &format!("{}:.github/workflows/ci.yml", pulls[0].head),
        ],
    );
    assert_eq!(ci, "on: push");
    assert!(m
        .token_requests
        .iter()
        .any(|t| t.body["permissions"]["workflows"] == "write"));
    assert!(!m
        .comments_on(REPO, issue)
        .iter()
        .any(|c| c.body.contains("**workflows** permission")));
}
