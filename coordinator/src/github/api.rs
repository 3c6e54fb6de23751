//! The GitHub REST calls the App makes, each a small typed function over
//! [`Client`]: permissions, comments, labels, pull requests, reviews, issues, contents,
//! and the App's hook deliveries. Route templates (for metrics) are written out here.

use super::client::{Client, GithubError};
use crate::webhook::event::RepoName;
use http::Method;
use octocrab::models::issues::Comment;
use octocrab::models::pulls::Review;
use octocrab::models::Author;
use serde_json::{json, Value};

/// A user's role on a repository, as the permission endpoint reports it.
pub async fn permission(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    user: &str,
) -> Result<String, GithubError> {
    let path = format!("/repos/{repo}/collaborators/{}/permission", urlencode(user));
    match c
        .call(
            inst,
            Method::GET,
            "/repos/{o}/{r}/collaborators/{u}/permission",
            &path,
            None,
        )
        .await
    {
        Ok(r) => Ok(r.body["role_name"]
            .as_str()
            .or(r.body["permission"].as_str())
            .unwrap_or("none")
            .to_string()),
        // Not a collaborator at all.
        Err(GithubError::Status { status: 404, .. }) => Ok("none".into()),
        Err(e) => Err(e),
    }
}

/// Whether a role may start and steer agents.
pub fn can_write(role: &str) -> bool {
    matches!(role, "admin" | "maintain" | "write")
}

pub async fn create_comment(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    issue: u64,
    body: &str,
) -> Result<u64, GithubError> {
    let r = c
        .create(
            inst,
            "/repos/{o}/{r}/issues/{n}/comments",
            &format!("/repos/{repo}/issues/{issue}/comments"),
            &json!({ "body": body }),
        )
        .await?;
    let route = "/repos/{o}/{r}/issues/{n}/comments";
    let comment: Comment = serde_json::from_value(r.body).map_err(|e| decode(route, e))?;
    Ok(comment.id.into_inner())
}

/// Posts an answer on an issue or pull request. A conversation that refuses comments for
/// good (a locked conversation or an archived repository answers 403, issues disabled
/// 410) cannot be answered at all: that is logged and is no error, so that the work that
/// asked for the answer is not repeated for it.
pub async fn answer(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    number: u64,
    text: &str,
) -> Result<(), GithubError> {
    match create_comment(c, inst, repo, number, text).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_permanent() => {
            tracing::warn!(repository = %repo, issue = number, error = %e,
                "GitHub refuses comments here; the answer is not posted");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The items of a list read with octocrab's model `T`, leaving out those it cannot read:
/// GitHub's description lets others' comments and reviews have a `null` user (a deleted
/// account) or a `null` `gravatar_id`, which octocrab's `Author` does not take, and such
/// an item is never the App's own.
fn read_each<T: serde::de::DeserializeOwned>(list: Vec<Value>) -> impl Iterator<Item = T> {
    list.into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
}

/// Whether `user` (a `simple-user` of GitHub's REST description) is this App's bot: of
/// `type` `Bot`, and `<app_slug>[bot]` when the slug is configured. A person quoting
/// the App's comment (markers included) is never taken for the App.
fn by_the_app(user: &Author, app_slug: Option<&str>) -> bool {
    user.r#type == "Bot"
        && app_slug.is_none_or(|slug| user.login.strip_suffix("[bot]") == Some(slug))
}

/// The id of the App's comment on an issue whose body contains `marker`, if any (to
/// find a comment whose creation failed without an answer, or was made by a replica
/// that died before storing its id, instead of making a second). Reads every page of
/// `GET /repos/{owner}/{repo}/issues/{issue_number}/comments`.
pub async fn find_comment(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    issue: u64,
    marker: &str,
    app_slug: Option<&str>,
) -> Result<Option<u64>, GithubError> {
    let list: Vec<Value> = c
        .list(
            inst,
            "/repos/{o}/{r}/issues/{n}/comments",
            &format!("/repos/{repo}/issues/{issue}/comments?per_page=100"),
            None,
        )
        .await?;
    Ok(read_each::<Comment>(list)
        .find(|x| {
            by_the_app(&x.user, app_slug) && x.body.as_deref().is_some_and(|b| b.contains(marker))
        })
        .map(|x| x.id.into_inner()))
}

/// Whether the App already posted a review on pull request `number` whose body contains
/// `marker` (one whose creation failed without an answer). Reads every page of `GET
/// /repos/{owner}/{repo}/pulls/{pull_number}/reviews`.
pub async fn has_review(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    number: u64,
    marker: &str,
    app_slug: Option<&str>,
) -> Result<bool, GithubError> {
    let list: Vec<Value> = c
        .list(
            inst,
            "/repos/{o}/{r}/pulls/{n}/reviews",
            &format!("/repos/{repo}/pulls/{number}/reviews?per_page=100"),
            None,
        )
        .await?;
    Ok(read_each::<Review>(list).any(|x| {
        x.user.as_ref().is_some_and(|u| by_the_app(u, app_slug))
            && x.body.as_deref().is_some_and(|b| b.contains(marker))
    }))
}

/// The checks on the head of `git_ref` (a branch): its check runs (`GET
/// /repos/{owner}/{repo}/commits/{ref}/check-runs`, every page) and its commit statuses
/// (`GET /repos/{owner}/{repo}/commits/{ref}/status`, the latest per context), with the
/// head's sha.
pub async fn checks_of(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    git_ref: &str,
) -> Result<(String, Vec<super::checks::Check>), GithubError> {
    use super::checks::Check;
    let r = urlencode(git_ref);
    let runs: Vec<Value> = c
        .list(
            inst,
            "/repos/{o}/{r}/commits/{ref}/check-runs",
            &format!("/repos/{repo}/commits/{r}/check-runs?per_page=100"),
            Some("check_runs"),
        )
        .await?;
    let status = c
        .call(
            inst,
            Method::GET,
            "/repos/{o}/{r}/commits/{ref}/status",
            &format!("/repos/{repo}/commits/{r}/status?per_page=100"),
            None,
        )
        .await?
        .body;
    let mut checks: Vec<Check> = runs
        .iter()
        .map(|run| {
            let out = &run["output"];
            let excerpt: Vec<&str> = ["title", "summary", "text"]
                .iter()
                .filter_map(|k| out[*k].as_str())
                .collect();
            Check::run(
                run["name"].as_str().unwrap_or("check run"),
                run["status"].as_str().unwrap_or(""),
                run["conclusion"].as_str(),
                &excerpt.join("\n"),
            )
        })
        .collect();
    for s in status["statuses"].as_array().into_iter().flatten() {
        checks.push(Check::status(
            s["context"].as_str().unwrap_or("status"),
            s["state"].as_str().unwrap_or(""),
            s["description"].as_str().unwrap_or(""),
        ));
    }
    let sha = status["sha"]
        .as_str()
        .or_else(|| runs.first().and_then(|r| r["head_sha"].as_str()))
        .unwrap_or_default()
        .to_string();
    Ok((sha, checks))
}

pub async fn update_comment(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    id: u64,
    body: &str,
) -> Result<(), GithubError> {
    c.call(
        inst,
        Method::PATCH,
        "/repos/{o}/{r}/issues/comments/{id}",
        &format!("/repos/{repo}/issues/comments/{id}"),
        Some(&json!({ "body": body })),
    )
    .await
    .map(|_| ())
}

pub async fn add_labels(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    issue: u64,
    labels: &[&str],
) -> Result<(), GithubError> {
    c.call(
        inst,
        Method::POST,
        "/repos/{o}/{r}/issues/{n}/labels",
        &format!("/repos/{repo}/issues/{issue}/labels"),
        Some(&json!({ "labels": labels })),
    )
    .await
    .map(|_| ())
}

/// Removes a label; one that is not there is no error.
pub async fn remove_label(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    issue: u64,
    label: &str,
) -> Result<(), GithubError> {
    match c
        .call(
            inst,
            Method::DELETE,
            "/repos/{o}/{r}/issues/{n}/labels/{name}",
            &format!("/repos/{repo}/issues/{issue}/labels/{}", urlencode(label)),
            None,
        )
        .await
    {
        Ok(_) | Err(GithubError::Status { status: 404, .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A pull request as the reporter needs it.
#[derive(Debug, Clone)]
pub struct Pull {
    pub number: u64,
    pub node_id: String,
    pub draft: bool,
    /// `state: open` (not closed, not merged).
    pub open: bool,
}

/// Reads a `pull-request` of GitHub's REST description. Not octocrab's `PullRequest`:
/// it requires fields the description lets be `null` (a head's `user.gravatar_id`).
fn pull(route: &'static str, v: Value) -> Result<Pull, GithubError> {
    let number = v["number"]
        .as_u64()
        .ok_or_else(|| decode(route, "a pull request without a number"))?;
    Ok(Pull {
        number,
        node_id: v["node_id"].as_str().unwrap_or("").to_string(),
        draft: v["draft"].as_bool().unwrap_or(false),
        open: v["state"].as_str().is_none_or(|s| s == "open"),
    })
}

/// An answer of `route` that does not have the shape GitHub's description gives.
fn decode(route: &'static str, e: impl std::fmt::Display) -> GithubError {
    GithubError::Decode {
        route,
        message: e.to_string(),
    }
}

pub async fn create_pull(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    head: &str,
    base: &str,
    title: &str,
    body: &str,
) -> Result<Pull, GithubError> {
    let r = c
        .create(
            inst,
            "/repos/{o}/{r}/pulls",
            &format!("/repos/{repo}/pulls"),
            &json!({ "head": head, "base": base, "title": title, "body": body,
                      "draft": true, "maintainer_can_modify": true }),
        )
        .await?;
    pull("/repos/{o}/{r}/pulls", r.body)
}

/// The open pull request whose head is `branch`, if any (to adopt one made before a
/// crash instead of opening a second).
pub async fn find_pull(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    branch: &str,
) -> Result<Option<Pull>, GithubError> {
    let r = c
        .call(
            inst,
            Method::GET,
            "/repos/{o}/{r}/pulls",
            &format!(
                "/repos/{repo}/pulls?state=open&head={}:{}",
                urlencode(&repo.owner),
                urlencode(branch)
            ),
            None,
        )
        .await?;
    match r.body.as_array().and_then(|a| a.first()) {
        Some(first) => pull("/repos/{o}/{r}/pulls", first.clone()).map(Some),
        None => Ok(None),
    }
}

pub async fn get_pull(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    number: u64,
) -> Result<Pull, GithubError> {
    let r = c
        .call(
            inst,
            Method::GET,
            "/repos/{o}/{r}/pulls/{n}",
            &format!("/repos/{repo}/pulls/{number}"),
            None,
        )
        .await?;
    pull("/repos/{o}/{r}/pulls/{n}", r.body)
}

/// Replaces a pull request's body (`PATCH /repos/{owner}/{repo}/pulls/{pull_number}`).
pub async fn update_pull_body(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    number: u64,
    body: &str,
) -> Result<(), GithubError> {
    c.call(
        inst,
        Method::PATCH,
        "/repos/{o}/{r}/pulls/{n}",
        &format!("/repos/{repo}/pulls/{number}"),
        Some(&json!({ "body": body })),
    )
    .await?;
    Ok(())
}

/// Draft → ready for review (only GraphQL can do this).
pub async fn mark_ready(c: &Client, inst: u64, node_id: &str) -> Result<(), GithubError> {
    c.graphql(
        inst,
        "mutation($id: ID!) { markPullRequestReadyForReview(input: {pullRequestId: $id}) \
         { pullRequest { isDraft } } }",
        json!({ "id": node_id }),
    )
    .await
    .map(|_| ())
}

/// Posts a review (event `COMMENT`: the App neither approves nor blocks) with its line
/// comments; GitHub answers 422 when a comment's line is not in the diff.
pub async fn create_review(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    number: u64,
    body: &str,
    comments: &[super::review::LineComment],
) -> Result<(), GithubError> {
    let mut review = json!({ "body": body, "event": "COMMENT" });
    if !comments.is_empty() {
        review["comments"] = json!(comments);
    }
    c.create(
        inst,
        "/repos/{o}/{r}/pulls/{n}/reviews",
        &format!("/repos/{repo}/pulls/{number}/reviews"),
        &review,
    )
    .await
    .map(|_| ())
}

/// The files a pull request changes, each with its `patch` (absent for a binary file or
/// a diff too large to show): `GET /repos/{owner}/{repo}/pulls/{pull_number}/files`,
/// every page.
pub async fn pull_files(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    number: u64,
) -> Result<Vec<(String, Option<String>)>, GithubError> {
    let list: Vec<Value> = c
        .list(
            inst,
            "/repos/{o}/{r}/pulls/{n}/files",
            &format!("/repos/{repo}/pulls/{number}/files?per_page=100"),
            None,
        )
        .await?;
    Ok(list
        .iter()
        .filter_map(|f| {
            Some((
                f["filename"].as_str()?.to_string(),
                f["patch"].as_str().map(str::to_string),
            ))
        })
        .collect())
}

/// An open issue carrying a label (from the issue list, pull requests left out).
#[derive(Debug, Clone)]
pub struct OpenIssue {
    pub number: u64,
    pub title: String,
    pub body: String,
    pub labels: Vec<String>,
    /// The issue's author.
    pub author: Option<String>,
}

pub async fn open_issues_with_label(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    label: &str,
) -> Result<Vec<OpenIssue>, GithubError> {
    let list: Vec<Value> = c
        .list(
            inst,
            "/repos/{o}/{r}/issues",
            &format!(
                "/repos/{repo}/issues?state=open&labels={}&per_page=100",
                urlencode(label)
            ),
            None,
        )
        .await?;
    Ok(list
        .iter()
        .filter(|i| i.get("pull_request").is_none_or(Value::is_null))
        .map(|i| OpenIssue {
            number: i["number"].as_u64().unwrap_or(0),
            title: i["title"].as_str().unwrap_or("").to_string(),
            body: i["body"].as_str().unwrap_or("").to_string(),
            labels: names(&i["labels"]),
            author: i["user"]["login"].as_str().map(str::to_string),
        })
        .collect())
}

/// An installation of the App.
#[derive(Debug, Clone)]
pub struct Installation {
    pub id: u64,
}

pub async fn installations(c: &Client) -> Result<Vec<Installation>, GithubError> {
    let list: Vec<Value> = c
        .app_list("/app/installations", "/app/installations?per_page=100")
        .await?;
    Ok(list
        .iter()
        .filter_map(|i| i["id"].as_u64().map(|id| Installation { id }))
        .collect())
}

/// What the owner of installation `inst` granted the App on `permission` (`"read"`,
/// `"write"`; `None` when not granted), from `GET /app/installations/{id}`'s
/// `permissions`.
pub async fn installation_permission(
    c: &Client,
    inst: u64,
    permission: &str,
) -> Result<Option<String>, GithubError> {
    let r = c
        .app_call(
            Method::GET,
            "/app/installations/{id}",
            &format!("/app/installations/{inst}"),
            None,
        )
        .await?;
    Ok(r.body["permissions"][permission]
        .as_str()
        .map(str::to_string))
}

/// Repositories an installation can reach.
pub async fn installation_repositories(
    c: &Client,
    inst: u64,
) -> Result<Vec<(RepoName, Option<String>)>, GithubError> {
    let list: Vec<Value> = c
        .list(
            inst,
            "/installation/repositories",
            "/installation/repositories?per_page=100",
            None,
        )
        .await?;
    Ok(list
        .iter()
        .filter_map(|x| {
            let repo = RepoName::parse(x["full_name"].as_str()?)?;
            Some((repo, x["default_branch"].as_str().map(str::to_string)))
        })
        .collect())
}

/// One of the App's recent webhook deliveries.
#[derive(Debug, Clone)]
pub struct HookDelivery {
    pub id: u64,
    pub guid: String,
    pub status_code: u64,
}

/// The App's recent webhook deliveries (`GET /app/hook/deliveries`, every page), read
/// into octocrab's [`octocrab::models::hooks::Delivery`].
pub async fn hook_deliveries(c: &Client) -> Result<Vec<HookDelivery>, GithubError> {
    let list: Vec<octocrab::models::hooks::Delivery> = c
        .app_list("/app/hook/deliveries", "/app/hook/deliveries?per_page=100")
        .await?;
    Ok(list
        .into_iter()
        .map(|d| HookDelivery {
            id: d.id.into_inner(),
            guid: d.guid,
            status_code: d.status_code as u64,
        })
        .collect())
}

pub async fn redeliver(c: &Client, id: u64) -> Result<(), GithubError> {
    c.app_call(
        Method::POST,
        "/app/hook/deliveries/{id}/attempts",
        &format!("/app/hook/deliveries/{id}/attempts"),
        None,
    )
    .await
    .map(|_| ())
}

/// Percent-encodes a path or query component.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Who last put `label` on an issue, if anyone: from the issue's events, every page
/// read (GitHub lists them oldest first, so the newest are on the last page).
pub async fn last_labeler(
    c: &Client,
    inst: u64,
    repo: &RepoName,
    issue: u64,
    label: &str,
) -> Result<Option<(String, bool)>, GithubError> {
    let events: Vec<Value> = c
        .list(
            inst,
            "/repos/{o}/{r}/issues/{n}/events",
            &format!("/repos/{repo}/issues/{issue}/events?per_page=100"),
            None,
        )
        .await?;
    Ok(Some(events).and_then(|events| {
        events
            .iter()
            .rev()
            .find(|e| e["event"] == "labeled" && e["label"]["name"] == label)
            .and_then(|e| {
                let login = e["actor"]["login"].as_str()?.to_string();
                let bot = e["actor"]["type"] == "Bot";
                Some((login, bot))
            })
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_write_maintain_and_admin_may_steer_the_agent() {
        for role in ["admin", "maintain", "write"] {
            assert!(super::can_write(role), "{role}");
        }
        for role in ["triage", "read", "none", "", "Admin", "write "] {
            assert!(!super::can_write(role), "{role}");
        }
    }
}
