//! `[watermark]` and `[[features]]`: event-time rules and the windowed
//! aggregates.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use super::schema::SchemaConfig;
use crate::time::{Duration, Millis};

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

impl WatermarkConfig {
    /// The first inconsistency in these settings, if any.
    pub(super) fn problem(&self) -> Option<String> {
        (self.idle_timeout.millis() == 0)
            .then(|| "[watermark] idle_timeout must be greater than 0".into())
    }
}

impl FeatureConfig {
    /// Checks one feature against the schema; `names` collects the names
    /// seen so far (they must be unique).
    pub(super) fn check(
        &self,
        schema: &SchemaConfig,
        names: &mut HashSet<String>,
    ) -> Result<(), super::Problem> {
        let at = |span: std::ops::Range<usize>, msg: String| Err((Some(span), msg));
        let name = self.name.get_ref();
        if name.is_empty() {
            return at(self.name.span(), "feature name must not be empty".into());
        }
        if !names.insert(name.clone()) {
            return at(
                self.name.span(),
                format!("feature {name:?} is defined twice; names must be unique"),
            );
        }
        let spec = self.window.get_ref();
        let wspan = self.window.span();
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
                return at(
                    wspan,
                    format!(
                        "feature {name:?}: a sliding window needs `slide` (e.g. slide = \"10s\")"
                    ),
                );
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
        match (&self.field, self.agg) {
            (Some(field), AggKind::Count) => {
                return at(
                    field.span(),
                    format!("feature {name:?}: count takes no `field` (it counts events)"),
                );
            }
            (None, AggKind::Count) => {}
            (None, agg) => {
                return at(
                    self.name.span(),
                    format!(
                        "feature {name:?}: {} needs `field`, one of the [schema] fields",
                        agg.as_str()
                    ),
                );
            }
            (Some(field), agg) => {
                let Some(ty) = schema.fields.get(field.get_ref()) else {
                    let known: Vec<_> = schema.fields.keys().map(String::as_str).collect();
                    return at(
                        field.span(),
                        format!(
                            "feature {name:?}: field {:?} is not in [schema].fields (known: {})",
                            field.get_ref(),
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                };
                if agg.needs_numeric_field() && !ty.ty.is_numeric() {
                    return at(
                        field.span(),
                        format!(
                        "feature {name:?}: {} needs a numeric field (f64 or i64), but {:?} is {}",
                        agg.as_str(), field.get_ref(), ty
                    ),
                    );
                }
            }
        }
        if self.max_distinct.is_some() && self.agg != AggKind::DistinctCount {
            return at(
                self.name.span(),
                format!("feature {name:?}: max_distinct only applies to distinct_count"),
            );
        }
        if self.max_distinct == Some(0) {
            return at(
                self.name.span(),
                format!("feature {name:?}: max_distinct must be at least 1"),
            );
        }
        Ok(())
    }
}
