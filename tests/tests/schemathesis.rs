//! The REST API against its own OpenAPI description (`GET /api/v1/openapi.json`), with
//! schemathesis (PyPI; `make test` installs it) run on a live coordinator and worker: no
//! request may get a 5xx, and every response must conform to the description (status,
//! content type, headers, body schema), refuse invalid input, and need the token.
//! `positive_data_acceptance` is left out: the description cannot say everything the
//! server checks (a repository must be a git URL or an absolute path; a cursor must be one
//! the server returned), so some schema-valid requests are rightly refused with 4xx.

use ao_tests::{script, Cluster, TOKEN};
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn the_api_conforms_to_its_openapi_description() {
    let mut c = Cluster::new(&[]);
    let agent = script(c.dir.path(), "agent.sh", "echo ok > ok.txt");
    c.start_coordinator().await.unwrap();
    c.start_worker(&[("AO__AGENT__COMMAND", agent.to_str().unwrap())]);
    let spec = c.url("/api/v1/openapi.json");
    let description: serde_json::Value = c
        .http
        .get(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(description["openapi"], "3.0.3");

    let program = std::env::var("AO_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let workdir = c.dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .current_dir(&workdir)
            .args(["run", &spec])
            .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
            .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
            .args(["--max-examples", "50", "--workers", "1", "--request-timeout", "20"])
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {program}: {e}; install it with pip install 'schemathesis==4.32.5' (make test does)")
            })
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}\n{}",
        c.logs()
    );
    // It really tested: every operation, with many cases.
    assert!(stdout.contains("Tested: 11"), "{stdout}");
    assert!(
        !c.coordinator_log().contains("internal error"),
        "{}",
        c.logs()
    );
    assert!(
        c.coordinator
            .as_mut()
            .unwrap()
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the coordinator is still up"
    );
}
