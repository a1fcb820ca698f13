//! The JSON answers of `GET /v1/features/{key}` and `POST /v1/score`.
//!
//! Both carry the vector as a `features` object by feature name (config
//! order, `null` for a missing value, as in the `features` output) and a
//! `statuses` object beside it, so a caller can tell a new key
//! (`NOT_FOUND`) from an empty window (`NULL`). Times are epoch
//! milliseconds, as everywhere in shardflow's output; a watermark no event
//! has set yet is `null`. A score answer has the fields of a `prediction`
//! output record (`prediction`, `model`, `variant`, `fallback`,
//! `latency_ms`) when a model is configured.

use std::sync::Arc;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::engine::{Evaluation, FeatureStatus, Reading};
use crate::record::{Event, FeatureNames, FeatureVector};
use crate::time::Millis;

impl FeatureStatus {
    /// The status as `/v1/features` and `/v1/score` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureStatus::Present => "PRESENT",
            FeatureStatus::Null => "NULL",
            FeatureStatus::NotFound => "NOT_FOUND",
        }
    }
}

/// Statuses by feature name, in vector order.
#[derive(Debug, Clone, PartialEq)]
pub struct Statuses {
    names: FeatureNames,
    statuses: Vec<FeatureStatus>,
}

impl Serialize for Statuses {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.names.len()))?;
        for (name, status) in self.names.iter().zip(&self.statuses) {
            map.serialize_entry(&**name, status.as_str())?;
        }
        map.end()
    }
}

/// A watermark as the API writes it: `null` before any event set one.
fn watermark(w: Millis) -> Option<Millis> {
    (w != Millis::MIN).then_some(w)
}

/// `GET /v1/features/{key}`:
/// `{"key", "at", "watermark", "features", "statuses", "last_event_time"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeaturesBody {
    pub key: Arc<str>,
    /// The event time the vector is as of.
    pub at: Millis,
    pub watermark: Option<Millis>,
    pub features: FeatureVector,
    pub statuses: Statuses,
    /// The newest event time in the key's state, `null` when not known
    /// (a key not seen since the state was last read back from RocksDB).
    pub last_event_time: Option<Millis>,
}

impl FeaturesBody {
    pub fn new(key: Arc<str>, at: Millis, w: Millis, reading: Reading) -> FeaturesBody {
        FeaturesBody {
            key,
            at,
            watermark: watermark(w),
            statuses: Statuses {
                names: reading.features.names.clone(),
                statuses: reading.statuses,
            },
            features: reading.features,
            last_event_time: reading.last_event_time,
        }
    }
}

/// `POST /v1/score`: `{"key", "event_time", "watermark", "late",
/// "features", "statuses"}` and, with a model, `"prediction", "model",
/// "variant", "fallback", "latency_ms"`. A late event (every window of it
/// purged, so the stream would send it to the late output unscored) has
/// `late: true`, null features and no prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreBody {
    pub key: Arc<str>,
    pub event_time: Millis,
    pub watermark: Option<Millis>,
    pub late: bool,
    pub features: FeatureVector,
    pub statuses: Statuses,
    /// Flattened: absent without a model or for a late event.
    #[serde(flatten)]
    pub prediction: Option<Predicted>,
}

/// The model's part of a score answer, as in a `prediction` record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Predicted {
    pub prediction: serde_json::Value,
    pub model: Arc<str>,
    pub variant: Option<Arc<str>>,
    pub fallback: bool,
    pub latency_ms: f64,
}

impl ScoreBody {
    pub fn new(
        event: &Event,
        w: Millis,
        evaluation: Evaluation,
        names: &FeatureNames,
    ) -> ScoreBody {
        let (late, features, statuses) = match evaluation {
            Evaluation::Features(r) => (false, r.features, r.statuses),
            Evaluation::Late => (
                true,
                FeatureVector::empty(names.clone()),
                vec![FeatureStatus::Null; names.len()],
            ),
        };
        ScoreBody {
            key: Arc::from(&*event.key),
            event_time: event.event_time,
            watermark: watermark(w),
            late,
            statuses: Statuses {
                names: features.names.clone(),
                statuses,
            },
            features,
            prediction: None,
        }
    }

    /// The vector to score: none for a late event.
    pub fn vector(&self) -> Option<&FeatureVector> {
        (!self.late).then_some(&self.features)
    }

    /// Records the model's answer (`None`: the model answered no row,
    /// written as `null`).
    pub fn predicted(
        &mut self,
        prediction: Option<serde_json::Value>,
        model: Arc<str>,
        variant: Option<Arc<str>>,
        fallback: bool,
        latency_ms: f64,
    ) {
        self.prediction = Some(Predicted {
            prediction: prediction.unwrap_or(serde_json::Value::Null),
            model,
            variant,
            fallback,
            latency_ms,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Position, Value};

    fn names() -> FeatureNames {
        vec![Arc::from("count_1m"), Arc::from("sum_1m")].into()
    }

    #[test]
    fn a_features_answer_names_every_feature_with_its_status() {
        let reading = Reading {
            features: FeatureVector {
                names: names(),
                values: vec![Some(Value::Int(3)), None],
            },
            statuses: vec![FeatureStatus::Present, FeatureStatus::Null],
            last_event_time: Some(1_700_000_000_000),
        };
        let body = FeaturesBody::new("u1".into(), 1_700_000_000_500, 1_699_999_995_000, reading);
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"key":"u1","at":1700000000500,"watermark":1699999995000,"features":{"count_1m":3,"sum_1m":null},"statuses":{"count_1m":"PRESENT","sum_1m":"NULL"},"last_event_time":1700000000000}"#
        );
    }

    #[test]
    fn an_unknown_key_and_an_unset_watermark_are_nulls_not_errors() {
        let reading = Reading {
            features: FeatureVector::empty(names()),
            statuses: vec![FeatureStatus::NotFound; 2],
            last_event_time: None,
        };
        let body = FeaturesBody::new("new".into(), 5, Millis::MIN, reading);
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["watermark"], serde_json::Value::Null);
        assert_eq!(json["last_event_time"], serde_json::Value::Null);
        assert_eq!(json["statuses"]["sum_1m"], "NOT_FOUND");
        assert_eq!(json["features"]["count_1m"], serde_json::Value::Null);
    }

    fn event() -> Event {
        Event {
            position: Position::new(Arc::from("api"), "score"),
            arrival: 0,
            key: "u1".into(),
            event_time: 10,
            fields: Default::default(),
            raw: bytes::Bytes::new(),
        }
    }

    #[test]
    fn a_score_answer_has_the_fields_of_a_prediction_record() {
        let reading = Reading {
            features: FeatureVector {
                names: names(),
                values: vec![Some(Value::Int(1)), Some(Value::Float(2.5))],
            },
            statuses: vec![FeatureStatus::Present; 2],
            last_event_time: Some(10),
        };
        let mut body = ScoreBody::new(&event(), 4, Evaluation::Features(reading), &names());
        let plain = serde_json::to_string(&body).unwrap();
        assert_eq!(
            plain,
            r#"{"key":"u1","event_time":10,"watermark":4,"late":false,"features":{"count_1m":1,"sum_1m":2.5},"statuses":{"count_1m":"PRESENT","sum_1m":"PRESENT"}}"#
        );
        assert!(body.vector().is_some());
        body.predicted(
            Some(serde_json::json!({"score": 0.25, "label": 0})),
            "m".into(),
            Some("1".into()),
            false,
            0.5,
        );
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["prediction"]["score"], 0.25);
        assert_eq!(json["model"], "m");
        assert_eq!(json["variant"], "1");
        assert_eq!(json["fallback"], false);
        assert_eq!(json["latency_ms"], 0.5);
    }

    #[test]
    fn a_late_event_has_no_vector_to_score() {
        let body = ScoreBody::new(&event(), 1_000, Evaluation::Late, &names());
        assert!(body.late);
        assert!(body.vector().is_none());
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["late"], true);
        assert_eq!(json["statuses"]["count_1m"], "NULL");
        assert!(json.get("prediction").is_none());
    }
}
