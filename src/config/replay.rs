//! `[replay]`: the archive `shardflow replay` reads and where its results
//! go, and the config a replay runs.

use serde::Deserialize;
use toml::Spanned;

use super::sink::SinkConfig;
use super::source::SourceConfig;
use super::Config;

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

impl ReplayConfig {
    /// Checks `[replay]` (at `span`) against the live `[source]`.
    pub(super) fn check(
        &self,
        span: std::ops::Range<usize>,
        live_source: &SourceConfig,
    ) -> Result<(), super::Problem> {
        let at = |span: std::ops::Range<usize>, msg: String| Err((Some(span), msg));
        match &self.source {
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
            None if !matches!(live_source, SourceConfig::S3(_)) => {
                return at(
                    span,
                    "[replay] needs a `source` (type = \"s3\") unless [source] is the archive"
                        .into(),
                );
            }
            None => {}
        }
        if self.label.as_deref().is_some_and(|l| l.trim().is_empty()) {
            return at(
                span,
                "[replay] label must name a field of the input records".into(),
            );
        }
        Ok(())
    }
}

impl Config {
    /// The config `shardflow replay` runs: `[replay.source]` for `[source]`
    /// and `[[replay.sinks]]` (when given) for `[[sinks]]`; everything that
    /// shapes results (schema, watermarks, features, model) is the same.
    /// Errors when there is no archive to replay.
    pub fn for_replay(&self) -> Result<Config, String> {
        let mut c = self.clone();
        // A replay's state is its own (temporary, or --state-dir), never
        // the live run's checkpoints.
        c.checkpoint_store = None;
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
}
