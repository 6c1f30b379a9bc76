//! Text tree, Graphviz DOT and Mermaid renderings of a plan.

use super::Plan;
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An indented tree; a stage with several inputs hangs under the last one to finish.
    Text,
    /// Graphviz DOT (`tangle graph p.yaml --format dot | dot -Tsvg > p.svg`).
    Dot,
    /// A Mermaid flowchart, for Markdown that renders it (GitHub does).
    Mermaid,
}

pub fn render(plan: &Plan, format: Format) -> String {
    match format {
        Format::Text => text(plan),
        Format::Dot => dot(plan),
        Format::Mermaid => mermaid(plan),
    }
}

/// The text tree is a spanning tree of the DAG: each stage hangs under the input that is
/// ready last (latest in topological order), and lists its other inputs after `←`. Every
/// stage appears exactly once.
fn text(plan: &Plan) -> String {
    let position = |n: NodeIndex| plan.order.iter().position(|&o| o == n).unwrap_or(0);
    let mut children: Vec<Vec<NodeIndex>> = vec![Vec::new(); plan.graph.node_count()];
    let mut roots = Vec::new();
    for &node in &plan.order {
        let parent = plan.graph.neighbors_directed(node, Direction::Incoming).max_by_key(|&p| position(p));
        match parent {
            Some(p) => children[p.index()].push(node),
            None => roots.push(node),
        }
    }
    let mut out = format!("{} ({} stages)\n", plan.name, plan.graph.node_count());
    // Explicit stack of (node, prefix, is_last, is_root): no recursion on deep graphs.
    let mut stack: Vec<(NodeIndex, String, bool, bool)> =
        roots.iter().rev().map(|&n| (n, String::new(), true, true)).collect();
    while let Some((node, prefix, last, is_root)) = stack.pop() {
        let stage = &plan.graph[node];
        let branch = match (is_root, last) {
            (true, _) => "",
            (false, true) => "└── ",
            (false, false) => "├── ",
        };
        let inputs = plan.inputs(node);
        let extra = if inputs.len() > 1 {
            let mut names: Vec<&str> = inputs.iter().map(|(_, n)| plan.graph[*n].name.as_str()).collect();
            names.dedup();
            format!("  ← {}", names.join(", "))
        } else {
            String::new()
        };
        let _ = writeln!(out, "{prefix}{branch}{} [{}]{extra}", stage.name, stage.kind.as_str());
        let child_prefix = match (is_root, last) {
            (true, _) => prefix.clone(),
            (false, true) => format!("{prefix}    "),
            (false, false) => format!("{prefix}│   "),
        };
        let kids = &children[node.index()];
        for (i, &kid) in kids.iter().enumerate().rev() {
            stack.push((kid, child_prefix.clone(), i + 1 == kids.len(), false));
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn quote(s: &str) -> String {
    format!("\"{}\"", escape(s))
}

fn dot(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(&plan.name));
    out.push_str("  rankdir=LR;\n  node [shape=box, style=\"rounded\", fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n");
    for &n in &plan.order {
        let s = &plan.graph[n];
        // `\n` in a DOT label is a line break, so it goes in after escaping.
        let _ = writeln!(out, "  {} [label=\"{}\\n({})\"];", quote(&s.name), escape(&s.name), s.kind.as_str());
    }
    for &n in &plan.order {
        for (port, source) in plan.inputs(n) {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                quote(&plan.graph[source].name),
                quote(&plan.graph[n].name),
                quote(port)
            );
        }
    }
    out.push_str("}\n");
    out
}

fn mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart LR\n");
    let id = |n: NodeIndex| format!("s{}", n.index());
    for &n in &plan.order {
        let s = &plan.graph[n];
        let label = format!("{}<br/><i>{}</i>", s.name, s.kind.as_str()).replace('"', "#quot;");
        let _ = writeln!(out, "  {}[\"{label}\"]", id(n));
    }
    for &n in &plan.order {
        for (port, source) in plan.inputs(n) {
            let _ = writeln!(out, "  {} -->|{port}| {}", id(source), id(n));
        }
    }
    out
}
