//! `tangle serve` benchmark client, and the fixture models it is measured on.
//!
//! usage: bench_serve write-model DIR tiny|135m
//!        bench_serve load --base-url URL [--concurrency 8] [--requests 64] [--max-tokens 32]
//!
//! `load` runs a closed loop: `concurrency` clients each send streaming chat completions
//! (with `stream_options.include_usage`) until `requests` have been answered, after two
//! warm-up requests. It prints one JSON line: requests/s, generated tokens/s, and the
//! median and 95th-percentile latency and time to first token.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tangle::model::config::ModelFamily;
use tangle::model::fixture::{write_tiny_model, FixtureSpec};

struct LoadArgs {
    base_url: String,
    concurrency: usize,
    requests: usize,
    max_tokens: u32,
}

fn parse_load_args(args: &[String]) -> Result<LoadArgs, String> {
    let mut a = LoadArgs { base_url: String::new(), concurrency: 8, requests: 64, max_tokens: 32 };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag}: {e}");
        match flag.as_str() {
            "--base-url" => a.base_url = v.clone(),
            "--concurrency" => a.concurrency = v.parse().map_err(|e| bad(&e))?,
            "--requests" => a.requests = v.parse().map_err(|e| bad(&e))?,
            "--max-tokens" => a.max_tokens = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.base_url.is_empty() {
        return Err("--base-url is required".into());
    }
    Ok(a)
}

/// One answered request as the client saw it.
struct Sample {
    latency: Duration,
    first_token: Duration,
    completion_tokens: u64,
}

/// Sends request number `i` (streaming) and reads the SSE stream to `[DONE]`.
async fn one_request(client: &reqwest::Client, url: &str, i: usize, max_tokens: u32) -> Result<Sample, String> {
    // Distinct prompts of similar length, so no cache can short-cut them.
    let body = serde_json::json!({
        "model": "bench",
        "messages": [
            {"role": "system", "content": "Route the merchant's message to one intent."},
            {"role": "user", "content": format!("Order {i}: the parcel has not arrived and the tracking page is blank.")},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let mut response = client.post(url).json(&body).send().await.map_err(|e| format!("request {i}: {e}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(format!("request {i}: HTTP {status}: {text}"));
    }
    let mut buffer = String::new();
    let mut first_token = None;
    let mut completion_tokens = 0;
    let mut done = false;
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("request {i}: {e}"))? {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(data).map_err(|e| format!("request {i}: {e}"))?;
            let content = value["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if first_token.is_none() && !content.is_empty() {
                first_token = Some(started.elapsed());
            }
            if let Some(tokens) = value["usage"]["completion_tokens"].as_u64() {
                completion_tokens = tokens;
            }
        }
    }
    if !done {
        return Err(format!("request {i}: the stream ended without [DONE]"));
    }
    let latency = started.elapsed();
    Ok(Sample { latency, first_token: first_token.unwrap_or(latency), completion_tokens })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn load(args: LoadArgs) -> Result<(), String> {
    let url = format!("{}/chat/completions", args.base_url.trim_end_matches('/'));
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build().map_err(|e| e.to_string())?;
    for i in 0..2 {
        one_request(&client, &url, usize::MAX - i, args.max_tokens).await?;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (client, url, next) = (client.clone(), url.clone(), Arc::clone(&next));
            let (requests, max_tokens) = (args.requests, args.max_tokens);
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return Ok::<_, String>(samples);
                    }
                    samples.push(one_request(&client, &url, i, max_tokens).await?);
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    for worker in workers {
        samples.extend(worker.await.map_err(|e| e.to_string())??);
    }
    let wall = started.elapsed().as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut latency: Vec<f64> = samples.iter().map(|s| ms(s.latency)).collect();
    let mut first: Vec<f64> = samples.iter().map(|s| ms(s.first_token)).collect();
    latency.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);
    let tokens: u64 = samples.iter().map(|s| s.completion_tokens).sum();
    println!(
        "{}",
        serde_json::json!({
            "concurrency": args.concurrency,
            "requests": samples.len(),
            "max_tokens": args.max_tokens,
            "wall_s": wall,
            "req_per_s": samples.len() as f64 / wall,
            "completion_tokens": tokens,
            "tokens_per_s": tokens as f64 / wall,
            "latency_p50_ms": percentile(&latency, 0.5),
            "latency_p95_ms": percentile(&latency, 0.95),
            "ttft_p50_ms": percentile(&first, 0.5),
            "ttft_p95_ms": percentile(&first, 0.95),
        })
    );
    Ok(())
}

fn write_model(dir: &Path, shape: &str) -> Result<(), String> {
    let spec = match shape {
        "tiny" => FixtureSpec::tiny(ModelFamily::Qwen2, 7),
        "135m" => FixtureSpec::shaped_135m(ModelFamily::Qwen2, 7),
        other => return Err(format!("unknown shape `{other}` (tiny or 135m)")),
    };
    let config = write_tiny_model(dir, &spec).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {} ({} layers, hidden {}, vocab {})",
        dir.display(),
        spec.num_hidden_layers,
        spec.hidden_size,
        config.vocab_size
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("write-model") if args.len() == 3 => write_model(Path::new(&args[1]), &args[2]),
        Some("load") => parse_load_args(&args[1..]).and_then(|a| {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(load(a))
        }),
        _ => Err("usage: bench_serve write-model DIR tiny|135m | bench_serve load --base-url URL [...]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
