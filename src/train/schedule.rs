//! Learning-rate schedule: linear warm-up, then cosine decay to `min_lr_ratio · peak`.

/// Warm-up + cosine schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// Final learning rate as a fraction of the peak (0 decays to zero).
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// Learning rate for the optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps.min(step)) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let min_lr = self.peak_lr * self.min_lr_ratio;
        min_lr + (self.peak_lr - min_lr) * cosine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        let schedule = LrSchedule { peak_lr: 1.0, warmup_steps: 4, total_steps: 14, min_lr_ratio: 0.1 };
        assert!((schedule.lr_at(0) - 0.25).abs() < 1e-12);
        assert!((schedule.lr_at(3) - 1.0).abs() < 1e-12);
        assert!((schedule.lr_at(4) - 1.0).abs() < 1e-12);
        // Half-way through the decay: midpoint between peak and floor.
        assert!((schedule.lr_at(9) - 0.55).abs() < 1e-12);
        assert!((schedule.lr_at(14) - 0.1).abs() < 1e-12);
        let lrs: Vec<f64> = (4..15).map(|s| schedule.lr_at(s)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }
}
