//! Every fault kind the mock can inject, and the router's response to it: retry, failover,
//! cool-down and re-probe, Retry-After. Counts come from the mock, so a client that retries
//! too much or too little fails these tests.

use crate::teacher_common as common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use tangle::mock::Fault;
use tangle::providers::config::ProviderKind;
use tangle::router::{AttemptOutcome, HealthPolicy, HealthState, RouteError};

fn failed_kind(outcome: &AttemptOutcome) -> &str {
    match outcome {
        AttemptOutcome::Failed { kind, .. } => kind,
        other => panic!("expected a failed attempt, got {other:?}"),
    }
}

/// One fault, then success on the retry: for both protocols, streaming and not.
#[tokio::test]
async fn each_retryable_fault_is_retried_once_then_succeeds() {
    let cases: Vec<(Fault, &str, &str)> = vec![
        // (fault, expected error kind non-streaming, streaming)
        (Fault::RateLimited { retry_after: Some("0".into()) }, "http_429", "http_429"),
        (Fault::ServerError, "http_500", "http_500"),
        (Fault::Overloaded, "http_529", "http_529"),
        (Fault::Status(502), "http_502", "http_502"),
        (Fault::Status(503), "http_503", "http_503"),
        (Fault::Status(504), "http_504", "http_504"),
        (Fault::Hang, "timeout", "timeout"),
        (Fault::Slow(Duration::from_secs(5)), "timeout", "timeout"),
        (Fault::TruncatedBody, "transport", "truncated"),
        (Fault::ConnectionReset, "transport", "transport"),
        (Fault::MalformedJson, "malformed", "malformed"),
        // Anthropic maps an in-stream overloaded_error to 529; OpenAI's in-stream error
        // object is a transport error. Both retryable. (The OpenAI row is patched below.)
        (Fault::OverloadedMidStream, "http_529", "http_529"),
    ];
    for protocol in [ProviderKind::OpenaiCompatible, ProviderKind::Anthropic, ProviderKind::Gemini] {
        for stream in [false, true] {
            for (fault, kind_plain, kind_stream) in &cases {
                let mock = mock().await;
                let mut t = match protocol {
                    ProviderKind::Anthropic => anthropic_target(&mock, "p"),
                    ProviderKind::Gemini => gemini_target(&mock, "p"),
                    _ => openai_target(&mock, "p"),
                };
                t.stream = stream;
                t.timeout = Duration::from_millis(300);
                let router = router(vec![t], fast_policy());
                mock.push_faults([fault.clone()]);
                let ctx = format!("{protocol:?} stream={stream} fault={fault:?}");
                let routed = router.send(&request("q")).await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert_eq!(routed.attempts.len(), 2, "{ctx}");
                let expected = match (fault, protocol, stream) {
                    (Fault::OverloadedMidStream, ProviderKind::OpenaiCompatible, true) => &"transport",
                    // Gemini's in-stream error object carries its own code (503 UNAVAILABLE).
                    (Fault::OverloadedMidStream, ProviderKind::Gemini, true) => &"http_503",
                    (_, _, true) => kind_stream,
                    (_, _, false) => kind_plain,
                };
                assert_eq!(failed_kind(&routed.attempts[0].outcome), *expected, "{ctx}");
                assert_eq!(routed.attempts[1].outcome, AttemptOutcome::Ok, "{ctx}");
                let counts = mock.counts();
                assert_eq!(counts.total, 2, "{ctx}");
                assert_eq!(counts.ok, 1, "{ctx}");
                assert_eq!(counts.faults.get(fault.label()), Some(&1), "{ctx}");
            }
        }
    }
}

#[tokio::test]
async fn retries_stop_at_max_retries() {
    let mock = mock().await;
    let mut t = openai_target(&mock, "only");
    t.max_retries = 3;
    let router = router(vec![t], fast_policy());
    mock.set_sticky_fault(Some(Fault::ServerError));
    let failure = router.send(&request("q")).await.unwrap_err();
    assert!(matches!(failure.error, RouteError::AllTargetsFailed { .. }), "{failure}");
    assert_eq!(failure.attempts.len(), 4);
    assert_eq!(mock.counts().total, 4);
}

#[tokio::test]
async fn retry_after_seconds_is_honoured() {
    let mock = mock().await;
    let router = router(vec![openai_target(&mock, "p")], fast_policy());
    mock.push_faults([Fault::RateLimited { retry_after: Some("1".into()) }]);
    let start = Instant::now();
    router.send(&request("q")).await.unwrap();
    let elapsed = start.elapsed();
    // Backoff alone would retry after <= 20 ms.
    assert!(elapsed >= Duration::from_millis(990), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[tokio::test]
async fn retry_after_http_date_is_honoured() {
    let mock = mock().await;
    let router = router(vec![openai_target(&mock, "p")], fast_policy());
    // HTTP dates have 1 s resolution: 2 s ahead means a wait in (1, 2] s.
    let when = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    mock.push_faults([Fault::RateLimited { retry_after: Some(when) }]);
    let start = Instant::now();
    router.send(&request("q")).await.unwrap();
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(2600), "{elapsed:?}");
}

#[tokio::test]
async fn long_retry_after_fails_over_instead_of_waiting() {
    let (primary, secondary) = (mock().await, mock().await);
    let router = router(vec![openai_target(&primary, "a"), openai_target(&secondary, "b")], fast_policy());
    primary.push_faults([Fault::RateLimited { retry_after: Some("30".into()) }]);
    let start = Instant::now();
    let routed = router.send(&request("q")).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(routed.target, "b");
    assert_eq!((primary.counts().total, secondary.counts().total), (1, 1));
}

#[tokio::test]
async fn bad_request_is_not_retried_nor_failed_over() {
    let (primary, secondary) = (mock().await, mock().await);
    let router = router(vec![openai_target(&primary, "a"), openai_target(&secondary, "b")], fast_policy());
    primary.push_faults([Fault::Status(400)]);
    let failure = router.send(&request("q")).await.unwrap_err();
    assert!(matches!(failure.error, RouteError::RequestRejected { .. }), "{failure}");
    assert_eq!((primary.counts().total, secondary.counts().total), (1, 0));
}

#[tokio::test]
async fn auth_and_not_found_fail_over_without_retry() {
    for status in [401, 403, 404] {
        let (primary, secondary) = (mock().await, mock().await);
        let router = router(vec![openai_target(&primary, "a"), anthropic_target(&secondary, "b")], fast_policy());
        primary.push_faults([Fault::Status(status)]);
        let routed = router.send(&request("q")).await.unwrap();
        assert_eq!(routed.target, "b", "status {status}");
        assert_eq!((primary.counts().total, secondary.counts().total), (1, 1), "status {status}");
    }
}

#[tokio::test]
async fn failover_follows_target_order() {
    let (a, b, c) = (mock().await, mock().await, mock().await);
    let router = router(vec![openai_target(&a, "a"), anthropic_target(&b, "b"), openai_target(&c, "c")], fast_policy());
    a.set_sticky_fault(Some(Fault::ServerError));
    b.set_sticky_fault(Some(Fault::Overloaded));
    let routed = router.send(&request("q")).await.unwrap();
    assert_eq!(routed.target, "c");
    let order: Vec<&str> = routed.attempts.iter().map(|a| a.target.as_str()).collect();
    assert_eq!(order, ["a", "a", "a", "b", "b", "b", "c"]);
    assert_eq!((a.counts().total, b.counts().total, c.counts().total), (3, 3, 1));
    // Once c is fixed as the only healthy one, a fresh request still starts at a.
    a.set_sticky_fault(None);
    assert_eq!(router.send(&request("q2")).await.unwrap().target, "a");
}

#[tokio::test]
async fn dead_primary_is_cooled_down_then_probed() {
    let (primary, secondary) = (mock().await, mock().await);
    let mut policy = fast_policy();
    let cooldown = Duration::from_millis(300);
    policy.health = HealthPolicy { failure_threshold: 2, cooldown };
    let mut a = openai_target(&primary, "a");
    a.max_retries = 5;
    let router = router(vec![a, openai_target(&secondary, "b")], policy);
    primary.set_sticky_fault(Some(Fault::ServerError));

    // Two failures trip the breaker even though 5 retries were allowed.
    assert_eq!(router.send(&request("1")).await.unwrap().target, "b");
    assert_eq!(primary.counts().total, 2);
    assert!(matches!(router.status()[0].state, HealthState::CoolingDown { .. }));

    // While cooling down, the primary is skipped entirely.
    for i in 0..5 {
        assert_eq!(router.send(&request(&format!("skip{i}"))).await.unwrap().target, "b");
    }
    assert_eq!(primary.counts().total, 2);

    // After the cool-down one probe goes to the primary; it fails -> cooled down again
    // after a single attempt.
    tokio::time::sleep(cooldown + Duration::from_millis(50)).await;
    assert_eq!(router.send(&request("probe1")).await.unwrap().target, "b");
    assert_eq!(primary.counts().total, 3);

    // The primary recovers; after the next cool-down the probe succeeds and it serves again.
    primary.set_sticky_fault(None);
    assert_eq!(router.send(&request("still-cooling")).await.unwrap().target, "b");
    tokio::time::sleep(cooldown + Duration::from_millis(50)).await;
    assert_eq!(router.send(&request("probe2")).await.unwrap().target, "a");
    assert_eq!(router.status()[0].state, HealthState::Healthy);
    assert_eq!(router.send(&request("after")).await.unwrap().target, "a");
}

#[tokio::test]
async fn all_targets_cooling_down_waits_for_probe_when_allowed() {
    let mock = mock().await;
    let mut policy = fast_policy();
    policy.health = HealthPolicy { failure_threshold: 1, cooldown: Duration::from_millis(200) };
    let router_no_wait = router(vec![openai_target(&mock, "a")], policy.clone());
    mock.push_faults([Fault::ServerError]);
    assert!(router_no_wait.send(&request("1")).await.is_err());
    let failure = router_no_wait.send(&request("2")).await.unwrap_err();
    assert!(matches!(failure.error, RouteError::NoTargetAvailable), "{failure}");
    assert_eq!(mock.counts().total, 1);

    policy.max_wait_for_target = Duration::from_secs(2);
    let router_wait = router(vec![openai_target(&mock, "a")], policy);
    mock.push_faults([Fault::ServerError]);
    assert!(router_wait.send(&request("3")).await.is_err());
    let start = Instant::now();
    assert!(router_wait.send(&request("4")).await.is_ok());
    assert!(start.elapsed() >= Duration::from_millis(150), "{:?}", start.elapsed());
}

#[tokio::test]
async fn degraded_latency_moves_traffic_to_next_target() {
    let (slow, fast) = (mock().await, mock().await);
    let mut policy = fast_policy();
    policy.health = HealthPolicy { failure_threshold: 2, cooldown: Duration::from_secs(60) };
    let mut a = openai_target(&slow, "slow");
    a.latency_threshold = Some(Duration::from_millis(40));
    let router = router(vec![a, openai_target(&fast, "fast")], policy);
    slow.set_sticky_fault(Some(Fault::Slow(Duration::from_millis(80))));
    // Slow answers are still used (they are paid for) but count against health.
    let r1 = router.send(&request("1")).await.unwrap();
    assert_eq!(r1.target, "slow");
    assert_eq!(r1.attempts[0].outcome, AttemptOutcome::Degraded);
    assert_eq!(router.send(&request("2")).await.unwrap().target, "slow");
    // Two degraded calls in a row: the slow target is cooled down.
    assert_eq!(router.send(&request("3")).await.unwrap().target, "fast");
    assert_eq!((slow.counts().total, fast.counts().total), (2, 1));
}

#[tokio::test]
async fn rate_limit_spaces_requests() {
    let mock = mock().await;
    let mut t = openai_target(&mock, "a");
    // 600/min = 10/s with a 10 s burst of 100: request 101..105 wait 0.1 s each.
    t.rate_limits = Some(tangle::providers::config::RateLimits { requests_per_min: Some(600), tokens_per_min: None });
    let router = router(vec![t], fast_policy());
    let start = Instant::now();
    for i in 0..105 {
        router.send(&request(&i.to_string())).await.unwrap();
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    assert_eq!(mock.counts().total, 105);
}
