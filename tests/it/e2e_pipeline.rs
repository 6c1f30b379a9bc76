//! The whole loop at CI size, through the real binary: the pipeline launches the mock
//! teacher, labels, trains a tiny random Qwen2 student, evaluates both, gates, packages and
//! deploys; then a second run is all cache hits without starting the teacher; then the
//! deployed student is served and answers like the evaluated one.

use crate::common;

use common::{tangle, text};
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use tangle::model::config::ModelFamily;
use tangle::model::fixture::{write_tiny_model, FixtureSpec};

struct Workspace {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn workspace(rows: usize) -> Workspace {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut spec = FixtureSpec::tiny(ModelFamily::Qwen2, 3);
    spec.hidden_size = 96;
    spec.intermediate_size = 192;
    write_tiny_model(&dir.join("student"), &spec).unwrap();
    let data = std::fs::read_to_string(common::repo().join("examples/support-intent/support.jsonl")).unwrap();
    let subset: Vec<&str> = data.lines().take(rows).collect();
    std::fs::write(dir.join("data.jsonl"), subset.join("\n") + "\n").unwrap();
    std::fs::copy(common::repo().join("tests/e2e/support-tiny.yaml"), dir.join("pipeline.yaml")).unwrap();
    if std::env::var_os("TANGLE_E2E_KEEP").is_some() {
        eprintln!("workspace kept at {}", tmp.keep().display());
        return Workspace { _tmp: tempfile::tempdir().unwrap(), dir, port: free_port() };
    }
    Workspace { _tmp: tmp, dir, port: free_port() }
}

fn command(ws: &Workspace, env: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = tangle();
    cmd.current_dir(&ws.dir)
        .args(["run", "pipeline.yaml", "--no-progress"])
        .env("TANGLE_E2E_PORT", ws.port.to_string())
        .env("TANGLE_E2E_STUDENT", "student");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn run_with(ws: &Workspace, env: &[(&str, &str)]) -> Output {
    let output = command(ws, env).output().unwrap();
    common::assert_no_secret(&output);
    output
}

fn run(ws: &Workspace) -> Output {
    run_with(ws, &[])
}

/// Starts a run, signals it after `after`, and returns its exit code and stderr.
fn interrupt(ws: &Workspace, env: &[(&str, &str)], after: std::time::Duration, signal: i32) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    let child = command(ws, env).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(after);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    let output = child.wait_with_output().unwrap();
    common::assert_no_secret(&output);
    let code = output.status.code().or(output.status.signal().map(|s| 128 + s));
    (code, text(&output.stderr))
}

fn duplicates(lines: &[String]) -> usize {
    lines.len() - lines.iter().collect::<HashSet<_>>().len()
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Budget stop (exit 4), Ctrl-C (exit 130) and kill -9 during labeling, each resumed: paid
/// answers are never bought twice, except calls in flight at a kill -9 (at most the
/// concurrency, 8), and the launched teacher never outlives tangle.
#[test]
fn labeling_survives_budget_stop_ctrl_c_and_kill_9() {
    let ws = workspace(96);
    let slow = [("TANGLE_E2E_TEACHER_MS", "250")];

    let budget = run_with(&ws, &[("TANGLE_E2E_TEACHER_MS", "250"), ("TANGLE_E2E_BUDGET_USD", "0.0006")]);
    let stderr = text(&budget.stderr);
    assert_eq!(budget.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("raise `teacher.budget`"), "{stderr}");
    let after_budget = calls(&ws);
    assert!(!after_budget.is_empty() && after_budget.len() < 96, "{} calls", after_budget.len());
    assert_eq!(duplicates(&after_budget), 0);

    let (code, stderr) = interrupt(&ws, &slow, std::time::Duration::from_millis(1500), libc::SIGINT);
    assert_eq!(code, Some(130), "{stderr}");
    let after_ctrl_c = calls(&ws);
    assert!(after_ctrl_c.len() > after_budget.len(), "no progress before Ctrl-C:\n{stderr}");
    assert_eq!(duplicates(&after_ctrl_c), 0, "Ctrl-C journals what is in flight");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(port_is_free(ws.port), "the teacher server outlived Ctrl-C");

    let (code, _) = interrupt(&ws, &slow, std::time::Duration::from_millis(1200), libc::SIGKILL);
    assert_eq!(code, Some(128 + libc::SIGKILL));
    // The launched server notices its launcher is gone (it polls every 0.5 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !port_is_free(ws.port) {
        assert!(std::time::Instant::now() < deadline, "the teacher server outlived kill -9 of tangle");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let after_kill = calls(&ws);

    let last = run(&ws);
    assert_eq!(last.status.code(), Some(0), "{}", text(&last.stderr));
    let all = calls(&ws);
    let in_flight_at_kill = duplicates(&all);
    eprintln!(
        "teacher calls: {} for 96 prompts; re-sent after kill -9: {in_flight_at_kill} (labeled before the kill: {})",
        all.len(),
        after_kill.len()
    );
    assert!(in_flight_at_kill <= 8, "more re-sent calls than the concurrency: {in_flight_at_kill}");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 96);

    // The ledger saw every call; the usage report shows both stages and no secret.
    let usage = tangle().current_dir(&ws.dir).args(["usage", "--json"]).output().unwrap();
    assert!(usage.status.success(), "{}", text(&usage.stderr));
    common::assert_no_secret(&usage);
    let doc: Value = serde_json::from_slice(&usage.stdout).unwrap();
    let by_stage = doc["by_stage"].as_array().unwrap();
    let stage_names: HashSet<&str> = by_stage.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(stage_names, HashSet::from(["label-train", "label-eval"]));
    let ok_calls: u64 =
        by_stage.iter().map(|r| r["calls"].as_u64().unwrap() - r["failed_calls"].as_u64().unwrap()).sum();
    assert!(ok_calls >= 96, "{doc:#}");
    let table = tangle().current_dir(&ws.dir).args(["usage", "--by", "target"]).output().unwrap();
    assert!(text(&table.stdout).contains("total"), "{}", text(&table.stdout));

    // The key reached the teacher but no file tangle wrote.
    for file in walk(&ws.dir) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(common::TEST_SECRET),
            "the API key leaked into {}",
            file.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_symlink() {
            continue;
        }
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn latest(ws: &Workspace) -> PathBuf {
    std::fs::canonicalize(ws.dir.join("runs/support-tiny/latest")).unwrap()
}

fn calls(ws: &Workspace) -> Vec<String> {
    std::fs::read_to_string(ws.dir.join("calls.log")).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn label_train_eval_gate_deploy_then_all_cached_then_serve() {
    let ws = workspace(96);
    let first = run(&ws);
    let stderr = text(&first.stderr);
    assert_eq!(first.status.code(), Some(0), "first run failed:\n{stderr}");

    let run_dir = latest(&ws);
    let record = read_json(&run_dir.join("run.json"));
    let stages: Vec<&Value> = record["stages"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    for expected in ["dataset", "split", "label-train", "label-eval", "train", "eval-teacher", "eval-student", "gate"] {
        assert!(names.contains(&expected), "missing stage {expected} in {names:?}");
    }
    assert!(stages.iter().all(|s| s["state"] == "done"), "{stages:#?}");

    // Each distinct prompt reached the teacher exactly once.
    let prompts = calls(&ws);
    let distinct: HashSet<&String> = prompts.iter().collect();
    assert_eq!(prompts.len(), distinct.len(), "a prompt was labeled twice");
    let labeled: u64 =
        stages.iter().filter(|s| s["kind"] == "label").map(|s| s["summary"]["labeled_now"].as_u64().unwrap()).sum();
    assert_eq!(prompts.len() as u64, labeled);

    // Training really descended.
    let train = stages.iter().find(|s| s["name"] == "train").unwrap();
    let (first_loss, final_loss) =
        (train["summary"]["first_loss"].as_f64().unwrap(), train["summary"]["final_loss"].as_f64().unwrap());
    assert!(final_loss < 0.5 * first_loss, "loss {first_loss} → {final_loss}");

    // The report's figures are recomputed here from its own per-example outputs.
    let report = read_json(&run_dir.join("eval-student/report.json"));
    let examples = report["examples"].as_array().unwrap();
    assert!(!examples.is_empty());
    let matches = |who: &str| {
        examples
            .iter()
            .filter(|e| {
                let out = e["outputs"][who].as_str().unwrap_or("").trim().to_lowercase();
                out == e["reference"].as_str().unwrap().trim().to_lowercase()
            })
            .count() as f64
            / examples.len() as f64
    };
    let student_em = report["subjects"]["student"]["metrics"]["exact_match"]["value"].as_f64().unwrap();
    assert!((student_em - matches("student")).abs() < 1e-9);
    let teacher_em = report["subjects"]["teacher"]["metrics"]["exact_match"]["value"].as_f64().unwrap();
    assert_eq!(teacher_em, 1.0, "the mock teacher answers with the references");
    assert!(student_em > 0.125, "the student should beat chance (1/8): {student_em}");

    // The decision quotes those numbers.
    let decision = read_json(&run_dir.join("gate/decision.json"));
    assert_eq!(decision["promote"], true, "{decision:#}");
    let clauses = decision["clauses"].as_array().unwrap();
    let first_clause = &clauses[0];
    assert!((first_clause["lhs"].as_f64().unwrap() - student_em).abs() < 1e-9, "{first_clause:#}");

    // The deployed artifact is readable by a server running as another user (mode 0666
    // less the umask, as `File::create` gives), not a temp file's 0600.
    let expected_mode = 0o666 & !tangle::fsutil::process_umask();
    let artifact_files = walk(&run_dir.join("package"));
    assert!(artifact_files.iter().any(|f| f.ends_with("model.safetensors")), "{artifact_files:?}");
    for file in &artifact_files {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, expected_mode, "{} has mode {mode:o}", file.display());
    }

    // Unchanged re-run: every stage from cache, the teacher never started, fast.
    let started = std::time::Instant::now();
    let second = run(&ws);
    let elapsed = started.elapsed();
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    let record = read_json(&latest(&ws).join("run.json"));
    for stage in record["stages"].as_array().unwrap() {
        assert_eq!(stage["state"], "cached", "{stage:#}");
    }
    assert_eq!(calls(&ws).len(), prompts.len(), "the re-run called the teacher");
    assert!(elapsed.as_secs_f64() < 2.0, "cached re-run took {elapsed:?}");

    serve_deployed(&ws, &report);
}

/// `tangle serve production` answers what the eval stage generated, in both modes.
fn serve_deployed(ws: &Workspace, report: &Value) {
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tangle"))
        .current_dir(&ws.dir)
        .args(["serve", "production", "--port", &port.to_string(), "--device", "cpu"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(child);
    let base = format!("http://127.0.0.1:{port}/v1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while client.get(format!("{base}/models")).send().await.is_err() {
            assert!(std::time::Instant::now() < deadline, "serve did not come up");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        for example in report["examples"].as_array().unwrap().iter().take(3) {
            let body = serde_json::json!({
                "model": "production",
                "messages": [{ "role": "user", "content": example["prompt"] }],
                "max_tokens": 16,
                "temperature": 0,
            });
            let response: Value =
                client.post(format!("{base}/chat/completions")).json(&body).send().await.unwrap().json().await.unwrap();
            let served = response["choices"][0]["message"]["content"].as_str().unwrap().trim().to_string();
            assert_eq!(served, example["outputs"]["student"].as_str().unwrap(), "{response:#}");

            let mut streamed_body = body.clone();
            streamed_body["stream"] = true.into();
            let sse = client.post(format!("{base}/chat/completions")).json(&streamed_body).send().await.unwrap();
            let sse = sse.text().await.unwrap();
            let mut streamed = String::new();
            for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if line == "[DONE]" {
                    break;
                }
                let chunk: Value = serde_json::from_str(line).unwrap();
                if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                    streamed.push_str(piece);
                }
            }
            assert_eq!(streamed.trim(), served);
        }
    });
}
