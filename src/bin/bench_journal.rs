//! Measures the label journal's fsync policy: records/s when each append waits alone
//! (one fdatasync per record) versus 128 concurrent appenders (group commit), with and
//! without fsync. Prints one JSON line per case.
//!
//! usage: bench_journal [--dir PATH] [--records N]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tangle::label::{Durability, JournalRecord, LabelJournal};
use tangle::providers::{ChatResponse, Usage};

fn record(i: usize) -> JournalRecord {
    JournalRecord {
        id: format!("{i:064x}"),
        target: "bench".into(),
        provider: None,
        model: "mock".into(),
        response: ChatResponse {
            text: "label-0123abcd ok".into(),
            finish_reason: Some("stop".into()),
            usage: Usage { input_tokens: 20, output_tokens: 2 },
            model: Some("mock".into()),
            logprobs: None,
        },
        cost_usd: 0.0,
        latency_ms: 50,
        timestamp_ms: 0,
    }
}

async fn case(dir: &std::path::Path, durability: Durability, writers: usize, records: usize) -> Result<(), String> {
    let path = dir.join(format!("journal-{durability:?}-{writers}.jsonl"));
    let _ = std::fs::remove_file(&path);
    let (journal, _) = LabelJournal::open(&path, durability).map_err(|e| e.to_string())?;
    let journal = Arc::new(journal);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let journal = journal.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < records {
                journal.append(&record(i)).await.map_err(|e| e.to_string())?;
                i += writers;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"durability\":\"{durability:?}\",\"writers\":{writers},\"records\":{records},\"secs\":{secs:.3},\
         \"records_per_s\":{:.0},\"mean_append_us\":{:.0}}}",
        records as f64 / secs,
        secs * 1e6 * writers as f64 / records as f64
    );
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let mut dir = std::env::temp_dir().join(format!("tangle-journal-bench-{}", std::process::id()));
    let mut records = 20_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--dir", Some(v)) => dir = PathBuf::from(v),
            ("--records", Some(v)) => records = v.parse().unwrap_or(records),
            _ => {
                eprintln!("usage: bench_journal [--dir PATH] [--records N]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // One writer awaiting each append = one fsync per record; fewer records, it is slow.
        case(&dir, Durability::Fsync, 1, (records / 10).max(100)).await?;
        case(&dir, Durability::Fsync, 128, records).await?;
        case(&dir, Durability::OsBuffered, 1, records).await?;
        case(&dir, Durability::OsBuffered, 128, records).await?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<(), String>(())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
