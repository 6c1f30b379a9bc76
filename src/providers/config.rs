//! Configuration types of the LLM-access layer: a target as the router runs it and the
//! request params that are part of a request's identity. The plain data the spec writes
//! too (pricing, rate limits, budget, the provider kind) is tangle-core's
//! [`tangle_core::target`], re-exported here, so there is one definition of each.
//!
//! These are plain serde data: no I/O, no environment lookups. `${VAR}` expansion of
//! secrets is the spec parser's job; by the time a [`SecretString`] exists it holds the
//! resolved value, and nothing in this crate ever prints or serializes it.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use tangle_core::secret::SecretString;

pub use tangle_core::target::{Budget, Pricing, ProviderKind, RateLimits};

/// Sampling parameters. Part of a request's identity: two requests with equal messages
/// but different params are different requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GenerationParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Top-K logprobs per output token, where the target offers them (OpenAI-style only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u8>,
    /// Sampling seed, where the target offers one (OpenAI-style; Anthropic has none).
    /// Skipped when unset, so requests without a seed keep the identity they always had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_retries() -> u32 {
    3
}

/// One teacher target: a provider, a model and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub provider: ProviderKind,
    pub model: String,
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Overrides the provider's default endpoint root (required for `openai_compatible`).
    /// For OpenAI-style targets it ends before `/chat/completions` (e.g. `http://host/v1`);
    /// for Anthropic before `/v1/messages`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Deadline for one attempt, including reading the whole body or stream.
    #[serde(default = "default_timeout", with = "duration_serde")]
    pub timeout: Duration,
    /// Retries on this target after the first attempt, for retryable errors only.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Use SSE streaming for this target.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub pricing: Option<Pricing>,
    #[serde(default)]
    pub rate_limits: Option<RateLimits>,
    /// A successful call slower than this counts against the target's health: enough of
    /// them in a row cool the target down and traffic fails over.
    #[serde(default, with = "opt_duration_serde")]
    pub latency_threshold: Option<Duration>,
    /// Display name for ledger rows and logs; defaults to `provider:model`.
    #[serde(default)]
    pub name: Option<String>,
}

impl TargetConfig {
    pub fn new(provider: ProviderKind, model: impl Into<String>) -> Self {
        Self {
            provider,
            model: model.into(),
            api_key: None,
            base_url: None,
            timeout: default_timeout(),
            max_retries: default_max_retries(),
            stream: false,
            pricing: None,
            rate_limits: None,
            latency_threshold: None,
            name: None,
        }
    }

    pub fn display_name(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => format!("{}:{}", self.provider.as_str(), self.model),
        }
    }
}

/// Parses durations written as a number of seconds (`30`, `0.5`) or with a unit suffix
/// (`250ms`, `30s`, `2m`). Serializes as milliseconds with the `ms` suffix.
pub mod duration_serde {
    use super::*;

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let (number, scale_secs) = if let Some(n) = text.strip_suffix("ms") {
            (n, 0.001)
        } else if let Some(n) = text.strip_suffix('s') {
            (n, 1.0)
        } else if let Some(n) = text.strip_suffix('m') {
            (n, 60.0)
        } else {
            (text, 1.0)
        };
        let value: f64 =
            number.trim().parse().map_err(|_| format!("invalid duration `{text}` (expected e.g. `30s`, `250ms`)"))?;
        if !value.is_finite() || value < 0.0 {
            return Err(format!("invalid duration `{text}`: must be >= 0"));
        }
        Ok(Duration::from_secs_f64(value * scale_secs))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Secs(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v)),
            Raw::Secs(v) => Err(serde::de::Error::custom(format!("invalid duration {v}"))),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// `Option<Duration>` with the same syntax as [`duration_serde`].
pub mod opt_duration_serde {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration_serde::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "duration_serde")] Duration);
        Option::<Wrap>::deserialize(d).map(|o| o.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_printed_or_serialized() {
        let mut target = TargetConfig::new(ProviderKind::Openai, "gpt");
        target.api_key = Some(SecretString::new("sk-very-secret"));
        let debug = format!("{target:?}");
        let json = serde_json::to_string(&target).unwrap();
        let display = format!("{}", target.api_key.as_ref().unwrap());
        for out in [&debug, &json, &display] {
            assert!(!out.contains("sk-very-secret"), "leaked in {out}");
            assert!(out.contains("***"));
        }
        assert_eq!(target.api_key.unwrap().expose(), "sk-very-secret");
    }

    #[test]
    fn target_config_parses_durations_and_defaults() {
        let t: TargetConfig = serde_json::from_str(
            r#"{"provider":"openai_compatible","model":"m","base_url":"http://x/v1",
                "timeout":"250ms","latency_threshold":2,"api_key":"k"}"#,
        )
        .unwrap();
        assert_eq!(t.provider, ProviderKind::OpenaiCompatible);
        assert_eq!(t.timeout, Duration::from_millis(250));
        assert_eq!(t.latency_threshold, Some(Duration::from_secs(2)));
        assert_eq!(t.max_retries, 3);
        assert_eq!(t.api_key.unwrap().expose(), "k");
        assert!(serde_json::from_str::<TargetConfig>(r#"{"provider":"x","model":"m"}"#).is_err());
        assert!(duration_serde::parse("-1s").is_err());
        assert_eq!(duration_serde::parse("2m").unwrap(), Duration::from_secs(120));
    }

    #[test]
    fn pricing_cost_is_per_million_tokens() {
        let p = Pricing { input_per_mtok: 15.0, output_per_mtok: 75.0 };
        assert!((p.cost_usd(1_000_000, 0) - 15.0).abs() < 1e-9);
        assert!((p.cost_usd(1000, 100) - (0.015 + 0.0075)).abs() < 1e-12);
    }
}
