//! Compiles a validated spec into a DAG of stages.
//!
//! Each section becomes one or more stages with named, typed inputs; steps join the graph by
//! name. Compilation is pure: it reads the typed spec and the span index, never the disk.
//! Cycles, unknown stage names and duplicate names are reported as diagnostics pointing at
//! the spec lines that caused them.

mod render;

pub use render::{render, Format};

use crate::diagnostic::Diagnostic;
use crate::spec::{LoadedSpec, Spec};
use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// What a stage does; decides its executor and, with `LOGIC_VERSION`s, its cache keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Dataset,
    Split,
    Label,
    Train,
    Eval,
    Gate,
    Package,
    Deploy,
    Step,
}

impl StageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Dataset => "dataset",
            StageKind::Split => "split",
            StageKind::Label => "label",
            StageKind::Train => "train",
            StageKind::Eval => "eval",
            StageKind::Gate => "gate",
            StageKind::Package => "package",
            StageKind::Deploy => "deploy",
            StageKind::Step => "step",
        }
    }
}

/// The kind of artifact that flows along an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Artifact {
    Examples,
    Split,
    Labels,
    Model,
    Report,
    Decision,
    Package,
    Files,
}

impl Artifact {
    pub fn as_str(self) -> &'static str {
        match self {
            Artifact::Examples => "examples",
            Artifact::Split => "split",
            Artifact::Labels => "labels",
            Artifact::Model => "model",
            Artifact::Report => "report",
            Artifact::Decision => "decision",
            Artifact::Package => "package",
            Artifact::Files => "files",
        }
    }
}

/// One node of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    pub kind: StageKind,
    /// What the stage produces for its dependents.
    pub output: Artifact,
    /// The resolved configuration the stage's result depends on (secrets appear as `***`).
    /// Part of the cache key; executors must read nothing from the spec that is not in here.
    pub config: Value,
    /// Where the stage comes from in the spec (a dotted path), for diagnostics.
    #[serde(skip)]
    pub origin: String,
}

/// An edge: the input `port` of the target stage is fed by the source stage.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Edge {
    pub port: &'static str,
    pub artifact: Artifact,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub graph: DiGraph<Stage, Edge>,
    /// Every stage, in an order where each comes after all of its inputs.
    pub order: Vec<NodeIndex>,
}

impl Plan {
    /// A plan from a hand-built graph (tests, tools); `Err` names a stage on a cycle.
    pub fn new(name: &str, graph: DiGraph<Stage, Edge>) -> Result<Plan, String> {
        let order = toposort(&graph, None).map_err(|c| graph[c.node_id()].name.clone())?;
        Ok(Plan { name: name.to_string(), graph, order })
    }

    pub fn stage(&self, name: &str) -> Option<NodeIndex> {
        self.graph.node_indices().find(|&i| self.graph[i].name == name)
    }

    /// The stages feeding `node`, as (port, source) in a stable order.
    pub fn inputs(&self, node: NodeIndex) -> Vec<(&'static str, NodeIndex)> {
        let mut inputs: Vec<_> = self
            .graph
            .edges_directed(node, petgraph::Direction::Incoming)
            .map(|e| {
                use petgraph::visit::EdgeRef;
                (e.weight().port, e.source())
            })
            .collect();
        inputs.sort_by(|a, b| a.0.cmp(b.0).then_with(|| self.graph[a.1].name.cmp(&self.graph[b.1].name)));
        inputs
    }
}

/// Built-in stage names; steps may not reuse them.
pub const BUILTIN_STAGES: &[&str] = &[
    "dataset",
    "split",
    "label-train",
    "label-eval",
    "train",
    "eval-student",
    "eval-teacher",
    "gate",
    "package",
    "deploy",
];

pub fn compile(loaded: &LoadedSpec) -> Result<Plan, Vec<Diagnostic>> {
    let spec = &loaded.spec;
    let mut b = Builder::default();
    b.builtin_stages(spec, &loaded.source_hash);
    let mut diagnostics = Vec::new();

    // Steps: names first (so `needs` may refer to a later step), then edges.
    let mut step_nodes = Vec::new();
    for (i, step) in spec.steps.iter().enumerate() {
        let path = format!("steps[{i}].name");
        if let Some(&existing) = b.by_name.get(&step.name) {
            let other = &b.graph[existing];
            let message = if other.kind == StageKind::Step {
                format!("two stages are named `{}`", step.name)
            } else {
                format!("`{}` is the name of a built-in stage", step.name)
            };
            let hint = if other.kind == StageKind::Step {
                let line = loaded.spans.value(&format!("{}.name", other.origin)).line;
                format!("stage names must be unique; the first `{}` is on line {line}", step.name)
            } else {
                format!("rename the step; built-in stages are: {}", BUILTIN_STAGES.join(", "))
            };
            diagnostics.push(Diagnostic::error("duplicate-stage", loaded.spans.value(&path), message).with_hint(hint));
            step_nodes.push(None);
            continue;
        }
        let config = json!({
            "run": step.run,
            "env": step.env,
            "inputs": step.inputs,
        });
        let node = b.add(&step.name, StageKind::Step, Artifact::Files, config, &format!("steps[{i}]"));
        step_nodes.push(Some(node));
    }
    for (i, (step, node)) in spec.steps.iter().zip(&step_nodes).enumerate() {
        let Some(node) = *node else { continue };
        for (j, need) in step.needs.iter().enumerate() {
            match b.by_name.get(need) {
                Some(&source) => {
                    b.graph.add_edge(source, node, Edge { port: "needs", artifact: b.graph[source].output });
                }
                None => {
                    let names: Vec<&str> = b.by_name.keys().map(String::as_str).collect();
                    let hint = match crate::diagnostic::did_you_mean(need, names.iter().copied()) {
                        Some(best) => format!("did you mean `{best}`?"),
                        None => format!("stages in this pipeline: {}", names.join(", ")),
                    };
                    diagnostics.push(
                        Diagnostic::error(
                            "missing-input",
                            loaded.spans.value(&format!("steps[{i}].needs[{j}]")),
                            format!("step `{}` needs `{need}`, but no stage has that name", step.name),
                        )
                        .with_hint(hint),
                    );
                }
            }
        }
    }

    // Cycles can only run through steps' `needs`; report each strongly connected group once.
    for component in tarjan_scc(&b.graph) {
        let cyclic = component.len() > 1 || component.first().is_some_and(|&n| b.graph.find_edge(n, n).is_some());
        if !cyclic {
            continue;
        }
        let mut names: Vec<&str> = component.iter().map(|&n| b.graph[n].name.as_str()).collect();
        names.sort_unstable();
        let first = component
            .iter()
            .min_by_key(|&&n| loaded.spans.key(&b.graph[n].origin).line)
            .copied()
            .unwrap_or(component[0]);
        let origin = &b.graph[first].origin;
        let span = loaded.spans.key(&format!("{origin}.needs"));
        diagnostics.push(
            Diagnostic::error(
                "cycle",
                span,
                format!(
                    "stages {} need each other in a cycle",
                    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                ),
            )
            .with_hint("a stage cannot wait for itself; remove one of the `needs` entries that closes the loop"),
        );
    }

    if !diagnostics.is_empty() {
        return Err(diagnostics);
    }
    let order = toposort(&b.graph, None).map_err(|cycle| {
        vec![Diagnostic::error(
            "cycle",
            loaded.spans.key(&b.graph[cycle.node_id()].origin),
            format!("stage `{}` is part of a cycle", b.graph[cycle.node_id()].name),
        )]
    })?;
    Ok(Plan { name: spec.name.clone(), graph: b.graph, order })
}

#[derive(Default)]
struct Builder {
    graph: DiGraph<Stage, Edge>,
    by_name: BTreeMap<String, NodeIndex>,
}

impl Builder {
    fn add(&mut self, name: &str, kind: StageKind, output: Artifact, config: Value, origin: &str) -> NodeIndex {
        let node =
            self.graph.add_node(Stage { name: name.to_string(), kind, output, config, origin: origin.to_string() });
        self.by_name.insert(name.to_string(), node);
        node
    }

    fn link(&mut self, from: Option<NodeIndex>, to: NodeIndex, port: &'static str) {
        if let Some(from) = from {
            let artifact = self.graph[from].output;
            self.graph.add_edge(from, to, Edge { port, artifact });
        }
    }

    /// The standard chain: dataset → split → label → train → eval → gate → package → deploy,
    /// with only the stages the spec's sections ask for. Validation already guaranteed the
    /// sections each of these needs.
    fn builtin_stages(&mut self, spec: &Spec, spec_sha256: &str) {
        let d = &spec.dataset;
        let dataset = self.add(
            "dataset",
            StageKind::Dataset,
            Artifact::Examples,
            json!({
                "path": d.path,
                "format": d.format,
                "prompt_column": d.prompt_column,
                "reference_column": d.reference_column,
            }),
            "dataset",
        );
        let split = self.add(
            "split",
            StageKind::Split,
            Artifact::Split,
            json!({ "eval_fraction": d.eval_fraction, "seed": d.seed }),
            "dataset",
        );
        self.link(Some(dataset), split, "examples");

        let teacher_config = spec.teacher.as_ref().map(|t| serde_json::to_value(t).unwrap_or(Value::Null));
        let label = |b: &mut Builder, part: &str| -> Option<NodeIndex> {
            let config = teacher_config.clone()?;
            let node = b.add(
                &format!("label-{part}"),
                StageKind::Label,
                Artifact::Labels,
                json!({ "teacher": config, "part": part }),
                "teacher",
            );
            b.link(Some(split), node, "split");
            Some(node)
        };
        // A teacher labels what train and eval consume; with neither (label, look, then
        // train) it labels both sides of the split, so the section is never silently ignored.
        let labeling_only = spec.train.is_none() && spec.eval.is_none();
        let label_train = if spec.train.is_some() || labeling_only { label(self, "train") } else { None };
        let label_eval = if spec.eval.is_some() || labeling_only { label(self, "eval") } else { None };

        let train = spec.train.as_ref().map(|t| {
            let node = self.add(
                "train",
                StageKind::Train,
                Artifact::Model,
                json!({ "student": spec.student, "train": t }),
                "train",
            );
            self.link(Some(split), node, "split");
            self.link(label_train, node, "labels");
            node
        });

        // The teacher's eval scores its journaled labels (nothing is bought again); the
        // student's eval generates, scores, and merges the teacher's results into one report.
        let eval_teacher = match (&spec.eval, label_eval) {
            (Some(e), Some(labels)) => {
                let node = self.add(
                    "eval-teacher",
                    StageKind::Eval,
                    Artifact::Report,
                    json!({ "who": "teacher", "eval": e }),
                    "eval",
                );
                self.link(Some(split), node, "split");
                self.link(Some(labels), node, "labels");
                Some(node)
            }
            _ => None,
        };
        let eval_student = spec.eval.as_ref().map(|e| {
            let node = self.add(
                "eval-student",
                StageKind::Eval,
                Artifact::Report,
                json!({ "who": "student", "student": spec.student, "eval": e }),
                "eval",
            );
            self.link(Some(split), node, "split");
            self.link(train, node, "model");
            self.link(eval_teacher, node, "teacher_report");
            node
        });

        let gate = spec.gate.as_ref().map(|g| {
            let deployed = spec.deploy.as_ref().map(|d| json!({ "alias": d.alias, "registry": d.registry }));
            let node = self.add(
                "gate",
                StageKind::Gate,
                Artifact::Decision,
                json!({ "pipeline": spec.name, "gate": g, "deployed": deployed }),
                "gate",
            );
            self.link(eval_student, node, "report");
            node
        });

        let package = train.map(|model| {
            let node = self.add(
                "package",
                StageKind::Package,
                Artifact::Package,
                json!({
                    "name": spec.name,
                    "description": spec.description,
                    "teacher": spec.teacher,
                    "student": spec.student,
                    "spec_sha256": spec_sha256,
                    "dataset": spec.dataset.path,
                }),
                "train",
            );
            self.link(Some(model), node, "model");
            self.link(eval_student, node, "report");
            self.link(gate, node, "decision");
            node
        });

        if let (Some(d), Some(package)) = (&spec.deploy, package) {
            let node = self.add(
                "deploy",
                StageKind::Deploy,
                Artifact::Files,
                json!({ "pipeline": spec.name, "deploy": d }),
                "deploy",
            );
            self.link(Some(package), node, "package");
            self.link(gate, node, "decision");
        }
    }
}
