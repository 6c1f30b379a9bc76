//! From one position's logits to a token: log-probabilities, the top alternatives, greedy
//! choice and seeded temperature / nucleus sampling. Pure: no model, no I/O.
//!
//! Each request (each choice of an `n > 1` request) owns its random generator, seeded from
//! the request's `seed` and the choice index, so a seeded request samples the same tokens
//! whatever else is running in the batch.

use rand::{Rng, SeedableRng};

/// How a sequence picks its next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// `None`: a fresh random seed per request.
    pub seed: Option<u64>,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: None };

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// A sequence's sampler: its settings and its own generator.
pub struct Sampler {
    settings: Sampling,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    /// The sampler of choice `index` of a request.
    pub fn new(settings: Sampling, index: u32) -> Sampler {
        let seed = settings.seed.unwrap_or_else(rand::random::<u64>);
        // splitmix64 of (seed, index): distinct, reproducible streams per choice.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(u64::from(index) + 1));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Sampler { settings, rng: rand::rngs::StdRng::seed_from_u64(z) }
    }

    /// The next token from `logits`, where `allowed` (when given) says which ids a constraint
    /// permits; disallowed ids are never chosen.
    pub fn pick(&mut self, logits: &[f32], allowed: Option<&dyn Fn(u32) -> bool>) -> u32 {
        if self.settings.is_greedy() {
            return argmax(logits, allowed);
        }
        sample(logits, self.settings.temperature, self.settings.top_p, allowed, &mut self.rng)
    }
}

/// The id of the largest logit (the lowest id among ties), among the allowed ids.
pub fn argmax(logits: &[f32], allowed: Option<&dyn Fn(u32) -> bool>) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    let mut found = false;
    for (i, &l) in logits.iter().enumerate() {
        let id = i as u32;
        if allowed.is_some_and(|ok| !ok(id)) {
            continue;
        }
        if !found || l > best.1 {
            best = (id, l);
            found = true;
        }
    }
    best.0
}

/// Samples from softmax(logits / temperature) restricted to the top-p nucleus of the allowed
/// ids.
fn sample(
    logits: &[f32],
    temperature: f32,
    top_p: f32,
    allowed: Option<&dyn Fn(u32) -> bool>,
    rng: &mut impl Rng,
) -> u32 {
    let candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .filter(|(id, l)| l.is_finite() && allowed.is_none_or(|ok| ok(*id)))
        .collect();
    if candidates.is_empty() {
        return argmax(logits, allowed);
    }
    let max = candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> =
        candidates.iter().map(|&(id, l)| (id, f64::from((l - max) / temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0f64;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= f64::from(top_p.clamp(0.0, 1.0)) {
            cut = i + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f64>() * mass;
    for p in nucleus {
        draw -= p.1;
        if draw <= 0.0 {
            return p.0;
        }
    }
    nucleus.last().map_or(0, |p| p.0)
}

/// log-softmax normalizer of `logits`: `logsumexp`, accumulated in f64.
pub fn log_normalizer(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f64::from(max);
    }
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    f64::from(max) + sum.ln()
}

/// The `k` most likely ids with their log-probabilities, most likely first (ties by id).
pub fn top_k(logits: &[f32], k: usize, normalizer: f64) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if best.len() == k && best.last().is_some_and(|w| l <= w.1) {
            continue;
        }
        let at = best.partition_point(|b| b.1 >= l);
        best.insert(at, (i as u32, l));
        best.truncate(k);
    }
    best.into_iter().map(|(id, l)| (id, (f64::from(l) - normalizer) as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_allowed_logit() {
        let logits = [0.1, 3.0, 2.0, 3.0];
        assert_eq!(argmax(&logits, None), 1, "the lowest id among ties");
        let not_one = |id: u32| id != 1;
        assert_eq!(argmax(&logits, Some(&not_one)), 3);
    }

    #[test]
    fn seeded_samplers_repeat_and_choices_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let settings = Sampling { temperature: 1.0, top_p: 1.0, seed: Some(42) };
        let draw = |index| {
            let mut s = Sampler::new(settings, index);
            (0..32).map(|_| s.pick(&logits, None)).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn sampling_never_leaves_the_allowed_set() {
        let logits: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let even = |id: u32| id % 2 == 0;
        let mut s = Sampler::new(Sampling { temperature: 2.0, top_p: 0.9, seed: Some(1) }, 0);
        for _ in 0..200 {
            assert_eq!(s.pick(&logits, Some(&even)) % 2, 0);
        }
    }

    #[test]
    fn log_probabilities_normalize_and_rank() {
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        let z = log_normalizer(&logits);
        let total: f64 = logits.iter().map(|&l| (f64::from(l) - z).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        let top = top_k(&logits, 2, z);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((f64::from(top[0].1) - (3.0 - z)).abs() < 1e-6);
        assert_eq!(top_k(&logits, 10, z).len(), 4);
    }
}
