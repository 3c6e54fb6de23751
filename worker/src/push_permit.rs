//! The push permit: the runner pushes only with the worker's word that the run's lease
//! still holds, given after a fresh, successful visibility extension.
//!
//! Why: a worker paused past its visibility timeout (SIGSTOP, a network stall) loses its
//! message to another worker, while its runner, a separate process, goes on. Without a
//! fence both runs of the attempt would push. With it the paused worker's runner waits for
//! an answer the stopped worker cannot give, and once the worker resumes it is refused,
//! because the extension fails: exactly one run of an attempt pushes.
//!
//! The handshake uses the runner's standard streams, which only the worker holds:
//! - the worker starts the runner with [`ENV`] set and its standard input a pipe;
//! - the runner prints one event line of kind [`REQUEST_KIND`] on standard output (the
//!   event stream) and blocks reading one line from standard input;
//! - the worker takes that line out of the event stream, calls
//!   [`crate::heartbeat::Lease::confirm`], and writes [`Answer`] as one JSON line.
//!
//! The agent cannot forge an answer: its standard input is never the runner's, and the
//! runner is not dumpable, so another process of the same user cannot open its pipes. A
//! request the agent might fake only triggers an extension. End of input (the worker is
//! gone) is a refusal.
//!
//! A Nomad sandbox's runner has no pipe to the worker: it asks at the worker's hand-over
//! instead (`<handover_url>/push`, with its workload identity; see
//! `sandbox/nomad/handover.rs`), once, and gets the same [`Answer`].
//!
//! A granted permit brings a git token minted at that moment when the run has one (a
//! GitHub task): the runner pushes with it, so a run longer than a token's lifetime still
//! pushes. The runner puts it in its environment in place of the first one, where its git
//! credential helper and its redaction read it.

use crate::heartbeat::Lease;
use crate::spec::GitCredentials;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::mpsc;

/// Set (to `stdin`) in the runner's environment when the worker answers permit requests
/// on its standard input.
pub const ENV: &str = "AO_PUSH_PERMIT";
/// The value of [`ENV`].
const ENV_VALUE: &str = "stdin";
/// The event kind of a request on the runner's standard output.
pub const REQUEST_KIND: &str = "push_permit_request";

/// The worker's answer, one JSON line.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub granted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A git token minted for this push, when the run has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_token: Option<String>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("granted", &self.granted)
            .field("reason", &self.reason)
            .field("git_token", &self.git_token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl Answer {
    fn refused(reason: String) -> Self {
        Self {
            granted: false,
            reason: Some(reason),
            git_token: None,
        }
    }
}

/// Confirms `lease` (when the run has one) and mints a fresh git token (when it has a
/// minted credential): the answer to one permit request.
pub async fn decide(lease: Option<&Lease>, credentials: &GitCredentials) -> Answer {
    if let Some(lease) = lease {
        if let Err(e) = lease.confirm().await {
            tracing::warn!(error = %e, "push refused: the lease is lost");
            return Answer::refused(e.to_string());
        }
    }
    let git_token = match credentials.mint().await {
        None => None,
        Some(Ok(token)) => Some(token.expose_secret().to_string()),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "push refused: no fresh git token");
            return Answer::refused(format!("cannot mint a git token for the push: {e}"));
        }
    };
    Answer {
        granted: true,
        reason: None,
        git_token,
    }
}

/// Sets up a runner command to ask for permits.
pub fn configure(cmd: &mut tokio::process::Command) {
    cmd.env(ENV, ENV_VALUE).stdin(std::process::Stdio::piped());
}

/// Answers every request arriving on `requests` by confirming `lease` (and minting a
/// fresh git token from `credentials`), on `stdin`, until the requests end. Runs beside
/// the runner.
pub async fn serve(
    lease: Lease,
    credentials: GitCredentials,
    mut stdin: ChildStdin,
    mut requests: mpsc::Receiver<()>,
) {
    while requests.recv().await.is_some() {
        let answer = decide(Some(&lease), &credentials).await;
        let mut line = serde_json::to_string(&answer).unwrap_or_else(|_| "{}".into());
        line.push('\n');
        if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
    }
}

/// In the runner: asks the worker for a permit and waits for it. `Ok` when granted (a
/// fresh git token, if any, is then in the runner's environment) or when the runner was
/// started with neither the handshake nor a hand-over; `Err` with the reason when refused.
pub fn ask() -> Result<(), String> {
    let answer = if std::env::var(ENV).ok().as_deref() == Some(ENV_VALUE) {
        crate::runner::emit(REQUEST_KIND, serde_json::json!({}));
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => return Err("the worker holding the lease is gone".into()),
            Ok(_) => serde_json::from_str::<Answer>(line.trim())
                .map_err(|e| format!("unreadable answer from the worker: {e}"))?,
        }
    } else if crate::sandbox::nomad::handover::active() {
        crate::sandbox::nomad::handover::ask_push()?
    } else {
        return Ok(());
    };
    match answer {
        Answer {
            granted: true,
            git_token,
            ..
        } => {
            if let Some(token) = git_token {
                // Read by the git credential helper and the redaction (both from the
                // environment); the runner's own threads do not touch the environment.
                std::env::set_var(crate::credentials::GIT_TOKEN_ENV, token);
            }
            Ok(())
        }
        Answer { reason, .. } => Err(reason.unwrap_or_else(|| "refused".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip() {
        for a in [
            Answer {
                granted: true,
                reason: None,
                git_token: Some("ghs_fresh".into()),
            },
            Answer::refused("lease lost".into()),
        ] {
            let text = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Answer>(&text).unwrap(), a);
            assert!(!format!("{a:?}").contains("ghs_fresh"));
        }
    }
}
