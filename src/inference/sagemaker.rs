//! `backend = "sagemaker"`: a SageMaker real-time endpoint, called with
//! `InvokeEndpoint`.
//!
//! One concept, one file: about 480 lines of code, its tests below.
//!
//! Wire formats, one request per batch:
//!
//! - `content_type = "application/json"`: `{"instances": [[f1, f2, …], …]}`
//!   (or `{"inputs": …}` with `json_key = "inputs"`), one inner list per row,
//!   features in config order. A missing feature is JSON `null`, never 0: the
//!   model decides what missing means.
//! - `content_type = "text/csv"`: one line per row, features in config order,
//!   a missing feature is an empty field (`3,,0.5`), the convention of
//!   SageMaker's built-in XGBoost and linear learner.
//!
//! The answer is read by its content type: JSON `{"predictions": […]}` (or
//! `{"outputs": …}`), a bare JSON list, or CSV lines. A JSON object per row is
//! kept as it is; a bare number becomes `{"score": x}`; a list becomes
//! `{"scores": […]}`. CSV columns are named by `csv_output_columns` (default
//! `["score"]`). An answer whose row count differs from the request is an
//! error, never a shift of predictions onto the wrong records.
//!
//! Credentials and region come from the standard AWS chain (aws-config);
//! `region` and `endpoint_url` in the config override it. The client is
//! built by `aws/sagemaker.rs`, with the SDK's own retries off:
//! `resilience.rs` retries, so that the breaker sees every attempt and the
//! backoff is the configured one.

use std::sync::Arc;

use anyhow::Context as _;
use aws_config::SdkConfig;
use aws_sdk_sagemakerruntime::config::http::HttpResponse;
use aws_sdk_sagemakerruntime::error::{DisplayErrorContext, ProvideErrorMetadata as _, SdkError};
use aws_sdk_sagemakerruntime::operation::invoke_endpoint::InvokeEndpointError;
use aws_sdk_sagemakerruntime::primitives::Blob;
use aws_sdk_sagemakerruntime::Client;
use serde_json::{json, Value as Json};
use tokio::sync::OnceCell;

use super::resilience::ModelError;
use super::{BatchPrediction, Model};
use crate::aws::ClientSettings;
use crate::config::{ContentType, InferenceConfig, JsonKey};
use crate::flow::BoxFuture;
use crate::record::{FeatureVector, Value};

/// Writes a batch as a request body. Rows are the feature vectors in batch order.
pub fn encode_request(rows: &[&FeatureVector], content_type: ContentType, key: JsonKey) -> Vec<u8> {
    match content_type {
        ContentType::Json => {
            let instances: Vec<&Vec<Option<Value>>> = rows.iter().map(|r| &r.values).collect();
            let mut body = serde_json::Map::with_capacity(1);
            body.insert(
                key.as_str().to_string(),
                serde_json::to_value(instances).expect("feature values always serialize"),
            );
            serde_json::to_vec(&body).expect("JSON values always serialize")
        }
        ContentType::Csv => {
            let mut out =
                String::with_capacity(rows.len() * 16 * rows.first().map_or(1, |r| r.values.len()));
            for row in rows {
                for (i, v) in row.values.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    match v {
                        Some(Value::Int(x)) => out.push_str(&x.to_string()),
                        // `{}` of an f64 is the shortest text that parses back to the same bits.
                        Some(Value::Float(x)) if x.is_finite() => out.push_str(&x.to_string()),
                        // Missing (or non-finite, which JSON calls null too): an empty field.
                        _ => {}
                    }
                }
                out.push('\n');
            }
            out.into_bytes()
        }
    }
}

/// Reads a response body into one prediction object per row.
pub fn parse_response(
    body: &[u8],
    content_type: Option<&str>,
    csv_columns: &[String],
    expected_rows: usize,
) -> Result<Vec<Json>, ModelError> {
    let is_csv = content_type.is_some_and(|c| c.trim_start().starts_with("text/csv"));
    let rows = if is_csv {
        parse_csv_response(body, csv_columns)?
    } else {
        let value: Json = serde_json::from_slice(body).map_err(|e| {
            ModelError::permanent(format!(
                "the endpoint's answer is not JSON ({e}): {}",
                snippet(body)
            ))
        })?;
        let list = match value {
            Json::Array(list) => list,
            Json::Object(mut map) => match ["predictions", "outputs"]
                .iter()
                .find_map(|k| map.remove(*k))
            {
                Some(Json::Array(list)) => list,
                _ => {
                    return Err(ModelError::permanent(format!(
                        "the endpoint's JSON answer has no \"predictions\" list: {}",
                        snippet(body)
                    )))
                }
            },
            _ => {
                return Err(ModelError::permanent(format!(
                    "the endpoint's JSON answer is neither a list nor an object with \"predictions\": {}",
                    snippet(body)
                )))
            }
        };
        list.into_iter()
            .map(|p| match p {
                Json::Object(_) => p,
                Json::Number(_) => json!({ "score": p }),
                Json::Array(_) => json!({ "scores": p }),
                other => json!({ "value": other }),
            })
            .collect()
    };
    if rows.len() != expected_rows {
        return Err(ModelError::permanent(format!(
            "the endpoint answered {} rows for {expected_rows} sent",
            rows.len()
        )));
    }
    Ok(rows)
}

fn parse_csv_response(body: &[u8], columns: &[String]) -> Result<Vec<Json>, ModelError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ModelError::permanent("the endpoint's CSV answer is not UTF-8"))?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != columns.len() {
            return Err(ModelError::permanent(format!(
                "CSV answer line {} has {} columns, but csv_output_columns names {} ({})",
                n + 1,
                fields.len(),
                columns.len(),
                columns.join(",")
            )));
        }
        let mut object = serde_json::Map::with_capacity(columns.len());
        for (name, field) in columns.iter().zip(fields) {
            object.insert(name.clone(), csv_field(field.trim()));
        }
        rows.push(Json::Object(object));
    }
    Ok(rows)
}

/// An empty CSV field is null; a number stays a number (an integer when it
/// is written as one); anything else is a string.
pub fn csv_field(field: &str) -> Json {
    if field.is_empty() {
        return Json::Null;
    }
    if let Ok(i) = field.parse::<i64>() {
        return json!(i);
    }
    match field.parse::<f64>() {
        Ok(x) if x.is_finite() => json!(x),
        _ => Json::String(field.trim_matches('"').to_string()),
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    format!("{text:?}")
}

/// What a [`SageMakerModel`] calls and how.
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    pub endpoint_name: String,
    pub target_variant: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub content_type: ContentType,
    pub json_key: JsonKey,
    pub csv_output_columns: Vec<String>,
}

impl EndpointSettings {
    /// The primary endpoint of `[inference]`.
    pub fn primary(c: &InferenceConfig) -> anyhow::Result<Self> {
        Ok(EndpointSettings {
            endpoint_name: c
                .endpoint_name
                .clone()
                .context("[inference] backend = \"sagemaker\" needs `endpoint_name`")?,
            target_variant: c.target_variant.clone(),
            region: c.region.clone(),
            endpoint_url: c.endpoint_url.clone(),
            content_type: c.content_type,
            json_key: c.json_key,
            csv_output_columns: c.csv_output_columns.clone(),
        })
    }
}

/// A SageMaker endpoint. The AWS client is built on first use (or by
/// [`Model::ready`]), so `shardflow check` never touches the credential chain.
pub struct SageMakerModel {
    settings: EndpointSettings,
    name: Arc<str>,
    base: Option<SdkConfig>,
    client: OnceCell<Client>,
}

impl SageMakerModel {
    pub fn new(settings: EndpointSettings) -> Self {
        SageMakerModel {
            name: Arc::from(settings.endpoint_name.as_str()),
            settings,
            base: None,
            client: OnceCell::new(),
        }
    }

    /// Uses this AWS configuration instead of loading the standard chain
    /// (for programs that embed shardflow and already hold one).
    pub fn with_sdk_config(mut self, sdk: SdkConfig) -> Self {
        self.base = Some(sdk);
        self
    }

    async fn client(&self) -> anyhow::Result<&Client> {
        self.client
            .get_or_try_init(|| async {
                let settings = ClientSettings {
                    region: self.settings.region.clone(),
                    endpoint_url: self.settings.endpoint_url.clone(),
                    ..ClientSettings::default()
                };
                let client = crate::aws::sagemaker::client(&settings, self.base.as_ref()).await?;
                if client.config().region().is_none() {
                    anyhow::bail!(
                        "no AWS region for SageMaker endpoint {:?}: set [inference] region, or AWS_REGION / a profile's region",
                        self.settings.endpoint_name
                    );
                }
                Ok(client)
            })
            .await
    }

    async fn invoke(&self, rows: &[&FeatureVector]) -> anyhow::Result<BatchPrediction> {
        let s = &self.settings;
        let client = self.client().await?;
        let body = encode_request(rows, s.content_type, s.json_key);
        let answer = client
            .invoke_endpoint()
            .endpoint_name(&s.endpoint_name)
            .set_target_variant(s.target_variant.clone())
            .content_type(s.content_type.as_str())
            .accept(s.content_type.as_str())
            .body(Blob::new(body))
            .send()
            .await
            .map_err(|e| classify_sdk_error(&s.endpoint_name, e))?;
        let body = answer.body().map(|b| b.as_ref()).unwrap_or_default();
        let predictions = parse_response(
            body,
            answer.content_type(),
            &s.csv_output_columns,
            rows.len(),
        )?;
        Ok(BatchPrediction {
            predictions,
            variant: answer.invoked_production_variant().map(Arc::from),
        })
    }
}

/// Sorts an SDK failure into retryable or not, and writes what the service
/// said into the message (which becomes the dead letter's reason).
///
/// Throttling (`ThrottlingException`, `ModelNotReadyException`, any 429),
/// 5xx, timeouts and connection failures are transient; a `ValidationError`
/// and other 4xx answers are permanent. A `ModelError`
/// (HTTP 424: SageMaker reached the container and it failed) is judged by the
/// container's own status, `OriginalStatusCode`: 4xx other than 429 is
/// permanent (the request is wrong for this model), 429 and 5xx are
/// transient, and so is 0, SageMaker's code for "no answer from the container"
/// ("Received server error (0) … Your invocation timed out while waiting for a
/// response from container primary"): a cold start or an overloaded container,
/// as transient as our own `request_timeout`. A `ModelError` without a status
/// says nothing more than 424 and is permanent.
fn classify_sdk_error(
    endpoint: &str,
    e: SdkError<InvokeEndpointError, HttpResponse>,
) -> anyhow::Error {
    let transient = |m: String| anyhow::Error::new(ModelError::transient(m));
    let permanent = |m: String| anyhow::Error::new(ModelError::permanent(m));
    match &e {
        SdkError::TimeoutError(_) => transient(format!("endpoint {endpoint}: timed out")),
        SdkError::DispatchFailure(d) => {
            let detail = DisplayErrorContext(&e).to_string();
            if d.is_user() {
                permanent(format!("endpoint {endpoint}: request not sent: {detail}"))
            } else {
                transient(format!("endpoint {endpoint}: connection failed: {detail}"))
            }
        }
        SdkError::ResponseError(_) => transient(format!(
            "endpoint {endpoint}: unreadable response: {}",
            DisplayErrorContext(&e)
        )),
        SdkError::ConstructionFailure(_) => permanent(format!(
            "endpoint {endpoint}: request not built: {}",
            DisplayErrorContext(&e)
        )),
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let err = se.err();
            let text = service_error_text(endpoint, status, err, se.raw().body().bytes());
            if is_retryable(err, status) {
                transient(text)
            } else {
                permanent(text)
            }
        }
        _ => transient(format!("endpoint {endpoint}: {}", DisplayErrorContext(&e))),
    }
}

/// Whether InvokeEndpoint's `err`, answered with HTTP `status`, is worth
/// another try (the policy of [`classify_sdk_error`]).
fn is_retryable(err: &InvokeEndpointError, status: u16) -> bool {
    let code = err.code().unwrap_or("");
    match err {
        InvokeEndpointError::InternalFailure(_)
        | InvokeEndpointError::ServiceUnavailable(_)
        | InvokeEndpointError::ModelNotReadyException(_)
        | InvokeEndpointError::InternalDependencyException(_) => true,
        // Whatever the status: the same request is invalid again.
        InvokeEndpointError::ValidationError(_) => false,
        InvokeEndpointError::ModelError(m) => match m.original_status_code() {
            Some(o) => o == 429 || !(400..500).contains(&o),
            None => false,
        },
        // Not modelled for InvokeEndpoint (ThrottlingException, which AWS
        // documents as HTTP 400; an auth error; a proxy's 502): by code and
        // HTTP status.
        _ => {
            status == 429
                || status >= 500
                || code.contains("Throttl")
                || code == "TooManyRequestsException"
        }
    }
}

/// The longest service text kept in a reason: error bodies are the model
/// container's and can be whole HTML pages or stack traces, and the reason is
/// copied onto every dead letter of the batch.
const MAX_DETAIL: usize = 500;

/// `endpoint fraud: HTTP 424 ModelError (OriginalStatusCode 400): <Message>;
/// OriginalMessage: <…>; LogStreamArn: <…>`. The container's own status and
/// message are spelled out because they are what tells a bad request from a
/// broken model. An answer without an AWS error code (a proxy's HTML page)
/// keeps the start of its body instead.
fn service_error_text(
    endpoint: &str,
    status: u16,
    err: &InvokeEndpointError,
    body: Option<&[u8]>,
) -> String {
    let mut text = format!("endpoint {endpoint}: HTTP {status}");
    match err.code() {
        Some(code) => {
            text.push(' ');
            text.push_str(code);
        }
        None => text.push_str(" without an AWS error code"),
    }
    let model = match err {
        InvokeEndpointError::ModelError(m) => Some(m),
        _ => None,
    };
    if let Some(o) = model.and_then(|m| m.original_status_code()) {
        text.push_str(&format!(" (OriginalStatusCode {o})"));
    }
    // A modelled error's own `Message`, else the one the SDK read generically
    // (`message`, `Message` or `errorMessage` in the body).
    let message = model.and_then(|m| m.message()).or(err.message());
    match message {
        Some(message) if !message.is_empty() => {
            text.push_str(": ");
            text.push_str(&clip(message));
        }
        _ if err.code().is_none() => {
            let body = body.unwrap_or_default();
            text.push_str(&format!(": {}", snippet(body)));
        }
        _ => {}
    }
    if let Some(m) = model {
        if let Some(original) = m.original_message() {
            text.push_str("; OriginalMessage: ");
            text.push_str(&clip(original));
        }
        if let Some(arn) = m.log_stream_arn() {
            text.push_str("; LogStreamArn: ");
            text.push_str(&clip(arn));
        }
    }
    text
}

/// `s` cut to [`MAX_DETAIL`] bytes at a character boundary, with `…` when cut.
fn clip(s: &str) -> String {
    if s.len() <= MAX_DETAIL {
        return s.to_string();
    }
    let mut end = MAX_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl Model for SageMakerModel {
    fn name(&self) -> Arc<str> {
        self.name.clone()
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        format!(
            "SageMaker endpoint {:?}{}{}, {}{}",
            s.endpoint_name,
            s.target_variant
                .as_deref()
                .map(|v| format!(" variant {v:?}"))
                .unwrap_or_default(),
            s.endpoint_url
                .as_deref()
                .map(|u| format!(" at {u}"))
                .unwrap_or_default(),
            s.content_type.as_str(),
            match s.content_type {
                ContentType::Json => format!(" ({{\"{}\": [[…]]}})", s.json_key.as_str()),
                ContentType::Csv => String::new(),
            }
        )
    }

    fn ready(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { self.client().await.map(|_| ()) })
    }

    fn predict<'a>(
        &'a self,
        rows: &'a [&'a FeatureVector],
    ) -> BoxFuture<'a, anyhow::Result<BatchPrediction>> {
        Box::pin(self.invoke(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use aws_sdk_sagemakerruntime::error::ErrorMetadata;
    use aws_sdk_sagemakerruntime::types::error as aws;

    fn meta(code: &str) -> ErrorMetadata {
        ErrorMetadata::builder().code(code).build()
    }

    fn model_error(original: Option<i32>) -> InvokeEndpointError {
        InvokeEndpointError::ModelError(
            aws::ModelError::builder()
                .set_original_status_code(original)
                .message("Received client error (400) from primary with message \"bad row\".")
                .original_message("bad row")
                .log_stream_arn(
                    "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/fraud",
                )
                .meta(meta("ModelError"))
                .build(),
        )
    }

    #[test]
    fn the_retry_policy_of_each_invoke_endpoint_error() {
        let validation = InvokeEndpointError::ValidationError(
            aws::ValidationError::builder()
                .meta(meta("ValidationError"))
                .build(),
        );
        let not_ready = InvokeEndpointError::ModelNotReadyException(
            aws::ModelNotReadyException::builder()
                .meta(meta("ModelNotReadyException"))
                .build(),
        );
        let unavailable = InvokeEndpointError::ServiceUnavailable(
            aws::ServiceUnavailable::builder()
                .meta(meta("ServiceUnavailable"))
                .build(),
        );
        let internal = InvokeEndpointError::InternalFailure(
            aws::InternalFailure::builder()
                .meta(meta("InternalFailure"))
                .build(),
        );
        let throttling = InvokeEndpointError::generic(meta("ThrottlingException"));
        let denied = InvokeEndpointError::generic(meta("AccessDeniedException"));
        for (err, status, retry) in [
            (&validation, 400, false),
            // A ValidationError is the request's fault, whatever the status says.
            (&validation, 500, false),
            (&model_error(Some(400)), 424, false),
            (&model_error(Some(404)), 424, false),
            (&model_error(Some(429)), 424, true),
            (&model_error(Some(500)), 424, true),
            (&model_error(Some(503)), 424, true),
            // SageMaker got no answer from the container (its invocation timed out).
            (&model_error(Some(0)), 424, true),
            (&model_error(None), 424, false),
            (&not_ready, 429, true),
            (&unavailable, 503, true),
            (&internal, 500, true),
            (&throttling, 429, true),
            // AWS's common errors list ThrottlingException as HTTP 400.
            (&throttling, 400, true),
            (&denied, 403, false),
        ] {
            assert_eq!(is_retryable(err, status), retry, "{err:?} at HTTP {status}");
        }
    }

    #[test]
    fn a_model_error_reason_names_the_containers_status_and_message() {
        let text = service_error_text("fraud", 424, &model_error(Some(400)), None);
        assert_eq!(
            text,
            "endpoint fraud: HTTP 424 ModelError (OriginalStatusCode 400): Received client error (400) \
             from primary with message \"bad row\".; OriginalMessage: bad row; LogStreamArn: \
             arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/fraud"
        );
        let html = InvokeEndpointError::unhandled("not JSON");
        let text = service_error_text("fraud", 502, &html, Some(b"<html>502 Bad Gateway</html>"));
        assert_eq!(
            text,
            "endpoint fraud: HTTP 502 without an AWS error code: \"<html>502 Bad Gateway</html>\""
        );
    }

    #[test]
    fn long_service_texts_are_clipped_at_a_character_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(MAX_DETAIL);
        let clipped = clip(&long);
        assert!(clipped.ends_with('…'));
        assert!(clipped.len() <= MAX_DETAIL + '…'.len_utf8());
    }

    fn rows() -> Vec<FeatureVector> {
        let names: crate::record::FeatureNames = vec![Arc::from("a"), Arc::from("b")].into();
        vec![
            FeatureVector {
                names: names.clone(),
                values: vec![Some(Value::Int(3)), None],
            },
            FeatureVector {
                names,
                values: vec![Some(Value::Float(0.1)), Some(Value::Float(-2.5))],
            },
        ]
    }

    #[test]
    fn requests_carry_nulls_as_null_or_empty_fields() {
        let rows = rows();
        let refs: Vec<&FeatureVector> = rows.iter().collect();
        let json = encode_request(&refs, ContentType::Json, JsonKey::Instances);
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"instances":[[3,null],[0.1,-2.5]]}"#
        );
        let json = encode_request(&refs, ContentType::Json, JsonKey::Inputs);
        assert!(String::from_utf8(json)
            .unwrap()
            .starts_with(r#"{"inputs":"#));
        let csv = encode_request(&refs, ContentType::Csv, JsonKey::Instances);
        assert_eq!(String::from_utf8(csv).unwrap(), "3,\n0.1,-2.5\n");
    }

    #[test]
    fn responses_of_every_shape_parse() {
        let cols = vec!["score".to_string()];
        let p = parse_response(
            br#"{"predictions":[{"score":0.5},0.25]}"#,
            Some("application/json"),
            &cols,
            2,
        )
        .unwrap();
        assert_eq!(p, vec![json!({"score":0.5}), json!({"score":0.25})]);
        let p = parse_response(b"[[0.1,0.9]]", None, &cols, 1).unwrap();
        assert_eq!(p, vec![json!({"scores":[0.1,0.9]})]);
        let two = vec!["score".to_string(), "label".to_string()];
        let p = parse_response(b"0.75,1\n,\n", Some("text/csv; charset=utf-8"), &two, 2).unwrap();
        assert_eq!(
            p,
            vec![
                json!({"score":0.75,"label":1}),
                json!({"score":null,"label":null})
            ]
        );
    }

    #[test]
    fn a_wrong_row_count_is_a_permanent_error() {
        let cols = vec!["score".to_string()];
        let e = parse_response(b"[1,2,3]", None, &cols, 2).unwrap_err();
        assert_eq!(e.kind, super::super::resilience::ErrorKind::Permanent);
        assert!(e.message.contains("3 rows for 2"), "{e}");
        assert!(parse_response(b"<html>", None, &cols, 1).is_err());
        assert!(parse_response(b"1,2\n", Some("text/csv"), &cols, 1).is_err());
    }
}
