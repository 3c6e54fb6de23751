//! Missed webhooks: an issue is labelled while the coordinator is down, so GitHub's
//! delivery fails (the fake records it as failed, as GitHub does). When the coordinator
//! starts, it finds the failed delivery, asks for it again, and the task runs — once.

use ao_tests::fake_github::{FakeGithub, BOT_LOGIN};
use ao_tests::script;
use std::time::Duration;

const REPO: &str = "acme/widgets";
const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_missed_while_down_runs_once_after_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "admin");
    let mut c = fake.cluster(Some("code"), &[]);

    // Down: the delivery fails.
    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 0);
    let m = fake.model();
    assert_eq!(m.deliveries.len(), 1);
    assert_eq!(m.deliveries[0].status_code, 0);

    let agent = script(
        c.dir.path(),
        "agent.sh",
        "echo note > NOTE.md\necho wrote NOTE.md",
    );
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    let m = fake
        .wait_for("the task to finish on GitHub", LIMIT, |m| {
            m.issue(REPO, issue)
                .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    // GitHub was asked to redeliver, and the redelivery got through.
    let redelivered: Vec<_> = m.deliveries.iter().filter(|d| d.redelivery).collect();
    assert_eq!(redelivered.len(), 1, "{:#?}", m.deliveries);
    assert_eq!(redelivered[0].guid, m.deliveries[0].guid);
    assert_eq!(redelivered[0].status_code, 202);

    // Exactly once: one task, one pull request, one progress comment.
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1, "{list:#}");
    assert_eq!(list["tasks"][0]["status"], "succeeded");
    assert_eq!(m.pulls(REPO).len(), 1);
    let ours = m
        .comments_on(REPO, issue)
        .into_iter()
        .filter(|c| c.user == BOT_LOGIN)
        .count();
    assert_eq!(ours, 1);
}
