//! Streaming through the shared router without splicing.
//!
//! A streaming client needs each piece of the reply as it arrives, yet the same retries,
//! failover, health and Retry-After handling as every other call. So every proxy target is
//! a [`ProxyTarget`] wrapping the ordinary provider: when a request runs inside a [`Relay`]
//! scope (a tokio task-local set by the proxy around `Router::send`), the wrapper calls the
//! provider's [`Provider::stream`] and forwards each text delta to the relay; otherwise it
//! delegates. Endpoints, auth, bodies and SSE parsing are the providers' alone.
//!
//! The relay keeps only its own rule, the failover rule: the first non-empty delta
//! *commits* the request to that attempt. Before that, any failure is an ordinary router
//! failure (retry, fail over, cool down) and the client sees nothing. After it, a failure is
//! sent to the client as one error event and the request ends: a later attempt would repeat
//! or contradict text already delivered, so re-entering the wrapper after a commit parks
//! forever and the proxy abandons the route.
//!
//! Every streamed attempt, finished or not, is recorded in the relay as a router
//! [`Attempt`] for the ledger, since an abandoned route never returns its own list.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::board::BreakerBoard;
use super::wire::ClientError;
use crate::budget::{Reservation, Spend};
use crate::providers::config::{ProviderKind, TargetConfig};
use crate::providers::{ChatRequest, ChatResponse, DeltaSink, Provider, ProviderError, Usage};
use crate::router::{Attempt, AttemptOutcome};
use crate::support::{clock_now, lock};

tokio::task_local! {
    static RELAY: Arc<Relay>;
}

/// What a streaming request's response body receives, in order.
#[derive(Debug)]
pub(crate) enum RelayItem {
    /// The first text of the reply, from `target`; sent once, just before the first delta.
    Start {
        target: String,
    },
    Delta(String),
    /// The committed attempt failed: one error event, then the stream ends.
    Failed(ProviderError),
    /// The route ended (sent after every delta): the final reply, or why there is none.
    Finished(Result<ChatResponse, ClientError>),
}

pub(crate) struct Relay {
    tx: mpsc::UnboundedSender<RelayItem>,
    committed: AtomicBool,
    failed: AtomicBool,
    attempts: Mutex<Vec<Attempt>>,
}

impl Relay {
    pub(crate) fn new(tx: mpsc::UnboundedSender<RelayItem>) -> Arc<Self> {
        Arc::new(Self {
            tx,
            committed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            attempts: Mutex::new(Vec::new()),
        })
    }

    /// Runs `future` (the router's `send`) with this relay visible to every target.
    pub(crate) async fn scope<F: std::future::Future>(self: Arc<Self>, future: F) -> F::Output {
        RELAY.scope(self, future).await
    }

    pub(crate) fn is_committed(&self) -> bool {
        self.committed.load(Ordering::SeqCst)
    }

    /// Whether a committed attempt failed (the client was sent an error event).
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    pub(crate) fn take_attempts(&self) -> Vec<Attempt> {
        std::mem::take(&mut *lock(&self.attempts))
    }

    pub(crate) fn send(&self, item: RelayItem) {
        if matches!(item, RelayItem::Failed(_)) {
            self.failed.store(true, Ordering::SeqCst);
        }
        // The receiver is gone only when the client left; nothing to tell then.
        let _ = self.tx.send(item);
    }
}

/// Where a target-scope breaker refusal is marked, so the ledger can label it.
pub(crate) const BREAKER_OPEN_PREFIX: &str = "circuit breaker open: ";

/// One upstream target as the proxy's router sees it.
pub(crate) struct ProxyTarget {
    pub(crate) index: usize,
    pub(crate) config: TargetConfig,
    pub(crate) name: String,
    inner: Arc<dyn Provider>,
    board: Arc<BreakerBoard>,
    breaker_id: Option<String>,
}

/// How the router asked a target to answer.
enum Exchange<'a> {
    Once,
    Stream(DeltaSink<'a>),
}

impl ProxyTarget {
    pub(crate) fn new(
        index: usize,
        config: TargetConfig,
        inner: Arc<dyn Provider>,
        board: Arc<BreakerBoard>,
        breaker_id: Option<String>,
    ) -> Self {
        Self { index, name: config.display_name(), config, inner, board, breaker_id }
    }

    fn cost(&self, usage: Usage) -> f64 {
        self.config.pricing.map_or(0.0, |p| p.cost_usd(usage.input_tokens, usage.output_tokens))
    }

    async fn call(&self, request: &ChatRequest, exchange: Exchange<'_>) -> Result<ChatResponse, ProviderError> {
        let relay = RELAY.try_with(Arc::clone).ok();
        if relay.as_ref().is_some_and(|r| r.is_committed()) {
            // See the module docs: the proxy drops this route as soon as it sees the failure.
            return std::future::pending().await;
        }
        let mut spend = match TargetSpend::admit(self, request) {
            Ok(spend) => spend,
            Err(refused) => {
                if let Some(relay) = &relay {
                    // No attempt object exists for a call never made; meter the refusal.
                    lock(&relay.attempts).push(Attempt {
                        target_index: self.index,
                        target: self.name.clone(),
                        provider: self.config.provider.as_str(),
                        model: self.config.model.clone(),
                        latency: Duration::ZERO,
                        usage: Usage::default(),
                        cost_usd: 0.0,
                        outcome: AttemptOutcome::Failed { kind: refused.kind_label(), message: refused.to_string() },
                    });
                }
                return Err(refused);
            }
        };
        let started = clock_now();
        let result = match (relay, exchange) {
            (Some(relay), _) => self.stream_through(request, relay).await,
            (None, Exchange::Once) => self.inner.complete_once(request).await,
            (None, Exchange::Stream(on_delta)) => self.inner.stream(request, on_delta).await,
        };
        if let Ok(response) = &result {
            spend.settle(response.usage, self.cost(response.usage), started);
        }
        result
    }

    async fn stream_through(&self, request: &ChatRequest, relay: Arc<Relay>) -> Result<ChatResponse, ProviderError> {
        let mut attempt = StreamAttempt {
            relay: &relay,
            target: self,
            started: tokio::time::Instant::now(),
            estimated_input: request.estimated_input_tokens(),
            committed_here: false,
            deltas: 0,
            finished: false,
        };
        let result = self.inner.stream(request, &mut |text: &str| attempt.delta(text)).await;
        attempt.finish(&result);
        result
    }
}

impl Provider for ProxyTarget {
    fn kind(&self) -> ProviderKind {
        self.config.provider
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    fn complete_once<'a>(&'a self, request: &'a ChatRequest) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(self.call(request, Exchange::Once))
    }

    fn stream<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_delta: DeltaSink<'a>,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(self.call(request, Exchange::Stream(on_delta)))
    }
}

/// A target-scope breaker's reservation for one attempt: settled with the real usage, or
/// released when the attempt fails or is dropped (timeout, cancelled request).
struct TargetSpend<'a> {
    target: &'a ProxyTarget,
    reservation: Option<Reservation>,
}

impl<'a> TargetSpend<'a> {
    fn admit(target: &'a ProxyTarget, request: &ChatRequest) -> Result<Self, ProviderError> {
        let Some(id) = &target.breaker_id else {
            return Ok(Self { target, reservation: None });
        };
        let output = u64::from(request.params.max_tokens.unwrap_or(256));
        let input = request.estimated_input_tokens();
        let estimate = Spend {
            tokens: input + output,
            cost_usd: target.cost(Usage { input_tokens: input, output_tokens: output }),
        };
        match target.board.admit(&[id.as_str()], estimate) {
            // `admit` on one id returns at most one reservation.
            Ok(mut reservations) => Ok(Self { target, reservation: reservations.pop().map(|(_, r)| r) }),
            // TargetFatal: the router fails over at once, without retrying this target.
            Err(refusal) => Err(ProviderError::Config(format!("{BREAKER_OPEN_PREFIX}{}", refusal.trip.message))),
        }
    }

    fn settle(&mut self, usage: Usage, cost_usd: f64, started: Instant) {
        if let (Some(id), Some(r)) = (&self.target.breaker_id, self.reservation.take()) {
            let actual = Spend { tokens: usage.total(), cost_usd };
            self.target.board.settle(&[(id.clone(), r)], &[], actual, started, clock_now());
        }
    }
}

impl Drop for TargetSpend<'_> {
    fn drop(&mut self) {
        if let (Some(id), Some(r)) = (&self.target.breaker_id, self.reservation.take()) {
            self.target.board.release(vec![(id.clone(), r)]);
        }
    }
}

/// Bookkeeping of one streamed attempt; records it in the relay however it ends.
struct StreamAttempt<'a> {
    relay: &'a Relay,
    target: &'a ProxyTarget,
    started: tokio::time::Instant,
    estimated_input: u64,
    committed_here: bool,
    /// Non-empty deltas forwarded (an estimate of output tokens when no usage arrives).
    deltas: u64,
    finished: bool,
}

impl StreamAttempt<'_> {
    fn delta(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.committed_here {
            self.committed_here = true;
            self.relay.committed.store(true, Ordering::SeqCst);
            self.relay.send(RelayItem::Start { target: self.target.name.clone() });
        }
        self.deltas += 1;
        self.relay.send(RelayItem::Delta(text.to_string()));
    }

    fn record(&self, outcome: AttemptOutcome, usage: Usage) {
        let latency = self.started.elapsed();
        let outcome = match outcome {
            AttemptOutcome::Ok if self.target.config.latency_threshold.is_some_and(|l| latency > l) => {
                AttemptOutcome::Degraded
            }
            other => other,
        };
        lock(&self.relay.attempts).push(Attempt {
            target_index: self.target.index,
            target: self.target.name.clone(),
            provider: self.target.config.provider.as_str(),
            model: self.target.config.model.clone(),
            latency,
            usage,
            cost_usd: self.target.cost(usage),
            outcome,
        });
    }

    /// Usage of an attempt that delivered text and then failed: the prompt estimate and one
    /// token per delta, since the upstream's own count never arrived.
    fn partial_usage(&self) -> Usage {
        if self.deltas == 0 {
            Usage::default()
        } else {
            Usage { input_tokens: self.estimated_input, output_tokens: self.deltas }
        }
    }

    fn finish(&mut self, result: &Result<ChatResponse, ProviderError>) {
        self.finished = true;
        match result {
            Ok(response) => self.record(AttemptOutcome::Ok, response.usage),
            Err(error) => {
                self.record(
                    AttemptOutcome::Failed { kind: error.kind_label(), message: error.to_string() },
                    self.partial_usage(),
                );
                if self.committed_here {
                    self.relay.send(RelayItem::Failed(error.clone()));
                }
            }
        }
    }
}

impl Drop for StreamAttempt<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Dropped mid-attempt: the router's per-attempt timeout, or the request abandoned.
        let elapsed = self.started.elapsed();
        let timed_out = elapsed + Duration::from_millis(1) >= self.target.config.timeout;
        let (kind, error) = if timed_out {
            ("timeout", ProviderError::Timeout(self.target.config.timeout))
        } else {
            ("cancelled", ProviderError::Transport("the request was abandoned".into()))
        };
        self.record(AttemptOutcome::Failed { kind: kind.into(), message: error.to_string() }, self.partial_usage());
        if self.committed_here && timed_out {
            self.relay.send(RelayItem::Failed(error));
        }
    }
}
