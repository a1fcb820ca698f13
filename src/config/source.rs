//! `[source]`: where records come from (file, generator, kinesis; the S3
//! archive's keys are in `s3.rs`).

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::s3::S3SourceConfig;
use crate::time::{Duration, Millis, TomlTime};

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// NDJSON files, one partition per file.
    File(FileSourceConfig),
    /// Synthetic events, deterministic for a seed.
    Generator(GeneratorConfig),
    /// A Kinesis data stream, read with enhanced fan-out (SubscribeToShard).
    Kinesis(KinesisSourceConfig),
    /// Archived records in S3 (shardflow's own archive or Firehose's), read
    /// by `shardflow replay`.
    S3(S3SourceConfig),
}

impl SourceConfig {
    pub fn type_name(&self) -> &'static str {
        match self {
            SourceConfig::File(_) => "file",
            SourceConfig::Generator(_) => "generator",
            SourceConfig::Kinesis(_) => "kinesis",
            SourceConfig::S3(_) => "s3",
        }
    }

    /// The first inconsistency in these settings, if any.
    pub(super) fn problem(&self) -> Option<String> {
        match self {
            SourceConfig::File(f) => {
                if f.all_paths().is_empty() {
                    return Some(
                        "[source] type = \"file\" needs `path` (one file) or `paths` (several)"
                            .into(),
                    );
                }
                let mut seen = HashSet::new();
                for p in f.all_paths() {
                    if !seen.insert(p.clone()) {
                        return Some(format!("[source] lists the file {} twice", p.display()));
                    }
                }
                None
            }
            SourceConfig::Generator(g) => {
                if !(g.rate >= 0.0 && g.rate.is_finite()) {
                    return Some(format!("[source] rate must be a number of events per second ≥ 0 (0 = unthrottled), got {}", g.rate));
                }
                if g.keys == 0 || g.partitions == 0 {
                    return Some("[source] keys and partitions must be at least 1".into());
                }
                if !(g.skew >= 0.0 && g.skew.is_finite()) {
                    return Some(format!(
                        "[source] skew must be ≥ 0 (0 = uniform), got {}",
                        g.skew
                    ));
                }
                for (name, v) in [
                    ("late_fraction", g.late_fraction),
                    ("bad_fraction", g.bad_fraction),
                ] {
                    if !(0.0..=1.0).contains(&v) {
                        return Some(format!("[source] {name} must be between 0 and 1, got {v}"));
                    }
                }
                None
            }
            SourceConfig::Kinesis(k) => k
                .problem()
                .map(|msg| format!("[source] type = \"kinesis\": {msg}")),
            SourceConfig::S3(c) => c
                .problem()
                .map(|msg| format!("[source] type = \"s3\": {msg}")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// One file, or use `paths` for several (each its own partition).
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Keep reading as the file grows (like `tail -f`); the source never ends.
    #[serde(default)]
    pub follow: bool,
    /// How often a followed file is checked for new lines.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
}

/// Where a shard is read from when the checkpoint has no position for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartingPosition {
    /// Only records written after the subscription starts.
    #[default]
    Latest,
    /// The oldest record still retained.
    TrimHorizon,
    /// The first record written at or after `timestamp`.
    AtTimestamp,
}

/// `[source] type = "kinesis"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisSourceConfig {
    pub stream_name: String,
    /// The enhanced fan-out consumer, found or registered at start.
    #[serde(default = "default_consumer_name")]
    pub consumer_name: String,
    #[serde(default)]
    pub starting_position: StartingPosition,
    /// With `starting_position = "at_timestamp"`: RFC 3339 or epoch milliseconds.
    #[serde(default)]
    pub timestamp: Option<toml::Value>,
    /// Overrides the AWS endpoint (emulators); omit (or leave empty) for AWS.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Overrides the region of the AWS chain.
    #[serde(default)]
    pub region: Option<String>,
    /// A subscription silent this long is cancelled and renewed.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: Duration,
    /// Deregister the consumer when the run stops (off: consumers are reused).
    #[serde(default)]
    pub deregister_on_exit: bool,
    /// How often ListShards is called to find new shards.
    #[serde(default = "default_shard_refresh_interval")]
    pub shard_refresh_interval: Duration,
    /// Events (SubscribeToShard batches) a shard holds ahead of the pipeline.
    #[serde(default = "default_shard_buffer")]
    pub shard_buffer: usize,
}

impl KinesisSourceConfig {
    /// The first inconsistency in these settings, if any.
    pub(super) fn problem(&self) -> Option<String> {
        if self.stream_name.trim().is_empty() {
            return Some("`stream_name` must name a stream".into());
        }
        if self.consumer_name.trim().is_empty() || self.consumer_name.len() > 128 {
            return Some("`consumer_name` must have 1 to 128 characters".into());
        }
        match (self.starting_position, &self.timestamp) {
            (StartingPosition::AtTimestamp, None) => {
                return Some(
                    "starting_position = \"at_timestamp\" needs `timestamp` (RFC 3339 or epoch ms)"
                        .into(),
                )
            }
            (StartingPosition::AtTimestamp, Some(_)) => {
                if let Err(e) = self.timestamp_millis() {
                    return Some(e);
                }
            }
            (_, Some(_)) => {
                return Some(
                    "`timestamp` is only used with starting_position = \"at_timestamp\"".into(),
                )
            }
            _ => {}
        }
        if self.stall_timeout.millis() < 1_000 {
            return Some(format!(
                "stall_timeout must be at least 1s (the service sends an event every few seconds), got {}",
                self.stall_timeout
            ));
        }
        if self.shard_refresh_interval.millis() < 1_000 {
            return Some(format!(
                "shard_refresh_interval must be at least 1s, got {}",
                self.shard_refresh_interval
            ));
        }
        if self.shard_buffer == 0 {
            return Some("shard_buffer must be at least 1".into());
        }
        super::endpoint_problem(self.endpoint_url.as_deref())
    }
}

fn default_consumer_name() -> String {
    "shardflow".into()
}
fn default_stall_timeout() -> Duration {
    Duration::from_millis(30_000)
}
fn default_shard_refresh_interval() -> Duration {
    Duration::from_millis(30_000)
}
fn default_shard_buffer() -> usize {
    4
}

impl KinesisSourceConfig {
    /// `timestamp` as epoch milliseconds (validated at load).
    pub fn timestamp_millis(&self) -> Result<Option<Millis>, String> {
        self.timestamp
            .as_ref()
            .map(|v| crate::time::toml_millis(v, TomlTime::KinesisTimestamp))
            .transpose()
    }
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(200)
}

impl FileSourceConfig {
    pub fn all_paths(&self) -> Vec<PathBuf> {
        self.path.iter().chain(&self.paths).cloned().collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Same seed, same events (given a fixed `start_time`).
    pub seed: u64,
    /// Events per second over all partitions; 0 means as fast as possible.
    pub rate: f64,
    /// Number of distinct keys.
    pub keys: u64,
    /// Zipf exponent of key popularity: 0 is uniform, 1 is a typical hot-key skew.
    pub skew: f64,
    /// Largest amount an event's time lags the generator's clock.
    pub out_of_orderness: Duration,
    /// Number of partitions (each its own watermark).
    pub partitions: u32,
    /// Stop after this many events; without it the generator runs until stopped.
    pub count: Option<u64>,
    /// Event time of the first event (epoch ms); defaults to the wall clock at start.
    pub start_time: Option<Millis>,
    /// Fraction of events that lag far beyond the out-of-orderness bound.
    pub late_fraction: f64,
    /// Fraction of records written malformed, to exercise dead letters.
    pub bad_fraction: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 42,
            rate: 1_000.0,
            keys: 1_000,
            skew: 1.0,
            out_of_orderness: Duration::from_millis(2_000),
            partitions: 2,
            count: None,
            start_time: None,
            late_fraction: 0.0,
            bad_fraction: 0.0,
        }
    }
}
