//! Concurrency caps of GitHub work: with one active task allowed per repository, a second
//! labelled issue waits (labelled `agent:queued`, told why once, no task yet) and starts by
//! itself when the first ends.

use ao_tests::fake_github::{FakeGithub, BOT_LOGIN};
use ao_tests::script;
use std::time::Duration;

const REPO: &str = "acme/widgets";
const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn a_task_over_the_repository_cap_waits_its_turn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let gate = tmp.path().join("gate");
    let mut c = fake.cluster(Some("code"), &[("AO__GITHUB__MAX_ACTIVE_PER_REPO", "1")]);
    // The agent holds its slot until the test opens the gate.
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!(
            "while [[ ! -e {} ]]; do sleep 0.1; done\necho \"$AO_TASK_ID\" > TASK.txt\necho done",
            gate.display()
        ),
    );
    c.start_in_process().await.unwrap();
    c.start_worker(&[
        ("AO__AGENT__COMMAND", agent.to_str().unwrap()),
        ("AO__WORKER__CONCURRENCY", "2"),
    ]);

    let first = fake.open_issue(REPO, "First", "", "alice");
    let second = fake.open_issue(REPO, "Second", "", "alice");
    assert_eq!(fake.label_issue(REPO, first, "agent", "alice").await, 202);
    fake.wait_for("the first task to run", LIMIT, |m| {
        m.issue(REPO, first)
            .is_some_and(|i| i.labels.iter().any(|l| l == "agent:running"))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
    assert_eq!(fake.label_issue(REPO, second, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the second issue to be told it waits", LIMIT, |m| {
            m.comments_on(REPO, second)
                .iter()
                .any(|c| c.user == BOT_LOGIN && c.body.starts_with("Queued:"))
        })
        .await
        .unwrap();
    let labels = &m.issue(REPO, second).unwrap().labels;
    assert!(labels.iter().any(|l| l == "agent:queued"), "{labels:?}");
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1, "{list:#}");

    // The first ends; the second starts by itself and ends too.
    std::fs::write(&gate, "open").unwrap();
    fake.wait_for("both issues done", LIMIT, |m| {
        [first, second].iter().all(|n| {
            m.issue(REPO, *n)
                .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
        })
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2, "{list:#}");
    assert_eq!(fake.model().pulls(REPO).len(), 2);
    // Told once.
    let queued = fake
        .model()
        .comments_on(REPO, second)
        .iter()
        .filter(|c| c.body.starts_with("Queued:"))
        .count();
    assert_eq!(queued, 1);
}
