//! Labeling throughput benchmark: labels N distinct prompts against an OpenAI-compatible
//! server (normally `mock_server --latency-ms 50`) with the real journal and ledger, and
//! prints one JSON line: wall time, req/s, efficiency vs. the ideal concurrency/latency, and
//! client CPU per call from getrusage(RUSAGE_SELF).
//!
//! usage: bench_label --base-url URL [--n 10000] [--concurrency 128] [--latency-ms 50]
//!                    [--durability fsync|os] [--dir PATH] [--stream] [--no-ledger]
//!                    [--threads N (tokio workers; default one per core)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tangle::label::{label, CancelToken, Durability, LabelJob, LabelJournal, LabelOutcome, LabelSettings};
use tangle::ledger::Ledger;
use tangle::providers::config::{GenerationParams, ProviderKind, TargetConfig};
use tangle::providers::{ChatMessage, ChatRequest};
use tangle::router::{Router, RouterPolicy};

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

struct Args {
    base_url: String,
    n: usize,
    concurrency: usize,
    latency_ms: f64,
    durability: Durability,
    dir: Option<PathBuf>,
    stream: bool,
    ledger: bool,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        base_url: String::new(),
        n: 10_000,
        concurrency: 128,
        latency_ms: 50.0,
        durability: Durability::Fsync,
        dir: None,
        stream: false,
        ledger: true,
        threads: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--stream" {
            a.stream = true;
            continue;
        }
        if flag == "--no-ledger" {
            a.ledger = false;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag}: {e}");
        match flag.as_str() {
            "--base-url" => a.base_url = v,
            "--n" => a.n = v.parse().map_err(|e| bad(&e))?,
            "--concurrency" => a.concurrency = v.parse().map_err(|e| bad(&e))?,
            "--latency-ms" => a.latency_ms = v.parse().map_err(|e| bad(&e))?,
            "--durability" => {
                a.durability = match v.as_str() {
                    "fsync" => Durability::Fsync,
                    "os" => Durability::OsBuffered,
                    _ => return Err("--durability is fsync or os".into()),
                }
            }
            "--dir" => a.dir = Some(PathBuf::from(v)),
            "--threads" => a.threads = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.base_url.is_empty() {
        return Err("--base-url is required".into());
    }
    Ok(a)
}

/// (calls, service µs) from the mock's stats endpoint; `None` if the server is not our mock.
async fn mock_stats(base_url: &str) -> Option<(u64, u64)> {
    let url = format!("{}/mock/stats", base_url.trim_end_matches('/'));
    let value: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    Some((value["total"].as_u64()?, value["service_micros"].as_u64()?))
}

async fn run(args: Args) -> Result<(), String> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tangle-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let journal_path = dir.join("journal.jsonl");
    let ledger_path = dir.join("ledger.db");
    // Fresh files each run: the benchmark measures labeling, not resuming.
    for p in [&journal_path, &ledger_path] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_file(dir.join("ledger.db-wal"));
    let _ = std::fs::remove_file(dir.join("ledger.db-shm"));

    let mut target = TargetConfig::new(ProviderKind::OpenaiCompatible, "mock");
    target.base_url = Some(args.base_url.clone());
    target.timeout = Duration::from_secs(30);
    target.stream = args.stream;
    let router = Arc::new(Router::new(vec![target], RouterPolicy::default()).map_err(|e| e.to_string())?);
    let (journal, _) = LabelJournal::open(&journal_path, args.durability).map_err(|e| e.to_string())?;
    let ledger = match args.ledger {
        true => Some(Arc::new(Ledger::open(&ledger_path).map_err(|e| e.to_string())?)),
        false => None,
    };
    let requests: Vec<ChatRequest> = (0..args.n)
        .map(|i| {
            ChatRequest::new(
                vec![
                    ChatMessage::system("Classify the merchant question into billing, shipping or other."),
                    ChatMessage::user(format!("Question number {i}: where is my order?")),
                ],
                GenerationParams { temperature: Some(0.0), max_tokens: Some(16), ..Default::default() },
            )
        })
        .collect();

    let mock_before = mock_stats(&args.base_url).await;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let report = label(LabelJob {
        requests,
        router,
        journal: Arc::new(journal),
        already_done: Default::default(),
        ledger: ledger.clone(),
        settings: LabelSettings::new("bench", "label", args.concurrency),
        progress: None,
        cancel: CancelToken::new(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    // The server's own mean service time, if it is our mock (0 otherwise).
    let mock_ms = match (mock_before, mock_stats(&args.base_url).await) {
        (Some((c0, us0)), Some((c1, us1))) if c1 > c0 => (us1 - us0) as f64 / (c1 - c0) as f64 / 1000.0,
        _ => 0.0,
    };
    if report.outcome != LabelOutcome::Completed {
        return Err(format!("labeling did not complete: {:?} {:?}", report.outcome, report.failures.first()));
    }
    let done = report.progress.done as f64;
    // Mean provider-call latency as the client saw it (ms, truncated per call in the ledger).
    let mean_call_ms = match &ledger {
        Some(l) => l
            .totals(tangle::ledger::GroupBy::Run, &Default::default())
            .map_err(|e| e.to_string())?
            .first()
            .map_or(0.0, |t| t.mean_latency_ms),
        None => 0.0,
    };
    let ideal = args.concurrency as f64 / (args.latency_ms / 1000.0);
    let rps = done / wall;
    println!(
        "{{\"client\":\"tangle\",\"n\":{},\"concurrency\":{},\"durability\":\"{:?}\",\"stream\":{},\
         \"wall_s\":{:.3},\"req_per_s\":{:.1},\"ideal_req_per_s\":{:.1},\"efficiency\":{:.4},\
         \"cpu_s\":{:.3},\"cpu_us_per_call\":{:.1},\"mean_call_ms\":{:.2},\"mock_service_ms\":{:.3}}}",
        report.progress.done,
        args.concurrency,
        args.durability,
        args.stream,
        wall,
        rps,
        ideal,
        rps / ideal,
        cpu,
        cpu / done * 1e6,
        mean_call_ms,
        mock_ms
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
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
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
