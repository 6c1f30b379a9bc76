//! Helpers shared by the integration tests: targets pointing at mock servers, fast
//! router policies, simple requests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tangle::mock::{MockConfig, MockServer};
use tangle::providers::config::{GenerationParams, ProviderKind, SecretString, TargetConfig};
use tangle::providers::{ChatMessage, ChatRequest};
use tangle::router::{BackoffPolicy, HealthPolicy, Router, RouterPolicy};

pub fn openai_target(mock: &MockServer, name: &str) -> TargetConfig {
    let mut t = TargetConfig::new(ProviderKind::OpenaiCompatible, format!("{name}-model"));
    t.base_url = Some(mock.openai_base_url());
    t.name = Some(name.to_string());
    t.timeout = Duration::from_millis(500);
    t.max_retries = 2;
    t
}

pub fn anthropic_target(mock: &MockServer, name: &str) -> TargetConfig {
    let mut t = TargetConfig::new(ProviderKind::Anthropic, format!("{name}-model"));
    t.base_url = Some(mock.anthropic_base_url());
    t.name = Some(name.to_string());
    t.timeout = Duration::from_millis(500);
    t.max_retries = 2;
    t
}

pub fn gemini_target(mock: &MockServer, name: &str) -> TargetConfig {
    let mut t = TargetConfig::new(ProviderKind::Gemini, format!("{name}-model"));
    t.base_url = Some(mock.gemini_base_url());
    t.name = Some(name.to_string());
    t.timeout = Duration::from_millis(500);
    t.max_retries = 2;
    t
}

pub fn with_key(mut t: TargetConfig, key: &str) -> TargetConfig {
    t.api_key = Some(SecretString::new(key));
    t
}

/// Millisecond backoff, a high failure threshold (so health does not interfere unless a
/// test wants it) and no waiting for cooled-down targets.
pub fn fast_policy() -> RouterPolicy {
    RouterPolicy {
        backoff: BackoffPolicy {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(20),
            multiplier: 2.0,
            max_retry_after: Duration::from_secs(3),
        },
        health: HealthPolicy { failure_threshold: 100, cooldown: Duration::from_secs(60) },
        max_wait_for_target: Duration::ZERO,
    }
}

pub fn router(targets: Vec<TargetConfig>, policy: RouterPolicy) -> Arc<Router> {
    Arc::new(Router::new(targets, policy).expect("router builds"))
}

pub fn request(text: &str) -> ChatRequest {
    ChatRequest::new(
        vec![ChatMessage::system("Classify."), ChatMessage::user(text)],
        GenerationParams { temperature: Some(0.0), max_tokens: Some(16), ..Default::default() },
    )
}

pub async fn mock() -> MockServer {
    MockServer::start(MockConfig::default()).await.expect("mock starts")
}

pub async fn mock_with(config: MockConfig) -> MockServer {
    MockServer::start(config).await.expect("mock starts")
}
