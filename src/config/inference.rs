//! `[inference]`: the model backend, micro-batching, resilience, shadow.

use std::path::PathBuf;

use serde::Deserialize;

use crate::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// A model in this process, from `model`.
    Embedded,
    /// A SageMaker real-time endpoint, called with `InvokeEndpoint`.
    Sagemaker,
    /// No model: the features output is the final per-event output.
    #[default]
    None,
}

/// How rows travel to a SageMaker endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum ContentType {
    /// `{"instances": [[…], …]}` (or `{"inputs": …}`, see `json_key`); a null
    /// feature is JSON `null`.
    #[default]
    #[serde(rename = "application/json")]
    Json,
    /// One CSV line per row, features in config order; a null feature is an
    /// empty field.
    #[serde(rename = "text/csv")]
    Csv,
}

impl ContentType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Csv => "text/csv",
        }
    }
}

/// The top-level key of a JSON request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JsonKey {
    /// `{"instances": [[…]]}` (TensorFlow Serving, SageMaker built-ins).
    #[default]
    Instances,
    /// `{"inputs": [[…]]}` (Hugging Face and TF Serving's columnar form).
    Inputs,
}

impl JsonKey {
    pub fn as_str(self) -> &'static str {
        match self {
            JsonKey::Instances => "instances",
            JsonKey::Inputs => "inputs",
        }
    }
}

/// What answers when the primary model fails for good (after retries, or
/// while the circuit breaker is open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKind {
    /// The batch's records become dead letters carrying the error.
    #[default]
    DeadLetter,
    /// `{"score": fallback_score}` for every record.
    Constant,
    /// The embedded model in `fallback_model`.
    Embedded,
}

/// A second endpoint or variant scored on the same batches, off the primary's
/// latency path; its answers are `kind = "shadow"` records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Defaults to the primary's endpoint (then `target_variant` must differ).
    #[serde(default)]
    pub endpoint_name: Option<String>,
    #[serde(default)]
    pub target_variant: Option<String>,
    /// Shadow batches outstanding at once; a batch that finds none free is
    /// skipped (and counted) rather than delaying the primary.
    #[serde(default = "default_shadow_in_flight")]
    pub max_in_flight: usize,
}

fn default_shadow_in_flight() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    pub backend: Backend,
    /// The embedded model's file (TOML or JSON), see `config/models/`.
    pub model: Option<PathBuf>,
    /// A batch closes at this many records...
    pub max_batch: usize,
    /// ...or when its oldest record has waited this long.
    pub max_wait: Duration,
    /// Batches being scored at once.
    pub max_in_flight: usize,

    // SageMaker.
    /// The endpoint `InvokeEndpoint` calls.
    pub endpoint_name: Option<String>,
    /// Send every request to this production variant.
    pub target_variant: Option<String>,
    /// AWS region; defaults to the standard chain (AWS_REGION, profile, IMDS).
    pub region: Option<String>,
    /// Another runtime endpoint, e.g. `http://127.0.0.1:8080` for `serve-model`.
    pub endpoint_url: Option<String>,
    pub content_type: ContentType,
    pub json_key: JsonKey,
    /// Names given to the columns of a CSV answer (a JSON answer names its own).
    pub csv_output_columns: Vec<String>,

    // Resilience (every backend).
    /// One model call may take this long before it counts as a timeout.
    pub request_timeout: Duration,
    /// Retries after the first attempt, for throttling, 5xx, timeouts and
    /// connection errors; never for 4xx model errors.
    pub max_retries: u32,
    /// Backoff before retry n is `retry_base · 2^(n-1)`, jittered to ±50 %.
    pub retry_base: Duration,
    /// The breaker opens when at least this fraction of calls in `breaker_window` failed...
    pub breaker_error_rate: f64,
    /// ...over this window of processing time...
    pub breaker_window: Duration,
    /// ...and the window holds at least this many calls.
    pub breaker_min_requests: u32,
    /// An open breaker lets one probe through after this long (half-open).
    pub breaker_cooldown: Duration,
    pub fallback: FallbackKind,
    /// `fallback = "constant"`: the score every fallback prediction carries.
    pub fallback_score: Option<f64>,
    /// `fallback = "embedded"`: the model file.
    pub fallback_model: Option<PathBuf>,
    pub shadow: Option<ShadowConfig>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            backend: Backend::None,
            model: None,
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            max_in_flight: 4,
            endpoint_name: None,
            target_variant: None,
            region: None,
            endpoint_url: None,
            content_type: ContentType::Json,
            json_key: JsonKey::Instances,
            csv_output_columns: vec!["score".into()],
            request_timeout: Duration::from_millis(5_000),
            max_retries: 3,
            retry_base: Duration::from_millis(1_000),
            breaker_error_rate: 0.5,
            breaker_window: Duration::from_millis(60_000),
            breaker_min_requests: 20,
            breaker_cooldown: Duration::from_millis(30_000),
            fallback: FallbackKind::DeadLetter,
            fallback_score: None,
            fallback_model: None,
            shadow: None,
        }
    }
}

impl InferenceConfig {
    /// The semantic checks of `[inference]`.
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 || self.max_in_flight == 0 {
            return Err("[inference] max_batch and max_in_flight must be at least 1".into());
        }
        let sagemaker_only = [
            ("endpoint_name", self.endpoint_name.is_some()),
            ("target_variant", self.target_variant.is_some()),
            ("region", self.region.is_some()),
            ("endpoint_url", self.endpoint_url.is_some()),
            ("shadow", self.shadow.is_some()),
        ];
        match self.backend {
            Backend::Embedded if self.model.is_none() => {
                return Err("[inference] backend = \"embedded\" needs `model`, the path of a model file (see config/models/)".into());
            }
            Backend::None if self.model.is_some() => {
                return Err("[inference] `model` is set but backend = \"none\"; set backend = \"embedded\" to use it".into());
            }
            Backend::Sagemaker if self.model.is_some() => {
                return Err("[inference] `model` is the embedded model's file; with backend = \"sagemaker\" use `endpoint_name` (and `fallback_model` for an embedded fallback)".into());
            }
            Backend::Sagemaker => {
                match &self.endpoint_name {
                    None => {
                        return Err(
                            "[inference] backend = \"sagemaker\" needs `endpoint_name`".into()
                        )
                    }
                    Some(name) => check_endpoint_name("endpoint_name", name)?,
                }
                if let Some(url) = &self.endpoint_url {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(format!(
                            "[inference] endpoint_url {url:?} must start with http:// or https://"
                        ));
                    }
                }
                if self.region.as_deref() == Some("") {
                    return Err(
                        "[inference] region must not be empty; omit it to use the AWS chain".into(),
                    );
                }
                if self.csv_output_columns.is_empty()
                    || self.csv_output_columns.iter().any(String::is_empty)
                {
                    return Err(
                        "[inference] csv_output_columns must name at least one column, none empty"
                            .into(),
                    );
                }
                if let Some(shadow) = &self.shadow {
                    if let Some(name) = &shadow.endpoint_name {
                        check_endpoint_name("shadow.endpoint_name", name)?;
                    }
                    if shadow.max_in_flight == 0 {
                        return Err("[inference] shadow.max_in_flight must be at least 1".into());
                    }
                    let same_endpoint = shadow.endpoint_name.is_none()
                        || shadow.endpoint_name == self.endpoint_name;
                    if same_endpoint && shadow.target_variant == self.target_variant {
                        return Err("[inference] shadow must name another endpoint_name or target_variant than the primary".into());
                    }
                }
            }
            _ => {}
        }
        if self.backend != Backend::Sagemaker {
            if let Some((key, _)) = sagemaker_only.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "[inference] `{key}` only applies to backend = \"sagemaker\""
                ));
            }
        }
        if self.request_timeout.millis() <= 0 {
            return Err("[inference] request_timeout must be greater than 0".into());
        }
        if self.max_retries > 10 {
            return Err(format!(
                "[inference] max_retries is {}; at most 10 (backoff doubles each time)",
                self.max_retries
            ));
        }
        if !(self.breaker_error_rate > 0.0 && self.breaker_error_rate <= 1.0) {
            return Err(format!(
                "[inference] breaker_error_rate must be in (0, 1], got {}",
                self.breaker_error_rate
            ));
        }
        if self.breaker_window.millis() <= 0 || self.breaker_cooldown.millis() <= 0 {
            return Err(
                "[inference] breaker_window and breaker_cooldown must be greater than 0".into(),
            );
        }
        if self.breaker_min_requests == 0 {
            return Err("[inference] breaker_min_requests must be at least 1".into());
        }
        match self.fallback {
            FallbackKind::Constant => match self.fallback_score {
                None => {
                    return Err("[inference] fallback = \"constant\" needs `fallback_score`".into())
                }
                Some(x) if !x.is_finite() => {
                    return Err("[inference] fallback_score must be a finite number".into())
                }
                Some(_) => {}
            },
            FallbackKind::Embedded if self.fallback_model.is_none() => {
                return Err("[inference] fallback = \"embedded\" needs `fallback_model`, the path of a model file".into());
            }
            _ => {}
        }
        if self.fallback != FallbackKind::Constant && self.fallback_score.is_some() {
            return Err(
                "[inference] `fallback_score` only applies to fallback = \"constant\"".into(),
            );
        }
        if self.fallback != FallbackKind::Embedded && self.fallback_model.is_some() {
            return Err(
                "[inference] `fallback_model` only applies to fallback = \"embedded\"".into(),
            );
        }
        Ok(())
    }
}

/// SageMaker endpoint names: 1–63 of `[a-zA-Z0-9-]`, not starting or ending with `-`.
fn check_endpoint_name(key: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("[inference] {key} {name:?} is not a SageMaker endpoint name (1-63 letters, digits and hyphens)"))
    }
}
