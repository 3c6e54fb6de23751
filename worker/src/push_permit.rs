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
//! gone) is a refusal. A runner started without [`ENV`] (the Nomad driver, whose runner
//! has no pipe to the worker) pushes unfenced, as before.

use crate::heartbeat::Lease;
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub granted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Sets up a runner command to ask for permits.
pub fn configure(cmd: &mut tokio::process::Command) {
    cmd.env(ENV, ENV_VALUE).stdin(std::process::Stdio::piped());
}

/// Answers every request arriving on `requests` by confirming `lease`, on `stdin`, until
/// the requests end. Runs beside the runner.
pub async fn serve(lease: Lease, mut stdin: ChildStdin, mut requests: mpsc::Receiver<()>) {
    while requests.recv().await.is_some() {
        let answer = match lease.confirm().await {
            Ok(()) => Answer {
                granted: true,
                reason: None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "push refused: the lease is lost");
                Answer {
                    granted: false,
                    reason: Some(e.to_string()),
                }
            }
        };
        let mut line = serde_json::to_string(&answer).unwrap_or_else(|_| "{}".into());
        line.push('\n');
        if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
    }
}

/// In the runner: asks the worker for a permit and waits for it. `Ok` when granted or when
/// the runner was started without the handshake; `Err` with the reason when refused.
pub fn ask() -> Result<(), String> {
    if std::env::var(ENV).ok().as_deref() != Some(ENV_VALUE) {
        return Ok(());
    }
    crate::runner::emit(REQUEST_KIND, serde_json::json!({}));
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(0) | Err(_) => Err("the worker holding the lease is gone".into()),
        Ok(_) => match serde_json::from_str::<Answer>(line.trim()) {
            Ok(Answer { granted: true, .. }) => Ok(()),
            Ok(Answer { reason, .. }) => Err(reason.unwrap_or_else(|| "refused".into())),
            Err(e) => Err(format!("unreadable answer from the worker: {e}")),
        },
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
            },
            Answer {
                granted: false,
                reason: Some("lease lost".into()),
            },
        ] {
            let text = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Answer>(&text).unwrap(), a);
        }
    }
}
