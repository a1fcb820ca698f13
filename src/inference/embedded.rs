//! `backend = "embedded"`: a linear or logistic model evaluated in process.
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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use serde_json::json;

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
    spec: ModelSpec,
    name: Arc<str>,
    variant: Option<Arc<str>>,
    /// Weight, imputed value and name for each feature slot, in vector order.
    terms: Vec<(f64, Option<f64>, Arc<str>)>,
}

impl EmbeddedModel {
    /// Loads a model file and checks it against the configured feature names.
    pub fn load(path: &Path, features: &[&str]) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model file {}", path.display()))?;
        let spec: ModelSpec = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).with_context(|| format!("model file {}", path.display()))?
        } else {
            toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("model file {}: {}", path.display(), e))?
        };
        Self::from_spec(spec, features).with_context(|| format!("model file {}", path.display()))
    }

    pub fn from_spec(spec: ModelSpec, features: &[&str]) -> anyhow::Result<Self> {
        for (name, w) in spec.weights.iter().chain(&spec.impute) {
            if !features.contains(&name.as_str()) {
                bail!(
                    "the model uses feature {name:?}, which is not one of the configured [[features]] ({})",
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
            spec,
            terms,
        })
    }

    /// The columns of a CSV answer, in order: `score,label` for a logistic
    /// model, `value` for a linear one (the keys of [`Self::score`]'s object).
    pub fn output_columns(&self) -> &'static [&'static str] {
        match self.spec.kind {
            ModelType::Logistic => &["score", "label"],
            ModelType::Linear => &["value"],
        }
    }

    /// Scores one vector.
    pub fn score(&self, v: &FeatureVector) -> serde_json::Value {
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
        format!(
            "embedded {:?} model {:?}{} over {} weighted features",
            self.spec.kind,
            self.spec.name,
            self.spec
                .version
                .as_deref()
                .map(|v| format!(" version {v}"))
                .unwrap_or_default(),
            self.spec.weights.len()
        )
    }

    fn predict<'a>(
        &'a self,
        rows: &'a [&'a FeatureVector],
    ) -> BoxFuture<'a, anyhow::Result<BatchPrediction>> {
        Box::pin(async move {
            Ok(BatchPrediction {
                predictions: rows.iter().map(|r| self.score(r)).collect(),
                variant: self.variant.clone(),
            })
        })
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
