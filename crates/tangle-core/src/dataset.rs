//! Datasets: prompts with optional references, read from JSONL or CSV, de-duplicated, and
//! split into train and eval sets.
//!
//! Pure functions over text; the stage executors do the file I/O. The split is a hash of
//! (seed, example id): adding rows never moves an existing example to the other side.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One prompt (as chat messages) and what a good answer looks like, if known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The row's own `id` if it has one, else a hash of its messages.
    pub id: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

impl Example {
    /// A hash of the prompt's content: identical prompts are duplicates.
    pub fn content_hash(&self) -> String {
        let canonical = serde_json::to_string(&self.messages).unwrap_or_default();
        hex::encode(Sha256::digest(canonical.as_bytes()))
    }
}

/// A row that cannot be used, located by its 1-based line in the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RowError {
    pub line: usize,
    pub message: String,
    pub hint: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub examples: Vec<Example>,
    /// Non-empty rows read.
    pub rows: usize,
    /// Rows dropped because an earlier row had the same prompt.
    pub duplicates: usize,
}

const ROLES: &[&str] = &["system", "user", "assistant", "developer", "tool"];

/// Reads JSONL: each line `{"prompt": …}` or `{"messages": [...]}` (OpenAI chat format),
/// optionally with `reference` and `id`. A trailing assistant message in `messages` is the
/// reference when no `reference` field is given. Collects up to 20 row errors.
pub fn parse_jsonl(text: &str) -> Result<Parsed, Vec<RowError>> {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(value) => match example_from_json(&value) {
                Ok(example) => rows.push((line_no, example)),
                Err((message, hint)) => errors.push(RowError { line: line_no, message, hint }),
            },
            Err(e) => errors.push(RowError {
                line: line_no,
                message: format!("not valid JSON: {e}"),
                hint: "each line must be one complete JSON object".into(),
            }),
        }
        if errors.len() >= 20 {
            break;
        }
    }
    finish(rows, errors)
}

fn example_from_json(value: &Value) -> Result<Example, (String, String)> {
    let Value::Object(obj) = value else {
        return Err((
            "a row must be a JSON object".into(),
            r#"write {"prompt": "…", "reference": "…"} or {"messages": [...]}"#.into(),
        ));
    };
    let text_field = |name: &str| -> Result<Option<String>, (String, String)> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if name == "id" => Ok(Some(n.to_string())),
            Some(other) => Err((
                format!("`{name}` must be a string, found {}", json_type(other)),
                format!("quote the value of `{name}`"),
            )),
        }
    };
    let mut reference = text_field("reference")?;
    let id = text_field("id")?;
    let mut messages = match (obj.get("messages"), obj.get("prompt")) {
        (Some(_), Some(_)) => {
            return Err((
                "a row has both `messages` and `prompt`".into(),
                "keep one: `prompt` for a single user turn, `messages` for a conversation".into(),
            ))
        }
        (Some(Value::Array(items)), None) => items.iter().map(message_from_json).collect::<Result<Vec<_>, _>>()?,
        (Some(other), None) => {
            return Err((
                format!("`messages` must be a list, found {}", json_type(other)),
                r#"write "messages": [{"role": "user", "content": "…"}]"#.into(),
            ))
        }
        (None, Some(_)) => {
            let prompt = text_field("prompt")?.unwrap_or_default();
            let mut messages = Vec::new();
            if let Some(system) = text_field("system")? {
                messages.push(Message { role: "system".into(), content: system });
            }
            messages.push(Message { role: "user".into(), content: prompt });
            messages
        }
        (None, None) => {
            return Err((
                "the row has neither `prompt` nor `messages`".into(),
                r#"add "prompt": "…" (or an OpenAI-style "messages" list)"#.into(),
            ))
        }
    };
    if reference.is_none() && messages.last().is_some_and(|m| m.role == "assistant") {
        reference = messages.pop().map(|m| m.content);
    }
    match messages.last() {
        None => return Err(("the row has no prompt messages".into(), "add at least one user message".into())),
        Some(m) if m.role != "user" => {
            return Err((
                format!("the prompt ends with a `{}` message, not a `user` one", m.role),
                "the last prompt message is what the model answers; make it the user's".into(),
            ))
        }
        Some(m) if m.content.trim().is_empty() => {
            return Err(("the prompt is empty".into(), "remove the row or write its prompt".into()))
        }
        _ => {}
    }
    let mut example = Example { id: String::new(), messages, reference };
    example.id = id.unwrap_or_else(|| example.content_hash()[..16].to_string());
    Ok(example)
}

fn message_from_json(value: &Value) -> Result<Message, (String, String)> {
    let role = value.get("role").and_then(Value::as_str).unwrap_or_default();
    if !ROLES.contains(&role) {
        return Err((
            format!("message role `{role}` is not one of {}", ROLES.join(", ")),
            "use OpenAI chat roles".into(),
        ));
    }
    let content = match value.get("content") {
        Some(Value::String(s)) => s.clone(),
        // OpenAI content parts: only text parts carry meaning for a text model.
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err((
                            "only text content parts are supported".into(),
                            "remove image or audio parts from the dataset".into(),
                        ))
                    }
                }
            }
            text
        }
        _ => {
            return Err((
                "a message needs a string `content`".into(),
                r#"write {"role": "user", "content": "…"}"#.into(),
            ))
        }
    };
    Ok(Message { role: role.to_string(), content })
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Reads CSV with a header row; `prompt_column` is required, `reference_column` optional.
pub fn parse_csv(text: &str, prompt_column: &str, reference_column: &str) -> Result<Parsed, Vec<RowError>> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            return Err(vec![RowError {
                line: 1,
                message: format!("cannot read the header row: {e}"),
                hint: "the first line must name the columns, e.g. `prompt,reference`".into(),
            }])
        }
    };
    let Some(prompt_at) = headers.iter().position(|h| h == prompt_column) else {
        return Err(vec![RowError {
            line: 1,
            message: format!(
                "no `{prompt_column}` column (columns: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            ),
            hint: "rename the column, or set `dataset.prompt_column`".into(),
        }]);
    };
    let reference_at = headers.iter().position(|h| h == reference_column);
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for record in reader.records() {
        match record {
            Ok(r) => {
                let line = r.position().map_or(0, |p| p.line() as usize);
                let prompt = r.get(prompt_at).unwrap_or_default().to_string();
                if prompt.trim().is_empty() {
                    errors.push(RowError {
                        line,
                        message: "the prompt is empty".into(),
                        hint: "remove the row or write its prompt".into(),
                    });
                    continue;
                }
                let reference = reference_at.and_then(|i| r.get(i)).filter(|s| !s.is_empty()).map(str::to_string);
                let mut example = Example {
                    id: String::new(),
                    messages: vec![Message { role: "user".into(), content: prompt }],
                    reference,
                };
                example.id = example.content_hash()[..16].to_string();
                rows.push((line, example));
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                errors.push(RowError {
                    line,
                    message: format!("malformed CSV row: {e}"),
                    hint: "every row needs as many fields as the header; quote fields containing commas".into(),
                });
            }
        }
        if errors.len() >= 20 {
            break;
        }
    }
    finish(rows, errors)
}

fn finish(rows: Vec<(usize, Example)>, mut errors: Vec<RowError>) -> Result<Parsed, Vec<RowError>> {
    let mut parsed = Parsed { rows: rows.len(), ..Parsed::default() };
    let mut by_hash: HashMap<String, usize> = HashMap::new();
    let mut by_id: HashMap<String, (usize, String)> = HashMap::new();
    for (line, example) in rows {
        let hash = example.content_hash();
        if by_hash.contains_key(&hash) {
            parsed.duplicates += 1;
            continue;
        }
        if let Some((first_line, other_hash)) = by_id.get(&example.id) {
            if *other_hash != hash {
                errors.push(RowError {
                    line,
                    message: format!("id `{}` is already used on line {first_line} by a different prompt", example.id),
                    hint: "ids must be unique; remove the `id` field to let tangle derive one".into(),
                });
                continue;
            }
        }
        by_hash.insert(hash.clone(), line);
        by_id.insert(example.id.clone(), (line, hash));
        parsed.examples.push(example);
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Err(errors);
    }
    if parsed.examples.is_empty() {
        return Err(vec![RowError {
            line: 1,
            message: "the dataset has no examples".into(),
            hint: "add rows to the file".into(),
        }]);
    }
    Ok(parsed)
}

/// Whether an example belongs to the eval set: a seeded hash of its prompt compared with the
/// fraction, so the assignment depends on nothing but the example itself.
pub fn is_eval(example: &Example, eval_fraction: f64, seed: u64) -> bool {
    let digest = Sha256::digest(format!("{seed}:{}", example.content_hash()).as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let unit = u64::from_be_bytes(first) as f64 / (u64::MAX as f64 + 1.0);
    unit < eval_fraction
}

pub fn split(examples: &[Example], eval_fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    examples.iter().cloned().partition(|e| !is_eval(e, eval_fraction, seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_prompt_and_chat_rows() {
        let text = r#"{"prompt": "hi", "reference": "billing"}

{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
"#;
        let parsed = parse_jsonl(text).expect("valid");
        assert_eq!(parsed.rows, 2);
        assert_eq!(parsed.examples[0].reference.as_deref(), Some("billing"));
        assert_eq!(parsed.examples[1].messages.len(), 2);
        assert_eq!(parsed.examples[1].reference.as_deref(), Some("a"));
    }

    #[test]
    fn bad_rows_name_their_line() {
        let errors = parse_jsonl("{\"prompt\": \"ok\"}\n{\"prompt\": 3}\nnot json\n").expect_err("bad");
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn duplicates_are_dropped_and_counted() {
        let parsed =
            parse_jsonl("{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n{\"prompt\": \"a\", \"reference\": \"x\"}\n")
                .expect("valid");
        assert_eq!((parsed.examples.len(), parsed.duplicates), (2, 1));
    }

    #[test]
    fn csv_rows_and_errors() {
        let parsed = parse_csv("prompt,reference\nhello,world\n\"a, b\",\n", "prompt", "reference").expect("valid");
        assert_eq!(parsed.examples.len(), 2);
        assert_eq!(parsed.examples[1].reference, None);
        let errors = parse_csv("text\nx\n", "prompt", "reference").expect_err("no column");
        assert!(errors[0].message.contains("no `prompt` column"));
        let errors = parse_csv("prompt,reference\na,b,c\n", "prompt", "reference").expect_err("ragged");
        assert_eq!(errors[0].line, 2);
    }

    #[test]
    fn split_is_stable_when_rows_are_added() {
        let make = |n: usize| -> Vec<Example> {
            (0..n)
                .map(|i| {
                    let mut e = Example {
                        id: String::new(),
                        messages: vec![Message { role: "user".into(), content: format!("prompt {i}") }],
                        reference: None,
                    };
                    e.id = e.content_hash();
                    e
                })
                .collect()
        };
        let (train_small, eval_small) = split(&make(500), 0.2, 7);
        let (train_big, eval_big) = split(&make(1000), 0.2, 7);
        assert!(eval_small.iter().all(|e| eval_big.contains(e)));
        assert!(train_small.iter().all(|e| train_big.contains(e)));
        let share = eval_big.len() as f64 / 1000.0;
        assert!((0.15..0.25).contains(&share), "eval share {share}");
        let (_, eval_other_seed) = split(&make(1000), 0.2, 8);
        assert_ne!(eval_big, eval_other_seed);
    }
}
