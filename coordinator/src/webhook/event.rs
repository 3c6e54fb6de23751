//! Webhook payloads parsed at the edge into [`Event`], the only shape the rest of the
//! coordinator sees. The raw payload structs are private and lenient (every field we do
//! not need is ignored); a payload of a handled event that lacks what we need is a
//! [`ParseError`], answered 400. Events and actions we do not handle are [`Parsed::Ignored`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// `owner/name` of a repository.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RepoName {
    pub owner: String,
    pub name: String,
}

impl RepoName {
    pub fn full(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// Parses `owner/name`.
    pub fn parse(full: &str) -> Option<Self> {
        let (owner, name) = full.split_once('/')?;
        if owner.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(Self {
            owner: owner.into(),
            name: name.into(),
        })
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// Who caused the event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub login: String,
    /// `type: Bot` (GitHub Apps, including this one, and other bots).
    pub is_bot: bool,
}

/// What every repository event carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// Absent when the webhook is not an App's (a plain repository webhook).
    pub installation_id: Option<u64>,
    pub repo: RepoName,
    pub default_branch: Option<String>,
    pub sender: Sender,
}

/// An issue as far as we need it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    pub number: u64,
    pub title: String,
    pub body: String,
    /// Comments on pull requests arrive as `issue_comment` too.
    pub is_pull_request: bool,
    /// `state: closed` when the event was sent.
    #[serde(default)]
    pub closed: bool,
    /// The login of the issue's author (`issue.user.login`), when the payload has it.
    #[serde(default)]
    pub author: Option<String>,
}

/// A slash command in a comment: `/agent <verb>` at the start of a line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Run,
    Retry,
    Cancel,
    Approve,
    /// `/agent reject <feedback>`: the plan waiting for approval goes back to the planner
    /// with the feedback (the rest of the command's line and every line after it).
    Reject(String),
    Status,
    /// `/agent <something else>`: answered with the list of commands.
    Unknown(String),
}

impl Command {
    /// The first `/agent …` line of a comment, if any.
    pub fn find(body: &str) -> Option<Command> {
        let mut lines = body.lines();
        while let Some(line) = lines.next() {
            let Some(rest) = line.trim_start().strip_prefix("/agent") else {
                continue;
            };
            // `/agent` as a word of its own, not `/agents`.
            if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
                continue;
            }
            let rest = rest.trim_start();
            let word = rest.split_whitespace().next().unwrap_or("");
            let verb = word.to_ascii_lowercase();
            return Some(match verb.as_str() {
                "run" => Command::Run,
                "retry" => Command::Retry,
                "cancel" => Command::Cancel,
                "approve" => Command::Approve,
                "reject" => {
                    let first = &rest[word.len()..];
                    let feedback: Vec<&str> = std::iter::once(first).chain(lines).collect();
                    Command::Reject(feedback.join("\n").trim().to_string())
                }
                "status" => Command::Status,
                _ => Command::Unknown(verb.chars().take(40).collect()),
            });
        }
        None
    }
}

/// The state of a submitted review.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReviewState {
    Approved,
    ChangesRequested,
    Commented,
}

/// A pull request as far as reviews need it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    pub number: u64,
    /// The head branch (the agent's branch on its own pull requests).
    pub head_ref: String,
    /// The pull request's author; the agent's own pull requests are by a bot.
    pub author: String,
}

/// What an accepted delivery means.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Ping,
    IssueLabeled {
        ctx: Context,
        issue: Issue,
        label: String,
    },
    IssueUnlabeled {
        ctx: Context,
        issue: Issue,
        label: String,
    },
    IssueClosed {
        ctx: Context,
        issue: Issue,
    },
    IssueReopened {
        ctx: Context,
        issue: Issue,
        labels: Vec<String>,
    },
    Command {
        ctx: Context,
        issue: Issue,
        command: Command,
        comment_id: u64,
    },
    Review {
        ctx: Context,
        pull: PullRequest,
        state: ReviewState,
        body: String,
    },
    ReviewComment {
        ctx: Context,
        pull: PullRequest,
        body: String,
        path: String,
        line: Option<u64>,
    },
    /// A check run or check suite completed, or a commit status was set, on these
    /// branches: what it means is read back from GitHub (the checks of the branch's
    /// head), so the event only says where to look. Sent by CI, usually a bot: not
    /// filtered as a bot's trigger is.
    ChecksChanged {
        ctx: Context,
        branches: Vec<String>,
    },
    Installation {
        installation_id: u64,
        action: String,
        account: String,
    },
    InstallationRepositories {
        installation_id: u64,
        added: Vec<String>,
        removed: Vec<String>,
    },
}

/// The longest text kept of one field of an event when it is stored in the inbox, in
/// bytes: more than anything made of it uses (prompts take at most 32 KiB), and small
/// enough that a stored event stays well under a state-store record's limit.
pub const MAX_STORED_TEXT_BYTES: usize = 48 * 1024;
/// The most labels or repositories kept of one event when it is stored.
pub const MAX_STORED_LIST: usize = 100;

fn cut(text: &mut String) {
    if text.len() > MAX_STORED_TEXT_BYTES {
        let mut at = MAX_STORED_TEXT_BYTES;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
}

impl Event {
    /// The event with every free-text field cut to [`MAX_STORED_TEXT_BYTES`] and every
    /// list to [`MAX_STORED_LIST`], as it is stored in the inbox.
    pub fn bounded(mut self) -> Self {
        fn ctx_cut(c: &mut Context) {
            cut(&mut c.repo.owner);
            cut(&mut c.repo.name);
            cut(&mut c.sender.login);
            if let Some(b) = &mut c.default_branch {
                cut(b);
            }
        }
        fn issue_cut(i: &mut Issue) {
            cut(&mut i.title);
            cut(&mut i.body);
            if let Some(a) = &mut i.author {
                cut(a);
            }
        }
        match &mut self {
            Event::Ping => {}
            Event::IssueLabeled { ctx, issue, label }
            | Event::IssueUnlabeled { ctx, issue, label } => {
                ctx_cut(ctx);
                issue_cut(issue);
                cut(label);
            }
            Event::IssueClosed { ctx, issue } => {
                ctx_cut(ctx);
                issue_cut(issue);
            }
            Event::IssueReopened { ctx, issue, labels } => {
                ctx_cut(ctx);
                issue_cut(issue);
                labels.truncate(MAX_STORED_LIST);
                labels.iter_mut().for_each(cut);
            }
            Event::Command { ctx, issue, .. } => {
                ctx_cut(ctx);
                issue_cut(issue);
            }
            Event::Review {
                ctx, pull, body, ..
            } => {
                ctx_cut(ctx);
                cut(&mut pull.head_ref);
                cut(&mut pull.author);
                cut(body);
            }
            Event::ReviewComment {
                ctx,
                pull,
                body,
                path,
                ..
            } => {
                ctx_cut(ctx);
                cut(&mut pull.head_ref);
                cut(&mut pull.author);
                cut(body);
                cut(path);
            }
            Event::ChecksChanged { ctx, branches } => {
                ctx_cut(ctx);
                branches.truncate(MAX_STORED_LIST);
                branches.iter_mut().for_each(cut);
            }
            Event::Installation {
                action, account, ..
            } => {
                cut(action);
                cut(account);
            }
            Event::InstallationRepositories { added, removed, .. } => {
                added.truncate(MAX_STORED_LIST);
                removed.truncate(MAX_STORED_LIST);
                added.iter_mut().chain(removed.iter_mut()).for_each(cut);
            }
        }
        self
    }

    /// The repository context, when the event has one.
    pub fn context(&self) -> Option<&Context> {
        match self {
            Event::IssueLabeled { ctx, .. }
            | Event::IssueUnlabeled { ctx, .. }
            | Event::IssueClosed { ctx, .. }
            | Event::IssueReopened { ctx, .. }
            | Event::Command { ctx, .. }
            | Event::Review { ctx, .. }
            | Event::ReviewComment { ctx, .. } => Some(ctx),
            _ => None,
        }
    }
}

/// The result of parsing a verified delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Event(Box<Event>),
    /// Verified but not something we act on; the reason is logged.
    Ignored(&'static str),
}

fn ev(e: Event) -> Parsed {
    Parsed::Event(Box::new(e))
}

/// A verified payload that is not what its event type promises.
#[derive(Debug, thiserror::Error)]
#[error("cannot parse the {event} payload: {message}")]
pub struct ParseError {
    pub event: String,
    pub message: String,
}

#[derive(Deserialize)]
struct RawUser {
    login: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct RawOwner {
    login: String,
}

#[derive(Deserialize)]
struct RawRepo {
    name: String,
    owner: RawOwner,
    #[serde(default)]
    default_branch: Option<String>,
}

#[derive(Deserialize)]
struct RawInstallationRef {
    id: u64,
}

#[derive(Deserialize)]
struct RawLabel {
    name: String,
}

#[derive(Deserialize)]
struct RawIssue {
    number: u64,
    #[serde(default)]
    title: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    pull_request: Option<serde_json::Value>,
    #[serde(default)]
    labels: Vec<RawLabel>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    user: Option<RawUser>,
}

#[derive(Deserialize)]
struct RawComment {
    id: u64,
    #[serde(default)]
    body: Option<String>,
}

#[derive(Deserialize)]
struct RawIssuesPayload {
    action: String,
    issue: RawIssue,
    #[serde(default)]
    label: Option<RawLabel>,
    repository: RawRepo,
    sender: RawUser,
    #[serde(default)]
    installation: Option<RawInstallationRef>,
}

#[derive(Deserialize)]
struct RawIssueCommentPayload {
    action: String,
    issue: RawIssue,
    comment: RawComment,
    repository: RawRepo,
    sender: RawUser,
    #[serde(default)]
    installation: Option<RawInstallationRef>,
}

#[derive(Deserialize)]
struct RawRef {
    #[serde(rename = "ref")]
    name: String,
}

#[derive(Deserialize)]
struct RawPull {
    number: u64,
    head: RawRef,
    user: RawUser,
}

#[derive(Deserialize)]
struct RawReview {
    state: String,
    #[serde(default)]
    body: Option<String>,
}

#[derive(Deserialize)]
struct RawReviewPayload {
    action: String,
    review: RawReview,
    pull_request: RawPull,
    repository: RawRepo,
    sender: RawUser,
    #[serde(default)]
    installation: Option<RawInstallationRef>,
}

#[derive(Deserialize)]
struct RawReviewComment {
    #[serde(default)]
    body: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    line: Option<u64>,
}

#[derive(Deserialize)]
struct RawReviewCommentPayload {
    action: String,
    comment: RawReviewComment,
    pull_request: RawPull,
    repository: RawRepo,
    sender: RawUser,
    #[serde(default)]
    installation: Option<RawInstallationRef>,
}

#[derive(Deserialize)]
struct RawPullHead {
    head: RawRef,
}

#[derive(Deserialize)]
struct RawSuite {
    #[serde(default)]
    head_branch: Option<String>,
    #[serde(default)]
    pull_requests: Vec<RawPullHead>,
}

#[derive(Deserialize)]
struct RawCheckRun {
    #[serde(default)]
    check_suite: Option<RawSuite>,
    #[serde(default)]
    pull_requests: Vec<RawPullHead>,
}

/// `check_run` and `check_suite` deliveries (GitHub's webhook payloads of those names).
#[derive(Deserialize)]
struct RawCheckPayload {
    action: String,
    #[serde(default)]
    check_run: Option<RawCheckRun>,
    #[serde(default)]
    check_suite: Option<RawSuite>,
    repository: RawRepo,
    sender: RawUser,
    #[serde(default)]
    installation: Option<RawInstallationRef>,
}

#[derive(Deserialize)]
struct RawBranch {
    name: String,
}

/// A `status` delivery.
#[derive(Deserialize)]
struct RawStatusPayload {
    state: String,
    #[serde(default)]
    branches: Vec<RawBranch>,
    repository: RawRepo,
    sender: RawUser,
    #[serde(default)]
    installation: Option<RawInstallationRef>,
}

/// The branches of a suite: its head branch and its pull requests' heads, each once.
fn suite_branches(suite: Option<RawSuite>, pulls: Vec<RawPullHead>, out: &mut Vec<String>) {
    let (head, more) = match suite {
        Some(s) => (s.head_branch, s.pull_requests),
        None => (None, Vec::new()),
    };
    for b in head
        .into_iter()
        .chain(pulls.into_iter().chain(more).map(|p| p.head.name))
    {
        if !out.contains(&b) {
            out.push(b);
        }
    }
}

#[derive(Deserialize)]
struct RawAccount {
    login: String,
}

#[derive(Deserialize)]
struct RawInstallation {
    id: u64,
    account: RawAccount,
}

#[derive(Deserialize)]
struct RawInstallationPayload {
    action: String,
    installation: RawInstallation,
}

#[derive(Deserialize)]
struct RawRepoRef {
    full_name: String,
}

#[derive(Deserialize)]
struct RawInstallationReposPayload {
    installation: RawInstallation,
    #[serde(default)]
    repositories_added: Vec<RawRepoRef>,
    #[serde(default)]
    repositories_removed: Vec<RawRepoRef>,
}

fn context(repo: RawRepo, sender: RawUser, inst: Option<RawInstallationRef>) -> Context {
    Context {
        installation_id: inst.map(|i| i.id),
        repo: RepoName {
            owner: repo.owner.login,
            name: repo.name,
        },
        default_branch: repo.default_branch,
        sender: Sender {
            is_bot: sender.kind.as_deref() == Some("Bot") || sender.login.ends_with("[bot]"),
            login: sender.login,
        },
    }
}

fn issue(raw: RawIssue) -> (Issue, Vec<String>) {
    let labels = raw.labels.into_iter().map(|l| l.name).collect();
    (
        Issue {
            number: raw.number,
            title: raw.title,
            body: raw.body.unwrap_or_default(),
            is_pull_request: raw.pull_request.as_ref().is_some_and(|p| !p.is_null()),
            closed: raw.state.as_deref() == Some("closed"),
            author: raw.user.map(|u| u.login),
        },
        labels,
    )
}

fn pull(raw: RawPull) -> PullRequest {
    PullRequest {
        number: raw.number,
        head_ref: raw.head.name,
        author: raw.user.login,
    }
}

/// Parses a verified delivery of event type `event` (the `X-GitHub-Event` header).
pub fn parse(event: &str, body: &[u8]) -> Result<Parsed, ParseError> {
    fn de<T: serde::de::DeserializeOwned>(event: &str, body: &[u8]) -> Result<T, ParseError> {
        serde_json::from_slice(body).map_err(|e| ParseError {
            event: event.to_string(),
            message: e.to_string(),
        })
    }
    let parsed = match event {
        "ping" => {
            // Any JSON object will do.
            de::<serde_json::Map<String, serde_json::Value>>(event, body)?;
            ev(Event::Ping)
        }
        "issues" => {
            let p: RawIssuesPayload = de(event, body)?;
            let ctx = context(p.repository, p.sender, p.installation);
            let (issue, labels) = issue(p.issue);
            match p.action.as_str() {
                "labeled" | "unlabeled" => {
                    // GitHub's schema lets `label` be absent (a label deleted as it
                    // was applied): nothing to act on, but not a malformed delivery.
                    let Some(label) = p.label else {
                        return Ok(Parsed::Ignored("a label event without its label"));
                    };
                    if p.action == "labeled" {
                        ev(Event::IssueLabeled {
                            ctx,
                            issue,
                            label: label.name,
                        })
                    } else {
                        ev(Event::IssueUnlabeled {
                            ctx,
                            issue,
                            label: label.name,
                        })
                    }
                }
                "closed" => ev(Event::IssueClosed { ctx, issue }),
                "reopened" => ev(Event::IssueReopened { ctx, issue, labels }),
                _ => Parsed::Ignored("issues action not handled"),
            }
        }
        "issue_comment" => {
            let p: RawIssueCommentPayload = de(event, body)?;
            if p.action != "created" {
                return Ok(Parsed::Ignored("only new comments carry commands"));
            }
            let Some(command) = Command::find(p.comment.body.as_deref().unwrap_or("")) else {
                return Ok(Parsed::Ignored("comment without an /agent command"));
            };
            let ctx = context(p.repository, p.sender, p.installation);
            let (issue, _) = issue(p.issue);
            ev(Event::Command {
                ctx,
                issue,
                command,
                comment_id: p.comment.id,
            })
        }
        "pull_request_review" => {
            let p: RawReviewPayload = de(event, body)?;
            if p.action != "submitted" {
                return Ok(Parsed::Ignored("review action not handled"));
            }
            let state = match p.review.state.to_ascii_lowercase().as_str() {
                "approved" => ReviewState::Approved,
                "changes_requested" => ReviewState::ChangesRequested,
                "commented" => ReviewState::Commented,
                _ => return Ok(Parsed::Ignored("review state not handled")),
            };
            ev(Event::Review {
                ctx: context(p.repository, p.sender, p.installation),
                pull: pull(p.pull_request),
                state,
                body: p.review.body.unwrap_or_default(),
            })
        }
        "pull_request_review_comment" => {
            let p: RawReviewCommentPayload = de(event, body)?;
            if p.action != "created" {
                return Ok(Parsed::Ignored("review comment action not handled"));
            }
            ev(Event::ReviewComment {
                ctx: context(p.repository, p.sender, p.installation),
                pull: pull(p.pull_request),
                body: p.comment.body,
                path: p.comment.path,
                line: p.comment.line,
            })
        }
        "check_run" | "check_suite" => {
            let p: RawCheckPayload = de(event, body)?;
            if p.action != "completed" {
                return Ok(Parsed::Ignored("check action not handled"));
            }
            let mut branches = Vec::new();
            if let Some(run) = p.check_run {
                suite_branches(run.check_suite, run.pull_requests, &mut branches);
            }
            suite_branches(p.check_suite, Vec::new(), &mut branches);
            if branches.is_empty() {
                return Ok(Parsed::Ignored("check on no branch"));
            }
            ev(Event::ChecksChanged {
                ctx: context(p.repository, p.sender, p.installation),
                branches,
            })
        }
        "status" => {
            let p: RawStatusPayload = de(event, body)?;
            // A pending status changes nothing that was not waited for already.
            if p.state == "pending" || p.branches.is_empty() {
                return Ok(Parsed::Ignored("status pending or on no branch"));
            }
            ev(Event::ChecksChanged {
                ctx: context(p.repository, p.sender, p.installation),
                branches: p.branches.into_iter().map(|b| b.name).collect(),
            })
        }
        "installation" => {
            let p: RawInstallationPayload = de(event, body)?;
            ev(Event::Installation {
                installation_id: p.installation.id,
                action: p.action,
                account: p.installation.account.login,
            })
        }
        "installation_repositories" => {
            let p: RawInstallationReposPayload = de(event, body)?;
            ev(Event::InstallationRepositories {
                installation_id: p.installation.id,
                added: p
                    .repositories_added
                    .into_iter()
                    .map(|r| r.full_name)
                    .collect(),
                removed: p
                    .repositories_removed
                    .into_iter()
                    .map(|r| r.full_name)
                    .collect(),
            })
        }
        _ => Parsed::Ignored("event type not handled"),
    };
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stored_event_is_bounded_and_reads_back_the_same() {
        let huge = "é".repeat(200_000);
        let event = Event::IssueLabeled {
            ctx: Context {
                installation_id: Some(7),
                repo: RepoName::parse("acme/widgets").unwrap(),
                default_branch: Some("main".into()),
                sender: Sender {
                    login: "alice".into(),
                    is_bot: false,
                },
            },
            issue: Issue {
                number: 3,
                title: "t".into(),
                body: huge,
                is_pull_request: false,
                closed: false,
                author: None,
            },
            label: "agent".into(),
        };
        let bounded = event.bounded();
        let text = serde_json::to_string(&bounded).unwrap();
        assert!(
            text.len() < ao_shared::state::MAX_INBOX_PAYLOAD_BYTES,
            "{}",
            text.len()
        );
        let Event::IssueLabeled { issue, .. } = &bounded else {
            panic!("kind changed")
        };
        assert!(issue.body.len() <= MAX_STORED_TEXT_BYTES);
        assert!(issue.body.starts_with("éé"));
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, bounded);
    }

    fn repo() -> serde_json::Value {
        json!({"name": "r", "owner": {"login": "o"}, "default_branch": "main"})
    }

    #[test]
    fn a_label_becomes_a_typed_event() {
        let body = json!({
            "action": "labeled", "label": {"name": "agent"},
            "issue": {"number": 7, "title": "Fix", "body": null, "labels": []},
            "repository": repo(), "sender": {"login": "u", "type": "User"},
            "installation": {"id": 42}
        });
        let parsed = parse("issues", body.to_string().as_bytes()).unwrap();
        let Parsed::Event(e) = parsed else {
            panic!("{parsed:?}")
        };
        let Event::IssueLabeled { ctx, issue, label } = *e else {
            panic!("{e:?}")
        };
        assert_eq!(label, "agent");
        assert_eq!(issue.number, 7);
        assert_eq!(ctx.installation_id, Some(42));
        assert_eq!(ctx.repo.full(), "o/r");
        assert!(!ctx.sender.is_bot);
    }

    #[test]
    fn commands_are_found_on_their_own_line() {
        assert_eq!(
            Command::find("please\n/agent retry now"),
            Some(Command::Retry)
        );
        assert_eq!(Command::find("/agent APPROVE"), Some(Command::Approve));
        assert_eq!(
            Command::find("/agent frobnicate"),
            Some(Command::Unknown("frobnicate".into()))
        );
        assert_eq!(Command::find("mention /agent run inline"), None);
        assert_eq!(Command::find("/agents run"), None);
        assert_eq!(
            Command::find("Not yet.\n/agent Reject  split the parser\nand keep the API.\n"),
            Some(Command::Reject(
                "split the parser\nand keep the API.".into()
            ))
        );
        assert_eq!(
            Command::find("/agent reject"),
            Some(Command::Reject(String::new()))
        );
    }

    #[test]
    fn bad_payloads_of_handled_events_are_errors_and_others_are_ignored() {
        assert!(parse("issues", b"{}").is_err());
        assert!(parse("issues", b"not json").is_err());
        assert!(parse("ping", b"[]").is_err());
        assert_eq!(
            parse("star", b"whatever").unwrap(),
            Parsed::Ignored("event type not handled")
        );
        let bot = json!({
            "action": "created", "comment": {"id": 1, "body": "/agent run"},
            "issue": {"number": 1, "title": "t"}, "repository": repo(),
            "sender": {"login": "ao[bot]", "type": "Bot"}
        });
        let Parsed::Event(e) = parse("issue_comment", bot.to_string().as_bytes()).unwrap() else {
            panic!()
        };
        let Event::Command { ctx, .. } = *e else {
            panic!()
        };
        assert!(ctx.sender.is_bot);
    }
}
