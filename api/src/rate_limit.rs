//! Per-process token buckets: usage events per credential (an API key or a user
//! token), so a leaked or looping key cannot take the whole writer from a workspace's
//! other callers; and failed authentications per client address, so tokens cannot be
//! guessed at speed. A refusal is RATE_LIMITED with the wait in `retryAfterMs`.
//!
//! Each API process keeps its own buckets: with N processes behind a balancer a key
//! gets up to N times the rate. That bounds abuse without a shared store on the hot path.

use billing::BillingError;
use billing::accounts::auth::Principal;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The limits (0 turns one off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Usage events (a `recordUsageBatch` item, a reservation, a settlement) per second
    /// per credential; a burst of twice this is allowed.
    pub usage_per_second: u32,
    /// Failed authentications per minute per client address.
    pub auth_failures_per_minute: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            usage_per_second: 5_000,
            auth_failures_per_minute: 60,
        }
    }
}

/// Buckets kept per map before idle ones are dropped (a bound on memory under a
/// flood of distinct addresses).
const BUCKETS_MAX: usize = 100_000;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A rate of `per_second` with room for `burst`.
#[derive(Clone, Copy)]
struct Rate {
    per_second: f64,
    burst: f64,
}

impl Rate {
    /// Takes `n` tokens from the bucket, or says how long until they are there.
    fn take(self, bucket: &mut Bucket, n: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= n {
            bucket.tokens -= n;
            return Ok(());
        }
        let missing = (n - bucket.tokens).min(self.burst);
        Err(Duration::from_secs_f64(missing / self.per_second))
    }

    fn full(self, now: Instant) -> Bucket {
        Bucket {
            tokens: self.burst,
            at: now,
        }
    }
}

struct Buckets<K> {
    rate: Option<Rate>,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Copy> Buckets<K> {
    fn new(rate: Option<Rate>) -> Self {
        Self {
            rate,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn take(&self, key: K, n: f64) -> Result<(), Duration> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let now = Instant::now();
        // A poisoned lock only means another request panicked mid-update: the
        // buckets are still usable numbers.
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= BUCKETS_MAX {
            // Full buckets are the idle ones: forgetting them changes nothing.
            map.retain(|_, b| rate.take(&mut b.clone(), rate.burst, now).is_err());
        }
        let bucket = map.entry(key).or_insert_with(|| rate.full(now));
        rate.take(bucket, n, now)
    }

    /// Tokens left for `key` right now, without taking any.
    fn would_refuse(&self, key: K) -> Option<Duration> {
        let rate = self.rate?;
        let map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut bucket = *map.get(&key)?;
        rate.take(&mut bucket, 1.0, Instant::now()).err()
    }
}

pub struct RateLimiter {
    usage: Buckets<Uuid>,
    auth_failures: Buckets<IpAddr>,
}

fn refused(wait: Duration) -> BillingError {
    BillingError::RateLimited {
        retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
    }
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        let usage = (limits.usage_per_second > 0).then(|| Rate {
            per_second: f64::from(limits.usage_per_second),
            burst: 2.0 * f64::from(limits.usage_per_second),
        });
        let auth = (limits.auth_failures_per_minute > 0).then(|| Rate {
            per_second: f64::from(limits.auth_failures_per_minute) / 60.0,
            burst: f64::from(limits.auth_failures_per_minute),
        });
        Self {
            usage: Buckets::new(usage),
            auth_failures: Buckets::new(auth),
        }
    }

    /// Charges `events` usage events to the caller's credential.
    pub fn usage(&self, principal: &Principal, events: usize) -> Result<(), BillingError> {
        let credential = match principal {
            Principal::ApiKey { api_key_id, .. } => *api_key_id,
            Principal::User { token_id, .. } => *token_id,
            Principal::PlatformAdmin => return Ok(()),
        };
        // usize → f64 is exact for any batch size the API accepts (≤ 1 000).
        #[expect(clippy::cast_precision_loss, reason = "batch sizes are small")]
        let events = events as f64;
        self.usage.take(credential, events).map_err(refused)
    }

    /// Refuses an address that failed to authenticate too often, before its next try
    /// is even looked up.
    pub fn check_address(&self, address: Option<IpAddr>) -> Result<(), BillingError> {
        match address.and_then(|a| self.auth_failures.would_refuse(a)) {
            Some(wait) => Err(refused(wait)),
            None => Ok(()),
        }
    }

    /// Counts a failed authentication from `address`.
    pub fn auth_failed(&self, address: Option<IpAddr>) {
        if let Some(address) = address {
            // Over the limit already: the next `check_address` refuses it.
            let _ = self.auth_failures.take(address, 1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_caps_at_its_burst() {
        let rate = Rate {
            per_second: 10.0,
            burst: 20.0,
        };
        let t0 = Instant::now();
        let mut bucket = rate.full(t0);
        assert!(rate.take(&mut bucket, 20.0, t0).is_ok());
        let wait = rate.take(&mut bucket, 1.0, t0).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100));
        assert!(
            rate.take(&mut bucket, 1.0, t0 + Duration::from_millis(100))
                .is_ok()
        );
        let later = t0 + Duration::from_secs(60);
        assert!(
            rate.take(&mut bucket, 21.0, later).is_err(),
            "never above the burst"
        );
    }

    #[test]
    fn keys_and_addresses_are_limited_apart() {
        let limiter = RateLimiter::new(RateLimits {
            usage_per_second: 5,
            auth_failures_per_minute: 2,
        });
        let key = |id| Principal::ApiKey {
            api_key_id: id,
            workspace_id: Uuid::nil(),
            project_id: None,
        };
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(limiter.usage(&key(a), 10).is_ok());
        assert!(limiter.usage(&key(a), 1).is_err());
        assert!(
            limiter.usage(&key(b), 10).is_ok(),
            "another key is unaffected"
        );
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        assert!(limiter.check_address(Some(ip)).is_ok());
        limiter.auth_failed(Some(ip));
        limiter.auth_failed(Some(ip));
        let refused = limiter.check_address(Some(ip)).expect_err("limited");
        assert_eq!(refused.code(), billing::ErrorCode::RateLimited);
        assert!(
            limiter
                .check_address(Some("192.0.2.2".parse().expect("ip")))
                .is_ok()
        );
    }
}
