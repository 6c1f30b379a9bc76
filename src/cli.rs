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
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> i32 {
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
            emit(&graph::render(&plan, args.format));
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
