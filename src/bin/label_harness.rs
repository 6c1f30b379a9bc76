//! Test harness for crash/resume tests: labels `prompt 0..N` against an OpenAI-compatible
//! server with a journal (and optionally a ledger), then writes the labels in input order
//! as a JSON array. Meant to be SIGKILLed at random points and re-run.
//!
//! usage: label_harness --base-url URL --journal PATH --n N [--concurrency C]
//!                      [--ledger PATH] [--out PATH] [--stream]
//! exit: 0 done, 1 error, 3 some requests failed, 4 budget.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tangle::label::{
    label, labels_in_order, CancelToken, Durability, LabelJob, LabelJournal, LabelOutcome, LabelSettings,
};
use tangle::ledger::Ledger;
use tangle::providers::config::{GenerationParams, ProviderKind, TargetConfig};
use tangle::providers::{ChatMessage, ChatRequest};
use tangle::router::{Router, RouterPolicy};

/// The harness's requests; the crash test rebuilds them identically.
pub fn harness_request(i: usize) -> ChatRequest {
    ChatRequest::new(
        vec![ChatMessage::system("Label the prompt."), ChatMessage::user(format!("prompt {i}"))],
        GenerationParams { temperature: Some(0.0), max_tokens: Some(16), ..Default::default() },
    )
}

struct Args {
    base_url: String,
    journal: PathBuf,
    n: usize,
    concurrency: usize,
    ledger: Option<PathBuf>,
    out: Option<PathBuf>,
    stream: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut base_url, mut journal, mut n) = (None, None, None);
    let (mut concurrency, mut ledger, mut out, mut stream) = (16, None, None, false);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--base-url" => base_url = Some(value()?),
            "--journal" => journal = Some(PathBuf::from(value()?)),
            "--n" => n = Some(value()?.parse().map_err(|e| format!("--n: {e}"))?),
            "--concurrency" => concurrency = value()?.parse().map_err(|e| format!("--concurrency: {e}"))?,
            "--ledger" => ledger = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--stream" => stream = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        base_url: base_url.ok_or("--base-url is required")?,
        journal: journal.ok_or("--journal is required")?,
        n: n.ok_or("--n is required")?,
        concurrency,
        ledger,
        out,
        stream,
    })
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let mut target = TargetConfig::new(ProviderKind::OpenaiCompatible, "mock");
    target.base_url = Some(args.base_url);
    target.timeout = Duration::from_secs(10);
    target.stream = args.stream;
    let router = Router::new(vec![target], RouterPolicy::default()).map_err(|e| e.to_string())?;
    let (journal, contents) = LabelJournal::open(&args.journal, Durability::Fsync).map_err(|e| e.to_string())?;
    let ledger = match &args.ledger {
        Some(path) => Some(Arc::new(Ledger::open(path).map_err(|e| e.to_string())?)),
        None => None,
    };
    let requests: Vec<ChatRequest> = (0..args.n).map(harness_request).collect();
    let report = label(LabelJob {
        requests,
        router: Arc::new(router),
        journal: Arc::new(journal),
        already_done: contents.records.keys().cloned().collect(),
        ledger,
        settings: LabelSettings::new("harness", "label", args.concurrency),
        progress: None,
        cancel: CancelToken::new(),
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Some(out) = &args.out {
        let records = LabelJournal::read(&args.journal).map_err(|e| e.to_string())?;
        let labels = labels_in_order(&report.request_ids, &records);
        let json = serde_json::to_vec(&labels).map_err(|e| e.to_string())?;
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, json).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, out).map_err(|e| e.to_string())?;
    }
    Ok(match report.outcome {
        LabelOutcome::Completed => ExitCode::SUCCESS,
        LabelOutcome::CompletedWithFailures => ExitCode::from(3),
        LabelOutcome::BudgetExhausted(_) => ExitCode::from(4),
        LabelOutcome::Cancelled => ExitCode::from(130),
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
