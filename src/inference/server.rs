//! `shardflow serve-model`: the embedded model behind the SageMaker
//! container contract, so the same model file can be deployed as a
//! SageMaker endpoint and tests have a real HTTP model server.
//!
//! - `GET /ping`: 200 when the model is loaded (the health check SageMaker makes).
//! - `POST /invocations`: the container path SageMaker forwards requests to.
//! - `POST /endpoints/{name}/invocations`: the runtime path `InvokeEndpoint`
//!   uses, so the AWS SDK pointed at this server with `endpoint_url` calls it
//!   exactly as it calls SageMaker (any endpoint name is served).
//!
//! Requests: `application/json` bodies `{"instances": rows}`, `{"inputs": rows}`
//! or a bare list of rows, each row a list of numbers (`null` for missing) in
//! the config's feature order or an object by feature name; `text/csv` bodies
//! one row per line, an empty field for missing. Answers: JSON
//! `{"predictions": [{…}, …]}` or, when the `Accept` header asks for
//! `text/csv`, one CSV line per row (`score,label` for a logistic model,
//! `value` for a linear one; empty fields for a null score). Every answer
//! carries `X-Amzn-Invoked-Production-Variant`: the requested
//! `X-Amzn-SageMaker-Target-Variant`, or the server's variant name.
//! A malformed request is a 400 with `x-amzn-ErrorType: ValidationError` and
//! a JSON `message`, as the runtime answers.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value as Json};

use super::embedded::EmbeddedModel;
use crate::record::{FeatureNames, FeatureVector, Value};

/// SageMaker's payload limit for real-time endpoints.
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// The header naming the variant that answered.
pub const VARIANT_HEADER: &str = "x-amzn-invoked-production-variant";
const TARGET_VARIANT_HEADER: &str = "x-amzn-sagemaker-target-variant";

struct Served {
    model: EmbeddedModel,
    names: FeatureNames,
    variant: HeaderValue,
    requests: metrics::Counter,
    rows: metrics::Counter,
}

/// The routes of the model server, ready to be served or wrapped (tests put
/// fault injection in front of it).
pub fn router(model: EmbeddedModel, names: FeatureNames, variant: &str) -> anyhow::Result<Router> {
    let served = Arc::new(Served {
        model,
        names,
        variant: HeaderValue::from_str(variant)
            .map_err(|_| anyhow::anyhow!("variant name {variant:?} is not a valid header value"))?,
        requests: metrics::counter!("shardflow_serve_model_requests_total"),
        rows: metrics::counter!("shardflow_serve_model_rows_total"),
    });
    Ok(Router::new()
        .route("/ping", get(|| async { StatusCode::OK }))
        .route("/invocations", post(invocations))
        .route("/endpoints/{name}/invocations", post(endpoint_invocations))
        .layer(DefaultBodyLimit::max(MAX_PAYLOAD_BYTES))
        .with_state(served))
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
    let csv_in = content_type.starts_with("text/csv");
    let rows = match if csv_in {
        parse_csv_rows(&body, s.names.len())
    } else {
        parse_json_rows(&body, &s.names)
    } {
        Ok(rows) => rows,
        Err(message) => return validation_error(message),
    };
    s.rows.increment(rows.len() as u64);
    let predictions: Vec<Json> = rows
        .into_iter()
        .map(|values| {
            s.model.score(&FeatureVector {
                names: s.names.clone(),
                values,
            })
        })
        .collect();
    let csv_out = if accept.contains("text/csv") {
        true
    } else if accept.contains("json") {
        false
    } else {
        csv_in
    };
    let variant = headers
        .get(TARGET_VARIANT_HEADER)
        .cloned()
        .unwrap_or_else(|| s.variant.clone());
    let (content_type, body) = if csv_out {
        let columns = s.model.output_columns();
        let mut out = String::with_capacity(predictions.len() * 24);
        for p in &predictions {
            for (i, c) in columns.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match &p[*c] {
                    Json::Null => {}
                    v => out.push_str(&v.to_string()),
                }
            }
            out.push('\n');
        }
        ("text/csv", out.into_bytes())
    } else {
        (
            "application/json",
            serde_json::to_vec(&json!({ "predictions": predictions }))
                .expect("JSON values always serialize"),
        )
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
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

/// A number (or null) in a request row.
fn number(v: &Json, row: usize, col: &str) -> Result<Option<Value>, String> {
    match v {
        Json::Null => Ok(None),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Ok(Some(Value::Int(i))),
            None => n
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| Some(Value::Float(x)))
                .ok_or_else(|| format!("row {row}, {col}: not a finite number")),
        },
        other => Err(format!(
            "row {row}, {col}: expected a number or null, got {other}"
        )),
    }
}

fn parse_json_rows(body: &[u8], names: &FeatureNames) -> Result<Vec<Vec<Option<Value>>>, String> {
    let value: Json =
        serde_json::from_slice(body).map_err(|e| format!("the request body is not JSON: {e}"))?;
    let rows = match value {
        Json::Array(rows) => rows,
        Json::Object(mut map) => {
            match ["instances", "inputs"].iter().find_map(|k| map.remove(*k)) {
                Some(Json::Array(rows)) => rows,
                _ => {
                    return Err(
                        "expected {\"instances\": [rows]}, {\"inputs\": [rows]} or a list of rows"
                            .into(),
                    )
                }
            }
        }
        _ => {
            return Err(
                "expected {\"instances\": [rows]}, {\"inputs\": [rows]} or a list of rows".into(),
            )
        }
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| match row {
            Json::Array(values) => {
                if values.len() != names.len() {
                    return Err(format!(
                        "row {i} has {} values; the model takes {} features ({})",
                        values.len(),
                        names.len(),
                        names.join(", ")
                    ));
                }
                values
                    .iter()
                    .zip(names.iter())
                    .map(|(v, n)| number(v, i, n))
                    .collect()
            }
            Json::Object(map) => {
                if let Some(unknown) = map
                    .keys()
                    .find(|k| !names.iter().any(|n| &**n == k.as_str()))
                {
                    return Err(format!("row {i}: unknown feature {unknown:?}"));
                }
                names
                    .iter()
                    .map(|n| number(map.get(&**n).unwrap_or(&Json::Null), i, n))
                    .collect()
            }
            _ => Err(format!(
                "row {i} is neither a list of numbers nor an object"
            )),
        })
        .collect()
}

fn parse_csv_rows(body: &[u8], width: usize) -> Result<Vec<Vec<Option<Value>>>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the CSV body is not UTF-8".to_string())?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != width {
            return Err(format!(
                "CSV line {} has {} fields; the model takes {width} features",
                i + 1,
                fields.len()
            ));
        }
        let row = fields
            .iter()
            .map(|f| {
                let f = f.trim();
                if f.is_empty() {
                    Ok(None)
                } else if let Ok(x) = f.parse::<i64>() {
                    Ok(Some(Value::Int(x)))
                } else {
                    match f.parse::<f64>() {
                        Ok(x) if x.is_finite() => Ok(Some(Value::Float(x))),
                        _ => Err(format!("CSV line {}: {f:?} is not a finite number", i + 1)),
                    }
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        rows.push(row);
    }
    Ok(rows)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> FeatureNames {
        vec![Arc::from("a"), Arc::from("b")].into()
    }

    #[test]
    fn json_rows_by_position_or_name() {
        let rows = parse_json_rows(br#"{"instances":[[1,null],{"b":2.5}]}"#, &names()).unwrap();
        assert_eq!(rows[0], vec![Some(Value::Int(1)), None]);
        assert_eq!(rows[1], vec![None, Some(Value::Float(2.5))]);
        assert!(parse_json_rows(br#"[[1]]"#, &names())
            .unwrap_err()
            .contains("2 features"));
        assert!(parse_json_rows(br#"[{"c":1}]"#, &names()).is_err());
        assert!(parse_json_rows(br#"[["x",1]]"#, &names()).is_err());
    }

    #[test]
    fn csv_rows_with_empty_fields() {
        let rows = parse_csv_rows(b"1,\n0.5,-3\n", 2).unwrap();
        assert_eq!(rows[0], vec![Some(Value::Int(1)), None]);
        assert_eq!(rows[1], vec![Some(Value::Float(0.5)), Some(Value::Int(-3))]);
        assert!(parse_csv_rows(b"1,2,3\n", 2).is_err());
        assert!(parse_csv_rows(b"1,x\n", 2).is_err());
    }
}
