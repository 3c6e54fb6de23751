//! Two coordinator replicas in-process on one DynamoDB table (moto_server): each singleton
//! loop runs on exactly one of them, under a lease; when the holder dies without releasing
//! it, the other takes it over once it expires.
//!
//! The in-process coordinators read AWS credentials from the process environment (the
//! SDK's default chain), so this test has a binary of its own: it sets moto's dummy
//! credentials before anything runs, and no other test shares the process.

use ao_tests::inproc::InProcess;
use ao_tests::leases::{lease_env, takeover};
use ao_tests::moto::Moto;
use ao_tests::Cluster;

#[tokio::test(flavor = "multi_thread")]
async fn on_one_dynamodb_table_one_replica_runs_the_singletons_and_the_other_takes_over() {
    let moto = Moto::start();
    let prefix = format!("leases-{}", ao_tests::free_port());
    let mut env = moto.env(&prefix);
    for (k, v) in env.iter().filter(|(k, _)| k.starts_with("AWS_")) {
        std::env::set_var(k, v);
    }
    env.extend(lease_env());
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut c = Cluster::new(&refs);
    c.start_in_process().await.unwrap();
    let b = InProcess::start(c.dir.path(), &c.env, "127.0.0.1:0")
        .await
        .unwrap();
    takeover(&mut c, b).await;
}
