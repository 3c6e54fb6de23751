//! Preconditions of the worker's configuration that can be known at start: a worker that
//! could only fail every task it receives refuses to start, saying why, instead of
//! receiving work and failing each attempt.

use crate::profile::Profiles;
use ao_shared::capability::Capability;
use ao_shared::config::{AgentKind, SandboxDriverKind, Settings};

/// The permission mode Claude Code refuses to run in as root (it is the mode of
/// `--dangerously-skip-permissions`; Claude Code's documentation of permission modes).
const BYPASS_MODE: &str = "bypassPermissions";

/// A configuration this worker cannot serve on this host.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "the {capabilities} profile(s) run Claude Code with permission_mode = \"{BYPASS_MODE}\", \
         which Claude Code refuses as root, and sandbox.driver = \"process\" would run it as \
         this worker's user, root: every attempt would fail. Run the worker as an ordinary \
         user, or use sandbox.driver = \"bwrap\" (the agent then runs as sandbox.uid)"
    )]
    BypassAsRoot { capabilities: String },
}

/// Whether `agent.command` is the Claude Code CLI itself (`claude`, by name or path), not
/// another program that speaks its stream-json.
fn is_claude_code(command: &str) -> bool {
    std::path::Path::new(command)
        .file_name()
        .is_some_and(|name| name == "claude")
}

/// Checks what is known before any task arrives. `euid` is the worker's effective user id.
pub fn check(settings: &Settings, profiles: &Profiles, euid: u32) -> Result<(), PreflightError> {
    let runs_as_worker_user = settings.sandbox.driver == SandboxDriverKind::Process;
    if runs_as_worker_user
        && euid == 0
        && settings.agent.kind == AgentKind::Claude
        && is_claude_code(&settings.agent.command)
    {
        let refused: Vec<Capability> = settings
            .worker
            .capabilities
            .iter()
            .copied()
            .filter(|c| profiles.get(*c).permission_mode == BYPASS_MODE)
            .collect();
        if !refused.is_empty() {
            let capabilities = refused
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(PreflightError::BypassAsRoot { capabilities });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(driver: SandboxDriverKind, kind: AgentKind) -> Settings {
        let mut s = Settings::default();
        s.sandbox.driver = driver;
        s.agent.kind = kind;
        s
    }

    #[test]
    fn claude_in_bypass_mode_as_root_under_the_process_driver_is_refused() {
        let s = settings(SandboxDriverKind::Process, AgentKind::Claude);
        let profiles = Profiles::load(&s.agent).unwrap();
        let err = check(&s, &profiles, 0).unwrap_err().to_string();
        assert!(err.contains("coder"), "{err}");
        assert!(err.contains("ordinary user"), "{err}");
        // The same configuration is fine for an ordinary user, under bwrap, or with a
        // command agent.
        assert!(check(&s, &profiles, 1000).is_ok());
        let bwrap = settings(SandboxDriverKind::Bwrap, AgentKind::Claude);
        assert!(check(&bwrap, &profiles, 0).is_ok());
        let command = settings(SandboxDriverKind::Process, AgentKind::Command);
        assert!(check(&command, &profiles, 0).is_ok());
        // By path too; another program speaking stream-json is not Claude Code.
        let mut by_path = settings(SandboxDriverKind::Process, AgentKind::Claude);
        by_path.agent.command = "/usr/local/bin/claude".into();
        assert!(check(&by_path, &profiles, 0).is_err());
        by_path.agent.command = "/srv/fake-agent.sh".into();
        assert!(check(&by_path, &profiles, 0).is_ok());
    }

    #[test]
    fn a_profile_out_of_bypass_mode_is_not_refused() {
        let mut s = settings(SandboxDriverKind::Process, AgentKind::Claude);
        s.worker.capabilities = vec![Capability::Planner];
        s.agent.profiles.insert(
            Capability::Planner,
            ao_shared::profile::ProfileOverride {
                permission_mode: Some("plan".into()),
                ..Default::default()
            },
        );
        let profiles = Profiles::load(&s.agent).unwrap();
        assert!(check(&s, &profiles, 0).is_ok());
    }
}
