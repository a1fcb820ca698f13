//! The NDJSON lines of the per-event and per-window records, written
//! directly: the same bytes as their `Serialize` form through serde_json
//! (held to it by the tests below), without the serializer's per-entry
//! calls, the `format!` of a window result's id or a `String` for it.
//! These two kinds are most of what a pipeline writes (a window result per
//! key, feature and window; a vector per event).
//!
//! Strings are escaped as serde_json escapes them (`"`, `\` and control
//! characters; nothing else), through serde_json itself when one needs it;
//! integers by `itoa`, floats by `zmij`, serde_json's own float formatter
//! (non-finite values are `null`, as in [`Value`]'s `Serialize`).

use super::{FeatureRecord, FeatureVector, Value, WindowResult};

/// A JSON string: quoted, escaped as serde_json does.
pub(super) fn string(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    string_body(buf, s);
    buf.push(b'"');
}

/// A JSON string's characters without the quotes (pieces of one string
/// are escaped one by one: escaping is per character).
fn string_body(buf: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        buf.extend_from_slice(s.as_bytes());
        return;
    }
    // Rare: the serializer's own escaping, less its quotes.
    let start = buf.len();
    serde_json::to_writer(&mut *buf, s).expect("a string always serializes");
    buf.pop();
    buf.remove(start);
}

/// Whether `s` holds a byte JSON escapes (`"`, `\\`, a control
/// character). Every byte is tested, with no early exit, eight at a time:
/// the strings written are mostly short and clean, and a per-byte loop that
/// stops at the first hit cannot be vectorised.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Per byte, the high bit of the result is set where the byte is zero
    // (a byte `b` below 0x80 maps to `b - 1` with its high bit only when
    // it was 0), ignoring bytes that had their high bit (UTF-8, never
    // escaped).
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below_space = |v: u64| v.wrapping_sub(ONES * 0x20) & !v & HIGHS;
    let mut chunks = s.chunks_exact(8);
    let mut hit = 0u64;
    for c in &mut chunks {
        let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        hit |= below_space(v)
            | zero(v ^ (ONES * u64::from(b'"')))
            | zero(v ^ (ONES * u64::from(b'\\')));
    }
    hit != 0
        || chunks
            .remainder()
            .iter()
            .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

fn int(buf: &mut Vec<u8>, v: impl itoa::Integer) {
    buf.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn value(buf: &mut Vec<u8>, v: Option<Value>) {
    match v {
        Some(Value::Int(n)) => int(buf, n),
        Some(Value::Float(f)) if f.is_finite() => {
            buf.extend_from_slice(zmij::Buffer::new().format_finite(f).as_bytes())
        }
        Some(Value::Float(_)) | None => buf.extend_from_slice(b"null"),
    }
}

fn features(buf: &mut Vec<u8>, v: &FeatureVector) {
    buf.push(b'{');
    for (i, (name, v)) in v.names.iter().zip(&v.values).enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        string(buf, name);
        buf.push(b':');
        value(buf, *v);
    }
    buf.push(b'}');
}

/// `{"kind":"features",…}` without the newline.
pub(super) fn feature_record(buf: &mut Vec<u8>, r: &FeatureRecord) {
    buf.extend_from_slice(b"{\"kind\":\"features\",\"id\":");
    string(buf, &r.id);
    buf.extend_from_slice(b",\"key\":");
    string(buf, &r.key);
    buf.extend_from_slice(b",\"event_time\":");
    int(buf, r.event_time);
    buf.extend_from_slice(b",\"features\":");
    features(buf, &r.features);
    buf.push(b'}');
}

/// `{"kind":"window",…}` without the newline; the id is
/// [`WindowResult::id`], written in pieces.
pub(super) fn window_result(buf: &mut Vec<u8>, w: &WindowResult) {
    buf.extend_from_slice(b"{\"kind\":\"window\",\"id\":\"");
    string_body(buf, &w.feature);
    buf.push(b'/');
    string_body(buf, &w.key);
    buf.push(b'/');
    int(buf, w.window_end);
    buf.push(b'/');
    int(buf, w.revision);
    buf.extend_from_slice(b"\",\"key\":");
    string(buf, &w.key);
    buf.extend_from_slice(b",\"feature\":");
    string(buf, &w.feature);
    buf.extend_from_slice(b",\"window_start\":");
    int(buf, w.window_start);
    buf.extend_from_slice(b",\"window_end\":");
    int(buf, w.window_end);
    buf.extend_from_slice(b",\"value\":");
    value(buf, w.value);
    buf.extend_from_slice(b",\"revision\":");
    int(buf, w.revision);
    buf.push(b'}');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{FeatureNames, Output};
    use super::*;

    /// The line serde_json makes of the record.
    fn serde_line(o: &Output) -> String {
        let mut buf = serde_json::to_vec(o).unwrap();
        buf.push(b'\n');
        String::from_utf8(buf).unwrap()
    }

    const STRINGS: &[&str] = &[
        "u1",
        "",
        "a\"b",
        "back\\slash",
        "tab\tnew\nline\r\u{8}\u{c}",
        "\u{0}\u{1}\u{1f}\u{7f}",
        "é/ü — 𝄞 and </script>",
        "shardId-000000000001/49630000000000000000000001",
    ];

    /// The eight-at-a-time test agrees with the byte-by-byte one for every
    /// byte value at every position of strings up to 24 bytes long, each
    /// around a clean (and a high-bit) filler, so borrows between the bytes
    /// of a word cannot hide or invent a hit.
    #[test]
    fn the_escape_test_agrees_with_a_per_byte_one() {
        let naive = |s: &[u8]| s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        for len in 1..=24 {
            for at in 0..len {
                for filler in [b'a', 0x20, 0x7f, 0xc3, 0xff, b'#', b']'] {
                    for b in 0..=255u8 {
                        let mut s = vec![filler; len];
                        s[at] = b;
                        assert_eq!(needs_escape(&s), naive(&s), "{s:?}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    const FLOATS: &[f64] = &[
        0.0,
        -0.0,
        1.0,
        0.1 + 0.2,
        759.9200000000001,
        1e21,
        1e-7,
        123_456_789.125,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];

    fn values() -> Vec<Option<Value>> {
        let mut v: Vec<Option<Value>> = FLOATS.iter().map(|f| Some(Value::Float(*f))).collect();
        v.extend([0, -1, 42, i64::MIN, i64::MAX].map(|n| Some(Value::Int(n))));
        v.push(None);
        v
    }

    #[test]
    fn window_lines_are_serde_json_s() {
        for key in STRINGS {
            for feature in STRINGS {
                for value in values() {
                    for (start, end, revision) in [
                        (0, 60_000, 0),
                        (-120_000, -60_000, 7),
                        (i64::MIN, i64::MAX, u32::MAX),
                    ] {
                        let o = Output::Window(WindowResult {
                            key: (*key).into(),
                            feature: (*feature).into(),
                            window_start: start,
                            window_end: end,
                            value,
                            revision,
                        });
                        assert_eq!(o.to_ndjson(), serde_line(&o));
                    }
                }
            }
        }
    }

    #[test]
    fn feature_lines_are_serde_json_s() {
        let all = values();
        for id in STRINGS {
            for key in STRINGS {
                for n in [0, 1, 3, all.len()] {
                    let names: FeatureNames = (0..n)
                        .map(|i| Arc::from(format!("{}{i}", STRINGS[i % STRINGS.len()])))
                        .collect();
                    let o = Output::Features(FeatureRecord {
                        id: (*id).into(),
                        key: (*key).into(),
                        event_time: 1_700_000_000_000 - n as i64,
                        features: FeatureVector {
                            names,
                            values: all[..n].to_vec(),
                        },
                        arrival: 0,
                    });
                    assert_eq!(o.to_ndjson(), serde_line(&o));
                }
            }
        }
    }
}
