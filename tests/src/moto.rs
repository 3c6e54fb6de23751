//! The end-to-end tests' `moto_server` (see `ao-test-support`).

pub use ao_test_support::moto::{unique, Moto, REGION};
