//! One exponential backoff for every retrying loop: the delay starts at `first`, doubles
//! after each failure up to `max`, and goes back to `first` after a success.
//!
//! Deterministic on purpose (no jitter): loops that retry are few per process and tests
//! drive them with paused tokio time, where a fixed sequence of delays is what they assert.

use std::time::Duration;

/// An exponential backoff: `first`, `2·first`, `4·first`, … capped at `max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff whose first delay is `first` and whose delays never exceed `max`
    /// (`max` below `first` is taken as `first`).
    pub const fn new(first: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < first.as_nanos() {
            first
        } else {
            max
        };
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The delay to wait now; the one after it is doubled (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        now
    }

    /// The delay [`Backoff::next_delay`] would give, without advancing.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The delay after `failures` failures in a row (`first` after one), for loops whose
    /// failure count is stored (a message's receive count, a delivery's attempts) rather
    /// than kept in a running [`Backoff`]. Zero failures count as one.
    pub fn after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first.saturating_mul(1u32 << doublings).min(self.max)
    }

    /// Sleeps for the next delay (tokio time, so paused time advances it).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let seen: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seen, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn the_delay_after_n_failures_is_the_nth_delay() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let mut running = b.clone();
        for n in 1..=6 {
            assert_eq!(b.after(n), running.next_delay(), "after {n} failures");
        }
        assert_eq!(b.after(0), Duration::from_millis(100));
        assert_eq!(b.after(u32::MAX), Duration::from_millis(500));
    }

    #[test]
    fn a_cap_below_the_first_delay_is_the_first_delay() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
