//! The decoder's fast path: one scan over a flat JSON object, filling the
//! schema's slots exactly as serde_json and [`RecordSeed`](super) would.
//!
//! It takes only what it can read without doubt: an object of strings
//! without escapes, numbers, `true`, `false` and `null`, each key at most
//! once among those the schema names. Anything else (an escape, a nested
//! value, a long integer, a number out of range, a syntax error, a
//! duplicate) gives `None` and the record goes through serde_json, which
//! decides and words the reason. So what this accepts, serde_json accepts
//! too, with the same values: integers as serde_json types them (`U64`
//! when non-negative, `I64` when negative, `-0` left to it), other numbers
//! by the standard library's correctly rounded parse, as serde_json's
//! `float_roundtrip` parses them.

use std::borrow::Cow;

use super::{Decoder, Scalar, Slots};

/// JSON's insignificant whitespace.
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// A reading position in a JSON text: the pieces of a fast path that
/// takes only what it can read without doubt (the archive line's reader
/// in `source/s3` uses them too).
pub(crate) struct Cursor<'a> {
    pub(crate) text: &'a str,
    pub(crate) at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(text: &'a str) -> Cursor<'a> {
        Cursor { text, at: 0 }
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    pub(crate) fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_ws) {
            self.at += 1;
        }
    }

    pub(crate) fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek() == Some(b)).then(|| self.at += 1)
    }

    /// A string without escapes or control characters, after its `"`.
    pub(crate) fn string(&mut self) -> Option<&'a str> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        let end = string_end(bytes, start)?;
        if bytes[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        // On a char boundary: `"` is ASCII.
        Some(&self.text[start..end])
    }

    /// A JSON number's text (its grammar checked), and whether it is an
    /// integer (no fraction, no exponent).
    pub(crate) fn number(&mut self) -> Option<(&'a str, bool)> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        let mut i = start;
        let digits = |i: &mut usize| {
            let from = *i;
            while bytes.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i - from
        };
        if bytes.get(i) == Some(&b'-') {
            i += 1;
        }
        match bytes.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => return None,
        }
        let mut integer = true;
        if bytes.get(i) == Some(&b'.') {
            i += 1;
            integer = false;
            if digits(&mut i) == 0 {
                return None;
            }
        }
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            i += 1;
            integer = false;
            if matches!(bytes.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if digits(&mut i) == 0 {
                return None;
            }
        }
        // A number runs into the next token only if that is a delimiter;
        // `01` or `1x` are serde_json's to refuse.
        if bytes.get(i).is_some_and(u8::is_ascii_digit) {
            return None;
        }
        self.at = i;
        Some((&self.text[start..i], integer))
    }

    pub(crate) fn literal(&mut self, word: &str) -> Option<()> {
        self.text[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    /// A value the fast path can hold: a scalar, no object or array.
    fn scalar(&mut self) -> Option<Scalar<'a>> {
        Some(match self.peek()? {
            b'"' => {
                self.at += 1;
                Scalar::Str(Cow::Borrowed(self.string()?))
            }
            b't' => {
                self.literal("true")?;
                Scalar::Bool(true)
            }
            b'f' => {
                self.literal("false")?;
                Scalar::Bool(false)
            }
            b'n' => {
                self.literal("null")?;
                Scalar::Null
            }
            _ => self.number_value()?,
        })
    }

    /// A number as [`number`] gives it, its value taken as its digits are
    /// scanned: an integer of at most 18 characters is exact in a `u64`,
    /// and a decimal whose digits make an integer below 2^53, with a power
    /// of ten within ±22, is one correctly rounded operation on two exact
    /// doubles
    /// (Clinger's fast path), so the same double as the standard library's
    /// parse. Any other number is parsed from its text as before.
    fn number_value(&mut self) -> Option<Scalar<'a>> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        let mut i = start;
        let negative = bytes.get(i) == Some(&b'-');
        if negative {
            i += 1;
        }
        // Digits, integer part and fraction together, while they fit.
        let mut mantissa: u64 = 0;
        let mut taken = 0u32;
        let mut exact = true;
        let mut digit = |mantissa: &mut u64, taken: &mut u32, d: u8| {
            if *taken < 19 {
                *mantissa = *mantissa * 10 + u64::from(d - b'0');
                *taken += 1;
            } else {
                exact = false;
            }
        };
        match bytes.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while let Some(&d) = bytes.get(i).filter(|d| d.is_ascii_digit()) {
                    digit(&mut mantissa, &mut taken, d);
                    i += 1;
                }
            }
            _ => return None,
        }
        let mut integer = true;
        let mut fraction = 0i32;
        if bytes.get(i) == Some(&b'.') {
            i += 1;
            integer = false;
            let from = i;
            while let Some(&d) = bytes.get(i).filter(|d| d.is_ascii_digit()) {
                // Leading zeros of a fraction add nothing to the mantissa
                // and take no room in it.
                if mantissa != 0 || d != b'0' {
                    digit(&mut mantissa, &mut taken, d);
                }
                fraction += 1;
                i += 1;
            }
            if i == from {
                return None;
            }
        }
        let mut exponent = 0i32;
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            i += 1;
            integer = false;
            let sign = match bytes.get(i) {
                Some(b'-') => {
                    i += 1;
                    -1
                }
                Some(b'+') => {
                    i += 1;
                    1
                }
                _ => 1,
            };
            let from = i;
            while let Some(&d) = bytes.get(i).filter(|d| d.is_ascii_digit()) {
                // Past this no fast path applies; the text decides.
                exponent = (exponent * 10 + i32::from(d - b'0')).min(100_000);
                i += 1;
            }
            if i == from {
                return None;
            }
            exponent *= sign;
        }
        if bytes.get(i).is_some_and(u8::is_ascii_digit) {
            return None;
        }
        self.at = i;
        let text = &self.text[start..i];
        if integer {
            // At most 18 characters: every digit was taken, and no overflow
            // of u64 or i64 to think about.
            if text.len() > 18 {
                return None;
            }
            return match (negative, mantissa) {
                (false, m) => Some(Scalar::U64(m)),
                (true, 0) => None, // -0: serde_json's own reading
                (true, m) => Some(Scalar::I64(-(m as i64))),
            };
        }
        let power = exponent - fraction;
        if exact && mantissa < 1 << 53 && (-22..=22).contains(&power) {
            let m = mantissa as f64;
            let v = if power < 0 {
                m / POWERS_OF_TEN[power.unsigned_abs() as usize]
            } else {
                m * POWERS_OF_TEN[power as usize]
            };
            return Some(Scalar::F64(if negative { -v } else { v }));
        }
        number(text, false)
    }
}

/// `a == b`, a field name against the schema's (the NDJSON writer's
/// feature names too): names are short, and a name up to 16 bytes is
/// compared in two overlapping loads of each rather than through a call
/// to `memcmp`.
#[inline(always)]
pub(crate) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8"));
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4"));
    match n {
        0..=3 => a == b,
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => a == b,
    }
}

/// The powers of ten a double holds exactly.
const POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// The first byte at or after `from` that ends a string without escapes
/// (`"`, `\`, a control character), eight bytes at a time: in a word, the
/// lowest byte flagged is always a true hit (a borrow only flags bytes
/// above one), and little-endian order makes it the first in the text.
fn string_end(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below_space = |v: u64| v.wrapping_sub(ONES * 0x20) & !v & HIGHS;
    let mut i = from;
    while let Some(word) = bytes.get(i..i + 8) {
        let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        let hit = below_space(v)
            | zero(v ^ (ONES * u64::from(b'"')))
            | zero(v ^ (ONES * u64::from(b'\\')));
        if hit != 0 {
            return Some(i + (hit.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    bytes
        .get(i..)?
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|p| i + p)
}

/// The number as serde_json gives it, or `None` to leave it to serde_json.
fn number(text: &str, integer: bool) -> Option<Scalar<'_>> {
    // At most 18 digits: no overflow of u64 or i64 to think about.
    if integer && text.len() <= 18 {
        return match text.strip_prefix('-') {
            None => text.parse::<u64>().ok().map(Scalar::U64),
            // serde_json makes `-0` a float.
            Some("0") => None,
            Some(_) => text.parse::<i64>().ok().map(Scalar::I64),
        };
    }
    if integer {
        return None;
    }
    // serde_json refuses what overflows to infinity.
    text.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(Scalar::F64)
}

/// The record's slots, or `None` for serde_json to decide.
pub(super) fn scan<'a>(schema: &Decoder, text: &'a str) -> Option<Slots<'a>> {
    let mut slots = Slots {
        key: None,
        timestamp: None,
        fields: (0..schema.fields.len()).map(|_| None).collect(),
    };
    let mut c = Cursor { text, at: 0 };
    c.skip_ws();
    c.eat(b'{')?;
    c.skip_ws();
    if c.eat(b'}').is_none() {
        loop {
            c.eat(b'"')?;
            let name = c.string()?;
            c.skip_ws();
            c.eat(b':')?;
            c.skip_ws();
            let value = c.scalar()?;
            let slot = if same(name, &schema.key) {
                Some(&mut slots.key)
            } else if same(name, &schema.timestamp) {
                Some(&mut slots.timestamp)
            } else {
                schema
                    .fields
                    .iter()
                    .position(|(n, _)| same(n, name))
                    .map(|i| &mut slots.fields[i])
            };
            if let Some(slot) = slot {
                if slot.is_some() {
                    return None; // a duplicate: serde_json's reason
                }
                *slot = Some(value);
            }
            c.skip_ws();
            if c.eat(b',').is_some() {
                c.skip_ws();
                continue;
            }
            c.eat(b'}')?;
            break;
        }
    }
    c.skip_ws();
    (c.at == text.len()).then_some(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FieldType;

    fn decoder() -> Decoder {
        super::super::test_decoder(
            &[
                ("amount", FieldType::F64, true),
                ("merchant", FieldType::String, true),
                ("n", FieldType::I64, true),
                ("ok", FieldType::Bool, true),
            ],
            (i64::MIN, i64::MAX),
        )
    }

    /// Every record gives the same event or the same reason with the fast
    /// path as through serde_json alone, and the fast path takes the
    /// plain ones.
    #[test]
    fn the_fast_path_agrees_with_serde_json() {
        let d = decoder();
        let records: &[(&str, bool)] = &[
            (r#"{"userId":"u1","ts":1700000000000,"amount":12.5}"#, true),
            (r#"{"userId":42,"ts":1700000000000,"amount":1}"#, true),
            (r#"{"userId":-42,"ts":-5,"amount":-0.0,"n":-7}"#, true),
            (
                r#" { "userId" : "é𝄞" , "ts" : 1.7e12 , "amount" : 3E-2 , "ok" : true } "#,
                true,
            ),
            (
                r#"{"userId":"u","ts":1,"amount":null,"merchant":null}"#,
                true,
            ),
            (
                r#"{"userId":"u","ts":1,"ok":false,"other":"x","z":1e999}"#,
                false,
            ),
            (r#"{"userId":"u","ts":"2023-11-14T22:13:20Z"}"#, true),
            (r#"{"userId":"u","ts":1,"extra":[1,2]}"#, false),
            (r#"{"userId":"u","ts":1,"extra":{"a":1}}"#, false),
            (r#"{"userId":"u\"v","ts":1}"#, false),
            (r#"{"userId":"u","ts":-0}"#, false),
            (r#"{"userId":18446744073709551615,"ts":1}"#, false),
            (r#"{"userId":123456789012345678,"ts":1}"#, true),
            (r#"{"userId":1234567890123456789,"ts":1}"#, false),
            (r#"{"userId":"u","ts":1,"amount":1e999}"#, false),
            (r#"{"userId":"u","ts":1,"amount":01}"#, false),
            (r#"{"userId":"u","ts":1,"amount":1.}"#, false),
            (r#"{"userId":"u","ts":1,"amount":.5}"#, false),
            (r#"{"userId":"u","ts":1,"amount":1e}"#, false),
            (r#"{"userId":"u","ts":1,"amount":+1}"#, false),
            (r#"{"userId":"u","ts":1,"amount":"1"}"#, true),
            (r#"{"userId":"u","userId":"v","ts":1}"#, false),
            (r#"{"userId":"u","ts":1,"x":1,"x":2}"#, true),
            (r#"{"userId":"u","ts":1,}"#, false),
            (r#"{"userId":"u","ts":1} x"#, false),
            (r#"{"userId":"u","ts":1}}"#, false),
            (r#"{"userId":"u" "ts":1}"#, false),
            (r#"{"userId":tru,"ts":1}"#, false),
            (r#"{"userId":truex,"ts":1}"#, false),
            (r#"{"userId":nul}"#, false),
            ("{\"userId\":\"a\tb\",\"ts\":1}", false),
            (r#"{}"#, true),
            (r#"  {  }  "#, true),
            (r#"[1]"#, false),
            (r#""s""#, false),
            (r#"7"#, false),
            (r#""#, false),
            (r#"{"#, false),
            (r#"{"userId""#, false),
            (r#"{"userId":"#, false),
            (r#"{"userId":"u"#, false),
            (r#"{"userId":"u","ts":1"#, false),
        ];
        for (text, fast) in records {
            assert_eq!(
                scan(&d, text).is_some(),
                *fast,
                "{text}: fast path taken or not"
            );
            let both = d.decode_text(text);
            let serde = d.decode_text_serde(text);
            assert_eq!(format!("{both:?}"), format!("{serde:?}"), "{text}");
        }
    }

    /// The old reading: the number's text, then parsed.
    fn parsed(text: &str) -> Option<Scalar<'_>> {
        let mut c = Cursor::new(text);
        let (t, integer) = c.number()?;
        (c.at == text.len()).then_some(())?;
        number(t, integer)
    }

    fn scanned(text: &str) -> Option<Scalar<'_>> {
        let mut c = Cursor::new(text);
        let v = c.number_value()?;
        (c.at == text.len()).then_some(v)
    }

    #[test]
    fn numbers_read_while_scanned_are_the_parsed_ones() {
        let cases = [
            "0",
            "-0",
            "7",
            "-7",
            "0.5",
            "-0.0",
            "0.000123",
            "350.30",
            "1e5",
            "1E+5",
            "1e-5",
            "123456789012345678",
            "-12345678901234567",
            "1234567890123456789",
            "9007199254740993.0",
            "9007199254740992e0",
            "0.1",
            "0.3",
            "1e22",
            "1e23",
            "1e-22",
            "1e-23",
            "123456789012345.6",
            "1234567890123456.7",
            "4.9e-324",
            "1.7976931348623157e308",
            "1e999",
            "01",
            "1.",
            ".5",
            "1e",
            "-",
            "2.2250738585072014e-308",
            "0e0",
            "-0e-0",
            "100000000000000000000000000.5",
            "0.0000000000000000000000000001",
        ];
        for text in cases {
            assert_eq!(
                format!("{:?}", scanned(text)),
                format!("{:?}", parsed(text)),
                "{text}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        #[test]
        fn any_number_reads_as_parsed(
            negative in proptest::bool::ANY,
            int in proptest::collection::vec(0u8..10, 1..26),
            fraction in proptest::option::of(proptest::collection::vec(0u8..10, 1..25)),
            exponent in proptest::option::of((0usize..6, proptest::collection::vec(0u8..10, 1..5))),
        ) {
            let digits = |d: &[u8]| d.iter().map(|d| char::from(b'0' + d)).collect::<String>();
            // Mostly valid JSON (no leading zero), sometimes not.
            let int = match int.as_slice() {
                [0, rest @ ..] if rest.len() % 3 != 0 => "0".to_string(),
                d => digits(d),
            };
            let text = format!(
                "{}{int}{}{}",
                if negative { "-" } else { "" },
                fraction.map(|f| format!(".{}", digits(&f))).unwrap_or_default(),
                exponent
                    .map(|(form, e)| format!("{}{}", ["e", "E", "e+", "e-", "E-", "E+"][form], digits(&e)))
                    .unwrap_or_default(),
            );
            proptest::prop_assert_eq!(
                format!("{:?}", scanned(&text)),
                format!("{:?}", parsed(&text)),
                "{}", text
            );
        }

        #[test]
        fn a_string_ends_where_a_byte_by_byte_search_says(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => 0x20u8..0x7f,
                    1 => proptest::prelude::Just(b'"'),
                    1 => proptest::prelude::Just(b'\\'),
                    1 => 0u8..0x20,
                    1 => 0x80u8..=0xff,
                ],
                0..40,
            ),
            from in 0usize..8,
        ) {
            let from = from.min(bytes.len());
            let naive = bytes[from..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .map(|p| from + p);
            proptest::prop_assert_eq!(string_end(&bytes, from), naive);
        }
    }
}
