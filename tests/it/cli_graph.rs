//! `tangle graph`: every shipped and example spec in all three formats, snapshot-locked; the
//! DOT output must render with Graphviz.

use crate::common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn graph(spec: &std::path::Path, format: &str) -> String {
    let output = tangle().arg("graph").arg(spec).args(["--format", format]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}: {}", spec.display(), text(&output.stderr));
    assert_no_secret(&output);
    text(&output.stdout)
}

fn specs() -> Vec<std::path::PathBuf> {
    let specs: Vec<_> = specs_in("pipelines").into_iter().chain(specs_in("tests/specs/valid")).collect();
    assert!(!specs.is_empty());
    specs
}

#[test]
fn graphs_of_every_pipeline_in_every_format() {
    for spec in specs() {
        let dir = spec.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
        for format in ["text", "dot", "mermaid"] {
            insta::assert_snapshot!(format!("graph__{dir}__{}__{format}", stem(&spec)), graph(&spec, format));
        }
    }
}

#[test]
fn dot_output_renders_with_graphviz() {
    let dot = Command::new("dot").arg("-V").output();
    assert!(dot.is_ok(), "Graphviz `dot` is not installed (apt-get install graphviz; .ci/run installs it)");
    for spec in specs() {
        let source = graph(&spec, "dot");
        let mut child = Command::new("dot")
            .arg("-Tsvg")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(source.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}: dot failed: {}", spec.display(), text(&out.stderr));
        let svg = text(&out.stdout);
        assert!(svg.contains("<svg"), "{}", spec.display());
        // Every stage appears as a node in the picture.
        for line in graph(&spec, "text").lines().skip(1) {
            if let Some(name) = line.trim_start_matches(['│', '├', '└', '─', ' ']).split(' ').next() {
                if !name.is_empty() && !name.starts_with('(') {
                    let title = format!("<title>{}</title>", name.replace('-', "&#45;"));
                    assert!(svg.contains(&title), "{}: `{name}` missing from the SVG", spec.display());
                }
            }
        }
    }
}
