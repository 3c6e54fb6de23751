//! The shared `moto_server` (from `ao-test-support`), and SDK clients for it with dummy
//! credentials.

#![allow(dead_code)]

use ao_shared::aws::{ApiCalls, AwsClients};
pub use ao_test_support::moto::{unique, Moto, REGION};
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::config::Credentials;

/// Clients for a moto_server, optionally counting their calls.
pub async fn clients(moto: &Moto, calls: Option<&ApiCalls>) -> AwsClients {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(&moto.endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "moto"))
        .load()
        .await;
    AwsClients::new(&config, calls)
}
