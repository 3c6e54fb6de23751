//! CI as a check on the agent's pull request, through the fake GitHub's check runs and
//! commit statuses: a failing check run (or status) on the pull request's head starts a
//! fix round (a coder run given the check's name and output), and the pull request is
//! marked ready only once the required check passes on its head.

// Test helpers may panic: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use ao_tests::fake_github::{FakeGithub, Pull, BOT_LOGIN};
use ao_tests::{script, Cluster};
use serde_json::Value;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const REPO: &str = "acme/widgets";

const AGENT: &str = r#"
if [[ "$AO_PROMPT" == *"Failing check: unit"* || "$AO_PROMPT" == *"ci/legacy"* ]]; then
  echo "two" >> note.txt
  echo "fixed the unit check"
else
  echo "one" > note.txt
  echo "wrote note.txt"
fi
"#;

/// A labelled issue whose first run is done, with the cluster that ran it.
struct FirstRun {
    _tmp: tempfile::TempDir,
    fake: FakeGithub,
    c: Cluster,
    issue: u64,
    /// The agent's pull request, still a draft.
    pr: Pull,
}

/// Labels an issue of [`REPO`] on a cluster with `settings` (the required checks) and
/// waits for its first run to be done. The task is done (the label says the reporter's
/// pass ran), but no required check has reported: the pull request must still be a draft.
async fn first_run(settings: &[(&str, &str)]) -> FirstRun {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    fake.add_installation(7, "acme");
    fake.grant(7, "checks", Some("read"));
    fake.grant(7, "statuses", Some("read"));
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), settings);
    let agent = script(c.dir.path(), "agent.sh", AGENT);
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
    assert!(pr.draft, "ready before any check reported: {pr:?}");
    FirstRun {
        _tmp: tmp,
        fake,
        c,
        issue,
        pr,
    }
}

/// The task of the first fix round, once the coordinator has made it.
async fn first_round(c: &Cluster) -> Value {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
        let found = list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["ci_round"] == 1)
            .cloned();
        if let Some(t) = found {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no fix round: {list:#}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_check_starts_a_fix_round_and_the_pull_request_waits_for_it() {
    let FirstRun {
        _tmp,
        fake,
        c,
        issue,
        pr,
    } = first_run(&[
        ("AO__GITHUB__REQUIRED_CHECKS", "unit"),
        ("AO__PIPELINE__MAX_FIX_ROUNDS", "2"),
    ])
    .await;

    // CI fails on the head: a fix round, given the check's name and output.
    assert_eq!(
        fake.check_run(
            REPO,
            &pr.head,
            "unit",
            Some("failure"),
            "FAIL test_note: expected two lines"
        )
        .await,
        202
    );
    let round = first_round(&c).await;
    let prompt = round["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("Failing check: unit")
            && prompt.contains("FAIL test_note: expected two lines"),
        "{prompt}"
    );
    let id = round["id"].as_str().unwrap().to_string();
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    assert_eq!(done["branch"], pr.head);
    // The round's pass of the reporter ran (its progress comment names it); the new
    // head has no passing check yet, so the pull request is still a draft.
    let m = fake
        .wait_for("the round on the progress comment", LIMIT, |m| {
            m.comments_on(REPO, issue).iter().any(|c| {
                c.user == BOT_LOGIN
                    && c.body.contains("ci-round-1")
                    && c.body.contains("- Round 1: `unit` failed → ✅ done")
            })
        })
        .await
        .unwrap();
    assert!(m.pulls(REPO)[0].draft, "{:?}", m.pulls(REPO));
    assert_eq!(m.pulls(REPO).len(), 1, "the same pull request");

    // CI passes on the fixed head: ready.
    assert_eq!(
        fake.check_run(REPO, &pr.head, "unit", Some("success"), "all tests pass")
            .await,
        202
    );
    fake.wait_for("the pull request ready", LIMIT, |m| {
        m.pulls(REPO).iter().any(|p| !p.draft)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
    // One round ran: the first failure only.
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    let rounds = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["ci_round"].is_number())
        .count();
    assert_eq!(rounds, 1, "{list:#}");
}

/// A check whose webhook never came is found by the sweep (`github.reconcile_secs`): a
/// failing one starts the fix round, a passing one makes the pull request ready.
#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_finds_checks_whose_webhook_was_missed() {
    let FirstRun {
        _tmp, fake, c, pr, ..
    } = first_run(&[
        ("AO__GITHUB__REQUIRED_CHECKS", "unit"),
        ("AO__GITHUB__RECONCILE_SECS", "1"),
    ])
    .await;
    fake.check_run_undelivered(REPO, &pr.head, "unit", Some("failure"), "FAIL test_note");
    let round = first_round(&c).await;
    let id = round["id"].as_str().unwrap().to_string();
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    fake.check_run_undelivered(REPO, &pr.head, "unit", Some("success"), "all pass");
    fake.wait_for("the pull request ready", LIMIT, |m| {
        m.pulls(REPO).iter().any(|p| !p.draft)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
}

/// The same with GitHub's older commit statuses (a CI that reports `status`, not check
/// runs): a failing required status starts a fix round given its context and
/// description; the pull request is marked ready once the status passes on the fixed head.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_commit_status_starts_a_fix_round_and_its_success_makes_the_pull_request_ready() {
    let FirstRun {
        _tmp,
        fake,
        c,
        issue,
        pr,
    } = first_run(&[
        ("AO__GITHUB__REQUIRED_CHECKS", "ci/legacy"),
        ("AO__PIPELINE__MAX_FIX_ROUNDS", "2"),
    ])
    .await;

    assert_eq!(
        fake.commit_status(REPO, &pr.head, "ci/legacy", "failure", "2 of 40 tests fail")
            .await,
        202
    );
    let round = first_round(&c).await;
    let prompt = round["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("ci/legacy") && prompt.contains("2 of 40 tests fail"),
        "{prompt}"
    );
    let id = round["id"].as_str().unwrap().to_string();
    let done = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let m = fake
        .wait_for("the round on the progress comment", LIMIT, |m| {
            m.comments_on(REPO, issue).iter().any(|c| {
                c.user == BOT_LOGIN && c.body.contains("- Round 1: `ci/legacy` failed → ✅ done")
            })
        })
        .await
        .unwrap();
    assert!(m.pulls(REPO)[0].draft, "{:?}", m.pulls(REPO));

    assert_eq!(
        fake.commit_status(REPO, &pr.head, "ci/legacy", "success", "40 tests pass")
            .await,
        202
    );
    fake.wait_for("the pull request ready", LIMIT, |m| {
        m.pulls(REPO).iter().any(|p| !p.draft)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
}
