//! `[pipeline]`: state directory, checkpoints, channels and batches.

use std::path::PathBuf;

use serde::Deserialize;

use crate::time::Duration;

/// `[pipeline]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Where RocksDB keeps state and checkpoints.
    pub state_dir: PathBuf,
    /// How often the source injects a checkpoint barrier.
    pub checkpoint_interval: Duration,
    /// Capacity, in batches, of each channel between stages.
    pub channel_capacity: usize,
    /// Most records a source hands over in one batch.
    pub batch_size: usize,
    /// How often a progress line is printed on a terminal (0 turns it off).
    pub progress_interval: Duration,
    /// Most (window spec, key) states the engine keeps in memory; colder ones
    /// are read back from RocksDB when needed.
    pub state_cache_entries: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            state_dir: PathBuf::from("./state"),
            checkpoint_interval: Duration::from_millis(5_000),
            channel_capacity: 16,
            batch_size: 256,
            progress_interval: Duration::from_millis(5_000),
            state_cache_entries: 1_000_000,
        }
    }
}

impl PipelineConfig {
    /// The first inconsistency in these settings, if any.
    pub(super) fn problem(&self) -> Option<String> {
        if self.checkpoint_interval.millis() <= 0 {
            return Some("[pipeline] checkpoint_interval must be greater than 0".into());
        }
        if self.state_cache_entries == 0 {
            return Some("[pipeline] state_cache_entries must be at least 1".into());
        }
        if self.channel_capacity == 0 || self.batch_size == 0 {
            return Some("[pipeline] channel_capacity and batch_size must be at least 1".into());
        }
        None
    }
}
