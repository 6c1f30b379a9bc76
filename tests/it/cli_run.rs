//! `tangle run` end to end with the real binary: exit codes, caching across processes,
//! resuming after SIGKILL and Ctrl-C.

use crate::common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    /// A temp project with the sample dataset and a spec written from `spec`.
    fn new(spec: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(repo().join("examples/support-intent/sample.jsonl"), dir.path().join("data.jsonl")).unwrap();
        let p = Project { dir };
        p.write_spec(spec);
        p
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write_spec(&self, spec: &str) {
        std::fs::write(self.path("pipeline.yaml"), spec).unwrap();
    }

    fn command(&self) -> Command {
        let mut cmd = tangle();
        cmd.current_dir(self.dir.path()).args(["run", "pipeline.yaml", "--json"]);
        cmd
    }

    fn run(&self) -> (i32, Value, String) {
        let out = self.command().output().unwrap();
        assert_no_secret(&out);
        let doc = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), doc, text(&out.stderr))
    }

    fn spawn(&self) -> Child {
        self.command().stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    }

    fn lines(&self, rel: &str) -> usize {
        std::fs::read_to_string(self.path(rel)).map(|t| t.lines().count()).unwrap_or(0)
    }
}

fn stage<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const PREP: &str = r#"
name: prep
dataset: { path: data.jsonl, eval_fraction: 0.2, seed: 1 }
steps:
  - name: count
    needs: [split]
    run: wc -l < "$TANGLE_INPUT_SPLIT/train.jsonl" > "$TANGLE_OUT/train-lines.txt"
  - name: independent
    run: echo hello > "$TANGLE_OUT/hello.txt"
"#;

#[test]
fn a_run_succeeds_then_replays_entirely_from_cache() {
    let p = Project::new(PREP);
    let (code, doc, stderr) = p.run();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(stage(&doc, "dataset")["summary"]["duplicates"], 1);
    let run_dir = PathBuf::from(doc["run_dir"].as_str().unwrap());
    let train_lines: usize =
        std::fs::read_to_string(run_dir.join("count/train-lines.txt")).unwrap().trim().parse().unwrap();
    assert_eq!(train_lines, stage(&doc, "split")["summary"]["train"].as_u64().unwrap() as usize);

    let (code, doc, _) = p.run();
    assert_eq!(code, 0);
    assert!(doc["stages"].as_array().unwrap().iter().all(|s| s["state"] == "cached"), "{doc:#}");
}

#[test]
fn changing_a_setting_reruns_only_what_depends_on_it() {
    let p = Project::new(PREP);
    assert_eq!(p.run().0, 0);
    p.write_spec(&PREP.replace("eval_fraction: 0.2", "eval_fraction: 0.3"));
    let (code, doc, _) = p.run();
    assert_eq!(code, 0);
    let hit = |name: &str| stage(&doc, name)["cache_hit"].as_bool().unwrap();
    assert!(hit("dataset") && hit("independent"));
    assert!(!hit("split") && !hit("count"));

    // Editing the data file re-runs the dataset stage even though the spec is unchanged.
    let mut data = std::fs::read_to_string(p.path("data.jsonl")).unwrap();
    data.push_str("{\"prompt\": \"Where do I see last month's payouts?\", \"reference\": \"billing\"}\n");
    std::fs::write(p.path("data.jsonl"), data).unwrap();
    let (_, doc, _) = p.run();
    assert!(!stage(&doc, "dataset")["cache_hit"].as_bool().unwrap());
    assert!(stage(&doc, "independent")["cache_hit"].as_bool().unwrap());
}

#[test]
fn exit_codes_for_invalid_specs_and_failing_stages() {
    let p = Project::new("name: broken\ndataset: { path: data.jsonl, eval_fraction: 2 }\n");
    let (code, doc, stderr) = p.run();
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("pipeline.yaml:2:"), "{stderr}");
    assert_eq!(doc["status"], "invalid");
    assert_eq!(doc["validation"]["errors"][0]["line"], 2);

    let p = Project::new(
        "name: failing\ndataset: { path: data.jsonl }\nsteps:\n  - { name: boom, run: 'echo about to fail; exit 3' }\n",
    );
    let (code, doc, stderr) = p.run();
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(doc["status"], "failed");
    assert!(stage(&doc, "boom")["error"].as_str().unwrap().contains("exited with status 3"));
    assert!(stderr.contains("about to fail"), "the step's log tail is shown: {stderr}");

    let p = Project::new("name: bad-data\ndataset: { path: data.jsonl }\n");
    std::fs::write(p.path("data.jsonl"), "{\"prompt\": \"ok\"}\n{\"prompt\": \n").unwrap();
    let (code, doc, _) = p.run();
    assert_eq!(code, 1);
    let error = stage(&doc, "dataset")["error"].as_str().unwrap();
    assert!(error.contains("data.jsonl:2: not valid JSON"), "{error}");
}

/// A spec whose second step blocks until the test removes a file: `first` appends a line to
/// `first.log` each time it really runs.
fn resumable(dir: &Path) -> String {
    format!(
        r#"
name: resumable
dataset: {{ path: data.jsonl }}
steps:
  - name: first
    needs: [split]
    run: echo ran >> {dir}/first.log && echo one > "$TANGLE_OUT/one.txt"
  - name: second
    needs: [first]
    run: |
      while [ -f {dir}/block ]; do sleep 0.05; done
      echo two > "$TANGLE_OUT/two.txt"
"#,
        dir = dir.display()
    )
}

fn record_of(p: &Project) -> Option<Value> {
    let latest = p.path("runs/resumable/latest/run.json");
    let bytes = std::fs::read(latest).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[test]
fn a_sigkilled_run_resumes_without_redoing_completed_stages() {
    let p = Project::new("");
    p.write_spec(&resumable(p.dir.path()));
    std::fs::write(p.path("block"), "").unwrap();
    let mut child = p.spawn();
    wait_for("`second` to start", Duration::from_secs(30), || {
        record_of(&p).is_some_and(|r| stage(&r, "second")["state"] == "running")
    });
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let killed = record_of(&p).unwrap();
    assert_eq!(stage(&killed, "first")["state"], "done");
    assert_eq!(stage(&killed, "second")["state"], "running", "the record shows where it died");
    assert_eq!(p.lines("first.log"), 1);

    std::fs::remove_file(p.path("block")).unwrap();
    let (code, doc, stderr) = p.run();
    assert_eq!(code, 0, "{stderr}");
    for name in ["dataset", "split", "first"] {
        assert_eq!(stage(&doc, name)["state"], "cached", "{name} re-ran after the kill");
    }
    assert_eq!(stage(&doc, "second")["state"], "done");
    assert_eq!(p.lines("first.log"), 1, "`first` ran twice");
    // The killed process's staging directory was swept.
    let leftovers: Vec<_> = std::fs::read_dir(p.path(".tangle/tmp")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "stale staging dirs: {leftovers:?}");
}

#[test]
fn ctrl_c_stops_cleanly_with_130_and_the_next_run_resumes() {
    let p = Project::new("");
    p.write_spec(&resumable(p.dir.path()));
    std::fs::write(p.path("block"), "").unwrap();
    let child = p.command().stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("`second` to start", Duration::from_secs(30), || {
        record_of(&p).is_some_and(|r| stage(&r, "second")["state"] == "running")
    });
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["status"], "interrupted");
    assert_eq!(stage(&doc, "second")["state"], "interrupted");
    assert!(text(&out.stderr).contains("run the same command again to resume"));

    std::fs::remove_file(p.path("block")).unwrap();
    let (code, doc, _) = p.run();
    assert_eq!(code, 0);
    assert_eq!(stage(&doc, "first")["state"], "cached");
    assert_eq!(p.lines("first.log"), 1);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A spec with only a teacher and a dataset: label, look, then train.
fn labeling_only(port: u16, targets: &str) -> String {
    format!(
        r#"
name: label-only
teacher:
  targets:
{targets}
  system: "Answer with the intent only."
  params: {{ temperature: 0, max_tokens: 8, seed: 11 }}
  concurrency: 4
dataset: {{ path: data.jsonl, eval_fraction: 0.25, seed: 3 }}
"#,
    )
    .replace("127.0.0.1:PORT", &format!("127.0.0.1:{port}"))
}

const MOCK_TARGET: &str = r#"    - provider: openai_compatible
      model: mock-teacher
      base_url: "http://127.0.0.1:PORT/v1"
      api_key: "${TANGLE_TEST_OPENAI_KEY}"
      launch:
        command: '"$TANGLE_EXE" mock-teacher --port "$TANGLE_PORT" --calls-log calls.log'
        ready_timeout_s: 30"#;

/// Nothing listens there: a fallback that is never needed.
const DEAD_FALLBACK: &str = r#"    - provider: openai_compatible
      model: backup-teacher
      base_url: "http://127.0.0.1:9/v1"
      api_key: "${TANGLE_TEST_OPENAI_KEY}""#;

#[test]
fn a_labeling_only_spec_labels_both_splits_and_a_change_of_fallbacks_rebuys_nothing() {
    let port = free_port();
    let p = Project::new(&labeling_only(port, MOCK_TARGET));
    let (code, doc, stderr) = p.run();
    assert_eq!(code, 0, "{stderr}");
    let (train, eval) = (stage(&doc, "label-train"), stage(&doc, "label-eval"));
    let labeled = |s: &Value, key: &str| s["summary"][key].as_u64().unwrap();
    let total = labeled(train, "labels") + labeled(eval, "labels");
    assert!(labeled(train, "labels") > 0 && labeled(eval, "labels") > 0, "{doc:#}");
    assert_eq!(labeled(train, "labeled_now") + labeled(eval, "labeled_now"), total);
    assert_eq!(p.lines("calls.log") as u64, total, "each prompt was bought once");

    // A fallback added in front of the teacher that answered: every answer is reused.
    p.write_spec(&labeling_only(port, &format!("{DEAD_FALLBACK}\n{MOCK_TARGET}")));
    let (code, doc, stderr) = p.run();
    assert_eq!(code, 0, "{stderr}");
    for name in ["label-train", "label-eval"] {
        let s = stage(&doc, name);
        assert_eq!(s["state"], "done", "the targets changed, so the stage ran: {s:#}");
        assert_eq!(labeled(s, "labeled_now"), 0, "{s:#}");
        assert_eq!(labeled(s, "from_journal"), labeled(s, "labels"), "{s:#}");
    }
    assert_eq!(p.lines("calls.log") as u64, total, "a change of fallbacks bought labels again");
    let labels = std::fs::read_to_string(p.path("runs/label-only/latest/label-train/labels.jsonl")).unwrap();
    let first: Value = serde_json::from_str(labels.lines().next().unwrap()).unwrap();
    assert_eq!(first["model"], "mock-teacher", "a label names the model that answered: {first}");
}

#[test]
fn a_spec_with_a_byte_order_mark_runs() {
    let p = Project::new(PREP);
    p.write_spec(&format!("\u{feff}{PREP}"));
    let (code, _, stderr) = p.run();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn warnings_reach_stderr_unless_rust_log_silences_them() {
    let port = free_port();
    let p = Project::new(&labeling_only(port, MOCK_TARGET));
    let (code, _, stderr) = p.run();
    assert_eq!(code, 0, "{stderr}");
    // A crash mid-append leaves a torn line; the next run's journal repair warns through
    // `tracing`, which must reach stderr by default.
    let journal = p.path(".tangle/labels/answers/train.jsonl");
    let torn = |p: &Project| {
        let mut f = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
        std::io::Write::write_all(&mut f, b"{\"id\":\"torn").unwrap();
        // A changed concurrency re-runs the label stage (its journal is reopened).
        let spec = std::fs::read_to_string(p.path("pipeline.yaml")).unwrap();
        let concurrency = if spec.contains("concurrency: 4") { "concurrency: 3" } else { "concurrency: 4" };
        p.write_spec(&spec.replace("concurrency: 4", concurrency).replace("concurrency: 3", concurrency));
    };
    torn(&p);
    let (code, _, stderr) = p.run();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("journal had a torn last line"), "{stderr}");
    torn(&p);
    let out = p.command().env("RUST_LOG", "off").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!text(&out.stderr).contains("journal had a torn last line"), "{}", text(&out.stderr));
}
