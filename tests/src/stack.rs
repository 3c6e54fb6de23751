//! The production-shaped stack the Nomad + GitHub tests share: the fake GitHub App with
//! one installation ([`INSTALLATION`]) holding one repository ([`REPO`]) where `alice` may
//! write, the fake Nomad with the sandbox job of each capability registered from
//! `nomad/sandbox.nomad.hcl`, and a [`Cluster`] whose workers use the `nomad` driver
//! against it and whose coordinator is the App's (webhooks from the fake GitHub go to it).
//! The daemons are not started: each test starts what it needs.

use crate::fake_github::FakeGithub;
use crate::fake_nomad::{jobspec, FakeNomad, Image, Options};
use crate::{bin, free_port, Cluster};
use anyhow::Result;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository of the stack.
pub const REPO: &str = "acme/widgets";
/// The App's installation on `acme`.
pub const INSTALLATION: u64 = 7;
/// The App's id.
pub const APP_ID: u64 = 4242;
/// The Nomad ACL token the workers present.
pub const NOMAD_TOKEN: &str = "nomad-acl-token-5f1c";
/// The sandbox image `nomad/sandbox.nomad.hcl` names by default.
pub const SANDBOX_IMAGE: &str = "ghcr.io/agent-orchestrator/sandbox:0.1.0";

/// The fake Nomad's settings for a stack in `dir`: `slots` allocations at once, the ACL
/// token required, the sandbox image made of the built `worker` binary (as the runner)
/// and the host's tools, and `dir` shown in every sandbox (the tests' scripted agents).
pub fn nomad_options(dir: &Path, slots: usize) -> Options {
    let mut images = HashMap::new();
    images.insert(
        SANDBOX_IMAGE.to_string(),
        Image {
            binds: vec![(bin("worker"), PathBuf::from("/image/bin/worker"))],
            path: "/image/bin:/usr/local/bin:/usr/bin:/bin".into(),
        },
    );
    Options {
        slots,
        token: Some(NOMAD_TOKEN.into()),
        images,
        volumes: vec![(dir.to_path_buf(), true)],
        ..Options::default()
    }
}

/// The settings that put a worker on the `nomad` driver against the fake at `addr`.
pub fn nomad_env(addr: &str) -> Vec<(String, String)> {
    [
        ("AO__SANDBOX__DRIVER", "nomad"),
        ("AO__NOMAD__ADDR", addr),
        ("AO__NOMAD__TOKEN", "env:AO_TEST_NOMAD_TOKEN"),
        ("AO_TEST_NOMAD_TOKEN", NOMAD_TOKEN),
        ("AO__NOMAD__WAIT_SECS", "10"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The fake GitHub, the fake Nomad and the cluster between them.
pub struct NomadGithub {
    pub gh: FakeGithub,
    pub nomad: FakeNomad,
    pub c: Cluster,
    /// The fake Nomad's address (`http://127.0.0.1:<port>`).
    pub nomad_addr: String,
    /// Holds the fake GitHub's repositories and the App key.
    _tmp: tempfile::TempDir,
}

/// What a [`NomadGithub`] is made with.
#[derive(Default)]
pub struct StackOptions<'a> {
    /// The pipeline of the plain `agent` label (`None`: the coordinator's default).
    pub pipeline: Option<&'a str>,
    /// Capabilities whose sandbox job is registered (none given: `coder`).
    pub capabilities: &'a [&'a str],
    /// The sandbox job's `extra_env` (env-file lines `NAME="value"`).
    pub sandbox_env: &'a str,
    /// More settings for every daemon; they override the stack's.
    pub env: Vec<(String, String)>,
}

impl NomadGithub {
    /// Starts the fakes and makes the cluster (no daemon started).
    pub async fn start(o: StackOptions<'_>) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let gh = FakeGithub::start(tmp.path(), APP_ID).await?;
        gh.add_installation(INSTALLATION, "acme");
        gh.add_repo(INSTALLATION, REPO, &[]);
        gh.set_role(REPO, "alice", "write");
        let port = free_port();
        let nomad_addr = format!("http://127.0.0.1:{port}");
        let mut env = nomad_env(&nomad_addr);
        env.extend(o.env);
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let c = gh.cluster(o.pipeline, &refs);
        let nomad = FakeNomad::start_on(port, nomad_options(c.dir.path(), 2)).await?;
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nomad/sandbox.nomad.hcl");
        let capabilities: &[&str] = if o.capabilities.is_empty() {
            &["coder"]
        } else {
            o.capabilities
        };
        for capability in capabilities {
            let job = jobspec::load(
                &path,
                &[("capability", capability), ("extra_env", o.sandbox_env)],
            )?;
            nomad.register(job).await?;
        }
        Ok(Self {
            gh,
            nomad,
            c,
            nomad_addr,
            _tmp: tmp,
        })
    }
}
