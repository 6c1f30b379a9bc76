//! The integration tests, as one binary: each file of this directory is a module, so the
//! candle- and llama.cpp-heavy library is linked once instead of once per file (on two
//! cores, linking 24 test binaries took longer than running them).
//!
//! `tests/student_loading.rs` stays a binary of its own: it sets `HF_HOME`, and the
//! process environment must not change under the other tests' feet.
//!
//! Data the tests read stays beside this directory: `tests/specs/` (valid and invalid
//! specs), `tests/e2e/` (the CI-size quickstart), `tests/proxy/` (proxy configs, Python
//! clients, the proxy's snapshots), `tests/vectors/` (metric reference values); the other
//! insta snapshots are in `snapshots/` here.

// Shared helpers: `common` runs the real binary, `teacher_common` builds mock-backed
// targets and routers, `proxy_common` serves a proxy in-process.
mod common;
mod proxy_common;
mod teacher_common;

mod cli_diff;
mod cli_graph;
mod cli_run;
mod cli_validate;
mod crash_resume;
mod e2e_pipeline;
mod engine;
mod fuzz_spec;
mod gate_stage;
mod gguf;
mod labeling;
mod metric_vectors;
mod providers;
mod proxy_breakers;
mod proxy_cli;
mod proxy_failover;
mod proxy_load;
mod registry;
mod router_faults;
mod runner;
mod serve;
mod spec_reference;
mod student_gradients;
mod student_parity;
mod student_training;
