//! Inference: models that turn feature vectors into predictions, the
//! resilience around them, and the micro-batcher that feeds them.
//!
//! ```text
//! batcher ─batch─▶ Scorer ─▶ Resilient(primary: embedded | sagemaker) ─▶ predictions
//!                    │            └ timeout, retry, breaker, fallback
//!                    └─spawned, bounded─▶ Resilient(shadow) ─▶ shadow records
//! ```

pub mod batcher;
pub mod embedded;
pub mod invocations;
pub mod onnx;
pub mod resilience;
pub mod sagemaker;

use std::sync::Arc;

use anyhow::Context as _;

use crate::config::{Backend, Config, FallbackKind, InferenceConfig};
use crate::flow::BoxFuture;
use crate::record::{FeatureNames, FeatureVector};
use resilience::{CircuitBreaker, Fallback, Resilient, RetryPolicy};

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
    /// Gets ready to score (builds clients, resolves the AWS region), so that
    /// a run fails at start rather than dead-lettering every batch.
    fn ready(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Scores a batch. A response with another row count is an error, never a shift.
    fn predict<'a>(
        &'a self,
        rows: &'a [&'a FeatureVector],
    ) -> BoxFuture<'a, anyhow::Result<BatchPrediction>>;
}

/// The shadow model and the bound on its outstanding batches.
pub struct Shadow {
    pub model: Resilient,
    pub permits: Arc<tokio::sync::Semaphore>,
}

/// Everything the batcher scores with: the primary model behind its
/// resilience, and the optional shadow.
pub struct Scorer {
    pub primary: Resilient,
    pub shadow: Option<Shadow>,
}

impl Scorer {
    /// A scorer for `model` with the resilience settings of `config` and no shadow.
    pub fn new(model: Arc<dyn Model>, config: &InferenceConfig, fallback: Fallback) -> Self {
        Scorer {
            primary: Resilient::new(
                model,
                RetryPolicy::from_config(config),
                CircuitBreaker::from_config(config),
                fallback,
            ),
            shadow: None,
        }
    }

    pub fn describe(&self) -> String {
        let mut text = self.primary.model().describe();
        if let Some(s) = &self.shadow {
            text.push_str(&format!("; shadow: {}", s.model.model().describe()));
        }
        text
    }

    /// See [`Model::ready`].
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.primary.model().ready().await?;
        if let Some(s) = &self.shadow {
            s.model.model().ready().await.context("the shadow model")?;
        }
        Ok(())
    }
}

/// The configured feature names, in vector order (request fields last).
pub fn feature_names(config: &Config) -> FeatureNames {
    config.vector_names().into()
}

/// Loads an embedded model file checked against the configured features.
pub fn load_embedded(
    config: &Config,
    path: &std::path::Path,
) -> anyhow::Result<embedded::EmbeddedModel> {
    let names = config.vector_names();
    let names: Vec<&str> = names.iter().map(|n| &**n).collect();
    embedded::EmbeddedModel::load(path, &names)
}

/// Builds the configured scorer, validating model files against the
/// configured features. AWS clients are built later, by [`Scorer::ready`].
pub fn build(config: &Config) -> anyhow::Result<Option<Arc<Scorer>>> {
    build_with(config, None)
}

/// [`build`], with an AWS configuration to use instead of the standard chain.
pub fn build_with(
    config: &Config,
    sdk: Option<aws_config::SdkConfig>,
) -> anyhow::Result<Option<Arc<Scorer>>> {
    let inf = &config.inference;
    let sagemaker = |settings: sagemaker::EndpointSettings| {
        let m = sagemaker::SageMakerModel::new(settings);
        match &sdk {
            Some(sdk) => m.with_sdk_config(sdk.clone()),
            None => m,
        }
    };
    let primary: Arc<dyn Model> = match inf.backend {
        Backend::None => return Ok(None),
        Backend::Embedded => {
            let path = inf.model.as_ref().ok_or_else(|| {
                anyhow::anyhow!("[inference] backend = \"embedded\" needs `model`")
            })?;
            Arc::new(load_embedded(config, path)?)
        }
        Backend::Sagemaker => Arc::new(sagemaker(sagemaker::EndpointSettings::primary(inf)?)),
    };
    let fallback = match inf.fallback {
        FallbackKind::DeadLetter => Fallback::DeadLetter,
        FallbackKind::Constant => Fallback::Constant(
            inf.fallback_score
                .context("fallback = \"constant\" needs fallback_score")?,
        ),
        FallbackKind::Embedded => {
            let path = inf
                .fallback_model
                .as_ref()
                .context("fallback = \"embedded\" needs fallback_model")?;
            Fallback::Model(Arc::new(
                load_embedded(config, path).context("[inference] fallback_model")?,
            ))
        }
    };
    let mut scorer = Scorer::new(primary, inf, fallback);
    if let Some(sh) = &inf.shadow {
        let mut settings = sagemaker::EndpointSettings::primary(inf)?;
        if let Some(name) = &sh.endpoint_name {
            settings.endpoint_name = name.clone();
        }
        settings.target_variant = sh.target_variant.clone();
        let model: Arc<dyn Model> = Arc::new(sagemaker(settings));
        // The shadow is never retried and has no fallback: it must not add
        // load when it is failing, and its failures are only counted.
        let policy = RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::from_config(inf)
        };
        scorer.shadow = Some(Shadow {
            model: Resilient::new(
                model,
                policy,
                CircuitBreaker::from_config(inf),
                Fallback::DeadLetter,
            ),
            permits: Arc::new(tokio::sync::Semaphore::new(sh.max_in_flight)),
        });
    }
    Ok(Some(Arc::new(scorer)))
}
