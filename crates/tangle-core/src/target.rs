//! The vocabulary of teacher and upstream targets shared by the spec (`teacher.targets`)
//! and the proxy's config: which wire protocol a target speaks, and what each protocol
//! needs, so both files are checked by the same rules with the same hints; and the plain
//! data a target carries (pricing, rate limits) and a labeling run's budget, defined once
//! for the spec, the providers and the proxy.

use serde::{Deserialize, Serialize};

/// Which wire protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Anthropic Messages API.
    Anthropic,
    /// api.openai.com Chat Completions.
    Openai,
    /// Any server speaking OpenAI Chat Completions at `base_url` (vLLM, llama.cpp, Ollama,
    /// `tangle serve`).
    OpenaiCompatible,
    /// Google's Gemini API (`generateContent` / `streamGenerateContent`).
    Gemini,
}

impl ProviderKind {
    /// The spelling in spec and config files, ledger rows and journal records.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenaiCompatible => "openai_compatible",
            ProviderKind::Gemini => "gemini",
        }
    }

    /// The environment variable hints suggest for this provider's key.
    pub fn api_key_variable(self) -> &'static str {
        match self {
            ProviderKind::Openai => "OPENAI_API_KEY",
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
            ProviderKind::OpenaiCompatible => "UPSTREAM_API_KEY",
            ProviderKind::Gemini => "GEMINI_API_KEY",
        }
    }

    /// Whether a target of this kind must say where it is (`base_url`): only a generic
    /// OpenAI-compatible server has no public endpoint to default to.
    pub fn needs_base_url(self) -> bool {
        self == ProviderKind::OpenaiCompatible
    }

    /// Whether a target of this kind needs an API key (a local server usually has none).
    pub fn needs_api_key(self) -> bool {
        self != ProviderKind::OpenaiCompatible
    }

    /// Whether the protocol carries a sampling seed (Anthropic's Messages API has none).
    pub fn accepts_seed(self) -> bool {
        self != ProviderKind::Anthropic
    }
}

/// Price of a target in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// USD per million input tokens.
    pub input_per_mtok: f64,
    /// USD per million output tokens.
    pub output_per_mtok: f64,
}

impl Pricing {
    /// Cost in USD of a call with the given token counts.
    pub fn cost_usd(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input_per_mtok + output_tokens as f64 * self.output_per_mtok) / 1_000_000.0
    }
}

/// Client-side rate limits for one target; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    #[serde(default)]
    pub requests_per_min: Option<u32>,
    #[serde(default)]
    pub tokens_per_min: Option<u64>,
}

/// Spending limits for one labeling run (or one proxy key); `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
}
