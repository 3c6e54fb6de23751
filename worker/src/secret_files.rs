//! The host files that hold secrets of this deployment, which every sandbox must not see:
//! every `file:` secret reference anywhere in the configuration (found by walking the
//! whole configuration, whatever setting it belongs to: `api.token`,
//! `github.webhook_secrets`, `nomad.token`, …), and every `file:` reference the worker
//! actually resolves ([`Recording`] notes them as they are resolved).

use ao_shared::config::Settings;
use ao_shared::secret::{SecretError, SecretRef, SecretResolver};
use async_trait::async_trait;
use parking_lot::Mutex;
use secrecy::SecretString;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

/// The secret files known so far; cheap to clone (one shared set).
#[derive(Clone, Debug, Default)]
pub struct SecretFiles(Arc<Mutex<BTreeSet<PathBuf>>>);

impl SecretFiles {
    /// Every `file:` secret reference of `settings`.
    pub fn from_settings(settings: &Settings) -> Self {
        let files = Self::default();
        if let Ok(value) = serde_json::to_value(settings) {
            files.collect(&value);
        }
        files
    }

    /// Notes the file of every string of `value` that reads as a `file:` secret
    /// reference (a `file://` URL is not one).
    fn collect(&self, value: &serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::String(s) if !s.starts_with("file://") => {
                if let Ok(SecretRef::File(path)) = s.parse::<SecretRef>() {
                    self.record(path);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| self.collect(v)),
            Value::Object(map) => map.values().for_each(|v| self.collect(v)),
            _ => {}
        }
    }

    /// Adds a file.
    pub fn record(&self, path: PathBuf) {
        self.0.lock().insert(path);
    }

    /// The files, as configured (not canonical).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.0.lock().iter().cloned().collect()
    }
}

/// A resolver that notes every `file:` reference it resolves in a [`SecretFiles`].
pub struct Recording {
    pub inner: Arc<dyn SecretResolver>,
    pub files: SecretFiles,
}

#[async_trait]
impl SecretResolver for Recording {
    async fn resolve(&self, reference: &SecretRef) -> Result<SecretString, SecretError> {
        if let SecretRef::File(path) = reference {
            self.files.record(path.clone());
        }
        self.inner.resolve(reference).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_reference_of_the_settings_is_found() {
        let mut s = Settings::default();
        s.github.webhook_secrets = vec![
            "file:/run/a/one".parse().unwrap(),
            "env:NOT_A_FILE".parse().unwrap(),
        ];
        s.nomad.token = Some("file:/run/a/nomad".parse().unwrap());
        s.api.token = Some("file:/run/a/api".parse().unwrap());
        let files = SecretFiles::from_settings(&s).paths();
        for p in ["/run/a/one", "/run/a/nomad", "/run/a/api"] {
            assert!(
                files.contains(&PathBuf::from(p)),
                "{p} missing in {files:?}"
            );
        }
        assert_eq!(files.len(), 3, "{files:?}");
    }

    #[tokio::test]
    async fn resolved_files_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "value-1234").unwrap();
        let files = SecretFiles::default();
        let r = Recording {
            inner: Arc::new(ao_shared::secret::LocalSecrets),
            files: files.clone(),
        };
        r.resolve(&SecretRef::File(path.clone())).await.unwrap();
        assert_eq!(files.paths(), vec![path]);
    }
}
