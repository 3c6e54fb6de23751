//! Workload identities as Nomad issues them: the fake's keyring is one RSA key (made with
//! openssl at start); each task's `identity` blocks (`Identities` in the API job) get a
//! JWT signed RS256 with the key's ID in the header and Nomad's documented claims
//! (`nomad_namespace`, `nomad_job_id`, `nomad_allocation_id`, `nomad_task`, `aud`,
//! `iat`, `nbf`, `exp`, `sub`), exposed to the task as `NOMAD_TOKEN_<name>` (`env = true`)
//! and `secrets/nomad_<name>.jwt` (`file = true`). The public key is served as a JWKS at
//! `/.well-known/jwks.json`, as Nomad serves it.

use anyhow::{bail, Context, Result};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::Path;

/// Lifetime of an identity without `ttl`.
const DEFAULT_TTL_SECS: u64 = 3600;

/// The signing key and its public half as a JWK.
pub struct Keyring {
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

/// One identity issued to a task: its name, the JWT, and where it goes.
pub struct Issued {
    pub name: String,
    pub jwt: String,
    pub env: bool,
    pub file: bool,
}

impl Keyring {
    /// Makes a fresh 2048-bit RSA key under `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        let (path, _) = crate::fake_github::generate_app_key(dir)?;
        let pem = std::fs::read(&path)?;
        let out = std::process::Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&path)
            .output()
            .context("openssl runs")?;
        if !out.status.success() {
            bail!(
                "openssl rsa -modulus: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        let modulus = hex::decode(text.trim().trim_start_matches("Modulus=").to_lowercase())?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let kid = uuid::Uuid::new_v4().to_string();
        let jwk = json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": b64.encode(&modulus), "e": b64.encode([1u8, 0, 1]),
        });
        Ok(Self {
            kid,
            key: EncodingKey::from_rsa_pem(&pem)?,
            jwk,
        })
    }

    /// `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// Signs any claims with the keyring (also for tests that forge or alter identities).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap_or_default()
    }

    /// The identities of `task` (the API job's task) in allocation `alloc` of `job`.
    pub fn issue(&self, job: &Value, task: &Value, alloc: &str) -> Vec<Issued> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let namespace = job["Namespace"].as_str().unwrap_or("default");
        let job_id = job["ID"].as_str().unwrap_or_default();
        let task_name = task["Name"].as_str().unwrap_or_default();
        task["Identities"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                let ttl = i["TTL"]
                    .as_u64()
                    .filter(|ns| *ns > 0)
                    .map_or(DEFAULT_TTL_SECS, |ns| ns / 1_000_000_000);
                let claims = json!({
                    "nomad_namespace": namespace,
                    "nomad_job_id": job_id,
                    "nomad_allocation_id": alloc,
                    "nomad_task": task_name,
                    "aud": i["Audience"].clone(),
                    "sub": format!("global:{namespace}:{job_id}:{}:{task_name}:{}",
                        job["TaskGroups"][0]["Name"].as_str().unwrap_or_default(),
                        i["Name"].as_str().unwrap_or("default")),
                    "iat": now, "nbf": now, "exp": now + ttl,
                });
                Issued {
                    name: i["Name"].as_str().unwrap_or("default").to_string(),
                    jwt: self.sign(&claims),
                    env: i["Env"] == json!(true),
                    file: i["File"] == json!(true),
                }
            })
            .collect()
    }
}
