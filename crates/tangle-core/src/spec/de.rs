//! A serde `Deserializer` over the spanned YAML tree that reports every mistake at once.
//!
//! serde stops at the first error; a user fixing a spec wants all of them. So this
//! deserializer *recovers*: on an unknown key it records a diagnostic and skips the key; on a
//! value of the wrong type it records one and hands the visitor a neutral placeholder of the
//! type asked for ("poison"); on a missing required key (which serde's derive only reports
//! after the mapping is consumed) it records the key and runs the whole pass again with a
//! placeholder injected. The paths that received placeholders are returned, so later checks
//! stay quiet about values the user never wrote.

use super::env::{self, EnvError};
use super::yaml::{is_bool, Node, ScalarStyle, Value};
use crate::diagnostic::{did_you_mean, Diagnostic, Span};
use serde::de::value::StrDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;

/// The outcome of deserializing a tree into `T`.
pub struct Deserialized<T> {
    /// `Some` when the tree had the right shape; values under `poisoned` paths are
    /// placeholders when `diagnostics` is not empty.
    pub value: Option<T>,
    pub diagnostics: Vec<Diagnostic>,
    /// Dotted paths (`train.lora.rank`) whose values are placeholders.
    pub poisoned: BTreeSet<String>,
}

pub fn deserialize<T: DeserializeOwned>(root: &Node, lookup: &dyn Fn(&str) -> Option<String>) -> Deserialized<T> {
    let mut injected: BTreeSet<(String, &'static str)> = BTreeSet::new();
    // Each pass can only add injections, one per missing field; a spec has far fewer.
    for _ in 0..256 {
        let session = Session {
            lookup,
            diagnostics: RefCell::new(Vec::new()),
            poisoned: RefCell::new(BTreeSet::new()),
            injected: RefCell::new(injected.clone()),
        };
        let result = T::deserialize(NodeDe { node: root, path: String::new(), key_span: None, session: &session });
        let grown = session.injected.borrow().len() > injected.len();
        match result {
            Ok(value) => {
                return Deserialized {
                    value: Some(value),
                    diagnostics: session.diagnostics.into_inner(),
                    poisoned: session.poisoned.into_inner(),
                }
            }
            Err(_) if grown => injected = session.injected.into_inner(),
            Err(error) => {
                let mut diagnostics = session.diagnostics.into_inner();
                if let DeError::Custom(message) = error {
                    diagnostics.push(Diagnostic::error("invalid-value", root.span, message));
                }
                return Deserialized { value: None, diagnostics, poisoned: session.poisoned.into_inner() };
            }
        }
    }
    Deserialized {
        value: None,
        diagnostics: vec![Diagnostic::error("internal", root.span, "the spec could not be read")],
        poisoned: BTreeSet::new(),
    }
}

#[derive(Debug)]
pub enum DeError {
    /// Already reported as a diagnostic; unwind.
    Abort,
    MissingField(&'static str),
    Custom(String),
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeError::Abort => f.write_str("aborted after reported errors"),
            DeError::MissingField(field) => write!(f, "missing field `{field}`"),
            DeError::Custom(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::Custom(msg.to_string())
    }

    fn missing_field(field: &'static str) -> Self {
        DeError::MissingField(field)
    }
}

struct Session<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    diagnostics: RefCell<Vec<Diagnostic>>,
    poisoned: RefCell<BTreeSet<String>>,
    injected: RefCell<BTreeSet<(String, &'static str)>>,
}

impl Session<'_> {
    fn report(&self, diagnostic: Diagnostic) {
        self.diagnostics.borrow_mut().push(diagnostic);
    }

    fn poison(&self, path: &str) {
        self.poisoned.borrow_mut().insert(path.to_string());
    }
}

/// How a path reads in a message: `train.lora`, or "the spec" for the top level.
pub fn describe_path(path: &str) -> String {
    if path.is_empty() {
        "the spec".to_string()
    } else {
        format!("`{path}`")
    }
}

pub fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

struct NodeDe<'a> {
    node: &'a Node,
    path: String,
    /// The key this value sits under, for errors about the value as a whole.
    key_span: Option<Span>,
    session: &'a Session<'a>,
}

impl<'a> NodeDe<'a> {
    fn at(&self) -> Span {
        if self.path.is_empty() {
            return Span::START;
        }
        self.key_span.unwrap_or(self.node.span)
    }

    fn wrong_type(&self, expected: &str, example: &str) {
        let found = self.node.describe();
        if self.path.is_empty() && self.node.is_null() {
            self.session.report(
                Diagnostic::error("empty-spec", Span::START, "the spec file is empty")
                    .with_hint("a spec needs at least `name:` and `dataset:`; see the spec reference in README.md"),
            );
            self.session.poison(&self.path);
            return;
        }
        let message = if self.path.is_empty() {
            format!("the spec must be {expected} of sections, but the file holds {found}")
        } else {
            format!("{} must be {expected}, but it is {found}", describe_path(&self.path))
        };
        let span = if self.node.is_null() { self.at() } else { self.node.span };
        self.session.report(Diagnostic::error("wrong-type", span, message).with_hint(example.to_string()));
        self.session.poison(&self.path);
    }

    /// The scalar's text with `${VAR}` references resolved; `None` (already reported) when
    /// the node is not a scalar or a reference is undefined.
    fn text(&self, expected: &str, example: &str) -> Option<String> {
        let Value::Scalar(scalar) = &self.node.value else {
            self.wrong_type(expected, example);
            return None;
        };
        match env::interpolate(&scalar.text, self.session.lookup) {
            Ok(text) => Some(text),
            Err(errors) => {
                for error in errors {
                    self.report_env_error(&error, scalar.style);
                }
                self.session.poison(&self.path);
                None
            }
        }
    }

    fn report_env_error(&self, error: &EnvError, style: ScalarStyle) {
        let (offset, len) = match error {
            EnvError::Undefined { offset, len, .. } | EnvError::Malformed { offset, len } => (*offset, *len),
        };
        // Only single-line plain or quoted scalars map string offsets onto columns.
        let span = match style {
            ScalarStyle::Plain => self.node.span.shifted(offset as u32, len as u32),
            ScalarStyle::Quoted => self.node.span.shifted(offset as u32 + 1, len as u32),
            ScalarStyle::Block => self.node.span,
        };
        let diagnostic = match error {
            EnvError::Undefined { name, .. } => Diagnostic::error(
                "undefined-env",
                span,
                format!("environment variable `{name}` is not set (used by {})", describe_path(&self.path)),
            )
            .with_hint(format!(
                "export {name}=… before running tangle, or give a default: `${{{name}:-value}}`"
            )),
            EnvError::Malformed { .. } => Diagnostic::error(
                "bad-env-reference",
                span,
                "this `${` reference is malformed".to_string(),
            )
            .with_hint("write `${NAME}` or `${NAME:-default}` with a name of letters, digits and `_`; write `$$` for a literal `$`"),
        };
        self.session.report(diagnostic);
    }

    fn integer(&self, min: i128, max: i128) -> Option<i128> {
        let text = self.text("a whole number", "write a whole number, e.g. `3`")?;
        let parsed = text.trim().parse::<i128>().ok();
        match parsed {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                let bound = if n < min { format!("at least {min}") } else { format!("at most {max}") };
                self.session.report(
                    Diagnostic::error(
                        "out-of-range",
                        self.node.span,
                        format!("{} is {n}, but it must be {bound}", describe_path(&self.path)),
                    )
                    .with_hint(format!("use a value {bound}")),
                );
                self.session.poison(&self.path);
                None
            }
            None => {
                self.wrong_type("a whole number", "write a whole number, e.g. `3`");
                None
            }
        }
    }

    fn float(&self) -> Option<f64> {
        let text = self.text("a number", "write a number, e.g. `0.5` or `2.0e-4`")?;
        match text.trim().parse::<f64>() {
            Ok(x) if x.is_finite() => Some(x),
            _ => {
                self.wrong_type("a number", "write a number, e.g. `0.5` or `2.0e-4`");
                None
            }
        }
    }

    fn child(&self, node: &'a Node, path: String, key_span: Option<Span>) -> NodeDe<'a> {
        NodeDe { node, path, key_span, session: self.session }
    }
}

macro_rules! integer_method {
    ($method:ident, $ty:ty, $visit:ident) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let n = self.integer(<$ty>::MIN as i128, <$ty>::MAX as i128).unwrap_or(0);
            // In range by the check above (or the placeholder 0), so the cast is exact.
            visitor.$visit(n as _)
        }
    };
}

impl<'de, 'a> de::Deserializer<'de> for NodeDe<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Seq(items) => visitor.visit_seq(SeqDe { items: items.iter().enumerate(), parent: &self }),
            Value::Map(_) => self.deserialize_map(visitor),
            Value::Scalar(_) if self.node.is_null() => visitor.visit_unit(),
            Value::Scalar(scalar) if scalar.style == ScalarStyle::Plain => {
                let Some(text) = self.text("a value", "") else {
                    return visitor.visit_unit();
                };
                if is_bool(&text) {
                    visitor.visit_bool(text.eq_ignore_ascii_case("true"))
                } else if let Ok(n) = text.parse::<i64>() {
                    visitor.visit_i64(n)
                } else if let Ok(x) = text.parse::<f64>() {
                    visitor.visit_f64(x)
                } else {
                    visitor.visit_string(text)
                }
            }
            Value::Scalar(_) => match self.text("a value", "") {
                Some(text) => visitor.visit_string(text),
                None => visitor.visit_unit(),
            },
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let example = "write `true` or `false`";
        let value = match self.text("`true` or `false`", example) {
            Some(t) if is_bool(&t) => t.eq_ignore_ascii_case("true"),
            Some(_) => {
                self.wrong_type("`true` or `false`", example);
                false
            }
            None => false,
        };
        visitor.visit_bool(value)
    }

    integer_method!(deserialize_i8, i8, visit_i64);
    integer_method!(deserialize_i16, i16, visit_i64);
    integer_method!(deserialize_i32, i32, visit_i64);
    integer_method!(deserialize_i64, i64, visit_i64);
    integer_method!(deserialize_u8, u8, visit_u64);
    integer_method!(deserialize_u16, u16, visit_u64);
    integer_method!(deserialize_u32, u32, visit_u64);
    integer_method!(deserialize_u64, u64, visit_u64);

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_f64(self.float().unwrap_or(0.0))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_f64(self.float().unwrap_or(0.0))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.text("a single character", "write one character").unwrap_or_default();
        let mut chars = text.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => visitor.visit_char(c),
            _ => {
                self.wrong_type("a single character", "write one character");
                visitor.visit_char(' ')
            }
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.text("a string", "write text, quoted if it contains `: ` or `#`").unwrap_or_default();
        visitor.visit_string(text)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_byte_buf(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.text("a string", "write text").unwrap_or_default();
        visitor.visit_byte_buf(text.into_bytes())
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if !self.node.is_null() {
            self.wrong_type("empty", "leave the value empty");
        }
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Seq(items) => visitor.visit_seq(SeqDe { items: items.iter().enumerate(), parent: &self }),
            _ => {
                self.wrong_type("a list", "write a list, e.g. `[a, b]` or one `- item` per line");
                visitor.visit_seq(de::value::SeqDeserializer::<std::iter::Empty<()>, DeError>::new(std::iter::empty()))
            }
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(entries) => visitor.visit_map(MapDe { entries: entries.iter(), pending: None, parent: &self }),
            _ => {
                self.wrong_type("a mapping", "write `key: value` pairs, indented under the key");
                visitor.visit_map(de::value::MapDeserializer::<std::iter::Empty<((), ())>, DeError>::new(
                    std::iter::empty(),
                ))
            }
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let Value::Map(entries) = &self.node.value else {
            self.wrong_type("a mapping", "write `key: value` pairs, indented under the key");
            return visitor.visit_map(PoisonStruct { fields: fields.iter() });
        };
        let injected: Vec<&'static str> = self
            .session
            .injected
            .borrow()
            .iter()
            .filter(|(path, _)| *path == self.path)
            .map(|(_, field)| *field)
            .collect();
        for field in &injected {
            let (message, hint) = if self.path.is_empty() {
                (
                    format!("missing required section `{field}`"),
                    format!("add a top-level `{field}:` section (see the spec reference in README.md)"),
                )
            } else {
                (
                    format!("missing required key `{field}` in {}", describe_path(&self.path)),
                    format!("add `{field}: …` under `{}`", self.path.rsplit('.').next().unwrap_or(&self.path)),
                )
            };
            self.session.report(Diagnostic::error("missing-key", self.at(), message).with_hint(hint));
            self.session.poison(&child_path(&self.path, field));
        }
        let result = visitor.visit_map(StructDe {
            entries: entries.iter(),
            fields,
            injected: injected.into_iter(),
            pending: None,
            parent: &self,
        });
        match result {
            Err(DeError::MissingField(field)) => {
                self.session.injected.borrow_mut().insert((self.path.clone(), field));
                Err(DeError::Abort)
            }
            Err(DeError::Custom(message)) => {
                self.session.report(Diagnostic::error("invalid-value", self.node.span, message));
                self.session.poison(&self.path);
                Err(DeError::Abort)
            }
            other => other,
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let choices = variants.join(", ");
        let fallback = variants.first().copied().unwrap_or_default();
        let (variant, value) = match &self.node.value {
            Value::Scalar(_) => {
                let text = self.text(&format!("one of {choices}"), "").unwrap_or_else(|| fallback.to_string());
                (text, None)
            }
            Value::Map(entries) if entries.len() == 1 => {
                let entry = &entries[0];
                let name = entry.key.as_str().unwrap_or_default().to_string();
                (name, Some(self.child(&entry.value, self.path.clone(), Some(entry.key.span))))
            }
            _ => {
                self.wrong_type(&format!("one of {choices}"), "");
                (fallback.to_string(), None)
            }
        };
        let variant = if variants.contains(&variant.as_str()) {
            variant
        } else {
            if !self.session.poisoned.borrow().contains(&self.path) {
                let hint = match did_you_mean(&variant, variants.iter().copied()) {
                    Some(best) => format!("did you mean `{best}`? (choices: {choices})"),
                    None => format!("choose one of: {choices}"),
                };
                self.session.report(
                    Diagnostic::error(
                        "unknown-value",
                        self.node.span,
                        format!("{} cannot be `{variant}`", describe_path(&self.path)),
                    )
                    .with_hint(hint),
                );
                self.session.poison(&self.path);
            }
            fallback.to_string()
        };
        visitor.visit_enum(EnumDe { variant, value })
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct SeqDe<'p, 'a> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
    parent: &'p NodeDe<'a>,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            Some((i, node)) => {
                let path = format!("{}[{i}]", self.parent.path);
                seed.deserialize(self.parent.child(node, path, None)).map(Some)
            }
            None => Ok(None),
        }
    }
}

/// A mapping read as a map (`BTreeMap<String, _>`): every key is accepted.
struct MapDe<'p, 'a> {
    entries: std::slice::Iter<'a, super::yaml::Entry>,
    pending: Option<&'a super::yaml::Entry>,
    parent: &'p NodeDe<'a>,
}

impl<'de> de::MapAccess<'de> for MapDe<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.pending = Some(entry);
        let key = entry.key.as_str().unwrap_or_default();
        seed.deserialize(StrDeserializer::<DeError>::new(key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some(entry) = self.pending.take() else {
            return Err(DeError::Custom("value requested before its key".into()));
        };
        let path = child_path(&self.parent.path, entry.key.as_str().unwrap_or_default());
        seed.deserialize(self.parent.child(&entry.value, path, Some(entry.key.span)))
    }
}

/// A mapping read as a struct: unknown keys are reported and skipped, injected keys (the
/// ones a previous pass found missing) are supplied as placeholders.
struct StructDe<'p, 'a> {
    entries: std::slice::Iter<'a, super::yaml::Entry>,
    fields: &'static [&'static str],
    injected: std::vec::IntoIter<&'static str>,
    pending: Option<Pending<'a>>,
    parent: &'p NodeDe<'a>,
}

enum Pending<'a> {
    Entry(&'a super::yaml::Entry),
    Poison,
}

impl<'de> de::MapAccess<'de> for StructDe<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        for entry in self.entries.by_ref() {
            let Some(key) = entry.key.as_str() else { continue };
            if self.fields.contains(&key) {
                self.pending = Some(Pending::Entry(entry));
                return seed.deserialize(StrDeserializer::<DeError>::new(key)).map(Some);
            }
            let place = describe_path(&self.parent.path);
            let hint = match did_you_mean(key, self.fields.iter().copied()) {
                Some(best) => format!("did you mean `{best}`?"),
                None => format!("{place} accepts: {}", self.fields.join(", ")),
            };
            let message = if self.parent.path.is_empty() {
                format!("unknown section `{key}`")
            } else {
                format!("unknown key `{key}` in {place}")
            };
            self.parent.session.report(Diagnostic::error("unknown-key", entry.key.span, message).with_hint(hint));
        }
        match self.injected.next() {
            Some(field) => {
                self.pending = Some(Pending::Poison);
                seed.deserialize(StrDeserializer::<DeError>::new(field)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.pending.take() {
            Some(Pending::Entry(entry)) => {
                let path = child_path(&self.parent.path, entry.key.as_str().unwrap_or_default());
                seed.deserialize(self.parent.child(&entry.value, path, Some(entry.key.span)))
            }
            Some(Pending::Poison) => seed.deserialize(Poison),
            None => Err(DeError::Custom("value requested before its key".into())),
        }
    }
}

struct EnumDe<'a> {
    variant: String,
    value: Option<NodeDe<'a>>,
}

impl<'de, 'a> de::EnumAccess<'de> for EnumDe<'a> {
    type Error = DeError;
    type Variant = VariantDe<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, VariantDe<'a>), DeError> {
        let name = seed.deserialize(self.variant.into_deserializer())?;
        Ok((name, VariantDe(self.value)))
    }
}

struct VariantDe<'a>(Option<NodeDe<'a>>);

impl<'de> de::VariantAccess<'de> for VariantDe<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        match self.0 {
            Some(node) => seed.deserialize(node),
            None => seed.deserialize(Poison),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Some(node) => de::Deserializer::deserialize_seq(node, visitor),
            None => de::Deserializer::deserialize_seq(Poison, visitor),
        }
    }

    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Some(node) => de::Deserializer::deserialize_struct(node, "", fields, visitor),
            None => de::Deserializer::deserialize_struct(Poison, "", fields, visitor),
        }
    }
}

/// A neutral value of whatever type is asked for; stands in for a value that was reported.
struct Poison;

impl<'de> de::Deserializer<'de> for Poison {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_bool(false)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_i64(0)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_i64(0)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_i64(0)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_i64(0)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_u64(0)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_u64(0)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_u64(0)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_u64(0)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_f64(0.0)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_f64(0.0)
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_char(' ')
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_str("")
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_str("")
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_bytes(&[])
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_bytes(&[])
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_none()
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_seq(de::value::SeqDeserializer::<std::iter::Empty<()>, DeError>::new(std::iter::empty()))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_map(de::value::MapDeserializer::<std::iter::Empty<((), ())>, DeError>::new(std::iter::empty()))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_map(PoisonStruct { fields: fields.iter() })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_enum(EnumDe { variant: variants.first().copied().unwrap_or_default().to_string(), value: None })
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_str("")
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// Every field of a struct, each a placeholder (required fields included).
struct PoisonStruct {
    fields: std::slice::Iter<'static, &'static str>,
}

impl<'de> de::MapAccess<'de> for PoisonStruct {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        match self.fields.next() {
            Some(field) => seed.deserialize(StrDeserializer::<DeError>::new(field)).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        seed.deserialize(Poison)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::yaml;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        name: String,
        train: Train,
        #[serde(default)]
        tags: Vec<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Train {
        epochs: u32,
        lr: f64,
        method: Method,
        note: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Method {
        Lora,
        Full,
    }

    fn run(src: &str) -> Deserialized<Doc> {
        let env = |name: &str| (name == "NOTE").then(|| "from-env".to_string());
        let (root, _) = yaml::parse(src).expect("yaml");
        deserialize(&root, &env)
    }

    #[test]
    fn reads_a_valid_document() {
        let out = run("name: x\ntrain: {epochs: 3, lr: 2.0e-4, method: full, note: '${NOTE}'}\n");
        assert!(out.diagnostics.is_empty(), "{:?}", out.diagnostics);
        let doc = out.value.expect("value");
        assert_eq!(doc.train.method, Method::Full);
        assert_eq!(doc.train.note.as_deref(), Some("from-env"));
    }

    #[test]
    fn collects_every_mistake_in_one_pass() {
        let out = run("name: x\ntrain:\n  epoch: 3\n  lr: fast\n  method: lorra\ntags: 7\nextra: 1\n");
        let codes: Vec<_> = out.diagnostics.iter().map(|d| (d.code, d.span.line)).collect();
        assert!(codes.contains(&("unknown-key", 3)), "{codes:?}");
        assert!(codes.contains(&("wrong-type", 4)), "{codes:?}");
        assert!(codes.contains(&("unknown-value", 5)), "{codes:?}");
        assert!(codes.contains(&("wrong-type", 6)), "{codes:?}");
        assert!(codes.contains(&("unknown-key", 7)), "{codes:?}");
        assert!(codes.contains(&("missing-key", 2)), "{codes:?}");
        let epoch = out.diagnostics.iter().find(|d| d.code == "unknown-key").expect("unknown key");
        assert_eq!(epoch.hint.as_deref(), Some("did you mean `epochs`?"));
        assert!(out.poisoned.contains("train.epochs"), "{:?}", out.poisoned);
    }

    #[test]
    fn missing_sections_are_named() {
        let out = run("name: x\n");
        assert_eq!(out.diagnostics.len(), 1, "{:?}", out.diagnostics);
        assert_eq!(out.diagnostics[0].message, "missing required section `train`");
    }

    #[test]
    fn messages_quote_the_written_text_not_the_secret() {
        let out = run("name: x\ntrain: {epochs: '${NOTE}', lr: 1, method: full}\n");
        let text = format!("{:?}", out.diagnostics);
        assert!(!text.contains("from-env"), "{text}");
    }

    #[test]
    fn out_of_range_integers_are_reported() {
        let out = run("name: x\ntrain: {epochs: -1, lr: 1, method: full}\n");
        assert_eq!(out.diagnostics[0].code, "out-of-range");
    }
}
