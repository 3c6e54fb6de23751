//! The agent registry: one Claude Code profile per capability. Built-in profiles live in
//! `worker/profiles/*.toml` (compiled in); `agent.profiles_dir` replaces any of them with
//! `<capability>.toml` files; `[agent.profiles.<capability>]` overrides single fields.
//! Everything is checked once at start-up, so a bad profile stops the worker, not a run.

use ao_shared::capability::Capability;
use ao_shared::config::AgentSettings;
use ao_shared::profile::{AgentProfile, ProfileError};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A profile that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read profile {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("profile {origin} is not valid: {message}")]
    Parse { origin: String, message: String },
    #[error("profile of {capability}: {source}")]
    Invalid {
        capability: Capability,
        source: ProfileError,
    },
}

fn builtin(capability: Capability) -> &'static str {
    match capability {
        Capability::Planner => include_str!("../profiles/planner.toml"),
        Capability::Coder => include_str!("../profiles/coder.toml"),
        Capability::Tester => include_str!("../profiles/tester.toml"),
        Capability::Reviewer => include_str!("../profiles/reviewer.toml"),
        Capability::Docs => include_str!("../profiles/docs.toml"),
    }
}

/// The resolved profile of every capability.
#[derive(Clone, Debug)]
pub struct Profiles(BTreeMap<Capability, AgentProfile>);

impl Profiles {
    pub fn load(settings: &AgentSettings) -> Result<Self, LoadError> {
        let mut all = BTreeMap::new();
        for capability in Capability::ALL {
            let file = settings
                .profiles_dir
                .as_ref()
                .map(|d| d.join(format!("{capability}.toml")))
                .filter(|p| p.is_file());
            let (text, origin) = match &file {
                Some(path) => (
                    std::fs::read_to_string(path).map_err(|source| LoadError::Read {
                        path: path.clone(),
                        source,
                    })?,
                    path.display().to_string(),
                ),
                None => (
                    builtin(capability).to_string(),
                    format!("built-in {capability}"),
                ),
            };
            let mut profile: AgentProfile =
                toml::from_str(&text).map_err(|e| LoadError::Parse {
                    origin,
                    message: e.to_string(),
                })?;
            if let Some(o) = settings.profiles.get(&capability) {
                profile.apply(o);
            }
            profile
                .validate()
                .map_err(|source| LoadError::Invalid { capability, source })?;
            all.insert(capability, profile);
        }
        Ok(Self(all))
    }

    pub fn get(&self, capability: Capability) -> &AgentProfile {
        // `load` fills every capability, so the entry exists.
        &self.0[&capability]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ao_shared::profile::ProfileOverride;

    #[test]
    fn built_in_profiles_load_and_keep_readers_read_only() {
        let p = Profiles::load(&AgentSettings::default()).unwrap();
        for c in Capability::ALL {
            assert!(!p.get(c).system_prompt.is_empty(), "{c}");
        }
        let planner = p.get(Capability::Planner);
        assert!(!planner
            .tools
            .iter()
            .any(|t| t == "Write" || t == "Edit" || t == "Bash"));
        let reviewer = p.get(Capability::Reviewer);
        assert!(!reviewer.tools.iter().any(|t| t == "Write" || t == "Edit"));
        assert!(p.get(Capability::Coder).tools.iter().any(|t| t == "Edit"));
    }

    #[test]
    fn files_and_overrides_replace_built_ins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("docs.toml"),
            "system_prompt = \"write docs\"\nmax_turns = 3\n",
        )
        .unwrap();
        let mut s = AgentSettings {
            profiles_dir: Some(dir.path().to_path_buf()),
            ..AgentSettings::default()
        };
        s.profiles.insert(
            Capability::Docs,
            ProfileOverride {
                model: Some("claude-haiku-4-5".into()),
                ..Default::default()
            },
        );
        let p = Profiles::load(&s).unwrap();
        let docs = p.get(Capability::Docs);
        assert_eq!(docs.system_prompt, "write docs");
        assert_eq!(docs.max_turns, 3);
        assert_eq!(docs.model.as_deref(), Some("claude-haiku-4-5"));
        // Capabilities without a file keep the built-in profile.
        assert!(p.get(Capability::Coder).max_turns > 3);

        std::fs::write(dir.path().join("coder.toml"), "system_prompt = 1\n").unwrap();
        let err = Profiles::load(&s).unwrap_err().to_string();
        assert!(err.contains("coder.toml"), "{err}");
        s.profiles.insert(
            Capability::Docs,
            ProfileOverride {
                max_turns: Some(0),
                ..Default::default()
            },
        );
        std::fs::remove_file(dir.path().join("coder.toml")).unwrap();
        assert!(matches!(
            Profiles::load(&s),
            Err(LoadError::Invalid {
                capability: Capability::Docs,
                ..
            })
        ));
    }
}
