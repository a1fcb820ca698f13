//! The TOML configuration: one file, one root ([`Config`]), one file per
//! section here.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere) and every problem is
//! reported with the file, line and column it comes from before anything
//! starts. Each section's file holds its structs, their defaults and the
//! checks that concern that section alone (a `problem` method); this file
//! holds loading, locating errors, and the checks that cross sections (a
//! sink subscribing to a kind nothing produces, a feature naming a field
//! the schema lacks, replay's archive). The doc comments on the structs
//! are the reference; the README's tables are checked against the keys
//! serde accepts (`tests.rs`), so the two cannot drift apart.
//!
//! Why a folder of its own rather than each struct beside its component
//! (vector's layout): the root must name every section, and components are
//! built from the root (`Engine::new(&Config)`, `source::build(&Config)`).
//! With the structs in the components, the root would import every
//! component and every component the root: a circle. Here the config is a
//! floor below all components, and every arrow points down to it.
//!
//! - `env.rs`: `${VAR}` substitution into parsed strings
//! - `pipeline.rs`: `[pipeline]`
//! - `api.rs`: `[api]`, the online API
//! - `checkpoint_store.rs`: `[checkpoint_store]`
//! - `cluster.rs`: `[cluster]`
//! - `source.rs`: `[source]` (file, generator, kinesis; s3 in `s3.rs`)
//! - `s3.rs`: the S3 client keys, the archive as a source and as a sink
//! - `schema.rs`: `[schema]`
//! - `windows.rs`: `[watermark]`, `[[features]]`
//! - `inference.rs`: `[inference]`
//! - `sink.rs`: `[[sinks]]`
//! - `replay.rs`: `[replay]` and the config a replay runs

mod api;
mod checkpoint_store;
mod cluster;
mod env;
mod inference;
mod pipeline;
mod replay;
mod s3;
mod schema;
mod sink;
mod source;
mod windows;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use crate::record::{KindSet, OutputKind};

use env::{env_reference_outside_string, substitute_env_in, NOT_A_STRING_HINT};

pub use api::{ApiConfig, DEFAULT_API_ADDR};
pub use checkpoint_store::{CheckpointStoreConfig, S3CheckpointStoreConfig};
pub use cluster::ClusterConfig;
pub use inference::{Backend, ContentType, FallbackKind, InferenceConfig, JsonKey, ShadowConfig};
pub use pipeline::PipelineConfig;
pub use replay::ReplayConfig;
pub use s3::{
    ArchiveFormat, Compression, S3ClientConfig, S3SinkConfig, S3SourceConfig, S3_MIN_PART_BYTES,
};
pub use schema::{FieldSpec, FieldType, SchemaConfig};
pub use sink::{
    DynamoDbSinkConfig, FileSinkConfig, KinesisPayload, KinesisSinkConfig, SinkConfig,
    StdoutSinkConfig, WriteMode, DYNAMODB_ITEM_ATTRIBUTES,
};
pub use source::{
    FileSourceConfig, GeneratorConfig, KinesisSourceConfig, SourceConfig, StartingPosition,
};
pub use windows::{
    AggKind, FeatureConfig, WatermarkConfig, WindowSpec, WindowType, DEFAULT_MAX_DISTINCT,
};

/// A problem `validate` found: where (a span in the file, when known) and what.
type Problem = (Option<std::ops::Range<usize>>, String);

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
    /// The online API of `run`: off unless the table is present.
    #[serde(default)]
    pub api: Option<ApiConfig>,
    /// Where checkpoints are also kept, off this machine.
    #[serde(default)]
    pub checkpoint_store: Option<Spanned<CheckpointStoreConfig>>,
    /// Several processes sharing a Kinesis stream through a lease table.
    #[serde(default)]
    pub cluster: Option<Spanned<ClusterConfig>>,
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

    /// The semantic checks serde cannot express, section by section, then
    /// those that cross sections.
    fn validate(&self) -> Result<(), Problem> {
        let at = |span: std::ops::Range<usize>, msg: String| Err((Some(span), msg));
        if let Some(msg) = self.pipeline.problem() {
            return Err((None, msg));
        }
        if let Some(msg) = self.api.as_ref().and_then(ApiConfig::problem) {
            return Err((None, msg));
        }
        if let Some(store) = &self.checkpoint_store {
            if let Some(msg) = store.get_ref().problem() {
                return at(store.span(), msg);
            }
        }
        if let Some(msg) = self.source.get_ref().problem() {
            return at(self.source.span(), msg);
        }
        if let Some(cluster) = &self.cluster {
            if let Some(msg) = cluster.get_ref().problem() {
                return at(cluster.span(), msg);
            }
            if !matches!(self.source.get_ref(), SourceConfig::Kinesis(_)) {
                return at(
                    cluster.span(),
                    format!(
                        "[cluster] shares the shards of a Kinesis stream: it needs [source] type = \"kinesis\", not {:?}",
                        self.source.get_ref().type_name()
                    ),
                );
            }
            if self.checkpoint_store.is_none() {
                return at(
                    cluster.span(),
                    "[cluster] needs a [checkpoint_store]: shards move between workers with their state, through it".into(),
                );
            }
        }
        if let Some(msg) = self.schema.problem() {
            return Err((None, msg));
        }
        if let Some(msg) = self.watermark.problem() {
            return Err((None, msg));
        }
        let mut names = HashSet::new();
        for f in &self.features {
            f.check(&self.schema, &mut names)?;
        }
        for name in &self.schema.request_fields {
            if !names.insert(name.clone()) {
                return Err((
                    None,
                    format!(
                        "[schema] request_fields lists {name:?}, which is also a feature's name: a vector holds each name once"
                    ),
                ));
            }
        }
        self.inference.validate().map_err(|msg| (None, msg))?;

        if self.sinks.is_empty() {
            return Err((None, "no [[sinks]]: add at least one, e.g. [[sinks]] type = \"stdout\" kinds = [\"prediction\"]".into()));
        }
        sink::check_sinks(&self.sinks, "[[sinks]]", self.produced_kinds(), &names)?;
        if let Some(replay) = &self.replay {
            replay.get_ref().check(replay.span(), self.source())?;
            sink::check_sinks(
                &replay.get_ref().sinks,
                "[[replay.sinks]]",
                self.produced_kinds(),
                &names,
            )?;
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

    /// The names of a feature vector's values, in order: the `[[features]]`,
    /// then `[schema] request_fields`.
    pub fn vector_names(&self) -> Vec<Arc<str>> {
        self.features
            .iter()
            .map(|f| Arc::from(f.name.get_ref().as_str()))
            .chain(
                self.schema
                    .request_fields
                    .iter()
                    .map(|n| Arc::from(n.as_str())),
            )
            .collect()
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

/// Why an `endpoint_url` cannot be used (empty means unset).
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
