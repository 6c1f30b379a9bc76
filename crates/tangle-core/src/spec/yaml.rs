//! A YAML document as a tree whose every node knows where it came from.
//!
//! serde_yaml reports only the first error and drops positions once a value is built, so
//! the spec loader parses with yaml-rust2's event API and keeps a [`Span`] on every node.
//! Building the tree never recurses (fuzzed input can nest arbitrarily deep), and aliases
//! are expanded under a node budget (no billion-laughs blow-up).

use crate::diagnostic::{Diagnostic, Span};
use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Deeper than any real spec; keeps recursive consumers of the tree within their stack.
pub const MAX_DEPTH: usize = 64;
/// Total nodes a document may expand to, aliases included.
const MAX_NODES: usize = 200_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// The scalar's text after YAML unescaping, before `${VAR}` interpolation.
    pub text: String,
    pub style: ScalarStyle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarStyle {
    Plain,
    Quoted,
    Block,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: Node,
    pub value: Node,
}

impl Node {
    /// Plain `~`, `null`, or nothing at all: YAML's null.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(Scalar { text, style: ScalarStyle::Plain })
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(s) => Some(&s.text),
            _ => None,
        }
    }

    /// What a user would call this node's type, for error messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
            Value::Scalar(_) if self.is_null() => "nothing (null)".to_string(),
            Value::Scalar(s) => {
                let shown: String = s.text.chars().take(40).collect();
                let ellipsis = if s.text.chars().count() > 40 { "…" } else { "" };
                match s.style {
                    ScalarStyle::Plain if is_number(&s.text) => format!("the number `{shown}`"),
                    ScalarStyle::Plain if is_bool(&s.text) => format!("the boolean `{shown}`"),
                    _ => format!("the string `{shown}{ellipsis}`"),
                }
            }
        }
    }

    /// The first mapping entry with this key.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|e| e.key.as_str() == Some(key)),
            _ => None,
        }
    }
}

pub fn is_bool(text: &str) -> bool {
    matches!(text, "true" | "True" | "TRUE" | "false" | "False" | "FALSE")
}

pub fn is_number(text: &str) -> bool {
    text.parse::<i64>().is_ok() || (text.parse::<f64>().is_ok() && !text.contains(char::is_alphabetic))
}

/// Parses one YAML document. `Err` holds the diagnostics that made the document unusable;
/// `Ok` may still come with non-fatal ones (duplicate keys, extra documents).
pub fn parse(source: &str) -> Result<(Node, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut events = EventLog::default();
    let mut parser = Parser::new_from_str(source);
    if let Err(e) = parser.load(&mut events, true) {
        let m = e.marker();
        let span = Span::new(m.line() as u32, m.col() as u32 + 1, 1);
        let hint = if e.info().contains("flow") {
            "a `[` or `{` opened on this line or above is not closed (or is indented wrongly)"
        } else {
            "check the indentation and quoting here; a value containing `: `, ` #`, `{` or `[` needs quotes"
        };
        return Err(vec![
            Diagnostic::error("yaml-syntax", span, format!("this is not valid YAML: {}", e.info())).with_hint(hint)
        ]);
    }
    Builder::new(source).build(events.0)
}

#[derive(Default)]
struct EventLog(Vec<(Event, Marker)>);

impl MarkedEventReceiver for EventLog {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        self.0.push((ev, mark));
    }
}

enum Frame {
    Seq { span: Span, anchor: usize, items: Vec<Node> },
    Map { span: Span, anchor: usize, entries: Vec<Entry>, key: Option<Node> },
}

struct Builder<'s> {
    source: &'s str,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    diagnostics: Vec<Diagnostic>,
    root: Option<Node>,
    documents: usize,
}

impl<'s> Builder<'s> {
    fn new(source: &'s str) -> Builder<'s> {
        Builder {
            source,
            stack: Vec::new(),
            anchors: HashMap::new(),
            nodes: 0,
            diagnostics: Vec::new(),
            root: None,
            documents: 0,
        }
    }

    fn span_at(&self, mark: &Marker, len: usize) -> Span {
        // yaml-rust2 columns are 0-based; ours are 1-based like every editor's.
        let _ = self.source;
        Span::new(mark.line() as u32, mark.col() as u32 + 1, len as u32)
    }

    fn build(mut self, events: Vec<(Event, Marker)>) -> Result<(Node, Vec<Diagnostic>), Vec<Diagnostic>> {
        for (event, mark) in events {
            match event {
                Event::DocumentStart => {
                    self.documents += 1;
                    if self.documents == 2 {
                        self.diagnostics.push(
                            Diagnostic::error(
                                "multiple-documents",
                                self.span_at(&mark, 3),
                                "a spec is one YAML document, but this file has more",
                            )
                            .with_hint("remove the `---` separator and everything after it, or split the file"),
                        );
                    }
                }
                Event::Scalar(text, style, anchor, _tag) => {
                    let (style, extra) = match style {
                        TScalarStyle::Plain => (ScalarStyle::Plain, 0),
                        TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => (ScalarStyle::Quoted, 2),
                        TScalarStyle::Literal | TScalarStyle::Folded => (ScalarStyle::Block, 0),
                    };
                    let width = match style {
                        ScalarStyle::Block => 1,
                        _ => text.lines().next().map_or(0, |l| l.chars().count()) + extra,
                    };
                    let node = Node { span: self.span_at(&mark, width), value: Value::Scalar(Scalar { text, style }) };
                    self.finish(node, anchor)?;
                }
                Event::SequenceStart(anchor, _) => {
                    self.push(Frame::Seq { span: self.span_at(&mark, 1), anchor, items: Vec::new() })?;
                }
                Event::MappingStart(anchor, _) => {
                    self.push(Frame::Map { span: self.span_at(&mark, 1), anchor, entries: Vec::new(), key: None })?;
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    let (node, anchor) = match self.stack.pop() {
                        Some(Frame::Seq { span, anchor, items }) => (Node { value: Value::Seq(items), span }, anchor),
                        Some(Frame::Map { span, anchor, entries, .. }) => {
                            (Node { value: Value::Map(entries), span }, anchor)
                        }
                        None => continue,
                    };
                    self.finish(node, anchor)?;
                }
                Event::Alias(id) => {
                    let Some(node) = self.anchors.get(&id).cloned() else {
                        return Err(vec![Diagnostic::error(
                            "yaml-syntax",
                            self.span_at(&mark, 1),
                            "this alias refers to an anchor that is not defined before it",
                        )
                        .with_hint("define the anchor (`&name`) before using `*name`")]);
                    };
                    self.nodes += count_nodes(&node);
                    let node = Node { span: self.span_at(&mark, 1), ..node };
                    self.finish(node, 0)?;
                }
                Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
            }
        }
        let root = self.root.take().unwrap_or(Node {
            value: Value::Scalar(Scalar { text: String::new(), style: ScalarStyle::Plain }),
            span: Span::START,
        });
        Ok((root, self.diagnostics))
    }

    fn push(&mut self, frame: Frame) -> Result<(), Vec<Diagnostic>> {
        if self.stack.len() >= MAX_DEPTH {
            let span = match &frame {
                Frame::Seq { span, .. } | Frame::Map { span, .. } => *span,
            };
            return Err(vec![Diagnostic::error(
                "too-deep",
                span,
                format!("the document nests deeper than {MAX_DEPTH} levels"),
            )
            .with_hint("a pipeline spec never needs this much nesting; check for runaway brackets")]);
        }
        self.stack.push(frame);
        Ok(())
    }

    /// Attaches a completed node to its parent (or makes it the document root).
    fn finish(&mut self, node: Node, anchor: usize) -> Result<(), Vec<Diagnostic>> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(vec![Diagnostic::error(
                "too-large",
                node.span,
                format!("the document expands to more than {MAX_NODES} values"),
            )
            .with_hint("aliases that refer to aliases multiply; expand fewer of them")]);
        }
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                // Only the first document counts; later ones were already reported.
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => {
                    if !matches!(node.value, Value::Scalar(_)) {
                        self.diagnostics.push(
                            Diagnostic::error(
                                "complex-key",
                                node.span,
                                "a key must be a plain word, not a list or mapping",
                            )
                            .with_hint("use `key: value` with a simple key"),
                        );
                    }
                    *key = Some(node);
                }
                Some(k) => {
                    let duplicate = entries
                        .iter()
                        .find(|e| e.key.as_str().is_some() && e.key.as_str() == k.as_str())
                        .map(|e| e.key.span);
                    if let Some(first) = duplicate {
                        self.diagnostics.push(
                            Diagnostic::error(
                                "duplicate-key",
                                k.span,
                                format!(
                                    "key `{}` appears twice in this mapping (first on line {})",
                                    k.as_str().unwrap_or_default(),
                                    first.line
                                ),
                            )
                            .with_hint("keep one of them; YAML would silently keep only the last"),
                        );
                    } else {
                        entries.push(Entry { key: k, value: node });
                    }
                }
            },
        }
        Ok(())
    }
}

fn count_nodes(node: &Node) -> usize {
    let mut count = 0;
    let mut pending = vec![node];
    while let Some(n) = pending.pop() {
        count += 1;
        match &n.value {
            Value::Scalar(_) => {}
            Value::Seq(items) => pending.extend(items),
            Value::Map(entries) => pending.extend(entries.iter().flat_map(|e| [&e.key, &e.value])),
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(src: &str) -> Node {
        parse(src).expect("parses").0
    }

    #[test]
    fn spans_are_one_based_lines_and_columns() {
        let node = root("name: x\ntrain:\n  epochs: 3\n");
        let train = node.get("train").expect("train");
        assert_eq!(train.key.span, Span::new(2, 1, 5));
        let epochs = train.value.get("epochs").expect("epochs");
        assert_eq!(epochs.key.span, Span::new(3, 3, 6));
        assert_eq!(epochs.value.span, Span::new(3, 11, 1));
    }

    #[test]
    fn quoted_scalars_include_their_quotes_in_the_caret() {
        let node = root("a: \"xyz\"\n");
        assert_eq!(node.get("a").expect("a").value.span, Span::new(1, 4, 5));
    }

    #[test]
    fn duplicate_keys_are_reported_and_the_first_kept() {
        let (node, diags) = parse("a: 1\nb: 2\na: 3\n").expect("parses");
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].code, "duplicate-key");
        assert_eq!(diags[0].span.line, 3);
        assert_eq!(node.get("a").and_then(|e| e.value.as_str()), Some("1"));
    }

    #[test]
    fn syntax_errors_point_at_their_line() {
        let diags = parse("a: 1\nb: [1, 2\nc: 3\n").expect_err("broken");
        assert_eq!(diags[0].code, "yaml-syntax");
        assert!(diags[0].span.line >= 2, "{:?}", diags[0]);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let src = "[".repeat(10_000);
        let diags = parse(&src).expect_err("too deep or broken");
        assert!(!diags.is_empty());
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            src.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let diags = parse(&src).expect_err("too large");
        assert_eq!(diags[0].code, "too-large");
    }
}
