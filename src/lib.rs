//! tangle: distill a frontier LLM into a small student model, gate it on measured evals,
//! and serve it behind a failover proxy. See ARCHITECTURE.md for the map of this crate.

pub mod artifact;
pub mod budget;
pub mod cli;
pub mod cpu;
pub mod dataset;
pub mod diagnostic;
pub mod eval;
pub mod exit;
pub mod fsutil;
pub mod gate;
pub mod graph;
pub mod label;
pub mod launch;
pub mod ledger;
pub mod mock;
pub mod model;
pub mod providers;
pub mod proxy;
pub mod ratelimit;
pub mod registry;
pub mod report;
pub mod router;
pub mod runner;
pub mod serve;
pub mod spec;
pub mod stages;
mod support;
pub mod timefmt;
pub mod train;
