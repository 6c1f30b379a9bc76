//! The command line: every flag is defined and documented here, and each command only wires
//! library modules together. Human output goes to stderr, `--json` documents to stdout.

use crate::diagnostic::Report;
use crate::exit::Exit;
use crate::graph::{self, Format, Plan};
use crate::registry::Registry;
use crate::report::diff::{self, DiffOptions};
use crate::report::{EvalReport, REPORT_SCHEMA};
use crate::runner::progress::ProgressMode;
use crate::runner::{self, PlanSource, RunOptions};
use crate::spec::{self, LoadedSpec};
use crate::stages::{CancelFlag, Executors};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "tangle",
    version,
    about = "Distill a frontier LLM into a small student model, gate it on evals, deploy it.",
    after_help = "Exit codes: 0 success/promoted, 1 runtime error, 2 invalid spec or usage, \
                  3 gate rejected (or `diff --fail-on-regression` found one), 4 stopped by a budget or breaker, 130 interrupted."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compile the spec into a DAG and execute it, re-using every unchanged stage.
    Run(RunArgs),
    /// Check a spec; every error points at file:line:column with a hint.
    Validate(ValidateArgs),
    /// Print the compiled DAG of stages.
    Graph(GraphArgs),
    /// Compare two eval reports: metric deltas with confidence intervals, flipped examples.
    Diff(DiffArgs),
    /// Inspect and move deployed versions: list, show, promote, rollback.
    Registry(RegistryArgs),
    /// Serve a model behind an OpenAI-compatible API: a registry alias (`production`),
    /// `NAME@VERSION`, an artifact or model directory, or a GGUF file.
    Serve(ServeArgs),
    /// Teacher token spend from the ledger: totals by run, stage and target.
    Usage(UsageArgs),
    /// OpenAI-compatible gateway: model aliases routed to ordered targets with failover,
    /// per-client keys and budgets, spend circuit breakers, a live dashboard.
    Proxy(ProxyArgs),
    /// List, confirm or reset the circuit breakers of a running proxy.
    Breaker(BreakerArgs),
    /// A scriptable OpenAI-compatible teacher for tests and offline demos.
    #[command(hide = true)]
    MockTeacher(MockTeacherArgs),
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The proxy config (YAML): routes, targets, client keys, budgets, breakers, alerts.
    #[arg(long, short = 'c', default_value = "proxy.yaml")]
    pub config: PathBuf,
    /// Only check the config (exit 0 when valid, 2 with every error when not).
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct BreakerArgs {
    /// The running proxy's config (the admin API is reached at its `listen` address).
    #[arg(long, short = 'c', global = true, default_value = "proxy.yaml")]
    pub config: PathBuf,
    /// Print the proxy's answer as one JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: BreakerCommand,
}

#[derive(Debug, Subcommand)]
pub enum BreakerCommand {
    /// Every breaker (`key:NAME`, `route:ALIAS`, `target:NAME`) with its state and spend.
    List,
    /// Resume a tripped breaker; the rule that tripped starts a fresh allowance.
    Confirm { id: String },
    /// Zero every counter of a breaker (tripped or not), e.g. for a new billing period.
    Reset { id: String },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// What to serve (see `tangle serve --help`).
    pub model: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, short = 'p', default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together in one batch (continuous batching: requests join and
    /// leave it at every step).
    #[arg(long, visible_alias = "workers", default_value_t = 16)]
    pub parallel: usize,
    /// Requests that may wait for a place in the batch before new ones get 503.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// KV cache size in tokens, shared by running sequences and the prefix cache.
    #[arg(long, default_value_t = 8192)]
    pub kv_tokens: usize,
    /// Prompts whose KV is kept for reuse by later requests (0 turns prefix caching off).
    #[arg(long, default_value_t = 64)]
    pub prefix_cache: usize,
    /// CPU threads for the forward pass (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `max_tokens` for requests that give none.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Which weights of a fine-tuned student: its quantized copy when it has one (`auto`),
    /// or the full-precision safetensors.
    #[arg(long, value_enum, default_value_t = crate::serve::models::WeightsChoice::Auto)]
    pub weights: crate::serve::models::WeightsChoice,
    #[arg(long, env = "TANGLE_REGISTRY", default_value = ".tangle/registry")]
    pub registry: PathBuf,
    /// Append one JSON line per answered request (a hash of its messages and its token
    /// counts, never the text) to this file.
    #[arg(long, env = "TANGLE_SERVE_REQUEST_LOG")]
    pub request_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[arg(long, env = "TANGLE_STATE_DIR", default_value = ".tangle")]
    pub state_dir: PathBuf,
    /// Only this run.
    #[arg(long)]
    pub run: Option<String>,
    /// Group by these (repeatable); all three by default.
    #[arg(long, value_enum)]
    pub by: Vec<UsageGroup>,
    /// Print one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageGroup {
    Run,
    Stage,
    Target,
    Key,
}

#[derive(Debug, Args)]
pub struct MockTeacherArgs {
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// A dataset (JSONL with `prompt`/`messages` and `reference`): a prompt found there is
    /// answered with its reference; any other gets a deterministic made-up label.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// Added to every answer.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Appends one line per request received (its prompt), to count calls across restarts.
    #[arg(long)]
    pub calls_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// The registry directory.
    #[arg(long, global = true, env = "TANGLE_REGISTRY", default_value = ".tangle/registry")]
    pub registry: PathBuf,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: RegistryAction,
}

#[derive(Debug, Subcommand)]
pub enum RegistryAction {
    /// Every pipeline with its versions and aliases.
    List,
    /// One version: `NAME` (its `production` alias), `NAME@ALIAS` or `NAME@VERSION`.
    Show { reference: String },
    /// Point an alias at a version: `NAME@VERSION`.
    Promote {
        reference: String,
        #[arg(long, default_value = "production")]
        alias: String,
    },
    /// Move an alias back to the version it pointed at before.
    Rollback {
        name: String,
        #[arg(long, default_value = "production")]
        alias: String,
    },
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The baseline: a report.json, or a run directory holding one.
    pub a: PathBuf,
    /// The candidate, compared against A.
    pub b: PathBuf,
    /// Print the comparison as one JSON document on stdout.
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    #[arg(long, short = 'f', value_enum, default_value_t = DiffFormat::Text)]
    pub format: DiffFormat,
    /// Whose outputs to compare.
    #[arg(long, default_value = "student")]
    pub subject: String,
    /// Significance level.
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
    /// Exit with code 3 when any metric is significantly worse in B.
    #[arg(long)]
    pub fail_on_regression: bool,
    /// Flipped examples listed per metric and direction.
    #[arg(long, default_value_t = 10)]
    pub max_flips: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffFormat {
    Text,
    Markdown,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline spec (YAML).
    pub spec: PathBuf,
    /// Print the run record as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// Run at most this many stages at once.
    #[arg(long, short = 'j', default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
    #[command(flatten)]
    pub dirs: StateDirs,
    /// Plain progress lines instead of live bars (the default when not on a terminal or CI=true).
    #[arg(long)]
    pub no_progress: bool,
    /// Only warnings and the final result.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct StateDirs {
    /// Where the stage cache and shared stores live.
    #[arg(long, env = "TANGLE_STATE_DIR", default_value = ".tangle")]
    pub state_dir: PathBuf,
    /// Where run records go (`<runs-dir>/<pipeline>/<run-id>/`).
    #[arg(long, env = "TANGLE_RUNS_DIR", default_value = "runs")]
    pub runs_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    pub spec: PathBuf,
    /// Print the findings as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    pub spec: PathBuf,
    #[arg(long, short = 'f', value_enum, default_value_t = GraphFormat::Text)]
    pub format: GraphFormat,
}

/// `tangle graph --format`: the command line's names for [`graph::Format`] (the core
/// knows nothing of clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    /// An indented tree; a stage with several inputs hangs under the last one to finish.
    Text,
    /// Graphviz DOT (`tangle graph p.yaml --format dot | dot -Tsvg > p.svg`).
    Dot,
    /// A Mermaid flowchart, for Markdown that renders it (GitHub does).
    Mermaid,
}

impl From<GraphFormat> for Format {
    fn from(format: GraphFormat) -> Format {
        match format {
            GraphFormat::Text => Format::Text,
            GraphFormat::Dot => Format::Dot,
            GraphFormat::Mermaid => Format::Mermaid,
        }
    }
}

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> i32 {
    crate::logging::install();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { Exit::Usage.code() } else { Exit::Success.code() };
        }
    };
    match cli.command {
        Command::Validate(args) => validate(&args).code(),
        Command::Graph(args) => graph_command(&args).code(),
        Command::Run(args) => run_command(&args).code(),
        Command::Diff(args) => diff_command(&args).code(),
        Command::Registry(args) => registry_command(&args).code(),
        Command::Serve(args) => serve_command(&args).code(),
        Command::Usage(args) => usage_command(&args).code(),
        Command::Proxy(args) => crate::proxy::command::run_proxy(&args.config, args.check).code(),
        Command::Breaker(args) => {
            use crate::proxy::command::{run_breaker, BreakerAction};
            let action = match args.action {
                BreakerCommand::List => BreakerAction::List,
                BreakerCommand::Confirm { id } => BreakerAction::Confirm(id),
                BreakerCommand::Reset { id } => BreakerAction::Reset(id),
            };
            run_breaker(&args.config, &action, args.json).code()
        }
        Command::MockTeacher(args) => mock_teacher_command(&args).code(),
    }
}

/// Loads and compiles a spec; on failure prints the report and returns the exit code.
fn load_and_compile(path: &Path) -> Result<(LoadedSpec, Plan), Report> {
    let loaded = spec::load_file(path)?;
    match graph::compile(&loaded) {
        Ok(plan) => Ok((loaded, plan)),
        Err(diagnostics) => Err(loaded.report(diagnostics)),
    }
}

/// Writes a document to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn eprint_report(report: &Report) {
    let _ = std::io::stderr().write_all(report.render_human().as_bytes());
}

fn validate(args: &ValidateArgs) -> Exit {
    match load_and_compile(&args.spec) {
        Ok((loaded, plan)) => {
            let report = loaded.report(Vec::new());
            if args.json {
                let mut doc = report.to_json();
                doc["stages"] = plan.graph.node_count().into();
                emit(&format!("{doc:#}\n"));
            } else {
                eprint_report(&report);
            }
            eprintln!("{}: valid ({} stages)", args.spec.display(), plan.graph.node_count());
            Exit::Success
        }
        Err(report) => {
            if args.json {
                emit(&format!("{:#}\n", report.to_json()));
            }
            eprint_report(&report);
            Exit::Usage
        }
    }
}

fn graph_command(args: &GraphArgs) -> Exit {
    match load_and_compile(&args.spec) {
        Ok((_, plan)) => {
            emit(&graph::render(&plan, args.format.into()));
            Exit::Success
        }
        Err(report) => {
            eprint_report(&report);
            Exit::Usage
        }
    }
}

fn run_command(args: &RunArgs) -> Exit {
    let (loaded, plan) = match load_and_compile(&args.spec) {
        Ok(ok) => ok,
        Err(report) => {
            if args.json {
                emit(&format!(
                    "{:#}\n",
                    serde_json::json!({ "status": "invalid", "exit_code": Exit::Usage.code(), "validation": report.to_json() })
                ));
            }
            eprint_report(&report);
            return Exit::Usage;
        }
    };
    if !loaded.warnings.is_empty() {
        eprint_report(&loaded.report(Vec::new()));
    }
    let progress = if args.quiet {
        ProgressMode::Quiet
    } else if args.no_progress {
        ProgressMode::Lines
    } else {
        ProgressMode::detect()
    };
    let options = RunOptions {
        state_dir: args.dirs.state_dir.clone(),
        runs_dir: args.dirs.runs_dir.clone(),
        jobs: usize::from(args.jobs),
        progress,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return Exit::Runtime;
        }
    };
    let cancel = CancelFlag::default();
    let result = runtime.block_on(async {
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupt: finishing what is in flight and saving state (Ctrl-C again to abort now)");
                on_signal.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("aborted; completed stages and journaled work are kept");
                    std::process::exit(Exit::Interrupted.code());
                }
            }
        });
        let source = PlanSource::from_spec(Arc::new(loaded));
        runner::run(&plan, &Executors::builtin(), source, &options, cancel).await
    });
    // Teacher servers the run started never outlive it.
    crate::launch::stop_all();
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            if args.json {
                emit(&format!(
                    "{:#}\n",
                    serde_json::json!({ "status": "error", "exit_code": Exit::Runtime.code(), "error": e.to_string() })
                ));
            }
            eprintln!("error: {e}");
            return Exit::Runtime;
        }
    };
    let exit = Exit::for_run(summary.record.status);
    let record = &summary.record;
    let cached = record.stages.iter().filter(|s| s.cache_hit).count();
    let done = record.stages.iter().filter(|s| s.state.is_complete()).count();
    eprintln!(
        "{}: {} — {done}/{} stages complete ({cached} from cache); record: {}",
        record.pipeline,
        serde_json::to_value(record.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        record.stages.len(),
        summary.run_dir.join("run.json").display()
    );
    if exit == Exit::Interrupted {
        eprintln!("run the same command again to resume");
    }
    if !args.quiet {
        print_next_steps(record, &summary.run_dir, &args.spec);
    }
    if args.json {
        let mut doc = serde_json::to_value(record).unwrap_or_default();
        doc["run_dir"] = summary.run_dir.display().to_string().into();
        emit(&format!("{doc:#}\n"));
    }
    exit
}

fn read_report(path: &Path) -> Result<EvalReport, String> {
    let file = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
    let bytes = std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let report: EvalReport =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a tangle eval report: {e}", file.display()))?;
    if report.schema != REPORT_SCHEMA {
        return Err(format!(
            "{}: report schema `{}` is not `{REPORT_SCHEMA}`; compare reports made by the same tangle version",
            file.display(),
            report.schema
        ));
    }
    Ok(report)
}

fn diff_command(args: &DiffArgs) -> Exit {
    let (a, b) = match (read_report(&args.a), read_report(&args.b)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}\n  = hint: pass report.json files or the run directories that hold them");
            return Exit::Usage;
        }
    };
    let options = DiffOptions {
        subject: args.subject.clone(),
        alpha: args.alpha,
        max_flips: args.max_flips,
        ..DiffOptions::default()
    };
    let result = diff::diff(&a, &b, &args.a.display().to_string(), &args.b.display().to_string(), &options);
    if result.shared == 0 {
        eprintln!("warning: the reports share no example ids; only their aggregates can be compared");
    }
    if args.json {
        let mut doc = serde_json::to_value(&result).unwrap_or_default();
        doc["regression"] = result.has_regression().into();
        emit(&format!("{doc:#}\n"));
    } else {
        emit(&match args.format {
            DiffFormat::Text => result.to_text(),
            DiffFormat::Markdown => result.to_markdown(),
        });
    }
    if args.fail_on_regression && result.has_regression() {
        let worse: Vec<&str> = result.metrics.iter().filter(|m| m.regression).map(|m| m.metric.as_str()).collect();
        eprintln!("regression: {} significantly worse in B", worse.join(", "));
        return Exit::Rejected;
    }
    Exit::Success
}

fn registry_command(args: &RegistryArgs) -> Exit {
    let registry = Registry::open(&args.registry);
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!(
            "error: {e}\n  = hint: `tangle registry list` shows what the registry at {} holds",
            args.registry.display()
        );
        Exit::Usage
    };
    match &args.action {
        RegistryAction::List => {
            let listing = match registry.list() {
                Ok(l) => l,
                Err(e) => return fail(&e),
            };
            if args.json {
                emit(&format!("{:#}\n", serde_json::to_value(&listing).unwrap_or_default()));
            } else if listing.is_empty() {
                eprintln!("the registry at {} is empty", args.registry.display());
            } else {
                let mut out = String::new();
                for p in &listing {
                    out.push_str(&format!("{}\n", p.pipeline));
                    for v in &p.versions {
                        let aliases: Vec<&str> =
                            p.aliases.iter().filter(|(_, av)| av == v).map(|(a, _)| a.as_str()).collect();
                        let tag =
                            if aliases.is_empty() { String::new() } else { format!("  ← {}", aliases.join(", ")) };
                        out.push_str(&format!("  {v}{tag}\n"));
                    }
                }
                emit(&out);
            }
            Exit::Success
        }
        RegistryAction::Show { reference } => {
            let deployed = match registry.lookup(reference, "production") {
                Ok(d) => d,
                Err(e) => return fail(&e),
            };
            let manifest = match crate::artifact::verify(&deployed.dir.join(crate::stages::package::ARTIFACT_DIR)) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Exit::Runtime;
                }
            };
            let report = registry.report(&deployed).ok();
            if args.json {
                let doc = serde_json::json!({ "version": deployed.version, "dir": deployed.dir, "manifest": manifest, "metrics": report.as_ref().and_then(|r| r.subjects.get("student")).map(|s| &s.metrics) });
                emit(&format!("{doc:#}\n"));
            } else {
                let mut out =
                    format!("{} {}\n  dir: {}\n", manifest.lineage.pipeline, deployed.version, deployed.dir.display());
                out.push_str(&format!(
                    "  run: {}  created: {}\n  base model: {}\n  teacher: {}\n  files: {} (verified)\n",
                    manifest.lineage.run_id,
                    manifest.lineage.created_at,
                    manifest.lineage.base_model,
                    manifest.lineage.teacher.join(", "),
                    manifest.files.len()
                ));
                if let Some(student) = report.as_ref().and_then(|r| r.subjects.get("student")) {
                    for (name, e) in &student.metrics {
                        out.push_str(&format!(
                            "  {name}: {} [{}, {}]\n",
                            crate::gate::round(e.value),
                            crate::gate::round(e.ci_low),
                            crate::gate::round(e.ci_high)
                        ));
                    }
                }
                emit(&out);
            }
            Exit::Success
        }
        RegistryAction::Promote { reference, alias } => {
            let Some((name, version)) = reference.split_once('@') else {
                return fail(&"give the version to promote as NAME@VERSION");
            };
            match registry.set_alias(name, alias, version) {
                Ok(previous) => {
                    eprintln!(
                        "{name}: `{alias}` → {version}{}",
                        previous.map(|p| format!(" (was {p})")).unwrap_or_default()
                    );
                    Exit::Success
                }
                Err(e) => fail(&e),
            }
        }
        RegistryAction::Rollback { name, alias } => match registry.rollback(name, alias) {
            Ok(version) => {
                eprintln!("{name}: `{alias}` rolled back to {version}");
                Exit::Success
            }
            Err(e) => fail(&e),
        },
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Exit> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        Exit::Runtime
    })
}

fn serve_command(args: &ServeArgs) -> Exit {
    crate::launch::exit_with_launcher();
    let location = match crate::serve::models::locate(&args.model, &args.registry) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Usage;
        }
    };
    let device = match crate::serve::models::device(&args.device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Usage;
        }
    };
    let defaults = crate::model::engine::EngineOptions::default();
    let engine_options = crate::model::engine::EngineOptions {
        max_running: args.parallel.max(1),
        queue: args.queue.max(1),
        kv_tokens: args.kv_tokens.max(64),
        prefix_entries: args.prefix_cache,
        threads: args.threads.unwrap_or(defaults.threads).max(1),
        device,
        ..defaults
    };
    eprintln!("loading {}", args.model);
    let engine = match crate::serve::models::load(&location, args.weights, &engine_options) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Runtime;
        }
    };
    let options = crate::serve::ServeOptions {
        engine: engine_options.clone(),
        default_max_tokens: args.max_tokens,
        request_log: args.request_log.clone(),
    };
    let id = engine.info().id.clone();
    let slot = crate::serve::ModelSlot::new(engine);
    if crate::serve::models::follows_registry(&args.model) {
        let followed = crate::serve::models::follow(
            args.model.clone(),
            args.registry.clone(),
            args.weights,
            engine_options,
            std::sync::Arc::clone(&slot),
            location,
            std::time::Duration::from_secs(1),
        );
        if let Err(e) = followed {
            eprintln!("warning: cannot follow `{}` in the registry: {e}", args.model);
        }
    }
    let app = match crate::serve::router(slot, &options) {
        Ok(app) => app,
        Err(e) => {
            let path = args.request_log.as_deref().unwrap_or(std::path::Path::new("")).display().to_string();
            eprintln!(
                "error: cannot open the request log {path}: {e}\nhint: check --request-log / TANGLE_SERVE_REQUEST_LOG"
            );
            return Exit::Usage;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(exit) => return exit,
    };
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
        let addr = listener.local_addr()?;
        eprintln!("serving `{id}` at http://{addr}/v1 (OpenAI-compatible; Ctrl-C stops)");
        crate::serve::serve(listener, app).await
    });
    match result {
        Ok(()) => Exit::Success,
        Err(e) => {
            eprintln!("error: cannot serve on {}:{}: {e}", args.host, args.port);
            Exit::Runtime
        }
    }
}

fn usage_command(args: &UsageArgs) -> Exit {
    use crate::ledger::{GroupBy, Ledger, UsageFilter};
    let path = args.state_dir.join("ledger.sqlite");
    if !path.exists() {
        eprintln!("no ledger at {}: no teacher call has been made from this directory yet", path.display());
        if args.json {
            emit("{}\n");
        }
        return Exit::Success;
    }
    let ledger = match Ledger::open(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot open {}: {e}", path.display());
            return Exit::Runtime;
        }
    };
    let groups: Vec<UsageGroup> =
        if args.by.is_empty() { vec![UsageGroup::Run, UsageGroup::Stage, UsageGroup::Target] } else { args.by.clone() };
    let filter = UsageFilter { run_id: args.run.clone(), stage: None };
    let mut doc = serde_json::Map::new();
    let mut text = String::new();
    for group in groups {
        let (by, name) = match group {
            UsageGroup::Run => (GroupBy::Run, "run"),
            UsageGroup::Stage => (GroupBy::Stage, "stage"),
            UsageGroup::Target => (GroupBy::Target, "target"),
            UsageGroup::Key => (GroupBy::ApiKey, "key"),
        };
        let rows = match ledger.totals(by, &filter) {
            Ok(rows) => rows,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", path.display());
                return Exit::Runtime;
            }
        };
        text.push_str(&crate::ledger::render_totals(name, &rows));
        text.push('\n');
        doc.insert(format!("by_{name}"), serde_json::to_value(&rows).unwrap_or_default());
    }
    if args.json {
        emit(&format!("{:#}\n", serde_json::Value::Object(doc)));
    } else {
        emit(&text);
    }
    Exit::Success
}

fn mock_teacher_command(args: &MockTeacherArgs) -> Exit {
    crate::launch::exit_with_launcher();
    let answers = match &args.answers {
        Some(path) => match crate::mock::answers_from_dataset(path) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                return Exit::Usage;
            }
        },
        None => Default::default(),
    };
    let calls_log = args.calls_log.clone();
    let config = crate::mock::MockConfig {
        base_latency: std::time::Duration::from_millis(args.latency_ms),
        answer: std::sync::Arc::new(move |prompt: &str| {
            if let Some(log) = &calls_log {
                crate::mock::append_line(log, prompt);
            }
            answers.get(prompt.trim()).cloned().unwrap_or_else(|| crate::mock::default_answer(prompt))
        }),
        ..Default::default()
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(exit) => return exit,
    };
    let result = rt.block_on(async {
        let server = crate::mock::MockServer::start_on(&format!("127.0.0.1:{}", args.port), config).await?;
        eprintln!("mock teacher at {}", server.openai_base_url());
        let _ = tokio::signal::ctrl_c().await;
        Ok::<_, std::io::Error>(())
    });
    match result {
        Ok(()) => Exit::Success,
        Err(e) => {
            eprintln!("error: {e}");
            Exit::Runtime
        }
    }
}

/// After a pipeline with a gate: the decision, where its evidence is, and what to try next.
fn print_next_steps(record: &crate::runner::record::RunRecord, run_dir: &Path, spec: &Path) {
    let stage = |name: &str| record.stages.iter().find(|s| s.name == name && s.state.is_complete());
    let Some(gate) = stage("gate") else { return };
    let decision = gate.summary.get("decision").and_then(|d| d.as_str()).unwrap_or("?");
    eprintln!("\ndecision: {decision} (see {})", run_dir.join("gate").join("decision.json").display());
    if let Ok(text) = std::fs::read_to_string(run_dir.join("gate").join("decision.json")) {
        if let Ok(d) = serde_json::from_str::<crate::gate::Decision>(&text) {
            for c in &d.clauses {
                let mark = if c.pass { "pass" } else { "FAIL" };
                eprintln!(
                    "  {mark}  {}  ({:.4} {} {:.4})",
                    c.clause,
                    c.lhs.unwrap_or(f64::NAN),
                    c.op,
                    c.rhs.unwrap_or(f64::NAN)
                );
            }
        }
    }
    eprintln!("report:   {}", run_dir.join("eval-student").join("report.md").display());
    if stage("package").is_some() {
        eprintln!("artifact: {}", run_dir.join("package").join("artifact").display());
    }
    let deployed = stage("deploy").and_then(|d| d.summary.get("version").and_then(|v| v.as_str()).map(str::to_string));
    eprintln!("\nnext:");
    eprintln!(
        "  tangle diff {} <other-run>/eval-student   # compare with another run's report",
        run_dir.join("eval-student").display()
    );
    if let Some(version) = deployed {
        eprintln!(
            "  tangle serve production          # serve {} ({version}) at http://127.0.0.1:8080/v1",
            record.pipeline
        );
    }
    eprintln!("  tangle graph {}", spec.display());
    eprintln!("  tangle usage                     # what the teacher cost");
}
