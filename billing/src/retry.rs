//! The one retry rule for work that talks to the outside world (webhook deliveries,
//! e-mail notifications): exponential backoff with jitter and a bounded number of
//! attempts, after which the row is DEAD with its last error kept, until someone
//! retries it on purpose.

use rand::Rng as _;
use std::time::Duration;

/// When failed attempts are retried: the n-th failure waits `base × 2^(n−1)`, capped
/// at `cap`, plus up to a quarter more at random (so rows that failed together are
/// not retried together); after `attempts_max` attempts the row is DEAD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    pub attempts_max: i32,
}

impl RetryPolicy {
    /// Webhook deliveries: 10 s doubling to an hour, 33 attempts; the waits add up to
    /// more than 24 h (24 h 25 min before jitter), as the delivery promise says.
    pub const WEBHOOKS: Self = Self {
        base: Duration::from_secs(10),
        cap: Duration::from_secs(3_600),
        attempts_max: 33,
    };

    /// E-mail notifications: 30 s doubling to an hour, 10 attempts; about 3 h from
    /// the first attempt to the last (a mail server down for an afternoon).
    pub const NOTIFICATIONS: Self = Self {
        base: Duration::from_secs(30),
        cap: Duration::from_secs(3_600),
        attempts_max: 10,
    };

    /// The wait after the `attempt`-th failed attempt, before jitter.
    pub fn base_delay(&self, attempt: i32) -> Duration {
        let doublings = u32::try_from(attempt.clamp(1, 31) - 1).unwrap_or(0);
        self.base
            .saturating_mul(1u32 << doublings.min(20))
            .min(self.cap)
    }

    /// The wait after the `attempt`-th failed attempt, with jitter.
    pub fn delay(&self, attempt: i32) -> Duration {
        let base = self.base_delay(attempt);
        let jitter_ms = u64::try_from(base.as_millis() / 4).unwrap_or(u64::MAX);
        base + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }

    /// What follows the `attempt`-th failed attempt: the wait before the next one, or
    /// None when the attempts ran out (the row is DEAD).
    pub fn after_failure(&self, attempt: i32) -> Option<Duration> {
        (attempt < self.attempts_max).then(|| self.delay(attempt))
    }

    /// The shortest time from the first attempt to the last (jitter only adds).
    pub fn min_span(&self) -> Duration {
        (1..self.attempts_max).map(|n| self.base_delay(n)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_are_retried_for_a_day() {
        let p = RetryPolicy::WEBHOOKS;
        assert!(
            p.min_span() >= Duration::from_secs(24 * 3_600),
            "{:?}",
            p.min_span()
        );
        assert_eq!(p.base_delay(1), Duration::from_secs(10));
        assert_eq!(p.base_delay(2), Duration::from_secs(20));
        assert_eq!(p.base_delay(30), Duration::from_secs(3_600));
        for n in 1..40 {
            let d = p.delay(n);
            assert!(d >= p.base_delay(n) && d <= p.base_delay(n) * 5 / 4);
        }
    }

    #[test]
    fn notifications_are_retried_for_hours_then_dead() {
        let p = RetryPolicy::NOTIFICATIONS;
        assert_eq!(p.base_delay(1), Duration::from_secs(30));
        assert_eq!(p.base_delay(8), Duration::from_secs(3_600));
        let span = p.min_span();
        assert!(
            span > Duration::from_secs(3 * 3_600) && span < Duration::from_secs(4 * 3_600),
            "{span:?}"
        );
        assert!(p.after_failure(9).is_some());
        assert_eq!(p.after_failure(10), None);
        assert_eq!(p.after_failure(11), None);
    }
}
