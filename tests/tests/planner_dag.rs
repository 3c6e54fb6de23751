//! The plan drives the work, end to end with the real Claude Code CLI in bubblewrap
//! against the scripted model: the planner writes a four-step plan of which two steps
//! are independent; those two run at the same time on two workers, each on its own step
//! branch; an integration merges them into the task branch; the test step starts from
//! the merge with the context it is owed (its part of the plan, the reports of the steps
//! it depends on); its test fails once, a fix round runs and the test passes; the
//! reviewer asks for a change once, a fix round runs and it approves. The task branch
//! holds every step's commit. A second test: two parallel steps that conflict, resolved
//! by the integration's coder, which sees both sides.

use ao_tests::model_server::{claude_cli, ModelServer, Step, Turn, MODEL};
use ao_tests::{bare_repo, git, Cluster};
use serde_json::{json, Value};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);
/// How long each independent step's first model turn takes: long enough that the two
/// runs overlap only if they run at the same time.
const STEP_DELAY: Duration = Duration::from_secs(3);

fn plan_reply() -> String {
    let plan = json!({
        "version": 1,
        "summary": "Two independent files, then a check of both.",
        "steps": [
            {"id": "alpha", "capability": "coder", "title": "Write a.txt",
             "instructions": "Create a.txt holding the word alpha.", "paths": ["a.txt"]},
            {"id": "beta", "capability": "coder", "title": "Write b.txt",
             "instructions": "Create b.txt holding the word beta.", "paths": ["b.txt"]},
            {"id": "check", "capability": "tester", "title": "Check both files",
             "instructions": "Concatenate a.txt and b.txt into both.txt.",
             "depends_on": ["alpha", "beta"], "paths": ["both.txt"]},
            {"id": "review", "capability": "reviewer", "title": "Review the change",
             "instructions": "Review both.txt.", "depends_on": ["check"]}
        ]
    });
    format!("Here is the plan.\n```json\n{plan:#}\n```\n")
}

/// The script of one coder step: a slow write, then its report.
fn writer(file: &str, word: &str) -> Vec<Turn> {
    vec![
        Turn::new(
            Step::Delay(
                STEP_DELAY,
                Box::new(Step::tool(
                    "Write",
                    json!({ "file_path": file, "content": format!("{word}\n") }),
                )),
            ),
            100,
            20,
        ),
        Turn::new(
            Step::text(&format!("Wrote {file} holding {word}.")),
            100,
            20,
        ),
    ]
}

/// A cluster of `workers` workers, each running one subtask at a time, whose agent is
/// Claude Code against `model`.
async fn cluster(model: &ModelServer, workers: usize) -> Cluster {
    let cli = claude_cli().display().to_string();
    let mut c = Cluster::new(&[
        ("AO__SANDBOX__DRIVER", "bwrap"),
        ("AO__AGENT__KIND", "claude"),
        ("AO__AGENT__API_KEY", "env:AO_TEST_MODEL_KEY"),
        ("AO__AGENT__PROFILES__PLANNER__MODEL", MODEL),
        ("AO__AGENT__PROFILES__CODER__MODEL", MODEL),
        ("AO__AGENT__PROFILES__TESTER__MODEL", MODEL),
        ("AO__AGENT__PROFILES__REVIEWER__MODEL", MODEL),
        ("AO__COORDINATOR__MAX_ATTEMPTS", "1"),
        ("AO__WORKER__CONCURRENCY", "1"),
        ("AO__PLANNER__MAX_PARALLEL", "2"),
    ]);
    c.env.push(("AO__AGENT__COMMAND".into(), cli));
    c.env.push((
        "AO_TEST_MODEL_KEY".into(),
        "sk-ant-test-0123456789abcdef".into(),
    ));
    c.env.push(("ANTHROPIC_BASE_URL".into(), model.url.clone()));
    c.start_coordinator().await.expect("coordinator");
    for _ in 0..workers {
        c.start_worker(&[]);
    }
    c
}

/// Submits a planned task on `branch` and waits for its end; it must succeed.
async fn run_planned(c: &Cluster, repo: &std::path::Path, branch: &str) -> Value {
    let (status, task) = c
        .submit(json!({ "repository": repo.display().to_string(),
            "prompt": "Write a.txt and b.txt, then check both.",
            "pipeline": ["planner", "coder", "tester", "reviewer"], "branch": branch }))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().expect("id").to_string();
    let task = c
        .wait_for_status(&id, &["succeeded", "failed"], LIMIT)
        .await
        .expect("the task ends");
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", c.logs());
    task
}

/// A clone of `branch` of `repo` in a new directory.
fn clone_branch(
    c: &Cluster,
    repo: &std::path::Path,
    branch: &str,
    name: &str,
) -> std::path::PathBuf {
    let out = c.dir.path().join(name);
    git(
        c.dir.path(),
        &[
            "clone",
            "-q",
            "--branch",
            branch,
            repo.to_str().expect("a UTF-8 path"),
            out.to_str().expect("a UTF-8 path"),
        ],
    );
    out
}

fn step_of<'a>(task: &'a Value, id: &str) -> &'a Value {
    task["subtasks"]
        .as_array()
        .expect("subtasks")
        .iter()
        .find(|s| s["step"]["kind"] == "plan" && s["step"]["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {task:#}"))
}

fn time(v: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        v.as_str().expect("a timestamp"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_runs_as_a_dag_on_two_workers_and_is_merged() {
    let model = ModelServer::start_routed(
        vec![Turn::new(Step::text(&plan_reply()), 500, 300)],
        vec![
            (
                "Your step of the plan: alpha (coder)".into(),
                writer("a.txt", "alpha"),
            ),
            (
                "Your step of the plan: beta (coder)".into(),
                writer("b.txt", "beta"),
            ),
            (
                "Your step of the plan: check (tester)".into(),
                vec![
                    Turn::new(
                        Step::tool(
                            "Bash",
                            json!({ "command": "cat a.txt b.txt > both.txt",
                                    "description": "combine" }),
                        ),
                        100,
                        20,
                    ),
                    Turn::new(
                        Step::text(&format!(
                            "both.txt holds alpha and beta.\n```json\n{}\n```",
                            json!({"verdict": "failed", "failures": [{"file": "both.txt",
                                "line": 3, "message": "the end marker is missing"}],
                                "output": "FAIL end-marker"})
                        )),
                        100,
                        20,
                    ),
                ],
            ),
            // The fix round: a coder given the findings, then the same check again.
            (
                "Your step of the plan: check-fix1 (coder)".into(),
                vec![
                    Turn::new(
                        Step::tool(
                            "Bash",
                            json!({ "command": "echo end >> both.txt",
                                    "description": "add the marker" }),
                        ),
                        100,
                        20,
                    ),
                    Turn::new(Step::text("Added the end marker."), 100, 20),
                ],
            ),
            (
                "Your step of the plan: review (reviewer)".into(),
                vec![Turn::new(
                    Step::text(&format!(
                        "One change needed.\n```json\n{}\n```",
                        json!({"verdict": "request_changes", "findings": [{"file": "both.txt",
                            "line": 4, "message": "say that it was reviewed"}]})
                    )),
                    100,
                    20,
                )],
            ),
            (
                "Your step of the plan: review-fix2 (coder)".into(),
                vec![
                    Turn::new(
                        Step::tool(
                            "Bash",
                            json!({ "command": "echo reviewed >> both.txt",
                                    "description": "answer the review" }),
                        ),
                        100,
                        20,
                    ),
                    Turn::new(Step::text("Said that it was reviewed."), 100, 20),
                ],
            ),
            (
                "Your step of the plan: review-check2 (reviewer)".into(),
                vec![Turn::new(
                    Step::text("Looks right.\n```json\n{\"verdict\": \"approve\"}\n```"),
                    100,
                    20,
                )],
            ),
            (
                "Your step of the plan: check-check1 (tester)".into(),
                vec![Turn::new(
                    Step::text("All good.\n```json\n{\"verdict\": \"passed\"}\n```"),
                    100,
                    20,
                )],
            ),
        ],
    )
    .await;
    let c = cluster(&model, 2).await;
    let repo = bare_repo(c.dir.path(), "project", &[("README.md", "# project\n")]);

    let task = run_planned(&c, &repo, "agent/dag").await;

    // The DAG on the API: planner, four steps, two merges, and two fix rounds (a fix
    // and the check again): one for the failing test, one for the review's change.
    let subtasks = task["subtasks"].as_array().expect("subtasks");
    assert_eq!(subtasks.len(), 11, "{task:#}");
    assert_eq!(task["planning"]["fix_rounds"], 2, "{task:#}");
    assert_eq!(
        step_of(&task, "review-check2")["outcome"]["structured"]["verdict"],
        "approve"
    );
    let (alpha, beta, check) = (
        step_of(&task, "alpha"),
        step_of(&task, "beta"),
        step_of(&task, "check"),
    );
    let planner = &subtasks[0];
    assert_eq!(alpha["depends_on"], json!([planner["id"]]));
    assert_eq!(beta["depends_on"], json!([planner["id"]]));
    let merge = subtasks
        .iter()
        .find(|s| s["id"] == check["depends_on"][0])
        .expect("the merge before the check");
    assert_eq!(merge["step"]["kind"], "integrate", "{merge:#}");
    assert_eq!(
        merge["step"]["branches"],
        json!(["agent/dag-step-alpha", "agent/dag-step-beta"])
    );
    assert_eq!(merge["depends_on"], json!([alpha["id"], beta["id"]]));

    // The independent steps ran at the same time, on the two workers.
    assert_ne!(alpha["worker"], beta["worker"], "{task:#}");
    let (a0, a1) = (time(&alpha["started_at"]), time(&alpha["finished_at"]));
    let (b0, b1) = (time(&beta["started_at"]), time(&beta["finished_at"]));
    assert!(
        a0 < b1 && b0 < a1,
        "run intervals do not overlap: alpha {a0}..{a1}, beta {b0}..{b1}"
    );

    // The task branch holds every step's work and every step's commit.
    let check_out = clone_branch(&c, &repo, "agent/dag", "check");
    let read = |f: &str| std::fs::read_to_string(check_out.join(f)).unwrap_or_default();
    assert_eq!(read("a.txt"), "alpha\n");
    assert_eq!(read("b.txt"), "beta\n");
    assert_eq!(read("both.txt"), "alpha\nbeta\nend\nreviewed\n");
    let log = git(&check_out, &["log", "--format=%B"]);
    for step in [
        alpha,
        beta,
        check,
        step_of(&task, "check-fix1"),
        step_of(&task, "review-fix2"),
    ] {
        let line = format!("Subtask: {} (attempt 1)", step["id"].as_str().unwrap());
        assert!(log.contains(&line), "{line} not on the branch:\n{log}");
    }

    // Each step's recorded prompt holds the context it was owed.
    let prompt_of = |needle: &str| -> String {
        model
            .agent_requests()
            .into_iter()
            .map(|r| r.body["messages"][0]["content"].to_string())
            .find(|m| m.contains(needle))
            .unwrap_or_else(|| panic!("no conversation for {needle}"))
    };
    let alpha_prompt = prompt_of("Your step of the plan: alpha (coder)");
    assert!(alpha_prompt.contains("Create a.txt holding the word alpha."));
    assert!(alpha_prompt.contains("Two independent files, then a check of both."));
    assert!(
        !alpha_prompt.contains("Create b.txt"),
        "only its own instructions"
    );
    let check_prompt = prompt_of("Your step of the plan: check (tester)");
    for owed in [
        "Concatenate a.txt and b.txt into both.txt.",
        "Wrote a.txt holding alpha.",
        "Wrote b.txt holding beta.",
        "both.txt",
    ] {
        assert!(
            check_prompt.contains(owed),
            "{owed:?} missing from the check's prompt: {check_prompt}"
        );
    }
    // The fix round is given the failing check's findings.
    let fix_prompt = prompt_of("Your step of the plan: check-fix1 (coder)");
    for owed in ["both.txt:3: the end marker is missing", "FAIL end-marker"] {
        assert!(fix_prompt.contains(owed), "{owed:?} missing: {fix_prompt}");
    }
    let review_fix = prompt_of("Your step of the plan: review-fix2 (coder)");
    assert!(
        review_fix.contains("both.txt:4: say that it was reviewed"),
        "{review_fix}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_between_parallel_steps_is_resolved_by_a_coder_that_sees_both_sides() {
    let plan = json!({
        "version": 1,
        "steps": [
            {"id": "alpha", "capability": "coder", "title": "Alpha line",
             "instructions": "Write shared.txt with alpha."},
            {"id": "beta", "capability": "coder", "title": "Beta line",
             "instructions": "Write shared.txt with beta."}
        ]
    });
    let model = ModelServer::start_routed(
        vec![Turn::new(
            Step::text(&format!("```json\n{plan}\n```")),
            500,
            300,
        )],
        vec![
            (
                "## Merge conflict to resolve".into(),
                vec![
                    // Claude Code writes over a file only after reading it.
                    Turn::new(
                        Step::tool("Read", json!({ "file_path": "shared.txt" })),
                        100,
                        20,
                    ),
                    Turn::new(
                        Step::tool(
                            "Write",
                            json!({ "file_path": "shared.txt", "content": "alpha\nbeta\n" }),
                        ),
                        100,
                        20,
                    ),
                    Turn::new(Step::text("Kept both lines."), 100, 20),
                ],
            ),
            (
                "Your step of the plan: alpha (coder)".into(),
                writer("shared.txt", "alpha"),
            ),
            (
                "Your step of the plan: beta (coder)".into(),
                writer("shared.txt", "beta"),
            ),
        ],
    )
    .await;
    let c = cluster(&model, 2).await;
    let repo = bare_repo(c.dir.path(), "project", &[("README.md", "# project\n")]);
    let task = run_planned(&c, &repo, "agent/clash").await;

    let merge = task["subtasks"]
        .as_array()
        .expect("subtasks")
        .iter()
        .find(|s| s["step"]["kind"] == "integrate")
        .expect("the merge");
    let summary = merge["outcome"]["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("conflicts resolved") && summary.contains("Kept both lines."),
        "{merge:#}"
    );
    // Neither step's work is dropped: the branch holds both lines and both commits.
    let out = clone_branch(&c, &repo, "agent/clash", "clash");
    assert_eq!(
        std::fs::read_to_string(out.join("shared.txt")).unwrap_or_default(),
        "alpha\nbeta\n"
    );
    let log = git(&out, &["log", "--format=%B"]);
    for id in ["alpha", "beta"] {
        let line = format!(
            "Subtask: {} (attempt 1)",
            step_of(&task, id)["id"].as_str().unwrap()
        );
        assert!(log.contains(&line), "{line} not on the branch:\n{log}");
    }
    // The resolving agent was shown both sides.
    let asked = model
        .agent_requests()
        .into_iter()
        .map(|r| r.body["messages"][0]["content"].to_string())
        .find(|m| m.contains("## Merge conflict to resolve"))
        .expect("the conflict's conversation");
    for side in ["+alpha", "+beta", "shared.txt"] {
        assert!(asked.contains(side), "{side:?} missing: {asked}");
    }
}

/// Swarm mode: a step asks for two attempts. Both run, each on a branch of its own;
/// a reviewer, shown both branches, picks the second with its reasons; the merge takes
/// the picked attempt's work into the task branch, and only that one.
#[tokio::test(flavor = "multi_thread")]
async fn two_attempts_at_a_step_are_compared_and_the_picked_one_is_merged() {
    let plan = json!({
        "version": 1,
        "steps": [
            {"id": "alpha", "capability": "coder", "title": "Write a.txt",
             "instructions": "Create a.txt holding one word.", "attempts": 2}
        ]
    });
    let pick = json!({"pick": 2, "reasons": "the second attempt's word is the one asked for"});
    let model = ModelServer::start_routed(
        vec![Turn::new(
            Step::text(&format!("```json\n{plan}\n```")),
            500,
            300,
        )],
        vec![
            (
                "## Pick one of 2 attempts at the step alpha".into(),
                vec![Turn::new(
                    Step::text(&format!(
                        "Both work; keeping the second.\n```json\n{pick}\n```"
                    )),
                    100,
                    20,
                )],
            ),
            ("You make attempt 1".into(), writer("a.txt", "first")),
            ("You make attempt 2".into(), writer("a.txt", "second")),
        ],
    )
    .await;
    let c = cluster(&model, 2).await;
    let repo = bare_repo(c.dir.path(), "project", &[("README.md", "# project\n")]);
    let task = run_planned(&c, &repo, "agent/swarm").await;

    let subtasks = task["subtasks"].as_array().expect("subtasks");
    let tries: Vec<&Value> = subtasks
        .iter()
        .filter(|s| s["step"]["kind"] == "plan" && s["step"]["id"] == "alpha")
        .collect();
    assert_eq!(tries.len(), 2, "{task:#}");
    let branches: Vec<String> = tries
        .iter()
        .map(|s| s["step"]["branch"].as_str().expect("a branch").to_string())
        .collect();
    // Each attempt pushed its own branch.
    for (branch, word) in branches.iter().zip(["first", "second"]) {
        let out = clone_branch(&c, &repo, branch, &format!("try-{word}"));
        assert_eq!(
            std::fs::read_to_string(out.join("a.txt")).unwrap_or_default(),
            format!("{word}\n")
        );
    }
    let picked = subtasks
        .iter()
        .find(|s| s["step"]["kind"] == "pick")
        .expect("the pick");
    assert_eq!(picked["step"]["picked"], branches[1].as_str(), "{picked:#}");
    assert!(
        picked["outcome"]["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("the second attempt's word is the one asked for"),
        "the reasons are kept: {picked:#}"
    );
    // The reviewer was shown both branches, fetched for it to compare.
    let asked = model
        .agent_requests()
        .into_iter()
        .map(|r| r.body["messages"][0]["content"].to_string())
        .find(|m| m.contains("## Pick one of 2 attempts"))
        .expect("the pick's conversation");
    for branch in &branches {
        assert!(asked.contains(branch.as_str()), "{branch} missing: {asked}");
    }
    // The task branch holds the picked attempt's work only.
    let out = clone_branch(&c, &repo, "agent/swarm", "swarm");
    assert_eq!(
        std::fs::read_to_string(out.join("a.txt")).unwrap_or_default(),
        "second\n"
    );
}
