//! Object keys in an archive: `prefix` + `YYYY/MM/DD/HH/` + a file name,
//! the layout Kinesis Data Firehose writes (UTC hours).
//!
//! shardflow's own objects are named
//! `shardflow-<state epoch:13>-<first checkpoint:10>-<seq:04>.ndjson.gz`:
//! the epoch is when the pipeline's state was created (a `--reset-state`
//! or a new state dir starts a new series rather than overwriting the old
//! one), the checkpoint is the first one whose outputs the object holds,
//! and `seq` counts objects that started within that checkpoint (an object
//! closed early at `max_bytes`). A restart after a crash produces the same
//! outputs from the same checkpoint again, so it writes the same names:
//! re-uploads overwrite instead of duplicating. Sorting these names sorts
//! objects in the order the pipeline wrote them, whatever their hour.

use crate::time::Millis;

const HOUR: Millis = 3_600_000;

/// `YYYY/MM/DD/HH/` of a time (UTC).
pub fn hour_path(t: Millis) -> String {
    let (year, month, day, hour) = crate::time::utc_date_hour(t);
    format!("{year:04}/{month:02}/{day:02}/{hour:02}/")
}

/// The file name of one of shardflow's archive objects.
pub fn object_name(epoch: u64, checkpoint: u64, seq: u32) -> String {
    format!("shardflow-{epoch:013}-{checkpoint:010}-{seq:04}.ndjson.gz")
}

/// Where a shardflow object sits in the order the pipeline wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Written {
    pub epoch: u64,
    pub checkpoint: u64,
    pub seq: u32,
}

/// What a key says about its object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// Start of the hour of the key's `YYYY/MM/DD/HH/` directory.
    pub hour: Option<Millis>,
    /// Set for shardflow's own objects.
    pub written: Option<Written>,
}

/// Reads the date directory and the file name of `key` below `prefix`.
pub fn parse_key(prefix: &str, key: &str) -> KeyInfo {
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    let parts: Vec<&str> = rest.split('/').collect();
    let hour = match parts.as_slice() {
        [y, m, d, h, _name] => parse_hour(y, m, d, h),
        _ => None,
    };
    let name = parts.last().copied().unwrap_or("");
    KeyInfo {
        hour,
        written: parse_name(name),
    }
}

fn parse_hour(y: &str, m: &str, d: &str, h: &str) -> Option<Millis> {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(y, 4) && digits(m, 2) && digits(d, 2) && digits(h, 2)) {
        return None;
    }
    let text = format!("{y}-{m}-{d}T{h}:00:00Z");
    crate::time::parse_rfc3339(&text).ok()
}

fn parse_name(name: &str) -> Option<Written> {
    let stem = name
        .strip_prefix("shardflow-")?
        .strip_suffix(".ndjson.gz")
        .or_else(|| name.strip_prefix("shardflow-")?.strip_suffix(".ndjson"))?;
    let mut it = stem.split('-');
    let (e, c, s) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || e.len() != 13 || c.len() != 10 || s.len() != 4 {
        return None;
    }
    Some(Written {
        epoch: e.parse().ok()?,
        checkpoint: c.parse().ok()?,
        seq: s.parse().ok()?,
    })
}

/// Whether an object filed under `hour` may hold events in `[from, to)`,
/// given that objects hold events up to `slack` older or newer than their
/// hour. Keys without a date directory are always read.
pub fn hour_may_overlap(
    hour: Option<Millis>,
    from: Option<Millis>,
    to: Option<Millis>,
    slack: Millis,
) -> bool {
    let Some(hour) = hour else { return true };
    let (lo, hi) = (hour.saturating_sub(slack), hour + HOUR + slack);
    from.is_none_or(|f| hi > f) && to.is_none_or(|t| lo < t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_in_write_order() {
        let t = 1_700_000_000_000; // 2023-11-14T22:13:20Z
        assert_eq!(hour_path(t), "2023/11/14/22/");
        let key = format!("arch/{}{}", hour_path(t), object_name(t as u64, 42, 1));
        let info = parse_key("arch/", &key);
        assert_eq!(info.hour, Some(1_699_999_200_000));
        assert_eq!(
            info.written,
            Some(Written {
                epoch: t as u64,
                checkpoint: 42,
                seq: 1
            })
        );
        assert!(object_name(1, 9, 0) < object_name(1, 10, 0));
        let firehose = parse_key("fh/", "fh/2024/01/02/03/stream-1-2024-01-02-03-04-05-abcd");
        assert_eq!(firehose.written, None);
        assert_eq!(firehose.hour, Some(1_704_164_400_000));
        assert_eq!(parse_key("", "loose.json").hour, None);
    }

    #[test]
    fn pruning_keeps_neighbouring_hours_within_the_slack() {
        let h = 10 * HOUR;
        assert!(hour_may_overlap(Some(h), Some(h + 30 * 60_000), None, 0));
        assert!(!hour_may_overlap(Some(h), Some(h + HOUR), None, 0));
        assert!(hour_may_overlap(Some(h), Some(h + HOUR), None, 1));
        assert!(!hour_may_overlap(Some(h), None, Some(h), 0));
        assert!(hour_may_overlap(Some(h), None, Some(h + 1), 0));
        assert!(hour_may_overlap(None, Some(0), Some(1), 0));
    }
}
