//! Every key of the spec reference in README.md changes what tangle does or sends.
//!
//! `teacher.params.seed` was documented, validated, and dropped on the way to the provider.
//! This walks every key of the README's reference spec and, for each, changes its value and
//! shows the change arriving where it acts: the request a teacher receives, the router's
//! targets, the labeling settings, or the configuration (and so the cache key) of the stage
//! that executes it. A key added to the reference without a probe here, or a probe for a key
//! the reference no longer has, fails the test.

use std::collections::BTreeSet;
use std::path::Path;

use tangle::graph::{self, Format};
use tangle::spec::yaml::{self, Node, Value};
use tangle::spec::{LoadedSpec, TeacherSpec};
use tangle::stages::label::{label_settings, target_configs, teacher_request};

/// Where a key's effect is observed.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// The chat request the teacher is sent for an example (messages and params).
    Request,
    /// The router's targets: provider, model, key, endpoint, timeout, retries, limits, prices.
    Targets,
    /// How a side of the split is labeled: concurrency, budget (`"train"` or `"eval"`).
    Settings(&'static str),
    /// The resolved configuration of this stage, which is also its cache key.
    Stage(&'static str),
    /// The shape of the DAG: its stages and edges.
    Graph,
}

/// (key path, text in the reference, its replacement, where the change shows).
const PROBES: &[(&str, &str, &str, Probe)] = &[
    ("name", "name: support-intent ", "name: support-triage ", Probe::Stage("gate")),
    ("description", "description: Route merchant messages", "description: Route merchant mail", Probe::Stage("package")),
    ("teacher.targets[].provider", "provider: anthropic, model: claude", "provider: openai, model: claude", Probe::Targets),
    ("teacher.targets[].model", "model: claude-opus-4-8", "model: claude-opus-4-9", Probe::Targets),
    ("teacher.targets[].api_key", "${ANTHROPIC_API_KEY}", "${OTHER_API_KEY}", Probe::Targets),
    ("teacher.targets[].base_url", "127.0.0.1:8377/v1", "127.0.0.1:8378/v1", Probe::Targets),
    ("teacher.targets[].launch.command", "serve model.gguf", "serve other.gguf", Probe::Stage("label-train")),
    ("teacher.targets[].launch.ready_timeout_s", "ready_timeout_s: 300", "ready_timeout_s: 100", Probe::Stage("label-train")),
    ("teacher.system", "system: \"Classify the merchant", "system: \"Sort the merchant", Probe::Request),
    ("teacher.params.temperature", "temperature: 0, max_tokens", "temperature: 0.5, max_tokens", Probe::Request),
    ("teacher.params.max_tokens", "max_tokens: 16,", "max_tokens: 17,", Probe::Request),
    ("teacher.params.top_p", "top_p: 1.0", "top_p: 0.9", Probe::Request),
    ("teacher.params.stop", r#"stop: ["\n"]"#, r#"stop: ["\n\n"]"#, Probe::Request),
    ("teacher.params.seed", "seed: 7 }", "seed: 8 }", Probe::Request),
    ("teacher.logprobs", "logprobs: 5", "logprobs: 6", Probe::Request),
    ("teacher.concurrency", "concurrency: 64", "concurrency: 32", Probe::Settings("train")),
    ("teacher.eval_concurrency", "eval_concurrency: 1", "eval_concurrency: 2", Probe::Settings("eval")),
    ("teacher.rate_limits.requests_per_min", "requests_per_min: 500", "requests_per_min: 600", Probe::Targets),
    ("teacher.rate_limits.tokens_per_min", "tokens_per_min: 200000", "tokens_per_min: 300000", Probe::Targets),
    ("teacher.budget.max_tokens", "max_tokens: 2000000", "max_tokens: 3000000", Probe::Settings("train")),
    ("teacher.budget.max_cost_usd", "max_cost_usd: 50", "max_cost_usd: 60", Probe::Settings("train")),
    ("teacher.pricing.input_per_mtok", "input_per_mtok: 15.0", "input_per_mtok: 16.0", Probe::Targets),
    ("teacher.pricing.output_per_mtok", "output_per_mtok: 75.0", "output_per_mtok: 76.0", Probe::Targets),
    ("teacher.timeout_s", "timeout_s: 60", "timeout_s: 30", Probe::Targets),
    ("teacher.max_retries", "max_retries: 3", "max_retries: 4", Probe::Targets),
    ("student.model", "model: Qwen/Qwen2.5-0.5B-Instruct", "model: Qwen/Qwen2.5-1.5B-Instruct", Probe::Stage("train")),
    ("student.device", "device: auto", "device: cpu", Probe::Stage("train")),
    ("student.max_seq_len", "max_seq_len: 512", "max_seq_len: 256", Probe::Stage("train")),
    ("student.system", "system: Route the message.", "system: Route it.", Probe::Stage("eval-student")),
    ("student.quantize", "quantize: q8_0", "quantize: q4_k", Probe::Stage("train")),
    ("dataset.path", "path: data/support.jsonl", "path: data/other.jsonl", Probe::Stage("dataset")),
    ("dataset.format", "format: jsonl", "format: csv", Probe::Stage("dataset")),
    ("dataset.eval_fraction", "eval_fraction: 0.1 ", "eval_fraction: 0.2 ", Probe::Stage("split")),
    ("dataset.seed", "seed: 42", "seed: 43", Probe::Stage("split")),
    ("dataset.prompt_column", "prompt_column: prompt", "prompt_column: text", Probe::Stage("dataset")),
    ("dataset.reference_column", "reference_column: reference", "reference_column: label", Probe::Stage("dataset")),
    // `lora` settings with `method: full` are an error: the change drops them too.
    ("train.method", "method: lora                        # lora (default) | full\n  lora: { rank: 16, alpha: 32, dropout: 0.0, targets: [q_proj, v_proj], last_layers: 12 }", "method: full", Probe::Stage("train")),
    ("train.lora.rank", "rank: 16", "rank: 8", Probe::Stage("train")),
    ("train.lora.alpha", "alpha: 32", "alpha: 16", Probe::Stage("train")),
    ("train.lora.dropout", "dropout: 0.0", "dropout: 0.1", Probe::Stage("train")),
    ("train.lora.targets", "targets: [q_proj, v_proj]", "targets: [q_proj, k_proj]", Probe::Stage("train")),
    ("train.lora.last_layers", "last_layers: 12", "last_layers: 6", Probe::Stage("train")),
    ("train.epochs", "epochs: 3", "epochs: 4", Probe::Stage("train")),
    ("train.batch_size", "batch_size: 8", "batch_size: 4", Probe::Stage("train")),
    ("train.grad_accum", "grad_accum: 1", "grad_accum: 2", Probe::Stage("train")),
    ("train.lr", "lr: 2.0e-4", "lr: 1.0e-4", Probe::Stage("train")),
    ("train.weight_decay", "weight_decay: 0.0", "weight_decay: 0.1", Probe::Stage("train")),
    ("train.warmup_ratio", "warmup_ratio: 0.05", "warmup_ratio: 0.1", Probe::Stage("train")),
    ("train.max_grad_norm", "max_grad_norm: 1.0", "max_grad_norm: 0.5", Probe::Stage("train")),
    ("train.loss.kind", "kind: kd", "kind: sft", Probe::Stage("train")),
    ("train.loss.alpha", "alpha: 0.5", "alpha: 0.7", Probe::Stage("train")),
    ("train.loss.temperature", "temperature: 1.0 }", "temperature: 2.0 }", Probe::Stage("train")),
    ("train.seed", "seed: 0\n", "seed: 1\n", Probe::Stage("train")),
    ("train.checkpoint_every", "checkpoint_every: 100", "checkpoint_every: 50", Probe::Stage("train")),
    (
        "eval.metrics",
        "metrics: [exact_match, rouge_l, teacher_agreement, latency]",
        "metrics: [exact_match, teacher_agreement, latency]",
        Probe::Stage("eval-student"),
    ),
    ("eval.normalize.lowercase", "lowercase: true", "lowercase: false", Probe::Stage("eval-student")),
    ("eval.normalize.strip", "strip: true,", "strip: false,", Probe::Stage("eval-student")),
    ("eval.normalize.strip_punctuation", "strip_punctuation: false", "strip_punctuation: true", Probe::Stage("eval-student")),
    ("eval.regex", "regex: '^(billing|shipping)$'", "regex: '^(billing)$'", Probe::Stage("eval-student")),
    ("eval.json_schema", "json_schema: schema.json", "json_schema: other.json", Probe::Stage("eval-student")),
    ("eval.max_new_tokens", "max_new_tokens: 64", "max_new_tokens: 32", Probe::Stage("eval-student")),
    ("eval.bootstrap_samples", "bootstrap_samples: 1000", "bootstrap_samples: 500", Probe::Stage("eval-student")),
    ("eval.compute_usd_per_hour", "compute_usd_per_hour: 0.10", "compute_usd_per_hour: 0.20", Probe::Stage("eval-student")),
    ("gate.require", "latency_p95_ms <= 200", "latency_p95_ms <= 300", Probe::Stage("gate")),
    ("deploy.registry", "registry: .tangle/registry", "registry: .tangle/other", Probe::Stage("deploy")),
    // The gate names the deployed version by its alias: the change renames it there too.
    (
        "deploy.alias",
        "production.exact_match - 0.01   # vs the deployed version\ndeploy:\n  registry: .tangle/registry          # optional\n  alias: production ",
        "live.exact_match - 0.01\ndeploy:\n  registry: .tangle/registry\n  alias: live ",
        Probe::Stage("deploy"),
    ),
    ("steps[].name", "name: notify", "name: announce", Probe::Graph),
    ("steps[].needs", "needs: [deploy]", "needs: [gate]", Probe::Graph),
    ("steps[].run", "run: ./scripts/notify.sh", "run: ./scripts/other.sh", Probe::Stage("notify")),
    ("steps[].inputs", "inputs: [scripts/notify.sh]", "inputs: [scripts/other.sh]", Probe::Stage("notify")),
    ("steps[].env", "CHANNEL: ml-releases", "CHANNEL: ml-alerts", Probe::Stage("notify")),
];

/// The YAML block under "## The spec" in README.md.
fn reference() -> String {
    let readme = std::fs::read_to_string(crate::common::repo().join("README.md")).unwrap();
    let section = &readme[readme.find("## The spec").expect("README has a spec reference")..];
    let start = section.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let end = start + section[start..].find("```").expect("the block ends");
    section[start..end].to_string()
}

/// Every key path of a document, list indices written `[]`; a sequence of scalars and a
/// step's `env` (names the user chooses) are values, not further keys.
fn key_paths(node: &Node, prefix: &str, out: &mut BTreeSet<String>) {
    match &node.value {
        Value::Map(entries) => {
            for entry in entries {
                let key = entry.key.as_str().unwrap_or_default();
                let path = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
                let is_value = key == "env"
                    || !matches!(entry.value.value, Value::Map(_) | Value::Seq(_))
                    || matches!(&entry.value.value, Value::Seq(items) if items.iter().all(|i| !matches!(i.value, Value::Map(_))));
                if is_value {
                    out.insert(path);
                } else {
                    key_paths(&entry.value, &path, out);
                }
            }
        }
        Value::Seq(items) => {
            for item in items {
                key_paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn load(dir: &Path, text: &str) -> LoadedSpec {
    let lookup = |name: &str| match name {
        "OTHER_API_KEY" => Some("key-other".to_string()),
        _ => Some(format!("key-{name}")),
    };
    tangle::spec::load_source(&dir.join("pipeline.yaml"), text, &lookup)
        .unwrap_or_else(|report| panic!("the reference must stay valid:\n{}", report.render_human()))
}

fn teacher(spec: &LoadedSpec) -> &TeacherSpec {
    spec.spec.teacher.as_ref().expect("the reference has a teacher")
}

/// What `probe` sees of a spec, as text to compare.
fn observe(probe: Probe, spec: &LoadedSpec) -> String {
    match probe {
        Probe::Request => {
            let example: tangle::dataset::Example = serde_json::from_value(serde_json::json!({
                "id": "e", "messages": [{"role": "user", "content": "where is my parcel?"}]
            }))
            .unwrap();
            serde_json::to_string(&teacher_request(teacher(spec), &example)).unwrap()
        }
        Probe::Targets => target_configs(teacher(spec))
            .iter()
            .map(|t| {
                // Serialization masks keys; the router sends the real one.
                let key = t.api_key.as_ref().map(|k| k.expose().to_string());
                format!("{} key={key:?}", serde_json::to_string(t).unwrap())
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Probe::Settings(part) => format!("{:?}", label_settings(teacher(spec), part, "run", "stage")),
        Probe::Stage(name) => {
            let plan = graph::compile(spec).unwrap();
            let node = plan.stage(name).unwrap_or_else(|| panic!("the reference compiles no `{name}` stage"));
            plan.graph[node].config.to_string()
        }
        Probe::Graph => graph::render(&graph::compile(spec).unwrap(), Format::Text),
    }
}

#[test]
fn every_key_of_the_readme_reference_changes_what_tangle_does_or_sends() {
    let text = reference();
    let dir = tempfile::tempdir().unwrap();
    for file in
        ["data/support.jsonl", "data/other.jsonl", "schema.json", "other.json", "scripts/notify.sh", "scripts/other.sh"]
    {
        let path = dir.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "{\"prompt\": \"hi\", \"reference\": \"billing\"}\n").unwrap();
    }

    let (root, _) = yaml::parse(&text).unwrap();
    let mut documented = BTreeSet::new();
    key_paths(&root, "", &mut documented);
    let probed: BTreeSet<String> = PROBES.iter().map(|(path, ..)| path.to_string()).collect();
    let unprobed: Vec<&String> = documented.difference(&probed).collect();
    let stale: Vec<&String> = probed.difference(&documented).collect();
    assert!(unprobed.is_empty(), "README documents keys no probe proves: {unprobed:?}");
    assert!(stale.is_empty(), "probes for keys README no longer documents: {stale:?}");

    let base = load(dir.path(), &text);
    for (path, find, replace, probe) in PROBES {
        assert_eq!(text.matches(find).count(), 1, "`{find}` ({path}) must occur once in the reference");
        let changed = load(dir.path(), &text.replacen(find, replace, 1));
        assert_ne!(
            observe(*probe, &base),
            observe(*probe, &changed),
            "changing `{path}` ({find} → {replace}) changed nothing {probe:?} shows"
        );
    }
}
