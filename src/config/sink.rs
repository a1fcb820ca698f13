//! `[[sinks]]`: where outputs go, each sink with the kinds it takes.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::s3::S3SinkConfig;
use crate::record::{KindSet, OutputKind};

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

/// Checks one list of sinks (`what` names it in messages).
pub(super) fn check_sinks(
    sinks: &[Spanned<SinkConfig>],
    what: &str,
    produced: KindSet,
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
