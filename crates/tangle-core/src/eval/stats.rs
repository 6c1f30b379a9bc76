//! Confidence intervals and significance tests for metrics: seeded percentile bootstrap,
//! paired bootstrap of a difference, and McNemar's exact test.
//!
//! The generator is SplitMix64, written out here so a seed gives the same intervals in every
//! version of tangle (a library RNG may change its stream between releases).

use serde::{Deserialize, Serialize};

/// A metric's value over a set of examples with its 95% bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Examples it was computed over.
    pub n: usize,
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fixed forever.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0), by Lemire's multiply-shift; the bias is below 2^-32 for the
    /// sizes used here.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// The q-quantile (0..=1) of sorted values, linearly interpolated (numpy's default).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile_sorted(&sorted, q)
}

/// A statistic's 95% percentile-bootstrap interval over `samples` resamples.
pub fn bootstrap(values: &[f64], statistic: &dyn Fn(&[f64]) -> f64, samples: u32, seed: u64) -> Estimate {
    let value = statistic(values);
    let n = values.len();
    if n < 2 || samples == 0 {
        return Estimate { value, ci_low: value, ci_high: value, n };
    }
    let mut rng = SplitMix64::new(seed);
    let mut resample = vec![0.0; n];
    let mut stats: Vec<f64> = (0..samples)
        .map(|_| {
            for slot in resample.iter_mut() {
                *slot = values[rng.below(n)];
            }
            statistic(&resample)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    Estimate { value, ci_low: quantile_sorted(&stats, 0.025), ci_high: quantile_sorted(&stats, 0.975), n }
}

pub fn bootstrap_mean(values: &[f64], samples: u32, seed: u64) -> Estimate {
    bootstrap(values, &mean, samples, seed)
}

/// The difference `b − a` of paired per-example values, with its paired-bootstrap 95%
/// interval and a two-sided p-value (twice the share of resampled differences on the far
/// side of zero).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    pub delta: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub p_value: f64,
    pub n: usize,
}

pub fn paired_bootstrap(a: &[f64], b: &[f64], samples: u32, seed: u64) -> Difference {
    let n = a.len().min(b.len());
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let delta = mean(&diffs);
    if n < 2 || samples == 0 {
        let p_value = if delta == 0.0 { 1.0 } else { 0.0 };
        return Difference { delta, ci_low: delta, ci_high: delta, p_value: if n < 2 { 1.0 } else { p_value }, n };
    }
    let mut rng = SplitMix64::new(seed);
    let mut below = 0u32;
    let mut above = 0u32;
    let mut means: Vec<f64> = (0..samples)
        .map(|_| {
            let m = (0..n).map(|_| diffs[rng.below(n)]).sum::<f64>() / n as f64;
            if m <= 0.0 {
                below += 1;
            }
            if m >= 0.0 {
                above += 1;
            }
            m
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let p_value = (2.0 * f64::from(below.min(above)) / f64::from(samples)).min(1.0);
    Difference { delta, ci_low: quantile_sorted(&means, 0.025), ci_high: quantile_sorted(&means, 0.975), p_value, n }
}

/// McNemar's exact test on discordant pairs: `b` examples right only under A, `c` right only
/// under B. Two-sided p-value of the binomial(b + c, 1/2) test.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X <= k) for X ~ Binomial(n, 1/2), summed in log space to stay finite for large n.
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_its_reference_stream() {
        // First outputs for seed 1234567 from the reference C implementation.
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert!((quantile(&v, 0.95) - 3.85).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean_and_narrows_with_n() {
        let small: Vec<f64> = (0..20).map(|i| f64::from(u8::from(i % 4 != 0))).collect();
        let large: Vec<f64> = (0..2000).map(|i| f64::from(u8::from(i % 4 != 0))).collect();
        let s = bootstrap_mean(&small, 2000, 7);
        let l = bootstrap_mean(&large, 2000, 7);
        assert!(s.ci_low <= 0.75 && 0.75 <= s.ci_high);
        assert!(l.ci_high - l.ci_low < (s.ci_high - s.ci_low) / 4.0);
        // Normal approximation for p = 0.75, n = 2000: ± 1.96 · sqrt(p(1-p)/n) ≈ ± 0.019.
        assert!(((l.ci_high - l.ci_low) / 2.0 - 0.019).abs() < 0.004, "{l:?}");
        assert_eq!(bootstrap_mean(&small, 2000, 7), s, "seeded");
    }

    #[test]
    fn mcnemar_against_known_values() {
        // Binomial(10, 1/2): P(X <= 1) = 11/1024, two-sided 22/1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert!(mcnemar_exact(10, 400) < 1e-50);
    }

    #[test]
    fn paired_bootstrap_detects_a_real_shift_only() {
        let a: Vec<f64> = (0..400).map(|i| f64::from(u8::from(i % 2 == 0))).collect();
        let better: Vec<f64> = (0..400).map(|i| f64::from(u8::from(i % 2 == 0 || i % 5 == 1))).collect();
        let d = paired_bootstrap(&a, &better, 2000, 1);
        assert!(d.delta > 0.0 && d.ci_low > 0.0 && d.p_value < 0.01, "{d:?}");
        let same = paired_bootstrap(&a, &a, 2000, 1);
        assert_eq!(same.delta, 0.0);
        assert!(same.p_value >= 0.99);
    }
}
