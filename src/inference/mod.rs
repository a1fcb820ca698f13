//! Inference: models that turn feature vectors into predictions, and the
//! micro-batcher that feeds them.

pub mod batcher;
pub mod embedded;

use std::sync::Arc;

use crate::config::{Backend, Config};
use crate::record::FeatureVector;
use crate::source::BoxFuture;

/// The answer for one batch: one prediction object per input row, in order.
#[derive(Debug, Clone)]
pub struct BatchPrediction {
    pub predictions: Vec<serde_json::Value>,
    /// The variant that answered, where the backend tells.
    pub variant: Option<Arc<str>>,
}

/// A model backend.
pub trait Model: Send + Sync {
    /// The model's name, written on every prediction.
    fn name(&self) -> Arc<str>;
    fn describe(&self) -> String;
    /// Scores a batch. A response with another row count is an error, never a shift.
    fn predict<'a>(
        &'a self,
        rows: &'a [&'a FeatureVector],
    ) -> BoxFuture<'a, anyhow::Result<BatchPrediction>>;
}

/// Builds the configured model, validating it against the configured features.
pub fn build(config: &Config) -> anyhow::Result<Option<Arc<dyn Model>>> {
    let inf = &config.inference;
    Ok(match inf.backend {
        Backend::None => None,
        Backend::Embedded => {
            let path = inf.model.as_ref().ok_or_else(|| {
                anyhow::anyhow!("[inference] backend = \"embedded\" needs `model`")
            })?;
            let names: Vec<&str> = config
                .features
                .iter()
                .map(|f| f.name.get_ref().as_str())
                .collect();
            Some(Arc::new(embedded::EmbeddedModel::load(path, &names)?))
        }
    })
}
