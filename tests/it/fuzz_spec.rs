//! Property-based fuzzing of the spec parser, validator and graph compiler: no input may
//! panic, and every diagnostic must point inside the file.
//!
//! Two generators: arbitrary text over YAML's punctuation and the spec's vocabulary, and
//! random edits (delete, duplicate, splice, swap) of real specs. The case count is
//! `TANGLE_FUZZ_CASES` split across the two (default 100,000 in all).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::Path;

const VOCABULARY: &[&str] = &[
    "name:",
    "teacher:",
    "student:",
    "dataset:",
    "train:",
    "eval:",
    "gate:",
    "deploy:",
    "steps:",
    "targets:",
    "provider:",
    "model:",
    "api_key:",
    "base_url:",
    "metrics:",
    "require:",
    "needs:",
    "run:",
    "lora:",
    "path:",
    "- ",
    "  ",
    "\n",
    ": ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "&a",
    "*a",
    "!!str",
    "|",
    ">",
    "#",
    "'",
    "\"",
    "${X}",
    "${",
    "$$",
    "---",
    "...",
    "~",
    "null",
    "true",
    "0",
    "-1",
    "1e309",
    "0.5",
    "exact_match",
    "teacher.",
    ">=",
    "<=",
    "*",
    "(",
    ")",
    "openai",
    "anthropic",
    "openai_compatible",
    "lora",
    "full",
    "kd",
    "sft",
    "cuda:0",
    "split",
    "dataset",
    "train",
    "label-train",
    "\t",
    "\u{feff}",
    "é",
    "\u{0}",
];

fn base_specs() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["pipelines", "tests/specs/valid", "tests/specs/invalid"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("spec dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                out.push(std::fs::read_to_string(path).expect("spec"));
            }
        }
    }
    out
}

/// Parses, validates and compiles; checks every diagnostic's position.
fn check(source: &str) {
    let env = |name: &str| (name == "X" || name.starts_with("TANGLE_TEST")).then(|| "value".to_string());
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/specs/valid/fuzz.yaml");
    let report = match tangle::spec::load_source(&file, source, &env) {
        Ok(loaded) => match tangle::graph::compile(&loaded) {
            Ok(plan) => {
                for format in [tangle::graph::Format::Text, tangle::graph::Format::Dot, tangle::graph::Format::Mermaid]
                {
                    let _ = tangle::graph::render(&plan, format);
                }
                return;
            }
            Err(diagnostics) => loaded.report(diagnostics),
        },
        Err(report) => report,
    };
    assert!(report.has_errors(), "a failed load must carry an error");
    // The report holds the source with line endings normalised, as the lines it shows.
    let lines = report.source.lines().count() as u32 + 1;
    for d in &report.diagnostics {
        assert!(d.span.line >= 1 && d.span.line <= lines + 1, "{d:?} outside {lines} lines");
        assert!(d.span.col >= 1 && d.span.len >= 1, "{d:?}");
    }
    let _ = report.render_human();
    let _ = report.to_json();
}

fn cases() -> u32 {
    std::env::var("TANGLE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

#[test]
fn arbitrary_text_never_panics() {
    let token = prop_oneof![
        prop::sample::select(VOCABULARY).prop_map(str::to_string),
        "[a-z_]{1,8}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    let strategy = prop::collection::vec(token, 0..80).prop_map(|parts| parts.concat());
    let n = cases() / 2;
    runner(n)
        .run(&strategy, |source| {
            check(&source);
            Ok(())
        })
        .expect("no panics");
    eprintln!("fuzz: {n} arbitrary inputs, 0 panics");
}

#[derive(Debug, Clone)]
enum Edit {
    DeleteLine(usize),
    DuplicateLine(usize),
    Insert(usize, String),
    ReplaceByte(usize, u8),
    SwapLines(usize, usize),
    Truncate(usize),
}

fn apply(source: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = source.lines().map(str::to_string).collect();
    for edit in edits {
        let n = lines.len().max(1);
        match edit {
            Edit::DeleteLine(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Edit::DuplicateLine(i) if !lines.is_empty() => {
                let line = lines[i % n].clone();
                lines.insert(i % n, line);
            }
            Edit::Insert(i, text) if !lines.is_empty() => {
                let line = &mut lines[i % n];
                let mut at = i % (line.len() + 1);
                while !line.is_char_boundary(at) {
                    at -= 1;
                }
                line.insert_str(at, text);
            }
            Edit::ReplaceByte(i, b) if !lines.is_empty() => {
                let line = &mut lines[i % n];
                if !line.is_empty() && b.is_ascii() {
                    let at = i % line.len();
                    if line.is_char_boundary(at) && line.is_char_boundary(at + 1) {
                        line.replace_range(at..at + 1, &(*b as char).to_string());
                    }
                }
            }
            Edit::SwapLines(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
            Edit::Truncate(i) => lines.truncate(i % (n + 1)),
            _ => {}
        }
    }
    lines.join("\n")
}

#[test]
fn mutated_real_specs_never_panic() {
    let bases = base_specs();
    assert!(bases.len() > 10);
    let edit = prop_oneof![
        any::<usize>().prop_map(Edit::DeleteLine),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), prop::sample::select(VOCABULARY)).prop_map(|(i, t)| Edit::Insert(i, t.to_string())),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::ReplaceByte(i, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        any::<usize>().prop_map(Edit::Truncate),
    ];
    let strategy = (0..bases.len(), prop::collection::vec(edit, 1..6));
    let n = cases() - cases() / 2;
    runner(n)
        .run(&strategy, |(base, edits)| {
            check(&apply(&bases[base], &edits));
            Ok(())
        })
        .expect("no panics");
    eprintln!("fuzz: {n} mutated specs, 0 panics");
}
