//! The S3 keys: the client settings shared by every S3 table, the archive
//! as a source (`[source] type = "s3"`, `[replay.source]`) and as a sink
//! (`[[sinks]] type = "s3"`).

use serde::Deserialize;

use crate::record::OutputKind;
use crate::time::{Duration, Millis, TomlTime};

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
pub(super) fn default_s3_attempts() -> u32 {
    5
}

impl S3ClientConfig {
    pub(super) fn problem(&self) -> Option<String> {
        if self.max_attempts == 0 || self.max_attempts > 20 {
            return Some(format!(
                "max_attempts must be between 1 and 20, got {}",
                self.max_attempts
            ));
        }
        super::endpoint_problem(self.endpoint_url.as_deref())
    }
}

/// A bucket name S3 accepts (3-63 lowercase letters, digits, dots, hyphens).
pub(super) fn bucket_problem(bucket: &str) -> Option<String> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    (!ok).then(|| format!("bucket {bucket:?} is not an S3 bucket name (3-63 lowercase letters, digits, dots and hyphens)"))
}

impl S3SourceConfig {
    pub(super) fn problem(&self) -> Option<String> {
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
    pub(super) fn problem(&self) -> Option<String> {
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
