//! shardflow: Kinesis (or files, or a generator) in, event-time window
//! features and model predictions out, in one process.
//!
//! The binary is a thin CLI over this library; tests, benches and examples
//! use the same modules.

pub mod config;
pub mod engine;
pub mod record;
pub mod state;
