//! End-to-end through the GitHub App: a signed `issues.labeled` delivery from the fake
//! GitHub reaches the coordinator (run in-process), the real worker clones and pushes
//! over smart HTTP with a scoped installation token, and the coordinator reports back on
//! the fake: a pull request (draft, then ready), one progress comment edited in place,
//! the final labels, the reviewer's review. Then a review requesting changes makes a
//! second coder run on the same branch.

use ao_tests::fake_github::{FakeGithub, BOT_LOGIN};
use ao_tests::{git, script, Cluster};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const REPO: &str = "acme/widgets";

/// Writes a file named after the capability, or, given review instructions, a fix.
const AGENT: &str = r#"
if [[ "$AO_PROMPT" == *"Address this review"* ]]; then
  echo "fixed after review" > REVIEWED.txt
  echo "addressed the review"
elif [[ "$AO_CAPABILITY" == reviewer ]]; then
  echo "Looks fine; consider a test for the note."
else
  echo "$AO_CAPABILITY was here" > "$AO_CAPABILITY.txt"
  echo "wrote $AO_CAPABILITY.txt"
fi
"#;

fn cluster(fake: &FakeGithub, extra: &[(&str, &str)]) -> Cluster {
    let mut env: Vec<(String, String)> = fake.settings();
    env.push(("AO__GITHUB__DEFAULT_PIPELINE".into(), "code-review".into()));
    env.push(("AO__GITHUB__RECONCILE_SECS".into(), "0".into()));
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Cluster::new(&refs)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_labelled_issue_becomes_a_reviewed_pull_request() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    let mut c = cluster(&fake, &[]);
    fake.set_webhook(
        &c.url("/webhooks/github"),
        ao_tests::fake_github::WEBHOOK_SECRET,
    );
    let agent = script(c.dir.path(), "agent.sh", AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    let issue = fake.open_issue(REPO, "Add a note", "Please add a note file.", "alice");
    let labelled = std::time::Instant::now();
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);

    let m = fake
        .wait_for("the pull request is ready and labelled done", LIMIT, |m| {
            let done = m
                .issue(REPO, issue)
                .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"));
            done && m.pulls(REPO).iter().any(|p| !p.draft)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();

    eprintln!(
        "label → ready pull request (coder + reviewer, script agent): {:?}",
        labelled.elapsed()
    );
    // One pull request, from the task branch, linking the issue.
    let pulls = m.pulls(REPO);
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    let pr = &pulls[0];
    assert_eq!(pr.head, format!("agent/{issue}-add-a-note"));
    assert_eq!(pr.base, "main");
    assert!(pr.body.contains(&format!("Closes #{issue}")), "{}", pr.body);
    // The branch holds the coder's commit.
    let bare = fake.repo_path(REPO);
    let file = git(&bare, &["show", &format!("{}:coder.txt", pr.head)]);
    assert_eq!(file, "coder was here");
    assert_eq!(git(&bare, &["log", "--format=%s", "main"]), "initial");

    // Exactly one comment by the App: the progress comment, edited in place.
    let comments = m.comments_on(REPO, issue);
    let ours: Vec<_> = comments.iter().filter(|c| c.user == BOT_LOGIN).collect();
    assert_eq!(ours.len(), 1, "{comments:#?}");
    let progress = ours[0];
    assert!(progress.edits >= 2, "edited in place: {progress:?}");
    assert!(progress.body.contains("done"), "{}", progress.body);
    assert!(
        progress.body.contains("- [x] **coder**"),
        "{}",
        progress.body
    );
    assert!(
        progress.body.contains("- [x] **reviewer**"),
        "{}",
        progress.body
    );
    assert!(progress
        .body
        .contains(&format!("pull request #{}", pr.number)));

    // Final labels: the trigger and exactly one status label.
    let labels = m.issue(REPO, issue).unwrap().labels.clone();
    let status: Vec<_> = labels.iter().filter(|l| l.starts_with("agent:")).collect();
    assert_eq!(status, vec!["agent:done"], "{labels:?}");

    // The reviewer's findings as a review on the pull request.
    let reviews: Vec<_> = m.reviews.iter().filter(|r| r.user == BOT_LOGIN).collect();
    assert_eq!(reviews.len(), 1, "{reviews:?}");
    assert!(
        reviews[0].body.contains("consider a test"),
        "{:?}",
        reviews[0]
    );
    assert_eq!(reviews[0].event, "COMMENT");

    // The worker asked for tokens scoped to the one repository: write for the coder (at
    // its start, and afresh for its push), read for the reviewer (which does not push).
    let scoped: Vec<_> = m
        .token_requests
        .iter()
        .filter(|t| t.body.get("repositories").is_some())
        .collect();
    assert_eq!(scoped.len(), 3, "{scoped:#?}");
    for t in &scoped {
        assert_eq!(t.body["repositories"], serde_json::json!(["widgets"]));
    }
    let contents: Vec<_> = scoped
        .iter()
        .map(|t| {
            t.body["permissions"]["contents"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(contents, vec!["write", "write", "read"]);

    // No token or key in any log.
    let logs = c.logs();
    for t in m.tokens.keys() {
        assert!(!logs.contains(t.as_str()), "a token leaked into the logs");
    }
    assert!(!logs.contains("BEGIN RSA PRIVATE KEY"));

    // A review requesting changes: a second coder run on the same branch.
    let before = git(&bare, &["rev-parse", &pr.head]);
    assert_eq!(
        fake.review(
            REPO,
            pr.number,
            "changes_requested",
            "Please also mention the review.",
            "alice"
        )
        .await,
        202
    );
    let head = pr.head.clone();
    fake.wait_for("the review is addressed on the branch", LIMIT, |_| {
        std::process::Command::new("git")
            .arg("--git-dir")
            .arg(&bare)
            .args(["show", &format!("{head}:REVIEWED.txt")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
    .unwrap();
    let after = git(&bare, &["rev-parse", &pr.head]);
    assert_ne!(before, after);
    let log = git(&bare, &["log", "--format=%s", &pr.head]);
    assert_eq!(log.lines().count(), 3, "{log}");
    // Still one pull request, and still one progress comment, now showing the round.
    let head = pr.head.clone();
    let m = fake
        .wait_for("the progress comment shows the review round", LIMIT, |m| {
            m.comments_on(REPO, issue)
                .iter()
                .any(|c| c.body.contains("review-round-1") && c.body.contains("done"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    assert_eq!(m.pulls(REPO).len(), 1);
    assert_eq!(m.pulls(REPO)[0].head, head);
    let ours: Vec<_> = m
        .comments_on(REPO, issue)
        .into_iter()
        .filter(|c| c.user == BOT_LOGIN)
        .collect();
    assert_eq!(ours.len(), 1, "{ours:#?}");
}

/// An agent that runs longer than the installation token lives.
const SLOW_AGENT: &str = r#"
sleep 8
echo "coder was here" > coder.txt
echo "wrote coder.txt"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_run_longer_than_its_token_pushes_with_a_fresh_one() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[]);
    fake.set_role(REPO, "alice", "write");
    // Tokens live 4 s; the agent runs 8 s.
    fake.set_token_ttl(Duration::from_secs(4));
    let mut c = fake.cluster(Some("code"), &[]);
    let agent = script(c.dir.path(), "agent.sh", SLOW_AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let issue = fake.open_issue(REPO, "Add a note", "Please add a note file.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("a pull request", LIMIT, |m| !m.pulls(REPO).is_empty())
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let pr = m.pulls(REPO)[0].clone();
    assert_eq!(
        git(
            &fake.repo_path(REPO),
            &["show", &format!("{}:coder.txt", pr.head)]
        ),
        "coder was here"
    );
    assert!(m.git_refusals.is_empty(), "{:?}", m.git_refusals);
    let (_, tasks) = c.get_json("/api/v1/tasks").await.unwrap();
    let task = &tasks["tasks"][0];
    assert_eq!(task["subtasks"][0]["attempt"], 1, "{tasks:#}");
}

/// A reviewer that asks for changes on a line of the diff, on a file the diff leaves
/// alone, and on no line at all.
const FINDING_AGENT: &str = r#"
if [[ "$AO_CAPABILITY" == reviewer ]]; then
  echo 'Two things to change.'
  echo '```json'
  echo '{"verdict": "request_changes", "findings": [{"file": "calc.py", "line": 2, "message": "b is added, not subtracted"}, {"file": "README.md", "line": 1, "message": "mention calc.py here"}, {"message": "add a test"}]}'
  echo '```'
else
  printf 'def sub(a, b):\n    return a + b\n\n' > calc.py
  echo "wrote calc.py"
fi
"#;

/// The reviewer's findings become a review whose line comments sit on the diff's lines
/// (`comments[]` with `path`, `line`, `side`, checked by the fake against GitHub's
/// description and the diff, as GitHub does); findings elsewhere are in its body.
#[tokio::test(flavor = "multi_thread")]
async fn the_reviewers_findings_are_line_comments_on_the_diff() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeGithub::start(tmp.path(), 4242).await.unwrap();
    fake.add_installation(7, "acme");
    fake.add_repo(7, REPO, &[("README.md", "The widgets.\n")]);
    fake.set_role(REPO, "alice", "write");
    let mut c = cluster(&fake, &[]);
    fake.set_webhook(
        &c.url("/webhooks/github"),
        ao_tests::fake_github::WEBHOOK_SECRET,
    );
    let agent = script(c.dir.path(), "agent.sh", FINDING_AGENT);
    c.start_in_process().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);

    let issue = fake.open_issue(REPO, "Add sub", "Please add a sub function.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the reviewer's review", LIMIT, |m| {
            m.reviews.iter().any(|r| r.user == BOT_LOGIN)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let reviews: Vec<_> = m.reviews.iter().filter(|r| r.user == BOT_LOGIN).collect();
    assert_eq!(reviews.len(), 1, "{reviews:#?}");
    let review = reviews[0];
    assert_eq!(review.event, "COMMENT");
    assert_eq!(review.comments.len(), 1, "{review:#?}");
    let on_line = &review.comments[0];
    assert_eq!(
        (on_line.path.as_str(), on_line.line, on_line.side.as_str()),
        ("calc.py", 2, "RIGHT")
    );
    assert!(
        on_line.body.contains("b is added, not subtracted"),
        "{on_line:#?}"
    );
    for elsewhere in ["README.md:1: mention calc.py here", "- add a test"] {
        assert!(
            review.body.contains(elsewhere),
            "{elsewhere:?} not in {}",
            review.body
        );
    }
    // Posted once: GitHub took the line comments as they were.
    let posts = m
        .calls
        .iter()
        .filter(|call| call.starts_with("POST ") && call.contains("/reviews"))
        .count();
    assert_eq!(posts, 1, "{:#?}", m.calls);
}
