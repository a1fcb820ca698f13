//! The SageMaker container contract over HTTP, for `shardflow serve-model`:
//! the embedded model served so that the same model file can be deployed as
//! a SageMaker endpoint and tests have a real HTTP model server.
//!
//! - `GET /ping`: 200 when the model is loaded (the health check SageMaker makes).
//! - `POST /invocations`: the container path SageMaker forwards requests to.
//! - `POST /endpoints/{name}/invocations`: the runtime path `InvokeEndpoint`
//!   uses, so the AWS SDK pointed at this server with `endpoint_url` calls it
//!   exactly as it calls SageMaker (any endpoint name is served).
//!
//! The bodies (JSON or CSV rows in, predictions out) are
//! `crate::inference::invocations`; this module is the HTTP around them. A
//! `text/csv` request is read as CSV, anything else as JSON; the answer is
//! CSV when `Accept` asks for `text/csv`, JSON when it asks for JSON, else
//! in the request's format. Every answer carries
//! `X-Amzn-Invoked-Production-Variant`: the requested
//! `X-Amzn-SageMaker-Target-Variant`, or the server's variant name. A
//! malformed request is a 400 with `x-amzn-ErrorType: ValidationError` and a
//! JSON `message`, as the runtime answers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use crate::inference::embedded::EmbeddedModel;
use crate::inference::invocations::{self, Format};
use crate::record::FeatureNames;

/// SageMaker's payload limit for real-time endpoints.
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// The header naming the variant that answered.
pub const VARIANT_HEADER: &str = "x-amzn-invoked-production-variant";
const TARGET_VARIANT_HEADER: &str = "x-amzn-sagemaker-target-variant";

/// The served model: a [`super::Part`] of `serve-model`.
pub struct Container {
    served: Arc<Served>,
    /// The model as `inference::Model::describe` names it, for the startup line.
    describe: String,
}

struct Served {
    model: EmbeddedModel,
    names: FeatureNames,
    variant: HeaderValue,
    requests: metrics::Counter,
    rows: metrics::Counter,
}

impl Container {
    /// Serves `model` over the features `names` (in vector order) as the
    /// production variant `variant`; fails when `variant` cannot be a header value.
    pub fn new(model: EmbeddedModel, names: FeatureNames, variant: &str) -> anyhow::Result<Self> {
        let describe = crate::inference::Model::describe(&model);
        let variant = HeaderValue::from_str(variant)
            .map_err(|_| anyhow::anyhow!("variant name {variant:?} is not a valid header value"))?;
        Ok(Container {
            served: Arc::new(Served {
                model,
                names,
                variant,
                requests: metrics::counter!("shardflow_serve_model_requests_total"),
                rows: metrics::counter!("shardflow_serve_model_rows_total"),
            }),
            describe,
        })
    }

    pub(super) fn routes(&self) -> Router {
        Router::new()
            .route("/ping", get(|| async { StatusCode::OK }))
            .route("/invocations", post(invocations))
            .route("/endpoints/{name}/invocations", post(endpoint_invocations))
            .layer(DefaultBodyLimit::max(MAX_PAYLOAD_BYTES))
            .with_state(self.served.clone())
    }

    pub(super) fn announce(&self, bound: SocketAddr) {
        tracing::info!(target: super::LOG_TARGET, model = %self.describe, "serving on http://{bound} (GET /ping, POST /invocations, POST /endpoints/{{name}}/invocations)");
    }
}

/// The routes alone, ready to be served or wrapped (tests put fault
/// injection in front of them).
pub fn router(model: EmbeddedModel, names: FeatureNames, variant: &str) -> anyhow::Result<Router> {
    Ok(Container::new(model, names, variant)?.routes())
}

async fn endpoint_invocations(
    Path(_name): Path<String>,
    state: State<Arc<Served>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    invocations(state, headers, body).await
}

async fn invocations(State(s): State<Arc<Served>>, headers: HeaderMap, body: Bytes) -> Response {
    s.requests.increment(1);
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let content_type = text(header::CONTENT_TYPE);
    let accept = text(header::ACCEPT);
    let input = if content_type.starts_with("text/csv") {
        Format::Csv
    } else {
        Format::Json
    };
    let rows = match invocations::parse_rows(&body, input, &s.names) {
        Ok(rows) => rows,
        Err(message) => return validation_error(message),
    };
    s.rows.increment(rows.len() as u64);
    let output = if accept.contains("text/csv") {
        Format::Csv
    } else if accept.contains("json") {
        Format::Json
    } else {
        input
    };
    let variant = headers
        .get(TARGET_VARIANT_HEADER)
        .cloned()
        .unwrap_or_else(|| s.variant.clone());
    let body = invocations::answer(&s.model, &s.names, rows, output);
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(output.content_type()),
            ),
            (header::HeaderName::from_static(VARIANT_HEADER), variant),
        ],
        body,
    )
        .into_response()
}

fn validation_error(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [
            ("x-amzn-errortype", "ValidationError"),
            ("content-type", "application/json"),
        ],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}
