//! Two coordinator replicas in-process on one SQLite file: each singleton loop runs on
//! exactly one of them, under a lease; when the holder dies without releasing it, the other
//! takes it over once it expires; a holder that stops cleanly hands it over at once. The
//! same on DynamoDB is in `leases_aws.rs`.

use ao_coordinator::lease::RECOVERY;
use ao_tests::inproc::InProcess;
use ao_tests::leases::{held, lease_env, one_holder_each, takeover, LIMIT, TTL_MS};
use ao_tests::Cluster;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn on_one_sqlite_file_one_replica_runs_the_singletons_and_the_other_takes_over() {
    let env = lease_env();
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    c.start_in_process().await.unwrap();
    let b = InProcess::start(c.dir.path(), &c.env, "127.0.0.1:0")
        .await
        .unwrap();
    takeover(&mut c, b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_stops_cleanly_hands_its_lease_over_at_once() {
    let env = lease_env();
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    c.start_in_process().await.unwrap();
    let b = InProcess::start(c.dir.path(), &c.env, "127.0.0.1:0")
        .await
        .unwrap();
    let a = c.inproc.take().unwrap();
    let owners = one_holder_each(&a.cx, &b.cx).await;
    let (holder, survivor) = if owners[0] { (a, b) } else { (b, a) };
    holder.stop().await.unwrap();
    // Released, not left to expire: taken at the survivor's next try.
    let stopped = Instant::now();
    while !held(&survivor.cx, RECOVERY) {
        assert!(stopped.elapsed() < LIMIT, "never taken over");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        stopped.elapsed() < Duration::from_millis(TTL_MS),
        "a released lease was waited out: {:?}",
        stopped.elapsed()
    );
    survivor.stop().await.unwrap();
}
