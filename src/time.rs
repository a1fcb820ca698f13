//! Time, in one place: the unit ([`Millis`]), the wall clock
//! ([`now_millis`]), configured lengths of time ([`Duration`]) and the one
//! reader of instants written as text ([`parse_rfc3339`] and the functions
//! built on it). Nothing else in `src/` calls chrono.
//!
//! # Instants as text
//!
//! Two forms, each read by one function:
//!
//! - **RFC 3339**, read by [`parse_rfc3339`] as chrono reads it:
//!   `YYYY-MM-DD` `T` `HH:MM:SS` `[.fraction]` offset, the offset being `Z`
//!   or `±HH:MM` (hours up to 23; the colon is required). Accepted besides
//!   RFC 3339's letter: `t` and `z` in lower case, a space instead of the
//!   `T` (RFC 3339 allows it "for readability"), any number of fractional
//!   digits (those past nanoseconds are ignored; the result is rounded down
//!   to the millisecond), a leap second `:60` (the first millisecond of the
//!   next second) and U+2212 `−` as the offset's minus. Refused, with
//!   chrono's reason: no offset or a date without a time ("premature end of
//!   input" or "input contains invalid characters"), other separators or
//!   letters ("input contains invalid characters"), anything after the
//!   offset, surrounding whitespace included ("trailing input"), an impossible
//!   date or time such as `2024-02-30` or `25:00` ("input is out of range").
//!   Examples: `2024-05-01T10:00:00Z`, `2024-05-01T12:00:00.250+02:00`,
//!   `2024-05-01 10:00:00z`.
//! - **Epoch milliseconds**, read by [`parse_epoch_or_rfc3339`]: the text,
//!   trimmed of whitespace, as an `i64` (an optional `+` or `-` and ASCII
//!   digits: no fraction, exponent or `_`); anything else is read as RFC
//!   3339 (trimmed too), and refused with RFC 3339's reason.
//!
//! Who reads what, and the messages they refuse with (tests and the
//! decoder's dead letters depend on them, byte for byte):
//!
//! | caller | reads | refused with |
//! |---|---|---|
//! | the decoder (`decode.rs`), a string in the `[schema]` timestamp field | [`parse_epoch_or_rfc3339`] | `field {name}: {text:?} is neither RFC 3339 nor epoch milliseconds ({reason})`, `text` untrimmed |
//! | `replay --from/--to` | [`parse_time`] | `time {text:?} is neither RFC 3339 nor epoch milliseconds: {reason}`, `text` trimmed |
//! | `at` of the online API (`GET /v1/features/{key}?at=`), percent-decoded | [`parse_time`] | `at: ` and the same, in a 400 |
//! | `from`/`to` of an S3 source (TOML) | [`toml_millis`] with [`TomlTime::Bound`] | see [`TomlTime::Bound`] |
//! | `timestamp` of a Kinesis source (TOML) | [`toml_millis`] with [`TomlTime::KinesisTimestamp`] | see [`TomlTime::KinesisTimestamp`] |
//! | hour directories of the archive (`archive/layout.rs`) | [`parse_rfc3339`] | (a key without a valid hour is read whatever its hour) |
//!
//! Numbers that are not strings (JSON numbers in events, TOML integers) are
//! epoch milliseconds as they are, and never reach these functions.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Epoch milliseconds, the only unit of time inside shardflow.
pub type Millis = i64;

/// The wall clock, in epoch milliseconds: records' arrival times,
/// latencies, the time an archive object was opened.
pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// The wall clock in epoch nanoseconds (0 past the year 2262), for names
/// that must differ between two calls within a millisecond.
pub fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

/// Why a text is not an RFC 3339 time; shows as chrono's reason
/// ("input contains invalid characters", "premature end of input",
/// "trailing input", "input is out of range", ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError(chrono::ParseError);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ParseError {}

/// An RFC 3339 time (as the [module doc](self) describes: with its offset,
/// nothing around it) in epoch milliseconds. An integer is refused
/// ("input contains invalid characters" or "premature end of input"); see
/// [`parse_epoch_or_rfc3339`] for both.
#[inline]
pub fn parse_rfc3339(text: &str) -> Result<Millis, ParseError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(ParseError)
}

/// Epoch milliseconds or an RFC 3339 time, whitespace around either
/// ignored: `"1714557600000"`, `" -5 "`, `"2024-05-01T10:00:00Z"`. A text
/// that is neither is refused with the reason it is not RFC 3339.
#[inline]
pub fn parse_epoch_or_rfc3339(text: &str) -> Result<Millis, ParseError> {
    let text = text.trim();
    match text.parse::<i64>() {
        Ok(ms) => Ok(ms),
        Err(_) => parse_rfc3339(text),
    }
}

/// A time as written on the command line (`replay --from/--to`) or in a
/// TOML string of `from`/`to`: [`parse_epoch_or_rfc3339`], refused with
/// `time {text:?} is neither RFC 3339 nor epoch milliseconds: {reason}`
/// (`text` trimmed).
pub fn parse_time(text: &str) -> Result<Millis, String> {
    parse_epoch_or_rfc3339(text).map_err(|e| {
        let text = text.trim();
        format!("time {text:?} is neither RFC 3339 nor epoch milliseconds: {e}")
    })
}

/// The setting a TOML time is read for ([`toml_millis`]). Both take a TOML
/// integer as epoch milliseconds and a TOML offset date-time
/// (`2024-05-01T10:00:00Z`, unquoted); they differ in strings and in the
/// words of their messages. That difference predates this module and is
/// kept so that every config that loads today still loads and every one
/// refused is still refused; accepting `"1714557600000"` in `timestamp` is
/// a change of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TomlTime {
    /// `from`/`to` of an S3 source (`[replay.source]`): a string is read
    /// like `--from`/`--to` ([`parse_time`]: trimmed, epoch milliseconds or
    /// RFC 3339). Refused with `time {text:?} is neither RFC 3339 nor epoch
    /// milliseconds: {reason}`; a TOML date-time without a time or an
    /// offset with `time {value} needs a date, a time and an offset:
    /// {reason}`; any other value with `a time must be an RFC 3339 string
    /// or epoch milliseconds, got {value}`.
    Bound,
    /// `timestamp` of a Kinesis source (`starting_position =
    /// "at_timestamp"`): a string must be RFC 3339 as it is
    /// ([`parse_rfc3339`]: not trimmed; a quoted number is refused, write it
    /// unquoted). Refused with `timestamp {text:?} is not RFC 3339:
    /// {reason}`; a TOML date-time without a time or an offset with
    /// `timestamp {value} needs a date, a time and an offset: {reason}`;
    /// any other value with `timestamp must be an RFC 3339 string or epoch
    /// milliseconds, got {value}`.
    KinesisTimestamp,
}

/// A time in a TOML value, in epoch milliseconds, read as `setting` reads
/// it ([`TomlTime`] lists what each accepts and its messages).
pub fn toml_millis(value: &toml::Value, setting: TomlTime) -> Result<Millis, String> {
    let (noun, kind) = match setting {
        TomlTime::Bound => ("time", "a time"),
        TomlTime::KinesisTimestamp => ("timestamp", "timestamp"),
    };
    match value {
        toml::Value::Integer(ms) => Ok(*ms),
        toml::Value::String(s) => match setting {
            TomlTime::Bound => parse_time(s),
            TomlTime::KinesisTimestamp => {
                parse_rfc3339(s).map_err(|e| format!("timestamp {s:?} is not RFC 3339: {e}"))
            }
        },
        toml::Value::Datetime(d) => parse_rfc3339(&d.to_string())
            .map_err(|e| format!("{noun} {d} needs a date, a time and an offset: {e}")),
        other => Err(format!(
            "{kind} must be an RFC 3339 string or epoch milliseconds, got {other}"
        )),
    }
}

/// `t` as RFC 3339 in UTC with milliseconds (`2023-11-14T22:13:20.000Z`),
/// for messages; a time beyond chrono's range (±262,000 years) as its
/// number.
pub fn format_rfc3339_millis(t: Millis) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(t)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| t.to_string())
}

/// The UTC date and hour `t` falls in: (year, month 1-12, day 1-31, hour
/// 0-23). A time beyond chrono's range (±262,000 years) gives 1970-01-01,
/// hour 0.
pub fn utc_date_hour(t: Millis) -> (i32, u32, u32, u32) {
    use chrono::{Datelike as _, Timelike as _};
    let dt = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(t).unwrap_or_default();
    (dt.year(), dt.month(), dt.day(), dt.hour())
}

/// A length of time written as `"250ms"`, `"5s"`, `"1m"`, `"1h"` or `"1d"`
/// (a bare integer is milliseconds).
///
/// In TOML ([`Deserialize`]): a string as [`Duration::parse`] reads it, or
/// a non-negative integer of milliseconds. A negative integer is refused
/// with `duration must not be negative, got {ms}`; any other value with
/// `expected a duration such as "250ms", "5s", "1m", "1h" or a number of
/// milliseconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(Millis);

impl Duration {
    pub const fn from_millis(ms: Millis) -> Self {
        Duration(ms)
    }
    pub const fn millis(self) -> Millis {
        self.0
    }
    /// As a `std` duration (a negative one as zero).
    pub fn std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.max(0) as u64)
    }

    /// Parses `"<integer><unit>"`, unit one of ms, s, m, h, d; whitespace
    /// around the text and between number and unit is ignored, and `"0"`
    /// needs no unit. Refused with `invalid duration {text:?}: expected a
    /// whole number and a unit, one of ms, s, m, h, d (e.g. "250ms", "5s",
    /// "1h")` (no digits, a sign, a fraction, another unit, a bare non-zero
    /// number) or `duration {text:?} is too large` (beyond `i64`
    /// milliseconds).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let bad = || {
            format!(
                "invalid duration {text:?}: expected a whole number and a unit, one of ms, s, m, h, d (e.g. \"250ms\", \"5s\", \"1h\")"
            )
        };
        if digits.is_empty() {
            return Err(bad());
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        let scale = match unit.trim() {
            // Zero needs no unit: `"0"` reads as what it says.
            "" if n == 0 => 1,
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        n.checked_mul(scale)
            .map(Duration)
            .ok_or_else(|| format!("duration {text:?} is too large"))
    }
}

/// The largest whole unit: `90s`, `1m`, `1d`, `250ms`, `0ms`.
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        for (unit, scale) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms != 0 && ms % scale == 0 {
                return write!(f, "{}{unit}", ms / scale);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Millis(i64),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a duration such as \"250ms\", \"5s\", \"1m\", \"1h\" or a number of milliseconds",
            )
        })? {
            Raw::Text(t) => Duration::parse(&t).map_err(serde::de::Error::custom),
            Raw::Millis(ms) if ms >= 0 => Ok(Duration(ms)),
            Raw::Millis(ms) => Err(serde::de::Error::custom(format!(
                "duration must not be negative, got {ms}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Millis = 1_714_557_600_000; // 2024-05-01T10:00:00Z

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(Duration::parse("250ms").unwrap().millis(), 250);
        assert_eq!(Duration::parse("5s").unwrap().millis(), 5_000);
        assert_eq!(Duration::parse("1h").unwrap().millis(), 3_600_000);
        assert_eq!(Duration::parse(" 2 m ").unwrap().millis(), 120_000);
        assert!(Duration::parse("5").is_err());
        assert_eq!(Duration::parse("0").unwrap().millis(), 0);
        assert!(Duration::parse("s").is_err());
        assert!(Duration::parse("1.5s").is_err());
        assert!(Duration::parse("-1s").is_err());
        assert_eq!(
            Duration::parse("99999999999999999d").unwrap_err(),
            "duration \"99999999999999999d\" is too large"
        );
        assert_eq!(Duration(90_000).to_string(), "90s");
        assert_eq!(Duration(60_000).to_string(), "1m");
        assert_eq!(Duration(250).to_string(), "250ms");
        assert_eq!(Duration(0).to_string(), "0ms");
    }

    #[test]
    fn rfc3339_forms() {
        for (text, want) in [
            ("2024-05-01T10:00:00Z", T),
            ("2024-05-01t10:00:00z", T),
            ("2024-05-01 10:00:00Z", T),
            ("2024-05-01T12:00:00+02:00", T),
            ("2024-05-01T09:00:00\u{2212}01:00", T),
            ("2024-05-01T10:00:00.250Z", T + 250),
            ("2024-05-01T10:00:00.2509999999999Z", T + 250),
            ("1969-12-31T23:59:59.9995Z", -1),
            ("2024-05-01T09:59:60Z", T),
        ] {
            assert_eq!(parse_rfc3339(text), Ok(want), "{text}");
        }
        for (text, why) in [
            ("2024-05-01T10:00:00", "premature end of input"),
            ("2024-05-01", "premature end of input"),
            ("1714557600000", "premature end of input"),
            (
                "17145576000001714557600000",
                "input contains invalid characters",
            ),
            (
                "2024-05-01T10:00:00+0200",
                "input contains invalid characters",
            ),
            ("2024-05-01T10:00:00Z ", "trailing input"),
            (" 2024-05-01T10:00:00Z", "input contains invalid characters"),
            ("2024-05-01_10:00:00Z", "input contains invalid characters"),
            ("2024-02-30T10:00:00Z", "input is out of range"),
            ("2024-05-01T25:00:00Z", "input is out of range"),
        ] {
            assert_eq!(
                parse_rfc3339(text).unwrap_err().to_string(),
                why,
                "{text:?}"
            );
        }
    }

    #[test]
    fn epoch_or_rfc3339_trims_and_takes_integers_first() {
        assert_eq!(parse_epoch_or_rfc3339(" 1714557600000\n"), Ok(T));
        assert_eq!(parse_epoch_or_rfc3339("-5"), Ok(-5));
        assert_eq!(parse_epoch_or_rfc3339("+5"), Ok(5));
        assert_eq!(parse_epoch_or_rfc3339(" 2024-05-01T10:00:00Z "), Ok(T));
        assert!(parse_epoch_or_rfc3339("1.5").is_err());
        assert!(parse_epoch_or_rfc3339("1_000").is_err());
        assert_eq!(
            parse_time(" yesterday ").unwrap_err(),
            "time \"yesterday\" is neither RFC 3339 nor epoch milliseconds: premature end of input"
        );
    }

    #[test]
    fn toml_times_keep_each_settings_strings_and_messages() {
        let toml_value = |text: &str| -> toml::Value {
            let table: toml::Table = toml::from_str(&format!("v = {text}")).unwrap();
            table["v"].clone()
        };
        use TomlTime::{Bound, KinesisTimestamp as Kinesis};
        for setting in [Bound, Kinesis] {
            assert_eq!(toml_millis(&toml_value("1714557600000"), setting), Ok(T));
            assert_eq!(
                toml_millis(&toml_value("2024-05-01T10:00:00Z"), setting),
                Ok(T)
            );
            assert_eq!(
                toml_millis(&toml_value("\"2024-05-01T10:00:00Z\""), setting),
                Ok(T)
            );
        }
        // Only `from`/`to` read a quoted number or trim.
        assert_eq!(toml_millis(&toml_value("\" 1714557600000\""), Bound), Ok(T));
        assert_eq!(
            toml_millis(&toml_value("\"1714557600000\""), Kinesis).unwrap_err(),
            "timestamp \"1714557600000\" is not RFC 3339: premature end of input"
        );
        assert_eq!(
            toml_millis(&toml_value("\"soon\""), Bound).unwrap_err(),
            "time \"soon\" is neither RFC 3339 nor epoch milliseconds: premature end of input"
        );
        assert_eq!(
            toml_millis(&toml_value("2024-05-01T10:00:00"), Bound).unwrap_err(),
            "time 2024-05-01T10:00:00 needs a date, a time and an offset: premature end of input"
        );
        assert_eq!(
            toml_millis(&toml_value("2024-05-01"), Kinesis).unwrap_err(),
            "timestamp 2024-05-01 needs a date, a time and an offset: premature end of input"
        );
        assert_eq!(
            toml_millis(&toml_value("1.5"), Bound).unwrap_err(),
            "a time must be an RFC 3339 string or epoch milliseconds, got 1.5"
        );
        assert_eq!(
            toml_millis(&toml_value("true"), Kinesis).unwrap_err(),
            "timestamp must be an RFC 3339 string or epoch milliseconds, got true"
        );
    }

    #[test]
    fn formats_utc() {
        assert_eq!(format_rfc3339_millis(T + 5), "2024-05-01T10:00:00.005Z");
        assert_eq!(format_rfc3339_millis(i64::MAX), i64::MAX.to_string());
        assert_eq!(utc_date_hour(T - 1), (2024, 5, 1, 9));
        assert_eq!(utc_date_hour(i64::MAX), (1970, 1, 1, 0));
    }
}
