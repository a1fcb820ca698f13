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
        let len = bytes[start..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if bytes[start + len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        // On a char boundary: `"` is ASCII.
        Some(&self.text[start..start + len])
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
            _ => {
                let (text, integer) = self.number()?;
                number(text, integer)?
            }
        })
    }
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
            let slot = if name == schema.key {
                Some(&mut slots.key)
            } else if name == schema.timestamp {
                Some(&mut slots.timestamp)
            } else {
                schema
                    .fields
                    .iter()
                    .position(|(n, _)| n == name)
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
}
