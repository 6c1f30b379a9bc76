//! Structured output by constrained decoding (llguidance): at every step a grammar says
//! which tokens may come next, and the sampler never picks another. A JSON schema, any
//! JSON object, one of a fixed list of strings, or a regular expression. The output
//! satisfies the grammar by construction; nothing is retried.
//!
//! The vocabulary's byte strings come from the tokenizer.json (byte-level BPE), so the
//! grammar sees exactly the bytes the served tokenizer produces. Special tokens are marked
//! as llguidance expects; the end-of-turn token is the grammar's end.

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;
use toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};

/// What a request's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    JsonSchema(serde_json::Value),
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// Exactly one of these strings.
    Choice(Vec<String>),
    Regex(String),
}

impl Grammar {
    fn top_level(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(compact(serde_json::json!({ "type": "object" }))),
            Grammar::Choice(options) => {
                if options.is_empty() {
                    return Err("a choice needs at least one option".into());
                }
                let alternatives: Vec<String> = options.iter().map(|o| regex::escape(o)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            Grammar::Regex(pattern) => TopLevelGrammar::from_regex(pattern),
        })
    }
}

/// JSON without free whitespace between tokens (`{"a":1,"b":2}`), unless the schema sets
/// llguidance's own options: with whitespace allowed anywhere, a weak model can spend its
/// whole budget on blanks before the first key.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(
            || serde_json::json!({ "whitespace_flexible": false, "item_separator": ",", "key_separator": ":" }),
        );
    }
    schema
}

/// Builds matchers for one vocabulary; made once per served model, on first use.
pub struct ConstraintFactory {
    factory: ParserFactory,
}

impl ConstraintFactory {
    /// `token_bytes[id]` for every embedding row; `end` is the end-of-turn token.
    pub fn new(mut token_bytes: Vec<Vec<u8>>, end: u32) -> Result<ConstraintFactory, String> {
        for (id, bytes) in token_bytes.iter_mut().enumerate() {
            if bytes.is_empty() {
                // Rows the tokenizer never produces: a special token no grammar allows.
                *bytes =
                    std::iter::once(TokTrie::SPECIAL_TOKEN_MARKER).chain(format!("[PAD{id}]").into_bytes()).collect();
            }
        }
        let info = TokRxInfo::new(token_bytes.len() as u32, end);
        let trie = TokTrie::from(&info, &token_bytes);
        let env: toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(ConstraintFactory { factory })
    }

    /// A fresh constraint for one sequence; an invalid grammar is the caller's error.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let parser = self.factory.create_parser(grammar.top_level()?).map_err(|e| format!("{e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint { matcher })
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// The tokens allowed next (the end token once the grammar is complete).
    pub fn allowed(&mut self) -> Result<toktrie::SimpleVob, String> {
        self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())
    }

    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// A copy in the same state, for the other choices of an `n > 1` request.
    pub fn fork(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone() }
    }
}

/// The byte string of every token of a tokenizer.json, padded to `rows` (empty where the
/// tokenizer has no token). Special tokens carry llguidance's marker byte first.
pub fn token_bytes(tokenizer_json: &serde_json::Value, rows: usize) -> Result<Vec<Vec<u8>>, String> {
    let mut bytes = llguidance::token_bytes_from_tokenizer_json(tokenizer_json).map_err(|e| e.to_string())?;
    bytes.resize(rows.max(bytes.len()), Vec::new());
    bytes.truncate(rows);
    Ok(bytes)
}
