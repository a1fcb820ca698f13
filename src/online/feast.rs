//! `POST /v1/get-online-features` in Feast's shape, so that a Feast client
//! or dashboard reads shardflow as it reads Feast's feature server.
//!
//! Request: `{"features": ["view:name" | "name", ...], "entities":
//! {"<[schema] key>": [k1, k2, ...]}, "full_feature_names": false}`. A
//! reference's feature view (before the `:`) is not checked: shardflow has
//! one set of features, named by `[[features]] name`. Keys are strings or
//! integers, as the decoder takes them. At most [`MAX_ENTITIES`] entities.
//!
//! Response, columnar as Feast's server answers: `{"metadata":
//! {"feature_names": [entity, features...]}, "results": [{"values",
//! "statuses", "event_timestamps"}, ...]}`, the entity column first (its
//! values as given). Statuses are Feast's: `PRESENT`, `NULL_VALUE`,
//! `NOT_FOUND`; an event timestamp is the key's newest event time (RFC
//! 3339, UTC), and `1970-01-01T00:00:00Z` where Feast writes it: for the
//! entity column and where none is known.
//!
//! [`MAX_ENTITIES`]: super::MAX_ENTITIES

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::engine::{FeatureStatus, Reading};
use crate::record::FeatureNames;
use crate::time::format_rfc3339_millis;

use super::MAX_ENTITIES;

/// What Feast writes for "no timestamp".
const EPOCH: &str = "1970-01-01T00:00:00Z";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    features: Vec<String>,
    entities: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    full_feature_names: bool,
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The entity keys, as the engine names them.
    pub keys: Vec<Arc<str>>,
    /// The entity values as the request gave them, echoed in the answer.
    values: Vec<serde_json::Value>,
    /// Per requested feature: its index in the vector and its name in the
    /// answer.
    features: Vec<(usize, String)>,
    /// The features as requested, and `full_feature_names`: what a part of
    /// the request forwarded to another worker asks.
    references: Vec<String>,
    full_feature_names: bool,
}

impl FeatureStatus {
    /// The status as Feast writes it.
    pub fn as_feast(self) -> &'static str {
        match self {
            FeatureStatus::Present => "PRESENT",
            FeatureStatus::Null => "NULL_VALUE",
            FeatureStatus::NotFound => "NOT_FOUND",
        }
    }
}

impl Request {
    /// Parses and checks a request body against the `[schema]` key
    /// (`entity`) and the configured feature `names`; the error is the
    /// 400's message.
    pub fn parse(body: &[u8], entity: &str, names: &FeatureNames) -> Result<Request, String> {
        let wire: Wire =
            serde_json::from_slice(body).map_err(|e| format!("invalid request: {e}"))?;
        if wire.features.is_empty() {
            return Err("features is empty: name at least one feature".into());
        }
        let mut features = Vec::with_capacity(wire.features.len());
        for reference in &wire.features {
            let (view, name) = match reference.rsplit_once(':') {
                Some((view, name)) => (Some(view), name),
                None => (None, reference.as_str()),
            };
            let index = names.iter().position(|n| &**n == name).ok_or_else(|| {
                let known: Vec<&str> = names.iter().map(|n| &**n).collect();
                format!(
                    "unknown feature {reference:?}: the features are {}",
                    known.join(", ")
                )
            })?;
            let shown = match view {
                Some(view) if wire.full_feature_names => format!("{view}__{name}"),
                _ => name.to_string(),
            };
            features.push((index, shown));
        }
        let mut entities = wire.entities;
        let values = match entities.remove(entity) {
            Some(serde_json::Value::Array(values)) => values,
            Some(_) => return Err(format!("entities.{entity} must be a list of keys")),
            None => {
                return Err(format!(
                    "entities must name the entity key {entity:?} (the [schema] key)"
                ))
            }
        };
        if let Some(other) = entities.keys().next() {
            return Err(format!(
                "entities has {other:?}: the only entity is {entity:?} (the [schema] key)"
            ));
        }
        if values.len() > MAX_ENTITIES {
            return Err(format!(
                "{} entities: at most {MAX_ENTITIES} per request",
                values.len()
            ));
        }
        let keys = values
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                serde_json::Value::String(s) if !s.is_empty() => Ok(Arc::from(s.as_str())),
                serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => {
                    Ok(Arc::from(n.to_string()))
                }
                other => Err(format!(
                    "entities.{entity}[{i}] is {other}: a key is a non-empty string or an integer"
                )),
            })
            .collect::<Result<Vec<Arc<str>>, String>>()?;
        Ok(Request {
            keys,
            values,
            features,
            references: wire.features,
            full_feature_names: wire.full_feature_names,
        })
    }

    /// The request of the entities at `indices` only.
    pub fn subset(&self, indices: &[usize]) -> Request {
        Request {
            keys: indices.iter().map(|&i| self.keys[i].clone()).collect(),
            values: indices.iter().map(|&i| self.values[i].clone()).collect(),
            ..self.clone()
        }
    }

    /// This request as a Feast request body.
    pub fn body(&self, entity: &str) -> Vec<u8> {
        let mut entities = serde_json::Map::new();
        entities.insert(entity.to_string(), self.values.clone().into());
        serde_json::to_vec(&serde_json::json!({
            "features": self.references,
            "entities": entities,
            "full_feature_names": self.full_feature_names,
        }))
        .unwrap_or_default()
    }

    /// The answer to the whole request from the answers to its parts, each
    /// for the entities at its indices (every entity in one part).
    pub fn assemble(
        &self,
        entity: &str,
        parts: Vec<(Vec<usize>, Response)>,
    ) -> Result<Response, String> {
        let n = self.values.len();
        let mut whole = self.respond(entity, &[]);
        for column in whole.results.iter_mut().skip(1) {
            column.values = vec![serde_json::Value::Null; n];
            column.statuses = vec![Cow::Borrowed("NOT_FOUND"); n];
            column.event_timestamps = vec![EPOCH.to_string(); n];
        }
        for (indices, part) in parts {
            let fits = part.results.len() == whole.results.len()
                && part.results.iter().all(|c| {
                    c.values.len() == indices.len()
                        && c.statuses.len() == indices.len()
                        && c.event_timestamps.len() == indices.len()
                });
            if !fits {
                return Err(format!(
                    "an answer for {} entities has {} columns of {:?} entries; {} columns of {} expected",
                    indices.len(),
                    part.results.len(),
                    part.results.iter().map(|c| c.values.len()).collect::<Vec<_>>(),
                    whole.results.len(),
                    indices.len()
                ));
            }
            for (column, from) in whole.results.iter_mut().zip(part.results).skip(1) {
                let rows = from
                    .values
                    .into_iter()
                    .zip(from.statuses)
                    .zip(from.event_timestamps);
                for (&i, ((value, status), stamp)) in indices.iter().zip(rows) {
                    column.values[i] = value;
                    column.statuses[i] = status;
                    column.event_timestamps[i] = stamp;
                }
            }
        }
        Ok(whole)
    }

    /// The answer, from one reading per key (in key order).
    pub fn respond(&self, entity: &str, readings: &[Reading]) -> Response {
        let mut feature_names = vec![entity.to_string()];
        feature_names.extend(self.features.iter().map(|(_, name)| name.clone()));
        let n = self.values.len();
        let mut results = vec![Column {
            values: self.values.clone(),
            statuses: vec![Cow::Borrowed("PRESENT"); n],
            event_timestamps: vec![EPOCH.to_string(); n],
        }];
        let stamps: Vec<String> = readings
            .iter()
            .map(|r| {
                r.last_event_time
                    .map_or_else(|| EPOCH.to_string(), format_rfc3339_millis)
            })
            .collect();
        for (index, _) in &self.features {
            let mut column = Column {
                values: Vec::with_capacity(n),
                statuses: Vec::with_capacity(n),
                event_timestamps: Vec::with_capacity(n),
            };
            for (reading, stamp) in readings.iter().zip(&stamps) {
                let value = reading.features.values[*index];
                let status = reading.statuses[*index];
                column
                    .values
                    .push(serde_json::to_value(value).unwrap_or_default());
                column.statuses.push(Cow::Borrowed(status.as_feast()));
                column.event_timestamps.push(match status {
                    FeatureStatus::NotFound => EPOCH.to_string(),
                    _ => stamp.clone(),
                });
            }
            results.push(column);
        }
        Response {
            metadata: Metadata { feature_names },
            results,
        }
    }
}

/// Feast's answer (read back from another worker too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub metadata: Metadata,
    pub results: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub feature_names: Vec<String>,
}

/// One column: a value, a status and a timestamp per entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub values: Vec<serde_json::Value>,
    pub statuses: Vec<Cow<'static, str>>,
    pub event_timestamps: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{FeatureVector, Value};

    fn names() -> FeatureNames {
        vec![Arc::from("txn_count_1m"), Arc::from("amount_sum_1m")].into()
    }

    fn parse(body: &str) -> Result<Request, String> {
        Request::parse(body.as_bytes(), "userId", &names())
    }

    #[test]
    fn a_feast_request_names_features_with_or_without_their_view() {
        let r = parse(
            r#"{"features": ["stats:amount_sum_1m", "txn_count_1m"], "entities": {"userId": ["u1", 7]}}"#,
        )
        .unwrap();
        assert_eq!(r.keys, vec![Arc::from("u1"), Arc::from("7")]);
        assert_eq!(
            r.features,
            vec![
                (1, "amount_sum_1m".to_string()),
                (0, "txn_count_1m".to_string())
            ]
        );
        let full = parse(
            r#"{"features": ["stats:amount_sum_1m"], "entities": {"userId": []}, "full_feature_names": true}"#,
        )
        .unwrap();
        assert_eq!(full.features, vec![(1, "stats__amount_sum_1m".to_string())]);
        assert!(full.keys.is_empty());
    }

    #[test]
    fn bad_feast_requests_say_what_is_wrong() {
        let e = parse(r#"{"features": ["nope"], "entities": {"userId": ["u1"]}}"#).unwrap_err();
        assert!(e.contains("unknown feature \"nope\""), "{e}");
        assert!(e.contains("txn_count_1m, amount_sum_1m"), "{e}");
        let e = parse(r#"{"features": [], "entities": {"userId": ["u1"]}}"#).unwrap_err();
        assert!(e.contains("features is empty"), "{e}");
        let e =
            parse(r#"{"features": ["txn_count_1m"], "entities": {"user": ["u1"]}}"#).unwrap_err();
        assert!(e.contains("\"userId\""), "{e}");
        let e =
            parse(r#"{"features": ["txn_count_1m"], "entities": {"userId": ["u1"], "x": [1]}}"#)
                .unwrap_err();
        assert!(e.contains("\"x\""), "{e}");
        let e =
            parse(r#"{"features": ["txn_count_1m"], "entities": {"userId": [1.5]}}"#).unwrap_err();
        assert!(e.contains("entities.userId[0] is 1.5"), "{e}");
        let e =
            parse(r#"{"features": ["txn_count_1m"], "entities": {"userId": "u1"}}"#).unwrap_err();
        assert!(e.contains("must be a list"), "{e}");
        let e = parse(r#"{"features": ["txn_count_1m"], "entities": {"userId": ["u1"]}, "feature_service": "s"}"#)
            .unwrap_err();
        assert!(e.contains("unknown field `feature_service`"), "{e}");
        let e = parse("not json").unwrap_err();
        assert!(e.starts_with("invalid request: "), "{e}");
    }

    #[test]
    fn at_most_a_thousand_entities() {
        let keys = |n: usize| {
            (0..n)
                .map(|i| format!("\"u{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        let body = |n| {
            format!(
                r#"{{"features": ["txn_count_1m"], "entities": {{"userId": [{}]}}}}"#,
                keys(n)
            )
        };
        assert_eq!(parse(&body(MAX_ENTITIES)).unwrap().keys.len(), MAX_ENTITIES);
        let e = parse(&body(MAX_ENTITIES + 1)).unwrap_err();
        assert!(e.contains("1001 entities: at most 1000"), "{e}");
    }

    #[test]
    fn the_answer_is_columnar_with_the_entity_first() {
        let r = parse(
            r#"{"features": ["amount_sum_1m", "txn_count_1m"], "entities": {"userId": ["u1", 7]}}"#,
        )
        .unwrap();
        let readings = [
            Reading {
                features: FeatureVector {
                    names: names(),
                    values: vec![Some(Value::Int(2)), None],
                },
                statuses: vec![FeatureStatus::Present, FeatureStatus::Null],
                last_event_time: Some(1_700_000_000_000),
            },
            Reading {
                features: FeatureVector::empty(names()),
                statuses: vec![FeatureStatus::NotFound; 2],
                last_event_time: None,
            },
        ];
        let answer = serde_json::to_value(r.respond("userId", &readings)).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({
                "metadata": {"feature_names": ["userId", "amount_sum_1m", "txn_count_1m"]},
                "results": [
                    {"values": ["u1", 7], "statuses": ["PRESENT", "PRESENT"],
                     "event_timestamps": [EPOCH, EPOCH]},
                    {"values": [null, null], "statuses": ["NULL_VALUE", "NOT_FOUND"],
                     "event_timestamps": ["2023-11-14T22:13:20.000Z", EPOCH]},
                    {"values": [2, null], "statuses": ["PRESENT", "NOT_FOUND"],
                     "event_timestamps": ["2023-11-14T22:13:20.000Z", EPOCH]},
                ]
            })
        );
    }
}
