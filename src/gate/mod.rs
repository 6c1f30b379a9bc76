//! The gate: promote or reject a candidate from measured metrics, clause by clause.

pub mod clause;
