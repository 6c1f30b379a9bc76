//! The proxy's failover matrix: every fault the mock can inject, on an OpenAI-compatible and
//! on an Anthropic primary, streaming and not, with a healthy secondary behind it.
//!
//! The rule under test: before the first content byte reaches the client, any fault fails
//! over invisibly (the client gets the secondary's whole answer, and nothing else); after
//! it, the client gets the partial text and one error event, never text from a second
//! target. Counts come from the mocks and the ledger, so a proxy that retries too much,
//! splices, or forgets to meter fails here.

use crate::proxy_common as common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tangle::ledger::GroupBy;
use tangle::mock::{default_answer, Fault, MockConfig, MockServer};

const SECONDARY_ANSWER: &str = "from-secondary ok";

async fn secondary() -> MockServer {
    MockServer::start(MockConfig {
        expected_api_key: Some(UPSTREAM_KEY.into()),
        answer: Arc::new(|_| SECONDARY_ANSWER.to_string()),
        ..Default::default()
    })
    .await
    .expect("mock starts")
}

/// The primary's wire protocol.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Primary {
    OpenAi,
    Anthropic,
    Gemini,
}

fn config(primary: &MockServer, anthropic: bool, secondary: &MockServer, primary_retries: u32) -> String {
    config_for(primary, if anthropic { Primary::Anthropic } else { Primary::OpenAi }, secondary, primary_retries)
}

fn config_for(primary: &MockServer, protocol: Primary, secondary: &MockServer, primary_retries: u32) -> String {
    let (provider, base) = match protocol {
        Primary::Anthropic => ("anthropic", primary.anthropic_base_url()),
        Primary::OpenAi => ("openai_compatible", primary.openai_base_url()),
        Primary::Gemini => ("gemini", primary.gemini_base_url()),
    };
    format!(
        "state_dir: STATE_DIR
routes:
  support:
    targets:
      - {{ name: primary, provider: {provider}, model: p-model, base_url: '{base}', api_key: '${{UPSTREAM_KEY}}',
           timeout: 400ms, max_retries: {primary_retries}, pricing: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}
      - {{ name: secondary, provider: openai_compatible, model: s-model, base_url: '{}',
           api_key: '${{UPSTREAM_KEY}}', timeout: 5s, max_retries: 0 }}
keys:
  - {{ name: app, key: '${{APP_KEY}}' }}
router: {{ failure_threshold: 100, backoff_initial: 1ms, backoff_max: 5ms }}
",
        secondary.openai_base_url()
    )
}

/// What the client must see for one case.
#[derive(Debug, PartialEq)]
enum Expect {
    /// The secondary's whole answer, as if nothing happened; `primary_status` is the
    /// ledger label of the primary's failed attempt.
    FailedOver { primary_status: &'static str },
    /// The primary's partial text, then one error event; the secondary is never called.
    ErrorAfterFirstByte,
}

/// Each fault the mock injects, with the ledger label of the primary's failed attempt when
/// the request fails over.
fn fault_matrix() -> Vec<(Fault, &'static str)> {
    vec![
        (Fault::RateLimited { retry_after: Some("0".into()) }, "http_429"),
        (Fault::ServerError, "http_500"),
        (Fault::Overloaded, "http_529"),
        (Fault::Status(503), "http_503"),
        (Fault::Status(401), "http_401"),
        (Fault::Hang, "timeout"),
        (Fault::Slow(Duration::from_secs(3)), "timeout"),
        (Fault::TruncatedBody, "transport"),
        (Fault::ConnectionReset, "transport"),
        (Fault::MalformedJson, "malformed"),
        (Fault::OverloadedMidStream, "http_529"),
    ]
}

#[tokio::test]
async fn every_fault_streaming_or_not_fails_over_before_the_first_byte_and_never_splices_after() {
    use Expect::*;
    let faults = fault_matrix();
    let mut checked = 0;
    for anthropic in [false, true] {
        for stream in [false, true] {
            for (fault, status) in &faults {
                let expect = match (fault, stream) {
                    // The mock cuts these after half the stream's events: text has gone out.
                    (Fault::OverloadedMidStream, true) => ErrorAfterFirstByte,
                    // Half the bytes: the OpenAI stream has delivered its first token by then;
                    // the Anthropic one is still in `message_start`'s neighbours.
                    (Fault::TruncatedBody, true) if !anthropic => ErrorAfterFirstByte,
                    (Fault::TruncatedBody, true) => FailedOver { primary_status: "truncated" },
                    _ => FailedOver { primary_status: status },
                };
                run_case(fault, anthropic, stream, expect).await;
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 44);
}

async fn run_case(fault: &Fault, anthropic: bool, stream: bool, expect: Expect) {
    run_case_on(fault, if anthropic { Primary::Anthropic } else { Primary::OpenAi }, stream, expect).await
}

/// A Gemini primary: the same fault matrix, the same rule (fail over before the first byte,
/// never splice after it), with Gemini's own in-stream error (503) and cut points.
#[tokio::test]
async fn every_fault_on_a_gemini_primary_fails_over_before_the_first_byte_and_never_splices_after() {
    use Expect::*;
    let faults = fault_matrix();
    let mut checked = 0;
    for stream in [false, true] {
        for (fault, status) in &faults {
            let expect = match (fault, stream) {
                // Both cut after the first of the reply's two chunks: its text has gone out.
                (Fault::OverloadedMidStream | Fault::TruncatedBody, true) => ErrorAfterFirstByte,
                _ => FailedOver { primary_status: status },
            };
            run_case_on(fault, Primary::Gemini, stream, expect).await;
            checked += 1;
        }
    }
    assert_eq!(checked, 22);
}

async fn run_case_on(fault: &Fault, protocol: Primary, stream: bool, expect: Expect) {
    let ctx = format!("fault={fault:?} primary={protocol:?} stream={stream}");
    let (primary, backup) = (mock().await, secondary().await);
    let proxy = TestProxy::start(&config_for(&primary, protocol, &backup, 0)).await;
    primary.push_faults([fault.clone()]);
    let prompt = "where is my parcel";
    let answer = chat(&proxy.url, APP_KEY, "support", prompt, stream).await;
    assert_eq!(answer.status, 200, "{ctx}: {answer:?}");
    assert_eq!(primary.counts().total, 1, "{ctx}: exactly one call to the primary (max_retries: 0)");
    match expect {
        Expect::FailedOver { primary_status } => {
            assert_eq!(answer.target.as_deref(), Some("secondary"), "{ctx}");
            if stream {
                assert_eq!(answer.streamed_text(), SECONDARY_ANSWER, "{ctx}: {:?}", answer.events);
                assert!(answer.stream_error().is_none(), "{ctx}: failover must be invisible: {:?}", answer.events);
                assert_eq!(answer.events.last().map(String::as_str), Some("[DONE]"), "{ctx}");
                let first: serde_json::Value = serde_json::from_str(&answer.events[0]).unwrap();
                assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "{ctx}");
                let usage = answer.events.iter().rev().nth(1).unwrap();
                assert!(usage.contains("\"usage\""), "{ctx}: usage chunk asked for: {usage}");
            } else {
                assert_eq!(answer.text(), SECONDARY_ANSWER, "{ctx}");
                assert_eq!(answer.json["model"], "support", "{ctx}");
                assert!(answer.json["usage"]["total_tokens"].as_u64().unwrap() > 0, "{ctx}");
            }
            assert_eq!(backup.counts().total, 1, "{ctx}");
            let rows = ledger_totals(&proxy.state_dir(), GroupBy::Target, 2).await;
            let primary_row = rows.iter().find(|r| r.key == "primary").expect("primary metered");
            assert_eq!((primary_row.calls, primary_row.failed_calls), (1, 1), "{ctx}");
            let statuses = ledger_statuses(&proxy).await;
            assert_eq!(statuses, vec![primary_status.to_string(), "ok".into()], "{ctx}");
        }
        Expect::ErrorAfterFirstByte => {
            assert_eq!(answer.target.as_deref(), Some("primary"), "{ctx}");
            let text = answer.streamed_text();
            assert!(!text.is_empty(), "{ctx}: the partial text was streamed");
            assert!(default_answer(prompt).starts_with(&text), "{ctx}: `{text}` is the primary's prefix only");
            let error = answer.stream_error().unwrap_or_else(|| panic!("{ctx}: no error event: {:?}", answer.events));
            assert_eq!(error["type"], "upstream_error", "{ctx}");
            assert!(error["message"].as_str().unwrap().contains("not retried elsewhere"), "{ctx}");
            assert!(!answer.events.iter().any(|e| e == "[DONE]"), "{ctx}: a failed stream does not end with [DONE]");
            assert_eq!(backup.counts().total, 0, "{ctx}: nothing may be spliced from the secondary");
            let statuses = ledger_statuses(&proxy).await;
            assert_eq!(statuses.len(), 1, "{ctx}: {statuses:?}");
            assert_ne!(statuses[0], "ok", "{ctx}");
        }
    }
}

/// Ledger statuses of the proxy's rows, in insertion order.
async fn ledger_statuses(proxy: &TestProxy) -> Vec<String> {
    let _ = ledger_totals(&proxy.state_dir(), GroupBy::Target, 1).await;
    let conn = rusqlite::Connection::open(proxy.state_dir().join("ledger.sqlite")).expect("open ledger");
    let mut stmt = conn.prepare("SELECT status FROM calls ORDER BY id").expect("query");
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).expect("rows");
    rows.map(|r| r.expect("row")).collect()
}

#[tokio::test]
async fn a_committed_stream_is_not_retried_even_on_the_same_target() {
    let (primary, backup) = (mock().await, secondary().await);
    let proxy = TestProxy::start(&config(&primary, false, &backup, 3)).await;
    primary.push_faults([Fault::OverloadedMidStream]);
    let answer = chat(&proxy.url, APP_KEY, "support", "q", true).await;
    assert!(answer.stream_error().is_some(), "{answer:?}");
    // Give an (incorrect) retry time to happen, then count.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(primary.counts().total, 1, "no retry after the first byte, despite max_retries: 3");
    assert_eq!(backup.counts().total, 0);
    // The next request is served normally by the same primary.
    let next = chat(&proxy.url, APP_KEY, "support", "q", true).await;
    assert_eq!(next.streamed_text(), default_answer("q"));
    assert_eq!(next.target.as_deref(), Some("primary"));
}

#[tokio::test]
async fn when_every_target_fails_the_client_gets_an_http_error_not_a_broken_stream() {
    let (primary, backup) = (mock().await, secondary().await);
    let proxy = TestProxy::start(&config(&primary, false, &backup, 1)).await;
    primary.set_sticky_fault(Some(Fault::ServerError));
    backup.set_sticky_fault(Some(Fault::Status(503)));
    for stream in [false, true] {
        let answer = chat(&proxy.url, APP_KEY, "support", "q", stream).await;
        assert_eq!(answer.status, 502, "stream={stream}: {answer:?}");
        assert!(answer.events.is_empty(), "stream={stream}: nothing was streamed");
        assert_eq!(answer.json["error"]["type"], "upstream_error");
        assert_eq!(answer.json["error"]["code"], "upstream_failed");
        let message = answer.json["error"]["message"].as_str().unwrap();
        assert!(message.contains("`secondary`") && message.contains("503"), "{message}");
        assert!(!message.contains(UPSTREAM_KEY));
    }
    // 2 attempts on the primary (max_retries 1) and 1 on the secondary, per request.
    assert_eq!(primary.counts().total, 4);
    assert_eq!(backup.counts().total, 2);
}

#[tokio::test]
async fn health_cool_down_skips_a_dead_target_then_probes_it() {
    let (primary, backup) = (mock().await, secondary().await);
    let yaml =
        config(&primary, false, &backup, 0).replace("failure_threshold: 100", "failure_threshold: 2, cooldown: 300ms");
    let proxy = TestProxy::start(&yaml).await;
    primary.set_sticky_fault(Some(Fault::ServerError));
    for _ in 0..5 {
        let answer = chat(&proxy.url, APP_KEY, "support", "q", false).await;
        assert_eq!(answer.target.as_deref(), Some("secondary"));
    }
    assert_eq!(primary.counts().total, 2, "cooled down after 2 failures, then skipped");
    let state: serde_json::Value =
        client().get(format!("{}/dashboard/state", proxy.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(state["routes"][0]["targets"][0]["state"], "cooling_down", "{state}");
    primary.set_sticky_fault(None);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let answer = chat(&proxy.url, APP_KEY, "support", "q", true).await;
    assert_eq!(answer.target.as_deref(), Some("primary"), "the probe succeeded");
}

/// The Anthropic Messages endpoint, driven by tangle's own Anthropic client (which parses
/// what api.anthropic.com sends): the same failover rule, the same meters.
#[tokio::test]
async fn the_anthropic_messages_endpoint_fails_over_the_same_way() {
    use tangle::providers::config::{GenerationParams, ProviderKind, SecretString, TargetConfig};
    use tangle::providers::{AnthropicProvider, ChatMessage, ChatRequest, Provider, ProviderError};

    let (primary, backup) = (mock().await, secondary().await);
    let proxy = TestProxy::start(&config(&primary, false, &backup, 0)).await;
    let mut target = TargetConfig::new(ProviderKind::Anthropic, "support");
    target.base_url = Some(proxy.url.clone());
    target.api_key = Some(SecretString::new(APP_KEY));
    let messages_api = AnthropicProvider::new(&target, reqwest::Client::new()).unwrap();
    let request = ChatRequest::new(
        vec![ChatMessage::system("Classify."), ChatMessage::user("where is my parcel")],
        GenerationParams { max_tokens: Some(16), ..Default::default() },
    );
    for stream in [false, true] {
        let plain = messages_api.complete(&request, stream).await.unwrap();
        assert_eq!(plain.text, default_answer("where is my parcel"), "stream={stream}");
        assert_eq!(plain.finish_reason.as_deref(), Some("end_turn"));
        assert_eq!(plain.usage.output_tokens, 2);
        assert!(plain.usage.input_tokens > 0);
        primary.push_faults([Fault::Overloaded]);
        let failed_over = messages_api.complete(&request, stream).await.unwrap();
        assert_eq!(failed_over.text, SECONDARY_ANSWER, "stream={stream}: invisible failover");
    }
    primary.push_faults([Fault::OverloadedMidStream]);
    let cut = messages_api.complete(&request, true).await.unwrap_err();
    assert!(matches!(cut, ProviderError::Http { status: 500, .. }), "an `api_error` event: {cut:?}");
    assert!(cut.to_string().contains("not retried elsewhere"), "{cut}");
    assert_eq!(backup.counts().total, 2, "only the two failovers reached the secondary");

    let raw = client()
        .post(format!("{}/v1/messages", proxy.url))
        .header("x-api-key", "wrong-key-wrong-key")
        .json(&serde_json::json!({"model": "support", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 401);
    let body: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    let by_key = ledger_totals(&proxy.state_dir(), GroupBy::ApiKey, 7).await;
    assert_eq!(by_key.iter().map(|t| t.calls).sum::<u64>(), 7, "{by_key:?}");
}

/// A route's `capture` file is a dataset `tangle run` can read: one row per answered
/// request with the prompt messages and the answer as its reference.
#[tokio::test]
async fn answered_requests_are_captured_as_a_dataset() {
    let (primary, backup) = (mock().await, secondary().await);
    let yaml = config(&primary, false, &backup, 0).replace("keys:", "    capture: captured/support.jsonl\nkeys:");
    let proxy = TestProxy::start(&yaml).await;
    for (i, stream) in [false, true, false].into_iter().enumerate() {
        assert_eq!(chat(&proxy.url, APP_KEY, "support", &format!("question {i}"), stream).await.status, 200);
    }
    primary.set_sticky_fault(Some(Fault::Status(400)));
    assert_eq!(chat(&proxy.url, APP_KEY, "support", "rejected", false).await.status, 400);
    let text = std::fs::read_to_string(proxy.dir.path().join("captured/support.jsonl")).unwrap();
    let parsed = tangle::dataset::parse_jsonl(&text).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(parsed.examples.len(), 3, "only answered requests:\n{text}");
    let first = &parsed.examples[0];
    assert_eq!(first.reference.as_deref(), Some(default_answer("question 0").as_str()));
    assert_eq!(first.messages.last().unwrap().content, "question 0");
    assert!(!text.contains(APP_KEY) && !text.contains(UPSTREAM_KEY));
    let row: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        (row["route"].as_str(), row["key"].as_str(), row["target"].as_str()),
        (Some("support"), Some("app"), Some("primary"))
    );
}
