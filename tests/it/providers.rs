//! Each provider, streaming and not, against the mock: text, usage, logprobs, headers.

use crate::teacher_common as common;

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

/// `teacher.params.seed` was documented and validated but never sent: it must reach the
/// provider and be part of the request's identity (so a re-seeded run labels again).
#[tokio::test]
async fn the_spec_seed_reaches_the_provider_and_the_request_identity() {
    let spec: tangle::spec::Spec = serde_json::from_value(serde_json::json!({
        "name": "s",
        "teacher": {"targets": [{"provider": "openai_compatible", "model": "m"}], "params": {"temperature": 0.7, "seed": 7}},
        "dataset": {"path": "data.jsonl"}
    }))
    .unwrap();
    let teacher = spec.teacher.unwrap();
    let example: tangle::dataset::Example = serde_json::from_value(serde_json::json!({
        "id": "e1", "messages": [{"role": "user", "content": "where is my parcel"}]
    }))
    .unwrap();
    let seeded = tangle::stages::label::teacher_request(&teacher, &example);
    assert_eq!(seeded.params.seed, Some(7));
    let mut unseeded = seeded.clone();
    unseeded.params.seed = None;
    assert_ne!(seeded.content_id(), unseeded.content_id(), "the seed is part of the request's identity");

    let mock = mock().await;
    let router = router(vec![openai_target(&mock, "oa")], fast_policy());
    router.send(&seeded).await.unwrap();
    router.send(&unseeded).await.unwrap();
    let bodies = mock.received_bodies();
    assert_eq!(bodies[0]["seed"], 7, "{}", bodies[0]);
    assert!(bodies[1].get("seed").is_none(), "an unset seed is not sent: {}", bodies[1]);
}

/// Gemini (`generateContent` / `streamGenerateContent?alt=sse`): the same reply either way,
/// with usage, logprobs, the key in `x-goog-api-key` and the seed in `generationConfig`.
#[tokio::test]
async fn gemini_non_streaming_and_streaming_agree() {
    let mock = mock_with(MockConfig { expected_api_key: Some("k-gemini".into()), ..Default::default() }).await;
    for stream in [false, true] {
        let mut t = with_key(gemini_target(&mock, "gm"), "k-gemini");
        t.stream = stream;
        let router = router(vec![t], fast_policy());
        let mut req = request("where is my parcel");
        req.params.logprobs = Some(3);
        req.params.seed = Some(5);
        let routed = router.send(&req).await.unwrap();
        assert_eq!(routed.response.text, default_answer("where is my parcel"), "stream={stream}");
        assert_eq!(routed.response.usage.input_tokens, 7, "stream={stream}");
        assert_eq!(routed.response.usage.output_tokens, 2, "stream={stream}");
        assert_eq!(routed.response.finish_reason.as_deref(), Some("STOP"));
        assert_eq!(routed.response.model.as_deref(), Some("gm-model"));
        let lp = routed.response.logprobs.expect("logprobs requested");
        assert_eq!(lp.iter().map(|t| t.token.as_str()).collect::<String>(), routed.response.text);
        assert_eq!(lp[1].top.len(), 3, "stream={stream}");
        assert!((lp[1].logprob - -0.2).abs() < 1e-9, "stream={stream}");
    }
    let bodies = mock.received_bodies();
    assert_eq!(bodies.len(), 2);
    for body in &bodies {
        assert_eq!(body["generationConfig"]["seed"], 5, "{body}");
        assert_eq!(body["systemInstruction"]["parts"][0]["text"], "Classify.", "{body}");
    }
    let wrong = router(vec![with_key(gemini_target(&mock, "gm"), "k-wrong")], fast_policy());
    let err = wrong.send(&request("x")).await.unwrap_err();
    assert!(!format!("{err:?}").contains("k-wrong"), "the key is redacted: {err:?}");
}
