//! The GitHub flow with the real Claude Code CLI as the agent, in the bubblewrap sandbox,
//! against the scripted Messages API: a labelled issue becomes a pull request whose branch
//! holds Claude's edit, pushed over smart HTTP with the scoped token from the sandbox's
//! environment. The run's cost is booked against the installation's monthly budget: the
//! 100 % notice goes to the issue, and the next labelled issue is refused.

use ao_tests::fake_github::{FakeGithub, BOT_LOGIN, WEBHOOK_SECRET};
use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::{git, Cluster};
use serde_json::json;
use std::time::Duration;

const REPO: &str = "acme/widgets";
const LIMIT: Duration = Duration::from_secs(180);
const MODEL_KEY: &str = "sk-ant-test-0123456789abcdef";

#[tokio::test(flavor = "multi_thread")]
async fn claude_code_answers_a_labelled_issue_within_budget() {
    let model = ModelServer::start(vec![
        Turn::new(
            Step::tool(
                "Write",
                json!({ "file_path": "NOTE.md", "content": "a note from claude\n" }),
            ),
            1000,
            200,
        ),
        Turn::new(Step::text("Done: wrote NOTE.md."), 1000, 200),
    ])
    .await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = FakeGithub::start(tmp.path(), 4242).await.expect("fake");
    fake.add_installation(7, "acme");
    // The repository narrows the coder's profile: a cheaper model, one more instruction.
    fake.add_repo(
        7,
        REPO,
        &[(
            ".agent-orchestrator.toml",
            "[profiles.coder]\nmodel = \"claude-haiku-4-5\"\n\
             append_system_prompt = \"Keep notes short.\"\nmax_cost_usd = 50.0\n",
        )],
    );
    fake.set_role(REPO, "alice", "write");
    let mut env = fake.settings();
    for (k, v) in [
        ("AO__GITHUB__DEFAULT_PIPELINE", "code"),
        ("AO__GITHUB__RECONCILE_SECS", "0"),
        // Two turns of 1,000 input and 200 output tokens at Haiku's $1/$5 cost $0.004.
        ("AO__GITHUB__MONTHLY_BUDGET_USD", "0.003"),
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
        ("AO_TEST_MODEL_KEY", MODEL_KEY),
    ] {
        env.push((k.into(), v.into()));
    }
    env.push((
        "AO__AGENT__COMMAND".into(),
        claude_cli().display().to_string(),
    ));
    env.push(("ANTHROPIC_BASE_URL".into(), model.url.clone()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    fake.set_webhook(&c.url("/webhooks/github"), WEBHOOK_SECRET);
    c.start_coordinator().await.unwrap();
    c.start_worker(&[]);

    let issue = fake.open_issue(REPO, "Add a note", "A NOTE.md, please.", "alice");
    assert_eq!(fake.label_issue(REPO, issue, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the ready pull request", LIMIT, |m| {
            m.pulls(REPO).iter().any(|p| !p.draft)
                && m.issue(REPO, issue)
                    .is_some_and(|i| i.labels.iter().any(|l| l == "agent:done"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.logs()))
        .unwrap();
    let pr = &m.pulls(REPO)[0];
    let note = git(
        &fake.repo_path(REPO),
        &["show", &format!("{}:NOTE.md", pr.head)],
    );
    assert_eq!(note, "a note from claude");
    // The model saw the issue, under the repository's narrowing of the profile.
    let first = &model.agent_requests()[0];
    assert!(first.body.to_string().contains("A NOTE.md, please."));
    assert_eq!(first.body["model"], "claude-haiku-4-5");
    let system = first.body["system"].to_string();
    assert!(system.contains("You are the coder step"), "{system}");
    assert!(system.contains("Keep notes short."), "{system}");

    // The budget: $0.004 of $0.003 used, announced once on the issue.
    let m = fake
        .wait_for("the budget notice", LIMIT, |m| {
            m.comments_on(REPO, issue)
                .iter()
                .any(|c| c.body.contains("whole monthly budget"))
        })
        .await
        .unwrap();
    let notices = m
        .comments_on(REPO, issue)
        .into_iter()
        .filter(|c| c.user == BOT_LOGIN && c.body.contains("monthly budget"))
        .count();
    assert_eq!(notices, 1, "only the highest share crossed is announced");
    let metrics = c.metrics().await.unwrap();
    let ratio: f64 = metrics
        .lines()
        .find(|l| l.starts_with("ao_budget_used_ratio{installation=\"7\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no budget ratio for installation 7:\n{metrics}"));
    assert!((ratio - 4.0 / 3.0).abs() < 1e-6, "{ratio}");

    // Over budget: the next labelled issue is refused with a comment, and no task starts.
    let next = fake.open_issue(REPO, "Another", "", "alice");
    assert_eq!(fake.label_issue(REPO, next, "agent", "alice").await, 202);
    let m = fake
        .wait_for("the refusal", LIMIT, |m| {
            !m.comments_on(REPO, next).is_empty()
        })
        .await
        .unwrap();
    let said = &m.comments_on(REPO, next)[0].body;
    assert!(said.contains("monthly budget"), "{said}");
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
}
