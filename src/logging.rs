//! Where `tracing` events go: stderr, at `warn` and above unless `RUST_LOG` says otherwise.
//!
//! The stdout/stderr rule: stdout carries only the documents a command exists to print
//! (reports, JSON, graphs), so it can be piped; everything about the process itself —
//! progress, warnings, logs — goes to stderr. Installing the subscriber is the binary's
//! job (`cli::main`), never the library's, so tests and embedders choose their own.

use tracing_subscriber::EnvFilter;

/// Filter used when `RUST_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "warn";

/// Installs the process-wide subscriber. A malformed `RUST_LOG` is reported on stderr and
/// replaced by the default rather than silencing warnings.
pub fn install() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => EnvFilter::try_new(&value).unwrap_or_else(|e| {
            eprintln!("warning: RUST_LOG={value:?} is not a valid filter ({e}); using `{DEFAULT_FILTER}`");
            EnvFilter::new(DEFAULT_FILTER)
        }),
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    // A second install (only possible from a test calling `cli::main` twice) keeps the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}
