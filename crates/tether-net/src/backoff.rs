//! Exponential reconnect backoff with "equal jitter": a random point in the
//! upper half of the delay.

use rand::Rng;
use std::time::Duration;

/// First retry delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Doubles the delay after each failure (up to [`BACKOFF_MAX`]) and picks a
/// random point in the upper half of it, so a fleet of agents that lost the
/// same server do not all come back in the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::starting_at(BACKOFF_MIN)
    }
}

impl Backoff {
    /// A backoff whose first delay is at most `min` (and at least half of
    /// it), doubling up to [`BACKOFF_MAX`].
    pub fn starting_at(min: Duration) -> Self {
        Backoff { min, current: min }
    }

    /// The delay before the next attempt; grows the next one.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_within(BACKOFF_MAX)
    }

    /// [`next_delay`](Self::next_delay) at most `cap`: the cap applies
    /// before the jitter, so capped delays still spread over the upper
    /// half of `cap` (a cap on the drawn delay would make most of them
    /// exactly `cap`, and a fleet retry in step).
    pub fn next_delay_within(&mut self, cap: Duration) -> Duration {
        let d = self.current.min(cap);
        self.current = (self.current * 2).min(BACKOFF_MAX);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the shortest delay (after a session that worked).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_with_jitter() {
        let mut b = Backoff::default();
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= BACKOFF_MAX);
        }
        assert!(last >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }

    #[test]
    fn a_capped_delay_keeps_its_jitter() {
        let cap = Duration::from_secs(2);
        let mut b = Backoff::default();
        let late: Vec<Duration> = (0..40).map(|_| b.next_delay_within(cap)).skip(10).collect();
        assert!(late.iter().all(|d| *d >= cap / 2 && *d <= cap), "{late:?}");
        // Spread, not piled at the cap (30 draws all equal: 1 in 10^200).
        assert!(late.iter().any(|d| *d != late[0]), "{late:?}");
        assert!(late.iter().filter(|d| **d == cap).count() < 5, "{late:?}");
    }
}
