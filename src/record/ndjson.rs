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
//!
//! A sink writes through one [`LineWriter`], which keeps what consecutive
//! lines share: a firing writes the results of one window end for key
//! after key, and the vectors of a run share one list of names. So a
//! window's times are formatted once per window rather than three times a
//! line, its revision once per change of revision rather than twice a line,
//! each feature's pieces joined with the window's once per window, and a
//! vector's names are escaped once per list. A line whose key, feature or
//! id needs escaping is written piece by piece as before.

use std::ptr;

use smol_str::SmolStr;

use crate::decode::scan::{escaped_bytes, same};

use super::{FeatureNames, FeatureRecord, FeatureVector, Output, Value, WindowResult};
use crate::time::Millis;

/// Writes output records as NDJSON lines, remembering what the previous
/// lines share with the next (see the module docs). The bytes do not
/// depend on what it remembers.
#[derive(Default)]
pub struct LineWriter {
    /// The `(start, end)` of the last window written and
    /// `,"window_start":S,"window_end":E,"value":` for it.
    window: Option<(Millis, Millis)>,
    window_tail: Vec<u8>,
    /// The revision of the last window result written, the rest of its id
    /// after the key up to the second key, `/E/R","key":"`, and its line's
    /// end, `,"revision":R}`. A line is then seven pieces.
    revision: Option<u32>,
    id_tail: Vec<u8>,
    line_end: Vec<u8>,
    /// The pieces of the features written (names recur window after window).
    features: Vec<FeaturePieces>,
    /// Where in `features` the last line's feature was: a firing writes
    /// a key's features in turn, so the next line's is usually the next.
    last_feature: usize,
    /// The last list of feature names written (held, so that comparing
    /// its address with the next list's is sound), each name rendered as
    /// `"name":` (the first as `{"name":`, the rest as `,"name":`) and
    /// where each ends in `names_text`.
    names: Option<FeatureNames>,
    names_text: Vec<u8>,
    names_ends: Vec<usize>,
}

impl LineWriter {
    /// Appends `o`'s line, newline included.
    pub fn write(&mut self, o: &Output, buf: &mut Vec<u8>) {
        match o {
            Output::Features(r) => self.feature_record(buf, r),
            Output::Window(w) => self.window_result(buf, w),
            // Serializing these types cannot fail: every map key is a
            // string and non-finite floats are written as null.
            _ => serde_json::to_writer(&mut *buf, o).expect("output records always serialize"),
        }
        buf.push(b'\n');
    }

    fn window_result(&mut self, buf: &mut Vec<u8>, w: &WindowResult) {
        let key = w.key.as_bytes();
        if needs_escape(key) {
            return window_result(buf, w);
        }
        let window = (w.window_start, w.window_end);
        if self.window != Some(window) {
            self.window = Some(window);
            self.window_tail.clear();
            self.window_tail.extend_from_slice(b",\"window_start\":");
            int(&mut self.window_tail, w.window_start);
            self.window_tail.extend_from_slice(b",\"window_end\":");
            int(&mut self.window_tail, w.window_end);
            self.window_tail.extend_from_slice(b",\"value\":");
            self.revision = None;
        }
        if self.revision != Some(w.revision) {
            self.revision = Some(w.revision);
            self.id_tail.clear();
            self.id_tail.push(b'/');
            int(&mut self.id_tail, w.window_end);
            self.id_tail.push(b'/');
            int(&mut self.id_tail, w.revision);
            self.id_tail.extend_from_slice(b"\",\"key\":\"");
            self.line_end.clear();
            self.line_end.extend_from_slice(b",\"revision\":");
            int(&mut self.line_end, w.revision);
            self.line_end.push(b'}');
        }
        let Some(f) = self.feature_pieces(w) else {
            return window_result(buf, w);
        };
        let f = &mut self.features[f];
        if f.tail_window != Some(window) {
            f.tail_window = Some(window);
            f.tail.clear();
            f.tail.extend_from_slice(b"\",\"feature\":\"");
            f.tail.extend_from_slice(f.name.as_bytes());
            f.tail.push(b'"');
            f.tail.extend_from_slice(&self.window_tail);
        }
        let mut number = Number::default();
        let value = number.format(w.value);
        buf.reserve(
            LINE_FIXED
                + f.head.len()
                + 2 * key.len()
                + self.id_tail.len()
                + f.tail.len()
                + value.len()
                + self.line_end.len(),
        );
        put(buf, &f.head);
        put(buf, key);
        put(buf, &self.id_tail);
        put(buf, key);
        buf.extend_from_slice(&f.tail);
        put(buf, value);
        put(buf, &self.line_end);
    }

    /// The index in `features` of `w`'s feature (made if it is new), or
    /// `None` if its name needs escaping.
    fn feature_pieces(&mut self, w: &WindowResult) -> Option<usize> {
        let name = w.feature.as_str();
        let n = self.features.len();
        let guess = if self.last_feature + 1 < n {
            self.last_feature + 1
        } else {
            0
        };
        let found = (0..n)
            .map(|i| (guess + i) % n)
            .find(|&i| same(&self.features[i].name, name));
        let i = match found {
            Some(i) => i,
            None => {
                if needs_escape(name.as_bytes()) {
                    return None;
                }
                if n >= FEATURES_KEPT {
                    self.features.clear();
                }
                let mut head = b"{\"kind\":\"window\",\"id\":\"".to_vec();
                head.extend_from_slice(name.as_bytes());
                head.push(b'/');
                self.features.push(FeaturePieces {
                    name: w.feature.clone(),
                    head,
                    tail_window: None,
                    tail: Vec::new(),
                });
                self.features.len() - 1
            }
        };
        self.last_feature = i;
        Some(i)
    }

    fn feature_record(&mut self, buf: &mut Vec<u8>, r: &FeatureRecord) {
        let (id, key) = (r.id.as_bytes(), r.key.as_bytes());
        let names = &r.features.names;
        if needs_escape(id) || needs_escape(key) {
            return feature_record(buf, r);
        }
        if !self
            .names
            .as_ref()
            .is_some_and(|n| FeatureNames::ptr_eq(n, names))
        {
            self.names_text.clear();
            self.names_ends.clear();
            for (i, name) in names.iter().enumerate() {
                self.names_text.push(if i == 0 { b'{' } else { b',' });
                string(&mut self.names_text, name);
                self.names_text.push(b':');
                self.names_ends.push(self.names_text.len());
            }
            self.names = Some(names.clone());
        }
        let mut time = itoa::Buffer::new();
        let time = time.format(r.event_time).as_bytes();
        buf.reserve(
            LINE_FIXED
                + id.len()
                + key.len()
                + time.len()
                + self.names_text.len()
                + VALUE_MAX * names.len(),
        );
        put(buf, b"{\"kind\":\"features\",\"id\":\"");
        put(buf, id);
        put(buf, b"\",\"key\":\"");
        put(buf, key);
        put(buf, b"\",\"event_time\":");
        put(buf, time);
        put(buf, b",\"features\":");
        if names.is_empty() {
            put(buf, b"{}}");
            return;
        }
        let mut from = 0;
        for (&end, v) in self.names_ends.iter().zip(&r.features.values) {
            let mut number = Number::default();
            put(buf, &self.names_text[from..end]);
            put(buf, number.format(*v));
            from = end;
        }
        put(buf, b"}}");
    }
}

/// What the lines of one feature share: `{"kind":"window","id":"F/` before
/// the key, and after the second key, for the window `tail_window`,
/// `","feature":"F","window_start":S,"window_end":E,"value":`.
struct FeaturePieces {
    name: SmolStr,
    head: Vec<u8>,
    tail_window: Option<(Millis, Millis)>,
    tail: Vec<u8>,
}

/// Features whose pieces a writer keeps (a pipeline's features, usually).
/// More start the list over; the bytes are the same.
const FEATURES_KEPT: usize = 64;

/// Room for the constant parts of a line and its newline (65 bytes at
/// most, a vector's), with some to spare: reserving too little only
/// costs a growth, never a wrong byte.
const LINE_FIXED: usize = 128;

/// The longest text of a value: a double's shortest form
/// (`-2.2250738585072014e-308`); an `i64` takes 20 at most.
const VALUE_MAX: usize = 24;

/// A value's JSON text, formatted on the stack.
#[derive(Default)]
struct Number {
    int: itoa::Buffer,
    float: zmij::Buffer,
    short: [u8; SHORT_MAX],
}

impl Number {
    fn format(&mut self, v: Option<Value>) -> &[u8] {
        match v {
            Some(Value::Int(n)) => self.int.format(n).as_bytes(),
            Some(Value::Float(f)) => match short_decimal(f, &mut self.short) {
                Some(at) => &self.short[at..],
                None if f.is_finite() => self.float.format_finite(f).as_bytes(),
                None => b"null",
            },
            None => b"null",
        }
    }
}

/// The longest text [`short_decimal`] writes: a sign, nine integer digits,
/// a point and two decimals.
const SHORT_MAX: usize = 13;

/// `v`'s shortest round-trip text, as the general formatter writes it, when
/// `v` is a decimal of at most two fraction digits below 10^9 in magnitude
/// (an amount, a price, their maxima and minima, often their sums): written
/// from its digits, right-aligned in `out`, without the general search for
/// the shortest ones. Returns where the text starts; `None` for any other value
/// (the general formatter's). The digits are written here, from the last,
/// rather than by `itoa`: its text would then be copied next to the point.
///
/// Why the text is the shortest: `c = |v| * 100` is an integer below 2^53
/// whose quotient by 100, correctly rounded (as IEEE division is), is
/// `|v|`, so the decimal `c / 100` reads back as `v`. Below 10^9 an ulp is
/// at most 2^-23, so every other decimal of as many fraction digits, and
/// every one of fewer (other than `c / 100` with its trailing zero cut), is
/// at least 0.01 away: none reads back as `v`. That decimal is then printed
/// the way the general formatter prints numbers of this size: point
/// notation with at least one fraction digit.
fn short_decimal(v: f64, out: &mut [u8; SHORT_MAX]) -> Option<usize> {
    let a = v.abs();
    if a.is_nan() || a >= 1e9 {
        return None;
    }
    let c = a * 100.0;
    let cents = c as u64;
    if cents as f64 != c || cents as f64 / 100.0 != a {
        return None;
    }
    let mut at = SHORT_MAX;
    let fraction = (cents % 100) as u8;
    if !fraction.is_multiple_of(10) {
        at -= 1;
        out[at] = b'0' + fraction % 10;
    }
    at -= 2;
    out[at] = b'.';
    out[at + 1] = b'0' + fraction / 10;
    let mut int = cents / 100;
    loop {
        at -= 1;
        out[at] = b'0' + (int % 10) as u8;
        int /= 10;
        if int == 0 {
            break;
        }
    }
    if v.is_sign_negative() {
        at -= 1;
        out[at] = b'-';
    }
    Some(at)
}

/// Appends `s`, for which `buf` has room (else it grows as
/// `extend_from_slice` does). Pieces of up to 32 bytes (keys, names,
/// digits: nearly all of a line) are copied with two overlapping loads and
/// stores instead of a call to `memcpy`, which for pieces this short costs
/// more than the copy.
#[inline(always)]
fn put(buf: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n > 32 || buf.capacity() - buf.len() < n {
        buf.extend_from_slice(s);
        return;
    }
    let src = s.as_ptr();
    // SAFETY: every load reads within `s` (at `0` and `n - k` for `k ≤ n`)
    // and every store writes within `buf`'s spare room, which holds at
    // least `n` bytes; the `n` bytes after `len` are then all written.
    unsafe {
        let dst = buf.as_mut_ptr().add(buf.len());
        if n >= 16 {
            let a = ptr::read_unaligned(src.cast::<u128>());
            let b = ptr::read_unaligned(src.add(n - 16).cast::<u128>());
            ptr::write_unaligned(dst.cast::<u128>(), a);
            ptr::write_unaligned(dst.add(n - 16).cast::<u128>(), b);
        } else if n >= 8 {
            let a = ptr::read_unaligned(src.cast::<u64>());
            let b = ptr::read_unaligned(src.add(n - 8).cast::<u64>());
            ptr::write_unaligned(dst.cast::<u64>(), a);
            ptr::write_unaligned(dst.add(n - 8).cast::<u64>(), b);
        } else if n >= 4 {
            let a = ptr::read_unaligned(src.cast::<u32>());
            let b = ptr::read_unaligned(src.add(n - 4).cast::<u32>());
            ptr::write_unaligned(dst.cast::<u32>(), a);
            ptr::write_unaligned(dst.add(n - 4).cast::<u32>(), b);
        } else {
            for i in 0..n {
                *dst.add(i) = *src.add(i);
            }
        }
        buf.set_len(buf.len() + n);
    }
}

/// A JSON string: quoted, escaped as serde_json does.
fn string(buf: &mut Vec<u8>, s: &str) {
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
/// stops at the first hit cannot be vectorised. A string's tail is the last
/// eight bytes (or two overlapping four-byte loads under eight), re-testing
/// a few bytes rather than looping over the rest one by one.
fn needs_escape(s: &[u8]) -> bool {
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
    let half = |c: &[u8]| u64::from(u32::from_le_bytes(c.try_into().expect("4 bytes")));
    let n = s.len();
    if n < 4 {
        return s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
    }
    if n < 8 {
        // Two loads in one word: a mark is exact for "any byte of the
        // word", which is all this asks.
        return escaped_bytes(half(&s[..4]) | half(&s[n - 4..]) << 32) != 0;
    }
    let mut chunks = s.chunks_exact(8);
    let mut found = 0u64;
    for c in &mut chunks {
        found |= escaped_bytes(word(c));
    }
    if !chunks.remainder().is_empty() {
        found |= escaped_bytes(word(&s[n - 8..]));
    }
    found != 0
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

/// `{"kind":"features",…}` without the newline, each piece on its own.
fn feature_record(buf: &mut Vec<u8>, r: &FeatureRecord) {
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
/// [`WindowResult::id`], written in pieces, each on its own.
fn window_result(buf: &mut Vec<u8>, w: &WindowResult) {
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

    /// The short path writes what the general formatter writes, for
    /// decimals of two fraction digits on both sides of 10^9 and their
    /// neighbouring doubles (one ulp off, so not such decimals), whatever
    /// doubles, and the edges.
    #[test]
    fn short_decimals_are_written_as_the_general_formatter_writes_them() {
        let general = |v: f64| zmij::Buffer::new().format_finite(v).to_owned();
        let check = |v: f64| {
            let mut number = Number::default();
            let written = String::from_utf8(number.format(Some(Value::Float(v))).to_vec()).unwrap();
            assert_eq!(written, general(v), "{v:e} ({:#x})", v.to_bits());
        };
        let edges = [
            0.0,
            -0.0,
            0.01,
            -0.01,
            0.1,
            0.5,
            1.0,
            2.0,
            10.0,
            0.07,
            1.05,
            999_999_999.99,
            999_999_999.0,
            1e9,
            -1e9,
            1e9 - 0.01,
            123_456_789.12,
            5e-3,
            0.015,
            1e-5,
            1e8,
        ];
        for v in edges {
            check(v);
            check(f64::from_bits(v.to_bits() + 1));
            if v != 0.0 {
                check(f64::from_bits(v.to_bits() - 1));
            }
        }
        for cents in (0..20_000i64).chain(99_999_990_000..100_000_010_000) {
            for v in [cents as f64 / 100.0, -(cents as f64) / 100.0] {
                check(v);
            }
        }
        proptest::proptest!(proptest::prelude::ProptestConfig::with_cases(20_000), |(
            cents in -200_000_000_000i64..200_000_000_000,
            ulps in -2i64..=2,
            bits in proptest::num::u64::ANY,
        )| {
            let v = cents as f64 / 100.0;
            check(v);
            let near = f64::from_bits((v.to_bits() as i64 + ulps) as u64);
            if near.is_finite() {
                check(near);
            }
            let any = f64::from_bits(bits);
            if any.is_finite() {
                check(any);
            }
        });
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

    /// One writer over a run of records, so that what it keeps from one
    /// line to the next (a window's times, a list's names) is used, changed
    /// and used again, with lines that need escaping in between.
    #[test]
    fn a_writer_s_lines_are_serde_json_s_whatever_came_before() {
        let short: FeatureNames = ["c", "s\"q", "max_amount_1h"].map(Arc::from).into();
        let other: FeatureNames = ["amount_count"].map(Arc::from).into();
        let mut outputs = Vec::new();
        for (i, key) in STRINGS.iter().enumerate() {
            for (start, end) in [(0, 60_000), (0, 60_000), (60_000, 120_000), (0, 60_000)] {
                for (f, feature) in ["amount_count", "a\"b", "amount_sum"].iter().enumerate() {
                    outputs.push(Output::Window(WindowResult {
                        key: (*key).into(),
                        feature: (*feature).into(),
                        window_start: start,
                        window_end: end,
                        value: values()[i % values().len()],
                        // Revisions change within a window and across.
                        revision: (i + f / 2) as u32,
                    }));
                }
            }
            for names in [&short, &short, &other, &short] {
                outputs.push(Output::Features(FeatureRecord {
                    id: format!("{key}/{i}"),
                    key: (*key).into(),
                    event_time: i as i64 - 3,
                    features: FeatureVector {
                        names: names.clone(),
                        values: values()[i..i + names.len()].to_vec(),
                    },
                    arrival: 0,
                }));
            }
        }
        let mut writer = LineWriter::default();
        for o in &outputs {
            let mut buf = b"before".to_vec();
            writer.write(o, &mut buf);
            assert_eq!(&buf[..6], b"before");
            assert_eq!(String::from_utf8(buf[6..].to_vec()).unwrap(), serde_line(o));
        }
    }

    /// More features in one window than a writer keeps pieces for, in an
    /// order that is not the order they were first seen in.
    #[test]
    fn a_window_of_many_features_is_written_whole() {
        let names: Vec<String> = (0..FEATURES_KEPT * 2 + 3)
            .map(|i| format!("f{i}"))
            .collect();
        let mut writer = LineWriter::default();
        for round in 0..3 {
            for (i, name) in names.iter().enumerate().rev().step_by(round + 1) {
                let o = Output::Window(WindowResult {
                    key: "k".into(),
                    feature: name.as_str().into(),
                    window_start: 0,
                    window_end: 60_000,
                    value: Some(Value::Int(i as i64)),
                    revision: round as u32,
                });
                let mut buf = Vec::new();
                writer.write(&o, &mut buf);
                assert_eq!(String::from_utf8(buf).unwrap(), serde_line(&o));
            }
        }
    }

    /// Every length a piece can have, at every amount of room left in the
    /// buffer (the inline copies' edges), against `extend_from_slice`.
    #[test]
    fn pieces_are_copied_whole() {
        let text: Vec<u8> = (0..64u8).map(|b| b'0' + b % 75).collect();
        for n in 0..=40 {
            for room in 0..=40 {
                let mut buf = Vec::with_capacity(room + 3);
                buf.extend_from_slice(b"abc");
                put(&mut buf, &text[..n]);
                let mut want = b"abc".to_vec();
                want.extend_from_slice(&text[..n]);
                assert_eq!(buf, want, "{n} bytes, {room} of room");
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
