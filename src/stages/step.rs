//! `steps:` — a shell command as a stage.
//!
//! The command runs with `sh -c` in the spec's directory, in its own process group so that
//! Ctrl-C stops everything it started. Its outputs are what it writes under `$TANGLE_OUT`;
//! stdout and stderr go to `<run dir>/logs/<step>.log`.

use super::{stage_config, FingerprintContext, StageContext, StageError, StageExecutor, StageOutcome};
use crate::fsutil;
use crate::graph::Stage;
use crate::spec::resolve_against;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Deserialize)]
struct StepConfig {
    run: String,
    env: BTreeMap<String, String>,
    inputs: Vec<String>,
}

pub struct ShellStep;

/// How long a step gets to exit after SIGTERM before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// `needs: [label-train]` → `TANGLE_INPUT_LABEL_TRAIN`.
pub fn input_variable(stage: &str) -> String {
    let name: String =
        stage.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("TANGLE_INPUT_{name}")
}

impl StageExecutor for ShellStep {
    fn logic_version(&self) -> u32 {
        1
    }

    fn fingerprint(&self, stage: &Stage, ctx: &FingerprintContext) -> Result<Value, StageError> {
        let c: StepConfig = stage_config(stage)?;
        let mut hashes = BTreeMap::new();
        for input in &c.inputs {
            let path = resolve_against(ctx.spec_dir, input);
            let files = if path.is_dir() {
                fsutil::list_files(&path)
                    .map_err(|e| StageError::io(format!("cannot list {}", path.display()), e))?
                    .into_iter()
                    .map(|rel| path.join(rel))
                    .collect()
            } else {
                vec![path.clone()]
            };
            for file in files {
                let hash = fsutil::sha256_file(&file)
                    .map_err(|e| StageError::io(format!("cannot read step input {}", file.display()), e))?;
                hashes.insert(file.to_string_lossy().into_owned(), hash);
            }
        }
        Ok(json!({ "inputs": hashes }))
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: StepConfig = stage_config(stage)?;
        let log_dir = ctx.run_dir.join("logs");
        std::fs::create_dir_all(&log_dir).map_err(|e| StageError::io("cannot create the log directory", e))?;
        let log_path = log_dir.join(format!("{}.log", stage.name));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| StageError::io(format!("cannot create {}", log_path.display()), e))?;
        let log_err = log.try_clone().map_err(|e| StageError::io("cannot open the log", e))?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&c.run)
            .current_dir(&ctx.spec_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .env("TANGLE_OUT", &ctx.out_dir)
            .env("TANGLE_WORK", &ctx.work_dir)
            .env("TANGLE_RUN_DIR", &ctx.run_dir)
            .env("TANGLE_RUN_ID", &ctx.run_id)
            .env("TANGLE_STAGE", &stage.name)
            .envs(&c.env)
            .process_group(0);
        for input in &ctx.inputs {
            command.env(input_variable(&input.stage), &input.dir);
        }
        let started = Instant::now();
        let mut child = command.spawn().map_err(|e| StageError::io(format!("cannot start `sh -c {}`", c.run), e))?;
        ctx.progress.set_message(format!("running `{}`", one_line(&c.run)));
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(StageError::io("cannot wait for the step", e)),
            }
            if ctx.cancel.is_cancelled() {
                terminate_group(child.id());
                let deadline = Instant::now() + TERMINATE_GRACE;
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return Err(StageError::Cancelled);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                kill_group(child.id());
                let _ = child.wait();
                return Err(StageError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        if !status.success() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            let how = match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => "was killed by a signal".to_string(),
            };
            return Err(StageError::Failed(format!(
                "step `{}` {how} (log: {}){}",
                stage.name,
                log_path.display(),
                if tail.is_empty() { String::new() } else { format!("\n  | {}", tail.join("\n  | ")) }
            )));
        }
        let files = fsutil::list_files(&ctx.out_dir).map(|f| f.len()).unwrap_or(0);
        Ok(StageOutcome {
            summary: json!({ "files": files, "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0 }),
            halt: None,
        })
    }
}

fn one_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or_default();
    let mut short: String = first.chars().take(60).collect();
    if short.len() < s.len() {
        short.push('…');
    }
    short
}

fn terminate_group(pid: u32) {
    signal_group(pid, libc::SIGTERM);
}

fn kill_group(pid: u32) {
    signal_group(pid, libc::SIGKILL);
}

fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: killpg only sends a signal; the group is the one we created for the child.
        unsafe {
            libc::killpg(pid, signal);
        }
    }
}
