//! Each provider, streaming and not, against the mock: text, usage, logprobs, headers.

#[path = "teacher_common/mod.rs"]
mod common;

use common::*;
use tangle::mock::{default_answer, MockConfig};
use tangle::providers::config::GenerationParams;
use tangle::providers::{ChatMessage, ChatRequest};

#[tokio::test]
async fn openai_compatible_non_streaming_and_streaming_agree() {
    let mock = mock().await;
    for stream in [false, true] {
        let mut t = openai_target(&mock, "oa");
        t.stream = stream;
        let router = router(vec![t], fast_policy());
        let routed = router.send(&request("where is my parcel")).await.unwrap();
        assert_eq!(routed.response.text, default_answer("where is my parcel"), "stream={stream}");
        // Mock: input = words of "system: Classify.\nuser: where is my parcel\n" = 7; output 2.
        assert_eq!(routed.response.usage.input_tokens, 7, "stream={stream}");
        assert_eq!(routed.response.usage.output_tokens, 2, "stream={stream}");
        assert_eq!(routed.response.finish_reason.as_deref(), Some("stop"));
        assert_eq!(routed.response.model.as_deref(), Some("oa-model"));
        assert!(routed.response.logprobs.is_none());
    }
    assert_eq!(mock.counts().total, 2);
    assert_eq!(mock.counts().ok, 2);
}

#[tokio::test]
async fn openai_logprobs_top_k_per_token() {
    let mock = mock().await;
    for stream in [false, true] {
        let mut t = openai_target(&mock, "oa");
        t.stream = stream;
        let router = router(vec![t], fast_policy());
        let mut req = request("refund please");
        req.params.logprobs = Some(3);
        let routed = router.send(&req).await.unwrap();
        let lp = routed.response.logprobs.expect("logprobs requested");
        assert_eq!(lp.len(), 2, "one entry per output token (stream={stream})");
        assert_eq!(lp.iter().map(|t| t.token.as_str()).collect::<String>(), routed.response.text);
        for (i, tok) in lp.iter().enumerate() {
            assert_eq!(tok.top.len(), 3);
            assert_eq!(tok.top[0].token, tok.token);
            assert!((tok.logprob - (-0.1 * (i as f64 + 1.0))).abs() < 1e-9);
            assert!((tok.top[2].logprob - (tok.logprob - 2.0)).abs() < 1e-9);
        }
    }
}

#[tokio::test]
async fn max_tokens_truncates_with_length_finish_reason() {
    let mock =
        mock_with(MockConfig { answer: std::sync::Arc::new(|_| "one two three four".into()), ..Default::default() })
            .await;
    let router = router(vec![anthropic_target(&mock, "an")], fast_policy());
    let mut req = request("x");
    req.params.max_tokens = Some(2);
    let routed = router.send(&req).await.unwrap();
    assert_eq!(routed.response.text, "one two");
    assert_eq!(routed.response.finish_reason.as_deref(), Some("max_tokens"));
    assert_eq!(routed.response.usage.output_tokens, 2);
}

#[tokio::test]
async fn anthropic_non_streaming_and_streaming() {
    // The mock rejects a `system` role inside messages, a missing anthropic-version header
    // and a missing max_tokens, exactly like the real API.
    let mock = mock_with(MockConfig { expected_api_key: Some("k-anthropic".into()), ..Default::default() }).await;
    for stream in [false, true] {
        let mut t = with_key(anthropic_target(&mock, "an"), "k-anthropic");
        t.stream = stream;
        let router = router(vec![t], fast_policy());
        let req = ChatRequest::new(
            vec![ChatMessage::system("Be terse."), ChatMessage::user("hello there")],
            GenerationParams::default(),
        );
        let routed = router.send(&req).await.unwrap();
        assert_eq!(routed.response.text, default_answer("hello there"));
        assert_eq!(routed.response.usage.input_tokens, 6, "stream={stream}");
        assert_eq!(routed.response.usage.output_tokens, 2, "stream={stream}");
        assert_eq!(routed.response.finish_reason.as_deref(), Some("end_turn"));
    }
    assert_eq!(mock.counts().ok, 2);
    assert!(mock.received_prompts()[0].starts_with("system: Be terse.\nuser: hello there"));
}

#[tokio::test]
async fn api_key_is_sent_as_bearer() {
    let mock = mock_with(MockConfig { expected_api_key: Some("sk-right".into()), ..Default::default() }).await;
    let ok = router(vec![with_key(openai_target(&mock, "a"), "sk-right")], fast_policy());
    assert!(ok.send(&request("x")).await.is_ok());
    let bad = router(vec![with_key(openai_target(&mock, "a"), "sk-wrong")], fast_policy());
    let err = bad.send(&request("x")).await.unwrap_err();
    assert!(err.to_string().contains("HTTP 401"), "{err}");
}
