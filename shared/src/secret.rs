//! Secret references: config never holds a secret, only where to find it
//! (`env:NAME`, `file:/path`, `aws-sm:NAME_OR_ARN`). Resolved values are `SecretString`s,
//! which do not print.

use async_trait::async_trait;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a secret lives.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
    AwsSecretsManager(String),
}

/// A reference or a resolution that failed. Never carries the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "invalid secret reference {0:?}: expected env:NAME, file:/path or aws-sm:NAME_OR_ARN \
         (secrets are never written into config directly)"
    )]
    Invalid(String),
    #[error("secret {reference}: environment variable is not set")]
    MissingEnv { reference: String },
    #[error("secret {reference}: cannot read file: {source}")]
    File {
        reference: String,
        source: std::io::Error,
    },
    #[error("secret {reference} is empty")]
    Empty { reference: String },
    #[error("secret {reference}: {message}")]
    Backend { reference: String, message: String },
}

impl FromStr for SecretRef {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || SecretError::Invalid(redact_ref(s));
        let (scheme, rest) = s.split_once(':').ok_or_else(invalid)?;
        if rest.is_empty() {
            return Err(invalid());
        }
        match scheme {
            "env" => Ok(SecretRef::Env(rest.to_string())),
            "file" => Ok(SecretRef::File(PathBuf::from(rest))),
            "aws-sm" => Ok(SecretRef::AwsSecretsManager(rest.to_string())),
            _ => Err(invalid()),
        }
    }
}

/// A value that failed to parse as a reference may be a pasted secret: show only its shape.
fn redact_ref(s: &str) -> String {
    match s.split_once(':') {
        Some((scheme, _)) if scheme.len() <= 8 => format!("{scheme}:…"),
        _ => format!("<{} characters>", s.chars().count()),
    }
}

impl TryFrom<String> for SecretRef {
    type Error = SecretError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SecretRef> for String {
    fn from(r: SecretRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
            SecretRef::AwsSecretsManager(n) => write!(f, "aws-sm:{n}"),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRef({self})")
    }
}

/// Resolves secret references to values.
#[async_trait]
pub trait SecretResolver: Send + Sync {
    async fn resolve(&self, reference: &SecretRef) -> Result<SecretString, SecretError>;
}

/// Resolves `env:` and `file:` references; `aws-sm:` needs the AWS resolver.
#[derive(Clone, Debug, Default)]
pub struct LocalSecrets;

impl LocalSecrets {
    /// Resolves an `env:` or `file:` reference synchronously.
    pub fn resolve_now(reference: &SecretRef) -> Result<SecretString, SecretError> {
        let name = reference.to_string();
        let value = match reference {
            SecretRef::Env(var) => std::env::var(var).map_err(|_| SecretError::MissingEnv {
                reference: name.clone(),
            })?,
            SecretRef::File(path) => {
                std::fs::read_to_string(path).map_err(|source| SecretError::File {
                    reference: name.clone(),
                    source,
                })?
            }
            SecretRef::AwsSecretsManager(_) => {
                return Err(SecretError::Backend {
                    reference: name,
                    message: "aws-sm: references need the AWS secrets resolver".into(),
                })
            }
        };
        let value = value.trim_end_matches(['\n', '\r']).to_string();
        if value.is_empty() {
            return Err(SecretError::Empty { reference: name });
        }
        Ok(SecretString::from(value))
    }
}

#[async_trait]
impl SecretResolver for LocalSecrets {
    async fn resolve(&self, reference: &SecretRef) -> Result<SecretString, SecretError> {
        Self::resolve_now(reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn parses_the_three_schemes() {
        assert_eq!(
            "env:TOKEN".parse::<SecretRef>().unwrap(),
            SecretRef::Env("TOKEN".into())
        );
        assert_eq!(
            "file:/run/s".parse::<SecretRef>().unwrap(),
            SecretRef::File("/run/s".into())
        );
        assert_eq!(
            "aws-sm:arn:aws:secretsmanager:eu-west-1:1:secret:x"
                .parse::<SecretRef>()
                .unwrap(),
            SecretRef::AwsSecretsManager("arn:aws:secretsmanager:eu-west-1:1:secret:x".into())
        );
    }

    #[test]
    fn an_inlined_secret_is_refused_without_echoing_it() {
        let err = "ghp_supersecretvalue"
            .parse::<SecretRef>()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("supersecret"), "{err}");
        let err = "token:supersecret"
            .parse::<SecretRef>()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("supersecret"), "{err}");
    }

    #[test]
    fn file_secrets_are_trimmed_and_empty_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "hunter2\n").unwrap();
        let v = LocalSecrets::resolve_now(&SecretRef::File(path.clone())).unwrap();
        assert_eq!(v.expose_secret(), "hunter2");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            LocalSecrets::resolve_now(&SecretRef::File(path)),
            Err(SecretError::Empty { .. })
        ));
        assert!(matches!(
            LocalSecrets::resolve_now(&SecretRef::Env("AO_TEST_SURELY_UNSET_VAR".into())),
            Err(SecretError::MissingEnv { .. })
        ));
    }
}
