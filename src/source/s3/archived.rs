//! A line of shardflow's archive back into the live run's record: its
//! partition, position and the watermark the live run had, the embedded
//! record decoded straight from the line.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use crate::decode::Decoder;
use crate::record::{Position, RawRecord};
use crate::source::DecodedRecord;
use crate::time::Millis;

/// One line of shardflow's archive (only `raw` lines are input records),
/// as serde_json reads it.
#[derive(Deserialize)]
struct ArchiveLine<'a> {
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    partition: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    sequence: Option<Cow<'a, str>>,
    #[serde(default)]
    sub_sequence: Option<u64>,
    #[serde(default)]
    watermark: Option<Millis>,
    #[serde(borrow, default)]
    data: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    data_base64: Option<Cow<'a, str>>,
}

/// What a `raw` line's record is made of.
struct RawLine<'a> {
    partition: Cow<'a, str>,
    sequence: Cow<'a, str>,
    sub_sequence: Option<u64>,
    watermark: Option<Millis>,
    data: Data<'a>,
}

enum Data<'a> {
    /// The record's JSON, embedded as is.
    Json(&'a str),
    Base64(Cow<'a, str>),
}

/// Partition names, shared between records. An object holds a few
/// partitions, looked up once per line, hence the fast hasher.
#[derive(Default)]
pub struct Interner(HashMap<Box<str>, Arc<str>, foldhash::fast::RandomState>);

impl Interner {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.0.get(name) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(name);
        self.0.insert(name.into(), a.clone());
        a
    }
}

/// A `raw` archive line, decoded with the pipeline's schema, as the live
/// run decoded the record it archives; `None` for lines of other kinds, and
/// `Err` for a line that is not an archive line at all.
///
/// The record inside (`data`, JSON embedded as is) is decoded straight from
/// the line, so its bytes are read once more, not copied or re-validated
/// first. A line as the archive writes it is read in one scan
/// ([`scan::line`]); any other line, and any line whose record that
/// reading does not decode, is read by serde_json, which decides and words
/// the reason.
pub fn archived_event(
    line: &[u8],
    interner: &mut Interner,
    arrival: Millis,
    decoder: &Decoder,
) -> Result<Option<DecodedRecord>, String> {
    // One check of the whole line: serde would check each string apart.
    let line = std::str::from_utf8(line).map_err(|e| {
        format!(
            "not an archive line: invalid UTF-8 at byte {}",
            e.valid_up_to()
        )
    })?;
    match scan::line(line) {
        Some(None) => return Ok(None),
        Some(Some(raw)) => {
            let record = decode(raw, interner, arrival, decoder)?;
            if record.event.is_ok() {
                return Ok(Some(record));
            }
            // A dead letter: as serde_json's reading of the line has it.
        }
        None => {}
    }
    match parse_line(line)? {
        Some(raw) => decode(raw, interner, arrival, decoder).map(Some),
        None => Ok(None),
    }
}

/// The line as serde_json reads it; `None` for a line of another kind.
fn parse_line(line: &str) -> Result<Option<RawLine<'_>>, String> {
    let l: ArchiveLine<'_> =
        serde_json::from_str(line).map_err(|e| format!("not an archive line: {e}"))?;
    if l.kind != "raw" {
        return Ok(None);
    }
    let (Some(partition), Some(sequence)) = (l.partition, l.sequence) else {
        return Err("raw line without partition and sequence".into());
    };
    let data = match (l.data, l.data_base64) {
        (Some(d), None) => Data::Json(d.get()),
        (None, Some(b)) => Data::Base64(b),
        _ => return Err("raw line needs exactly one of data and data_base64".into()),
    };
    Ok(Some(RawLine {
        partition,
        sequence,
        sub_sequence: l.sub_sequence,
        watermark: l.watermark,
        data,
    }))
}

/// The record of a `raw` line, decoded with the schema.
fn decode(
    l: RawLine<'_>,
    interner: &mut Interner,
    arrival: Millis,
    decoder: &Decoder,
) -> Result<DecodedRecord, String> {
    let mut position = Position::new(interner.get(&l.partition), l.sequence.as_ref());
    position.sub_sequence = l.sub_sequence;
    let event = match l.data {
        Data::Json(d) => decoder.decode_str(position, arrival, d),
        Data::Base64(b) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| format!("data_base64: {e}"))?;
            decoder.decode(RawRecord {
                position,
                arrival,
                bytes: Bytes::from(bytes),
                replay_watermark: None,
            })
        }
    };
    Ok(DecodedRecord {
        replay_watermark: l.watermark,
        event,
    })
}

/// The fast reading of an archive line: one scan, no allocation.
mod scan {
    use super::{Data, RawLine};
    use crate::decode::scan::Cursor;

    /// The line read without doubt: `Some(None)` for a line of another
    /// kind, `Some(Some(..))` for a `raw` line whose record is a JSON
    /// object, `None` when serde_json must decide. It takes a flat object
    /// of strings without escapes, integers (in the archive's fields),
    /// numbers, `true`, `false` and `null` (in others), each of the
    /// archive's fields at most once, and as `data` an object it finds the
    /// end of (the record's decoder checks the rest of it). What it reads,
    /// serde_json reads the same.
    pub(super) fn line(text: &str) -> Option<Option<RawLine<'_>>> {
        let mut c = Cursor::new(text);
        let (mut kind, mut partition, mut sequence) = (None, None, None);
        let (mut sub_sequence, mut watermark, mut data, mut base64) = (None, None, None, None);
        c.skip_ws();
        c.eat(b'{')?;
        c.skip_ws();
        if c.peek() == Some(b'}') {
            return None;
        }
        loop {
            c.skip_ws();
            c.eat(b'"')?;
            let field = c.string()?;
            c.skip_ws();
            c.eat(b':')?;
            c.skip_ws();
            match field {
                "kind" => once(&mut kind, string(&mut c)?)?,
                "partition" => once(&mut partition, string(&mut c)?)?,
                "sequence" => once(&mut sequence, string(&mut c)?)?,
                "sub_sequence" => once(&mut sub_sequence, integer(&mut c)?.parse::<u64>().ok()?)?,
                "watermark" => once(&mut watermark, integer(&mut c)?.parse::<i64>().ok()?)?,
                "data" => once(&mut data, object(&mut c)?)?,
                "data_base64" => once(&mut base64, string(&mut c)?)?,
                _ => skip_scalar(&mut c)?,
            }
            c.skip_ws();
            match c.peek()? {
                b',' => c.at += 1,
                b'}' => {
                    c.at += 1;
                    break;
                }
                _ => return None,
            }
        }
        c.skip_ws();
        if c.at != text.len() {
            return None;
        }
        if kind? != "raw" {
            return Some(None);
        }
        Some(Some(RawLine {
            partition: partition?.into(),
            sequence: sequence?.into(),
            sub_sequence,
            watermark,
            data: match (data, base64) {
                (Some(d), None) => Data::Json(d),
                (None, Some(b)) => Data::Base64(b.into()),
                _ => return None,
            },
        }))
    }

    /// Sets `slot`; `None` when it was set (serde_json refuses a duplicate).
    fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
        slot.is_none().then(|| *slot = Some(value))
    }

    /// A string value without escapes.
    fn string<'a>(c: &mut Cursor<'a>) -> Option<&'a str> {
        c.eat(b'"')?;
        c.string()
    }

    /// An integer, as serde_json reads one: `-0` it reads as a float.
    fn integer<'a>(c: &mut Cursor<'a>) -> Option<&'a str> {
        let (text, integer) = c.number()?;
        (integer && text != "-0").then_some(text)
    }

    /// A value of a field the archive line does not use: skipped when it
    /// is a scalar serde_json would skip too.
    fn skip_scalar(c: &mut Cursor<'_>) -> Option<()> {
        match c.peek()? {
            b'"' => string(c).map(drop),
            b't' => c.literal("true"),
            b'f' => c.literal("false"),
            b'n' => c.literal("null"),
            _ => c.number().map(drop),
        }
    }

    /// An object's text, up to its matching `}` (strings and their escapes
    /// followed; the rest of its grammar is its decoder's to check).
    fn object<'a>(c: &mut Cursor<'a>) -> Option<&'a str> {
        let bytes = c.text.as_bytes();
        let start = c.at;
        if bytes.get(start) != Some(&b'{') {
            return None;
        }
        let (mut depth, mut in_string, mut i) = (0usize, false, start);
        while let Some(&b) = bytes.get(i) {
            if in_string {
                match b {
                    b'\\' => i += 1,
                    b'"' => in_string = false,
                    _ => {}
                }
            } else {
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            c.at = i + 1;
                            // On a char boundary: `}` is ASCII.
                            return Some(&c.text[start..=i]);
                        }
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchemaConfig;

    #[test]
    fn archive_lines_give_back_the_live_record() {
        let schema: SchemaConfig = toml::from_str(
            r#"
key = "u"
timestamp = "t"
"#,
        )
        .unwrap();
        let decoder = Decoder::new(&schema);
        let mut interner = Interner::default();
        let decode =
            |line: &[u8], interner: &mut Interner| archived_event(line, interner, 0, &decoder);
        let line = br#"{"kind":"raw","id":"p/7:1","partition":"p","sequence":"7","sub_sequence":1,"event_time":5,"watermark":-9,"data":{"u":"a b","t":1700000000000}}"#;
        let r = decode(line, &mut interner).unwrap().unwrap();
        assert_eq!(r.replay_watermark, Some(-9));
        let e = r.event.unwrap();
        assert_eq!(e.position.to_string(), "p/7:1");
        assert_eq!(&e.raw[..], br#"{"u":"a b","t":1700000000000}"#);
        assert_eq!((&*e.key, e.event_time), ("a b", 1_700_000_000_000));
        let b64 =
            br#"{"kind":"raw","partition":"p","sequence":"8","watermark":0,"data_base64":"IHt9"}"#;
        let r = decode(b64, &mut interner).unwrap().unwrap();
        let dead = r.event.unwrap_err();
        assert_eq!(&dead.raw[..], b" {}");
        assert_eq!(dead.reason, "missing field u");
        assert_eq!(dead.position.to_string(), "p/8");
        assert!(decode(br#"{"kind":"window","id":"x"}"#, &mut interner)
            .unwrap()
            .is_none());
        assert!(decode(br#"{"kind":"raw","partition":"p"#, &mut interner).is_err());
        // A record that is not an object is the record's problem, not the line's.
        let r = decode(
            br#"{"kind":"raw","partition":"p","sequence":"9","data":[1]}"#,
            &mut interner,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            r.event.unwrap_err().reason,
            "record is a JSON array, expected an object"
        );
    }

    /// The line as serde_json alone reads it (the code before the scan).
    fn read_by_serde(
        line: &[u8],
        interner: &mut Interner,
        decoder: &Decoder,
    ) -> Result<Option<DecodedRecord>, String> {
        let line = std::str::from_utf8(line).map_err(|e| e.to_string())?;
        match parse_line(line)? {
            Some(raw) => decode(raw, interner, 0, decoder).map(Some),
            None => Ok(None),
        }
    }

    /// One field of a generated line: mostly the archive's own, right or
    /// subtly wrong, and others a line may carry.
    fn field() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(r#""kind":"raw""#.to_owned()),
            1 => Just(r#""kind":"window""#.to_owned()),
            1 => Just(r#""kind":"r\u0061w""#.to_owned()),
            1 => Just(r#""kind":null"#.to_owned()),
            3 => Just(r#""partition":"shardId-000000000001""#.to_owned()),
            1 => Just(r#""partition":"p\"q""#.to_owned()),
            3 => Just(r#""sequence":"49590338271490256608559692538361571095921575989136588898""#.to_owned()),
            1 => Just(r#""sequence":7"#.to_owned()),
            1 => prop_oneof![Just("1"), Just("0"), Just("-1"), Just("-0"), Just("1.5"), Just("1e2"),
                Just("18446744073709551615"), Just("18446744073709551616"), Just("null"), Just("\"1\"")]
                .prop_map(|v| format!(r#""sub_sequence":{v}"#)),
            3 => prop_oneof![Just("-9"), Just("1700000000000"), Just("-0"), Just("9223372036854775807"),
                Just("9223372036854775808"), Just("-9223372036854775808"), Just("2.0"), Just("1E3"),
                Just("01"), Just("-"), Just("null")]
                .prop_map(|v| format!(r#""watermark":{v}"#)),
            4 => prop_oneof![
                Just(r#"{"u":"a b","t":1700000000000}"#),
                Just(r#"{"u":"a","t":1700000000000,"x":[1,{"y":"}]\""}]}"#),
                Just(r#"{"u":"x\"y","t":2}"#),
                Just(r#"{ "t" : 5 , "u" : "k" }"#),
                Just(r#"{"t":1}"#),
                Just(r#"{"u":"a","t":1]"#),
                Just(r#"{"u":"a","t":1"#),
                Just(r#"[1]"#),
                Just(r#""{}""#),
                Just(r#"{"u":"a","t":"#),
            ]
            .prop_map(|v| format!(r#""data":{v}"#)),
            1 => Just(r#""data_base64":"eyJ1IjoiYiIsInQiOjF9""#.to_owned()),
            1 => Just(r#""data_base64":"!!""#.to_owned()),
            2 => Just(r#""id":"shardId-000000000001/7:1""#.to_owned()),
            2 => Just(r#""event_time":1700000000000"#.to_owned()),
            1 => Just(r#""key":"a b""#.to_owned()),
            1 => Just(r#""note":{"nested":true}"#.to_owned()),
            1 => Just(r#""flag":false"#.to_owned()),
            1 => Just(r#""f":-1.25e-3"#.to_owned()),
            1 => Just(r#""f":1.""#.to_owned()),
            1 => Just(r#""f":1e400"#.to_owned()),
            1 => Just(r#""f":-01"#.to_owned()),
            1 => Just(r#""f":123456789012345678901234567890"#.to_owned()),
            1 => Just(r#""k\u0069nd":"raw""#.to_owned()),
        ]
    }

    use proptest::strategy::{Just, Strategy as _};

    proptest::proptest! {
        /// Whatever the line, the scan with its fallback gives what
        /// serde_json alone gave: the same record, the same dead letter,
        /// the same error.
        #[test]
        fn the_scan_reads_lines_as_serde_json_does(
            fields in (
                proptest::collection::vec(proptest::bool::weighted(0.9), 4),
                proptest::collection::vec(field(), 0..5),
            )
                .prop_flat_map(|(keep, extra)| {
                    // Mostly a line the scan reads, with a few more fields.
                    let base = [
                        r#""kind":"raw""#,
                        r#""partition":"shardId-000000000001""#,
                        r#""sequence":"7""#,
                        r#""data":{"u":"a","t":1700000000000}"#,
                    ];
                    let mut all: Vec<String> = base
                        .iter()
                        .zip(keep)
                        .filter(|(_, k)| *k)
                        .map(|(f, _)| f.to_string())
                        .collect();
                    all.extend(extra);
                    Just(all).prop_shuffle()
                }),
            ws in proptest::sample::select(vec!["", " ", "\t", " \r\n "]),
            tail in proptest::sample::select(vec!["", "", "", " ", "x", "}", ","]),
        ) {
            let schema: SchemaConfig = toml::from_str("key = \"u\"\ntimestamp = \"t\"\n").unwrap();
            let decoder = Decoder::new(&schema);
            let line = format!("{ws}{{{ws}{}{ws}}}{tail}", fields.join(&format!("{ws},{ws}")));
            let fast = archived_event(line.as_bytes(), &mut Interner::default(), 0, &decoder);
            let slow = read_by_serde(line.as_bytes(), &mut Interner::default(), &decoder);
            proptest::prop_assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "line: {}", line);
        }
    }

    #[test]
    fn the_archive_writers_lines_take_the_scan() {
        use crate::record::{Output, RawOutput};
        let mut position = Position::new("shardId-000000000001".into(), "4959033827149025");
        position.sub_sequence = Some(3);
        let line = Output::Raw(RawOutput {
            position,
            decoded: Some(("a b".into(), 1_700_000_000_000)),
            watermark: -9,
            data: Bytes::from_static(br#"{"u":"a b","t":1700000000000}"#),
        })
        .to_ndjson();
        let raw = scan::line(line.trim_end())
            .expect("read by the scan")
            .expect("a raw line");
        assert_eq!(
            (&*raw.partition, &*raw.sequence),
            ("shardId-000000000001", "4959033827149025")
        );
        assert_eq!((raw.sub_sequence, raw.watermark), (Some(3), Some(-9)));
        assert!(matches!(
            raw.data,
            Data::Json(r#"{"u":"a b","t":1700000000000}"#)
        ));
    }
}
