//! tangle's pure core: what a pipeline *is* and how its results are judged, with no I/O
//! beyond reading a spec and a dataset from disk.
//!
//! Invariant (checked in CI with `cargo tree -p tangle-core`): nothing here depends on an
//! async runtime, an HTTP stack or a tensor library — no tokio, reqwest, axum or candle.
//! Everything is plain data and pure functions, testable without a runtime or a model:
//! - [`spec`]: parse, interpolate, type-check and validate a pipeline YAML file;
//! - [`diagnostic`]: the `file:line:col` errors with hints that every check produces;
//! - [`graph`]: compile a validated spec into the DAG of stages the runner executes;
//! - [`dataset`]: read JSONL/CSV examples and split them reproducibly;
//! - [`eval`]: metrics, their aggregation and bootstrap confidence intervals;
//! - [`gate`]: parse and decide the promotion clauses;
//! - [`report`]: the eval report's types and `tangle diff`;
//! - [`secret`]: API keys that never print;
//! - [`target`]: the provider vocabulary the spec and the proxy's config share.

pub mod dataset;
pub mod diagnostic;
pub mod eval;
pub mod gate;
pub mod graph;
pub mod report;
pub mod secret;
pub mod spec;
pub mod target;
