//! `[[sinks]]`: where outputs go, each sink with the kinds it takes.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::s3::S3SinkConfig;
use crate::record::{KindSet, OutputKind};
use crate::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Stdout(StdoutSinkConfig),
    File(FileSinkConfig),
    Kinesis(KinesisSinkConfig),
    S3(S3SinkConfig),
    Dynamodb(DynamoDbSinkConfig),
}

impl SinkConfig {
    pub fn kinds(&self) -> &[OutputKind] {
        match self {
            SinkConfig::Stdout(c) => &c.kinds,
            SinkConfig::File(c) => &c.kinds,
            SinkConfig::Kinesis(c) => &c.kinds,
            SinkConfig::S3(c) => &c.kinds,
            SinkConfig::Dynamodb(c) => &c.kinds,
        }
    }
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::File(_) => "file",
            SinkConfig::Kinesis(_) => "kinesis",
            SinkConfig::S3(_) => "s3",
            SinkConfig::Dynamodb(_) => "dynamodb",
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
    /// What a record holds: the output's NDJSON line, or (`original`, with
    /// `kinds = ["raw"]` only) the input record's own bytes, unchanged,
    /// partitioned by its entity key: the re-key pipeline.
    #[serde(default)]
    pub payload: KinesisPayload,
}

/// [`KinesisSinkConfig::payload`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KinesisPayload {
    #[default]
    Ndjson,
    Original,
}

fn default_max_attempts() -> u32 {
    10
}

/// `[[sinks]] type = "dynamodb"`: the newest feature vector (or prediction)
/// per key as one item of an existing table (see `sink/dynamodb.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamoDbSinkConfig {
    pub table: String,
    /// The table's hash key (type S): it holds the output's key.
    #[serde(default = "default_key_attribute")]
    pub key_attribute: String,
    /// `features` and/or `prediction`: the kinds that have a key and a vector.
    pub kinds: Vec<OutputKind>,
    #[serde(default)]
    pub write_mode: WriteMode,
    /// Write requests in flight at once.
    #[serde(default = "default_dynamodb_concurrency")]
    pub concurrency: usize,
    /// Attempts per write request (throttling, 5xx, the network) before the
    /// sink fails the run.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// One attempt without an answer this long counts as failed (retried).
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Duration,
    /// Keys held between barriers; when this many wait they are written at
    /// once (memory stays bounded; coalescing then spans less than a
    /// checkpoint).
    #[serde(default = "default_max_buffered_keys")]
    pub max_buffered_keys: usize,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
}

/// How the DynamoDB sink writes its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// One `PutItem` per item, conditional on `event_time` not going back.
    #[default]
    Conditional,
    /// `BatchWriteItem` of up to 25 items, unconditional.
    Batch,
}

impl WriteMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteMode::Conditional => "conditional",
            WriteMode::Batch => "batch",
        }
    }
}

fn default_key_attribute() -> String {
    "key".into()
}
fn default_dynamodb_concurrency() -> usize {
    16
}
fn default_request_timeout() -> Duration {
    Duration::from_millis(10_000)
}
fn default_max_buffered_keys() -> usize {
    100_000
}

/// Attributes every item has besides the features: a feature may not be
/// named like one of them.
pub const DYNAMODB_ITEM_ATTRIBUTES: [&str; 6] = [
    "event_time",
    "id",
    "prediction",
    "model",
    "variant",
    "fallback",
];

impl DynamoDbSinkConfig {
    /// What is wrong with it, given the configured feature names.
    fn problem(&self, features: &HashSet<String>) -> Option<String> {
        let t = &self.table;
        let table_ok = (3..=255).contains(&t.len())
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !table_ok {
            return Some(format!(
                "table {t:?} is not a DynamoDB table name (3-255 letters, digits, `_`, `-`, `.`)"
            ));
        }
        if self.key_attribute.is_empty() || self.key_attribute.len() > 255 {
            return Some("key_attribute must be 1-255 bytes long".into());
        }
        if DYNAMODB_ITEM_ATTRIBUTES.contains(&self.key_attribute.as_str()) {
            return Some(format!(
                "key_attribute {:?} is an attribute every item has already; name the key \
                 otherwise (e.g. \"key\" or the schema's key field)",
                self.key_attribute
            ));
        }
        if let Some(kind) = self
            .kinds
            .iter()
            .find(|k| !matches!(k, OutputKind::Features | OutputKind::Prediction))
        {
            return Some(format!(
                "kinds may only hold \"features\" and \"prediction\": an item is the newest \
                 feature vector of a key, and {:?} records are not (write them to a file, \
                 kinesis or s3 sink)",
                kind.as_str()
            ));
        }
        let reserved = std::iter::once(self.key_attribute.as_str()).chain(DYNAMODB_ITEM_ATTRIBUTES);
        if let Some(name) = reserved.into_iter().find(|a| features.contains(*a)) {
            return Some(format!(
                "feature {name:?} would be written over the item's own attribute {name:?}; \
                 rename the feature{}",
                if name == self.key_attribute {
                    " or set another key_attribute"
                } else {
                    ""
                }
            ));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Some(format!(
                "concurrency must be between 1 and 256, got {}",
                self.concurrency
            ));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Some(format!(
                "max_attempts must be between 1 and 20, got {}",
                self.max_attempts
            ));
        }
        if self.request_timeout.millis() < 100 {
            return Some("request_timeout must be at least 100ms".into());
        }
        if self.max_buffered_keys == 0 {
            return Some("max_buffered_keys must be at least 1".into());
        }
        super::endpoint_problem(self.endpoint_url.as_deref())
    }
}

/// Checks one list of sinks (`what` names it in messages).
pub(super) fn check_sinks(
    sinks: &[Spanned<SinkConfig>],
    what: &str,
    produced: KindSet,
    features: &HashSet<String>,
) -> Result<(), super::Problem> {
    let at = |span: std::ops::Range<usize>, msg: String| Err((Some(span), msg));
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
            if let Some(msg) = super::endpoint_problem(k.endpoint_url.as_deref()) {
                return at(sink.span(), format!("{what} type = \"kinesis\": {msg}"));
            }
            if k.payload == KinesisPayload::Original && k.kinds != [OutputKind::Raw] {
                return at(
                    sink.span(),
                    format!(
                        "{what} type = \"kinesis\": payload = \"original\" forwards input records \
                         unchanged, so it takes kinds = [\"raw\"] only"
                    ),
                );
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
        if let SinkConfig::Dynamodb(c) = cfg {
            if let Some(msg) = c.problem(features) {
                return at(sink.span(), format!("{what} type = \"dynamodb\": {msg}"));
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
