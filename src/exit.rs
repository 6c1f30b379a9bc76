//! Process exit codes: a contract CI jobs depend on (DESIGN.md).

use crate::runner::record::RunStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success; for `run`, the candidate was promoted (or there was no gate).
    Success = 0,
    /// A runtime error: a stage failed, a file could not be written, a provider refused.
    Runtime = 1,
    /// Invalid spec or command-line usage.
    Usage = 2,
    /// The gate rejected the candidate.
    Rejected = 3,
    /// A circuit breaker or budget stopped work; an operator must confirm to go on.
    Stopped = 4,
    /// Interrupted by Ctrl-C (128 + SIGINT, the shell convention); the next run resumes.
    Interrupted = 130,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn for_run(status: RunStatus) -> Exit {
        match status {
            RunStatus::Succeeded => Exit::Success,
            RunStatus::Failed | RunStatus::Running => Exit::Runtime,
            RunStatus::Rejected => Exit::Rejected,
            RunStatus::Stopped => Exit::Stopped,
            RunStatus::Interrupted => Exit::Interrupted,
        }
    }
}
