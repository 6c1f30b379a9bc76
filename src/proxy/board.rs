//! The set of live breakers, shared by request handlers, targets and the admin API.
//!
//! Breakers are keyed by id: `key:NAME`, `route:ALIAS`, `target:NAME`. Admission across
//! several breakers is all-or-nothing. Every trip, confirm and reset is sent as a
//! [`BoardEvent`] to one consumer (the proxy's event task), which alerts, logs and
//! persists; the board itself does no I/O and takes its time from tokio's clock.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::breaker::{Breaker, BreakerLimits, Refusal, Trip, TripReason};
use crate::budget::{Reservation, Spend};
use crate::ledger::now_ms;
use crate::support::{clock_now, lock};

#[derive(Debug, Clone, PartialEq)]
pub enum BoardEvent {
    Tripped { id: String, trip: Trip },
    Confirmed { id: String, trip: Trip },
    Reset { id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoardError {
    #[error("no breaker `{0}` (ids look like `key:NAME`, `route:ALIAS`, `target:NAME`; see `tangle breaker list`)")]
    Unknown(String),
    #[error("breaker `{0}` is not tripped: there is nothing to confirm (use `reset` to zero its counters)")]
    NotTripped(String),
}

/// One breaker as the dashboard, `tangle breaker list` and `/admin/breakers` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BreakerView {
    pub id: String,
    /// `closed` or `tripped`.
    pub state: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub tripped_at_ms: Option<i64>,
    /// Spend counted against the total budget (since the last confirm/reset).
    pub budget_tokens: u64,
    pub budget_cost_usd: f64,
    pub last_hour_tokens: u64,
    pub last_hour_cost_usd: f64,
    /// Current streak of continuous spend, in seconds.
    pub streak_s: f64,
    pub limits: serde_json::Value,
}

/// What survives a restart: trips, and where each budget was last re-based.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PersistedBreakers {
    pub version: u32,
    pub breakers: BTreeMap<String, PersistedBreaker>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PersistedBreaker {
    pub tripped: Option<PersistedTrip>,
    pub baseline_tokens: u64,
    pub baseline_cost_usd: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PersistedTrip {
    pub reason: TripReason,
    pub message: String,
    pub at_ms: i64,
}

/// The breaker a board should hold: its id, limits and the spend the ledger already has.
#[derive(Debug, Clone)]
pub struct BreakerSpec {
    pub id: String,
    pub limits: BreakerLimits,
    pub total: Spend,
}

pub struct BreakerBoard {
    breakers: Mutex<BTreeMap<String, Breaker>>,
    events: mpsc::UnboundedSender<BoardEvent>,
}

impl BreakerBoard {
    /// A board holding `specs`, restoring trips and budget baselines from `persisted`.
    pub fn new(
        specs: Vec<BreakerSpec>,
        persisted: &PersistedBreakers,
        events: mpsc::UnboundedSender<BoardEvent>,
    ) -> Self {
        let board = Self { breakers: Mutex::new(BTreeMap::new()), events };
        board.sync(specs, persisted);
        board
    }

    /// Makes the board hold exactly `specs`: new ids are created (restored from
    /// `persisted` when there), existing ones get the new limits and keep their state,
    /// ids no longer configured are dropped.
    pub fn sync(&self, specs: Vec<BreakerSpec>, persisted: &PersistedBreakers) {
        let now = clock_now();
        let mut breakers = lock(&self.breakers);
        let mut next = BTreeMap::new();
        for spec in specs {
            let breaker = match breakers.remove(&spec.id) {
                Some(mut existing) => {
                    existing.set_limits(spec.limits);
                    existing
                }
                None => {
                    let saved = persisted.breakers.get(&spec.id);
                    let baseline = saved.map_or(Spend::default(), |p| Spend {
                        tokens: p.baseline_tokens,
                        cost_usd: p.baseline_cost_usd,
                    });
                    let mut b = Breaker::new(spec.id.clone(), spec.limits, now, spec.total, baseline);
                    if let Some(t) = saved.and_then(|p| p.tripped.clone()) {
                        b.restore_trip(Trip { reason: t.reason, message: t.message, at_ms: t.at_ms });
                    }
                    b
                }
            };
            next.insert(spec.id, breaker);
        }
        *breakers = next;
    }

    pub fn contains(&self, id: &str) -> bool {
        lock(&self.breakers).contains_key(id)
    }

    fn emit(&self, event: BoardEvent) {
        // The consumer lives as long as the proxy; a send after shutdown has no one to tell.
        let _ = self.events.send(event);
    }

    /// Reserves `estimate` on every listed breaker that exists, or on none: the first
    /// refusal releases what was already reserved. A refusal that tripped a breaker emits
    /// the trip.
    pub fn admit(&self, ids: &[&str], estimate: Spend) -> Result<Vec<(String, Reservation)>, Refusal> {
        let wall = now_ms();
        let mut breakers = lock(&self.breakers);
        let mut taken: Vec<(String, Reservation)> = Vec::new();
        for id in ids {
            let Some(breaker) = breakers.get_mut(*id) else { continue };
            match breaker.admit(estimate, wall) {
                Ok(r) => taken.push((id.to_string(), r)),
                Err(refusal) => {
                    for (tid, r) in taken {
                        if let Some(b) = breakers.get_mut(&tid) {
                            b.release(r);
                        }
                    }
                    if refusal.newly_tripped {
                        self.emit(BoardEvent::Tripped { id: refusal.id.clone(), trip: refusal.trip.clone() });
                    }
                    return Err(refusal);
                }
            }
        }
        Ok(taken)
    }

    pub fn release(&self, reservations: Vec<(String, Reservation)>) {
        let mut breakers = lock(&self.breakers);
        for (id, r) in reservations {
            if let Some(b) = breakers.get_mut(&id) {
                b.release(r);
            }
        }
    }

    /// Settles a call's actual spend on the breakers it reserved on, and on `unreserved`
    /// ids too (spend without a prior reservation). Emits any trip.
    pub fn settle(
        &self,
        reserved: &[(String, Reservation)],
        unreserved: &[&str],
        actual: Spend,
        start: Instant,
        end: Instant,
    ) {
        let wall = now_ms();
        let mut breakers = lock(&self.breakers);
        let items =
            reserved.iter().map(|(id, r)| (id.as_str(), Some(*r))).chain(unreserved.iter().map(|id| (*id, None)));
        for (id, reservation) in items {
            if let Some(b) = breakers.get_mut(id) {
                if let Some(trip) = b.settle(reservation, actual, start, end, wall) {
                    self.emit(BoardEvent::Tripped { id: id.to_string(), trip });
                }
            }
        }
    }

    /// The trip currently refusing `id`, if any.
    pub fn trip_of(&self, id: &str) -> Option<Trip> {
        lock(&self.breakers).get(id).and_then(|b| b.trip().cloned())
    }

    pub fn confirm(&self, id: &str) -> Result<Trip, BoardError> {
        let mut breakers = lock(&self.breakers);
        let breaker = breakers.get_mut(id).ok_or_else(|| BoardError::Unknown(id.to_string()))?;
        let trip = breaker.confirm().ok_or_else(|| BoardError::NotTripped(id.to_string()))?;
        self.emit(BoardEvent::Confirmed { id: id.to_string(), trip: trip.clone() });
        Ok(trip)
    }

    pub fn reset(&self, id: &str) -> Result<(), BoardError> {
        let mut breakers = lock(&self.breakers);
        let breaker = breakers.get_mut(id).ok_or_else(|| BoardError::Unknown(id.to_string()))?;
        breaker.reset();
        self.emit(BoardEvent::Reset { id: id.to_string() });
        Ok(())
    }

    pub fn views(&self) -> Vec<BreakerView> {
        let now = clock_now();
        lock(&self.breakers)
            .values()
            .map(|b| {
                let trip = b.trip();
                let spent = b.budget_spent();
                let hour = b.last_hour(now);
                BreakerView {
                    id: b.id().to_string(),
                    state: if trip.is_some() { "tripped" } else { "closed" }.to_string(),
                    reason: trip.map(|t| t.reason.as_str().to_string()),
                    message: trip.map(|t| t.message.clone()),
                    tripped_at_ms: trip.map(|t| t.at_ms),
                    budget_tokens: spent.tokens,
                    budget_cost_usd: spent.cost_usd,
                    last_hour_tokens: hour.tokens,
                    last_hour_cost_usd: hour.cost_usd,
                    streak_s: b.streak(now).as_secs_f64(),
                    limits: serde_json::to_value(b.limits()).unwrap_or_default(),
                }
            })
            .collect()
    }

    pub fn persisted(&self) -> PersistedBreakers {
        let breakers = lock(&self.breakers);
        PersistedBreakers {
            version: 1,
            breakers: breakers
                .values()
                .map(|b| {
                    let baseline = b.baseline();
                    let saved = PersistedBreaker {
                        tripped: b.trip().map(|t| PersistedTrip {
                            reason: t.reason,
                            message: t.message.clone(),
                            at_ms: t.at_ms,
                        }),
                        baseline_tokens: baseline.tokens,
                        baseline_cost_usd: baseline.cost_usd,
                    };
                    (b.id().to_string(), saved)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, max_tokens: Option<u64>) -> BreakerSpec {
        BreakerSpec {
            id: id.into(),
            limits: BreakerLimits { max_tokens, max_continuous: None, ..Default::default() },
            total: Spend::default(),
        }
    }

    #[tokio::test]
    async fn admission_is_all_or_nothing_and_trips_are_emitted_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let board = BreakerBoard::new(
            vec![spec("key:a", Some(100)), spec("route:r", Some(50))],
            &PersistedBreakers::default(),
            tx,
        );
        let est = Spend { tokens: 40, cost_usd: 0.0 };
        let first = board.admit(&["key:a", "route:r", "target:none"], est).unwrap();
        assert_eq!(first.len(), 2, "unknown ids are skipped");
        let refusal = board.admit(&["key:a", "route:r"], est).unwrap_err();
        assert_eq!(refusal.id, "route:r");
        assert!(matches!(rx.try_recv(), Ok(BoardEvent::Tripped { id, .. }) if id == "route:r"));
        // key:a's reservation for the refused call was released: 40 + 40 fits its 100.
        board.release(first);
        assert!(board.admit(&["key:a"], Spend { tokens: 100, cost_usd: 0.0 }).is_ok());
        assert!(board.admit(&["route:r"], est).is_err());
        assert!(rx.try_recv().is_err(), "an already-tripped breaker does not alert again");
        assert_eq!(board.confirm("key:a"), Err(BoardError::NotTripped("key:a".into())));
        assert!(board.confirm("route:r").is_ok());
        assert!(matches!(rx.try_recv(), Ok(BoardEvent::Confirmed { .. })));
        assert_eq!(board.reset("nope"), Err(BoardError::Unknown("nope".into())));
    }

    #[tokio::test]
    async fn trips_and_baselines_survive_a_restart() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let board = BreakerBoard::new(vec![spec("key:a", Some(10))], &PersistedBreakers::default(), tx.clone());
        let r = board.admit(&["key:a"], Spend { tokens: 5, cost_usd: 0.0 }).unwrap();
        board.settle(&r, &[], Spend { tokens: 9, cost_usd: 0.0 }, clock_now(), clock_now());
        assert!(board.admit(&["key:a"], Spend { tokens: 5, cost_usd: 0.0 }).is_err());
        let saved = board.persisted();
        let json = serde_json::to_string(&saved).unwrap();
        let restored: PersistedBreakers = serde_json::from_str(&json).unwrap();
        // After a restart the ledger says 9 tokens were spent; the trip is still there.
        let mut again = spec("key:a", Some(10));
        again.total = Spend { tokens: 9, cost_usd: 0.0 };
        let board2 = BreakerBoard::new(vec![again.clone()], &restored, tx.clone());
        assert_eq!(board2.trip_of("key:a").map(|t| t.reason), Some(TripReason::TotalBudget));
        board2.confirm("key:a").unwrap();
        let board3 = BreakerBoard::new(vec![again], &board2.persisted(), tx);
        assert!(board3.trip_of("key:a").is_none());
        assert!(board3.admit(&["key:a"], Spend { tokens: 10, cost_usd: 0.0 }).is_ok(), "budget re-based at 9");
    }
}
