//! The body of a SageMaker invocation, as `serve-model` answers it: the
//! request's rows parsed in the model's feature order, scored by the
//! embedded model, and the predictions rendered as the answer. The HTTP side
//! (routes, headers, content negotiation, status codes) is
//! `crate::serve::model`.
//!
//! The embedded model is linear, logistic or ONNX (`super::onnx`); the
//! rows of one request are scored as one batch.
//!
//! Requests: JSON `{"instances": rows}`, `{"inputs": rows}` or a bare list of
//! rows, each row a list of numbers (`null` for missing) in feature order or
//! an object by feature name; CSV one row per line, an empty field for
//! missing. Answers: JSON `{"predictions": [{…}, …]}`, or one CSV line per
//! row (`score,label` for a logistic or ONNX model, `value` for a linear one; empty
//! fields for a null score).

use serde_json::{json, Value as Json};

use super::embedded::EmbeddedModel;
use crate::record::{FeatureNames, FeatureVector, Value};

/// The format of a request or answer body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
}

impl Format {
    /// The media type of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv",
        }
    }
}

/// One request row: a value (or none, for missing) per feature, in order.
pub type Row = Vec<Option<Value>>;

/// Parses a request body into rows in the order of `names`; the error is the
/// message a `ValidationError` carries.
pub fn parse_rows(body: &[u8], format: Format, names: &FeatureNames) -> Result<Vec<Row>, String> {
    match format {
        Format::Json => parse_json_rows(body, names),
        Format::Csv => parse_csv_rows(body, names.len()),
    }
}

/// Scores `rows` and renders the predictions, in row order, as an answer body.
pub fn answer(
    model: &EmbeddedModel,
    names: &FeatureNames,
    rows: Vec<Row>,
    format: Format,
) -> Vec<u8> {
    let vectors: Vec<FeatureVector> = rows
        .into_iter()
        .map(|values| FeatureVector {
            names: names.clone(),
            values,
        })
        .collect();
    let refs: Vec<&FeatureVector> = vectors.iter().collect();
    // One call for the request's rows: an ONNX model scores them as one
    // tensor. It computes on this thread, so the runtime is told first.
    let predictions: Vec<Json> = match super::onnx::block_in_place(|| model.score_batch(&refs)) {
        Ok(p) => p,
        // The answer has no error status to carry this (the HTTP side
        // only knows request errors): every row says why it has no score.
        Err(e) => vec![json!({ "score": null, "error": format!("{e:#}") }); refs.len()],
    };
    match format {
        Format::Csv => {
            let columns = model.output_columns();
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
            out.into_bytes()
        }
        Format::Json => serde_json::to_vec(&json!({ "predictions": predictions }))
            .expect("JSON values always serialize"),
    }
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

fn parse_json_rows(body: &[u8], names: &FeatureNames) -> Result<Vec<Row>, String> {
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

fn parse_csv_rows(body: &[u8], width: usize) -> Result<Vec<Row>, String> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
