//! What a repository says about its setup (`[setup]` in its `.agent-orchestrator.toml`),
//! and the cache key of the setup's result.
//!
//! ```toml
//! [setup]
//! cache = ["node_modules", ".venv"]        # what agent-setup.sh produces
//! key = ["package-lock.json", "requirements.txt"]  # what it depends on
//! ```
//!
//! The key of a setup's result is a SHA-256 over the repository's identity, the setup
//! script, the cached paths and the contents of every key file, so the same key means the
//! same repository, the same script and the same inputs. Both the worker (reading its
//! mirror) and the runner (reading the working copy) compute it with [`cache_key`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The repository's setup script, run by the runner when present.
pub const SETUP_SCRIPT: &str = "agent-setup.sh";
/// The repository's own settings file.
pub const REPO_CONFIG_PATH: &str = ".agent-orchestrator.toml";
/// Most paths in `cache` or `key`.
pub const MAX_PATHS: usize = 32;

/// `[setup]` of a repository's `.agent-orchestrator.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SetupConfig {
    /// Paths (files or directories, relative to the repository root) the setup produces
    /// and the worker may restore instead of running it.
    pub cache: Vec<String>,
    /// Files (relative to the repository root) the setup's result depends on. The setup
    /// script is always part of the key.
    pub key: Vec<String>,
}

/// Why a `[setup]` table cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetupConfigError {
    #[error("setup.{0}: more than {MAX_PATHS} paths")]
    TooMany(&'static str),
    #[error("setup.{0}: {1:?} is not a plain relative path inside the repository")]
    BadPath(&'static str, String),
    #[error("setup.cache: {0:?} is the repository's .git")]
    GitDir(String),
}

impl SetupConfig {
    /// Checks that every path is relative, stays inside the repository, and is not `.git`.
    pub fn validate(&self) -> Result<(), SetupConfigError> {
        for (field, paths) in [("cache", &self.cache), ("key", &self.key)] {
            if paths.len() > MAX_PATHS {
                return Err(SetupConfigError::TooMany(field));
            }
            for p in paths {
                if !is_plain_relative(p) {
                    return Err(SetupConfigError::BadPath(field, p.clone()));
                }
            }
        }
        if let Some(p) = self
            .cache
            .iter()
            .find(|p| p.split('/').next() == Some(".git"))
        {
            return Err(SetupConfigError::GitDir(p.clone()));
        }
        Ok(())
    }

    /// `[setup]` out of the text of a `.agent-orchestrator.toml`: `None` when the file has
    /// none, asks to cache nothing, or is not valid (the run then simply runs its setup).
    pub fn from_repo_config(text: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct File {
            setup: Option<SetupConfig>,
        }
        // Other tables are the coordinator's to check; only `[setup]` matters here.
        let value: toml::Table = toml::from_str(text).ok()?;
        let setup = value.get("setup")?.clone();
        let file: File = toml::Table::from_iter([("setup".to_string(), setup)])
            .try_into()
            .ok()?;
        let setup = file.setup?;
        (setup.validate().is_ok() && !setup.cache.is_empty()).then_some(setup)
    }
}

/// A relative path of plain components: no `..`, `.`, empty component, leading `/`, or
/// control character.
fn is_plain_relative(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 512
        && !p.starts_with('/')
        && !p.chars().any(char::is_control)
        && p.trim_end_matches('/')
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The cache key of a setup's result: hex SHA-256 over `repository` (its identity, as
/// the worker names it), the setup script, the cached paths, and each key file with its
/// contents. `read` gives a file's contents at the commit the run starts from (`None`:
/// absent). Returns `None` when there is no setup script: nothing to cache.
pub fn cache_key(
    repository: &str,
    setup: &SetupConfig,
    read: &mut dyn FnMut(&str) -> Option<Vec<u8>>,
) -> Option<String> {
    let script = read(SETUP_SCRIPT)?;
    let mut h = Sha256::new();
    let field = |h: &mut Sha256, bytes: &[u8]| {
        // Length-prefixed, so that no two different inputs hash alike.
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(&mut h, b"agent-orchestrator setup cache v1");
    field(&mut h, repository.as_bytes());
    field(&mut h, &script);
    for p in &setup.cache {
        field(&mut h, b"cache");
        field(&mut h, p.as_bytes());
    }
    for p in &setup.key {
        field(&mut h, b"key");
        field(&mut h, p.as_bytes());
        match read(p) {
            Some(bytes) => {
                field(&mut h, b"present");
                field(&mut h, &bytes);
            }
            None => field(&mut h, b"absent"),
        }
    }
    Some(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SetupConfig {
        SetupConfig {
            cache: vec!["node_modules".into()],
            key: vec!["package-lock.json".into()],
        }
    }

    #[test]
    fn paths_must_stay_inside() {
        for bad in ["/etc", "../x", "a/../../b", "", "a//b", "./a", "a\nb"] {
            let c = SetupConfig {
                cache: vec![bad.into()],
                key: vec![],
            };
            assert!(c.validate().is_err(), "{bad:?} accepted");
        }
        let git = SetupConfig {
            cache: vec![".git/hooks".into()],
            key: vec![],
        };
        assert!(matches!(git.validate(), Err(SetupConfigError::GitDir(_))));
        assert!(config().validate().is_ok());
    }

    #[test]
    fn parsed_from_the_repository_file() {
        let text = "default_pipeline = \"x\"\n[setup]\ncache = [\"node_modules\"]\nkey = [\"package-lock.json\"]\n";
        assert_eq!(SetupConfig::from_repo_config(text), Some(config()));
        assert_eq!(SetupConfig::from_repo_config("[setup]\ncache = []\n"), None);
        assert_eq!(SetupConfig::from_repo_config("[setup]\nbogus = 1\n"), None);
        assert_eq!(
            SetupConfig::from_repo_config("[setup]\ncache = [\"../x\"]\n"),
            None
        );
    }

    #[test]
    fn key_depends_on_repository_script_and_key_files() {
        let files = |lock: &'static str| {
            move |p: &str| match p {
                SETUP_SCRIPT => Some(b"npm ci".to_vec()),
                "package-lock.json" => Some(lock.as_bytes().to_vec()),
                _ => None,
            }
        };
        let k = |repo: &str, lock: &'static str| cache_key(repo, &config(), &mut files(lock));
        let a = k("file:///a.git", "v1").unwrap();
        assert_eq!(a, k("file:///a.git", "v1").unwrap());
        assert_ne!(a, k("file:///b.git", "v1").unwrap());
        assert_ne!(a, k("file:///a.git", "v2").unwrap());
        assert_eq!(cache_key("r", &config(), &mut |_| None), None);
    }
}
