//! Faults on the AWS backends (SQS, DynamoDB on moto_server): the AWS endpoint goes away
//! mid-pipeline and comes back, and the daemons retry and recover: the task completes,
//! each step recorded once; meanwhile the API answers 503 (retry), not 500.
//!
//! The endpoint is a TCP relay in front of moto_server that the test stops (listener
//! closed, every open connection reset) and starts again on the same port: to the
//! daemons that is the service restarting. Restarting moto_server itself would not do:
//! unlike SQS and DynamoDB it keeps its state only in memory and comes back empty.

use ao_tests::moto::Moto;
use ao_tests::relay::Relay;
use ao_tests::scenario::{
    cluster_with, count_successes, events, start_agent_worker, submit_code, wait_for_file,
    wait_succeeded,
};
use ao_tests::{bare_repo, git, script};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn the_aws_endpoint_going_away_and_coming_back_loses_nothing() {
    let moto = Moto::start();
    let target: SocketAddr = moto
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("moto address");
    let relay_addr: SocketAddr = format!("127.0.0.1:{}", ao_tests::free_port())
        .parse()
        .expect("relay address");
    let relay = Relay::start(relay_addr, target).await;

    let prefix = format!("faults-{}", relay_addr.port());
    let mut env = moto.env(&prefix);
    for (k, v) in env.iter_mut() {
        if k == "AO__AWS__ENDPOINT_URL" {
            *v = format!("http://{relay_addr}");
        }
    }
    // The outage is shorter than the visibility timeout: a message whose heartbeats fail
    // for a while is not taken by another run meanwhile.
    let mut c = cluster_with(
        &env,
        &[
            ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "30"),
            ("AO__QUEUE__HEARTBEAT_SECS", "2"),
        ],
    );
    let marker = c.dir.path().join("runs.log");
    let agent = script(
        c.dir.path(),
        "agent.sh",
        &format!(
            "echo \"$AO_CAPABILITY\" >> {}\nsleep 3\necho \"$AO_CAPABILITY\" > \"$AO_CAPABILITY.txt\"",
            marker.display()
        ),
    );
    let repo = bare_repo(c.dir.path(), "project", &[]);
    c.start_coordinator().await.unwrap();
    start_agent_worker(&mut c, &agent);
    let (status, task) = c
        .submit(
            json!({ "repository": repo.display().to_string(), "prompt": "outage",
                        "pipeline": ["coder", "docs"], "branch": "agent/outage" }),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap().to_string();
    // The outage starts while the first step's agent runs.
    wait_for_file(&c, &marker, LIMIT).await;
    relay.stop().await;
    assert!(
        TcpStream::connect(relay_addr).await.is_err(),
        "the endpoint is down"
    );
    // Meanwhile the API says the store is unavailable (503, to retry), not a server bug.
    let down_since = Instant::now();
    let (status, body) = c.get_json(&format!("/api/v1/tasks/{id}")).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "store_unavailable", "{body}");
    // Down long enough for the step to end and its result to need retrying.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(down_since.elapsed())).await;
    let relay = Relay::start(relay_addr, target).await;

    let done = wait_succeeded(&c, &id, LIMIT).await;
    for sub in done["subtasks"].as_array().unwrap() {
        assert_eq!(sub["attempt"], 1, "{sub}");
    }
    let events = events(&c, &id).await;
    assert_eq!(count_successes(&events), 2, "{events:#?}");
    assert_eq!(git(&repo, &["show", "agent/outage:docs.txt"]), "docs");
    // The daemons noticed the outage and retried (not merely waited).
    let logs = c.logs();
    assert!(
        logs.contains("retrying") || logs.contains("heartbeat failed"),
        "{logs}"
    );
    // Still healthy afterwards: a new task goes through.
    let again = submit_code(&c, &repo, "after", "agent/after").await;
    wait_succeeded(&c, &again, LIMIT).await;
    relay.stop().await;
}
