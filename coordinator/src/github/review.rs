//! The reviewer's findings as a pull-request review: a finding on a line that the pull
//! request's diff shows becomes a line comment there (`comments[]` of `path`, `line`,
//! `side: RIGHT`, as `POST /repos/{owner}/{repo}/pulls/{pull_number}/reviews` takes it,
//! operation `pulls/create-review` of GitHub's REST description); every other finding
//! (a line outside the diff, no line, no file) is listed in the review's body, since
//! GitHub refuses a comment on a line the diff does not show (422). Pure: the reporter
//! reads the diff and posts.
//!
//! Every text here is the agent's: it is shown in code blocks it cannot close
//! ([`fenced`]), never as mentions, links or images of the App's review.

use crate::github::progress::{fenced, fenced_within};
use ao_shared::verdict::{Finding, Verdict};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Line comments on one review at most; further findings go in the body.
pub const MAX_LINE_COMMENTS: usize = ao_shared::verdict::MAX_FINDINGS;
/// Characters of one finding's message shown at most.
const MAX_MESSAGE_CHARS: usize = 2000;
/// Characters of the review's summary shown at most, code fences included.
const MAX_SUMMARY_SHOWN_CHARS: usize = 25_000;
/// Characters of the findings listed in the body shown at most, code fences included.
const MAX_ELSEWHERE_SHOWN_CHARS: usize = 30_000;

/// The side of the diff a line comment is on: `RIGHT` is the pull request's version
/// (added and unchanged lines), the only side findings are made on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Side {
    Right,
}

/// One line comment of a review, as GitHub takes it in `comments[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LineComment {
    /// The file, relative to the repository's root.
    pub path: String,
    /// The line of the pull request's version of the file (1-based).
    pub line: u32,
    pub side: Side,
    pub body: String,
}

/// A review to post: its body and its line comments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Review {
    pub body: String,
    pub comments: Vec<LineComment>,
}

/// The lines of the pull request's version of a file that its diff shows (added and
/// context lines), from the file's `patch` as `GET
/// /repos/{owner}/{repo}/pulls/{pull_number}/files` gives it (unified-diff hunks, each
/// opening `@@ -a,b +c,d @@`).
pub fn diff_lines(patch: &str) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let mut next: Option<u32> = None;
    for line in patch.lines() {
        if let Some(header) = line.strip_prefix("@@ ") {
            next = header
                .split_whitespace()
                .find_map(|p| p.strip_prefix('+'))
                .and_then(|p| p.split(',').next()?.parse().ok());
            continue;
        }
        let Some(n) = next.as_mut() else {
            continue;
        };
        match line.chars().next() {
            // A removed line is on the other side; `\ No newline at end of file` is no line.
            Some('-') | Some('\\') => {}
            _ => {
                out.insert(*n);
                *n += 1;
            }
        }
    }
    out
}

/// A finding's place, as the reviewer wrote it, made comparable with the diff's paths.
fn place(f: &Finding) -> Option<(String, u32)> {
    let file = f.file.as_deref()?.trim().trim_start_matches("./");
    Some((file.to_string(), f.line?))
}

fn message(f: &Finding) -> String {
    f.message
        .chars()
        .filter(|c| *c == '\n' || !crate::github::untrusted::is_hidden_char(*c))
        .take(MAX_MESSAGE_CHARS)
        .collect()
}

/// The review of a reviewer's reply: `summary` (its text) in the body, each finding of
/// `verdict` on a line of `diff` (file → lines shown, see [`diff_lines`]) as a line
/// comment, the others listed in the body.
pub fn review(
    summary: &str,
    verdict: Option<&Verdict>,
    diff: &BTreeMap<String, BTreeSet<u32>>,
) -> Review {
    let findings: &[Finding] = match verdict {
        Some(Verdict::RequestChanges { findings }) => findings,
        _ => &[],
    };
    let mut comments = Vec::new();
    let mut elsewhere = String::new();
    for f in findings {
        match place(f) {
            Some((path, line))
                if comments.len() < MAX_LINE_COMMENTS
                    && diff.get(&path).is_some_and(|l| l.contains(&line)) =>
            {
                comments.push(LineComment {
                    path,
                    line,
                    side: Side::Right,
                    body: format!("**Reviewer agent**\n\n{}", fenced(&message(f))),
                });
            }
            _ => {
                let at = match (&f.file, f.line) {
                    (Some(file), Some(line)) => format!("{file}:{line}: "),
                    (Some(file), None) => format!("{file}: "),
                    _ => String::new(),
                };
                elsewhere.push_str(&format!("- {at}{}\n", message(f)));
            }
        }
    }
    let summary = summary.trim();
    let summary = if summary.is_empty() {
        "The reviewer found nothing to add."
    } else {
        summary
    };
    // Each part within its share of GitHub's limit on a review's body (65,536
    // characters), fences included: a longer body is refused (422) and no review posted.
    let mut body = format!(
        "**Reviewer agent**\n\n{}",
        fenced_within(summary, MAX_SUMMARY_SHOWN_CHARS).0
    );
    if !elsewhere.is_empty() {
        body.push_str(&format!(
            "\n**Findings not on a line of this diff**\n\n{}",
            fenced_within(elsewhere.trim_end(), MAX_ELSEWHERE_SHOWN_CHARS).0
        ));
    }
    Review { body, comments }
}

/// `review` with its line comments folded into the body: what is posted when GitHub
/// refuses the line comments (the diff changed since it was read).
pub fn without_line_comments(mut review: Review) -> Review {
    if review.comments.is_empty() {
        return review;
    }
    // Within GitHub's limit on a review's body: what does not fit is counted, not shown.
    const ROOM: usize = crate::github::progress::MAX_COMMENT_CHARS - 200;
    let mut used = review.body.chars().count();
    let mut listed = Vec::new();
    let mut left_out = 0;
    for c in review.comments.drain(..) {
        // The path is the agent's: a file may be named to be a mention or a link.
        let item = format!(
            "{}:{}:\n{}",
            crate::github::untrusted::code_span(&c.path),
            c.line,
            c.body
        );
        let len = item.chars().count() + 1;
        if left_out == 0 && used + len <= ROOM {
            used += len;
            listed.push(item);
        } else {
            left_out += 1;
        }
    }
    review
        .body
        .push_str(&format!("\n**Findings by line**\n\n{}", listed.join("\n")));
    if left_out > 0 {
        review.body.push_str(&format!(
            "\n… and {left_out} more finding(s), too long for one review.\n"
        ));
    }
    review
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATCH: &str = "@@ -1,3 +1,4 @@\n a\n-b\n+B\n+C\n c\n@@ -10,2 +11,3 @@\n x\n+y\n z\n\\ No newline at end of file";

    #[test]
    fn the_diff_shows_added_and_context_lines_of_the_new_version() {
        let lines: Vec<u32> = diff_lines(PATCH).into_iter().collect();
        assert_eq!(lines, vec![1, 2, 3, 4, 11, 12, 13]);
        assert!(diff_lines("Binary files differ").is_empty());
    }

    #[test]
    fn findings_on_the_diff_become_line_comments_and_the_rest_go_in_the_body() {
        let diff = BTreeMap::from([("src/lib.rs".to_string(), diff_lines(PATCH))]);
        let verdict: Verdict = serde_json::from_value(serde_json::json!({
            "verdict": "request_changes",
            "findings": [
                {"file": "./src/lib.rs", "line": 12, "message": "y is wrong @acme/admins [x](https://evil.example)"},
                {"file": "src/lib.rs", "line": 7, "message": "not in the diff"},
                {"file": "README.md", "line": 1, "message": "unchanged file"},
                {"message": "no place at all"}
            ]
        }))
        .unwrap();
        let r = review("Two problems.", Some(&verdict), &diff);
        assert_eq!(r.comments.len(), 1, "{r:#?}");
        let c = &r.comments[0];
        assert_eq!(
            (c.path.as_str(), c.line, c.side),
            ("src/lib.rs", 12, Side::Right)
        );
        assert!(
            c.body
                .contains("```text\ny is wrong @acme/admins [x](https://evil.example)\n```"),
            "{}",
            c.body
        );
        for listed in [
            "- src/lib.rs:7: not in the diff",
            "- README.md:1: unchanged file",
            "- no place at all",
        ] {
            assert!(r.body.contains(listed), "{listed:?} not in {}", r.body);
        }
        assert!(!r.body.contains("y is wrong"), "{}", r.body);
        assert_eq!(
            serde_json::to_value(c).unwrap(),
            serde_json::json!({"path": "src/lib.rs", "line": 12, "side": "RIGHT", "body": c.body})
        );
        let folded = without_line_comments(r);
        assert!(folded.comments.is_empty());
        assert!(folded.body.contains("`src/lib.rs`:12:") && folded.body.contains("y is wrong"));
        // An approval has nothing to place.
        let r = review("", Some(&Verdict::Approve), &diff);
        assert!(r.comments.is_empty() && r.body.contains("nothing to add"));
    }

    /// A file the agent named to be a mention (a directory `@acme`), a link or HTML: when
    /// the line comments are folded into the body, its path is in a code span it cannot
    /// leave.
    #[test]
    fn a_folded_path_cannot_mention_link_or_inject_html() {
        for path in [
            "@acme/admins.md",
            "x\n\n@acme/admins <img src=x>.md",
            "[x](https://evil.example)`.md",
        ] {
            let diff = BTreeMap::from([(path.to_string(), diff_lines(PATCH))]);
            let verdict = Verdict::RequestChanges {
                findings: vec![Finding {
                    file: Some(path.into()),
                    line: Some(2),
                    message: "wrong".into(),
                }],
            };
            let r = review("s", Some(&verdict), &diff);
            assert_eq!(r.comments.len(), 1, "{r:#?}");
            let body = without_line_comments(r).body;
            let shown = path.replace(['\n', '`'], " ");
            assert!(body.contains(&format!("`{}`:2:", shown.trim())), "{body}");
        }
    }
}
