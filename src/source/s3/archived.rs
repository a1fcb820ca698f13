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

/// One line of shardflow's archive (only `raw` lines are input records).
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
/// first.
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
    let l: ArchiveLine<'_> =
        serde_json::from_str(line).map_err(|e| format!("not an archive line: {e}"))?;
    if l.kind != "raw" {
        return Ok(None);
    }
    let (Some(partition), Some(sequence)) = (l.partition, l.sequence) else {
        return Err("raw line without partition and sequence".into());
    };
    let mut position = Position::new(interner.get(&partition), sequence.as_ref());
    position.sub_sequence = l.sub_sequence;
    let event = match (l.data, l.data_base64) {
        (Some(d), None) => decoder.decode_str(position, arrival, d.get()),
        (None, Some(b)) => {
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
        _ => return Err("raw line needs exactly one of data and data_base64".into()),
    };
    Ok(Some(DecodedRecord {
        replay_watermark: l.watermark,
        event,
    }))
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
}
