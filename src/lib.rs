//! tangle: distill a frontier LLM into a small student model, gate it on measured evals,
//! and serve it behind a failover proxy. See ARCHITECTURE.md for the map of this crate.

// The pure core (spec, graph, gate, eval metrics, reports, datasets, diagnostics) is its
// own crate, with no async runtime, HTTP or tensor library in its dependency tree; it is
// re-exported here so `tangle::spec` and `crate::spec` name the same modules as before.
pub use tangle_core::{dataset, diagnostic, eval, gate, graph, report, secret, spec};

pub mod artifact;
pub mod budget;
pub mod cancel;
pub mod cli;
pub mod cpu;
pub mod exit;
pub mod fsutil;
pub mod label;
pub mod launch;
pub mod ledger;
pub mod logging;
pub mod mock;
pub mod model;
pub mod providers;
pub mod proxy;
pub mod ratelimit;
pub mod registry;
pub mod router;
pub mod runner;
pub mod serve;
pub mod stages;
mod support;
pub mod timefmt;
pub mod train;
