//! The real `tangle proxy` binary: config errors located and explained (snapshot), the
//! official `openai` Python package against it (streaming, a mid-stream failure, a breaker
//! refusal), `tangle breaker list/confirm`, config reload on SIGHUP, a clean Ctrl-C, the
//! dashboard in headless Chromium, and no secret on its stderr.

use crate::proxy_common as common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tangle::mock::{default_answer, Fault};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tangle() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tangle"));
    cmd.current_dir(repo())
        .env("APP_KEY", APP_KEY)
        .env("OPS_KEY", OPS_KEY)
        .env("UPSTREAM_KEY", UPSTREAM_KEY)
        .env("SUPPORT_APP_KEY", APP_KEY);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_reports_every_config_mistake_with_its_position_and_exit_2() {
    let output = tangle().args(["proxy", "--check", "--config", "tests/proxy/invalid.yaml"]).output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(stderr.starts_with("tests/proxy/invalid.yaml:"), "{stderr}");
    assert!(!stderr.contains(UPSTREAM_KEY) && !stderr.contains(APP_KEY));
    insta::with_settings!({ snapshot_path => "../proxy/snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!("proxy_check_invalid", stderr);
    });

    let ok = tangle().args(["proxy", "--check", "--config", "examples/proxy/proxy.yaml"]).output().unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stderr), "examples/proxy/proxy.yaml: ok (1 route, 2 keys)\n");
    let missing = tangle().args(["proxy", "--check", "--config", "nope.yaml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("cannot read the proxy config"));
}

/// A `tangle proxy` child process whose stderr is collected.
struct ProxyProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
    url: String,
}

impl ProxyProcess {
    fn start(config: &Path) -> ProxyProcess {
        let mut child = tangle()
            .args(["proxy", "--config"])
            .arg(config)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("tangle proxy starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = loop {
            let seen = stderr.lock().unwrap().clone();
            if let Some(rest) = seen.split("OpenAI-compatible endpoint at ").nth(1) {
                break rest.lines().next().unwrap().trim_end_matches("/v1").to_string();
            }
            assert!(Instant::now() < deadline, "the proxy did not start:\n{seen}");
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the proxy exited with {status}:\n{seen}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ProxyProcess { child, stderr, url }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0);
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_config(dir: &Path, port: u16, upstream: &str, extra_route: bool, key_extra: &str) -> PathBuf {
    let extra = if extra_route {
        format!(
            "  extra:\n    targets: [{{ name: extra, provider: openai_compatible, model: x, base_url: '{upstream}', api_key: '${{UPSTREAM_KEY}}' }}]\n"
        )
    } else {
        String::new()
    };
    let yaml = format!(
        "listen: 127.0.0.1:{port}
state_dir: state
routes:
  support:
    targets:
      - {{ name: mock, provider: openai_compatible, model: m, base_url: '{upstream}', api_key: '${{UPSTREAM_KEY}}', max_retries: 0 }}
{extra}keys:
  - {{ name: app, key: '${{APP_KEY}}'{key_extra} }}
  - {{ name: ops, key: '${{OPS_KEY}}' }}
router: {{ backoff_initial: 1ms, failure_threshold: 100 }}
"
    );
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn has_python_openai() -> bool {
    let ok = Command::new("python3").args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var("CI").is_err(), "CI must install the `openai` Python package (.ci/run does)");
        eprintln!("SKIPPED: python3 with the `openai` package is not installed (pip install openai)");
    }
    ok
}

fn python(mode: &str, url: &str, key: &str, model: &str) -> Value {
    let script = repo().join("tests/proxy/openai_client.py");
    let output = Command::new("python3").arg(script).args([mode, &format!("{url}/v1"), key, model]).output().unwrap();
    assert!(output.status.success(), "python {mode} failed:\n{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output.stdout)))
}

fn run_breaker(config: &Path, args: &[&str]) -> (i32, String, String) {
    let output = tangle().arg("breaker").args(args).arg("--config").arg(config).output().unwrap();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_and_tangle_breaker_work_against_the_binary() {
    if !has_python_openai() {
        return;
    }
    let upstream = mock().await;
    let dir = tempfile::tempdir().unwrap();
    // A one-token-per-hour budget: the first request trips the key's breaker.
    let config = write_config(dir.path(), free_port(), &upstream.openai_base_url(), false, "");
    let proxy = ProxyProcess::start(&config);
    let url = proxy.url.clone();

    let basic = tokio::task::spawn_blocking({
        let url = url.clone();
        move || python("basic", &url, APP_KEY, "support")
    })
    .await
    .unwrap();
    let expected = default_answer("where is my parcel");
    assert_eq!(basic["text"], expected.as_str(), "{basic}");
    assert_eq!(basic["finish_reason"], "stop");
    assert_eq!(basic["model"], "support");
    assert_eq!(basic["stream_pieces"].as_array().unwrap().len(), 2, "token by token: {basic}");
    let joined: String = basic["stream_pieces"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(joined, expected);
    assert_eq!(basic["stream_finish_reason"], "stop");
    assert_eq!(basic["stream_total_tokens"], basic["total_tokens"]);
    assert_eq!(basic["models"], serde_json::json!(["support"]));
    assert_eq!(basic["bad_key"], 401);

    upstream.push_faults([Fault::OverloadedMidStream]);
    let mid = tokio::task::spawn_blocking({
        let url = url.clone();
        move || python("midstream", &url, APP_KEY, "support")
    })
    .await
    .unwrap();
    assert_eq!(mid["pieces"].as_array().unwrap().len(), 2, "the text before the failure arrived: {mid}");
    assert_eq!(mid["error"], "APIError", "a clean error, not a silent truncation: {mid}");
    assert!(mid["message"].as_str().unwrap().contains("after the reply had started"), "{mid}");

    // `tangle breaker`: list, a trip, the client refused, confirm, accepted again.
    let (code, _, stderr) = run_breaker(&config, &["list"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("key:app") && stderr.contains("closed"), "{stderr}");

    // Reload with a tiny per-hour budget for `app` and a new route (SIGHUP, no restart).
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    write_config(dir.path(), port, &upstream.openai_base_url(), true, ", breaker: { max_tokens_per_hour: 1 }");
    proxy.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let models: Value =
            client().get(format!("{url}/v1/models")).bearer_auth(OPS_KEY).send().await.unwrap().json().await.unwrap();
        if models["data"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the reload never happened:\n{}", proxy.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(proxy.stderr().contains("reloaded"), "{}", proxy.stderr());
    assert_eq!(chat(&url, APP_KEY, "support", "q", false).await.status, 200, "this one trips the breaker");
    let calls_before = upstream.counts().total;
    let refused = tokio::task::spawn_blocking({
        let url = url.clone();
        move || python("breaker", &url, APP_KEY, "support")
    })
    .await
    .unwrap();
    assert_eq!(refused["error"], "RateLimitError", "{refused}");
    assert_eq!(refused["status"], 429);
    assert_eq!(refused["code"], "breaker_open");
    assert!(refused["message"].as_str().unwrap().contains("tokens in the last hour"), "{refused}");
    assert_eq!(upstream.counts().total, calls_before, "refused, and not retried by the client");

    let (code, stdout, _) = run_breaker(&config, &["list", "--json"]);
    assert_eq!(code, 0);
    let doc: Value = serde_json::from_str(&stdout).expect("--json prints one document");
    let app = doc["breakers"].as_array().unwrap().iter().find(|b| b["id"] == "key:app").unwrap().clone();
    assert_eq!(app["state"], "tripped", "{doc}");
    let (code, _, stderr) = run_breaker(&config, &["list"]);
    assert_eq!(code, 0);
    assert!(stderr.contains("1 tripped"), "{stderr}");
    let (code, _, stderr) = run_breaker(&config, &["confirm", "key:nobody"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no breaker `key:nobody`"), "{stderr}");
    let (code, _, stderr) = run_breaker(&config, &["confirm", "key:app"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("confirmed `key:app`"), "{stderr}");
    let again = tokio::task::spawn_blocking({
        let url = url.clone();
        move || python("breaker", &url, APP_KEY, "support")
    })
    .await
    .unwrap();
    assert_eq!(again["error"], Value::Null, "accepted after confirm: {again}");

    // The trip and the confirm were logged; no secret ever was. Ctrl-C stops it cleanly,
    // even with a dashboard still watching.
    let watching = client().get(format!("{url}/dashboard/events")).send().await.unwrap();
    assert_eq!(watching.status(), 200);
    proxy.signal(libc::SIGINT);
    let mut proxy = proxy;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "Ctrl-C did not stop the proxy:\n{}", proxy.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(watching);
    assert_eq!(status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(50));
    let log = proxy.stderr();
    assert!(log.contains("proxy alert: tangle proxy: `key:app` used"), "{log}");
    assert!(log.contains("an operator confirmed `key:app`"), "{log}");
    for secret in [UPSTREAM_KEY, APP_KEY, OPS_KEY] {
        assert!(!log.contains(secret), "a secret on stderr:\n{log}");
    }
    assert_not_in_files(dir.path(), UPSTREAM_KEY);
    assert_not_in_files(dir.path(), APP_KEY);
    let (code, _, stderr) = run_breaker(&config, &["list"]);
    assert_eq!(code, 1, "no proxy running: a runtime error");
    assert!(stderr.contains("no proxy answers at") && stderr.contains("hint: start it"), "{stderr}");
}

fn find_chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
    })
}

/// Issue 9: a trip appears on the page within 2 s; clicking Confirm re-opens the key; the
/// test saves screenshots (`target/test-artifacts/proxy-dashboard/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_trip_within_2s_and_its_confirm_button_reopens_the_key() {
    let Some(chromium) = find_chromium() else {
        assert!(std::env::var("CI").is_err(), "CI must install Debian's `chromium` package (.ci/run)");
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium)");
        return;
    };
    let upstream = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        free_port(),
        &upstream.openai_base_url(),
        false,
        ", breaker: { max_tokens_per_hour: 1 }",
    );
    let proxy = ProxyProcess::start(&config);
    let shots = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("test-artifacts/proxy-dashboard");
    let mut driver = Command::new("python3")
        .arg(repo().join("tests/proxy/dashboard_cdp.py"))
        .arg(&chromium)
        .arg(format!("{}/dashboard", proxy.url))
        .arg("key:app")
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the CDP driver");
    let mut stdin = driver.stdin.take().unwrap();
    let stdout = driver.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        (first, lines)
    });
    let (ready, mut lines) = tokio::time::timeout(Duration::from_secs(90), lines).await.expect("driver ready").unwrap();
    assert_eq!(ready, "READY", "the driver failed: {ready}");
    writeln!(stdin, "GO").unwrap();
    stdin.flush().unwrap();
    // The request that trips the breaker is made after GO: the 2 s include it.
    assert_eq!(chat(&proxy.url, APP_KEY, "support", "q", false).await.status, 200);
    assert_eq!(chat(&proxy.url, APP_KEY, "support", "q", false).await.status, 429);
    let result = tokio::task::spawn_blocking(move || lines.next().and_then(Result::ok).unwrap_or_default());
    let result = tokio::time::timeout(Duration::from_secs(60), result).await.expect("driver result").unwrap();
    let _ = driver.wait();
    let doc: Value = serde_json::from_str(&result).unwrap_or_else(|e| panic!("{e}: {result}"));
    assert!(doc["error"].is_null(), "{doc}");
    let appeared = doc["appeared_s"].as_f64().unwrap();
    assert!(appeared < 2.0, "the trip took {appeared:.2}s to appear");
    assert_eq!(doc["notice"], "confirmed key:app", "{doc}");
    assert_eq!(breaker_state(&proxy.url, "key:app").await, "closed");
    assert_eq!(chat(&proxy.url, APP_KEY, "support", "q", false).await.status, 200, "the key is open again");
    for shot in ["dashboard-tripped.png", "dashboard-confirmed.png"] {
        let bytes = std::fs::read(shots.join(shot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "{shot}");
    }
    eprintln!("dashboard: trip shown after {appeared:.3}s; screenshots in {}", shots.display());
}
