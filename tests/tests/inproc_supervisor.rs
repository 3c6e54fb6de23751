//! The coordinator in-process: a background loop that dies (an injected panic) is
//! restarted, `/readyz` fails while it is down and names it, and the death is counted in
//! `ao_background_loop_restarts_total`.

use ao_tests::Cluster;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn a_loop_that_panics_is_restarted_and_shows_in_readyz_and_metrics() {
    let mut c = Cluster::new(&[]);
    c.start_in_process().await.unwrap();
    let series = r#"ao_background_loop_restarts_total{loop="result_consumer"}"#;
    // Every known loop's counter exists from the start, at zero.
    assert_eq!(c.metric(series).await.unwrap(), 0.0);
    for name in [
        "dead_letters",
        "recovery",
        "webhook_consumer",
        "github_reporter",
    ] {
        let s = format!(r#"ao_background_loop_restarts_total{{loop="{name}"}}"#);
        assert!(c.metrics().await.unwrap().contains(&s), "{s} missing");
    }

    assert!(c.cx().loops.inject_panic("result_consumer"));
    // Down: readyz says so, naming the loop (the event that proves the death).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let r = c.http.get(c.url("/readyz")).send().await.unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if status == 503 {
            break (status, body);
        }
        assert!(Instant::now() < deadline, "readyz never failed: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503);
    assert_eq!(body["code"], "loop_down", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("result_consumer"),
        "{body}"
    );
    assert_eq!(c.metric(series).await.unwrap(), 1.0);
    assert_eq!(
        c.metric(r#"ao_background_loop_up{loop="result_consumer"}"#)
            .await
            .unwrap(),
        0.0
    );

    // Restarted after the backoff: ready again, and the restarted consumer works.
    c.inproc
        .as_ref()
        .unwrap()
        .wait_ready(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        c.metric(r#"ao_background_loop_up{loop="result_consumer"}"#)
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(c.metric(series).await.unwrap(), 1.0);
    c.inproc.take().unwrap().stop().await.unwrap();
}

/// With `coordinator.recovery = "none"` the recovery loop has nothing to do, which is
/// not a death: the coordinator is ready and the loop is never restarted.
#[tokio::test(flavor = "multi_thread")]
async fn recovery_turned_off_is_not_a_dead_loop() {
    let mut c = Cluster::new(&[("AO__COORDINATOR__RECOVERY", "none")]);
    c.start_in_process().await.unwrap();
    assert_eq!(
        c.metric(r#"ao_background_loop_restarts_total{loop="recovery"}"#)
            .await
            .unwrap(),
        0.0
    );
    assert!(c.cx().is_ready());
    c.inproc.take().unwrap().stop().await.unwrap();
}
