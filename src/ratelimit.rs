//! Client-side rate limits: a token bucket per dimension (requests/min, tokens/min).
//!
//! [`TokenBucket`] is pure (time is passed in); [`RateLimiter`] wraps two buckets behind a
//! mutex and sleeps until a request fits. Token costs are estimates before the call and
//! corrected with [`RateLimiter::settle_tokens`] once the real usage is known, so a burst of
//! long answers pushes later requests back instead of being forgotten.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::providers::config::RateLimits;
use crate::support::{clock_now, lock};

/// Classic token bucket: holds at most `capacity`, refills `refill_per_sec`. The level may
/// go negative after a correction (debt), which delays later takers.
const BURST_SECS: f64 = 10.0;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_sec: f64,
    level: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket allowing `per_minute` units per minute with a burst of 10 seconds' worth.
    /// Providers enforce per-minute limits over sub-minute windows, so a full minute of
    /// burst would trip their limiter at start-up.
    pub fn per_minute(per_minute: u64, now: Instant) -> Self {
        let refill_per_sec = per_minute.max(1) as f64 / 60.0;
        let capacity = (refill_per_sec * BURST_SECS).max(1.0);
        Self { capacity, refill_per_sec, level: capacity, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + elapsed * self.refill_per_sec).min(self.capacity);
        self.last = now;
    }

    /// How long until `amount` fits (zero if it fits now). Amounts above capacity are
    /// clamped to capacity so one huge request cannot wait forever.
    pub fn wait_for(&mut self, amount: f64, now: Instant) -> Duration {
        self.refill(now);
        let amount = amount.min(self.capacity);
        if self.level >= amount {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((amount - self.level) / self.refill_per_sec)
        }
    }

    /// Removes `amount` (call after `wait_for` returned zero).
    pub fn take(&mut self, amount: f64) {
        self.level -= amount.min(self.capacity);
    }

    /// Adds or removes units after the fact (actual minus estimated usage).
    pub fn adjust(&mut self, delta: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level - delta).min(self.capacity);
    }
}

#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<(Option<TokenBucket>, Option<TokenBucket>)>,
}

impl RateLimiter {
    /// `None` when `limits` sets nothing: callers skip limiting entirely.
    pub fn new(limits: &RateLimits) -> Option<Self> {
        let now = clock_now();
        let requests = limits.requests_per_min.map(|n| TokenBucket::per_minute(n.into(), now));
        let tokens = limits.tokens_per_min.map(|n| TokenBucket::per_minute(n, now));
        (requests.is_some() || tokens.is_some()).then(|| Self { buckets: Mutex::new((requests, tokens)) })
    }

    /// Waits until one request of `estimated_tokens` fits both buckets, then takes it.
    pub async fn acquire(&self, estimated_tokens: u64) {
        loop {
            let wait = {
                let mut guard = lock(&self.buckets);
                let now = clock_now();
                let (requests, tokens) = &mut *guard;
                let w1 = requests.as_mut().map_or(Duration::ZERO, |b| b.wait_for(1.0, now));
                let w2 = tokens.as_mut().map_or(Duration::ZERO, |b| b.wait_for(estimated_tokens as f64, now));
                let wait = w1.max(w2);
                if wait.is_zero() {
                    if let Some(b) = requests.as_mut() {
                        b.take(1.0);
                    }
                    if let Some(b) = tokens.as_mut() {
                        b.take(estimated_tokens as f64);
                    }
                }
                wait
            };
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Corrects the token bucket once actual usage is known.
    pub fn settle_tokens(&self, estimated: u64, actual: u64) {
        let mut guard = lock(&self.buckets);
        if let Some(b) = guard.1.as_mut() {
            b.adjust(actual as f64 - estimated as f64, clock_now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(60, t0); // 1 per second, burst 10
        for _ in 0..10 {
            assert_eq!(b.wait_for(1.0, t0), Duration::ZERO);
            b.take(1.0);
        }
        let wait = b.wait_for(1.0, t0);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        assert_eq!(b.wait_for(1.0, t0 + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn correction_creates_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(600, t0); // 10 tokens/s, capacity 100
        b.take(100.0);
        b.adjust(100.0, t0); // used 100 more than estimated
        let wait = b.wait_for(10.0, t0);
        assert!((wait.as_secs_f64() - 11.0).abs() < 1e-6, "{wait:?}");
        // An oversized request is clamped to capacity rather than waiting forever.
        let mut small = TokenBucket::per_minute(60, t0);
        assert_eq!(small.wait_for(10_000.0, t0), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_spaces_requests() {
        let limiter = RateLimiter::new(&RateLimits { requests_per_min: Some(60), tokens_per_min: None }).unwrap();
        let start = tokio::time::Instant::now();
        for _ in 0..62 {
            limiter.acquire(1).await;
        }
        // 10 burst, then 52 more at 1/s; paused time auto-advances through the sleeps.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(51_990), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(52_100), "{elapsed:?}");
        assert!(RateLimiter::new(&RateLimits::default()).is_none());
    }
}
