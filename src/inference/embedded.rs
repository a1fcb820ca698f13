//! `backend = "embedded"`: a model evaluated in process: linear or logistic
//! (this module), or an ONNX file (`type = "onnx"`, see [`super::onnx`]).
//!
//! The model lives in a small TOML or JSON file (see `config/models/`):
//!
//! ```toml
//! name = "fraud-logistic"
//! version = "3"
//! type = "logistic"        # logistic | linear
//! bias = -4.0
//! threshold = 0.5          # logistic only: label = score >= threshold
//! [weights]                # feature name -> weight; every name must be a configured feature
//! txn_count_5m = 0.4
//! [impute]                 # value used when a feature is null (missing); without one the
//! amount_max_1h = 0.0      # prediction is null and says which feature was missing
//! ```
//!
//! An ONNX model is scored on tokio's blocking pool, a batch as one tensor;
//! a linear one inline, since it costs less than the hand-off.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use serde_json::json;

use super::onnx::{OnnxModel, OnnxSpec};
use super::{BatchPrediction, Model};
use crate::flow::BoxFuture;
use crate::record::FeatureVector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    Logistic,
    Linear,
}

/// The model file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(rename = "type")]
    pub kind: ModelType,
    #[serde(default)]
    pub bias: f64,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    pub weights: BTreeMap<String, f64>,
    #[serde(default)]
    pub impute: BTreeMap<String, f64>,
}

fn default_threshold() -> f64 {
    0.5
}

pub struct EmbeddedModel {
    name: Arc<str>,
    variant: Option<Arc<str>>,
    kind: Kind,
}

enum Kind {
    Linear(Linear),
    /// Shared with the blocking-pool task that runs it.
    Onnx(Arc<OnnxModel>),
}

struct Linear {
    spec: ModelSpec,
    /// Weight, imputed value and name for each feature slot, in vector order.
    terms: Vec<(f64, Option<f64>, Arc<str>)>,
}

impl EmbeddedModel {
    /// Loads a model file and checks it against the configured feature names.
    pub fn load(path: &Path, features: &[&str]) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model file {}", path.display()))?;
        let json = path.extension().is_some_and(|e| e == "json");
        let context = || format!("model file {}", path.display());
        if model_type(&text, json).as_deref() == Some("onnx") {
            let spec: OnnxSpec = parse(&text, json).with_context(context)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            return Self::from_onnx_spec(spec, dir, features).with_context(context);
        }
        let spec: ModelSpec = parse(&text, json).with_context(context)?;
        Self::from_spec(spec, features).with_context(context)
    }

    /// An ONNX model, its file relative to `dir`.
    pub fn from_onnx_spec(spec: OnnxSpec, dir: &Path, features: &[&str]) -> anyhow::Result<Self> {
        let model = OnnxModel::load(&spec, dir, features)?;
        Ok(EmbeddedModel {
            name: Arc::from(spec.name.as_str()),
            variant: spec.version.as_deref().map(Arc::from),
            kind: Kind::Onnx(Arc::new(model)),
        })
    }

    pub fn from_spec(spec: ModelSpec, features: &[&str]) -> anyhow::Result<Self> {
        for (name, w) in spec.weights.iter().chain(&spec.impute) {
            if !features.contains(&name.as_str()) {
                bail!(
                    "the model uses feature {name:?}, which is not one of the configured [[features]] or [schema] request_fields ({})",
                    features.join(", ")
                );
            }
            if !w.is_finite() {
                bail!("weight or impute value for {name:?} is not a finite number");
            }
        }
        if !spec.bias.is_finite() || !spec.threshold.is_finite() {
            bail!("bias and threshold must be finite numbers");
        }
        if spec.weights.is_empty() {
            bail!("the model has no [weights]");
        }
        for f in features {
            if !spec.weights.contains_key(*f) {
                tracing::info!(feature = f, model = %spec.name, "configured feature is not used by the model");
            }
        }
        let terms = features
            .iter()
            .map(|f| {
                (
                    spec.weights.get(*f).copied().unwrap_or(0.0),
                    spec.impute.get(*f).copied(),
                    Arc::from(*f),
                )
            })
            .collect();
        Ok(EmbeddedModel {
            name: Arc::from(spec.name.as_str()),
            variant: spec.version.as_deref().map(Arc::from),
            kind: Kind::Linear(Linear { spec, terms }),
        })
    }

    /// The columns of a CSV answer, in order: `score,label` for a logistic
    /// model, `value` for a linear one (the keys of [`Self::score`]'s object).
    /// An ONNX model answers `score,label`.
    pub fn output_columns(&self) -> &'static [&'static str] {
        match &self.kind {
            Kind::Linear(l) if l.spec.kind == ModelType::Linear => &["value"],
            Kind::Linear(_) | Kind::Onnx(_) => &["score", "label"],
        }
    }

    /// Scores one vector (an ONNX model: a batch of one; a failure is a
    /// null score with the `error`).
    pub fn score(&self, v: &FeatureVector) -> serde_json::Value {
        match &self.kind {
            Kind::Linear(l) => l.score(v),
            Kind::Onnx(_) => match self.score_batch(&[v]) {
                Ok(mut p) => p.pop().unwrap_or(serde_json::Value::Null),
                Err(e) => json!({ "score": null, "error": format!("{e:#}") }),
            },
        }
    }

    /// Scores a batch on the calling thread: one prediction per row, in
    /// order. An ONNX model computes here, so async callers use
    /// [`Model::predict`] (or [`super::onnx::block_in_place`]).
    pub fn score_batch(&self, rows: &[&FeatureVector]) -> anyhow::Result<Vec<serde_json::Value>> {
        match &self.kind {
            Kind::Linear(l) => Ok(rows.iter().map(|r| l.score(r)).collect()),
            Kind::Onnx(m) => m.run(m.prepare(rows)),
        }
    }
}

impl Linear {
    fn score(&self, v: &FeatureVector) -> serde_json::Value {
        let mut z = self.spec.bias;
        for ((weight, impute, name), value) in self.terms.iter().zip(&v.values) {
            if *weight == 0.0 {
                continue;
            }
            let x = match (value, impute) {
                (Some(v), _) => v.as_f64(),
                (None, Some(i)) => *i,
                (None, None) => {
                    return json!({ "score": null, "missing": &**name });
                }
            };
            z += weight * x;
        }
        match self.spec.kind {
            ModelType::Linear => json!({ "value": finite_or_null(z) }),
            ModelType::Logistic => {
                let p = 1.0 / (1.0 + (-z).exp());
                json!({ "score": finite_or_null(p), "label": u8::from(p >= self.spec.threshold) })
            }
        }
    }
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

impl Model for EmbeddedModel {
    fn name(&self) -> Arc<str> {
        self.name.clone()
    }

    fn describe(&self) -> String {
        let version = self
            .variant
            .as_deref()
            .map(|v| format!(" version {v}"))
            .unwrap_or_default();
        match &self.kind {
            Kind::Linear(l) => format!(
                "embedded {:?} model {:?}{version} over {} weighted features",
                l.spec.kind,
                self.name,
                l.spec.weights.len()
            ),
            Kind::Onnx(m) => format!(
                "embedded ONNX model {:?}{version}: {}",
                self.name,
                m.describe()
            ),
        }
    }

    fn predict<'a>(
        &'a self,
        rows: &'a [&'a FeatureVector],
    ) -> BoxFuture<'a, anyhow::Result<BatchPrediction>> {
        Box::pin(async move {
            let predictions = match &self.kind {
                Kind::Linear(l) => rows.iter().map(|r| l.score(r)).collect(),
                Kind::Onnx(m) => {
                    let prepared = m.prepare(rows);
                    let m = m.clone();
                    tokio::task::spawn_blocking(move || m.run(prepared))
                        .await
                        .context("the ONNX scoring task panicked")??
                }
            };
            Ok(BatchPrediction {
                predictions,
                variant: self.variant.clone(),
            })
        })
    }
}

/// The `type` of a model file, if it has one that is a string.
fn model_type(text: &str, json: bool) -> Option<String> {
    if json {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        v.get("type")?.as_str().map(str::to_string)
    } else {
        let v: toml::Table = toml::from_str(text).ok()?;
        v.get("type")?.as_str().map(str::to_string)
    }
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, json: bool) -> anyhow::Result<T> {
    if json {
        Ok(serde_json::from_str(text)?)
    } else {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;

    fn spec() -> ModelSpec {
        toml::from_str(
            r#"
name = "m"
type = "logistic"
bias = -1.0
[weights]
a = 2.0
b = 0.5
[impute]
b = 4.0
"#,
        )
        .unwrap()
    }

    #[test]
    fn scores_with_imputation_and_reports_missing() {
        let m = EmbeddedModel::from_spec(spec(), &["a", "b"]).unwrap();
        let names: crate::record::FeatureNames = vec![Arc::from("a"), Arc::from("b")].into();
        let v = FeatureVector {
            names: names.clone(),
            values: vec![Some(Value::Int(1)), None],
        };
        let s = m.score(&v);
        let p = 1.0 / (1.0 + (-(-1.0 + 2.0 + 2.0f64)).exp());
        assert_eq!(s["score"].as_f64().unwrap(), p);
        assert_eq!(s["label"], 1);
        let v = FeatureVector {
            names,
            values: vec![None, Some(Value::Float(0.0))],
        };
        assert_eq!(m.score(&v)["missing"], "a");
    }

    #[test]
    fn unknown_features_are_refused() {
        let e = EmbeddedModel::from_spec(spec(), &["a"]).err().unwrap();
        assert!(e.to_string().contains("\"b\""), "{e}");
    }
}
