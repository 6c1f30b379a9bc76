//! Router: ordered targets, retries with backoff, failover, per-target health.
//!
//! For one request the router walks the targets in order. On each it makes up to
//! `1 + max_retries` attempts while errors are retryable, sleeping per [`BackoffPolicy`]
//! (honouring `Retry-After`); then it fails over to the next target. A target whose
//! consecutive failures (errors, timeouts, or successes slower than its
//! `latency_threshold`) reach [`HealthPolicy::failure_threshold`] is cooled down: skipped
//! by every request until the cool-down ends, after which a single request probes it.
//!
//! The policy pieces — [`BackoffPolicy::decide`] and [`TargetHealth`] — are pure and take
//! time as an argument; the router only adds the async edges (sleeping, calling).
//! The router does not journal, meter or enforce budgets: it reports every attempt in
//! [`Routed::attempts`] / [`RouteFailure::attempts`] and callers (labeling, proxy) record them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::providers::config::TargetConfig;
use crate::providers::{
    build_provider, default_http_client, ChatRequest, ChatResponse, ErrorClass, Provider, ProviderError, Usage,
};
use crate::ratelimit::RateLimiter;
use crate::support::{clock_now, lock};

/// Exponential backoff with "equal jitter": the delay for retry `n` is uniformly drawn from
/// `[d/2, d]` with `d = min(initial * multiplier^n, max)`, so synchronized clients spread out
/// but no retry is immediate.
#[derive(Debug, Clone)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// A `Retry-After` longer than this is not waited out on this target: fail over.
    pub max_retry_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(20),
            multiplier: 2.0,
            max_retry_after: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    WaitThenRetry(Duration),
    FailOver,
}

impl BackoffPolicy {
    /// `retry_index` counts retries already made on this target (0 for the first retry);
    /// `jitter` is a uniform sample in `[0, 1)`.
    pub fn decide(&self, retry_index: u32, retry_after: Option<Duration>, jitter: f64) -> RetryDecision {
        if let Some(hint) = retry_after {
            // The server said when; waiting less just burns a retry on another 429.
            return if hint > self.max_retry_after {
                RetryDecision::FailOver
            } else {
                RetryDecision::WaitThenRetry(hint)
            };
        }
        let exp = self.multiplier.max(1.0).powi(retry_index.min(63) as i32);
        let full = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let jitter = jitter.clamp(0.0, 1.0);
        RetryDecision::WaitThenRetry(Duration::from_secs_f64(full * (0.5 + 0.5 * jitter)))
    }
}

#[derive(Debug, Clone)]
pub struct HealthPolicy {
    /// Consecutive failures that cool a target down.
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self { failure_threshold: 3, cooldown: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    /// Skipped by everyone until `until`.
    CoolingDown {
        until: Instant,
    },
    /// One request is probing the target after a cool-down; others skip it.
    Probing {
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Go, as the single probe after a cool-down: one failure cools it down again.
    Probe,
    /// Skip; `retry_at` is when it may be admitted again.
    Skip {
        retry_at: Instant,
    },
}

/// Per-target health state machine:
/// `Healthy --threshold failures--> CoolingDown --cooldown elapsed, first caller--> Probing`;
/// `Probing --success--> Healthy`, `Probing --failure--> CoolingDown`.
#[derive(Debug, Clone)]
pub struct TargetHealth {
    policy: HealthPolicy,
    state: HealthState,
    consecutive_failures: u32,
}

impl TargetHealth {
    pub fn new(policy: HealthPolicy) -> Self {
        Self { policy, state: HealthState::Healthy, consecutive_failures: 0 }
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            HealthState::Healthy => Admission::Go,
            HealthState::CoolingDown { until } if now < until => Admission::Skip { retry_at: until },
            HealthState::CoolingDown { .. } => {
                self.state = HealthState::Probing { since: now };
                Admission::Probe
            }
            // A probe whose caller vanished (dropped future) must not wedge the target:
            // after another cool-down's worth of time a new probe is allowed.
            HealthState::Probing { since } if now >= since + self.policy.cooldown => {
                self.state = HealthState::Probing { since: now };
                Admission::Probe
            }
            HealthState::Probing { since } => {
                // Poll again soon: the probe usually resolves within one request latency.
                let poll = (self.policy.cooldown / 10).max(Duration::from_millis(5));
                Admission::Skip { retry_at: (now + poll).min(since + self.policy.cooldown) }
            }
        }
    }

    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.state = HealthState::Healthy;
    }

    /// Records a failure (or a too-slow success); returns true if the target is now
    /// cooling down.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let trip = matches!(self.state, HealthState::Probing { .. })
            || self.consecutive_failures >= self.policy.failure_threshold.max(1);
        if trip {
            self.state = HealthState::CoolingDown { until: now + self.policy.cooldown };
        }
        trip
    }
}

#[derive(Debug, Clone, Default)]
pub struct RouterPolicy {
    pub backoff: BackoffPolicy,
    pub health: HealthPolicy,
    /// When every target is cooling down, how long a request may wait for one to become
    /// probe-able before failing. Zero fails immediately.
    pub max_wait_for_target: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Ok,
    /// Succeeded, but slower than the target's latency threshold.
    Degraded,
    Failed {
        kind: String,
        message: String,
    },
}

/// One HTTP attempt, for the ledger.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub target_index: usize,
    pub target: String,
    pub provider: &'static str,
    pub model: String,
    pub latency: Duration,
    pub usage: Usage,
    pub cost_usd: f64,
    pub outcome: AttemptOutcome,
}

#[derive(Debug, Clone)]
pub struct Routed {
    pub response: ChatResponse,
    pub target_index: usize,
    pub target: String,
    pub cost_usd: f64,
    /// Every attempt, the successful one last.
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    #[error("target `{target}` rejected the request: {source}")]
    RequestRejected { target: String, source: ProviderError },
    #[error("all targets failed; last error from `{target}`: {source}")]
    AllTargetsFailed { target: String, source: ProviderError },
    #[error("no target available: all are cooling down")]
    NoTargetAvailable,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct RouteFailure {
    pub error: RouteError,
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterBuildError {
    #[error("no teacher targets configured")]
    NoTargets,
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

struct RoutedTarget {
    config: TargetConfig,
    name: String,
    provider: Arc<dyn Provider>,
    health: Mutex<TargetHealth>,
    limiter: Option<RateLimiter>,
}

/// Snapshot of one target for status displays.
#[derive(Debug, Clone)]
pub struct TargetStatus {
    pub name: String,
    pub state: HealthState,
    pub consecutive_failures: u32,
}

pub struct Router {
    targets: Vec<RoutedTarget>,
    policy: RouterPolicy,
}

impl Router {
    /// Builds providers for `targets` (in failover order) over one shared HTTP client.
    pub fn new(targets: Vec<TargetConfig>, policy: RouterPolicy) -> Result<Self, RouterBuildError> {
        let client = default_http_client()?;
        let mut built = Vec::with_capacity(targets.len());
        for target in targets {
            let provider = build_provider(&target, &client)?;
            built.push((target, provider));
        }
        Self::with_providers(built, policy)
    }

    /// Uses caller-supplied providers (tests, the local student).
    pub fn with_providers(
        targets: Vec<(TargetConfig, Arc<dyn Provider>)>,
        policy: RouterPolicy,
    ) -> Result<Self, RouterBuildError> {
        if targets.is_empty() {
            return Err(RouterBuildError::NoTargets);
        }
        let targets = targets
            .into_iter()
            .map(|(config, provider)| RoutedTarget {
                name: config.display_name(),
                limiter: config.rate_limits.as_ref().and_then(RateLimiter::new),
                health: Mutex::new(TargetHealth::new(policy.health.clone())),
                config,
                provider,
            })
            .collect();
        Ok(Self { targets, policy })
    }

    pub fn target_configs(&self) -> impl Iterator<Item = &TargetConfig> {
        self.targets.iter().map(|t| &t.config)
    }

    pub fn status(&self) -> Vec<TargetStatus> {
        self.targets
            .iter()
            .map(|t| {
                let h = lock(&t.health);
                TargetStatus { name: t.name.clone(), state: h.state(), consecutive_failures: h.consecutive_failures() }
            })
            .collect()
    }

    /// Sends one request through the targets; see the module docs for the policy.
    pub async fn send(&self, request: &ChatRequest) -> Result<Routed, RouteFailure> {
        let estimated_tokens = request.estimated_input_tokens() + u64::from(request.params.max_tokens.unwrap_or(256));
        let deadline = clock_now() + self.policy.max_wait_for_target;
        let mut attempts = Vec::new();
        let mut last_error: Option<(String, ProviderError)> = None;
        loop {
            let mut tried_any = false;
            let mut earliest_retry: Option<Instant> = None;
            for (index, target) in self.targets.iter().enumerate() {
                let admission = lock(&target.health).admit(clock_now());
                let is_probe = match admission {
                    Admission::Skip { retry_at } => {
                        earliest_retry = Some(earliest_retry.map_or(retry_at, |e| e.min(retry_at)));
                        continue;
                    }
                    Admission::Go => false,
                    Admission::Probe => true,
                };
                tried_any = true;
                match self.try_target(index, target, request, estimated_tokens, is_probe, &mut attempts).await {
                    TargetResult::Done(response, cost_usd) => {
                        return Ok(Routed {
                            response,
                            target_index: index,
                            target: target.name.clone(),
                            cost_usd,
                            attempts,
                        })
                    }
                    TargetResult::Rejected(error) => {
                        return Err(RouteFailure {
                            error: RouteError::RequestRejected { target: target.name.clone(), source: error },
                            attempts,
                        })
                    }
                    TargetResult::FailOver(error) => last_error = Some((target.name.clone(), error)),
                }
            }
            let now = clock_now();
            match earliest_retry {
                Some(retry_at) if !tried_any && now < deadline => {
                    tokio::time::sleep_until(retry_at.min(deadline).into()).await;
                }
                _ => {
                    let error = match last_error {
                        Some((target, source)) => RouteError::AllTargetsFailed { target, source },
                        None => RouteError::NoTargetAvailable,
                    };
                    return Err(RouteFailure { error, attempts });
                }
            }
        }
    }

    async fn try_target(
        &self,
        index: usize,
        target: &RoutedTarget,
        request: &ChatRequest,
        estimated_tokens: u64,
        is_probe: bool,
        attempts: &mut Vec<Attempt>,
    ) -> TargetResult {
        let mut retry_index = 0;
        loop {
            if let Some(limiter) = &target.limiter {
                limiter.acquire(estimated_tokens).await;
            }
            let started = tokio::time::Instant::now();
            let result =
                tokio::time::timeout(target.config.timeout, target.provider.complete(request, target.config.stream))
                    .await
                    .unwrap_or(Err(ProviderError::Timeout(target.config.timeout)));
            let latency = started.elapsed();
            let mut attempt = Attempt {
                target_index: index,
                target: target.name.clone(),
                provider: target.config.provider.as_str(),
                model: target.config.model.clone(),
                latency,
                usage: Usage::default(),
                cost_usd: 0.0,
                outcome: AttemptOutcome::Ok,
            };
            match result {
                Ok(response) => {
                    if let Some(limiter) = &target.limiter {
                        limiter.settle_tokens(estimated_tokens, response.usage.total());
                    }
                    let degraded = target.config.latency_threshold.is_some_and(|limit| latency > limit);
                    {
                        let mut health = lock(&target.health);
                        if degraded {
                            health.on_failure(clock_now());
                        } else {
                            health.on_success();
                        }
                    }
                    let cost = target
                        .config
                        .pricing
                        .map_or(0.0, |p| p.cost_usd(response.usage.input_tokens, response.usage.output_tokens));
                    attempt.usage = response.usage;
                    attempt.cost_usd = cost;
                    attempt.outcome = if degraded { AttemptOutcome::Degraded } else { AttemptOutcome::Ok };
                    attempts.push(attempt);
                    return TargetResult::Done(response, cost);
                }
                Err(error) => {
                    if let Some(limiter) = &target.limiter {
                        // Failed calls are not billed; give the estimate back.
                        limiter.settle_tokens(estimated_tokens, 0);
                    }
                    attempt.outcome = AttemptOutcome::Failed { kind: error.kind_label(), message: error.to_string() };
                    attempts.push(attempt);
                    tracing::debug!(target = %target.name, error = %error, "attempt failed");
                    match error.class() {
                        ErrorClass::RequestFatal => {
                            // The target answered sensibly; it is healthy.
                            lock(&target.health).on_success();
                            return TargetResult::Rejected(error);
                        }
                        ErrorClass::TargetFatal => {
                            lock(&target.health).on_failure(clock_now());
                            return TargetResult::FailOver(error);
                        }
                        ErrorClass::Retryable => {
                            let cooled = lock(&target.health).on_failure(clock_now());
                            if cooled || is_probe || retry_index >= target.config.max_retries {
                                return TargetResult::FailOver(error);
                            }
                            let jitter: f64 = rand::rng().random();
                            match self.policy.backoff.decide(retry_index, error.retry_after(), jitter) {
                                RetryDecision::FailOver => return TargetResult::FailOver(error),
                                RetryDecision::WaitThenRetry(delay) => {
                                    tokio::time::sleep(delay).await;
                                }
                            }
                            retry_index += 1;
                        }
                    }
                }
            }
        }
    }
}

enum TargetResult {
    Done(ChatResponse, f64),
    Rejected(ProviderError),
    FailOver(ProviderError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        let p = BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            multiplier: 2.0,
            max_retry_after: Duration::from_secs(5),
        };
        let wait = |i, j| match p.decide(i, None, j) {
            RetryDecision::WaitThenRetry(d) => d,
            RetryDecision::FailOver => panic!("unexpected failover"),
        };
        assert_eq!(wait(0, 1.0), Duration::from_millis(100));
        assert_eq!(wait(0, 0.0), Duration::from_millis(50));
        assert_eq!(wait(3, 1.0), Duration::from_millis(800));
        assert_eq!(wait(4, 1.0), Duration::from_millis(1000)); // capped
        assert_eq!(wait(60, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn backoff_honours_retry_after_or_fails_over() {
        let p = BackoffPolicy { max_retry_after: Duration::from_secs(5), ..Default::default() };
        assert_eq!(
            p.decide(0, Some(Duration::from_secs(3)), 0.5),
            RetryDecision::WaitThenRetry(Duration::from_secs(3))
        );
        assert_eq!(p.decide(0, Some(Duration::from_secs(6)), 0.5), RetryDecision::FailOver);
    }

    #[test]
    fn health_cools_down_then_admits_one_probe() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(10);
        let mut h = TargetHealth::new(HealthPolicy { failure_threshold: 2, cooldown });
        assert_eq!(h.admit(t0), Admission::Go);
        assert!(!h.on_failure(t0));
        assert!(h.on_failure(t0));
        assert_eq!(h.admit(t0 + Duration::from_secs(9)), Admission::Skip { retry_at: t0 + cooldown });
        let t1 = t0 + cooldown;
        assert_eq!(h.admit(t1), Admission::Probe);
        assert!(matches!(h.admit(t1), Admission::Skip { .. }), "only one probe at a time");
        // A failed probe cools down again immediately, regardless of the threshold.
        assert!(h.on_failure(t1));
        assert_eq!(h.admit(t1 + Duration::from_secs(1)), Admission::Skip { retry_at: t1 + cooldown });
        assert_eq!(h.admit(t1 + cooldown), Admission::Probe);
        h.on_success();
        assert_eq!(h.admit(t1 + cooldown), Admission::Go);
        assert_eq!(h.consecutive_failures(), 0);
    }

    #[test]
    fn abandoned_probe_does_not_wedge_target() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(1);
        let mut h = TargetHealth::new(HealthPolicy { failure_threshold: 1, cooldown });
        h.on_failure(t0);
        assert_eq!(h.admit(t0 + cooldown), Admission::Probe);
        // The probing caller never reports back; after another cool-down a new probe goes.
        assert_eq!(h.admit(t0 + cooldown * 2), Admission::Probe);
    }
}
