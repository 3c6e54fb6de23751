//! Bad input on the REST API: every refusal has the right status and a JSON error body.

use ao_tests::{Cluster, TOKEN};
use serde_json::{json, Value};

/// An authenticated GET of `path` answers `status` with the JSON error `code`.
async fn check_get(c: &Cluster, path: &str, status: u16, code: &str) -> Value {
    let resp = c
        .http
        .get(c.url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("request");
    check(resp, status, code).await
}

async fn check(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    let body: Value = resp.json().await.expect("JSON error body");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_json_errors() {
    let mut c = Cluster::new(&[("AO__SERVER__MAX_BODY_BYTES", "4096")]);
    c.start_coordinator().await.unwrap();
    let h = &c.http;
    let tasks = c.url("/api/v1/tasks");

    check(h.get(&tasks).send().await.unwrap(), 401, "unauthorized").await;
    check(
        h.get(&tasks).bearer_auth("wrong").send().await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    let malformed = h
        .post(&tasks)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"repository\": ")
        .send()
        .await
        .unwrap();
    check(malformed, 400, "malformed_json").await;
    let big = json!({ "repository": "/tmp/x.git", "prompt": "x".repeat(10_000) });
    check(
        h.post(&tasks)
            .bearer_auth(TOKEN)
            .json(&big)
            .send()
            .await
            .unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    let unknown = format!("/api/v1/tasks/{}", uuid_like());
    check_get(&c, &unknown, 404, "not_found").await;
    check_get(&c, "/api/v1/tasks/not-an-id", 404, "not_found").await;
    check(
        h.get(c.url("/nowhere")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;

    for (body, needle) in [
        (json!({ "repository": "", "prompt": "p" }), "repository"),
        (
            json!({ "repository": "--upload-pack=evil", "prompt": "p" }),
            "repository",
        ),
        (
            json!({ "repository": "ext::sh -c evil", "prompt": "p" }),
            "repository",
        ),
        (
            json!({ "repository": "/tmp/x.git", "prompt": "   " }),
            "prompt",
        ),
        (
            json!({ "repository": "/tmp/x.git", "prompt": "p", "branch": "../../etc" }),
            "branch",
        ),
        (
            json!({ "repository": "/tmp/x.git", "prompt": "p", "pipeline": "nope" }),
            "pipeline",
        ),
        (
            json!({ "repository": "/tmp/x.git", "prompt": "p", "pipeline": ["painter"] }),
            "capability",
        ),
        (json!({ "repository": "/tmp/x.git" }), "prompt"),
        (
            json!({ "repository": "/tmp/x.git", "prompt": "p", "colour": "red" }),
            "colour",
        ),
    ] {
        let r = h
            .post(&tasks)
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let err = check(r, 422, "invalid_request").await;
        assert!(
            err["error"].as_str().unwrap().contains(needle),
            "{body} → {err}"
        );
    }
    check_get(&c, "/api/v1/tasks?status=bogus", 400, "invalid_status").await;
    check_get(&c, "/api/v1/tasks?cursor=zz", 400, "invalid_cursor").await;
    let wrong_type = h
        .post(&tasks)
        .bearer_auth(TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    check(wrong_type, 415, "unsupported_media_type").await;
    let (s, _) = c
        .post_json(&format!("/api/v1/tasks/{}/cancel", uuid_like()))
        .await
        .unwrap();
    assert_eq!(s, 404);

    // Nothing was created by any of this.
    let (_, list) = c.get_json("/api/v1/tasks").await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 0);
}

/// Rejecting a plan: a task that waits for no plan is a 409, not a 500; bad feedback is
/// a 422; an unknown task a 404.
#[tokio::test(flavor = "multi_thread")]
async fn rejecting_what_waits_for_no_plan_is_a_conflict() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator().await.unwrap();
    let (_, task) = c
        .submit(json!({ "repository": "/tmp/nowhere.git", "prompt": "p", "pipeline": ["planner", "coder"] }))
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap();
    let reject = |id: String, body: Value| {
        c.http
            .post(c.url(&format!("/api/v1/tasks/{id}/reject")))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    let err = check(
        reject(id.into(), json!({ "feedback": "smaller steps" }))
            .await
            .unwrap(),
        409,
        "conflict",
    )
    .await;
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("not waiting for approval"),
        "{err}"
    );
    for (body, needle) in [
        (json!({ "feedback": " \n " }), "feedback"),
        (json!({ "feedback": "x".repeat(4097) }), "4096 bytes"),
        (json!({ "feedback": "x", "colour": "red" }), "colour"),
        (json!({}), "feedback"),
    ] {
        let err = check(
            reject(id.into(), body.clone()).await.unwrap(),
            422,
            "invalid_request",
        )
        .await;
        assert!(
            err["error"].as_str().unwrap().contains(needle),
            "{body} → {err}"
        );
    }
    check(
        reject(uuid_like(), json!({ "feedback": "x" }))
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    // The task is as it was.
    let after = c.task(id).await.unwrap();
    assert_eq!(after["status"], "queued", "{after:#}");
    assert_eq!(after["subtasks"][0]["attempt"], 1, "{after:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_configured_token_the_api_says_why() {
    let mut c = Cluster::new(&[("AO__API__TOKEN", "")]);
    c.env.retain(|(k, _)| k != "AO__API__TOKEN");
    c.start_coordinator().await.unwrap();
    let r = c
        .http
        .get(c.url("/api/v1/tasks"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let body = check(r, 503, "api_disabled").await;
    assert!(body["error"].as_str().unwrap().contains("api.token"));
    assert!(c.coordinator_log().contains("api.token is not set"));
}

fn uuid_like() -> String {
    "0190f6a2-7c3e-7d4a-9b1e-2f3a4b5c6d7e".into()
}

/// A stored task that no longer parses is a 500 `store_corrupt` (an operator must look),
/// not a 503 inviting the client to retry what can never succeed.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_stored_task_is_a_500_not_a_retry() {
    let mut c = Cluster::new(&[]);
    c.start_in_process().await.unwrap();
    let created: Value = c
        .http
        .post(c.url("/api/v1/tasks"))
        .bearer_auth(TOKEN)
        .json(&json!({ "repository": "/tmp/nowhere.git", "prompt": "x" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("task id").to_string();
    let db = rusqlite::Connection::open(c.dir.path().join("data/state.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE tasks SET doc = '{\"id\": 42' WHERE id = ?1",
            rusqlite::params![id],
        )
        .unwrap();
    assert_eq!(changed, 1);
    check_get(&c, &format!("/api/v1/tasks/{id}"), 500, "store_corrupt").await;
}
