//! Spend circuit breakers: one per client key, per route that asks for one, and per target
//! named under `target_breakers`. Pure bookkeeping: time is an argument, nothing here
//! sleeps, logs or touches a file, so the 10-hour rule is tested in microseconds.
//!
//! A breaker trips on any of:
//! - **continuous spend**: tokens flowing for longer than `max_continuous`, where a gap
//!   shorter than `idle_reset` does not break the streak;
//! - **per hour**: cost or tokens within the last 60 minutes (one-minute buckets) above a limit;
//! - **total budget**: cost or tokens since the last confirm/reset. Checked *before* a call
//!   with a pessimistic reservation ([`crate::budget::BudgetTracker`]), so a stop happens
//!   before the money is spent.
//!
//! A tripped breaker refuses every admission until an operator acts:
//! - `confirm` (only when tripped) closes it and gives the rule that tripped a fresh
//!   allowance: the streak restarts, the hour window empties, or the budget starts over;
//! - `reset` (any state) closes it and zeroes every counter, e.g. for a new billing period.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::budget::{BudgetExceeded, BudgetTracker, Reservation, Spend};
use crate::providers::config::{Budget, Pricing};

/// Limits of one breaker; `None` disables a rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerLimits {
    #[serde(serialize_with = "ser_opt_duration")]
    pub max_continuous: Option<Duration>,
    #[serde(serialize_with = "ser_duration")]
    pub idle_reset: Duration,
    pub max_cost_per_hour: Option<f64>,
    pub max_tokens_per_hour: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub max_tokens: Option<u64>,
}

pub const DEFAULT_MAX_CONTINUOUS: Duration = Duration::from_secs(10 * 3600);
pub const DEFAULT_IDLE_RESET: Duration = Duration::from_secs(10 * 60);

impl Default for BreakerLimits {
    fn default() -> Self {
        Self {
            max_continuous: Some(DEFAULT_MAX_CONTINUOUS),
            idle_reset: DEFAULT_IDLE_RESET,
            max_cost_per_hour: None,
            max_tokens_per_hour: None,
            max_cost_usd: None,
            max_tokens: None,
        }
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format_duration(*d)),
        None => s.serialize_str("off"),
    }
}

/// `10h`, `1h 30m`, `5m`, `42s`, `250ms`: how limits and streaks read in messages.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut parts = Vec::new();
    if h > 0 {
        parts.push(format!("{h}h"));
    }
    if m > 0 {
        parts.push(format!("{m}m"));
    }
    if s > 0 && h == 0 {
        parts.push(format!("{s}s"));
    }
    if parts.is_empty() {
        parts.push(format!("{h}h"));
    }
    parts.join(" ")
}

/// Dollars with cents, or with 4 decimals below a dollar (a $0.0005 limit must not read $0.00).
pub fn format_usd(v: f64) -> String {
    if v.abs() >= 1.0 {
        format!("${v:.2}")
    } else {
        format!("${v:.4}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TripReason {
    ContinuousSpend,
    CostPerHour,
    TokensPerHour,
    TotalBudget,
}

impl TripReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TripReason::ContinuousSpend => "continuous_spend",
            TripReason::CostPerHour => "cost_per_hour",
            TripReason::TokensPerHour => "tokens_per_hour",
            TripReason::TotalBudget => "total_budget",
        }
    }
}

/// Why and when a breaker tripped. `at_ms` is wall-clock (for people); rules use `Instant`s.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trip {
    pub reason: TripReason,
    pub message: String,
    pub at_ms: i64,
}

/// An admission refused by a tripped breaker. `newly_tripped` is true when this admission
/// is what tripped it (so the caller sends the alert exactly once).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: String,
    pub trip: Trip,
    pub newly_tripped: bool,
}

/// Cost and tokens over the last hour in one-minute buckets: O(1) memory at any rate.
#[derive(Debug, Clone)]
struct HourWindow {
    /// (minute index, tokens, cost) per slot; a slot whose minute is older than 59 minutes
    /// before the current one is stale.
    slots: [(u64, u64, f64); 60],
}

impl HourWindow {
    fn new() -> Self {
        Self { slots: [(u64::MAX, 0, 0.0); 60] }
    }

    fn add(&mut self, minute: u64, tokens: u64, cost: f64) {
        let slot = &mut self.slots[(minute % 60) as usize];
        if slot.0 != minute {
            *slot = (minute, 0, 0.0);
        }
        slot.1 += tokens;
        slot.2 += cost;
    }

    fn sum(&self, minute: u64) -> (u64, f64) {
        self.slots
            .iter()
            .filter(|(m, _, _)| *m != u64::MAX && *m <= minute && minute - *m < 60)
            .fold((0, 0.0), |(t, c), (_, tokens, cost)| (t + tokens, c + cost))
    }
}

/// One breaker's state. `epoch` anchors minute indices; all `Instant`s come from one clock
/// (tokio's, so paused test time drives it).
#[derive(Debug, Clone)]
pub struct Breaker {
    id: String,
    limits: BreakerLimits,
    epoch: Instant,
    tripped: Option<Trip>,
    streak_start: Option<Instant>,
    last_activity: Option<Instant>,
    hour: HourWindow,
    budget: BudgetTracker,
    /// Everything this scope has spent (ledger history included); `baseline` is its value
    /// at the last confirm/reset of the budget, so `total - baseline` is what counts.
    total: Spend,
    baseline: Spend,
}

fn budget_of(limits: &BreakerLimits) -> Budget {
    Budget { max_tokens: limits.max_tokens, max_cost_usd: limits.max_cost_usd }
}

fn minus(a: Spend, b: Spend) -> Spend {
    Spend { tokens: a.tokens.saturating_sub(b.tokens), cost_usd: (a.cost_usd - b.cost_usd).max(0.0) }
}

impl Breaker {
    /// A closed breaker. `total` is what the scope has spent before (from the ledger) and
    /// `baseline` the total at its last confirm/reset (from the state file).
    pub fn new(id: impl Into<String>, limits: BreakerLimits, now: Instant, total: Spend, baseline: Spend) -> Self {
        let budget = BudgetTracker::new(budget_of(&limits), Pricing::default(), minus(total, baseline));
        Self {
            id: id.into(),
            limits,
            epoch: now,
            tripped: None,
            streak_start: None,
            last_activity: None,
            hour: HourWindow::new(),
            budget,
            total,
            baseline,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn limits(&self) -> &BreakerLimits {
        &self.limits
    }

    pub fn trip(&self) -> Option<&Trip> {
        self.tripped.as_ref()
    }

    pub fn baseline(&self) -> Spend {
        self.baseline
    }

    /// Spend counted against the total budget (since the last confirm/reset).
    pub fn budget_spent(&self) -> Spend {
        self.budget.spent()
    }

    /// Cost and tokens within the last hour.
    pub fn last_hour(&self, now: Instant) -> Spend {
        let (tokens, cost_usd) = self.hour.sum(self.minute(now));
        Spend { tokens, cost_usd }
    }

    /// How long tokens have been flowing without an `idle_reset` gap, as of `now`.
    pub fn streak(&self, now: Instant) -> Duration {
        match (self.streak_start, self.last_activity) {
            (Some(start), Some(last)) if now.saturating_duration_since(last) <= self.limits.idle_reset => {
                last.saturating_duration_since(start)
            }
            _ => Duration::ZERO,
        }
    }

    /// New limits (config reload); counters and a trip are kept.
    pub fn set_limits(&mut self, limits: BreakerLimits) {
        self.budget = BudgetTracker::new(budget_of(&limits), Pricing::default(), self.budget.spent());
        self.limits = limits;
    }

    /// Restores a trip recorded before a restart.
    pub fn restore_trip(&mut self, trip: Trip) {
        self.tripped = Some(trip);
    }

    fn minute(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() / 60
    }

    fn set_trip(&mut self, reason: TripReason, message: String, wall_ms: i64) -> Trip {
        let trip = Trip { reason, message, at_ms: wall_ms };
        self.tripped = Some(trip.clone());
        trip
    }

    /// Before a call: refuses if tripped, or if `estimate` would pass the total budget
    /// (which trips it). `Ok` carries the reservation to settle or release afterwards.
    pub fn admit(&mut self, estimate: Spend, wall_ms: i64) -> Result<Reservation, Refusal> {
        if let Some(trip) = &self.tripped {
            return Err(Refusal { id: self.id.clone(), trip: trip.clone(), newly_tripped: false });
        }
        match self.budget.reserve(estimate) {
            Ok(reservation) => Ok(reservation),
            Err(exceeded) => {
                let message = match exceeded {
                    BudgetExceeded::Tokens { spent, limit, .. } => format!(
                        "`{}` reached its token budget: {spent} of {limit} tokens spent, and the next request could take ~{} more",
                        self.id, estimate.tokens
                    ),
                    BudgetExceeded::Cost { spent, limit, .. } => format!(
                        "`{}` reached its cost budget: {} of {} spent, and the next request could cost ~{} more",
                        self.id,
                        format_usd(spent),
                        format_usd(limit),
                        format_usd(estimate.cost_usd)
                    ),
                };
                let trip = self.set_trip(TripReason::TotalBudget, message, wall_ms);
                Err(Refusal { id: self.id.clone(), trip, newly_tripped: true })
            }
        }
    }

    /// Drops a reservation for a call that was not made.
    pub fn release(&mut self, reservation: Reservation) {
        self.budget.release(reservation);
    }

    /// After a call that ran from `start` to `end` and spent `actual`: replaces the
    /// reservation, extends the streak and the hour window, and checks the rules. Returns
    /// the trip if this call tripped the breaker.
    pub fn settle(
        &mut self,
        reservation: Option<Reservation>,
        actual: Spend,
        start: Instant,
        end: Instant,
        wall_ms: i64,
    ) -> Option<Trip> {
        match reservation.or_else(|| self.budget.reserve(Spend::default()).ok()) {
            Some(r) => self.budget.settle(r, actual),
            None => {
                // No reservation (the breaker appeared by a reload mid-call) and already
                // over budget: rebuild with the spend added; in-flight reservations are
                // forgotten, which errs on the permissive side by their amount only.
                let spent = self.budget.spent();
                let total = Spend { tokens: spent.tokens + actual.tokens, cost_usd: spent.cost_usd + actual.cost_usd };
                self.budget = BudgetTracker::new(budget_of(&self.limits), Pricing::default(), total);
            }
        }
        self.total.tokens += actual.tokens;
        self.total.cost_usd += actual.cost_usd;
        if actual.tokens == 0 {
            // A failed call moved no tokens: it neither extends nor starts a streak.
            return None;
        }
        let gap_breaks_streak = match self.last_activity {
            Some(last) => start.saturating_duration_since(last) > self.limits.idle_reset,
            None => true,
        };
        if gap_breaks_streak || self.streak_start.is_none() {
            self.streak_start = Some(start);
        }
        self.last_activity = Some(self.last_activity.map_or(end, |last| last.max(end)));
        self.hour.add(self.minute(end), actual.tokens, actual.cost_usd);
        if self.tripped.is_some() {
            return None;
        }
        self.check(end, wall_ms)
    }

    fn check(&mut self, now: Instant, wall_ms: i64) -> Option<Trip> {
        let id = self.id.clone();
        if let Some(limit) = self.limits.max_continuous {
            let streak = self.streak(now);
            if streak > limit {
                let message = format!(
                    "`{id}` has consumed tokens continuously for {} (limit {}; gaps under {} do not count as a pause)",
                    format_duration(streak),
                    format_duration(limit),
                    format_duration(self.limits.idle_reset)
                );
                return Some(self.set_trip(TripReason::ContinuousSpend, message, wall_ms));
            }
        }
        let hour = self.last_hour(now);
        if let Some(limit) = self.limits.max_cost_per_hour {
            if hour.cost_usd > limit {
                let message = format!(
                    "`{id}` spent {} in the last hour (limit {} per hour)",
                    format_usd(hour.cost_usd),
                    format_usd(limit)
                );
                return Some(self.set_trip(TripReason::CostPerHour, message, wall_ms));
            }
        }
        if let Some(limit) = self.limits.max_tokens_per_hour {
            if hour.tokens > limit {
                let message = format!("`{id}` used {} tokens in the last hour (limit {limit} per hour)", hour.tokens);
                return Some(self.set_trip(TripReason::TokensPerHour, message, wall_ms));
            }
        }
        None
    }

    /// Closes a tripped breaker and gives the rule that tripped a fresh allowance. Returns
    /// the trip it cleared, or `None` (and changes nothing) when it was not tripped.
    pub fn confirm(&mut self) -> Option<Trip> {
        let trip = self.tripped.take()?;
        match trip.reason {
            TripReason::ContinuousSpend => {
                self.streak_start = None;
                self.last_activity = None;
            }
            TripReason::CostPerHour | TripReason::TokensPerHour => self.hour = HourWindow::new(),
            TripReason::TotalBudget => self.restart_budget(),
        }
        Some(trip)
    }

    /// Closes the breaker and zeroes every counter.
    pub fn reset(&mut self) {
        self.tripped = None;
        self.streak_start = None;
        self.last_activity = None;
        self.hour = HourWindow::new();
        self.restart_budget();
    }

    fn restart_budget(&mut self) {
        // In-flight reservations are forgotten: those calls settle against the new budget.
        self.baseline = self.total;
        self.budget = BudgetTracker::new(budget_of(&self.limits), Pricing::default(), Spend::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn spend(tokens: u64, cost_usd: f64) -> Spend {
        Spend { tokens, cost_usd }
    }

    fn breaker(limits: BreakerLimits, t0: Instant) -> Breaker {
        Breaker::new("key:a", limits, t0, Spend::default(), Spend::default())
    }

    /// One short call at `at`, settled.
    fn call(b: &mut Breaker, at: Instant, s: Spend) -> Option<Trip> {
        let r = b.admit(spend(0, 0.0), 0).ok();
        b.settle(r, s, at, at + Duration::from_secs(1), 0)
    }

    #[test]
    fn continuous_spend_trips_after_limit_and_gaps_under_idle_reset_do_not_break_it() {
        let t0 = Instant::now();
        let limits = BreakerLimits { max_continuous: Some(10 * HOUR), idle_reset: 5 * MIN, ..Default::default() };
        let mut b = breaker(limits, t0);
        // A call every 4 minutes: always inside the idle window.
        let mut t = t0;
        let mut tripped_at = None;
        for _ in 0..200 {
            if let Some(trip) = call(&mut b, t, spend(10, 0.0)) {
                tripped_at = Some((t, trip));
                break;
            }
            t += 4 * MIN;
        }
        let (when, trip) = tripped_at.expect("trips");
        assert_eq!(trip.reason, TripReason::ContinuousSpend);
        // The streak runs to the end of the call that crossed the limit (each lasts 1 s).
        let streak = when + Duration::from_secs(1) - t0;
        assert!(streak > 10 * HOUR && streak <= 10 * HOUR + 4 * MIN, "{streak:?}");
        assert!(trip.message.contains("10h"), "{}", trip.message);
        assert!(b.admit(spend(1, 0.0), 0).is_err(), "a tripped breaker refuses");
    }

    #[test]
    fn a_gap_longer_than_idle_reset_restarts_the_streak() {
        let t0 = Instant::now();
        let limits = BreakerLimits { max_continuous: Some(HOUR), idle_reset: 5 * MIN, ..Default::default() };
        let mut b = breaker(limits, t0);
        let mut t = t0;
        for round in 0..3 {
            // 50 minutes of calls every 4 minutes, then a 6-minute pause.
            for _ in 0..13 {
                assert!(call(&mut b, t, spend(1, 0.0)).is_none(), "round {round}");
                t += 4 * MIN;
            }
            t += 6 * MIN;
        }
        assert!(b.trip().is_none());
        assert_eq!(b.streak(t), Duration::ZERO, "the pause ended the streak");
        // Failed calls (no tokens) do not extend a streak either.
        for _ in 0..30 {
            assert!(call(&mut b, t, spend(0, 0.0)).is_none());
            t += 4 * MIN;
        }
        assert!(b.trip().is_none());
    }

    #[test]
    fn cost_per_hour_uses_a_sliding_hour() {
        let t0 = Instant::now();
        let limits = BreakerLimits { max_cost_per_hour: Some(1.0), max_continuous: None, ..Default::default() };
        let mut b = breaker(limits, t0);
        assert!(call(&mut b, t0, spend(1, 0.6)).is_none());
        // 61 minutes later the first call has left the window.
        assert!(call(&mut b, t0 + 61 * MIN, spend(1, 0.6)).is_none());
        let trip = call(&mut b, t0 + 90 * MIN, spend(1, 0.6)).expect("1.2 within the hour");
        assert_eq!(trip.reason, TripReason::CostPerHour);
        // Confirming empties the window; the same spend is allowed again.
        assert_eq!(b.confirm().map(|t| t.reason), Some(TripReason::CostPerHour));
        assert!(call(&mut b, t0 + 91 * MIN, spend(1, 0.6)).is_none());
        assert!(b.confirm().is_none(), "confirming a closed breaker is refused");
    }

    #[test]
    fn total_budget_refuses_before_spending_and_confirm_grants_a_new_allowance() {
        let t0 = Instant::now();
        let limits = BreakerLimits { max_tokens: Some(100), max_continuous: None, ..Default::default() };
        // 60 tokens spent before a restart (from the ledger), baseline 0.
        let mut b = Breaker::new("key:a", limits, t0, spend(60, 0.0), Spend::default());
        let r = b.admit(spend(30, 0.0), 0).expect("60 + 30 <= 100");
        let refusal = b.admit(spend(30, 0.0), 7).expect_err("60 + 30 reserved + 30 > 100");
        assert!(refusal.newly_tripped);
        assert_eq!(refusal.trip.reason, TripReason::TotalBudget);
        assert_eq!(refusal.trip.at_ms, 7);
        let again = b.admit(spend(1, 0.0), 8).expect_err("stays tripped");
        assert!(!again.newly_tripped);
        assert!(b.settle(Some(r), spend(25, 0.0), t0, t0, 0).is_none());
        assert_eq!(b.budget_spent().tokens, 85);
        let cleared = b.confirm().expect("was tripped");
        assert_eq!(cleared.reason, TripReason::TotalBudget);
        assert_eq!(b.baseline().tokens, 85);
        assert_eq!(b.budget_spent().tokens, 0);
        assert!(b.admit(spend(90, 0.0), 0).is_ok(), "a whole new budget");
    }

    #[test]
    fn reset_zeroes_everything_in_any_state() {
        let t0 = Instant::now();
        let limits = BreakerLimits {
            max_tokens_per_hour: Some(10),
            max_cost_usd: Some(1.0),
            max_continuous: None,
            ..Default::default()
        };
        let mut b = breaker(limits, t0);
        assert!(call(&mut b, t0, spend(5, 0.5)).is_none());
        assert_eq!(call(&mut b, t0, spend(6, 0.1)).map(|t| t.reason), Some(TripReason::TokensPerHour));
        b.reset();
        assert!(b.trip().is_none());
        assert_eq!(b.last_hour(t0), Spend::default());
        assert_eq!(b.budget_spent(), Spend::default());
        assert!((b.baseline().cost_usd - 0.6).abs() < 1e-9);
        b.reset();
        assert!(b.trip().is_none(), "reset of a closed breaker is harmless");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(10 * HOUR), "10h");
        assert_eq!(format_duration(10 * HOUR + 4 * MIN), "10h 4m");
        assert_eq!(format_duration(5 * MIN), "5m");
        assert_eq!(format_duration(Duration::from_secs(42)), "42s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }
}
