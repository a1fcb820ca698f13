//! The TOML configuration: schema, `${VAR}` substitution, validation.
//!
//! Everything a run needs is in one file. Parsing is strict
//! (`deny_unknown_fields` everywhere) and every problem is reported with the
//! file, line and column it comes from before anything starts.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::record::{KindSet, OutputKind};
use crate::time::{Duration, Millis, TomlTime};

/// A configuration error, located in its file where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.file.display(), self.message)
            }
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub pipeline: PipelineConfig,
    pub source: Spanned<SourceConfig>,
    pub schema: SchemaConfig,
    #[serde(default)]
    pub watermark: WatermarkConfig,
    #[serde(default)]
    pub features: Vec<FeatureConfig>,
    #[serde(default)]
    pub inference: InferenceConfig,
    #[serde(default)]
    pub sinks: Vec<Spanned<SinkConfig>>,
    /// What `shardflow replay` uses instead of `[source]` and `[[sinks]]`,
    /// so that one file configures both the live run and its replay.
    #[serde(default)]
    pub replay: Option<Spanned<ReplayConfig>>,
}

/// `[replay]`: the archive to replay and where its results go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// The archive (`type = "s3"`); without it `[source]` must be one.
    #[serde(default)]
    pub source: Option<SourceConfig>,
    /// Sinks for the replay; without them the replay writes to `[[sinks]]`.
    #[serde(default)]
    pub sinks: Vec<Spanned<SinkConfig>>,
    /// A field of the input records copied into `--export` rows as the
    /// training label (`null` where a record lacks it).
    #[serde(default)]
    pub label: Option<String>,
}

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
    fn problem(&self) -> Option<String> {
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

/// How archive objects are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// gzip when the object starts with gzip's magic bytes, else plain.
    #[default]
    Auto,
    Gzip,
    None,
}

/// How records are laid out in an archive object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveFormat {
    /// JSON values one after the other, with or without newlines between
    /// them: NDJSON, and Firehose's concatenated JSON.
    #[default]
    Auto,
    /// One record per line; a bad line is a dead letter and the next line
    /// is read.
    Ndjson,
}

/// `[source] type = "s3"` (or `[replay.source]`): an archive in S3.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3SourceConfig {
    pub bucket: String,
    /// Keys start with this (Firehose's convention: usually ends with `/`),
    /// then `YYYY/MM/DD/HH/`.
    #[serde(default)]
    pub prefix: String,
    /// Only events at or after this time (RFC 3339 or epoch ms); `--from`
    /// overrides it.
    #[serde(default)]
    pub from: Option<toml::Value>,
    /// Only events before this time; `--to` overrides it.
    #[serde(default)]
    pub to: Option<toml::Value>,
    /// An hour directory is skipped only when it lies this far outside
    /// `[from, to)`: an object holds records a little older and newer than
    /// its hour.
    #[serde(default = "default_prune_slack")]
    pub prune_slack: Duration,
    #[serde(default)]
    pub compression: Compression,
    #[serde(default)]
    pub format: ArchiveFormat,
    /// Objects fetched at once (decoded in order).
    #[serde(default = "default_s3_concurrency")]
    pub concurrency: usize,
    /// Overrides the endpoint (S3-compatible servers); omit (or leave empty) for AWS.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Overrides the region of the AWS chain.
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default: on with
    /// `endpoint_url`, off for AWS.
    #[serde(default)]
    pub force_path_style: Option<bool>,
    /// Attempts per S3 request (the SDK's standard retry with backoff).
    #[serde(default = "default_s3_attempts")]
    pub max_attempts: u32,
}

/// How the S3 client reaches the service; credentials come from the
/// standard AWS chain. (The same keys in the source and sink tables.)
#[derive(Debug, Clone, Default)]
pub struct S3ClientConfig {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: Option<bool>,
    pub max_attempts: u32,
}

fn default_prune_slack() -> Duration {
    Duration::from_millis(3_600_000)
}
fn default_s3_concurrency() -> usize {
    8
}
fn default_s3_attempts() -> u32 {
    5
}

impl S3ClientConfig {
    fn problem(&self) -> Option<String> {
        if self.max_attempts == 0 || self.max_attempts > 20 {
            return Some(format!(
                "max_attempts must be between 1 and 20, got {}",
                self.max_attempts
            ));
        }
        endpoint_problem(self.endpoint_url.as_deref())
    }
}

/// A bucket name S3 accepts (3-63 lowercase letters, digits, dots, hyphens).
fn bucket_problem(bucket: &str) -> Option<String> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    (!ok).then(|| format!("bucket {bucket:?} is not an S3 bucket name (3-63 lowercase letters, digits, dots and hyphens)"))
}

impl S3SourceConfig {
    fn problem(&self) -> Option<String> {
        if let Some(p) = bucket_problem(&self.bucket) {
            return Some(p);
        }
        if self.prefix.starts_with('/') {
            return Some(format!(
                "prefix {:?} must not start with '/' (keys have no leading slash)",
                self.prefix
            ));
        }
        if !(1..=64).contains(&self.concurrency) {
            return Some(format!(
                "concurrency must be between 1 and 64, got {}",
                self.concurrency
            ));
        }
        let (from, to) = match (self.from_millis(), self.to_millis()) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => return Some(e),
        };
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                return Some("`from` must be before `to`".into());
            }
        }
        self.client().problem()
    }

    pub fn client(&self) -> S3ClientConfig {
        S3ClientConfig {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            max_attempts: self.max_attempts,
        }
    }

    pub fn from_millis(&self) -> Result<Option<Millis>, String> {
        self.from
            .as_ref()
            .map(|v| crate::time::toml_millis(v, TomlTime::Bound))
            .transpose()
    }

    pub fn to_millis(&self) -> Result<Option<Millis>, String> {
        self.to
            .as_ref()
            .map(|v| crate::time::toml_millis(v, TomlTime::Bound))
            .transpose()
    }
}

/// `[[sinks]] type = "s3"`: gzip NDJSON objects under `prefix/YYYY/MM/DD/HH/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3SinkConfig {
    pub bucket: String,
    /// Keys start with this, then `YYYY/MM/DD/HH/` (as Firehose's do).
    #[serde(default)]
    pub prefix: String,
    pub kinds: Vec<OutputKind>,
    /// An object closes once it holds this many (compressed) bytes...
    #[serde(default = "default_s3_max_bytes")]
    pub max_bytes: u64,
    /// ...or at the first checkpoint after it has been open this long.
    #[serde(default = "default_s3_max_age")]
    pub max_age: Duration,
    /// Objects larger than this go up in multipart uploads of parts this big
    /// (S3's minimum part is 5 MiB). Memory per sink is about one part.
    #[serde(default = "default_s3_part_bytes")]
    pub part_bytes: u64,
    /// gzip level, 0 (none) to 9 (smallest).
    #[serde(default = "default_gzip_level")]
    pub gzip_level: u32,
    /// Overrides the endpoint (S3-compatible servers); omit (or leave empty) for AWS.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Overrides the region of the AWS chain.
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default: on with
    /// `endpoint_url`, off for AWS.
    #[serde(default)]
    pub force_path_style: Option<bool>,
    /// Attempts per S3 request (the SDK's standard retry with backoff).
    #[serde(default = "default_s3_attempts")]
    pub max_attempts: u32,
}

fn default_s3_max_bytes() -> u64 {
    128 << 20
}
fn default_s3_max_age() -> Duration {
    Duration::from_millis(300_000)
}
fn default_s3_part_bytes() -> u64 {
    8 << 20
}
fn default_gzip_level() -> u32 {
    6
}

/// S3's smallest part of a multipart upload (except the last).
pub const S3_MIN_PART_BYTES: u64 = 5 << 20;

impl S3SinkConfig {
    fn problem(&self) -> Option<String> {
        if let Some(p) = bucket_problem(&self.bucket) {
            return Some(p);
        }
        if self.prefix.starts_with('/') {
            return Some(format!(
                "prefix {:?} must not start with '/' (keys have no leading slash)",
                self.prefix
            ));
        }
        if self.max_bytes == 0 {
            return Some("max_bytes must be greater than 0".into());
        }
        if self.max_age.millis() <= 0 {
            return Some("max_age must be greater than 0".into());
        }
        if !(S3_MIN_PART_BYTES..=(5 << 30)).contains(&self.part_bytes) {
            return Some(format!(
                "part_bytes must be between 5 MiB and 5 GiB (S3's part sizes), got {}",
                self.part_bytes
            ));
        }
        if self.gzip_level > 9 {
            return Some(format!(
                "gzip_level must be between 0 and 9, got {}",
                self.gzip_level
            ));
        }
        self.client().problem()
    }

    pub fn client(&self) -> S3ClientConfig {
        S3ClientConfig {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            max_attempts: self.max_attempts,
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
    fn problem(&self) -> Option<String> {
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
        endpoint_problem(self.endpoint_url.as_deref())
    }
}

fn endpoint_problem(url: Option<&str>) -> Option<String> {
    match url {
        Some(u) if !u.is_empty() && !u.starts_with("http://") && !u.starts_with("https://") => {
            Some(format!(
                "endpoint_url must start with http:// or https://, got {u:?}"
            ))
        }
        _ => None,
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

/// `[[sinks]] type = "kinesis"`: PutRecords, one output per record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisSinkConfig {
    pub stream_name: String,
    pub kinds: Vec<OutputKind>,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Attempts for the entries of one PutRecords batch before the sink fails.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_max_attempts() -> u32 {
    10
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

/// The type a schema field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    pub ty: FieldType,
    /// Written with a trailing `?` (`"f64?"`): the field may be absent or null.
    pub optional: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    F64,
    I64,
    String,
    Bool,
}

impl FieldType {
    pub fn is_numeric(self) -> bool {
        matches!(self, FieldType::F64 | FieldType::I64)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::F64 => "f64",
            FieldType::I64 => "i64",
            FieldType::String => "string",
            FieldType::Bool => "bool",
        }
    }
}

impl fmt::Display for FieldSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ty.as_str())?;
        if self.optional {
            f.write_str("?")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let (base, optional) = match text.strip_suffix('?') {
            Some(base) => (base, true),
            None => (text.as_str(), false),
        };
        let ty = match base {
            "f64" | "float" | "number" => FieldType::F64,
            "i64" | "int" | "integer" => FieldType::I64,
            "string" | "str" => FieldType::String,
            "bool" | "boolean" => FieldType::Bool,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown field type {text:?}: expected one of f64, i64, string, bool (add `?` for an optional field, e.g. \"f64?\")"
                )))
            }
        };
        Ok(FieldSpec { ty, optional })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// Field holding the entity key (string or integer).
    pub key: String,
    /// Field holding the event time: RFC 3339 string or epoch-millis number.
    pub timestamp: String,
    /// Typed fields, in the order features and outputs see them.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    /// Larger records go to dead letters unread.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Event times outside `[min_event_time, max_event_time]` are dead letters
    /// (default: years 2000 to 2200).
    #[serde(default = "default_min_event_time")]
    pub min_event_time: Millis,
    #[serde(default = "default_max_event_time")]
    pub max_event_time: Millis,
}

fn default_max_record_bytes() -> usize {
    1 << 20
}
fn default_min_event_time() -> Millis {
    946_684_800_000 // 2000-01-01T00:00:00Z
}
fn default_max_event_time() -> Millis {
    7_258_118_400_000 // 2200-01-01T00:00:00Z
}

impl SchemaConfig {
    /// Index of a field in the event's field vector.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.keys().position(|k| k == name)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatermarkConfig {
    /// How far behind the newest event time an event may arrive and still be on time.
    pub max_out_of_orderness: Duration,
    /// A partition silent this long stops holding the watermark back.
    pub idle_timeout: Duration,
    /// How long after firing a window still accepts (and re-fires on) late events.
    pub allowed_lateness: Duration,
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        WatermarkConfig {
            max_out_of_orderness: Duration::from_millis(5_000),
            idle_timeout: Duration::from_millis(30_000),
            allowed_lateness: Duration::from_millis(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggKind {
    Count,
    Sum,
    Min,
    Max,
    Mean,
    First,
    Last,
    Stddev,
    DistinctCount,
}

impl AggKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AggKind::Count => "count",
            AggKind::Sum => "sum",
            AggKind::Min => "min",
            AggKind::Max => "max",
            AggKind::Mean => "mean",
            AggKind::First => "first",
            AggKind::Last => "last",
            AggKind::Stddev => "stddev",
            AggKind::DistinctCount => "distinct_count",
        }
    }
    /// Whether the aggregate reads a numeric field.
    pub fn needs_numeric_field(self) -> bool {
        !matches!(self, AggKind::Count | AggKind::DistinctCount)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowType {
    Tumbling,
    Sliding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    #[serde(rename = "type")]
    pub kind: WindowType,
    pub size: Duration,
    #[serde(default)]
    pub slide: Option<Duration>,
}

impl WindowSpec {
    /// The slice length: the slide of a sliding window, the size of a tumbling one.
    pub fn slide_millis(&self) -> Millis {
        match self.kind {
            WindowType::Tumbling => self.size.millis(),
            WindowType::Sliding => self.slide.unwrap_or(self.size).millis(),
        }
    }
    pub fn size_millis(&self) -> Millis {
        self.size.millis()
    }
}

impl fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.slide) {
            (WindowType::Sliding, Some(slide)) => {
                write!(f, "sliding {} every {}", self.size, slide)
            }
            _ => write!(f, "tumbling {}", self.size),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    pub name: Spanned<String>,
    pub agg: AggKind,
    /// The schema field aggregated; not used by `count`.
    #[serde(default)]
    pub field: Option<Spanned<String>>,
    pub window: Spanned<WindowSpec>,
    /// `distinct_count` only: most distinct values kept per window slice;
    /// exceeding it is an error, never a silent truncation.
    #[serde(default)]
    pub max_distinct: Option<usize>,
}

pub const DEFAULT_MAX_DISTINCT: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// A model in this process, from `model`.
    Embedded,
    /// A SageMaker real-time endpoint, called with `InvokeEndpoint`.
    Sagemaker,
    /// No model: the features output is the final per-event output.
    #[default]
    None,
}

/// How rows travel to a SageMaker endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum ContentType {
    /// `{"instances": [[…], …]}` (or `{"inputs": …}`, see `json_key`); a null
    /// feature is JSON `null`.
    #[default]
    #[serde(rename = "application/json")]
    Json,
    /// One CSV line per row, features in config order; a null feature is an
    /// empty field.
    #[serde(rename = "text/csv")]
    Csv,
}

impl ContentType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Csv => "text/csv",
        }
    }
}

/// The top-level key of a JSON request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JsonKey {
    /// `{"instances": [[…]]}` (TensorFlow Serving, SageMaker built-ins).
    #[default]
    Instances,
    /// `{"inputs": [[…]]}` (Hugging Face and TF Serving's columnar form).
    Inputs,
}

impl JsonKey {
    pub fn as_str(self) -> &'static str {
        match self {
            JsonKey::Instances => "instances",
            JsonKey::Inputs => "inputs",
        }
    }
}

/// What answers when the primary model fails for good (after retries, or
/// while the circuit breaker is open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKind {
    /// The batch's records become dead letters carrying the error.
    #[default]
    DeadLetter,
    /// `{"score": fallback_score}` for every record.
    Constant,
    /// The embedded model in `fallback_model`.
    Embedded,
}

/// A second endpoint or variant scored on the same batches, off the primary's
/// latency path; its answers are `kind = "shadow"` records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Defaults to the primary's endpoint (then `target_variant` must differ).
    #[serde(default)]
    pub endpoint_name: Option<String>,
    #[serde(default)]
    pub target_variant: Option<String>,
    /// Shadow batches outstanding at once; a batch that finds none free is
    /// skipped (and counted) rather than delaying the primary.
    #[serde(default = "default_shadow_in_flight")]
    pub max_in_flight: usize,
}

fn default_shadow_in_flight() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    pub backend: Backend,
    /// The embedded model's file (TOML or JSON), see `config/models/`.
    pub model: Option<PathBuf>,
    /// A batch closes at this many records...
    pub max_batch: usize,
    /// ...or when its oldest record has waited this long.
    pub max_wait: Duration,
    /// Batches being scored at once.
    pub max_in_flight: usize,

    // SageMaker.
    /// The endpoint `InvokeEndpoint` calls.
    pub endpoint_name: Option<String>,
    /// Send every request to this production variant.
    pub target_variant: Option<String>,
    /// AWS region; defaults to the standard chain (AWS_REGION, profile, IMDS).
    pub region: Option<String>,
    /// Another runtime endpoint, e.g. `http://127.0.0.1:8080` for `serve-model`.
    pub endpoint_url: Option<String>,
    pub content_type: ContentType,
    pub json_key: JsonKey,
    /// Names given to the columns of a CSV answer (a JSON answer names its own).
    pub csv_output_columns: Vec<String>,

    // Resilience (every backend).
    /// One model call may take this long before it counts as a timeout.
    pub request_timeout: Duration,
    /// Retries after the first attempt, for throttling, 5xx, timeouts and
    /// connection errors; never for 4xx model errors.
    pub max_retries: u32,
    /// Backoff before retry n is `retry_base · 2^(n-1)`, jittered to ±50 %.
    pub retry_base: Duration,
    /// The breaker opens when at least this fraction of calls in `breaker_window` failed...
    pub breaker_error_rate: f64,
    /// ...over this window of processing time...
    pub breaker_window: Duration,
    /// ...and the window holds at least this many calls.
    pub breaker_min_requests: u32,
    /// An open breaker lets one probe through after this long (half-open).
    pub breaker_cooldown: Duration,
    pub fallback: FallbackKind,
    /// `fallback = "constant"`: the score every fallback prediction carries.
    pub fallback_score: Option<f64>,
    /// `fallback = "embedded"`: the model file.
    pub fallback_model: Option<PathBuf>,
    pub shadow: Option<ShadowConfig>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            backend: Backend::None,
            model: None,
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            max_in_flight: 4,
            endpoint_name: None,
            target_variant: None,
            region: None,
            endpoint_url: None,
            content_type: ContentType::Json,
            json_key: JsonKey::Instances,
            csv_output_columns: vec!["score".into()],
            request_timeout: Duration::from_millis(5_000),
            max_retries: 3,
            retry_base: Duration::from_millis(1_000),
            breaker_error_rate: 0.5,
            breaker_window: Duration::from_millis(60_000),
            breaker_min_requests: 20,
            breaker_cooldown: Duration::from_millis(30_000),
            fallback: FallbackKind::DeadLetter,
            fallback_score: None,
            fallback_model: None,
            shadow: None,
        }
    }
}

impl InferenceConfig {
    /// The semantic checks of `[inference]`.
    fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 || self.max_in_flight == 0 {
            return Err("[inference] max_batch and max_in_flight must be at least 1".into());
        }
        let sagemaker_only = [
            ("endpoint_name", self.endpoint_name.is_some()),
            ("target_variant", self.target_variant.is_some()),
            ("region", self.region.is_some()),
            ("endpoint_url", self.endpoint_url.is_some()),
            ("shadow", self.shadow.is_some()),
        ];
        match self.backend {
            Backend::Embedded if self.model.is_none() => {
                return Err("[inference] backend = \"embedded\" needs `model`, the path of a model file (see config/models/)".into());
            }
            Backend::None if self.model.is_some() => {
                return Err("[inference] `model` is set but backend = \"none\"; set backend = \"embedded\" to use it".into());
            }
            Backend::Sagemaker if self.model.is_some() => {
                return Err("[inference] `model` is the embedded model's file; with backend = \"sagemaker\" use `endpoint_name` (and `fallback_model` for an embedded fallback)".into());
            }
            Backend::Sagemaker => {
                match &self.endpoint_name {
                    None => {
                        return Err(
                            "[inference] backend = \"sagemaker\" needs `endpoint_name`".into()
                        )
                    }
                    Some(name) => check_endpoint_name("endpoint_name", name)?,
                }
                if let Some(url) = &self.endpoint_url {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(format!(
                            "[inference] endpoint_url {url:?} must start with http:// or https://"
                        ));
                    }
                }
                if self.region.as_deref() == Some("") {
                    return Err(
                        "[inference] region must not be empty; omit it to use the AWS chain".into(),
                    );
                }
                if self.csv_output_columns.is_empty()
                    || self.csv_output_columns.iter().any(String::is_empty)
                {
                    return Err(
                        "[inference] csv_output_columns must name at least one column, none empty"
                            .into(),
                    );
                }
                if let Some(shadow) = &self.shadow {
                    if let Some(name) = &shadow.endpoint_name {
                        check_endpoint_name("shadow.endpoint_name", name)?;
                    }
                    if shadow.max_in_flight == 0 {
                        return Err("[inference] shadow.max_in_flight must be at least 1".into());
                    }
                    let same_endpoint = shadow.endpoint_name.is_none()
                        || shadow.endpoint_name == self.endpoint_name;
                    if same_endpoint && shadow.target_variant == self.target_variant {
                        return Err("[inference] shadow must name another endpoint_name or target_variant than the primary".into());
                    }
                }
            }
            _ => {}
        }
        if self.backend != Backend::Sagemaker {
            if let Some((key, _)) = sagemaker_only.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "[inference] `{key}` only applies to backend = \"sagemaker\""
                ));
            }
        }
        if self.request_timeout.millis() <= 0 {
            return Err("[inference] request_timeout must be greater than 0".into());
        }
        if self.max_retries > 10 {
            return Err(format!(
                "[inference] max_retries is {}; at most 10 (backoff doubles each time)",
                self.max_retries
            ));
        }
        if !(self.breaker_error_rate > 0.0 && self.breaker_error_rate <= 1.0) {
            return Err(format!(
                "[inference] breaker_error_rate must be in (0, 1], got {}",
                self.breaker_error_rate
            ));
        }
        if self.breaker_window.millis() <= 0 || self.breaker_cooldown.millis() <= 0 {
            return Err(
                "[inference] breaker_window and breaker_cooldown must be greater than 0".into(),
            );
        }
        if self.breaker_min_requests == 0 {
            return Err("[inference] breaker_min_requests must be at least 1".into());
        }
        match self.fallback {
            FallbackKind::Constant => match self.fallback_score {
                None => {
                    return Err("[inference] fallback = \"constant\" needs `fallback_score`".into())
                }
                Some(x) if !x.is_finite() => {
                    return Err("[inference] fallback_score must be a finite number".into())
                }
                Some(_) => {}
            },
            FallbackKind::Embedded if self.fallback_model.is_none() => {
                return Err("[inference] fallback = \"embedded\" needs `fallback_model`, the path of a model file".into());
            }
            _ => {}
        }
        if self.fallback != FallbackKind::Constant && self.fallback_score.is_some() {
            return Err(
                "[inference] `fallback_score` only applies to fallback = \"constant\"".into(),
            );
        }
        if self.fallback != FallbackKind::Embedded && self.fallback_model.is_some() {
            return Err(
                "[inference] `fallback_model` only applies to fallback = \"embedded\"".into(),
            );
        }
        Ok(())
    }
}

/// SageMaker endpoint names: 1–63 of `[a-zA-Z0-9-]`, not starting or ending with `-`.
fn check_endpoint_name(key: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("[inference] {key} {name:?} is not a SageMaker endpoint name (1-63 letters, digits and hyphens)"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Stdout(StdoutSinkConfig),
    File(FileSinkConfig),
    Kinesis(KinesisSinkConfig),
    S3(S3SinkConfig),
}

impl SinkConfig {
    pub fn kinds(&self) -> &[OutputKind] {
        match self {
            SinkConfig::Stdout(c) => &c.kinds,
            SinkConfig::File(c) => &c.kinds,
            SinkConfig::Kinesis(c) => &c.kinds,
            SinkConfig::S3(c) => &c.kinds,
        }
    }
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::File(_) => "file",
            SinkConfig::Kinesis(_) => "kinesis",
            SinkConfig::S3(_) => "s3",
        }
    }
    pub fn kind_set(&self) -> KindSet {
        self.kinds().iter().copied().collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    pub kinds: Vec<OutputKind>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    pub path: PathBuf,
    pub kinds: Vec<OutputKind>,
    /// Start a new file (`path.1`, `path.2`, ...) once the current one has this many bytes.
    #[serde(default)]
    pub rotate_bytes: Option<u64>,
}

impl Config {
    /// Reads, substitutes, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            location: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Config::from_str_at(&text, path, |name| std::env::var(name).ok())
    }

    /// Parses config text; `env` resolves the `${VAR}` references in its
    /// string values.
    pub fn from_str_at(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, text: &str, message: String| ConfigError {
            file: path.to_owned(),
            location: span.map(|s| line_col(text, s.start)),
            message,
        };
        // Parse first, then substitute into the parsed strings: a value from
        // the environment is never TOML text, so it cannot change the file's
        // structure. Spans still point into `text`, so every error below is
        // located in the file as written.
        let mut root = DeTable::parse(text).map_err(|e| {
            let mut message = e.message().trim().to_string();
            if let Some(span) = e.span() {
                if env_reference_outside_string(text, span.start) {
                    message.push_str(NOT_A_STRING_HINT);
                }
            }
            err(e.span(), text, message)
        })?;
        let substituted = substitute_env_in(&mut root, text, &env)
            .map_err(|(at, msg)| err(Some(at..at), text, msg))?;
        let config = Config::deserialize(toml::de::Deserializer::from(root)).map_err(|e| {
            let mut message = e.message().trim().to_string();
            let mut span = e.span();
            // `count = "${N}"` reaches serde as a string: say why, and point
            // at the value (an error inside a tagged table such as [source]
            // is located at its header: take the first such value after it).
            // serde writes the string as `{:?}` does.
            let from_env = message
                .strip_prefix("invalid type: string ")
                .and_then(|rest| {
                    substituted
                        .iter()
                        .filter(|(at, value)| {
                            rest.starts_with(&format!("{value:?}"))
                                && span.as_ref().is_none_or(|s| at.start >= s.start)
                        })
                        .min_by_key(|(at, _)| at.start)
                })
                .map(|(at, _)| at.clone());
            if let Some(at) = from_env {
                span = Some(at);
                message.push_str(
                    " (the value comes from the environment, which is substituted only into strings: a number, boolean, array or table cannot come from it)",
                );
            }
            err(span, text, message)
        })?;
        config.validate().map_err(|(span, msg)| {
            // A table-level problem without a span points at its table header.
            let span = span.or_else(|| {
                let table = msg.split_once(']').map(|(t, _)| format!("{t}]"))?;
                table.starts_with('[').then_some(())?;
                let at = text
                    .match_indices(&table)
                    .map(|(i, _)| i)
                    .find(|&i| i == 0 || text[..i].ends_with('\n'))?;
                Some(at..at)
            });
            err(span, text, msg)
        })?;
        Ok(config)
    }

    /// The semantic checks serde cannot express.
    fn validate(&self) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
        let at = |span: std::ops::Range<usize>, msg: String| Err((Some(span), msg));

        let p = &self.pipeline;
        if p.checkpoint_interval.millis() <= 0 {
            return Err((
                None,
                "[pipeline] checkpoint_interval must be greater than 0".into(),
            ));
        }
        if p.state_cache_entries == 0 {
            return Err((
                None,
                "[pipeline] state_cache_entries must be at least 1".into(),
            ));
        }
        if p.channel_capacity == 0 || p.batch_size == 0 {
            return Err((
                None,
                "[pipeline] channel_capacity and batch_size must be at least 1".into(),
            ));
        }

        if let Some(msg) = self.source.get_ref().problem() {
            return at(self.source.span(), msg);
        }

        let s = &self.schema;
        if s.key.is_empty() || s.timestamp.is_empty() {
            return Err((None, "[schema] key and timestamp must name fields".into()));
        }
        if s.key == s.timestamp {
            return Err((
                None,
                format!(
                    "[schema] key and timestamp are both {:?}; they must be different fields",
                    s.key
                ),
            ));
        }
        if s.max_record_bytes == 0 {
            return Err((None, "[schema] max_record_bytes must be at least 1".into()));
        }
        if s.min_event_time >= s.max_event_time {
            return Err((
                None,
                "[schema] min_event_time must be less than max_event_time".into(),
            ));
        }

        let w = &self.watermark;
        if w.idle_timeout.millis() == 0 {
            return Err((
                None,
                "[watermark] idle_timeout must be greater than 0".into(),
            ));
        }

        let mut names = HashSet::new();
        for f in &self.features {
            let name = f.name.get_ref();
            if name.is_empty() {
                return at(f.name.span(), "feature name must not be empty".into());
            }
            if !names.insert(name.clone()) {
                return at(
                    f.name.span(),
                    format!("feature {name:?} is defined twice; names must be unique"),
                );
            }
            let spec = f.window.get_ref();
            let wspan = f.window.span();
            if spec.size.millis() <= 0 {
                return at(
                    wspan,
                    format!("feature {name:?}: window size must be greater than 0"),
                );
            }
            match (spec.kind, spec.slide) {
                (WindowType::Tumbling, Some(_)) => {
                    return at(wspan, format!("feature {name:?}: a tumbling window takes no `slide`; use type = \"sliding\" for overlapping windows"));
                }
                (WindowType::Sliding, None) => {
                    return at(wspan, format!("feature {name:?}: a sliding window needs `slide` (e.g. slide = \"10s\")"));
                }
                (WindowType::Sliding, Some(slide)) => {
                    if slide.millis() <= 0 {
                        return at(
                            wspan,
                            format!("feature {name:?}: slide must be greater than 0"),
                        );
                    }
                    if spec.size.millis() % slide.millis() != 0 {
                        return at(wspan, format!(
                            "feature {name:?}: window size {} is not a multiple of slide {}; size % slide must be 0",
                            spec.size, slide
                        ));
                    }
                }
                (WindowType::Tumbling, None) => {}
            }
            match (&f.field, f.agg) {
                (Some(field), AggKind::Count) => {
                    return at(
                        field.span(),
                        format!("feature {name:?}: count takes no `field` (it counts events)"),
                    );
                }
                (None, AggKind::Count) => {}
                (None, agg) => {
                    return at(
                        f.name.span(),
                        format!(
                            "feature {name:?}: {} needs `field`, one of the [schema] fields",
                            agg.as_str()
                        ),
                    );
                }
                (Some(field), agg) => {
                    let Some(ty) = s.fields.get(field.get_ref()) else {
                        let known: Vec<_> = s.fields.keys().map(String::as_str).collect();
                        return at(
                            field.span(),
                            format!(
                            "feature {name:?}: field {:?} is not in [schema].fields (known: {})",
                            field.get_ref(),
                            if known.is_empty() { "none".to_string() } else { known.join(", ") }
                        ),
                        );
                    };
                    if agg.needs_numeric_field() && !ty.ty.is_numeric() {
                        return at(field.span(), format!(
                            "feature {name:?}: {} needs a numeric field (f64 or i64), but {:?} is {}",
                            agg.as_str(), field.get_ref(), ty
                        ));
                    }
                }
            }
            if f.max_distinct.is_some() && f.agg != AggKind::DistinctCount {
                return at(
                    f.name.span(),
                    format!("feature {name:?}: max_distinct only applies to distinct_count"),
                );
            }
            if f.max_distinct == Some(0) {
                return at(
                    f.name.span(),
                    format!("feature {name:?}: max_distinct must be at least 1"),
                );
            }
        }

        self.inference.validate().map_err(|msg| (None, msg))?;

        if self.sinks.is_empty() {
            return Err((None, "no [[sinks]]: add at least one, e.g. [[sinks]] type = \"stdout\" kinds = [\"prediction\"]".into()));
        }
        self.validate_sinks(&self.sinks, "[[sinks]]")?;

        if let Some(replay) = &self.replay {
            let span = replay.span();
            let r = replay.get_ref();
            match &r.source {
                Some(SourceConfig::S3(c)) => {
                    if let Some(msg) = c.problem() {
                        return at(span, format!("[replay.source] type = \"s3\": {msg}"));
                    }
                }
                Some(other) => {
                    return at(
                        span,
                        format!(
                            "[replay.source] must be type = \"s3\" (an archive), not {:?}",
                            other.type_name()
                        ),
                    );
                }
                None if !matches!(self.source(), SourceConfig::S3(_)) => {
                    return at(
                        span,
                        "[replay] needs a `source` (type = \"s3\") unless [source] is the archive"
                            .into(),
                    );
                }
                None => {}
            }
            if r.label.as_deref().is_some_and(|l| l.trim().is_empty()) {
                return at(
                    span,
                    "[replay] label must name a field of the input records".into(),
                );
            }
            self.validate_sinks(&r.sinks, "[[replay.sinks]]")?;
        }
        Ok(())
    }

    /// Checks one list of sinks (`what` names it in messages).
    fn validate_sinks(
        &self,
        sinks: &[Spanned<SinkConfig>],
        what: &str,
    ) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
        let at = |span: std::ops::Range<usize>, msg: String| Err((Some(span), msg));
        let produced = self.produced_kinds();
        let mut files = HashSet::new();
        let mut archives = HashSet::new();
        for sink in sinks {
            let cfg = sink.get_ref();
            if cfg.kinds().is_empty() {
                return at(
                    sink.span(),
                    format!(
                        "{what} type = {:?} subscribes to no kinds; list some in `kinds`",
                        cfg.type_name()
                    ),
                );
            }
            for kind in cfg.kinds() {
                if !produced.contains(*kind) {
                    let why = match kind {
                        OutputKind::Prediction => {
                            "no model is configured ([inference] backend = \"none\")"
                        }
                        OutputKind::Shadow => "no [inference.shadow] is configured",
                        OutputKind::Window | OutputKind::Late => {
                            "there are no [[features]], so there are no windows"
                        }
                        _ => "no stage produces it",
                    };
                    return at(
                        sink.span(),
                        format!(
                            "{what} type = {:?} subscribes to {kind:?} records, but {why}",
                            cfg.type_name(),
                            kind = kind.as_str()
                        ),
                    );
                }
            }
            if let SinkConfig::Kinesis(k) = cfg {
                if k.stream_name.trim().is_empty() {
                    return at(
                        sink.span(),
                        format!("{what} type = \"kinesis\" needs a `stream_name`"),
                    );
                }
                if k.max_attempts == 0 {
                    return at(
                        sink.span(),
                        format!("{what} type = \"kinesis\": max_attempts must be at least 1"),
                    );
                }
                if let Some(msg) = endpoint_problem(k.endpoint_url.as_deref()) {
                    return at(sink.span(), format!("{what} type = \"kinesis\": {msg}"));
                }
            }
            if let SinkConfig::File(f) = cfg {
                if f.path.as_os_str().is_empty() {
                    return at(
                        sink.span(),
                        format!("{what} type = \"file\" needs a `path`"),
                    );
                }
                if !files.insert(f.path.clone()) {
                    return at(
                        sink.span(),
                        format!("two file sinks write to {}", f.path.display()),
                    );
                }
                if f.rotate_bytes == Some(0) {
                    return at(sink.span(), "rotate_bytes must be greater than 0".into());
                }
            }
            if let SinkConfig::S3(c) = cfg {
                if let Some(msg) = c.problem() {
                    return at(sink.span(), format!("{what} type = \"s3\": {msg}"));
                }
                if !archives.insert((c.bucket.clone(), c.prefix.clone())) {
                    return at(
                        sink.span(),
                        format!(
                            "two s3 sinks write to s3://{}/{}: object names would collide",
                            c.bucket, c.prefix
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// The output kinds this configuration can produce.
    pub fn produced_kinds(&self) -> KindSet {
        let mut kinds = KindSet::default();
        kinds.insert(OutputKind::Features);
        kinds.insert(OutputKind::DeadLetter);
        if !self.features.is_empty() {
            kinds.insert(OutputKind::Window);
            kinds.insert(OutputKind::Late);
        }
        if self.inference.backend != Backend::None {
            kinds.insert(OutputKind::Prediction);
        }
        if self.inference.shadow.is_some() {
            kinds.insert(OutputKind::Shadow);
        }
        kinds.insert(OutputKind::Raw);
        kinds
    }

    /// The config `shardflow replay` runs: `[replay.source]` for `[source]`
    /// and `[[replay.sinks]]` (when given) for `[[sinks]]`; everything that
    /// shapes results (schema, watermarks, features, model) is the same.
    /// Errors when there is no archive to replay.
    pub fn for_replay(&self) -> Result<Config, String> {
        let mut c = self.clone();
        if let Some(r) = &self.replay {
            let span = r.span();
            let r = r.get_ref();
            if let Some(source) = &r.source {
                c.source = Spanned::new(span.clone(), source.clone());
            }
            if !r.sinks.is_empty() {
                c.sinks = r.sinks.clone();
            }
        }
        if !matches!(c.source(), SourceConfig::S3(_)) {
            return Err(
                "nothing to replay: set [replay.source] (or [source]) to type = \"s3\"".into(),
            );
        }
        Ok(c)
    }

    /// The `[replay] label` field, if any.
    pub fn replay_label(&self) -> Option<&str> {
        self.replay.as_ref()?.get_ref().label.as_deref()
    }

    /// The union of the kinds sinks subscribe to.
    pub fn subscribed_kinds(&self) -> KindSet {
        self.sinks
            .iter()
            .flat_map(|s| s.get_ref().kinds().iter().copied())
            .collect()
    }

    /// A stable hash of the parts of the config that shape state: the key,
    /// the timestamp field and every feature. State written under another
    /// fingerprint cannot be read correctly.
    pub fn state_fingerprint(&self) -> String {
        let mut text = format!("key={};ts={};", self.schema.key, self.schema.timestamp);
        for f in &self.features {
            let w = f.window.get_ref();
            text.push_str(&format!(
                "feature={}:{}:{}:{}:{}:{};",
                f.name.get_ref(),
                f.agg.as_str(),
                f.field.as_ref().map(|s| s.get_ref().as_str()).unwrap_or(""),
                w.size.millis(),
                w.slide_millis(),
                f.max_distinct.unwrap_or(0)
            ));
        }
        format!("{:016x}", fnv1a(text.as_bytes()))
    }

    pub fn source(&self) -> &SourceConfig {
        self.source.get_ref()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// Appended to a TOML syntax error on a line holding `${`.
const NOT_A_STRING_HINT: &str = " (`${VAR}` is substituted only inside quoted strings, e.g. key = \"${VAR}\"; a number, boolean, array or table cannot come from the environment)";

/// Whether the line of `offset` holds a `${` (a reference TOML could not
/// parse, so presumably written outside a string).
fn env_reference_outside_string(text: &str, offset: usize) -> bool {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[start..end];
    let code = line.split_once('#').map_or(line, |(code, _)| code);
    code.contains("${")
}

/// A `${...}` that cannot be substituted: where it starts in the string
/// value, its text, and what is wrong with it.
#[derive(Debug, PartialEq, Eq)]
struct EnvRefError {
    at: usize,
    len: usize,
    message: String,
}

/// Substitutes the environment into one string value: `${VAR}`,
/// `${VAR:-default}`, and `$${` for a literal `${`. The result is the new
/// value (None when there is nothing to substitute) and whether a reference
/// (not just an escape) was replaced. Values are inserted verbatim: the
/// string is already parsed, so nothing in them is TOML.
fn substitute_env(
    value: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<(String, bool)>, EnvRefError> {
    if !value.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(value.len());
    let mut referenced = false;
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let at = value.len() - rest.len() + i;
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        if !after.starts_with("${") {
            out.push('$');
            rest = &after[1..];
            continue;
        }
        let Some(close) = after.find('}') else {
            return Err(EnvRefError {
                at,
                len: 2,
                message: "unclosed ${ in an environment reference: write ${NAME} or ${NAME:-default}, or $${ for a literal ${".into(),
            });
        };
        let inner = &after[2..close];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let fail = |message: String| EnvRefError {
            at,
            len: close + 1,
            message,
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(fail(format!(
                "invalid environment reference ${{{inner}}}: a name is letters, digits and _"
            )));
        }
        match (env(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(fail(format!(
                    "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                )));
            }
        }
        referenced = true;
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(Some((out, referenced)))
}

/// The string values a reference was substituted into: span, result.
type Substituted = Vec<(std::ops::Range<usize>, String)>;

/// Where the substitution walk is and what it found.
struct EnvWalk<'a, F> {
    text: &'a str,
    env: &'a F,
    /// The key path of the value being visited, e.g. `features[0].name`.
    path: String,
    substituted: Substituted,
    /// The earliest problem in the file (the walk visits keys in map
    /// order, not file order).
    error: Option<(usize, String)>,
}

impl<F: Fn(&str) -> Option<String>> EnvWalk<'_, F> {
    fn fail(&mut self, at: usize, message: String) {
        if self.error.as_ref().is_none_or(|(first, _)| at < *first) {
            self.error = Some((at, message));
        }
    }

    fn table(&mut self, table: &mut DeTable<'_>) {
        for (key, value) in table.iter_mut() {
            let len = self.path.len();
            let name = key.get_ref();
            if !self.path.is_empty() {
                self.path.push('.');
            }
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                self.path.push_str(name);
            } else {
                self.path.push_str(&format!("{name:?}"));
            }
            if name.contains("${") {
                let message = format!(
                    "the key `{}` holds `${{`: keys are never substituted; the environment is substituted only into string values",
                    self.path
                );
                self.fail(key.span().start, message);
            }
            self.value(value);
            self.path.truncate(len);
        }
    }

    fn value(&mut self, value: &mut Spanned<DeValue<'_>>) {
        let span = value.span();
        match value.get_mut() {
            DeValue::String(s) => match substitute_env(s, self.env) {
                Ok(None) => {}
                Ok(Some((new, referenced))) => {
                    if referenced {
                        self.substituted.push((span, new.clone()));
                    }
                    *s = std::borrow::Cow::Owned(new);
                }
                Err(e) => {
                    let at = locate_in_string(self.text, span, s, &e);
                    let message = format!("`{}`: {}", self.path, e.message);
                    self.fail(at, message);
                }
            },
            DeValue::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    let len = self.path.len();
                    self.path.push_str(&format!("[{i}]"));
                    self.value(item);
                    self.path.truncate(len);
                }
            }
            DeValue::Table(table) => self.table(table),
            DeValue::Integer(_)
            | DeValue::Float(_)
            | DeValue::Boolean(_)
            | DeValue::Datetime(_) => {}
        }
    }
}

/// The file offset of a bad reference in a string value: found in the
/// value's source text (the k-th occurrence for the k-th in the value); the
/// start of the value when escapes hide it.
fn locate_in_string(
    text: &str,
    span: std::ops::Range<usize>,
    value: &str,
    e: &EnvRefError,
) -> usize {
    let needle = &value[e.at..e.at + e.len];
    let nth = value[..e.at].matches(needle).count();
    text.get(span.clone())
        .and_then(|raw| raw.match_indices(needle).nth(nth))
        .map_or(span.start, |(i, _)| span.start + i)
}

/// Substitutes the environment into every string value of a parsed file
/// (keys, numbers, booleans and the structure are left alone). Returns the
/// values that took a reference (span, result), or the first problem in the
/// file (offset, message).
fn substitute_env_in(
    root: &mut Spanned<DeTable<'_>>,
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Substituted, (usize, String)> {
    let mut walk = EnvWalk {
        text,
        env,
        path: String::new(),
        substituted: Vec::new(),
        error: None,
    };
    walk.table(root.get_mut());
    match walk.error {
        Some(e) => Err(e),
        None => Ok(walk.substituted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[source]
type = "generator"

[schema]
key = "userId"
timestamp = "timestamp"
fields = { amount = "f64" }

[[features]]
name = "amount_sum_1m"
agg = "sum"
field = "amount"
window = { type = "sliding", size = "1m", slide = "10s" }

[[sinks]]
type = "stdout"
kinds = ["features", "window"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_at(text, Path::new("test.toml"), |n| {
            (n == "SET").then(|| "yes".into())
        })
    }

    #[test]
    fn minimal_config_parses() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.features[0].window.get_ref().slide_millis(), 10_000);
        assert_eq!(c.schema.field_index("amount"), Some(0));
    }

    #[test]
    fn size_not_a_multiple_of_slide_is_located() {
        let text = MINIMAL.replace("slide = \"10s\"", "slide = \"7s\"");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("size % slide"), "{e}");
        assert_eq!(e.location.unwrap().0, 14, "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_with_location() {
        let text = MINIMAL.replace("agg = \"sum\"", "agg = \"sum\"\ncolour = 1");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("colour"), "{e}");
        assert_eq!(e.location.unwrap().0, 13, "{e}");
    }

    /// Parses with exactly these environment variables set.
    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_str_at(text, Path::new("test.toml"), |n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn env_substitution_syntax() {
        let env = |n: &str| (n == "SET").then(|| "yes".to_string());
        let sub = |v: &str| substitute_env(v, &env).unwrap().map(|(s, _)| s);
        assert_eq!(sub("${SET}").as_deref(), Some("yes"));
        assert_eq!(sub("a-${SET}-b").as_deref(), Some("a-yes-b"));
        assert_eq!(sub("${UNSET:-x}").as_deref(), Some("x"));
        assert_eq!(sub("${UNSET:-}").as_deref(), Some(""));
        assert_eq!(sub("${SET:-x}").as_deref(), Some("yes"));
        assert_eq!(sub("$${SET}").as_deref(), Some("${SET}"));
        assert_eq!(sub("$$${SET}").as_deref(), Some("$${SET}"));
        assert_eq!(sub("cost $5, $ {x}"), None);
        assert_eq!(
            substitute_env("$${SET}", &env).unwrap(),
            Some(("${SET}".to_string(), false)),
            "an escape alone is not a reference"
        );
        let e = substitute_env("ab${UNSET}", &env).unwrap_err();
        assert_eq!((e.at, e.len), (2, 8));
        assert!(e.message.contains("UNSET is not set"), "{}", e.message);
        let e = substitute_env("${SET", &env).unwrap_err();
        assert!(e.message.contains("unclosed"), "{}", e.message);
        let e = substitute_env("${A-B}", &env).unwrap_err();
        assert!(
            e.message.contains("invalid environment reference"),
            "{}",
            e.message
        );
    }

    #[test]
    fn env_substitution_in_a_config() {
        let text = MINIMAL
            .replace("\"userId\"", "\"${SET}\"  # ${UNSET} in a comment")
            .replace("\"timestamp\"\n", "'${UNSET:-ts}' \n# ${UNSET}\n");
        let c = parse(&text).unwrap();
        assert_eq!(c.schema.key, "yes");
        assert_eq!(c.schema.timestamp, "ts", "literal strings are strings too");
        // A duration or a path can come from the environment: both are strings.
        let text = MINIMAL.replace(
            "[source]",
            "[pipeline]\ncheckpoint_interval = \"${CKPT:-2s}\"\nstate_dir = \"${DIR}/state\"\n\n[source]",
        );
        let c = parse_env(&text, &[("DIR", "/tmp/x y")]).unwrap();
        assert_eq!(c.pipeline.checkpoint_interval.millis(), 2_000);
        assert_eq!(c.pipeline.state_dir, PathBuf::from("/tmp/x y/state"));
    }

    #[test]
    fn unset_variable_is_located_with_its_key_path() {
        let e = parse(&MINIMAL.replace("\"userId\"", "\"${NOPE}\"")).unwrap_err();
        assert!(e.message.contains("NOPE is not set"), "{e}");
        assert!(e.message.contains("schema.key"), "{e}");
        assert_eq!(e.location, Some((6, 8)), "{e}");
        // In an array inside an array of tables.
        let text = MINIMAL.replace("[\"features\", \"window\"]", "[\"features\", \"${NOPE}\"]");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("sinks[0].kinds[1]"), "{e}");
        assert_eq!(e.location, Some((18, 23)), "{e}");
        // In an inline table.
        let text = MINIMAL.replace("slide = \"10s\"", "slide = \"${NOPE}\"");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("features[0].window.slide"), "{e}");
        assert_eq!(e.location, Some((14, 52)), "{e}");
        // After an escape and after `$${`, at the right spot still.
        let text = MINIMAL.replace("\"userId\"", r#""\u0041 $${NOPE} ${NOPE}""#);
        let e = parse(&text).unwrap_err();
        assert_eq!(e.location, Some((6, 24)), "{e}");
    }

    #[test]
    fn the_first_bad_reference_in_the_file_is_reported() {
        // [source] comes first in the file, though after [schema] in key order.
        let text = MINIMAL
            .replace(
                "type = \"generator\"",
                "type = \"generator\"\nseed_name = \"${FIRST}\"",
            )
            .replace("\"userId\"", "\"${SECOND}\"");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("FIRST"), "{e}");
        assert_eq!(e.location.unwrap().0, 4, "{e}");
    }

    /// Values that would rewrite the file if they were pasted into its text.
    const HOSTILE: &[&str] = &[
        "a\"b",
        "line1\nline2",
        "x]",
        "= 1\n[source]",
        "\"\n[pipeline]\nbatch_size = 1\n#",
        "\"}]\n[[sinks]]\ntype = \"stdout\"\nkinds = [\"raw\"]\n#",
        "'''\"\"\"\\u0000\t\r${SET}",
        "${NOT_EXPANDED_AGAIN}",
    ];

    #[test]
    fn hostile_values_are_inserted_verbatim() {
        let text = MINIMAL.replace("\"userId\"", "\"${HOSTILE}\"").replace(
            "kinds = [\"features\", \"window\"]",
            "kinds = [\"features\", \"window\"]\n\n[replay]\nsource = { type = \"s3\", bucket = \"archive\" }\nlabel = \"pre-${HOSTILE}-post\"",
        );
        let plain = parse_env(&text, &[("HOSTILE", "plain")]).unwrap();
        for value in HOSTILE {
            let mut c = parse_env(&text, &[("HOSTILE", value), ("SET", "no")])
                .unwrap_or_else(|e| panic!("{value:?}: {e}"));
            assert_eq!(c.schema.key, *value);
            assert_eq!(c.replay_label(), Some(&*format!("pre-{value}-post")));
            // Nothing else moved: same tables, sinks, defaults (and spans).
            assert_eq!(c.pipeline.batch_size, 256);
            assert_eq!(c.sinks.len(), 1);
            assert_eq!(c.source().type_name(), "generator");
            c.schema.key = "plain".into();
            c.replay = plain.replay.clone();
            assert_eq!(format!("{c:?}"), format!("{plain:?}"), "{value:?}");
        }
    }

    #[test]
    fn hostile_defaults_are_inserted_verbatim() {
        // A default is file text, but it is taken from the parsed string.
        let text = MINIMAL.replace("\"userId\"", r#""${UNSET:-a\"b\n[source]}""#);
        let c = parse(&text).unwrap();
        assert_eq!(c.schema.key, "a\"b\n[source]");
    }

    #[test]
    fn references_outside_strings_are_refused_clearly() {
        let text = MINIMAL.replace("type = \"generator\"", "type = \"generator\"\ncount = ${N}");
        let e = parse_env(&text, &[("N", "10")]).unwrap_err();
        assert!(
            e.message.contains("substituted only inside quoted strings"),
            "{e}"
        );
        assert_eq!(e.location.unwrap().0, 4, "{e}");
        // Quoted, it is a string where a number belongs: said so.
        let text = MINIMAL.replace(
            "type = \"generator\"",
            "type = \"generator\"\ncount = \"${N}\"",
        );
        let e = parse_env(&text, &[("N", "10")]).unwrap_err();
        assert!(e.message.contains("invalid type: string \"10\""), "{e}");
        assert!(e.message.contains("substituted only into strings"), "{e}");
        assert_eq!(e.location, Some((4, 9)), "{e}");
        // Keys are not values.
        let text = MINIMAL.replace(
            "{ amount = \"f64\" }",
            "{ amount = \"f64\", \"${SET}\" = \"f64\" }",
        );
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("keys are never substituted"), "{e}");
        assert!(e.message.contains("schema.fields.\"${SET}\""), "{e}");
        assert_eq!(e.location, Some((8, 28)), "{e}");
    }

    #[test]
    fn serde_errors_keep_their_location_after_substitution() {
        let text = MINIMAL
            .replace("\"userId\"", "\"${SET}\"")
            .replace("agg = \"sum\"", "agg = \"sum\"\ncolour = \"${SET}\"");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("colour"), "{e}");
        assert_eq!(e.location.unwrap().0, 13, "{e}");
        let text = MINIMAL.replace("slide = \"10s\"", "slide = \"${SET}\"");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("invalid duration \"yes\""), "{e}");
        assert_eq!(e.location.unwrap().0, 14, "{e}");
    }
}
