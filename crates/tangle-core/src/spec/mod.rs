//! The pipeline spec: parse, interpolate, type-check and validate a YAML file.
//!
//! Invariants: this module does no I/O beyond reading the spec file and checking that the
//! files it names exist; it never runs anything. Every problem becomes a [`Diagnostic`] with
//! a position and a hint, and all of them are collected before returning.

pub mod de;
pub mod document;
pub mod env;
mod types;
mod validate;
pub mod yaml;

pub use types::*;

use crate::diagnostic::{Diagnostic, Report, Span};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use yaml::{Node, ScalarStyle, Value};

/// A spec that parsed and validated, with what is needed to point back into its source.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: Spec,
    /// The file as named on the command line.
    pub file: PathBuf,
    /// Relative paths in the spec resolve against this directory.
    pub dir: PathBuf,
    pub source: String,
    /// sha256 of the file's bytes: the spec's identity in run records and lineage.
    pub source_hash: String,
    pub spans: SpanIndex,
    pub warnings: Vec<Diagnostic>,
}

impl LoadedSpec {
    /// A path from the spec, resolved against the spec's directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        resolve_against(&self.dir, path)
    }

    /// A report holding `diagnostics` (plus the load warnings) against this spec's source.
    pub fn report(&self, mut diagnostics: Vec<Diagnostic>) -> Report {
        diagnostics.extend(self.warnings.iter().cloned());
        Report::new(&self.file, &self.source, diagnostics)
    }
}

pub fn resolve_against(dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// Reads and validates a spec file, with `${VAR}` taken from the process environment.
pub fn load_file(file: &Path) -> Result<LoadedSpec, Report> {
    let source = match std::fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) => {
            let d = Diagnostic::error("unreadable", Span::START, format!("cannot read the spec: {e}"))
                .with_hint("check the path; specs are YAML files such as pipelines/quickstart.yaml");
            return Err(Report::new(file, "", vec![d]));
        }
    };
    load_source(file, &source, &|name| std::env::var(name).ok())
}

/// Validates spec text; `file` names it in diagnostics and anchors relative paths.
pub fn load_source(file: &Path, source: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<LoadedSpec, Report> {
    let document::Document { source, spans, value, diagnostics, poisoned, .. } =
        document::read::<Spec>(file, source, lookup)?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let Some(spec) = value else {
        return Err(Report::new(file, &source, diagnostics));
    };
    let found = validate::validate(&spec, &dir, &spans, &poisoned);
    let (errors, warnings): (Vec<_>, Vec<_>) = diagnostics.into_iter().chain(found).partition(Diagnostic::is_error);
    if !errors.is_empty() {
        return Err(Report::new(file, &source, errors.into_iter().chain(warnings).collect()));
    }
    Ok(LoadedSpec {
        spec,
        file: file.to_path_buf(),
        dir,
        source_hash: hex::encode(Sha256::digest(source.as_bytes())),
        source,
        spans,
        warnings,
    })
}

/// Where each value of the document is: dotted paths (`teacher.targets[0].model`) to the
/// spans of the key and the value. Checks that run on typed data use it to point back.
#[derive(Debug, Clone, Default)]
pub struct SpanIndex {
    entries: HashMap<String, Located>,
}

#[derive(Debug, Clone)]
struct Located {
    key: Option<Span>,
    value: Span,
    raw: Option<String>,
    style: Option<ScalarStyle>,
}

impl SpanIndex {
    pub fn build(root: &Node) -> SpanIndex {
        let mut entries = HashMap::new();
        let mut pending: Vec<(String, Option<Span>, &Node)> = vec![(String::new(), None, root)];
        while let Some((path, key, node)) = pending.pop() {
            let (raw, style) = match &node.value {
                Value::Scalar(s) => (Some(s.text.clone()), Some(s.style)),
                _ => (None, None),
            };
            match &node.value {
                Value::Scalar(_) => {}
                Value::Seq(items) => {
                    for (i, item) in items.iter().enumerate() {
                        pending.push((format!("{path}[{i}]"), None, item));
                    }
                }
                Value::Map(map) => {
                    for entry in map {
                        if let Some(k) = entry.key.as_str() {
                            pending.push((de::child_path(&path, k), Some(entry.key.span), &entry.value));
                        }
                    }
                }
            }
            entries.insert(path, Located { key, value: node.span, raw, style });
        }
        SpanIndex { entries }
    }

    /// The nearest located ancestor of `path` (itself if present).
    fn find(&self, path: &str) -> Option<&Located> {
        let mut p = path;
        loop {
            if let Some(found) = self.entries.get(p) {
                return Some(found);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// The span of the value at `path` (or of its nearest ancestor that exists).
    pub fn value(&self, path: &str) -> Span {
        self.find(path).map_or(Span::START, |l| l.value)
    }

    /// The span of the key of `path`, falling back to its value.
    pub fn key(&self, path: &str) -> Span {
        self.find(path).map_or(Span::START, |l| l.key.unwrap_or(l.value))
    }

    /// The text written for a scalar, before interpolation.
    pub fn raw(&self, path: &str) -> Option<&str> {
        self.entries.get(path).and_then(|l| l.raw.as_deref())
    }

    /// A span inside a one-line scalar, `offset` characters from its start.
    pub fn within(&self, path: &str, offset: usize, len: usize) -> Span {
        let Some(located) = self.entries.get(path) else {
            return self.value(path);
        };
        match located.style {
            Some(ScalarStyle::Plain) => located.value.shifted(offset as u32, len as u32),
            Some(ScalarStyle::Quoted) => located.value.shifted(offset as u32 + 1, len as u32),
            _ => located.value,
        }
    }
}
