//! The command line: every flag is defined and documented here, and each command only wires
//! library modules together. Human output goes to stderr, `--json` documents to stdout.

use crate::diagnostic::Report;
use crate::exit::Exit;
use crate::graph::{self, Format, Plan};
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
                  3 gate rejected, 4 stopped by a budget or breaker, 130 interrupted."
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
