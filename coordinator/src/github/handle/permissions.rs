//! Who may act: the sender of a label, command or review needs write, maintain or admin
//! on the repository; others are told so once per issue.

use super::*;

/// Checks the sender's role; tells them once per issue when it is not enough.
pub(super) async fn permitted(
    gh: &Github,
    ctx: &Context,
    issue: u64,
    what: &str,
) -> Result<bool, HandleError> {
    let inst = ctx.installation_id.unwrap_or_default();
    let c = &gh.client;
    let role = api::permission(c, inst, &ctx.repo, &ctx.sender.login).await?;
    if api::can_write(&role) {
        return Ok(true);
    }
    tracing::info!(sender = %ctx.sender.login, role = %role, "sender may not steer the agent");
    let key = Once::AccessDenied {
        repo: &ctx.repo,
        issue,
        login: &ctx.sender.login,
    }
    .key();
    if gh.store.record_delivery(&key).await? {
        let text = format!(
            "@{} you need write, maintain or admin access to this repository to {what}; \
             your access is `{role}`, so the agent did nothing. Someone with write access can \
             add the label or comment `/agent run`.",
            ctx.sender.login
        );
        api::answer(c, inst, &ctx.repo, issue, &text).await?;
    }
    Ok(false)
}
