//! Run-once keys: the GitHub effects that must happen at most once (a notice, a review,
//! a task started by a command or the sweep) are recorded in the state store's delivery
//! table under one of these keys before, or together with, the effect.
//!
//! Every key has its own variant, so two kinds can never collide and a reader sees all
//! of them here. [`Once::key`] renders the same text earlier versions recorded, so keys
//! already stored still count.

use crate::webhook::event::RepoName;
use ao_shared::ids::{DeliveryId, SubtaskId, TaskId};

/// One effect that happens at most once.
#[derive(Clone, Copy, Debug)]
pub enum Once<'a> {
    /// Telling a sender on an issue that they lack write access.
    AccessDenied {
        repo: &'a RepoName,
        issue: u64,
        login: &'a str,
    },
    /// Telling an issue that the monthly budget is used up (`month`: `YYYY-MM`).
    BudgetRefused {
        repo: &'a RepoName,
        issue: u64,
        month: &'a str,
    },
    /// The task started by `/agent run` on an issue after its task `after` (none yet: `None`).
    Run {
        repo: &'a RepoName,
        issue: u64,
        after: Option<TaskId>,
    },
    /// The task started by the missed-delivery sweep for a labelled issue.
    Sweep { repo: &'a RepoName, issue: u64 },
    /// Telling a pull request that its review rounds are used up.
    ReviewLimit { repo: &'a RepoName, pull: u64 },
    /// Telling an issue that its request waits for a free slot.
    Waiting { repo: &'a RepoName, issue: u64 },
    /// Announcing that an installation crossed `percent` of its budget in `month`.
    BudgetNotice {
        installation: u64,
        month: &'a str,
        percent: u32,
    },
    /// Posting the reviewer's findings of one attempt as a pull-request review.
    Review {
        task: TaskId,
        subtask: SubtaskId,
        attempt: u32,
    },
    /// Posting the planner's plan of one attempt on the issue.
    Plan {
        task: TaskId,
        subtask: SubtaskId,
        attempt: u32,
    },
    /// Explaining a push refused for want of the `workflows` permission.
    WorkflowsNotice { task: TaskId },
    /// Telling an issue that a bot not in `github.allowed_bots` starts nothing there.
    BotRefused {
        repo: &'a RepoName,
        issue: u64,
        login: &'a str,
    },
    /// The one answer to a delivery that starts nothing (a closed issue, a label on a
    /// pull request).
    Answer { delivery: &'a DeliveryId },
    /// The round that fixes the checks failing on commit `sha` of an agent's branch.
    CiRound {
        repo: &'a RepoName,
        branch: &'a str,
        sha: &'a str,
    },
    /// Telling a pull request that its rounds of fixing checks are used up.
    CiLimit { repo: &'a RepoName, pull: u64 },
}

impl Once<'_> {
    /// The key recorded in the state store.
    pub fn key(&self) -> DeliveryId {
        DeliveryId::new(match self {
            Once::AccessDenied { repo, issue, login } => format!("denied:{repo}#{issue}:{login}"),
            Once::BudgetRefused { repo, issue, month } => {
                format!("refused:{repo}#{issue}:{month}")
            }
            Once::Run { repo, issue, after } => format!(
                "run:{repo}#{issue}:{}",
                after.map(|t| t.to_string()).unwrap_or_default()
            ),
            Once::Sweep { repo, issue } => format!("reconcile:{repo}#{issue}"),
            Once::ReviewLimit { repo, pull } => format!("review-limit:{repo}#{pull}"),
            Once::Waiting { repo, issue } => format!("waiting:{repo}#{issue}"),
            Once::BudgetNotice {
                installation,
                month,
                percent,
            } => format!("budget:{installation}:{month}:{percent}"),
            Once::Review {
                task,
                subtask,
                attempt,
            } => format!("review:{task}:{subtask}:{attempt}"),
            Once::Plan {
                task,
                subtask,
                attempt,
            } => format!("plan:{task}:{subtask}:{attempt}"),
            Once::WorkflowsNotice { task } => format!("workflows-notice:{task}"),
            Once::BotRefused { repo, issue, login } => format!("bot:{repo}#{issue}:{login}"),
            Once::Answer { delivery } => format!("answer:{delivery}"),
            Once::CiRound { repo, branch, sha } => format!("ci-round:{repo}:{branch}:{sha}"),
            Once::CiLimit { repo, pull } => format!("ci-limit:{repo}#{pull}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_as_the_ones_already_stored() {
        let repo = RepoName::parse("acme/widgets").unwrap();
        let cases = [
            (
                Once::AccessDenied {
                    repo: &repo,
                    issue: 3,
                    login: "mallory",
                },
                "denied:acme/widgets#3:mallory",
            ),
            (
                Once::Run {
                    repo: &repo,
                    issue: 3,
                    after: None,
                },
                "run:acme/widgets#3:",
            ),
            (
                Once::Sweep {
                    repo: &repo,
                    issue: 9,
                },
                "reconcile:acme/widgets#9",
            ),
            (
                Once::BudgetNotice {
                    installation: 7,
                    month: "2026-11",
                    percent: 90,
                },
                "budget:7:2026-11:90",
            ),
        ];
        for (once, key) in cases {
            assert_eq!(once.key().as_str(), key);
        }
    }
}
