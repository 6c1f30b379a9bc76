//! Per-example text metrics. Each returns a score in [0, 1] for one (output, reference) pair;
//! a metric over a set is the mean, with a bootstrap interval from `stats`.
//!
//! Definitions follow the reference implementations named on each function; the test vectors
//! in `tests/vectors/metrics.json` were produced by those implementations.

use crate::spec::Normalize;
use std::collections::HashMap;

/// Applies the spec's normalisation before exact comparisons.
pub fn normalize(text: &str, options: &Normalize) -> String {
    let mut s = if options.strip { text.trim().to_string() } else { text.to_string() };
    if options.lowercase {
        s = s.to_lowercase();
    }
    if options.strip_punctuation {
        s = s.chars().filter(|c| !c.is_ascii_punctuation()).collect();
        s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    s
}

pub fn exact_match(output: &str, reference: &str, options: &Normalize) -> f64 {
    f64::from(u8::from(normalize(output, options) == normalize(reference, options)))
}

pub fn contains(output: &str, reference: &str, options: &Normalize) -> f64 {
    f64::from(u8::from(normalize(output, options).contains(&normalize(reference, options))))
}

pub fn json_valid(output: &str) -> f64 {
    f64::from(u8::from(serde_json::from_str::<serde_json::Value>(output.trim()).is_ok()))
}

/// SQuAD v2.0's answer normalisation: lowercase, drop ASCII punctuation, drop the articles
/// a/an/the, collapse whitespace.
fn squad_tokens(text: &str) -> Vec<String> {
    let lowered = text.to_lowercase();
    let no_punct: String = lowered.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    no_punct.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).map(str::to_string).collect()
}

/// Token-level F1 as defined by the official SQuAD v2.0 evaluation script (`compute_f1`): bag
/// of normalised tokens; when either side is empty, 1 if both are, else 0.
pub fn token_f1(output: &str, reference: &str) -> f64 {
    let pred = squad_tokens(output);
    let gold = squad_tokens(reference);
    if pred.is_empty() || gold.is_empty() {
        return f64::from(u8::from(pred == gold));
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gold {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0i64;
    for t in &pred {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pred.len() as f64;
    let recall = same as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// rouge-score's default tokenizer: lowercase, every run of characters outside [a-z0-9]
/// becomes a separator (so non-ASCII letters are dropped), no stemming.
fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// ROUGE-L F-measure as computed by Google's `rouge-score` package (`RougeScorer(['rougeL'])`,
/// `use_stemmer=False`): LCS over tokens, F = 2PR / (P + R).
pub fn rouge_l(output: &str, reference: &str) -> f64 {
    let pred = rouge_tokens(output);
    let target = rouge_tokens(reference);
    if pred.is_empty() || target.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(&target, &pred) as f64;
    let precision = lcs / pred.len() as f64;
    let recall = lcs / target.len() as f64;
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            row[j + 1] = if x == y { prev[j] + 1 } else { row[j].max(prev[j + 1]) };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

/// Sentence-level chrF as sacrebleu 2.x computes it with its defaults (character n-grams up
/// to 6, no word n-grams, β = 2, whitespace removed, case kept), scaled to [0, 1].
pub fn chrf(output: &str, reference: &str) -> f64 {
    const ORDER: usize = 6;
    const BETA2: f64 = 4.0;
    let hyp: Vec<char> = output.chars().filter(|c| !c.is_whitespace()).collect();
    let refc: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    let (mut avg_prec, mut avg_rec, mut effective) = (0.0, 0.0, 0usize);
    for n in 1..=ORDER {
        let hyp_grams = ngrams(&hyp, n);
        let ref_grams = ngrams(&refc, n);
        let ref_total: usize = ref_grams.values().sum();
        // sacrebleu counts no hypothesis n-grams for an order the reference lacks.
        let hyp_total: usize = if ref_grams.is_empty() { 0 } else { hyp_grams.values().sum() };
        let matched: usize = hyp_grams.iter().map(|(g, c)| (*c).min(ref_grams.get(g).copied().unwrap_or(0))).sum();
        if hyp_total > 0 && ref_total > 0 {
            avg_prec += matched as f64 / hyp_total as f64;
            avg_rec += matched as f64 / ref_total as f64;
            effective += 1;
        }
    }
    if effective == 0 {
        return 0.0;
    }
    avg_prec /= effective as f64;
    avg_rec /= effective as f64;
    if avg_prec + avg_rec == 0.0 {
        return 0.0;
    }
    (1.0 + BETA2) * avg_prec * avg_rec / (BETA2 * avg_prec + avg_rec)
}

fn ngrams(chars: &[char], n: usize) -> HashMap<&[char], usize> {
    let mut out = HashMap::new();
    if chars.len() >= n {
        for w in chars.windows(n) {
            *out.entry(w).or_default() += 1;
        }
    }
    out
}

/// Scores outputs with the metrics an eval section lists; holds what is compiled once (the
/// regex, the JSON Schema).
pub struct Scorer {
    normalize: Normalize,
    regex: Option<regex::Regex>,
    schema: Option<jsonschema::Validator>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    #[error("eval.regex is not a valid regular expression: {0}")]
    Regex(#[from] regex::Error),
    #[error("eval.json_schema is not a valid JSON Schema: {0}")]
    Schema(String),
}

impl Scorer {
    pub fn new(
        normalize: Normalize,
        regex: Option<&str>,
        schema: Option<&serde_json::Value>,
    ) -> Result<Scorer, ScorerError> {
        let regex = regex.map(regex::Regex::new).transpose()?;
        let schema =
            schema.map(|s| jsonschema::validator_for(s).map_err(|e| ScorerError::Schema(e.to_string()))).transpose()?;
        Ok(Scorer { normalize, regex, schema })
    }

    /// One metric for one output. `target` is what the output should say (the reference, or
    /// the teacher's output where there is none); `teacher` is the teacher's output. `None`
    /// when the metric does not apply (no target, or not a per-example quality metric).
    pub fn score(&self, metric: &str, output: &str, target: Option<&str>, teacher: Option<&str>) -> Option<f64> {
        let n = &self.normalize;
        match metric {
            "exact_match" => target.map(|t| exact_match(output, t, n)),
            "contains" => target.map(|t| contains(output, t, n)),
            "token_f1" => target.map(|t| token_f1(output, t)),
            "rouge_l" => target.map(|t| rouge_l(output, t)),
            "chrf" => target.map(|t| chrf(output, t)),
            "teacher_agreement" => teacher.map(|t| exact_match(output, t, n)),
            "json_valid" => Some(json_valid(output)),
            "regex" => self.regex.as_ref().map(|r| f64::from(u8::from(r.is_match(output.trim())))),
            "json_schema" => self.schema.as_ref().map(|v| {
                let ok = serde_json::from_str::<serde_json::Value>(output.trim()).is_ok_and(|doc| v.is_valid(&doc));
                f64::from(u8::from(ok))
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_uses_the_normalisation() {
        let n = Normalize::default();
        assert_eq!(exact_match(" Billing\n", "billing", &n), 1.0);
        let strict = Normalize { lowercase: false, strip: false, strip_punctuation: false };
        assert_eq!(exact_match(" Billing", "billing", &strict), 0.0);
        let loose = Normalize { strip_punctuation: true, ..Normalize::default() };
        assert_eq!(exact_match("billing.", "Billing", &loose), 1.0);
    }

    #[test]
    fn lcs_of_known_sequences() {
        assert_eq!(lcs_len(&["a", "b", "c", "d"], &["a", "c", "d", "b"]), 3);
        assert_eq!(lcs_len::<&str>(&[], &["a"]), 0);
    }

    #[test]
    fn scorer_applies_regex_and_schema() {
        let schema =
            serde_json::json!({"type": "object", "required": ["intent"], "properties": {"intent": {"type": "string"}}});
        let s = Scorer::new(Normalize::default(), Some("^(billing|shipping)$"), Some(&schema)).expect("valid");
        assert_eq!(s.score("regex", " billing\n", None, None), Some(1.0));
        assert_eq!(s.score("regex", "refund", None, None), Some(0.0));
        assert_eq!(s.score("json_schema", "{\"intent\": \"billing\"}", None, None), Some(1.0));
        assert_eq!(s.score("json_schema", "{\"intent\": 3}", None, None), Some(0.0));
        assert_eq!(s.score("json_schema", "not json", None, None), Some(0.0));
        assert_eq!(s.score("exact_match", "x", None, Some("x")), None, "no target, no score");
        assert_eq!(s.score("teacher_agreement", "X", None, Some("x")), Some(1.0));
        assert!(Scorer::new(Normalize::default(), Some("("), None).is_err());
    }

    #[test]
    fn f1_edge_cases() {
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("the", ""), 1.0, "articles normalise away to empty");
        assert_eq!(token_f1("a cat", "dog"), 0.0);
        assert!((token_f1("the cat sat", "cat sat down") - 0.8).abs() < 1e-12);
    }
}
