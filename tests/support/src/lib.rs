//! Test support shared by `ao-shared`'s own tests and the end-to-end tests in `ao-tests`,
//! with no dependency on either (so both can use it).

pub mod moto;
