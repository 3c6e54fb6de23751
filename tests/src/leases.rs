//! Checks shared by the lease tests (`tests/tests/leases*.rs`): two coordinator replicas
//! in-process on one state store, each singleton loop on exactly one of them, and the
//! takeover when the holder is killed.

use crate::inproc::InProcess;
use crate::Cluster;
use ao_coordinator::lease::{GITHUB_RECONCILE, LEASES, RECOVERY};
use ao_coordinator::Coordinator;
use std::time::{Duration, Instant};

pub const TTL_MS: u64 = 1500;
pub const RENEW_MS: u64 = 300;
pub const LIMIT: Duration = Duration::from_secs(30);

pub fn held(cx: &Coordinator, lease: &str) -> bool {
    cx.metrics.lease_held.with_label_values(&[lease]).get() == 1
}

pub fn lease_env() -> Vec<(String, String)> {
    vec![
        ("AO__COORDINATOR__LEASE_TTL_MS".into(), TTL_MS.to_string()),
        (
            "AO__COORDINATOR__LEASE_RENEW_MS".into(),
            RENEW_MS.to_string(),
        ),
    ]
}

/// Waits until every lease is held by exactly one of `a`, `b`, checking all along that no
/// lease is ever held by both; returns for each lease whether `a` holds it.
pub async fn one_holder_each(a: &Coordinator, b: &Coordinator) -> Vec<bool> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let mut owners = Vec::new();
        for lease in LEASES {
            let (x, y) = (held(a, lease), held(b, lease));
            assert!(!(x && y), "both replicas hold the lease {lease}");
            owners.push((x, y));
        }
        if owners.iter().all(|(x, y)| x ^ y) {
            return owners.into_iter().map(|(x, _)| x).collect();
        }
        assert!(Instant::now() < deadline, "leases not taken: {owners:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills whichever replica holds the recovery lease and measures how long the other takes
/// to take it over; asserts it is within one lease period plus one renewal interval (and
/// a scheduling margin), and that the survivor then holds every lease.
pub async fn takeover(c: &mut Cluster, b: InProcess) {
    let a = c.inproc.take().expect("first replica");
    let owners = one_holder_each(&a.cx, &b.cx).await;
    let a_holds_recovery = owners[0];
    let (holder, survivor) = if a_holds_recovery { (a, b) } else { (b, a) };
    // Both replicas keep running: the lease stays where it is for several renewals.
    let until = Instant::now() + Duration::from_millis(3 * TTL_MS);
    while Instant::now() < until {
        for lease in LEASES {
            assert!(!held(&holder.cx, lease) || !held(&survivor.cx, lease));
        }
        assert!(held(&holder.cx, RECOVERY), "the holder lost its lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        survivor
            .cx
            .metrics
            .lease_takeovers
            .with_label_values(&[RECOVERY])
            .get(),
        0
    );

    let killed = Instant::now();
    holder.kill().await.expect("the holder stops");
    let deadline = killed + LIMIT;
    while !(held(&survivor.cx, RECOVERY) && held(&survivor.cx, GITHUB_RECONCILE)) {
        assert!(Instant::now() < deadline, "the survivor never took over");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = killed.elapsed();
    eprintln!(
        "lease takeover after the holder was killed: {} ms (lease_ttl_ms {TTL_MS}, \
         lease_renew_ms {RENEW_MS})",
        took.as_millis()
    );
    assert!(
        took <= Duration::from_millis(TTL_MS + RENEW_MS + 1000),
        "takeover took {took:?}"
    );
    assert_eq!(
        survivor
            .cx
            .metrics
            .lease_takeovers
            .with_label_values(&[RECOVERY])
            .get(),
        1
    );
    assert!(survivor
        .cx
        .metrics
        .render()
        .contains(r#"ao_lease_held{lease="recovery"} 1"#));
    survivor.stop().await.expect("the survivor stops");
}
