//! Reading a YAML file into typed data with every mistake collected: the steps the pipeline
//! spec and the proxy's config share (line-ending and byte-order-mark normalisation, the
//! spanned parse, the recovering deserializer, the span index) and the rule for values that
//! already failed ("poisoned" paths, which later checks skip so errors do not pile up).

use super::de::{self, Deserialized};
use super::yaml;
use super::SpanIndex;
use crate::diagnostic::{Diagnostic, Report};
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::path::Path;

/// A YAML document deserialized as far as it would go.
pub struct Document<T> {
    /// The text as parsed: `\r\n` and `\r` made `\n`, a leading byte-order mark dropped, so
    /// line numbers and the lines diagnostics show agree with the parser's.
    pub source: String,
    /// Whether the top level is a mapping (a config of sections).
    pub root_is_map: bool,
    pub spans: SpanIndex,
    /// `Some` when the document had the right shape; see [`Deserialized::value`].
    pub value: Option<T>,
    pub diagnostics: Vec<Diagnostic>,
    /// Paths whose values are placeholders for something already reported.
    pub poisoned: BTreeSet<String>,
}

/// Parses `source` and deserializes it as `T`, `${VAR}` taken from `lookup`. `Err` only when
/// the text is not YAML at all; type errors come back in the document's diagnostics.
pub fn read<T: DeserializeOwned>(
    file: &Path,
    source: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Document<T>, Report> {
    let source = normalize(source);
    let (root, mut diagnostics) = match yaml::parse(&source) {
        Ok(parsed) => parsed,
        Err(diagnostics) => return Err(Report::new(file, &source, diagnostics)),
    };
    let spans = SpanIndex::build(&root);
    let root_is_map = matches!(root.value, yaml::Value::Map(_));
    let Deserialized { value, diagnostics: found, poisoned } = de::deserialize::<T>(&root, lookup);
    diagnostics.extend(found);
    Ok(Document { source, root_is_map, spans, value, diagnostics, poisoned })
}

/// YAML breaks lines at `\r`, `\r\n` and `\n`, and allows a leading byte-order mark (some
/// Windows editors write one): neither is content.
fn normalize(source: &str) -> String {
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    if source.contains('\r') {
        source.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        source.to_string()
    }
}

/// Whether `path` is, or lies under, a poisoned path (its value is a placeholder for one
/// that was already reported). An empty poisoned path poisons everything.
pub fn is_poisoned(poisoned: &BTreeSet<String>, path: &str) -> bool {
    poisoned.iter().any(|p| {
        p.is_empty()
            || path == p
            || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), Some(b'.' | b'[')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_endings_and_a_byte_order_mark_are_not_content() {
        assert_eq!(normalize("\u{feff}a: 1\r\nb: 2\rc: 3\n"), "a: 1\nb: 2\nc: 3\n");
        assert_eq!(normalize("a: \u{feff}\n"), "a: \u{feff}\n", "only a leading mark is dropped");
    }

    #[test]
    fn poison_covers_a_path_and_what_lies_under_it() {
        let poisoned: BTreeSet<String> = ["train.lora".to_string()].into();
        assert!(is_poisoned(&poisoned, "train.lora"));
        assert!(is_poisoned(&poisoned, "train.lora.rank"));
        assert!(!is_poisoned(&poisoned, "train.lorax"));
        assert!(!is_poisoned(&poisoned, "train"));
        assert!(is_poisoned(&[String::new()].into(), "anything"));
    }
}
