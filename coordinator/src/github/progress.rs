//! The text the App writes: the one progress comment of a task (a checklist of its
//! subtasks with states, durations and cost, edited in place), the status labels, and
//! the pull request's body.

use ao_shared::status::{SubtaskStatus, TaskStatus};
use ao_shared::task::Task;
use std::fmt::Write as _;

/// Status labels the reporter keeps on the issue (exactly one at a time).
pub const STATUS_LABELS: [&str; 4] = [
    "agent:queued",
    "agent:running",
    "agent:done",
    "agent:failed",
];

/// The status label for a task's state; `None` for a cancelled task (all are removed).
pub fn status_label(status: TaskStatus) -> Option<&'static str> {
    match status {
        TaskStatus::Queued | TaskStatus::AwaitingApproval => Some("agent:queued"),
        TaskStatus::Running => Some("agent:running"),
        TaskStatus::Succeeded => Some("agent:done"),
        TaskStatus::Failed => Some("agent:failed"),
        TaskStatus::Cancelled => None,
    }
}

/// Whether a run made the repository's first commit on the task branch (the repository
/// was empty): there is no base branch, so no pull request is opened.
pub fn first_commit(task: &Task) -> bool {
    task.subtasks.iter().any(|s| {
        s.works_on_task_branch()
            && s.outcome
                .as_ref()
                .is_some_and(|o| o.first_commit && o.commit.is_some())
    })
}

/// A marker that identifies the progress comment of a task.
pub fn marker(task: &Task) -> String {
    format!("<!-- agent-orchestrator:progress task={} -->", task.id)
}

/// The hidden marker of a comment or review posted once under run-once `key` (a plan,
/// a review): how a post whose answer was lost is found before it is made again.
pub fn once_marker(key: &ao_shared::ids::DeliveryId) -> String {
    format!("<!-- agent-orchestrator:once {key} -->")
}

fn duration(sub: &ao_shared::task::Subtask) -> Option<String> {
    let start = sub.started_at?;
    let end = sub.finished_at?;
    let secs = (end - start).whole_seconds().max(0);
    Some(if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    })
}

/// Which step of the plan a subtask is: ` step `id` (after `a`, `b`)` or ` merge of N
/// step branches`. Only plan ids (`a-z0-9-`, checked) are shown of the plan, never its
/// free text, which the agent wrote.
fn step_label(sub: &ao_shared::task::Subtask) -> String {
    use ao_shared::task::Step;
    match &sub.step {
        None => String::new(),
        Some(Step::Plan {
            id,
            depends_on,
            candidate,
            ..
        }) => {
            let mut label = format!(" step `{id}`");
            if let Some(k) = candidate {
                label.push_str(&format!(" attempt {k}"));
            }
            if !depends_on.is_empty() {
                let after: Vec<String> = depends_on.iter().map(|d| format!("`{d}`")).collect();
                label.push_str(&format!(" (after {})", after.join(", ")));
            }
            label
        }
        Some(Step::Integrate { branches }) => {
            format!(" merge of {} step branch(es)", branches.len())
        }
        // Which attempt was kept, by number: the branch names are the App's own.
        Some(Step::Pick {
            id,
            candidates,
            picked,
            ..
        }) => {
            let kept = picked
                .as_ref()
                .and_then(|p| candidates.iter().position(|c| c == p))
                .map(|k| format!(", kept attempt {}", k + 1))
                .unwrap_or_default();
            format!(" pick of {} attempts at `{id}`{kept}", candidates.len())
        }
    }
}

/// The words for a task's state in the progress comment.
fn headline(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Queued => "⏳ queued",
        TaskStatus::AwaitingApproval => {
            "✋ waiting for `/agent approve` (or `/agent reject <what to change>`)"
        }
        TaskStatus::Running => "🏃 running",
        TaskStatus::Succeeded => "✅ done",
        TaskStatus::Failed => "❌ failed",
        TaskStatus::Cancelled => "🚫 cancelled",
    }
}

/// The progress comment's body.
pub fn render(task: &Task, pull_request: Option<u64>) -> String {
    let mut s = format!("{}\n### Agent: {}\n\n", marker(task), headline(task.status));
    s.push_str(&format!(
        "Branch `{}` · pipeline `{}`",
        task.branch, task.pipeline
    ));
    if let Some(n) = pull_request {
        s.push_str(&format!(" · pull request #{n}"));
    }
    s.push_str("\n\n");
    if first_commit(task) {
        s.push_str(&format!(
            "The repository was empty: the agent's commit is its first, on `{}`. There is \
             nothing to open a pull request against; the work is on that branch as it is.\n\n",
            task.branch
        ));
    }
    if let Some(n) = task.ci_round {
        s.push_str(&format!(
            "Fix round {n} for the pull request's failing checks (at most \
             `pipeline.max_fix_rounds`); the pull request is marked ready once its checks pass.\n\n"
        ));
        for r in &task.ci_rounds {
            let checks: Vec<String> = r
                .failing
                .iter()
                // A check's name is anyone's text.
                .map(|c| crate::github::untrusted::code_span(c))
                .collect();
            s.push_str(&format!(
                "- Round {}: {} failed → {}\n",
                r.round,
                if checks.is_empty() {
                    "checks".to_string()
                } else {
                    checks.join(", ")
                },
                headline(r.ended.unwrap_or(task.status))
            ));
        }
        if !task.ci_rounds.is_empty() {
            s.push('\n');
        }
    }
    if let ao_shared::task::TaskSource::Github {
        untrusted_author: Some(author),
        ..
    } = &task.source
    {
        s.push_str(&format!(
            "⚠️ This issue was written by @{}, who has no write access to this repository: \
             the agent works from their text, which it is told is untrusted. Check the \
             result with that in mind.\n\n",
            author.replace(
                |c: char| !(c.is_ascii_alphanumeric() || "-[]_".contains(c)),
                ""
            )
        ));
    }
    for sub in &task.subtasks {
        let done = if sub.status == SubtaskStatus::Succeeded {
            "x"
        } else {
            " "
        };
        let mut detail = vec![sub.status.as_str().to_string()];
        if sub.attempt > 1 {
            detail.push(format!("attempt {}", sub.attempt));
        }
        if let Some(d) = duration(sub) {
            detail.push(d);
        }
        if sub.cost_usd > 0.0 {
            detail.push(format!("${:.2}", sub.cost_usd));
        }
        s.push_str(&format!(
            "- [{done}] **{}**{} — {}\n",
            sub.capability,
            step_label(sub),
            detail.join(", ")
        ));
    }
    s.push_str(&format!("\nCost so far: ${:.2}\n", task.cost_usd()));
    if task.status == TaskStatus::AwaitingApproval {
        if let Some(plan) = plan_to_approve(task) {
            s.push('\n');
            s.push_str(&plan);
        }
        s.push('\n');
        s.push_str(&agent_text(task));
    }
    if let Some(refused) = network_refused(task) {
        s.push('\n');
        s.push_str(&refused);
    }
    if let Some(e) = &task.error {
        let e: String = e.chars().take(1500).collect();
        s.push_str(&format!(
            "\n<details><summary>Why</summary>\n\n{}</details>\n",
            fenced(&e)
        ));
    }
    s.push_str(
        "\n<sub>Commands: `/agent status`, `/agent retry`, `/agent cancel`, `/agent approve`, \
         `/agent reject <feedback>`, `/agent run`</sub>\n",
    );
    within_comment_limit(s)
}

/// Characters of a comment's body GitHub takes at most ("body is too long (maximum is
/// 65536 characters)", 422 on `POST`/`PATCH` of an issue comment).
pub const MAX_COMMENT_CHARS: usize = 65_536;

/// `body` cut to [`MAX_COMMENT_CHARS`] with a closing note, when it is longer: each part
/// of the progress comment is bounded on its own, this only makes sure that no mix of
/// them makes GitHub refuse the comment. A cut inside a code block leaves the rest of the
/// comment in it, shown as text.
fn within_comment_limit(body: String) -> String {
    const NOTE: &str = "\n\n… cut to GitHub's limit on a comment; the whole task is on the API \
                        (`GET /api/v1/tasks/{id}`).\n";
    if body.chars().count() <= MAX_COMMENT_CHARS {
        return body;
    }
    let mut cut: String = body
        .chars()
        .take(MAX_COMMENT_CHARS - NOTE.chars().count())
        .collect();
    cut.push_str(NOTE);
    cut
}

/// Characters of one step's title and instructions shown to the approver at most.
const MAX_STEP_SHOWN_CHARS: usize = 2000;
/// Characters of the whole plan shown to the approver at most, code fences included (a
/// comment holds [`MAX_COMMENT_CHARS`]).
const MAX_PLAN_SHOWN_CHARS: usize = 24_000;
/// Characters of the agent's text shown to the approver at most, code fences included.
const MAX_AGENT_TEXT_SHOWN_CHARS: usize = 16_000;

/// The steps of the plan a task waits with, as whoever approves must judge them: each
/// step's id, capability and dependencies (checked plan ids), then its title and
/// instructions — the planner's text — without hidden characters, in a code fence the
/// text cannot close, so that it shows as written and never as mentions, links or
/// images of the App's comment. `None` when the task has no plan steps.
fn plan_to_approve(task: &Task) -> Option<String> {
    use ao_shared::task::Step;
    let mut out = String::new();
    let mut shown = 0;
    for sub in &task.subtasks {
        let Some(Step::Plan { title, .. }) = &sub.step else {
            continue;
        };
        let text = format!(
            "{title}\n\n{}",
            sub.instructions.as_deref().unwrap_or("").trim()
        );
        let mut text: String = text
            .chars()
            .filter(|c| *c == '\n' || !crate::github::untrusted::is_hidden_char(*c))
            .take(MAX_STEP_SHOWN_CHARS)
            .collect();
        if text.chars().count() == MAX_STEP_SHOWN_CHARS {
            text.push_str(" …");
        }
        let step = format!(
            "**{}**{}\n\n{}\n",
            sub.capability,
            step_label(sub),
            fenced(&text)
        );
        // A fence is as long as the longest run of backticks in the text: counted too.
        shown += step.chars().count();
        if shown > MAX_PLAN_SHOWN_CHARS {
            out.push_str("… the rest of the plan is on the API (`GET /api/v1/tasks/{id}`).\n");
            break;
        }
        out.push_str(&step);
    }
    (!out.is_empty()).then(|| format!("**The plan to approve**\n\n{out}"))
}

/// Exactly the instructions the agent gets, shown to whoever approves, in a code fence
/// the text cannot end.
pub fn agent_text(task: &Task) -> String {
    let (shown, cut) = fenced_within(&task.prompt, MAX_AGENT_TEXT_SHOWN_CHARS);
    let cut = if cut {
        "The text is cut here; the whole of it is on the API (`GET /api/v1/tasks/{id}`).\n"
    } else {
        ""
    };
    format!("<details><summary>The text the agent gets</summary>\n\n{shown}{cut}</details>\n")
}

/// [`fenced`] of as much of `text` as fits `max_chars` characters, fences included (a
/// run of backticks lengthens both fences), and whether the text was cut.
pub fn fenced_within(text: &str, max_chars: usize) -> (String, bool) {
    // "text" after the opening fence and three newlines.
    const OVERHEAD: usize = 7;
    let mut longest = 0;
    let mut run = 0;
    let mut end = text.len();
    for (count, (at, c)) in text.char_indices().enumerate() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
        let fences = 2 * (longest + 1).max(3);
        if count + 1 + fences + OVERHEAD > max_chars {
            end = at;
            break;
        }
    }
    (fenced(&text[..end]), end < text.len())
}

/// `text` as a code block whose fence is longer than any run of backticks in it, so that
/// nothing in it can end the block: text written by an agent or taken from an issue
/// shows as written, never as mentions, links or images of the App's comment (GitHub
/// Flavored Markdown, "Fenced code blocks": the closing fence must be at least as long
/// as the opening one). Ends with a newline.
pub fn fenced(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat((longest + 1).max(3));
    format!("{fence}text\n{text}\n{fence}\n")
}

/// The pull request's body without what the runs add to it.
pub fn pull_body_plain(task: &Task, issue: u64) -> String {
    format!(
        "Closes #{issue}\n\nOpened by agent-orchestrator for task `{}` (pipeline `{}`). It stays a \
         draft while the agents work and is marked ready for review when they are done.\n",
        task.id, task.pipeline
    )
}

/// The pull request's body: [`pull_body_plain`] and the refused network destinations.
pub fn pull_body(task: &Task, issue: u64) -> String {
    let mut body = pull_body_plain(task, issue);
    if let Some(refused) = network_refused(task) {
        body.push('\n');
        body.push_str(&refused);
    }
    body
}

/// A host as the agent asked for it, made safe to show: only the characters of a host
/// name or an address literal (anything else, which could be Markdown or a mention,
/// becomes `?`), at most 253 of them.
fn safe_host(host: &str) -> String {
    host.chars()
        .take(253)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_') {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The network destinations the sandboxes refused in the task's runs (the latest
/// attempt of each subtask), as a Markdown section; `None` when there were none.
fn network_refused(task: &Task) -> Option<String> {
    let mut lines = String::new();
    let mut total = 0;
    for sub in &task.subtasks {
        let Some(refused) = sub
            .outcome
            .as_ref()
            .and_then(|o| o.network_refused.as_ref())
        else {
            continue;
        };
        total += refused.total;
        for r in &refused.refused {
            let times = if r.count == 1 {
                String::new()
            } else {
                format!(" ×{}", r.count)
            };
            let _ = writeln!(
                lines,
                "- `{}:{}`{times} ({})",
                safe_host(&r.host),
                r.port,
                sub.capability
            );
        }
        if refused.unlisted > 0 {
            let _ = writeln!(
                lines,
                "- and {} more destinations ({})",
                refused.unlisted, sub.capability
            );
        }
    }
    (total > 0).then(|| {
        format!(
            "**Network refused** ({total} requests to hosts not on the sandbox's allow-list; \
             add a host to `sandbox.allow_hosts` if the agent needs it):\n{lines}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ao_shared::task::{NetworkRefused, Outcome, OutcomeKind, RefusedDestination};

    #[test]
    fn refused_hosts_are_listed_and_cannot_inject_markdown() {
        let mut task: Task = serde_json::from_value(serde_json::json!({
            "id": "01a22b20-5a5d-76c6-b6eb-b80fb59936d5",
            "repository": "acme/widgets", "branch": "agent/1-x", "pipeline": "code",
            "prompt": "x", "title": "x", "status": "running", "version": 1,
            "created_at": "2026-11-30T06:24:30Z", "updated_at": "2026-11-30T06:24:30Z",
            "source": { "kind": "api" },
            "subtasks": [{
                "id": "01a22b20-5a5d-76c6-b6eb-b8100c0ab72f", "capability": "coder",
                "status": "succeeded", "attempt": 1, "depends_on": []
            }]
        }))
        .unwrap();
        assert!(network_refused(&task).is_none());
        let mut outcome = Outcome::failed(OutcomeKind::AgentError, "x", false);
        outcome.network_refused = Some(NetworkRefused {
            refused: vec![
                RefusedDestination {
                    host: "pypi.org".into(),
                    port: 443,
                    count: 3,
                    first_at: "t".into(),
                    last_at: "t".into(),
                },
                RefusedDestination {
                    host: "x`](https://evil) @acme/admins".into(),
                    port: 80,
                    count: 1,
                    first_at: "t".into(),
                    last_at: "t".into(),
                },
            ],
            total: 4,
            unlisted: 0,
        });
        task.subtasks[0].outcome = Some(outcome);
        let shown = render(&task, None);
        assert!(shown.contains("- `pypi.org:443` ×3 (coder)"), "{shown}");
        assert!(!shown.contains('@'), "{shown}");
        assert!(!shown.contains("](h"), "{shown}");
        assert!(pull_body(&task, 7).contains("`pypi.org:443`"));
    }

    #[test]
    fn each_fix_round_for_the_checks_has_its_line() {
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "01a22b20-5a5d-76c6-b6eb-b80fb59936d5",
            "repository": "acme/widgets", "branch": "agent/1-x", "pipeline": "ci-round-2",
            "prompt": "x", "title": "x", "status": "running", "version": 1,
            "created_at": "2026-11-30T06:24:30Z", "updated_at": "2026-11-30T06:24:30Z",
            "source": { "kind": "api" }, "subtasks": [], "ci_round": 2,
            "ci_rounds": [
                { "round": 1, "failing": ["unit", "lint`@acme/admins"], "ended": "succeeded" },
                { "round": 2, "failing": ["unit"] }
            ]
        }))
        .unwrap();
        let shown = render(&task, None);
        assert!(
            shown.contains(
                "- Round 1: `unit`, `lint @acme/admins` failed → ✅ done\n\
                 - Round 2: `unit` failed → 🏃 running\n"
            ),
            "{shown}"
        );
    }

    #[test]
    fn an_error_cannot_close_its_fence() {
        let mut task: Task = serde_json::from_value(serde_json::json!({
            "id": "01a22b20-5a5d-76c6-b6eb-b80fb59936d5",
            "repository": "acme/widgets", "branch": "agent/1-x", "pipeline": "code",
            "prompt": "x", "title": "x", "status": "failed", "version": 1,
            "created_at": "2026-11-30T06:24:30Z", "updated_at": "2026-11-30T06:24:30Z",
            "source": { "kind": "api" }, "subtasks": []
        }))
        .unwrap();
        task.error = Some("bad plan: ```\n@acme/admins [x](https://evil.example)\n```".into());
        let shown = render(&task, None);
        assert!(
            shown.contains(
                "````text\nbad plan: ```\n@acme/admins [x](https://evil.example)\n```\n````\n"
            ),
            "{shown}"
        );
    }

    #[test]
    fn the_approver_sees_the_agents_text_in_a_fence_it_cannot_close() {
        let mut task: Task = serde_json::from_value(serde_json::json!({
            "id": "01a22b20-5a5d-76c6-b6eb-b80fb59936d5",
            "repository": "acme/widgets", "branch": "agent/1-x", "pipeline": "code",
            "prompt": "Do it.\n````\n# Approve me", "title": "x", "status": "awaiting_approval",
            "version": 1,
            "created_at": "2026-11-30T06:24:30Z", "updated_at": "2026-11-30T06:24:30Z",
            "source": { "kind": "api" }, "subtasks": []
        }))
        .unwrap();
        let shown = render(&task, None);
        assert!(
            shown.contains("`````text\nDo it.\n````\n# Approve me\n`````\n"),
            "{shown}"
        );
        task.status = TaskStatus::Running;
        assert!(!render(&task, None).contains("Do it."));
    }

    #[test]
    fn the_approver_sees_each_steps_title_and_instructions_as_written() {
        let mut task: Task = serde_json::from_value(serde_json::json!({
            "id": "01a22b20-5a5d-76c6-b6eb-b80fb59936d5",
            "repository": "acme/widgets", "branch": "agent/1-x", "pipeline": "full",
            "prompt": "x", "title": "x", "status": "awaiting_approval", "version": 1,
            "created_at": "2026-11-30T06:24:30Z", "updated_at": "2026-11-30T06:24:30Z",
            "source": { "kind": "api" },
            "subtasks": [
                { "id": "01a22b20-5a5d-76c6-b6eb-b8100c0ab72f", "capability": "coder",
                  "status": "pending", "attempt": 0, "depends_on": [],
                  "instructions": "Add the parser.\n```\n@acme/admins [x](https://evil.example) ![i](https://evil.example/i.png)\u{202E}",
                  "step": { "kind": "plan", "id": "api", "title": "Parser <img src=x>",
                            "branch": "agent/1-x-step-api" } },
                { "id": "01a22b20-5a5d-76c6-b6eb-b8100c0ab731", "capability": "tester",
                  "status": "pending", "attempt": 0, "depends_on": [],
                  "instructions": "Run the tests.",
                  "step": { "kind": "plan", "id": "check", "title": "Check it", "depends_on": ["api"] } }
            ]
        }))
        .unwrap();
        let shown = render(&task, None);
        assert!(shown.contains("**The plan to approve**"), "{shown}");
        assert!(
            shown.contains(
                "**coder** step `api`\n\n````text\nParser <img src=x>\n\nAdd the parser.\n```\n\
                 @acme/admins [x](https://evil.example) ![i](https://evil.example/i.png)\n````\n"
            ),
            "{shown}"
        );
        assert!(
            shown.contains("**tester** step `check` (after `api`)\n\n```text\nCheck it\n\nRun the tests.\n```\n"),
            "{shown}"
        );
        assert!(!shown.contains('\u{202E}'), "hidden characters go: {shown}");
        assert!(shown.contains("`/agent reject <feedback>`"), "{shown}");
        // Once approved, only the checklist of ids stays.
        task.status = TaskStatus::Running;
        let shown = render(&task, None);
        assert!(
            !shown.contains("Add the parser") && !shown.contains("evil"),
            "{shown}"
        );
    }

    #[test]
    fn the_steps_of_a_plan_are_listed_by_id_with_their_dependencies() {
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "01a22b20-5a5d-76c6-b6eb-b80fb59936d5",
            "repository": "acme/widgets", "branch": "agent/1-x", "pipeline": "full",
            "prompt": "x", "title": "x", "status": "running", "version": 1,
            "created_at": "2026-11-30T06:24:30Z", "updated_at": "2026-11-30T06:24:30Z",
            "source": { "kind": "api" },
            "subtasks": [
                { "id": "01a22b20-5a5d-76c6-b6eb-b8100c0ab72f", "capability": "coder",
                  "status": "running", "attempt": 1, "depends_on": [],
                  "step": { "kind": "plan", "id": "api", "title": "[x](https://evil) @acme/admins",
                            "branch": "agent/1-x-step-api" } },
                { "id": "01a22b20-5a5d-76c6-b6eb-b8100c0ab730", "capability": "coder",
                  "status": "pending", "attempt": 0, "depends_on": [],
                  "step": { "kind": "integrate", "branches": ["agent/1-x-step-api"] } },
                { "id": "01a22b20-5a5d-76c6-b6eb-b8100c0ab731", "capability": "tester",
                  "status": "pending", "attempt": 0, "depends_on": [],
                  "step": { "kind": "plan", "id": "check", "title": "t", "depends_on": ["api"] } }
            ]
        }))
        .unwrap();
        let shown = render(&task, None);
        assert!(shown.contains("**coder** step `api` — running"), "{shown}");
        assert!(
            shown.contains("**coder** merge of 1 step branch(es) — pending"),
            "{shown}"
        );
        assert!(
            shown.contains("**tester** step `check` (after `api`) — pending"),
            "{shown}"
        );
        assert!(
            !shown.contains('@') && !shown.contains("evil"),
            "the agent's title is not shown: {shown}"
        );
    }
}
