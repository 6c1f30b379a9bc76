//! The labeling engine: sends every not-yet-journaled request through the router,
//! concurrently, under a budget, and journals each answer before counting it done.
//!
//! Invariants:
//! - A request is identified by its content hash; duplicates in the input and requests
//!   already in the journal are never sent.
//! - A call's ledger rows are written before its journal line (so the ledger never misses
//!   a paid call), and the journal line is durable before the label counts as done.
//! - Cancellation stops *dispatching*; calls already in flight run to completion and are
//!   journaled, because they are paid for either way.
//! - The budget check happens before dispatch (see [`crate::budget`]): labeling stops
//!   cleanly with [`LabelOutcome::BudgetExhausted`] instead of overspending.
//!
//! It knows nothing about datasets, specs or terminals: progress goes to a callback.

pub mod journal;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::budget::{BudgetExceeded, BudgetTracker, Spend};
use crate::ledger::{now_ms, CallRecord, Ledger};
use crate::providers::config::{Budget, Pricing};
use crate::providers::{ChatRequest, RequestId};
use crate::router::{Attempt, AttemptOutcome, Router};
use crate::support::lock;

pub use journal::{Durability, JournalContents, JournalError, JournalRecord, LabelJournal};

pub use crate::cancel::CancelToken;

/// Live figures for a progress bar.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Unique requests in this stage.
    pub total: usize,
    /// Found in the journal at start (not sent again).
    pub resumed: usize,
    /// Labeled by this run.
    pub done: usize,
    pub failed: usize,
    pub in_flight: usize,
    /// Provider attempts that failed (retried or not).
    pub failed_attempts: usize,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub elapsed: Duration,
}

impl Progress {
    pub fn completed(&self) -> usize {
        self.resumed + self.done
    }

    pub fn requests_per_sec(&self) -> f64 {
        rate(self.done as f64, self.elapsed)
    }

    pub fn tokens_per_sec(&self) -> f64 {
        rate((self.input_tokens + self.output_tokens) as f64, self.elapsed)
    }
}

fn rate(amount: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum LabelOutcome {
    /// Every request is labeled (now or in an earlier run).
    Completed,
    /// Some requests failed on every target; re-running retries only those.
    CompletedWithFailures,
    /// Stopped before a call that would pass the budget (CLI exit code 4).
    BudgetExhausted(BudgetExceeded),
    /// Cancelled; in-flight calls were still journaled.
    Cancelled,
}

#[derive(Debug)]
pub struct LabelReport {
    pub outcome: LabelOutcome,
    pub progress: Progress,
    /// Requests that failed, with the router's final error.
    pub failures: Vec<(RequestId, String)>,
    /// Content id of every input request, in input order (duplicates share an id).
    pub request_ids: Vec<RequestId>,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("labeling task panicked: {0}")]
    TaskPanicked(String),
}

/// Receives a snapshot after every completed request, in completion order. It runs while
/// the engine's state lock is held: keep it quick (update a bar, don't block or await).
pub type ProgressCallback = Arc<dyn Fn(&Progress) + Send + Sync>;

#[derive(Debug)]
pub struct LabelSettings {
    pub run_id: String,
    pub stage: String,
    pub concurrency: usize,
    pub budget: Budget,
    /// Spend already recorded for this budget scope (e.g. [`Ledger::spent`] on resume).
    pub already_spent: Spend,
    /// Output tokens assumed for a request without `max_tokens`, for budget reservations.
    pub default_max_output_tokens: u32,
}

impl LabelSettings {
    pub fn new(run_id: impl Into<String>, stage: impl Into<String>, concurrency: usize) -> Self {
        Self {
            run_id: run_id.into(),
            stage: stage.into(),
            concurrency,
            budget: Budget::default(),
            already_spent: Spend::default(),
            default_max_output_tokens: 1024,
        }
    }
}

/// Everything one labeling stage needs.
pub struct LabelJob {
    pub requests: Vec<ChatRequest>,
    pub router: Arc<Router>,
    pub journal: Arc<LabelJournal>,
    /// Ids already journaled ([`JournalContents::records`] keys).
    pub already_done: HashSet<RequestId>,
    pub ledger: Option<Arc<Ledger>>,
    pub settings: LabelSettings,
    pub progress: Option<ProgressCallback>,
    pub cancel: CancelToken,
}

struct SharedState {
    budget: BudgetTracker,
    progress: Progress,
    failures: Vec<(RequestId, String)>,
    fatal: Option<LabelError>,
    started: Instant,
}

/// Labels everything in `job`; see the module docs for the guarantees.
pub async fn label(job: LabelJob) -> Result<LabelReport, LabelError> {
    let LabelJob { requests, router, journal, already_done, ledger, settings, progress, cancel } = job;
    let settings = Arc::new(settings);
    let request_ids: Vec<RequestId> = requests.iter().map(ChatRequest::content_id).collect();

    let mut seen = HashSet::new();
    let mut pending = Vec::new();
    let mut resumed = 0;
    for (request, id) in requests.into_iter().zip(&request_ids) {
        if !seen.insert(id.clone()) {
            continue; // duplicate content: labeled once
        }
        if already_done.contains(id) {
            resumed += 1;
        } else {
            pending.push((id.clone(), request));
        }
    }

    // Pessimistic pricing for reservations: the most expensive target may serve any call.
    let estimate_pricing = router.target_configs().filter_map(|t| t.pricing).fold(Pricing::default(), |a, p| Pricing {
        input_per_mtok: a.input_per_mtok.max(p.input_per_mtok),
        output_per_mtok: a.output_per_mtok.max(p.output_per_mtok),
    });
    if settings.budget.max_cost_usd.is_some() && router.target_configs().all(|t| t.pricing.is_none()) {
        tracing::warn!("a cost budget is set but no target has pricing: costs count as zero");
    }
    let started = Instant::now();
    let state = Arc::new(Mutex::new(SharedState {
        budget: BudgetTracker::new(settings.budget, estimate_pricing, settings.already_spent),
        progress: Progress { total: seen.len(), resumed, ..Default::default() },
        failures: Vec::new(),
        fatal: None,
        started,
    }));
    let stop_on_fatal = CancelToken::new();
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let durable_slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut stopped_by: Option<LabelOutcome> = None;

    for (id, request) in pending {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => { stopped_by = Some(LabelOutcome::Cancelled); break; }
            _ = stop_on_fatal.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // semaphore never closes; defensive
            },
        };
        if cancel.is_cancelled() {
            stopped_by = Some(LabelOutcome::Cancelled);
            break;
        }
        let max_output = request.params.max_tokens.unwrap_or(settings.default_max_output_tokens);
        let reservation = {
            let mut s = lock(&state);
            let estimate = s.budget.estimate(request.estimated_input_tokens(), u64::from(max_output));
            match s.budget.reserve(estimate) {
                Ok(r) => {
                    s.progress.in_flight += 1;
                    r
                }
                Err(exceeded) => {
                    stopped_by = Some(LabelOutcome::BudgetExhausted(exceeded));
                    break;
                }
            }
        };
        let (router, journal, ledger, settings, state, progress, stop_on_fatal) = (
            router.clone(),
            journal.clone(),
            ledger.clone(),
            settings.clone(),
            state.clone(),
            progress.clone(),
            stop_on_fatal.clone(),
        );
        let durable_slots = durable_slots.clone();
        tasks.spawn(async move {
            let result = router.send(&request).await;
            // The provider slot bounds calls in flight at the providers; waiting for the
            // ledger and journal commit need not hold it (holding it through the fsync cost
            // 7 points of efficiency in the 50 ms benchmark, see STATUS.md). A second pool of the same size bounds calls
            // answered but not yet durable, so a crash loses at most 2 x concurrency calls.
            // `None` only if the semaphore were closed, which it never is.
            let durable_slot = durable_slots.clone().acquire_owned().await.ok();
            drop(permit);
            let attempts = match &result {
                Ok(routed) => &routed.attempts,
                Err(failure) => &failure.attempts,
            };
            let failed_attempts =
                attempts.iter().filter(|a| matches!(a.outcome, AttemptOutcome::Failed { .. })).count();
            if let Some(ledger) = &ledger {
                let rows: Vec<CallRecord> = attempts.iter().map(|a| call_record(a, &settings, &id)).collect();
                // Metering must not stop labeling; a broken ledger is reported loudly.
                if let Err(e) = ledger.record(rows).await {
                    tracing::error!(error = %e, "ledger write failed");
                }
            }
            let journaled = match result {
                Ok(routed) => {
                    let record = JournalRecord {
                        id: id.clone(),
                        target: routed.target.clone(),
                        provider: routed.attempts.last().map(|a| a.provider.to_string()),
                        model: routed.attempts.last().map(|a| a.model.clone()).unwrap_or_default(),
                        latency_ms: routed.attempts.last().map_or(0, |a| a.latency.as_millis() as u64),
                        cost_usd: routed.cost_usd,
                        timestamp_ms: now_ms(),
                        response: routed.response,
                    };
                    journal.append(&record).await.map(|()| Some(record))
                }
                Err(failure) => {
                    let mut s = lock(&state);
                    s.failures.push((id.clone(), failure.to_string()));
                    Ok(None)
                }
            };
            {
                let mut s = lock(&state);
                s.progress.in_flight -= 1;
                s.progress.failed_attempts += failed_attempts;
                match journaled {
                    Ok(Some(record)) => {
                        let usage = record.response.usage;
                        s.budget.settle(reservation, Spend { tokens: usage.total(), cost_usd: record.cost_usd });
                        s.progress.done += 1;
                        s.progress.input_tokens += usage.input_tokens;
                        s.progress.output_tokens += usage.output_tokens;
                        s.progress.cost_usd += record.cost_usd;
                    }
                    Ok(None) => {
                        s.budget.release(reservation);
                        s.progress.failed += 1;
                    }
                    Err(e) => {
                        s.budget.release(reservation);
                        s.progress.failed += 1;
                        if s.fatal.is_none() {
                            s.fatal = Some(LabelError::Journal(e));
                        }
                        stop_on_fatal.cancel();
                    }
                }
                s.progress.elapsed = s.started.elapsed();
                // Called under the lock so snapshots arrive in order (done never goes
                // backwards on a progress bar). Callbacks must be quick and must not block.
                if let Some(callback) = &progress {
                    callback(&s.progress);
                }
            }
            drop(durable_slot);
        });
        // Reap finished tasks as we go so the JoinSet does not grow with the input.
        while let Some(joined) = tasks.try_join_next() {
            joined.map_err(|e| LabelError::TaskPanicked(e.to_string()))?;
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| LabelError::TaskPanicked(e.to_string()))?;
    }

    let mut s = lock(&state);
    if let Some(fatal) = s.fatal.take() {
        return Err(fatal);
    }
    s.progress.elapsed = started.elapsed();
    let outcome = match stopped_by {
        Some(outcome) => outcome,
        None if s.progress.failed > 0 => LabelOutcome::CompletedWithFailures,
        None => LabelOutcome::Completed,
    };
    Ok(LabelReport { outcome, progress: s.progress.clone(), failures: std::mem::take(&mut s.failures), request_ids })
}

fn call_record(attempt: &Attempt, settings: &LabelSettings, id: &RequestId) -> CallRecord {
    CallRecord {
        run_id: settings.run_id.clone(),
        stage: settings.stage.clone(),
        target: attempt.target.clone(),
        provider: attempt.provider.to_string(),
        model: attempt.model.clone(),
        api_key_id: None,
        request_id: Some(id.clone()),
        input_tokens: attempt.usage.input_tokens,
        output_tokens: attempt.usage.output_tokens,
        cost_usd: attempt.cost_usd,
        latency_ms: attempt.latency.as_millis() as u64,
        status: match &attempt.outcome {
            AttemptOutcome::Ok => "ok".to_string(),
            AttemptOutcome::Degraded => "degraded".to_string(),
            AttemptOutcome::Failed { kind, .. } => kind.clone(),
        },
        timestamp_ms: now_ms(),
    }
}

/// Convenience for callers: the journaled answer for each input request, in input order.
pub fn labels_in_order(request_ids: &[RequestId], records: &HashMap<RequestId, JournalRecord>) -> Vec<Option<String>> {
    request_ids.iter().map(|id| records.get(id).map(|r| r.response.text.clone())).collect()
}
