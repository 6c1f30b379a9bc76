//! Checks beyond types: ranges, cross-section requirements, metric names, gate clauses,
//! secrets written in clear, files that do not exist.

use super::de::describe_path;
use super::types::*;
use super::{env, resolve_against, SpanIndex};
use crate::diagnostic::{did_you_mean, Diagnostic};
use crate::eval;
use crate::gate::clause::{Clause, Subject};
use std::collections::BTreeSet;
use std::path::Path;

pub fn validate(spec: &Spec, dir: &Path, spans: &SpanIndex, poisoned: &BTreeSet<String>) -> Vec<Diagnostic> {
    let mut c = Checker { spans, poisoned, diagnostics: Vec::new() };
    c.name(spec);
    if let Some(teacher) = &spec.teacher {
        c.teacher(teacher);
    }
    if let Some(student) = &spec.student {
        c.student(student);
        if spec.train.is_none() && spec.eval.is_none() {
            c.unused_section(
                "student",
                "only `train` and `eval` use the student: add one of them, or remove `student`",
            );
        }
    }
    c.dataset(&spec.dataset, dir);
    if let Some(train) = &spec.train {
        c.train(spec, train);
    }
    if let Some(eval) = &spec.eval {
        c.eval(spec, eval, dir);
    }
    if let Some(gate) = &spec.gate {
        c.gate(spec, gate);
    }
    if let Some(deploy) = &spec.deploy {
        c.deploy(spec, deploy);
    }
    c.steps(spec, dir);
    c.diagnostics
}

struct Checker<'a> {
    spans: &'a SpanIndex,
    poisoned: &'a BTreeSet<String>,
    diagnostics: Vec<Diagnostic>,
}

impl Checker<'_> {
    /// Whether `path` holds a placeholder for a value that was already reported.
    fn is_poisoned(&self, path: &str) -> bool {
        super::document::is_poisoned(self.poisoned, path)
    }

    fn push(&mut self, path: &str, diagnostic: Diagnostic) {
        if !self.is_poisoned(path) {
            self.diagnostics.push(diagnostic);
        }
    }

    fn at_value(&mut self, path: &str, code: &'static str, message: String, hint: impl Into<String>) {
        let span = self.spans.value(path);
        self.push(path, Diagnostic::error(code, span, message).with_hint(hint));
    }

    fn at_key(&mut self, path: &str, code: &'static str, message: String, hint: impl Into<String>) {
        let span = self.spans.key(path);
        self.push(path, Diagnostic::error(code, span, message).with_hint(hint));
    }

    fn range(&mut self, path: &str, value: f64, min: f64, max: f64, inclusive_min: bool) {
        let below = if inclusive_min { value < min } else { value <= min };
        if below || value > max {
            let lower = if inclusive_min { "≥" } else { ">" };
            self.at_value(
                path,
                "out-of-range",
                format!("{} is {value}, but it must be {lower} {min} and ≤ {max}", describe_path(path)),
                format!("use a value in that range for `{}`", path.rsplit('.').next().unwrap_or(path)),
            );
        }
    }

    fn at_least_one(&mut self, path: &str, value: u64) {
        if value == 0 {
            self.at_value(
                path,
                "out-of-range",
                format!("{} is 0, but it must be at least 1", describe_path(path)),
                "use a whole number of 1 or more",
            );
        }
    }

    fn requires(&mut self, section: &str, present: bool, needed: &str, why: &str) {
        if !present {
            self.at_key(
                section,
                "missing-section",
                format!("`{section}` needs the `{needed}` section: {why}"),
                format!("add a top-level `{needed}:` section, or remove `{section}`"),
            );
        }
    }

    /// A section that compiles to no stage: the spec is valid, but the section does nothing.
    fn unused_section(&mut self, section: &str, hint: &str) {
        let span = self.spans.key(section);
        self.push(
            section,
            Diagnostic::warning("unused-section", span, format!("`{section}` compiles to no stage and does nothing"))
                .with_hint(hint),
        );
    }

    fn name(&mut self, spec: &Spec) {
        let ok = !spec.name.is_empty()
            && spec.name.len() <= 64
            && spec.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !spec.name.starts_with('.');
        if !ok {
            self.at_value(
                "name",
                "bad-name",
                format!("the pipeline name `{}` cannot be used as a directory name", spec.name),
                "use up to 64 letters, digits, `-`, `_` or `.`, e.g. `support-intent`",
            );
        }
    }

    fn teacher(&mut self, teacher: &TeacherSpec) {
        if teacher.targets.is_empty() {
            self.at_value(
                "teacher.targets",
                "empty-list",
                "`teacher.targets` is empty: there is no model to label with".into(),
                "list at least one target, e.g. `- { provider: openai, model: gpt-4o-mini, api_key: ${OPENAI_API_KEY} }`",
            );
        }
        if teacher.params.seed.is_some() {
            for (i, target) in teacher.targets.iter().enumerate() {
                if !target.provider.accepts_seed() {
                    let path = format!("teacher.targets[{i}].provider");
                    let span = self.spans.value(&path);
                    self.push(
                        &path,
                        Diagnostic::warning(
                            "unsupported-param",
                            span,
                            format!(
                                "`teacher.params.seed` does not reach this target: the {} API has no seed",
                                target.provider.as_str()
                            ),
                        )
                        .with_hint("its answers are unseeded; OpenAI-style and Gemini targets receive the seed"),
                    );
                }
            }
        }
        for (i, target) in teacher.targets.iter().enumerate() {
            let path = format!("teacher.targets[{i}]");
            if target.model.trim().is_empty() {
                self.at_value(
                    &format!("{path}.model"),
                    "empty-value",
                    "the target's `model` is empty".into(),
                    "name the provider's model, e.g. `gpt-4o-mini`",
                );
            }
            let key_path = format!("{path}.api_key");
            if let Some(raw) = self.spans.raw(&key_path) {
                if !env::references_env(raw) {
                    self.at_value(
                        &key_path,
                        "secret-in-spec",
                        "an API key is written into the spec file".into(),
                        format!(
                            "reference it from the environment instead, e.g. `api_key: ${{{}}}`, and revoke the key you wrote",
                            target.provider.api_key_variable()
                        ),
                    );
                }
            }
            match (target.provider, &target.base_url) {
                (provider, None) if provider.needs_base_url() => self.at_key(
                    &path,
                    "missing-key",
                    "an `openai_compatible` target needs a `base_url`".into(),
                    "add `base_url: http://127.0.0.1:8000/v1` (the server's OpenAI-compatible root)",
                ),
                (_, Some(url)) if !(url.starts_with("http://") || url.starts_with("https://")) => self.at_value(
                    &format!("{path}.base_url"),
                    "bad-url",
                    format!("`{url}` is not an http(s) URL"),
                    "write the full URL, e.g. `http://127.0.0.1:8000/v1`",
                ),
                _ => {}
            }
            let provider_known = !self.is_poisoned(&format!("{path}.provider"));
            if provider_known && target.api_key.is_none() && target.provider.needs_api_key() {
                self.at_key(
                    &path,
                    "missing-key",
                    format!("the {} target has no `api_key`", target.provider.as_str()),
                    format!(
                        "add `api_key: ${{{}}}` (or the variable that holds your key)",
                        target.provider.api_key_variable()
                    ),
                );
            }
            if let Some(p) = &target.pricing {
                self.pricing(&format!("{path}.pricing"), p);
            }
            if let Some(launch) = &target.launch {
                if target.base_url.is_none() && target.provider != Provider::OpenaiCompatible {
                    self.at_key(
                        &format!("{path}.launch"),
                        "missing-key",
                        "a launched target needs a `base_url` to know where the server listens".into(),
                        "add `base_url: http://127.0.0.1:8377/v1` with the port the command listens on",
                    );
                }
                if launch.command.trim().is_empty() {
                    self.at_value(
                        &format!("{path}.launch.command"),
                        "empty-value",
                        "`launch.command` is empty".into(),
                        "give the command that starts the server, e.g. `\"$TANGLE_EXE\" serve model.gguf --port $TANGLE_PORT`",
                    );
                }
                self.range(&format!("{path}.launch.ready_timeout_s"), launch.ready_timeout_s, 0.0, 86_400.0, false);
            }
        }
        if let Some(t) = teacher.params.temperature {
            self.range("teacher.params.temperature", t, 0.0, 2.0, true);
        }
        if let Some(p) = teacher.params.top_p {
            self.range("teacher.params.top_p", p, 0.0, 1.0, false);
        }
        if let Some(m) = teacher.params.max_tokens {
            self.at_least_one("teacher.params.max_tokens", m.into());
        }
        if let Some(k) = teacher.logprobs {
            if !(1..=20).contains(&k) {
                self.at_value(
                    "teacher.logprobs",
                    "out-of-range",
                    format!("`teacher.logprobs` is {k}; OpenAI-compatible APIs return 1 to 20 top logprobs"),
                    "use a value from 1 to 20, or remove the key",
                );
            }
            if teacher.targets.iter().any(|t| t.provider == Provider::Anthropic) {
                self.push(
                    "teacher.logprobs",
                    Diagnostic::warning(
                        "logprobs-unsupported",
                        self.spans.key("teacher.logprobs"),
                        "Anthropic does not return logprobs: examples labeled by an Anthropic target train with plain SFT",
                    ),
                );
            }
        }
        self.at_least_one("teacher.concurrency", teacher.concurrency.into());
        if let Some(n) = teacher.eval_concurrency {
            self.at_least_one("teacher.eval_concurrency", n.into());
        }
        self.range("teacher.timeout_s", teacher.timeout_s, 0.0, 3600.0, false);
        if let Some(p) = &teacher.pricing {
            self.pricing("teacher.pricing", p);
        }
        if let Some(budget) = &teacher.budget {
            if let Some(cost) = budget.max_cost_usd {
                self.range("teacher.budget.max_cost_usd", cost, 0.0, f64::MAX, false);
                let priced = teacher.pricing.is_some()
                    || (!teacher.targets.is_empty() && teacher.targets.iter().all(|t| t.pricing.is_some()));
                if !priced {
                    self.at_key(
                        "teacher.budget.max_cost_usd",
                        "missing-pricing",
                        "a cost budget needs token prices to count against it".into(),
                        "add `pricing: { input_per_mtok: …, output_per_mtok: … }` under `teacher` (USD per million tokens)",
                    );
                }
            }
        }
    }

    fn pricing(&mut self, path: &str, p: &Pricing) {
        self.range(&format!("{path}.input_per_mtok"), p.input_per_mtok, 0.0, 1e6, true);
        self.range(&format!("{path}.output_per_mtok"), p.output_per_mtok, 0.0, 1e6, true);
    }

    fn student(&mut self, student: &StudentSpec) {
        if student.model.trim().is_empty() {
            self.at_value(
                "student.model",
                "empty-value",
                "`student.model` is empty".into(),
                "give a hub id such as `Qwen/Qwen2.5-0.5B-Instruct` or a local model directory",
            );
        }
        let device = student.device.as_str();
        let ok = matches!(device, "cpu" | "cuda" | "auto")
            || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok());
        if !ok {
            let hint = match did_you_mean(device, ["cpu", "cuda", "auto"]) {
                Some(best) => format!("did you mean `{best}`? (choices: cpu, cuda, cuda:N, auto)"),
                None => "choose one of: cpu, cuda, cuda:N (a GPU index), auto".into(),
            };
            self.at_value("student.device", "unknown-value", format!("`student.device` cannot be `{device}`"), hint);
        }
        if !(16..=131_072).contains(&student.max_seq_len) {
            self.at_value(
                "student.max_seq_len",
                "out-of-range",
                format!("`student.max_seq_len` is {}, but it must be from 16 to 131072", student.max_seq_len),
                "512 fits most classification and extraction tasks",
            );
        }
    }

    fn dataset(&mut self, dataset: &DatasetSpec, dir: &Path) {
        self.range("dataset.eval_fraction", dataset.eval_fraction, 0.0, 1.0, false);
        if dataset.path.trim().is_empty() {
            self.at_value(
                "dataset.path",
                "empty-value",
                "`dataset.path` is empty".into(),
                "point it at a JSONL or CSV file, relative to the spec",
            );
            return;
        }
        let resolved = resolve_against(dir, &dataset.path);
        if !resolved.is_file() {
            self.at_value(
                "dataset.path",
                "missing-file",
                format!("the dataset `{}` does not exist (looked for {})", dataset.path, resolved.display()),
                "paths in a spec are relative to the spec file's directory",
            );
        }
        let is_csv = dataset.format == Some(DatasetFormat::Csv)
            || (dataset.format.is_none() && dataset.path.to_ascii_lowercase().ends_with(".csv"));
        if !is_csv && dataset.format.is_none() {
            let lower = dataset.path.to_ascii_lowercase();
            if !(lower.ends_with(".jsonl") || lower.ends_with(".json") || lower.ends_with(".ndjson")) {
                self.at_value(
                    "dataset.path",
                    "unknown-format",
                    format!("cannot tell the format of `{}` from its extension", dataset.path),
                    "name it .jsonl or .csv, or set `format: jsonl` / `format: csv`",
                );
            }
        }
    }

    fn train(&mut self, spec: &Spec, train: &TrainSpec) {
        self.requires("train", spec.student.is_some(), "student", "it names the model to fine-tune");
        self.at_least_one("train.epochs", train.epochs.into());
        self.at_least_one("train.batch_size", train.batch_size.into());
        self.at_least_one("train.grad_accum", train.grad_accum.into());
        self.range("train.lr", train.lr, 0.0, 1.0, false);
        self.range("train.weight_decay", train.weight_decay, 0.0, 1.0, true);
        self.range("train.warmup_ratio", train.warmup_ratio, 0.0, 1.0, true);
        self.range("train.max_grad_norm", train.max_grad_norm, 0.0, f64::MAX, false);
        if let Some(every) = train.checkpoint_every {
            self.at_least_one("train.checkpoint_every", every.into());
        }
        match (train.method, &train.lora) {
            (TrainMethod::Full, Some(_)) => self.at_key(
                "train.lora",
                "conflict",
                "`train.lora` is set but `train.method` is `full`".into(),
                "remove `lora`, or set `method: lora`",
            ),
            (TrainMethod::Lora, Some(lora)) => {
                self.at_least_one("train.lora.rank", lora.rank.into());
                if let Some(layers) = lora.last_layers {
                    self.at_least_one("train.lora.last_layers", layers.into());
                }
                self.range("train.lora.alpha", lora.alpha, 0.0, 1e6, false);
                self.range("train.lora.dropout", lora.dropout, 0.0, 1.0, true);
                if lora.targets.is_empty() {
                    self.at_value(
                        "train.lora.targets",
                        "empty-list",
                        "`train.lora.targets` is empty: LoRA would train nothing".into(),
                        format!("list modules from: {}", LORA_TARGETS.join(", ")),
                    );
                }
                for (i, t) in lora.targets.iter().enumerate() {
                    if !LORA_TARGETS.contains(&t.as_str()) {
                        let hint = match did_you_mean(t, LORA_TARGETS.iter().copied()) {
                            Some(best) => format!("did you mean `{best}`?"),
                            None => format!("choose from: {}", LORA_TARGETS.join(", ")),
                        };
                        self.at_value(
                            &format!("train.lora.targets[{i}]"),
                            "unknown-value",
                            format!("`{t}` is not a module LoRA can adapt"),
                            hint,
                        );
                    }
                }
            }
            _ => {}
        }
        if train.loss.kind == LossKind::Kd {
            let has_logprobs = spec.teacher.as_ref().is_some_and(|t| t.logprobs.is_some());
            if !has_logprobs {
                self.at_value(
                    "train.loss.kind",
                    "missing-logprobs",
                    "`kd` distills from the teacher's logprobs, but the teacher is not asked for any".into(),
                    "set `teacher.logprobs: 5` (OpenAI-compatible targets), or use `kind: sft`",
                );
            }
            self.range("train.loss.alpha", train.loss.alpha, 0.0, 1.0, true);
            self.range("train.loss.temperature", train.loss.temperature, 0.0, 100.0, false);
        }
    }

    fn eval(&mut self, spec: &Spec, eval: &EvalSpec, dir: &Path) {
        self.requires("eval", spec.student.is_some(), "student", "it names the model to evaluate");
        if eval.metrics.is_empty() {
            self.at_value(
                "eval.metrics",
                "empty-list",
                "`eval.metrics` is empty".into(),
                "list metrics, e.g. `[exact_match, rouge_l, teacher_agreement, latency]`",
            );
        }
        let mut seen = BTreeSet::new();
        for (i, name) in eval.metrics.iter().enumerate() {
            let path = format!("eval.metrics[{i}]");
            if eval::metric(name).is_none() {
                let hint = match did_you_mean(name, eval::METRICS.iter().map(|m| m.name)) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!(
                        "known metrics: {}",
                        eval::METRICS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
                    ),
                };
                self.at_value(&path, "unknown-metric", format!("unknown metric `{name}`"), hint);
            } else if !seen.insert(name.as_str()) {
                self.at_value(&path, "duplicate", format!("metric `{name}` is listed twice"), "list each metric once");
            }
            if name == "teacher_agreement" && spec.teacher.is_none() {
                self.at_value(
                    &path,
                    "missing-section",
                    "`teacher_agreement` compares with the teacher, but the spec has no `teacher`".into(),
                    "add a `teacher` section or drop this metric",
                );
            }
        }
        if eval.metrics.iter().any(|m| m == "regex") {
            match &eval.regex {
                None => self.at_key(
                    "eval",
                    "missing-key",
                    "the `regex` metric needs `eval.regex`".into(),
                    "add `regex: '^(billing|shipping)$'` under `eval`",
                ),
                Some(pattern) if pattern.is_empty() => self.at_value(
                    "eval.regex",
                    "empty-value",
                    "`eval.regex` is empty".into(),
                    "write the pattern every output must match",
                ),
                Some(_) => {}
            }
        }
        if eval.metrics.iter().any(|m| m == "json_schema") {
            match &eval.json_schema {
                None => self.at_key(
                    "eval",
                    "missing-key",
                    "the `json_schema` metric needs `eval.json_schema`".into(),
                    "add `json_schema: schema.json` (a JSON Schema file, relative to the spec)",
                ),
                Some(p) if !resolve_against(dir, p).is_file() => self.at_value(
                    "eval.json_schema",
                    "missing-file",
                    format!("the schema `{p}` does not exist"),
                    "paths in a spec are relative to the spec file's directory",
                ),
                Some(_) => {}
            }
        }
        self.at_least_one("eval.max_new_tokens", eval.max_new_tokens.into());
        if eval.bootstrap_samples < 100 {
            self.at_value(
                "eval.bootstrap_samples",
                "out-of-range",
                format!("{} bootstrap samples give unstable confidence intervals", eval.bootstrap_samples),
                "use at least 100 (1000 is the default)",
            );
        }
        self.range("eval.compute_usd_per_hour", eval.compute_usd_per_hour, 0.0, 1e4, true);
    }

    fn gate(&mut self, spec: &Spec, gate: &GateSpec) {
        let Some(eval) = &spec.eval else {
            self.requires("gate", false, "eval", "the gate decides on measured metrics");
            return;
        };
        if gate.require.is_empty() {
            self.at_value(
                "gate.require",
                "empty-list",
                "`gate.require` is empty: every candidate would be promoted".into(),
                "add at least one clause, e.g. `exact_match >= 0.9`",
            );
        }
        let measured: BTreeSet<&str> = eval
            .metrics
            .iter()
            .map(String::as_str)
            .chain(eval::ALWAYS_MEASURED.iter().copied())
            .filter_map(eval::metric)
            .flat_map(|m| m.yields.iter().copied())
            .collect();
        let alias = spec.deploy.as_ref().map(|d| d.alias.as_str());
        for (i, text) in gate.require.iter().enumerate() {
            let path = format!("gate.require[{i}]");
            let clause = match Clause::parse(text) {
                Ok(clause) => clause,
                Err(e) => {
                    let span = self.spans.within(&path, e.offset, e.len);
                    self.push(
                        &path,
                        Diagnostic::error("bad-clause", span, format!("cannot parse gate clause: {}", e.message))
                            .with_hint(e.hint),
                    );
                    continue;
                }
            };
            for r in clause.references() {
                let span = self.spans.within(&path, r.offset, r.len);
                match &r.subject {
                    Subject::Teacher if spec.teacher.is_none() => self.push(
                        &path,
                        Diagnostic::error(
                            "missing-section",
                            span,
                            format!("`{r}` refers to the teacher, but the spec has no `teacher`"),
                        )
                        .with_hint("add a `teacher` section, or compare with a fixed number"),
                    ),
                    Subject::Deployed(name) if Some(name.as_str()) != alias => {
                        let subjects = ["teacher", "student"].into_iter().chain(alias);
                        let hint = match (did_you_mean(name, subjects), alias) {
                            (Some(best), _) => format!("did you mean `{best}.{}`?", r.metric),
                            (None, Some(a)) => {
                                format!("the deployed version is referred to by its alias: `{a}.{}`", r.metric)
                            }
                            (None, None) => {
                                "add a `deploy` section with an `alias`, or refer to `teacher.` or the student".into()
                            }
                        };
                        self.push(
                            &path,
                            Diagnostic::error(
                                "unknown-subject",
                                span,
                                format!("`{name}` is neither `teacher` nor the deploy alias"),
                            )
                            .with_hint(hint),
                        );
                    }
                    _ => {}
                }
                if !measured.contains(r.metric.as_str()) {
                    let (message, hint) = match eval::metric_yielding(&r.metric) {
                        Some(m) => (
                            format!("the gate reads `{}`, but `eval.metrics` does not measure `{}`", r.metric, m.name),
                            format!("add `{}` to `eval.metrics`", m.name),
                        ),
                        None => {
                            let all = eval::METRICS.iter().flat_map(|m| m.yields.iter().copied());
                            let hint = match did_you_mean(&r.metric, all) {
                                Some(best) => format!("did you mean `{best}`?"),
                                None => "gate clauses read metrics listed under `eval.metrics` (latency_p95_ms, cost_per_1k_usd and tokens_per_s are always measured)".into(),
                            };
                            (format!("unknown metric `{}` in gate clause", r.metric), hint)
                        }
                    };
                    self.push(&path, Diagnostic::error("unknown-metric", span, message).with_hint(hint));
                }
            }
        }
    }

    fn deploy(&mut self, spec: &Spec, deploy: &DeploySpec) {
        self.requires("deploy", spec.gate.is_some(), "gate", "tangle deploys only what a gate promoted");
        self.requires("deploy", spec.train.is_some(), "train", "it deploys the fine-tuned student");
        let ok = !deploy.alias.is_empty()
            && deploy.alias.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !matches!(deploy.alias.as_str(), "teacher" | "student");
        if !ok {
            self.at_value(
                "deploy.alias",
                "bad-name",
                format!("`{}` cannot be an alias", deploy.alias),
                "use letters, digits, `-` or `_` (not `teacher` or `student`), e.g. `production`",
            );
        }
    }

    fn steps(&mut self, spec: &Spec, dir: &Path) {
        for (i, step) in spec.steps.iter().enumerate() {
            let path = format!("steps[{i}]");
            let ok = !step.name.is_empty()
                && step.name.len() <= 64
                && step.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !ok {
                self.at_value(
                    &format!("{path}.name"),
                    "bad-name",
                    format!("`{}` cannot name a step", step.name),
                    "use lowercase letters, digits, `-` or `_`, e.g. `make-data`",
                );
            }
            if step.run.trim().is_empty() {
                self.at_value(
                    &format!("{path}.run"),
                    "empty-value",
                    format!("step `{}` has an empty `run` command", step.name),
                    "write the shell command the step runs",
                );
            }
            for (j, input) in step.inputs.iter().enumerate() {
                if !resolve_against(dir, input).exists() {
                    self.at_value(
                        &format!("{path}.inputs[{j}]"),
                        "missing-file",
                        format!("step input `{input}` does not exist"),
                        "paths in a spec are relative to the spec file's directory",
                    );
                }
            }
        }
    }
}
