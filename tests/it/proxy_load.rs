//! Load benchmark for `tangle proxy` (ignored by default; `scripts/bench-proxy.sh` runs it
//! in release and prints the figures that go into BENCHMARKS.md).
//!
//! 1. Added latency: the same requests, same concurrency, straight to a clean mock, through
//!    the `tangle proxy` binary, and through LiteLLM's proxy when `LITELLM` names its
//!    executable — interleaved in rounds, so drift on a shared machine hits all alike.
//! 2. Load: `BENCH_N` (100,000) requests at `BENCH_CONCURRENCY` (64), 10% streaming, through
//!    a route of three mocks that each fail 30% of calls (429, 500, 529, reset, truncated);
//!    the first mock is killed (its runtime shut down: listener and live connections gone)
//!    half-way. Every request must get an HTTP answer; the proxy's RSS is sampled
//!    throughout.
//!
//! Router policy: at 30% random faults and ~7,000 upstream calls/s, 5 failures in a row
//! happen every fraction of a second, so `failure_threshold: 10` keeps flaky-but-alive
//! targets in service (a dead one still cools down after 10 refused connections), and
//! `max_wait_for_target: 2s` lets a request wait for a probe instead of failing with 503.
//!
//! Mocks and the load generator share this process; the proxy is its own process, so its
//! memory and CPU are measured alone.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tangle::mock::{Fault, MockConfig, MockCounts, MockServer};

const KEY: &str = "bench-key-0123456789abcdef";
const LITELLM_MASTER_KEY: &str = "sk-litellm-bench-0123456789";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A mock on its own runtime, so that killing it closes its live connections too.
struct KillableMock {
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<MockServer>,
    base: String,
}

impl KillableMock {
    fn start(config: MockConfig) -> KillableMock {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let server = runtime.block_on(MockServer::start(config)).unwrap();
        let base = server.openai_base_url();
        KillableMock { runtime: Some(runtime), server: Some(server), base }
    }

    fn counts(&self) -> MockCounts {
        self.server.as_ref().map(MockServer::counts).unwrap_or_default()
    }

    fn kill(&mut self) -> MockCounts {
        let counts = self.counts();
        drop(self.server.take());
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        counts
    }
}

fn faulty(seed: u64) -> MockConfig {
    MockConfig {
        // Independent draws: 1 - 0.91·0.91·0.94·0.95·0.95 = 29.7% of calls fail.
        fault_rates: vec![
            (Fault::RateLimited { retry_after: Some("0".into()) }, 0.09),
            (Fault::ServerError, 0.09),
            (Fault::Overloaded, 0.06),
            (Fault::ConnectionReset, 0.05),
            (Fault::TruncatedBody, 0.05),
        ],
        seed,
        ..Default::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(dir: &Path, mocks: &[&KillableMock], clean: &KillableMock) -> (Proc, String) {
    let port = free_port();
    let target = |name: &str, base: &str, retries: u32| {
        format!("      - {{ name: {name}, provider: openai_compatible, model: {name}, base_url: '{base}', max_retries: {retries}, timeout: 5s }}\n")
    };
    let mut yaml =
        format!("listen: 127.0.0.1:{port}\nstate_dir: '{}'\nroutes:\n  load:\n    targets:\n", dir.display());
    for (i, m) in mocks.iter().enumerate() {
        yaml.push_str(&target(["a", "b", "c"][i], &m.base, 2));
    }
    yaml.push_str("  clean:\n    targets:\n");
    yaml.push_str(&target("d", &clean.base, 0));
    yaml.push_str(
        "keys:\n  - { name: bench, key: '${BENCH_KEY}', breaker: { max_continuous: off } }\n\
         router: { failure_threshold: 10, cooldown: 2s, max_wait_for_target: 2s, backoff_initial: 1ms, backoff_max: 10ms }\n",
    );
    let config = dir.join("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tangle"))
        .args(["proxy", "--config"])
        .arg(&config)
        .env("BENCH_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tangle proxy starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("OpenAI-compatible endpoint at") {
            break;
        }
    }
    // Keep draining stderr so the proxy never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Proc { child }, format!("http://127.0.0.1:{port}"))
}

fn start_litellm(exe: &str, dir: &Path, clean: &KillableMock) -> Option<(Proc, String)> {
    let port = free_port();
    let config = dir.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: clean\n    litellm_params:\n      model: openai/d\n      api_base: {}\n      api_key: sk-unused\n",
            clean.base
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("litellm.log")).unwrap();
    let child = Command::new(exe)
        .args(["--config"])
        .arg(&config)
        .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        .env("LITELLM_MASTER_KEY", LITELLM_MASTER_KEY)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .ok()?;
    let proc = Proc { child };
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        if http_ok(&format!("{url}/health/liveliness")) {
            return Some((proc, url));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("LiteLLM did not come up; see {}", dir.join("litellm.log").display());
    None
}

/// Whether a plain GET answers 200 (a readiness check that needs no runtime).
fn http_ok(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut s) = std::net::TcpStream::connect(host) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut head = [0u8; 12];
    s.write_all(request.as_bytes()).is_ok() && s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Http(u16),
    /// HTTP 200 whose stream ended with an error event (failure after the first byte).
    StreamError,
    /// No HTTP answer at all: connection error or client timeout.
    Unanswered,
}

#[derive(Default)]
struct Results {
    latencies_us: Vec<u64>,
    outcomes: Vec<Outcome>,
}

async fn one(client: &reqwest::Client, url: &str, key: &str, model: &str, i: usize, stream: bool) -> Outcome {
    let body = json!({
        "model": model,
        "messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": format!("question {i}")}],
        "max_tokens": 16,
        "stream": stream,
    });
    let sent = client.post(format!("{url}/v1/chat/completions")).bearer_auth(key).json(&body).send().await;
    let response = match sent {
        Ok(r) => r,
        Err(_) => return Outcome::Unanswered,
    };
    let status = response.status().as_u16();
    let Ok(text) = response.text().await else { return Outcome::Unanswered };
    match status {
        200 if stream && text.contains("\"error\"") => Outcome::StreamError,
        200 if stream && !text.contains("data: [DONE]") => Outcome::Unanswered,
        200 => Outcome::Ok,
        s => Outcome::Http(s),
    }
}

/// `n` requests from `concurrency` closed-loop workers; every `stream_every`-th streams.
async fn drive(
    url: &str,
    key: &str,
    model: &str,
    n: usize,
    concurrency: usize,
    stream_every: usize,
    done: Arc<AtomicUsize>,
) -> (Results, Duration) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, next, done) = (client.clone(), next.clone(), done.clone());
        let (url, key, model) = (url.to_string(), key.to_string(), model.to_string());
        workers.push(tokio::spawn(async move {
            let mut r = Results::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return r;
                }
                let stream = stream_every > 0 && i % stream_every == 0;
                let t = Instant::now();
                let outcome = one(&client, &url, &key, &model, i, stream).await;
                r.latencies_us.push(t.elapsed().as_micros() as u64);
                r.outcomes.push(outcome);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut all = Results::default();
    for w in workers {
        let r = w.await.unwrap();
        all.latencies_us.extend(r.latencies_us);
        all.outcomes.extend(r.outcomes);
    }
    (all, start.elapsed())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// User + system CPU seconds of a process (from /proc/PID/stat, in clock ticks).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

#[test]
#[ignore = "benchmark: run scripts/bench-proxy.sh"]
fn proxy_load_benchmark() {
    let n = env_usize("BENCH_N", 100_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);
    let latency_n = env_usize("BENCH_LATENCY_N", 6_000);
    let latency_concurrency = env_usize("BENCH_LATENCY_CONCURRENCY", 8);
    let min_rps = env_usize("BENCH_MIN_RPS", 2_000) as f64;
    let dir = tempfile::tempdir().unwrap();

    let clean = KillableMock::start(MockConfig::default());
    let mut a = KillableMock::start(faulty(1));
    let b = KillableMock::start(faulty(2));
    let c = KillableMock::start(faulty(3));
    let (proxy, proxy_url) = start_proxy(dir.path(), &[&a, &b, &c], &clean);
    let pid = proxy.child.id();
    let litellm = std::env::var("LITELLM").ok().and_then(|exe| start_litellm(&exe, dir.path(), &clean));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut report = serde_json::Map::new();

    // ---- 1. added latency, interleaved rounds ----
    let direct_url = clean.base.trim_end_matches("/v1").to_string();
    let mut systems: Vec<(&str, String, &str, &str)> =
        vec![("mock_direct", direct_url, "unused", "d"), ("tangle_proxy", proxy_url.clone(), KEY, "clean")];
    if let Some((_, url)) = &litellm {
        systems.push(("litellm_proxy", url.clone(), LITELLM_MASTER_KEY, "clean"));
    }
    let rounds = 3;
    let mut latencies: Vec<Vec<u64>> = vec![Vec::new(); systems.len()];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    for round in 0..=rounds {
        for (s, (name, url, key, model)) in systems.iter().enumerate() {
            let count = if round == 0 { 300 } else { latency_n / rounds }; // round 0 warms up
            let (r, elapsed) = rt.block_on(drive(url, key, model, count, latency_concurrency, 0, Arc::default()));
            let failed = r.outcomes.iter().filter(|o| **o != Outcome::Ok).count();
            assert_eq!(failed, 0, "{name}: {failed} failed requests on a clean mock");
            if round > 0 {
                latencies[s].extend(r.latencies_us);
                rates[s].push(count as f64 / elapsed.as_secs_f64());
            }
        }
    }
    let mut latency_doc = serde_json::Map::new();
    let direct = {
        let mut d = latencies[0].clone();
        d.sort_unstable();
        (percentile(&d, 50.0), percentile(&d, 99.0))
    };
    eprintln!(
        "\nadded latency: {} requests each at concurrency {latency_concurrency}, clean mock, {rounds} interleaved rounds",
        latency_n
    );
    for (s, (name, ..)) in systems.iter().enumerate() {
        let mut l = latencies[s].clone();
        l.sort_unstable();
        let (p50, p99) = (percentile(&l, 50.0), percentile(&l, 99.0));
        let rate = rates[s].iter().sum::<f64>() / rates[s].len() as f64;
        eprintln!(
            "  {name:14} p50 {p50:7.3} ms  p99 {p99:7.3} ms  ({rate:7.0} req/s)  added: p50 {:+7.3} ms  p99 {:+7.3} ms",
            p50 - direct.0,
            p99 - direct.1
        );
        latency_doc.insert(
            name.to_string(),
            json!({"p50_ms": p50, "p99_ms": p99, "req_per_s": rate,
                   "added_p50_ms": p50 - direct.0, "added_p99_ms": p99 - direct.1}),
        );
    }
    report.insert("latency".into(), Value::Object(latency_doc));
    if std::env::var("LITELLM").is_ok() && litellm.is_none() {
        report.insert("litellm".into(), json!("requested but did not start"));
    }
    drop(litellm);

    // ---- 2. load with faults and a killed target ----
    let done = Arc::new(AtomicUsize::new(0));
    let rss: Arc<Mutex<Vec<(usize, u64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (rss, done, stop) = (rss.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    rss.lock().unwrap().push((done.load(Ordering::Relaxed), kib));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let killed_at = Arc::new(Mutex::new(None));
    let a_counts = Arc::new(Mutex::new(None));
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let (results, elapsed) = rt.block_on(async {
        let killer = {
            let (done, killed_at, a_counts) = (done.clone(), killed_at.clone(), a_counts.clone());
            let mut a = std::mem::replace(&mut a, KillableMock { runtime: None, server: None, base: String::new() });
            tokio::task::spawn_blocking(move || {
                while done.load(Ordering::Relaxed) < n / 2 {
                    std::thread::sleep(Duration::from_millis(5));
                }
                *killed_at.lock().unwrap() = Some(done.load(Ordering::Relaxed));
                *a_counts.lock().unwrap() = Some(a.kill());
            })
        };
        let out = drive(&proxy_url, KEY, "load", n, concurrency, 10, done.clone()).await;
        killer.await.unwrap();
        out
    });
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let count = |f: &dyn Fn(&Outcome) -> bool| results.outcomes.iter().filter(|o| f(o)).count();
    let ok = count(&|o| *o == Outcome::Ok);
    let stream_errors = count(&|o| *o == Outcome::StreamError);
    let unanswered = count(&|o| *o == Outcome::Unanswered);
    let mut http: std::collections::BTreeMap<u16, usize> = Default::default();
    for o in &results.outcomes {
        if let Outcome::Http(s) = o {
            *http.entry(*s).or_default() += 1;
        }
    }
    let rps = n as f64 / elapsed.as_secs_f64();
    let mut l = results.latencies_us.clone();
    l.sort_unstable();
    let samples = rss.lock().unwrap().clone();
    let at = |fraction: f64| {
        samples.iter().find(|(d, _)| *d as f64 >= fraction * n as f64).or(samples.last()).map_or(0, |(_, k)| *k)
    };
    let (rss_20, rss_end) = (at(0.2), samples.last().map_or(0, |(_, k)| *k));
    let rss_max = samples.iter().map(|(_, k)| *k).max().unwrap_or(0);
    let a_seen = a_counts.lock().unwrap().clone().unwrap_or_default();
    let (b_seen, c_seen) = (b.counts(), c.counts());
    let upstream_calls = a_seen.total + b_seen.total + c_seen.total;
    let upstream_faults: u64 = [&a_seen, &b_seen, &c_seen].iter().flat_map(|c| c.faults.values()).sum();
    eprintln!(
        "\nload: {n} requests, concurrency {concurrency}, 10% streaming, 3 targets at ~30% faults, target `a` killed after {} answers",
        killed_at.lock().unwrap().unwrap_or(0)
    );
    eprintln!(
        "  {rps:.0} req/s over {:.1} s; p50 {:.2} ms, p99 {:.2} ms; proxy CPU {:.0} µs/request",
        elapsed.as_secs_f64(),
        percentile(&l, 50.0),
        percentile(&l, 99.0),
        cpu / n as f64 * 1e6
    );
    eprintln!(
        "  answered {}/{n}: {ok} ok, {stream_errors} stream error events after the first byte, HTTP errors {http:?}; unanswered {unanswered}",
        n - unanswered
    );
    eprintln!(
        "  upstream: {upstream_calls} calls ({:.1}% faulted; a {} before its kill, b {}, c {})",
        upstream_faults as f64 / upstream_calls.max(1) as f64 * 100.0,
        a_seen.total,
        b_seen.total,
        c_seen.total
    );
    eprintln!(
        "  proxy RSS: {:.1} MiB at 20%, {:.1} MiB at the end, max {:.1} MiB ({} samples)",
        rss_20 as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        samples.len()
    );
    report.insert(
        "load".into(),
        json!({
            "n": n, "concurrency": concurrency, "req_per_s": rps, "wall_s": elapsed.as_secs_f64(),
            "p50_ms": percentile(&l, 50.0), "p99_ms": percentile(&l, 99.0),
            "ok": ok, "stream_errors": stream_errors, "http_errors": http, "unanswered": unanswered,
            "proxy_cpu_us_per_request": cpu / n as f64 * 1e6,
            "upstream_calls": upstream_calls, "upstream_fault_rate": upstream_faults as f64 / upstream_calls.max(1) as f64,
            "killed_after": *killed_at.lock().unwrap(),
            "rss_kib": {"at_20pct": rss_20, "end": rss_end, "max": rss_max},
            "rss_samples": samples.iter().map(|(d, k)| json!([d, k])).collect::<Vec<_>>(),
        }),
    );
    let doc = Value::Object(report);
    if let Some(path) = std::env::var_os("BENCH_OUT").map(PathBuf::from) {
        std::fs::write(&path, format!("{doc:#}\n")).unwrap();
    }
    println!("{doc}");
    drop(proxy);

    assert_eq!(unanswered, 0, "every request must get an HTTP answer");
    assert!(rps >= min_rps, "{rps:.0} req/s < {min_rps}");
    // Flat: no growth with the number of requests beyond allocator noise.
    assert!(rss_end <= rss_20 + rss_20 / 4 + 8 * 1024, "RSS grew from {rss_20} KiB to {rss_end} KiB");
}
