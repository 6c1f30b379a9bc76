//! Progress display: live bars on a terminal, plain timestamped lines in CI logs.
//!
//! Everything goes to stderr; stdout is reserved for `--json` documents.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// indicatif bars (a terminal).
    Bars,
    /// One line per event (CI logs, pipes).
    Lines,
    /// Nothing but warnings.
    Quiet,
}

impl ProgressMode {
    /// Bars on an interactive terminal, lines otherwise (and always in CI).
    pub fn detect() -> ProgressMode {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
        if std::io::stderr().is_terminal() && !ci {
            ProgressMode::Bars
        } else {
            ProgressMode::Lines
        }
    }
}

/// The run-wide display. Cheap to clone.
#[derive(Clone)]
pub struct Progress {
    mode: ProgressMode,
    multi: MultiProgress,
    started: Instant,
    // Serialises plain-line output from concurrent stages.
    lines: Arc<Mutex<()>>,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Progress {
        let target = match mode {
            ProgressMode::Bars => ProgressDrawTarget::stderr_with_hz(10),
            _ => ProgressDrawTarget::hidden(),
        };
        Progress {
            mode,
            multi: MultiProgress::with_draw_target(target),
            started: Instant::now(),
            lines: Arc::new(Mutex::new(())),
        }
    }

    /// A line above the bars (or a plain line), always shown unless quiet.
    pub fn println(&self, message: &str) {
        match self.mode {
            ProgressMode::Bars => {
                let _ = self.multi.println(message);
            }
            ProgressMode::Lines => self.line(message),
            ProgressMode::Quiet => {}
        }
    }

    /// A warning: shown in every mode.
    pub fn warn(&self, message: &str) {
        match self.mode {
            ProgressMode::Bars => {
                let _ = self.multi.println(format!("warning: {message}"));
            }
            _ => self.line(&format!("warning: {message}")),
        }
    }

    fn line(&self, message: &str) {
        let _guard = self.lines.lock();
        let elapsed = self.started.elapsed().as_secs_f64();
        let _ = writeln!(std::io::stderr(), "[{elapsed:7.1}s] {message}");
    }

    /// A handle for one stage's progress.
    pub fn stage(&self, name: &str) -> StageProgress {
        let bar = match self.mode {
            ProgressMode::Bars => {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(spinner_style());
                bar.set_prefix(name.to_string());
                bar.enable_steady_tick(Duration::from_millis(120));
                Some(bar)
            }
            _ => None,
        };
        StageProgress { name: name.to_string(), bar, display: self.clone(), last_line: Arc::new(Mutex::new(None)) }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner:.cyan} {prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {per_sec} eta {eta} {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// One stage's progress: a bar on a terminal, throttled lines otherwise.
#[derive(Clone)]
pub struct StageProgress {
    name: String,
    bar: Option<ProgressBar>,
    display: Progress,
    last_line: Arc<Mutex<Option<Instant>>>,
}

impl StageProgress {
    /// A handle that shows nothing (tests, nested work).
    pub fn hidden(name: &str) -> StageProgress {
        Progress::new(ProgressMode::Quiet).stage(name)
    }

    pub fn set_length(&self, len: u64) {
        if let Some(bar) = &self.bar {
            bar.set_style(bar_style());
            bar.set_length(len);
        }
    }

    pub fn set_position(&self, pos: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// The live detail (loss, req/s, cost…). In line mode, printed at most every 5 s.
    pub fn set_message(&self, message: impl Into<String>) {
        let message = message.into();
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None if self.display.mode == ProgressMode::Lines => {
                let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    *last = Some(Instant::now());
                    self.display.line(&format!("  {}: {message}", self.name));
                }
            }
            None => {}
        }
    }

    pub fn println(&self, message: &str) {
        self.display.println(message);
    }

    pub fn warn(&self, message: &str) {
        self.display.warn(&format!("{}: {message}", self.name));
    }

    /// Removes the bar and prints the stage's final line.
    pub fn finish(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            self.display.multi.remove(bar);
        }
        self.display.println(line);
    }
}
