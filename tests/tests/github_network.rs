//! What the sandbox's network proxy refused reaches the people reading the work: a
//! GitHub task whose agent (under `bwrap`, allow-list network) asks for a host off the
//! list gets the refused destination listed in the progress comment and in the pull
//! request's body.

use ao_tests::fake_github::FakeGithub;
use ao_tests::script;
use std::time::Duration;

const REPO: &str = "acme/widgets";
const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn refused_hosts_are_shown_in_the_comment_and_the_pull_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = fake.cluster(Some("code"), &[("AO__SANDBOX__DRIVER", "bwrap")]);
    let agent = script(
        c.dir.path(),
        "agent.sh",
        "curl -s -m 10 https://registry.blocked.invalid/ >/dev/null 2>&1 || true\n\
         echo note > NOTE.md\necho wrote NOTE.md",
    );
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    let issue = fake.open_issue(REPO, "Add a note", "Please.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let shown = "`registry.blocked.invalid:443`";
    let m = fake
        .wait_for("the refused host shown", LIMIT, |m| {
            m.issue(REPO, issue)
                .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
                && m.comments_on(REPO, issue)
                    .iter()
                    .any(|c| c.body.contains("### Agent: ✅ done"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let progress = m
        .comments_on(REPO, issue)
        .into_iter()
        .find(|c| c.body.contains("### Agent:"))
        .expect("progress comment");
    assert!(
        progress.body.contains(shown),
        "{}\n{}",
        progress.body,
        c.logs()
    );
    let pulls = m.pulls(REPO);
    assert_eq!(pulls.len(), 1);
    assert!(pulls[0].body.contains(shown), "{}", pulls[0].body);
}
