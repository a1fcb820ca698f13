//! The records that flow between stages, in one place.
//!
//! One concept, one file: about 540 lines of code, its tests below.
//!
//! `RawRecord` leaves a source, `Event` leaves the decoder, and `Output` is
//! everything a sink can be given. Every output carries a deterministic id so
//! that a consumer can deduplicate what an at-least-once restart produces
//! again.

use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use smol_str::SmolStr;

use crate::time::Millis;

mod ndjson;

pub use ndjson::LineWriter;

/// Where a record came from: its partition (shard, file, archive group) and
/// its place in that partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Shard id, file name or archive partition. Also the watermark partition.
    pub partition: Arc<str>,
    /// Source-defined sequence: a Kinesis sequence number, a file line number.
    /// Inline up to 23 bytes (a line number, an archive's sequence), so
    /// that most records' positions take no allocation of their own.
    pub sequence: SmolStr,
    /// Index of a user record inside a KPL aggregate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_sequence: Option<u64>,
    /// Source-private hint for resuming right after this record (a file's
    /// byte offset after the line, never 0: a line takes a byte at least).
    /// Not part of the record's identity. Non-zero, so that the option
    /// takes no room of its own: with an inline sequence, a position is 64
    /// bytes, and an `Output` 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_offset: Option<NonZeroU64>,
}

impl Position {
    pub fn new(partition: Arc<str>, sequence: impl Into<SmolStr>) -> Self {
        Position {
            partition,
            sequence: sequence.into(),
            sub_sequence: None,
            resume_offset: None,
        }
    }

    /// The [`Display`](fmt::Display) form in one allocation, sized up front:
    /// every per-event output carries one, and `to_string` grows its
    /// buffer from empty.
    pub fn id(&self) -> String {
        use std::fmt::Write as _;
        // ":" and at most 20 digits of a u64.
        let sub = if self.sub_sequence.is_some() { 21 } else { 0 };
        let mut id = String::with_capacity(self.partition.len() + 1 + self.sequence.len() + sub);
        // Pieces pushed directly: the formatting machinery costs more than
        // the copies here, once per event.
        id.push_str(&self.partition);
        id.push('/');
        id.push_str(&self.sequence);
        if let Some(sub) = self.sub_sequence {
            let _ = write!(id, ":{sub}");
        }
        id
    }
}

/// `partition/sequence[:sub]`, the id of every per-event output.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.partition, self.sequence)?;
        if let Some(sub) = self.sub_sequence {
            write!(f, ":{sub}")?;
        }
        Ok(())
    }
}

/// Bytes as a source delivered them, before any decoding.
#[derive(Clone, Debug)]
pub struct RawRecord {
    pub position: Position,
    /// Processing time at which the source received the record.
    pub arrival: Millis,
    pub bytes: Bytes,
    /// Replay only: the pipeline watermark the live run had just before it
    /// processed this record (from a `raw` archive record). The replay
    /// advances to it first, so that idleness decisions of the live run,
    /// which depended on its wall clock, are reproduced exactly.
    pub replay_watermark: Option<Millis>,
}

/// A typed value of a schema field.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    F64(f64),
    I64(i64),
    Str(Arc<str>),
    Bool(bool),
}

impl FieldValue {
    /// The numeric view aggregates use; strings and booleans have none.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            FieldValue::F64(v) => Some(*v),
            FieldValue::I64(v) => Some(*v as f64),
            FieldValue::Bool(_) | FieldValue::Str(_) => None,
        }
    }
}

/// Schema fields held inline in an [`Event`]: a schema rarely names more.
pub const INLINE_FIELDS: usize = 4;

/// An event's fields. Inline up to [`INLINE_FIELDS`]: a `Vec` cost an
/// allocation per event on the decoding thread and its free on the
/// engine's, each a cache miss on memory the other core last wrote.
pub type Fields = SmallVec<[Option<FieldValue>; INLINE_FIELDS]>;

/// An entity key: inline up to 23 bytes (an account, card or device
/// number), so that the engine's lists and every output it is in hold a
/// copy of it rather than a count shared between threads, and a sink reads
/// its bytes from the output itself. A longer key (a UUID) shares one
/// allocation, as an `Arc<str>` does.
pub type Key = SmolStr;

/// A decoded record: key, event time and schema fields in schema order.
#[derive(Clone, Debug)]
pub struct Event {
    pub position: Position,
    pub arrival: Millis,
    pub key: Key,
    pub event_time: Millis,
    /// One slot per `[schema].fields` entry, in the schema's order; `None`
    /// when an optional field is absent.
    pub fields: Fields,
    /// The original JSON, kept for the late side output and the raw archive.
    pub raw: Bytes,
}

/// An aggregate's result. Counts stay integers on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
}

impl Value {
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Value::Int(v) => s.serialize_i64(v),
            // JSON has no NaN or infinity; a non-finite result is reported as null.
            Value::Float(v) if v.is_finite() => s.serialize_f64(v),
            Value::Float(_) => s.serialize_none(),
        }
    }
}

/// Feature names in config order, shared by every vector.
pub type FeatureNames = Arc<[Arc<str>]>;

/// A feature vector: values in the order of `names`; `None` is a missing value.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureVector {
    pub names: FeatureNames,
    pub values: Vec<Option<Value>>,
}

impl FeatureVector {
    pub fn empty(names: FeatureNames) -> Self {
        let values = vec![None; names.len()];
        FeatureVector { names, values }
    }
}

impl Serialize for FeatureVector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.names.len()))?;
        for (name, value) in self.names.iter().zip(&self.values) {
            map.serialize_entry(&**name, value)?;
        }
        map.end()
    }
}

/// One accepted event with its feature vector.
#[derive(Clone, Debug)]
pub struct FeatureRecord {
    pub id: String,
    pub key: Key,
    pub event_time: Millis,
    pub features: FeatureVector,
    /// When the event's record arrived (processing time, epoch ms), for
    /// `shardflow_stage_seconds`; not part of the output, nor of equality.
    pub arrival: Millis,
}

impl PartialEq for FeatureRecord {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.key == other.key
            && self.event_time == other.event_time
            && self.features == other.features
    }
}

/// A model's answer for one feature vector.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictionRecord {
    pub features: FeatureRecord,
    /// The model's output object, e.g. `{"score":0.93,"label":1}`.
    pub prediction: serde_json::Value,
    pub model: Arc<str>,
    /// The production variant that answered (SageMaker), or the embedded model's version.
    pub variant: Option<Arc<str>>,
    /// True when the primary model failed and the configured fallback answered.
    pub fallback: bool,
    /// Time spent in the model call for this record's batch.
    pub latency_ms: f64,
}

/// The value of one feature for one key in one window.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowResult {
    pub key: Key,
    /// Inline (a `SmolStr`, like [`Key`]): a result per key and feature
    /// each cloning one shared count, bumped by the engine and dropped by
    /// the sink, kept that count's line moving between the two cores.
    pub feature: SmolStr,
    pub window_start: Millis,
    pub window_end: Millis,
    pub value: Option<Value>,
    /// 0 when the watermark first passes the window end, +1 for each
    /// allowed-late update.
    pub revision: u32,
}

impl WindowResult {
    pub fn id(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.feature, self.key, self.window_end, self.revision
        )
    }
}

/// An event none of whose windows could still take it.
#[derive(Clone, Debug, PartialEq)]
pub struct LateRecord {
    pub id: String,
    pub key: Key,
    pub event_time: Millis,
    /// The pipeline watermark when the event arrived.
    pub watermark: Millis,
    pub raw: Bytes,
}

/// Input that could not become an event, with the reason.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub reason: String,
    pub position: Position,
    pub raw: Bytes,
}

/// An input record as it entered the engine, for the archive: replaying
/// these reproduces the run that wrote them (see `source/s3`).
#[derive(Clone, Debug, PartialEq)]
pub struct RawOutput {
    pub position: Position,
    /// The decoded entity key and event time; `None` when the record was
    /// a dead letter. The key is not part of the written record (archives
    /// hold the input as it came): sinks partition by it, which is how a
    /// stream is re-keyed. (One field for both keeps an `Output` in 128
    /// bytes.)
    pub decoded: Option<(Arc<str>, Millis)>,
    /// The pipeline watermark just before this record was processed.
    pub watermark: Millis,
    pub data: Bytes,
}

impl RawOutput {
    /// The decoded event time; `None` for a dead letter.
    pub fn event_time(&self) -> Option<Millis> {
        self.decoded.as_ref().map(|(_, t)| *t)
    }

    /// True when `data` is one JSON value with nothing around it, so that
    /// embedding it verbatim as JSON gives back exactly these bytes.
    fn data_is_exact_json(&self) -> bool {
        serde_json::from_slice::<&serde_json::value::RawValue>(&self.data)
            .is_ok_and(|v| v.get().len() == self.data.len())
    }
}

/// The kinds a sink can subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    Features,
    Prediction,
    Window,
    Late,
    DeadLetter,
    /// A shadow model's answer: same shape as a prediction.
    Shadow,
    /// Every input record with its partition, position and the watermark
    /// before it: what an archive needs for an exact replay.
    Raw,
}

impl OutputKind {
    pub const ALL: [OutputKind; 7] = [
        OutputKind::Features,
        OutputKind::Prediction,
        OutputKind::Window,
        OutputKind::Late,
        OutputKind::DeadLetter,
        OutputKind::Shadow,
        OutputKind::Raw,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Features => "features",
            OutputKind::Prediction => "prediction",
            OutputKind::Window => "window",
            OutputKind::Late => "late",
            OutputKind::DeadLetter => "dead_letter",
            OutputKind::Shadow => "shadow",
            OutputKind::Raw => "raw",
        }
    }

    /// Bit for a set of kinds, see [`KindSet`].
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A small set of output kinds, cheap to test per record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    pub fn insert(&mut self, kind: OutputKind) {
        self.0 |= kind.bit();
    }
    pub fn contains(self, kind: OutputKind) -> bool {
        self.0 & kind.bit() != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<OutputKind> for KindSet {
    fn from_iter<I: IntoIterator<Item = OutputKind>>(iter: I) -> Self {
        let mut set = KindSet::default();
        for kind in iter {
            set.insert(kind);
        }
        set
    }
}

/// What a source says about one of its partitions, in order with the
/// partition's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionStatus {
    /// The source will read this partition but cannot deliver from it now:
    /// it holds the watermark and is never idle.
    Known,
    /// The source reads it from now on: its idle clock runs.
    Reading,
    /// Nothing more will come from it: it no longer holds the watermark.
    Finished,
}

/// Everything a sink can receive.
#[derive(Clone, Debug, PartialEq)]
///
/// The kinds a pipeline makes by the million (feature vectors, window
/// results, late events, raw records for an archive) are inline; the
/// larger, rarer ones (a model's answers, dead letters) are boxed, so that
/// every output of a batch takes less room (128 bytes instead of 184).
pub enum Output {
    Features(FeatureRecord),
    Prediction(Box<PredictionRecord>),
    Window(WindowResult),
    Late(LateRecord),
    DeadLetter(Box<DeadLetter>),
    /// Written by the shadow model; never affects `Prediction` records.
    Shadow(Box<PredictionRecord>),
    /// An input record, for archives (only produced when a sink takes it).
    Raw(RawOutput),
}

impl Output {
    pub fn kind(&self) -> OutputKind {
        match self {
            Output::Features(_) => OutputKind::Features,
            Output::Prediction(_) => OutputKind::Prediction,
            Output::Window(_) => OutputKind::Window,
            Output::Late(_) => OutputKind::Late,
            Output::DeadLetter(_) => OutputKind::DeadLetter,
            Output::Shadow(_) => OutputKind::Shadow,
            Output::Raw(_) => OutputKind::Raw,
        }
    }

    /// The event time the record is about, where it has one: the archive
    /// sink files an object under the hour of its first record's time.
    pub fn time(&self) -> Option<Millis> {
        match self {
            Output::Features(r) => Some(r.event_time),
            Output::Prediction(r) | Output::Shadow(r) => Some(r.features.event_time),
            Output::Window(r) => Some(r.window_start),
            Output::Late(r) => Some(r.event_time),
            Output::DeadLetter(_) => None,
            Output::Raw(r) => r.event_time(),
        }
    }

    /// When the input record this output was made from arrived (epoch
    /// ms), for outputs made from one event.
    pub fn arrival(&self) -> Option<Millis> {
        match self {
            Output::Features(r) => Some(r.arrival),
            Output::Prediction(r) | Output::Shadow(r) => Some(r.features.arrival),
            _ => None,
        }
    }

    /// The deterministic id a reader deduplicates by.
    pub fn id(&self) -> String {
        match self {
            Output::Features(r) => r.id.clone(),
            Output::Prediction(r) | Output::Shadow(r) => r.features.id.clone(),
            Output::Window(r) => r.id(),
            Output::Late(r) => r.id.clone(),
            Output::DeadLetter(r) => r.position.id(),
            Output::Raw(r) => r.position.id(),
        }
    }

    /// The record's key, where it has one (sinks partition by it).
    pub fn key(&self) -> Option<&str> {
        match self {
            Output::Features(r) => Some(&r.key),
            Output::Prediction(r) | Output::Shadow(r) => Some(&r.features.key),
            Output::Window(r) => Some(&r.key),
            Output::Late(r) => Some(&r.key),
            Output::Raw(r) => r.decoded.as_ref().map(|(k, _)| &**k),
            Output::DeadLetter(_) => None,
        }
    }

    /// One NDJSON line, newline included: the record's `Serialize` form.
    /// Feature vectors and window results, most of a pipeline's output,
    /// are written directly (the same bytes, see `record/ndjson.rs`); a
    /// sink writing line after line keeps a [`LineWriter`] instead.
    pub fn write_ndjson(&self, buf: &mut Vec<u8>) {
        LineWriter::default().write(self, buf);
    }

    pub fn to_ndjson(&self) -> String {
        let mut buf = Vec::with_capacity(256);
        self.write_ndjson(&mut buf);
        String::from_utf8(buf).expect("serde_json writes UTF-8")
    }
}

/// Raw bytes that decoded as JSON are embedded as JSON; anything else as a string.
struct RawJson<'a>(&'a [u8]);

impl Serialize for RawJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_slice::<&serde_json::value::RawValue>(self.0) {
            Ok(raw) => raw.serialize(s),
            Err(_) => s.serialize_str(&String::from_utf8_lossy(self.0)),
        }
    }
}

impl Serialize for Output {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("kind", self.kind().as_str())?;
        match self {
            Output::Features(r) => {
                map.serialize_entry("id", &r.id)?;
                map.serialize_entry("key", &*r.key)?;
                map.serialize_entry("event_time", &r.event_time)?;
                map.serialize_entry("features", &r.features)?;
            }
            Output::Prediction(p) | Output::Shadow(p) => {
                let r = &p.features;
                map.serialize_entry("id", &r.id)?;
                map.serialize_entry("key", &*r.key)?;
                map.serialize_entry("event_time", &r.event_time)?;
                map.serialize_entry("features", &r.features)?;
                map.serialize_entry("prediction", &p.prediction)?;
                map.serialize_entry("model", &*p.model)?;
                map.serialize_entry("variant", &p.variant.as_deref())?;
                map.serialize_entry("fallback", &p.fallback)?;
                map.serialize_entry("latency_ms", &p.latency_ms)?;
            }
            Output::Window(w) => {
                map.serialize_entry("id", &w.id())?;
                map.serialize_entry("key", &*w.key)?;
                map.serialize_entry("feature", &*w.feature)?;
                map.serialize_entry("window_start", &w.window_start)?;
                map.serialize_entry("window_end", &w.window_end)?;
                map.serialize_entry("value", &w.value)?;
                map.serialize_entry("revision", &w.revision)?;
            }
            Output::Late(l) => {
                map.serialize_entry("id", &l.id)?;
                map.serialize_entry("key", &*l.key)?;
                map.serialize_entry("event_time", &l.event_time)?;
                map.serialize_entry("watermark", &l.watermark)?;
                map.serialize_entry("raw", &RawJson(&l.raw))?;
            }
            Output::DeadLetter(d) => {
                map.serialize_entry("id", &d.position.id())?;
                map.serialize_entry("reason", &d.reason)?;
                map.serialize_entry("position", &d.position.id())?;
                map.serialize_entry(
                    "raw_base64",
                    &base64::engine::general_purpose::STANDARD.encode(&d.raw),
                )?;
            }
            Output::Raw(r) => {
                map.serialize_entry("id", &r.position.id())?;
                map.serialize_entry("partition", &*r.position.partition)?;
                map.serialize_entry("sequence", &*r.position.sequence)?;
                if let Some(sub) = r.position.sub_sequence {
                    map.serialize_entry("sub_sequence", &sub)?;
                }
                if let Some(t) = r.event_time() {
                    map.serialize_entry("event_time", &t)?;
                }
                map.serialize_entry("watermark", &r.watermark)?;
                // JSON records stay readable; anything else (not UTF-8, not
                // one JSON value, surrounding whitespace) keeps its exact bytes.
                if r.data_is_exact_json() {
                    map.serialize_entry("data", &RawJson(&r.data))?;
                } else {
                    map.serialize_entry(
                        "data_base64",
                        &base64::engine::general_purpose::STANDARD.encode(&r.data),
                    )?;
                }
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> FeatureNames {
        vec![Arc::from("event_count_5m"), Arc::from("metric_sum_1h")].into()
    }

    #[test]
    fn position_id_is_its_display_form() {
        let mut p = Position::new(Arc::from("shardId-000000000001"), "4963000000000000001");
        assert_eq!(p.id(), "shardId-000000000001/4963000000000000001");
        assert_eq!(p.id(), p.to_string());
        p.sub_sequence = Some(u64::MAX);
        assert_eq!(
            p.id(),
            "shardId-000000000001/4963000000000000001:18446744073709551615"
        );
        assert_eq!(p.id(), p.to_string());
    }

    #[test]
    fn features_line_matches_the_design() {
        let out = Output::Features(FeatureRecord {
            id: "shardId-0/49".into(),
            key: "u1".into(),
            event_time: 1_700_000_000_000,
            features: FeatureVector {
                names: names(),
                values: vec![Some(Value::Int(3)), None],
            },
            arrival: 0,
        });
        assert_eq!(
            out.to_ndjson(),
            "{\"kind\":\"features\",\"id\":\"shardId-0/49\",\"key\":\"u1\",\"event_time\":1700000000000,\"features\":{\"event_count_5m\":3,\"metric_sum_1h\":null}}\n"
        );
    }

    #[test]
    fn late_records_embed_raw_json_and_dead_letters_base64() {
        let late = Output::Late(LateRecord {
            id: "f/1".into(),
            key: "u1".into(),
            event_time: 5,
            watermark: 10,
            raw: Bytes::from_static(b"{\"userId\":\"u1\"}"),
        });
        assert!(late.to_ndjson().contains("\"raw\":{\"userId\":\"u1\"}"));
        let dead = Output::DeadLetter(Box::new(DeadLetter {
            reason: "missing field userId".into(),
            position: Position::new("f".into(), "2"),
            raw: Bytes::from_static(b"{}"),
        }));
        let line = dead.to_ndjson();
        assert!(
            line.contains("\"reason\":\"missing field userId\""),
            "{line}"
        );
        assert!(line.contains("\"raw_base64\":\"e30=\""), "{line}");
    }

    #[test]
    fn raw_records_keep_exact_bytes() {
        let raw = |data: &'static [u8]| {
            Output::Raw(RawOutput {
                position: Position {
                    sub_sequence: Some(2),
                    ..Position::new("shardId-1".into(), "49")
                },
                decoded: Some((Arc::from("k"), 7)),
                watermark: -3,
                data: Bytes::from_static(data),
            })
            .to_ndjson()
        };
        assert_eq!(
            raw(b"{\"a\": 1}"),
            "{\"kind\":\"raw\",\"id\":\"shardId-1/49:2\",\"partition\":\"shardId-1\",\"sequence\":\"49\",\"sub_sequence\":2,\"event_time\":7,\"watermark\":-3,\"data\":{\"a\": 1}}\n"
        );
        assert!(raw(b" {\"a\":1}").contains("\"data_base64\":\"IHsiYSI6MX0=\""));
        assert!(raw(b"{\"a\":").contains("data_base64"));
    }

    #[test]
    fn outputs_stay_small() {
        // Every output of a batch takes the largest variant's room.
        assert!(std::mem::size_of::<Output>() <= 128);
    }

    #[test]
    fn window_ids_are_deterministic() {
        let w = WindowResult {
            key: "u1".into(),
            feature: "c".into(),
            window_start: 0,
            window_end: 60_000,
            value: Some(Value::Float(f64::NAN)),
            revision: 2,
        };
        assert_eq!(w.id(), "c/u1/60000/2");
        assert!(Output::Window(w).to_ndjson().contains("\"value\":null"));
    }
}
