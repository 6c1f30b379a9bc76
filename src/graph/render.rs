//! Text tree, Graphviz DOT and Mermaid renderings of a plan.

use super::Plan;
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use std::collections::BTreeSet;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An indented tree; a stage with several inputs is drawn once, then marked `(*)`.
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

fn children(plan: &Plan, node: NodeIndex) -> Vec<NodeIndex> {
    let mut out: Vec<NodeIndex> = plan.graph.neighbors_directed(node, Direction::Outgoing).collect();
    out.sort_by_key(|n| plan.order.iter().position(|o| o == n));
    out.dedup();
    out
}

fn text(plan: &Plan) -> String {
    let mut out = format!("{} ({} stages)\n", plan.name, plan.graph.node_count());
    let roots: Vec<NodeIndex> = plan
        .order
        .iter()
        .copied()
        .filter(|&n| plan.graph.neighbors_directed(n, Direction::Incoming).next().is_none())
        .collect();
    let mut shown = BTreeSet::new();
    let mut repeated = false;
    // Explicit stack of (node, prefix, is_last) so wide or deep graphs cannot overflow.
    let mut stack: Vec<(NodeIndex, String, bool, bool)> =
        roots.iter().rev().enumerate().map(|(i, &n)| (n, String::new(), i == 0, true)).collect();
    while let Some((node, prefix, last, is_root)) = stack.pop() {
        let stage = &plan.graph[node];
        let branch = if is_root {
            ""
        } else if last {
            "└── "
        } else {
            "├── "
        };
        let inputs = plan.inputs(node);
        let extra = if inputs.len() > 1 {
            let names: Vec<String> = inputs.iter().map(|(_, n)| plan.graph[*n].name.clone()).collect();
            format!("  ← {}", names.join(", "))
        } else {
            String::new()
        };
        if !shown.insert(node) {
            repeated = true;
            let _ = writeln!(out, "{prefix}{branch}{} (*)", stage.name);
            continue;
        }
        let _ = writeln!(out, "{prefix}{branch}{} [{}]{extra}", stage.name, stage.kind.as_str());
        let child_prefix = if is_root {
            prefix.clone()
        } else if last {
            format!("{prefix}    ")
        } else {
            format!("{prefix}│   ")
        };
        let kids = children(plan, node);
        for (i, &kid) in kids.iter().enumerate().rev() {
            stack.push((kid, child_prefix.clone(), i + 1 == kids.len(), false));
        }
    }
    if repeated {
        out.push_str("(*) drawn above under its first input\n");
    }
    out
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn dot(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(&plan.name));
    out.push_str("  rankdir=LR;\n  node [shape=box, style=\"rounded\", fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n");
    for &n in &plan.order {
        let s = &plan.graph[n];
        let _ = writeln!(out, "  {} [label={}];", quote(&s.name), quote(&format!("{}\\n({})", s.name, s.kind.as_str())));
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
