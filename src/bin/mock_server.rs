//! Runs the mock provider as its own process (benchmarks, manual testing). Prints
//! `MOCK_ADDR=127.0.0.1:PORT` on stdout once listening; serves until stdin closes.
//!
//! usage: mock_server [--latency-ms MS] [--bind ADDR] [--threads N]

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use tangle::mock::{MockConfig, MockServer};

fn main() -> ExitCode {
    let mut latency_ms = 50u64;
    let mut bind = "127.0.0.1:0".to_string();
    let mut threads = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        let parsed = match flag.as_str() {
            "--latency-ms" => value.parse().map(|v| latency_ms = v).is_ok(),
            "--threads" => value.parse().map(|v| threads = v).is_ok(),
            "--bind" => {
                bind = value;
                true
            }
            _ => false,
        };
        if !parsed {
            eprintln!("usage: mock_server [--latency-ms MS] [--bind ADDR] [--threads N]");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let config = MockConfig { base_latency: Duration::from_millis(latency_ms), ..Default::default() };
        let server = match MockServer::start_on(&bind, config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot bind {bind}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("MOCK_ADDR={}", server.addr());
        let _ = std::io::stdout().flush();
        // Serve until stdin reaches EOF (the parent closed it or died).
        let _ = tokio::task::spawn_blocking(|| {
            let stdin = std::io::stdin();
            for _ in stdin.lock().lines() {}
        })
        .await;
        let counts = server.counts();
        eprintln!("mock_server: {} calls, {} ok", counts.total, counts.ok);
        ExitCode::SUCCESS
    })
}
