//! Bytes → [`Event`] by `[schema]`.
//!
//! The decoder reads only the fields the schema names and skips the rest
//! without building a JSON tree, so a record costs one pass over its bytes.
//! Every way a record can be wrong ends in a [`DeadLetter`] whose reason names
//! the field and what was expected; nothing here panics on input.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use smallvec::SmallVec;

use crate::config::{FieldSpec, FieldType, SchemaConfig};
use crate::record::{DeadLetter, Event, FieldValue, Fields, Key, Position, RawRecord};
use crate::time::Millis;

pub(crate) mod scan;

/// A compiled `[schema]`.
#[derive(Debug, Clone)]
pub struct Decoder {
    key: String,
    timestamp: String,
    fields: Vec<(String, FieldSpec)>,
    /// The schema's names as a record usually spells them, with where
    /// their values go (see [`scan::Token`]).
    tokens: Vec<scan::Token>,
    max_record_bytes: usize,
    min_event_time: Millis,
    max_event_time: Millis,
}

impl Decoder {
    pub fn new(schema: &SchemaConfig) -> Self {
        let mut decoder = Decoder {
            key: schema.key.clone(),
            timestamp: schema.timestamp.clone(),
            fields: schema
                .fields
                .iter()
                .map(|(name, spec)| (name.clone(), *spec))
                .collect(),
            tokens: Vec::new(),
            max_record_bytes: schema.max_record_bytes,
            min_event_time: schema.min_event_time,
            max_event_time: schema.max_event_time,
        };
        decoder.tokens = scan::tokens(&decoder);
        decoder
    }

    /// Decodes one record; on failure the record comes back as a dead letter.
    #[inline]
    pub fn decode(&self, raw: RawRecord) -> Result<Event, Box<DeadLetter>> {
        match self.decode_parts(&raw.bytes) {
            Ok((key, event_time, fields)) => Ok(Event {
                position: raw.position,
                arrival: raw.arrival,
                key,
                event_time,
                fields,
                raw: raw.bytes,
            }),
            Err(reason) => Err(Box::new(DeadLetter {
                reason,
                position: raw.position,
                raw: raw.bytes,
            })),
        }
    }

    /// Decodes one record given as text (already known to be UTF-8, e.g. a
    /// JSON value inside an archive line); its bytes become the event's raw.
    pub fn decode_str(
        &self,
        position: Position,
        arrival: Millis,
        text: &str,
    ) -> Result<Event, Box<DeadLetter>> {
        let raw = Bytes::copy_from_slice(text.as_bytes());
        match self.decode_text(text) {
            Ok((key, event_time, fields)) => Ok(Event {
                position,
                arrival,
                key,
                event_time,
                fields,
                raw,
            }),
            Err(reason) => Err(Box::new(DeadLetter {
                reason,
                position,
                raw,
            })),
        }
    }

    /// The reason is a sentence for a human reading the dead-letter output.
    pub fn decode_parts(&self, bytes: &[u8]) -> Result<(Key, Millis, Fields), String> {
        if bytes.len() > self.max_record_bytes {
            return Err(self.too_large(bytes.len()));
        }
        if bytes.is_ascii() {
            // Most records are ASCII, which a word-wide test tells in a
            // fraction of the UTF-8 walk's time.
            // SAFETY: ASCII text is valid UTF-8.
            return self.decode_text(unsafe { std::str::from_utf8_unchecked(bytes) });
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => self.decode_text(text),
            Err(e) => Err(format!("invalid UTF-8 at byte {}", e.valid_up_to())),
        }
    }

    fn too_large(&self, len: usize) -> String {
        format!(
            "record is {len} bytes, over max_record_bytes = {}",
            self.max_record_bytes
        )
    }

    fn decode_text(&self, text: &str) -> Result<(Key, Millis, Fields), String> {
        if text.len() > self.max_record_bytes {
            return Err(self.too_large(text.len()));
        }
        // A plain flat object in one scan; anything else, and every
        // error, through serde_json (see `decode/scan.rs`).
        // Filled in place: the slots are a few hundred bytes, and a
        // record's were moved out of the scan and into `typed` otherwise.
        let mut slots = Slots::new(self.fields.len());
        if scan::scan(self, text, &mut slots).is_none() {
            self.slots_serde(text, &mut slots)?;
        }
        self.typed(&mut slots)
    }

    /// [`decode_text`](Self::decode_text) through serde_json alone, for the
    /// fast path's tests.
    #[cfg(test)]
    fn decode_text_serde(&self, text: &str) -> Result<(Key, Millis, Fields), String> {
        if text.len() > self.max_record_bytes {
            return Err(self.too_large(text.len()));
        }
        let mut slots = Slots::new(self.fields.len());
        self.slots_serde(text, &mut slots)?;
        self.typed(&mut slots)
    }

    /// The schema's slots as serde_json finds them; JSON errors, duplicate
    /// fields and a record that is not an object are reasons. What the
    /// fast path filled before it gave up is read again.
    fn slots_serde<'a>(&self, text: &'a str, slots: &mut Slots<'a>) -> Result<(), String> {
        let mut de = serde_json::Deserializer::from_str(text);
        *slots = Slots::new(self.fields.len());
        let parsed = RecordSeed {
            schema: self,
            slots,
        }
        .deserialize(&mut de)
        .map_err(|e| json_reason(&e))?;
        de.end().map_err(|e| json_reason(&e))?;
        parsed?;
        Ok(())
    }

    /// Key, event time and typed fields from the slots.
    fn typed(&self, slots: &mut Slots<'_>) -> Result<(Key, Millis, Fields), String> {
        let key = match slots.key.take() {
            Some(Scalar::Str(s)) if !s.is_empty() => Key::from(s.as_ref()),
            Some(Scalar::Str(_)) => return Err(format!("field {} is an empty string", self.key)),
            // Formatted on the stack, held inline (20 digits at most, so
            // the general constructor's tests of length are not needed).
            Some(Scalar::I64(n)) => Key::new_inline(itoa::Buffer::new().format(n)),
            Some(Scalar::U64(n)) => Key::new_inline(itoa::Buffer::new().format(n)),
            Some(Scalar::Null) | None => return Err(format!("missing field {}", self.key)),
            Some(other) => {
                return Err(format!(
                    "field {} must be a string or an integer, got {}",
                    self.key,
                    other.kind()
                ))
            }
        };
        let event_time = match slots.timestamp.take() {
            None | Some(Scalar::Null) => return Err(format!("missing field {}", self.timestamp)),
            Some(s) => self.event_time(s)?,
        };
        let mut fields = Fields::with_capacity(self.fields.len());
        for ((name, spec), slot) in self.fields.iter().zip(slots.fields.iter_mut()) {
            fields.push(typed_field(name, *spec, slot.take())?);
        }
        Ok((key, event_time, fields))
    }

    fn event_time(&self, s: Scalar<'_>) -> Result<Millis, String> {
        let name = &self.timestamp;
        let t = match s {
            Scalar::I64(n) => n,
            Scalar::U64(n) => i64::try_from(n)
                .map_err(|_| format!("field {name}: timestamp {n} is out of range"))?,
            Scalar::F64(f) => {
                if !f.is_finite() || f.abs() > 9.2e18 {
                    return Err(format!(
                        "field {name}: timestamp {f} is not a finite number of milliseconds"
                    ));
                }
                f.floor() as i64
            }
            Scalar::Str(text) => crate::time::parse_epoch_or_rfc3339(&text).map_err(|e| {
                format!("field {name}: {text:?} is neither RFC 3339 nor epoch milliseconds ({e})")
            })?,
            other => {
                return Err(format!(
                    "field {name} must be an RFC 3339 string or epoch milliseconds, got {}",
                    other.kind()
                ))
            }
        };
        if t < self.min_event_time || t > self.max_event_time {
            return Err(format!(
                "field {name}: timestamp {t} is outside the accepted range [{}, {}] (epoch ms; see [schema] min_event_time/max_event_time)",
                self.min_event_time, self.max_event_time
            ));
        }
        Ok(t)
    }
}

fn json_reason(e: &serde_json::Error) -> String {
    format!("malformed JSON: {e}")
}

fn typed_field(
    name: &str,
    spec: FieldSpec,
    slot: Option<Scalar<'_>>,
) -> Result<Option<FieldValue>, String> {
    let value = match slot {
        None | Some(Scalar::Null) if spec.optional => return Ok(None),
        None => return Err(format!("missing field {name}")),
        Some(Scalar::Null) => {
            return Err(format!(
                "field {name} is null but declared {spec} (write \"{}?\" to allow it)",
                spec.ty.as_str()
            ))
        }
        Some(v) => v,
    };
    let mistyped = |v: &Scalar<'_>| {
        format!(
            "field {name} must be {}, got {}",
            spec.ty.as_str(),
            v.kind()
        )
    };
    Ok(Some(match (spec.ty, value) {
        (FieldType::F64, Scalar::F64(f)) => {
            if !f.is_finite() {
                return Err(format!("field {name} is not a finite number"));
            }
            FieldValue::F64(f)
        }
        (FieldType::F64, Scalar::I64(n)) => FieldValue::F64(n as f64),
        (FieldType::F64, Scalar::U64(n)) => FieldValue::F64(n as f64),
        (FieldType::I64, Scalar::I64(n)) => FieldValue::I64(n),
        (FieldType::I64, Scalar::U64(n)) => FieldValue::I64(
            i64::try_from(n).map_err(|_| format!("field {name}: {n} does not fit in i64"))?,
        ),
        (FieldType::String, Scalar::Str(s)) => FieldValue::Str(Arc::from(s.as_ref())),
        (FieldType::Bool, Scalar::Bool(b)) => FieldValue::Bool(b),
        (_, v) => return Err(mistyped(&v)),
    }))
}

/// A JSON value reduced to what a schema field can hold.
#[derive(Debug)]
enum Scalar<'a> {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "a boolean",
            Scalar::I64(_) | Scalar::U64(_) => "an integer",
            Scalar::F64(_) => "a number",
            Scalar::Str(_) => "a string",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::I64(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::U64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::F64(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Object)
    }
}

struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Scalar<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// The schema's fields as found in one record.
struct Slots<'a> {
    key: Option<Scalar<'a>>,
    timestamp: Option<Scalar<'a>>,
    /// Inline: schemas rarely name more fields, and this is per record.
    fields: SmallVec<[Option<Scalar<'a>>; 8]>,
}

impl Slots<'_> {
    fn new(fields: usize) -> Self {
        Slots {
            key: None,
            timestamp: None,
            fields: (0..fields).map(|_| None).collect(),
        }
    }
}

/// Deserializes a top-level object into `slots` (filled in place: they
/// are a few hundred bytes, moved through every layer of serde otherwise).
/// The `Result` it gives carries schema-level problems (duplicate fields,
/// not an object) that are not JSON syntax errors.
struct RecordSeed<'s, 'de> {
    schema: &'s Decoder,
    slots: &'s mut Slots<'de>,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_, 'de> {
    type Value = Result<(), String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_, 'de> {
    type Value = Result<(), String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let RecordSeed { schema, slots } = self;
        let mut problem = None;
        while let Some(name) = map.next_key::<Cow<'de, str>>()? {
            let slot = if name == schema.key {
                Some(&mut slots.key)
            } else if name == schema.timestamp {
                Some(&mut slots.timestamp)
            } else {
                schema
                    .fields
                    .iter()
                    .position(|(n, _)| *n == name)
                    .map(|i| &mut slots.fields[i])
            };
            match slot {
                Some(slot) => {
                    let value = map.next_value_seed(ScalarSeed)?;
                    if slot.is_some() && problem.is_none() {
                        problem = Some(format!("duplicate field {name}"));
                    }
                    *slot = Some(value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match problem {
            Some(p) => Err(p),
            None => Ok(()),
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err("record is a JSON array, expected an object".into()))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err("record is a JSON string, expected an object".into()))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err("record is a JSON boolean, expected an object".into()))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err("record is a JSON number, expected an object".into()))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err("record is a JSON number, expected an object".into()))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err("record is a JSON number, expected an object".into()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err("record is JSON null, expected an object".into()))
    }
}

/// A decoder of `userId`, `ts` and `fields` (name, type, optional), event
/// times in `times`, records up to 100,000 bytes: the tests' schema.
#[cfg(test)]
fn test_decoder(fields: &[(&str, FieldType, bool)], times: (Millis, Millis)) -> Decoder {
    Decoder::new(&SchemaConfig {
        key: "userId".into(),
        timestamp: "ts".into(),
        fields: fields
            .iter()
            .map(|&(name, ty, optional)| (name.to_string(), FieldSpec { ty, optional }))
            .collect(),
        request_fields: Vec::new(),
        max_record_bytes: 100_000,
        min_event_time: times.0,
        max_event_time: times.1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Position;

    fn decoder() -> Decoder {
        test_decoder(
            &[
                ("amount", FieldType::F64, false),
                ("merchant", FieldType::String, true),
                ("n", FieldType::I64, true),
            ],
            (0, 4_102_444_800_000),
        )
    }

    fn decode(text: &[u8]) -> Result<Event, String> {
        decoder()
            .decode(RawRecord {
                position: Position::new("p".into(), "1"),
                arrival: 0,
                bytes: bytes::Bytes::copy_from_slice(text),
                replay_watermark: None,
            })
            .map_err(|d| d.reason)
    }

    #[test]
    fn good_records_decode() {
        let e = decode(
            br#"{"userId":"u1","ts":"2023-11-14T22:13:20Z","amount":12,"extra":{"deep":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(&*e.key, "u1");
        assert_eq!(e.event_time, 1_700_000_000_000);
        assert_eq!(e.fields[..], [Some(FieldValue::F64(12.0)), None, None]);
        let e = decode(br#"{"userId":7,"ts":1700000000000,"amount":1.5,"merchant":"m\"1","n":3}"#)
            .unwrap();
        assert_eq!(&*e.key, "7");
        assert_eq!(e.fields[1], Some(FieldValue::Str("m\"1".into())));
        assert_eq!(e.fields[2], Some(FieldValue::I64(3)));
        // A number beyond f64 in a field the schema does not use is valid
        // JSON that is never read (the same number in `amount` is refused).
        let e = decode(br#"{"userId":"u","ts":1,"amount":2,"extra":-1e999}"#).unwrap();
        assert_eq!(e.fields[0], Some(FieldValue::F64(2.0)));
    }

    #[test]
    fn bad_records_say_why() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"userId\":", "malformed JSON"),
            (b"[1,2]", "JSON array"),
            (br#"{"ts":1,"amount":1}"#, "missing field userId"),
            (br#"{"userId":"u","amount":1}"#, "missing field ts"),
            (br#"{"userId":"u","ts":1}"#, "missing field amount"),
            (
                br#"{"userId":"u","ts":1,"amount":"x"}"#,
                "field amount must be f64, got a string",
            ),
            (br#"{"userId":"u","ts":1,"amount":1e999}"#, "malformed JSON"),
            (
                br#"{"userId":"u","ts":-5,"amount":1}"#,
                "outside the accepted range",
            ),
            (
                br#"{"userId":"u","ts":"yesterday","amount":1}"#,
                "neither RFC 3339",
            ),
            (
                br#"{"userId":"u","userId":"v","ts":1,"amount":1}"#,
                "duplicate field userId",
            ),
            (
                br#"{"userId":{"a":1},"ts":1,"amount":1}"#,
                "must be a string or an integer",
            ),
            (
                b"{\"userId\":\"\xff\",\"ts\":1,\"amount\":1}",
                "invalid UTF-8 at byte 11",
            ),
            (
                br#"{"userId":"u","ts":1,"amount":1} trailing"#,
                "malformed JSON",
            ),
            (br#"{"userId":"u","ts":1,"amount":null}"#, "is null"),
        ];
        for (input, want) in cases {
            let got = decode(input).unwrap_err();
            assert!(
                got.contains(want),
                "{:?}: {got:?} lacks {want:?}",
                String::from_utf8_lossy(input)
            );
        }
        let big = format!(
            r#"{{"userId":"u","ts":1,"amount":1,"pad":"{}"}}"#,
            "x".repeat(100_001)
        );
        assert!(decode(big.as_bytes())
            .unwrap_err()
            .contains("over max_record_bytes"));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        // Deep nesting is skipped without recursion where the schema does not look...
        assert!(
            decode(format!(r#"{{"userId":"u","ts":1,"amount":1,"x":{deep}}}"#).as_bytes()).is_ok()
        );
        // ...and refused by type where it does.
        let got =
            decode(format!(r#"{{"userId":{deep},"ts":1,"amount":1}}"#).as_bytes()).unwrap_err();
        assert!(got.contains("must be a string or an integer"), "{got}");
    }
}
