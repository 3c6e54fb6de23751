//! Start-up recovery on the AWS backends (SQS, DynamoDB on moto_server): a running
//! subtask whose worker was SIGKILLed and whose message the queue then lost (purged) is
//! found by the restarted coordinator, failed as retryable infrastructure trouble, and
//! completed as attempt 2.

use ao_shared::names::queue_name;
use ao_shared::queue::QueueId;
use ao_shared::Capability;
use ao_tests::git;
use ao_tests::moto::Moto;
use ao_tests::scenario::{
    cluster_with, kill_mid_run, start_agent_worker, wait_succeeded, KilledRun,
};
use serde_json::{json, Value};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// One SQS call in its JSON protocol (moto does not check request signatures).
async fn sqs(http: &reqwest::Client, endpoint: &str, action: &str, body: Value) -> Value {
    let r = http
        .post(endpoint)
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amz-target", format!("AmazonSQS.{action}"))
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/sqs/aws4_request, \
             SignedHeaders=host, Signature=0",
        )
        .json(&body)
        .send()
        .await
        .expect("SQS call");
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{action}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_running_subtask_on_sqs_is_retried_after_a_restart() {
    let moto = Moto::start();
    let prefix = format!("recovery-{}", ao_tests::free_port());
    let mut c = cluster_with(
        &moto.env(&prefix),
        &[
            ("AO__COORDINATOR__RECOVERY", "all"),
            ("AO__QUEUE__VISIBILITY_TIMEOUT_SECS", "60"),
            ("AO__QUEUE__HEARTBEAT_SECS", "2"),
        ],
    );
    let KilledRun {
        agent, repo, id, ..
    } = kill_mid_run(&mut c, "agent/lost-sqs", LIMIT).await;
    // The queue loses the in-flight message.
    let name = queue_name(&prefix, QueueId::Capability(Capability::Coder));
    let url = sqs(
        &c.http,
        &moto.endpoint,
        "GetQueueUrl",
        json!({ "QueueName": name }),
    )
    .await["QueueUrl"]
        .as_str()
        .unwrap()
        .to_string();
    sqs(
        &c.http,
        &moto.endpoint,
        "PurgeQueue",
        json!({ "QueueUrl": url }),
    )
    .await;
    let attrs = sqs(
        &c.http,
        &moto.endpoint,
        "GetQueueAttributes",
        json!({ "QueueUrl": url, "AttributeNames": ["All"] }),
    )
    .await;
    assert_eq!(
        attrs["Attributes"]["ApproximateNumberOfMessagesNotVisible"], "0",
        "{attrs}"
    );

    c.start_coordinator().await.unwrap();
    start_agent_worker(&mut c, &agent);
    let done = wait_succeeded(&c, &id, LIMIT).await;
    assert_eq!(done["subtasks"][0]["attempt"], 2);
    let (_, events) = c
        .get_json(&format!("/api/v1/tasks/{id}/events"))
        .await
        .unwrap();
    let events = events["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["data"]["type"] == "recovery"),
        "{events:#?}"
    );
    assert!(events.iter().any(|e| e["data"]["type"] == "subtask_status"
        && e["data"]["attempt"] == 2
        && e["data"]["outcome"]["kind"] == "infrastructure"));
    assert_eq!(git(&repo, &["show", "agent/lost-sqs:ok.txt"]), "ok");
}
