//! Helpers for the proxy tests: a proxy served in-process from YAML text, mock upstreams,
//! a webhook receiver, an SSE reader, and the ledger as the proxy left it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tangle::ledger::{GroupBy, Ledger, UsageFilter, UsageTotals};
use tangle::mock::{MockConfig, MockServer};
use tangle::proxy::{config, Proxy};

/// A client key long enough for the config's checks.
pub const APP_KEY: &str = "app-key-0123456789abcdef";
pub const OPS_KEY: &str = "ops-key-0123456789abcdef";
/// The upstream key the mocks expect; it must never leave the provider layer.
pub const UPSTREAM_KEY: &str = "sk-upstream-SECRET-4242424242";

pub fn env(name: &str) -> Option<String> {
    match name {
        "APP_KEY" => Some(APP_KEY.into()),
        "OPS_KEY" => Some(OPS_KEY.into()),
        "UPSTREAM_KEY" => Some(UPSTREAM_KEY.into()),
        _ => std::env::var(name).ok(),
    }
}

pub async fn mock() -> MockServer {
    MockServer::start(MockConfig { expected_api_key: Some(UPSTREAM_KEY.into()), ..Default::default() })
        .await
        .expect("mock starts")
}

pub struct TestProxy {
    pub proxy: Arc<Proxy>,
    pub url: String,
    pub dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestProxy {
    /// Writes `yaml` (with `STATE_DIR` replaced by a temp dir) and serves it on an
    /// ephemeral loopback port.
    pub async fn start(yaml: &str) -> TestProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(yaml, dir).await
    }

    pub async fn start_in(yaml: &str, dir: tempfile::TempDir) -> TestProxy {
        let text = yaml.replace("STATE_DIR", &dir.path().join("state").display().to_string());
        let file = dir.path().join("proxy.yaml");
        std::fs::write(&file, &text).expect("write config");
        let config =
            config::load_source(&file, &text, &env).unwrap_or_else(|report| panic!("{}", report.render_human()));
        let proxy = Proxy::start(config).expect("proxy starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let served = proxy.clone();
        let server = tokio::spawn(async move {
            let _ = tangle::proxy::serve(listener, served, async {
                let _ = stopped.await;
            })
            .await;
        });
        TestProxy { proxy, url: format!("http://{addr}"), dir, server, stop: Some(stop) }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Stops serving and hands back the directory (for a restart on the same state).
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
        // Let the ledger writer and the breaker-state task finish their queued work.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

pub fn chat_body(model: &str, prompt: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": prompt}],
        "max_tokens": 16,
        "stream": stream,
        "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { Value::Null },
    })
}

/// A finished response: status, headers we care about, and the body (JSON, or the SSE
/// `data:` payloads in order when streaming).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub target: Option<String>,
    pub retry: Option<String>,
    pub json: Value,
    pub events: Vec<String>,
}

impl Answer {
    /// The text of a streamed reply: every `delta.content` joined.
    pub fn streamed_text(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .collect()
    }

    pub fn stream_error(&self) -> Option<Value> {
        self.events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find(|v| !v["error"].is_null())
            .map(|v| v["error"].clone())
    }

    pub fn text(&self) -> String {
        self.json["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string()
    }
}

pub async fn send(url: &str, key: Option<&str>, body: &Value) -> Answer {
    let mut request = client().post(format!("{url}/v1/chat/completions")).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("proxy answers");
    let status = response.status().as_u16();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (target, retry) = (header("x-tangle-target"), header("x-should-retry"));
    let is_sse = header("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
    let text = response.text().await.expect("body");
    if is_sse {
        let events = text
            .split("\n\n")
            .filter_map(|block| {
                let data: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                (!data.is_empty()).then(|| data.join("\n"))
            })
            .collect();
        Answer { status, target, retry, json: Value::Null, events }
    } else {
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer { status, target, retry, json, events: Vec::new() }
    }
}

pub async fn chat(url: &str, key: &str, model: &str, prompt: &str, stream: bool) -> Answer {
    send(url, Some(key), &chat_body(model, prompt, stream)).await
}

pub async fn admin(url: &str, path: &str) -> (u16, Value) {
    let response =
        client().post(format!("{url}{path}")).header("x-tangle-admin", "1").send().await.expect("admin answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

pub async fn breakers(url: &str) -> Vec<Value> {
    let v: Value =
        client().get(format!("{url}/admin/breakers")).send().await.expect("admin").json().await.expect("json");
    v["breakers"].as_array().cloned().unwrap_or_default()
}

pub async fn breaker_state(url: &str, id: &str) -> String {
    breakers(url)
        .await
        .iter()
        .find(|b| b["id"] == id)
        .map(|b| b["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no breaker {id}"))
}

/// Ledger totals once `expected_calls` rows are committed (writes are asynchronous).
pub async fn ledger_totals(state_dir: &Path, group: GroupBy, expected_calls: u64) -> Vec<UsageTotals> {
    let ledger = Ledger::open(&state_dir.join("ledger.sqlite")).expect("ledger");
    for _ in 0..200 {
        if ledger.call_count().expect("count") >= expected_calls {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ledger.totals(group, &UsageFilter::default()).expect("totals")
}

/// Records every JSON document POSTed to it.
pub struct Webhook {
    pub url: String,
    pub received: Arc<Mutex<Vec<Value>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Webhook {
    pub async fn start() -> Webhook {
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(v);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Webhook { url, received, _server: server }
    }

    /// Waits (real time, up to 5 s) for `n` alerts.
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        for _ in 0..500 {
            if self.received.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.received.lock().unwrap().clone()
    }
}

/// Fails if `secret` occurs in any file under `dir`.
pub fn assert_not_in_files(dir: &Path, secret: &str) {
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(!found, "secret found in {}", entry.display());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
