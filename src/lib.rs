//! shardflow: Kinesis (or files, or a generator) in, event-time window
//! features and model predictions out, in one process.
//!
//! The binary is a thin CLI over this library; tests, benches and examples
//! use the same modules.

pub mod archive;
pub mod aws;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod decode;
pub mod engine;
pub mod flow;
pub mod inference;
pub mod online;
pub mod pipeline;
pub mod record;
pub mod replay;
pub mod serve;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod time;
