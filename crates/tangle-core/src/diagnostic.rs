//! User-facing diagnostics: what went wrong, where (file:line:col), and how to fix it.
//!
//! Every error a spec can produce is a [`Diagnostic`]. They are collected, never
//! short-circuited, so one `tangle validate` shows every mistake at once. Rendering is pure:
//! the human form mirrors compiler output (`file:line:col: error: message`, the offending
//! line with a caret, a `hint:`); the JSON form is for editors and CI.

use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A position in a source file. Lines and columns are 1-based; `len` is the caret width in
/// characters (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Span {
    pub line: u32,
    pub col: u32,
    pub len: u32,
}

impl Span {
    pub const START: Span = Span { line: 1, col: 1, len: 1 };

    pub fn new(line: u32, col: u32, len: u32) -> Span {
        Span { line: line.max(1), col: col.max(1), len: len.max(1) }
    }

    /// A sub-span `offset` characters to the right on the same line.
    pub fn shifted(self, offset: u32, len: u32) -> Span {
        Span::new(self.line, self.col + offset, len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about a source file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable, kebab-case identifier (`unknown-key`, `wrong-type`, …) for tools.
    pub code: &'static str,
    pub message: String,
    pub span: Span,
    /// How to fix it, in one sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Error, code, message: message.into(), span, hint: None }
    }

    pub fn warning(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(code, span, message) }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// Diagnostics for one file, with the source text needed to show the offending lines.
#[derive(Debug, Clone)]
pub struct Report {
    pub file: PathBuf,
    pub source: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    pub fn new(file: &Path, source: &str, mut diagnostics: Vec<Diagnostic>) -> Report {
        // Source order reads best; the sort is stable so same-position findings keep the
        // order in which the checks found them.
        diagnostics.sort_by_key(|d| (d.span.line, d.span.col));
        diagnostics.dedup();
        Report { file: file.to_path_buf(), source: source.to_string(), diagnostics }
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    /// Compiler-style text, for a terminal or a CI log.
    pub fn render_human(&self) -> String {
        let file = self.file.display();
        let mut out = String::new();
        for d in &self.diagnostics {
            let severity = match d.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let Span { line, col, len } = d.span;
            let _ = writeln!(out, "{file}:{line}:{col}: {severity}: {}", d.message);
            if let Some(text) = self.source.lines().nth(line as usize - 1) {
                let gutter = " ".repeat(line.to_string().len());
                let excerpt = Excerpt::around(text.trim_end(), col, len);
                let _ = writeln!(out, "{gutter} |");
                let _ = writeln!(out, "{line} | {}", excerpt.text);
                let _ = writeln!(out, "{gutter} | {}{}", excerpt.pad, "^".repeat(excerpt.caret));
            }
            if let Some(hint) = &d.hint {
                let _ = writeln!(out, "  = hint: {hint}");
            }
            out.push('\n');
        }
        let errors = self.error_count();
        let warnings = self.diagnostics.len() - errors;
        if errors > 0 {
            let _ = writeln!(
                out,
                "{file}: {errors} error{}{}",
                plural(errors),
                if warnings > 0 { format!(", {warnings} warning{}", plural(warnings)) } else { String::new() }
            );
        }
        out
    }

    /// The machine-readable form printed by `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        let list = |severity: Severity| -> Vec<serde_json::Value> {
            self.diagnostics
                .iter()
                .filter(|d| d.severity == severity)
                .map(|d| {
                    serde_json::json!({
                        "file": self.file.display().to_string(),
                        "line": d.span.line,
                        "column": d.span.col,
                        "length": d.span.len,
                        "code": d.code,
                        "message": d.message,
                        "hint": d.hint,
                    })
                })
                .collect()
        };
        serde_json::json!({
            "file": self.file.display().to_string(),
            "valid": !self.has_errors(),
            "errors": list(Severity::Error),
            "warnings": list(Severity::Warning),
        })
    }
}

/// Longest source line shown whole, in characters; a longer one (minified JSON, a data
/// blob pasted into a spec) is cut to a window around the caret, so one diagnostic never
/// prints a 100 KB line.
const MAX_SHOWN_CHARS: usize = 120;
/// Characters kept before the caret when a line is cut.
const CONTEXT_BEFORE: usize = 40;

/// The part of a source line a diagnostic shows, and where its caret goes.
struct Excerpt {
    text: String,
    /// Whitespace up to the caret (tabs kept, so the caret lines up under them).
    pad: String,
    caret: usize,
}

impl Excerpt {
    fn around(line: &str, col: u32, len: u32) -> Excerpt {
        let chars: Vec<char> = line.chars().collect();
        let caret_start = (col as usize - 1).min(chars.len());
        let (start, end) = if chars.len() <= MAX_SHOWN_CHARS {
            (0, chars.len())
        } else {
            let start = caret_start.saturating_sub(CONTEXT_BEFORE).min(chars.len() - MAX_SHOWN_CHARS);
            (start, start + MAX_SHOWN_CHARS)
        };
        let (lead, tail) = (if start > 0 { "…" } else { "" }, if end < chars.len() { "…" } else { "" });
        let text = format!("{lead}{}{tail}", chars[start..end].iter().collect::<String>());
        let pad: String = lead
            .chars()
            .map(|_| ' ')
            .chain(chars[start..caret_start].iter().map(|&c| if c == '\t' { '\t' } else { ' ' }))
            .collect();
        let caret =
            if chars.len() <= MAX_SHOWN_CHARS { len as usize } else { (len as usize).min(end - caret_start).max(1) };
        Excerpt { text, pad, caret }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The closest candidate to `word`, if one is close enough to be a plausible typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::normalized_damerau_levenshtein(word, c), c))
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_words_only() {
        let keys = ["epochs", "batch_size", "lr"];
        assert_eq!(did_you_mean("epoch", keys), Some("epochs"));
        assert_eq!(did_you_mean("batchsize", keys), Some("batch_size"));
        assert_eq!(did_you_mean("temperature", keys), None);
    }

    #[test]
    fn a_long_line_shows_a_bounded_window_around_the_caret() {
        let long = format!("data: \"{}BAD{}\"\n", "x".repeat(50_000), "y".repeat(50_000));
        let d = Diagnostic::error("wrong-type", Span::new(1, 50_008, 3), "bad value");
        let text = Report::new(Path::new("p.yaml"), &long, vec![d]).render_human();
        assert!(text.len() < 1_000, "{} bytes", text.len());
        let lines: Vec<&str> = text.lines().collect();
        let (shown, caret) = (lines[2], lines[3]);
        assert!(shown.starts_with("1 | …x") && shown.ends_with("y…"), "{shown}");
        // The caret sits under `BAD`, whatever was cut before it.
        let at = caret.find('^').unwrap();
        assert_eq!(shown.chars().skip(at).take(3).collect::<String>(), "BAD", "{shown}\n{caret}");
        assert_eq!(caret.matches('^').count(), 3);
        // Short lines are shown whole, as before.
        let d = Diagnostic::error("wrong-type", Span::new(1, 7, 2), "bad value");
        let text = Report::new(Path::new("p.yaml"), "data: xx\n", vec![d]).render_human();
        assert!(text.contains("1 | data: xx\n  |       ^^\n"), "{text}");
    }

    #[test]
    fn renders_caret_under_the_column() {
        let src = "a: 1\ntrain:\n  epoch: 3\n";
        let d = Diagnostic::error("unknown-key", Span::new(3, 3, 5), "unknown key `epoch`")
            .with_hint("did you mean `epochs`?");
        let text = Report::new(Path::new("p.yaml"), src, vec![d]).render_human();
        assert!(text.starts_with("p.yaml:3:3: error: unknown key `epoch`\n"), "{text}");
        assert!(text.contains("3 |   epoch: 3\n  |   ^^^^^\n"), "{text}");
        assert!(text.contains("= hint: did you mean `epochs`?"), "{text}");
        assert!(text.contains("p.yaml: 1 error"), "{text}");
    }
}
