//! What the engine reports while it runs: gauges it updates after every step, counters,
//! and latency histograms. Cheap to read from any thread (`/metrics`, `/health`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the time-to-first-token and request-latency histograms.
pub const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

/// A histogram's values at one moment: cumulative bucket counts, count, sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_s: f64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let s = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let cumulative = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&b, c)| {
                running += c.load(Ordering::Relaxed);
                (b, running)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            count: self.count.load(Ordering::Relaxed),
            sum_s: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Shared between the engine thread and its handles.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Requests accepted and not yet admitted to the batch.
    pub queued: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// KV cells held by running sequences, read from the KV cache after each step.
    pub kv_tokens_running: AtomicUsize,
    /// KV cells the running sequences have reserved (prompt + max_tokens each).
    pub kv_tokens_reserved: AtomicUsize,
    pub requests_total: AtomicU64,
    pub rejected_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    pub steps_total: AtomicU64,
    pub cache: Mutex<super::prefix_cache::CacheStats>,
    pub ttft: Histogram,
    pub latency: Histogram,
    /// (when, generated tokens so far), for the recent rate.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// The window of [`EngineMetrics::tokens_per_second`].
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl EngineMetrics {
    /// Called by the engine after a step.
    pub fn sample_rate(&self, now: Instant) {
        let total = self.generated_tokens_total.load(Ordering::Relaxed);
        let mut samples = crate::support::lock(&self.samples);
        if samples.back().is_some_and(|(t, _)| now.duration_since(*t) < Duration::from_millis(200)) {
            return;
        }
        samples.push_back((now, total));
        while samples.len() > 2 && samples.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            samples.pop_front();
        }
    }

    /// Generated tokens per second over about the last ten seconds (0 when idle).
    pub fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let total = self.generated_tokens_total.load(Ordering::Relaxed);
        let samples = crate::support::lock(&self.samples);
        match samples.iter().find(|(t, _)| now.duration_since(*t) <= RATE_WINDOW) {
            Some((t, then)) => {
                let span = now.duration_since(*t).as_secs_f64();
                if span < 0.5 {
                    0.0
                } else {
                    (total - then) as f64 / span
                }
            }
            None => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(40));
        h.observe(Duration::from_secs(500));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative[0], (0.005, 1));
        assert_eq!(s.cumulative[3], (0.05, 2));
        assert_eq!(s.cumulative.last().unwrap().1, 2, "beyond the last bound only in +Inf (count)");
        assert!((s.sum_s - 500.043).abs() < 1e-6);
    }
}
