//! `tangle run` end to end with the real binary: exit codes, caching across processes,
//! resuming after SIGKILL and Ctrl-C.

mod common;

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
