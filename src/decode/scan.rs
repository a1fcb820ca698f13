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
            *i = digits_end(bytes, from);
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
        let mut take = |mantissa: &mut u64, taken: &mut u32, run: &[u8]| {
            let n = run.len() as u32;
            if *taken + n <= MAX_TAKEN {
                *mantissa = *mantissa * POWERS_OF_TEN_U64[n as usize] + digits_value(run);
                *taken += n;
            } else {
                // Never read: past this the text decides.
                exact = false;
            }
        };
        match bytes.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                let end = digits_end(bytes, i);
                take(&mut mantissa, &mut taken, &bytes[i..end]);
                i = end;
            }
            _ => return None,
        }
        let mut integer = true;
        let mut fraction = 0i32;
        if bytes.get(i) == Some(&b'.') {
            i += 1;
            integer = false;
            let from = i;
            i = digits_end(bytes, from);
            if i == from {
                return None;
            }
            fraction = i32::try_from(i - from).unwrap_or(i32::MAX);
            let mut run = &bytes[from..i];
            if mantissa == 0 {
                // Leading zeros of a fraction add nothing to the mantissa
                // and take no room in it.
                let zeros = run.iter().take_while(|&&d| d == b'0').count();
                run = &run[zeros..];
            }
            take(&mut mantissa, &mut taken, run);
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
        let power = exponent.saturating_sub(fraction);
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

/// The digits a mantissa takes before the text decides: any 19 digits
/// make a number below 10^19 < 2^64.
const MAX_TAKEN: u32 = 19;

/// `10^n` for the lengths of a digit run a mantissa takes.
const POWERS_OF_TEN_U64: [u64; MAX_TAKEN as usize + 1] = {
    let mut p = [1u64; MAX_TAKEN as usize + 1];
    let mut n = 1;
    while n < p.len() {
        p[n] = p[n - 1] * 10;
        n += 1;
    }
    p
};

/// Where the run of ASCII digits at `from` ends, eight bytes at a time: a
/// byte `b` is a digit when `b ^ b'0'` is at most 9, and adding `0x76` to
/// its low seven bits sets the top bit exactly when it is above 9 (the sum
/// stays below `0x100`, so nothing carries into the next byte).
fn digits_end(bytes: &[u8], from: usize) -> usize {
    const LOWS: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while let Some(word) = bytes.get(i..i + 8) {
        let t = u64::from_le_bytes(word.try_into().expect("8 bytes")) ^ 0x3030_3030_3030_3030;
        let other = (((t & LOWS) + 0x7676_7676_7676_7676) | t) & HIGHS;
        if other != 0 {
            return i + (other.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + bytes[i..].iter().take_while(|d| d.is_ascii_digit()).count()
}

/// The value of a run of at most [`MAX_TAKEN`] ASCII digits, eight at a
/// time where eight are left.
fn digits_value(run: &[u8]) -> u64 {
    debug_assert!(run.len() <= MAX_TAKEN as usize);
    let mut chunks = run.chunks_exact(8);
    let mut v = 0u64;
    for chunk in &mut chunks {
        v = v * 100_000_000 + eight_digits(u64::from_le_bytes(chunk.try_into().expect("8")));
    }
    for &d in chunks.remainder() {
        v = v * 10 + u64::from(d - b'0');
    }
    v
}

/// Eight ASCII digits, the first in the lowest byte, as their number: pairs,
/// then fours, then the eight, in three multiplications (the classic SWAR
/// reduction).
fn eight_digits(word: u64) -> u64 {
    let v = word.wrapping_sub(0x3030_3030_3030_3030);
    let v = v.wrapping_mul(10).wrapping_add(v >> 8);
    const MASK: u64 = 0x0000_00FF_0000_00FF;
    ((v & MASK)
        .wrapping_mul(0x000F_4240_0000_0064)
        .wrapping_add(((v >> 16) & MASK).wrapping_mul(0x0000_2710_0000_0001)))
        >> 32
}

/// Every byte of a word holding `n`.
const ONES: u64 = 0x0101_0101_0101_0101;

/// Marks (with its high bit) each byte of `word` below `n`, for `n` at most
/// 0x80; bytes with their high bit set (UTF-8) are never marked. A borrow
/// can mark bytes above a marked one too, never below it, so the lowest
/// mark is exact: little-endian, the first such byte of the text. A word
/// read from text is tested this way eight bytes at a time.
#[inline(always)]
pub(crate) fn bytes_below(word: u64, n: u8) -> u64 {
    word.wrapping_sub(ONES * u64::from(n)) & !word & (ONES * 0x80)
}

/// Marks each byte of `word` equal to `b`, as [`bytes_below`] marks.
#[inline(always)]
pub(crate) fn bytes_equal(word: u64, b: u8) -> u64 {
    bytes_below(word ^ (ONES * u64::from(b)), 1)
}

/// Marks each byte of `word` that JSON escapes in a string (`"`, `\`, a
/// control character), as [`bytes_below`] marks.
#[inline(always)]
pub(crate) fn escaped_bytes(word: u64) -> u64 {
    bytes_below(word, 0x20) | bytes_equal(word, b'"') | bytes_equal(word, b'\\')
}

/// The first byte at or after `from` that ends a string without escapes
/// (`"`, `\`, a control character), eight bytes at a time.
fn string_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(word) = bytes.get(i..i + 8) {
        let hit = escaped_bytes(u64::from_le_bytes(word.try_into().expect("8 bytes")));
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

/// Where the value of a member the schema names goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Member {
    Key,
    Timestamp,
    Field(usize),
}

/// A schema name as a record usually spells it, `"name":` (no space
/// before the colon), read as two words: its first eight bytes and its
/// last eight (overlapping), or its bytes under a mask when it is shorter.
#[derive(Clone, Copy, Debug)]
pub(super) struct Token {
    head: u64,
    tail: u64,
    mask: u64,
    len: usize,
    member: Member,
}

/// The longest token two words cover.
const TOKEN_MAX: usize = 16;

/// The schema's names as [`Token`]s. Each goes where
/// [`Decoder::member_named`] sends its name, so a name the schema gives
/// twice has the long way's member. A name that a string without escapes
/// cannot spell (a `"`, a `\`, a control character), or too long for two
/// words, has none: it is always read the long way.
pub(super) fn tokens(schema: &Decoder) -> Vec<Token> {
    [schema.key.as_str(), schema.timestamp.as_str()]
        .into_iter()
        .chain(schema.fields.iter().map(|(n, _)| n.as_str()))
        .filter(|name| string_end(name.as_bytes(), 0).is_none())
        .map(|name| {
            let member = schema.member_named(name).expect("a schema name");
            (format!("\"{name}\":").into_bytes(), member)
        })
        .filter(|(token, _)| token.len() <= TOKEN_MAX)
        .map(|(token, member)| {
            let len = token.len();
            let word = |bytes: &[u8]| {
                let mut w = [0u8; 8];
                w[..bytes.len()].copy_from_slice(bytes);
                u64::from_le_bytes(w)
            };
            Token {
                head: word(&token[..len.min(8)]),
                tail: word(&token[len.saturating_sub(8)..]),
                mask: if len >= 8 {
                    u64::MAX
                } else {
                    (1u64 << (8 * len)) - 1
                },
                len,
                member,
            }
        })
        .collect()
}

impl Decoder {
    /// The member whose token starts at `at`: records of a stream share
    /// their names, and two word compares cost less than reading the
    /// string, then comparing it with each name. A token that matches is
    /// what the long way reads: its name has no escapes, so the string ends
    /// at the quote before the colon. `None` leaves it to the long way (and
    /// so does a member within eight bytes of the end).
    #[inline(always)]
    fn member_at(&self, bytes: &[u8], at: usize) -> Option<(usize, Member)> {
        let word = |at: usize| {
            bytes
                .get(at..at + 8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        };
        let head = word(at)?;
        self.tokens.iter().find_map(|t| {
            let found = if t.len >= 8 {
                head == t.head && word(at + t.len - 8) == Some(t.tail)
            } else {
                head & t.mask == t.head
            };
            found.then_some((t.len, t.member))
        })
    }

    /// Where the value of member `name` goes, if the schema names it.
    fn member_named(&self, name: &str) -> Option<Member> {
        if same(name, &self.key) {
            Some(Member::Key)
        } else if same(name, &self.timestamp) {
            Some(Member::Timestamp)
        } else {
            self.fields
                .iter()
                .position(|(n, _)| same(n, name))
                .map(Member::Field)
        }
    }
}

/// Fills the record's slots (empty ones), or `None` for serde_json to
/// decide.
pub(super) fn scan<'a>(schema: &Decoder, text: &'a str, slots: &mut Slots<'a>) -> Option<()> {
    let mut c = Cursor { text, at: 0 };
    c.skip_ws();
    c.eat(b'{')?;
    c.skip_ws();
    if c.eat(b'}').is_none() {
        loop {
            let member = match schema.member_at(text.as_bytes(), c.at) {
                Some((len, member)) => {
                    c.at += len;
                    Some(member)
                }
                None => {
                    c.eat(b'"')?;
                    let name = c.string()?;
                    c.skip_ws();
                    c.eat(b':')?;
                    schema.member_named(name)
                }
            };
            c.skip_ws();
            let value = c.scalar()?;
            let slot = member.map(|m| match m {
                Member::Key => &mut slots.key,
                Member::Timestamp => &mut slots.timestamp,
                Member::Field(i) => &mut slots.fields[i],
            });
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
    (c.at == text.len()).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FieldType;
    use crate::record::FieldValue;

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

    fn scanned_record(d: &Decoder, text: &str) -> bool {
        scan(d, text, &mut Slots::new(d.fields.len())).is_some()
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
            // Members in other orders than the schema's, and duplicates
            // of a member that came first.
            (r#"{"amount":2.5,"ts":7,"userId":"u"}"#, true),
            (r#"{"ts":7,"amount":2.5,"userId":"u","x":1}"#, true),
            (r#"{"amount":1,"userId":"u","ts":7,"amount":2}"#, false),
            (r#"{"ts":7,"userId":"u","ts":8}"#, false),
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
                scanned_record(&d, text),
                *fast,
                "{text}: fast path taken or not"
            );
            let both = d.decode_text(text);
            let serde = d.decode_text_serde(text);
            assert_eq!(format!("{both:?}"), format!("{serde:?}"), "{text}");
        }
    }

    /// A schema name with a quote, a backslash or a control character has
    /// no token: records spelling it with escapes go through serde_json, and
    /// one spelling it raw is no JSON, refused as serde_json refuses it. A
    /// long name has none either, and is read the long way.
    #[test]
    fn names_needing_escapes_are_read_the_long_way() {
        let d = super::super::test_decoder(
            &[
                ("a\"b", FieldType::I64, true),
                ("t\tb", FieldType::I64, true),
                ("a_name_too_long_for_two_words", FieldType::I64, true),
            ],
            (i64::MIN, i64::MAX),
        );
        assert_eq!(d.tokens.len(), 2, "only key and timestamp have tokens");
        for text in [
            r#"{"userId":"u","ts":1,"a\"b":2}"#,
            "{\"userId\":\"u\",\"ts\":1,\"t\\tb\":3}",
            "{\"userId\":\"u\",\"ts\":1,\"a\"b\":2}",
            "{\"userId\":\"u\",\"ts\":1,\"t\tb\":3}",
        ] {
            assert!(!scanned_record(&d, text), "{text}");
            assert_eq!(
                format!("{:?}", d.decode_text(text)),
                format!("{:?}", d.decode_text_serde(text)),
                "{text}"
            );
        }
        assert!(d.decode_text(r#"{"userId":"u","ts":1,"a\"b":2}"#).is_ok());
        let long = r#"{"userId":"u","a_name_too_long_for_two_words":5,"ts":1}"#;
        assert!(scanned_record(&d, long));
        let (_, _, fields) = d.decode_text(long).expect("a plain record");
        let at = d.fields.iter().position(|(n, _)| n.starts_with("a_name"));
        assert_eq!(fields[at.expect("the field")], Some(FieldValue::I64(5)));
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

        /// A number read inside a record (digits then a delimiter and
        /// more, so the eight-byte steps see the run end) reads as parsed.
        #[test]
        fn a_number_before_more_text_reads_as_parsed(
            int in proptest::collection::vec(0u8..10, 1..22),
            fraction in proptest::option::of(proptest::collection::vec(0u8..10, 0..22)),
            rest in "([,} \\]a-df-z\"][,} \\]a-z\"0-9]{0,11})?",
        ) {
            let digits = |d: &[u8]| d.iter().map(|d| char::from(b'0' + d)).collect::<String>();
            let int = if int[0] == 0 { "0".to_string() } else { digits(&int) };
            let number = format!("{int}{}", fraction.map(|f| format!(".{}", digits(&f))).unwrap_or_default());
            let text = format!("{number}{rest}");
            let mut c = Cursor::new(&text);
            let read = c.number_value();
            let expected = parsed(&number);
            proptest::prop_assert_eq!(format!("{:?}", read), format!("{:?}", expected), "{}", text);
            if read.is_some() {
                proptest::prop_assert_eq!(c.at, number.len());
            }
        }

        #[test]
        fn a_digit_run_ends_and_counts_as_a_byte_by_byte_reading_says(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![6 => b'0'..=b'9', 1 => proptest::num::u8::ANY],
                0..40,
            ),
            from in 0usize..8,
        ) {
            let from = from.min(bytes.len());
            let naive = from + bytes[from..].iter().take_while(|d| d.is_ascii_digit()).count();
            let end = digits_end(&bytes, from);
            proptest::prop_assert_eq!(end, naive);
            let run = &bytes[from..end.min(from + MAX_TAKEN as usize)];
            let value = run.iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
            proptest::prop_assert_eq!(digits_value(run), value);
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
