//! Run budget: max tokens and/or max cost. Pure bookkeeping, no I/O.
//!
//! Before dispatching a call the labeler *reserves* a pessimistic estimate (prompt size plus
//! `max_tokens` of output, priced); the call is refused if spent + in-flight reservations +
//! this estimate would pass a limit. When the call returns, its reservation is replaced by
//! the actual usage. So concurrency can never overshoot the limit by more than the error of
//! the estimates, and a stop happens *before* money is spent, not after.

use crate::providers::config::{Budget, Pricing};

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Spend {
    pub tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum BudgetExceeded {
    #[error("token budget reached: {spent} spent + {reserved} in flight + ~{next} next > {limit}")]
    Tokens { spent: u64, reserved: u64, next: u64, limit: u64 },
    #[error("cost budget reached: ${spent:.4} spent + ${reserved:.4} in flight + ~${next:.4} next > ${limit:.4}")]
    Cost { spent: f64, reserved: f64, next: f64, limit: f64 },
}

/// A reservation handle; give it back to [`BudgetTracker::settle`] or `release`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use]
pub struct Reservation(Spend);

#[derive(Debug, Clone)]
pub struct BudgetTracker {
    budget: Budget,
    pricing: Pricing,
    spent: Spend,
    reserved: Spend,
}

impl BudgetTracker {
    /// `already_spent` carries spending from earlier (resumed) runs of the same stage, so a
    /// resume cannot spend the budget twice.
    pub fn new(budget: Budget, pricing: Pricing, already_spent: Spend) -> Self {
        Self { budget, pricing, spent: already_spent, reserved: Spend::default() }
    }

    pub fn spent(&self) -> Spend {
        self.spent
    }

    pub fn estimate(&self, input_tokens: u64, max_output_tokens: u64) -> Spend {
        Spend {
            tokens: input_tokens + max_output_tokens,
            cost_usd: self.pricing.cost_usd(input_tokens, max_output_tokens),
        }
    }

    pub fn reserve(&mut self, estimate: Spend) -> Result<Reservation, BudgetExceeded> {
        if let Some(limit) = self.budget.max_tokens {
            if self.spent.tokens + self.reserved.tokens + estimate.tokens > limit {
                return Err(BudgetExceeded::Tokens {
                    spent: self.spent.tokens,
                    reserved: self.reserved.tokens,
                    next: estimate.tokens,
                    limit,
                });
            }
        }
        if let Some(limit) = self.budget.max_cost_usd {
            if self.spent.cost_usd + self.reserved.cost_usd + estimate.cost_usd > limit {
                return Err(BudgetExceeded::Cost {
                    spent: self.spent.cost_usd,
                    reserved: self.reserved.cost_usd,
                    next: estimate.cost_usd,
                    limit,
                });
            }
        }
        self.reserved.tokens += estimate.tokens;
        self.reserved.cost_usd += estimate.cost_usd;
        Ok(Reservation(estimate))
    }

    /// Replaces a reservation with what the call actually cost.
    pub fn settle(&mut self, reservation: Reservation, actual: Spend) {
        self.release(reservation);
        self.spent.tokens += actual.tokens;
        self.spent.cost_usd += actual.cost_usd;
    }

    /// Drops a reservation for a call that cost nothing (failed before billing).
    pub fn release(&mut self, reservation: Reservation) {
        self.reserved.tokens = self.reserved.tokens.saturating_sub(reservation.0.tokens);
        self.reserved.cost_usd = (self.reserved.cost_usd - reservation.0.cost_usd).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_call_that_would_exceed_tokens() {
        let mut b = BudgetTracker::new(
            Budget { max_tokens: Some(100), max_cost_usd: None },
            Pricing::default(),
            Spend::default(),
        );
        let r1 = b.reserve(b.estimate(20, 20)).unwrap();
        let r2 = b.reserve(b.estimate(20, 20)).unwrap();
        assert!(matches!(b.reserve(b.estimate(20, 20)), Err(BudgetExceeded::Tokens { .. })));
        b.settle(r1, Spend { tokens: 25, cost_usd: 0.0 }); // shorter answer than max
        b.release(r2);
        assert_eq!(b.spent().tokens, 25);
        let _r3 = b.reserve(b.estimate(20, 20)).unwrap();
        let _r4 = b.reserve(b.estimate(10, 20)).unwrap();
        assert!(b.reserve(b.estimate(1, 5)).is_err(), "25 + 40 + 30 + 6 > 100");
    }

    #[test]
    fn cost_limit_uses_pricing_and_prior_spend() {
        let pricing = Pricing { input_per_mtok: 1_000_000.0, output_per_mtok: 2_000_000.0 };
        // 1 USD per input token, 2 USD per output token; 5 USD already spent earlier.
        let mut b = BudgetTracker::new(
            Budget { max_tokens: None, max_cost_usd: Some(10.0) },
            pricing,
            Spend { tokens: 0, cost_usd: 5.0 },
        );
        let e = b.estimate(1, 2);
        assert!((e.cost_usd - 5.0).abs() < 1e-9);
        let r = b.reserve(e).unwrap();
        assert!(matches!(b.reserve(b.estimate(1, 0)), Err(BudgetExceeded::Cost { .. })));
        b.settle(r, Spend { tokens: 2, cost_usd: 3.0 });
        assert!(b.reserve(b.estimate(1, 0)).is_ok());
        // Raising the budget (a new tracker with the same spend) lets labeling continue.
        let b2 = BudgetTracker::new(Budget { max_tokens: None, max_cost_usd: Some(100.0) }, pricing, b.spent());
        assert!((b2.spent().cost_usd - 8.0).abs() < 1e-9);
    }
}
