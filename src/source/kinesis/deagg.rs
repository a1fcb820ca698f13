//! KPL aggregated records: one Kinesis record carrying many user records.
//!
//! The Kinesis Producer Library's published format is
//!
//! ```text
//! magic (F3 89 9A C2) | protobuf AggregatedRecord | MD5(protobuf bytes), 16 bytes
//!
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! ```
//!
//! Only `data` matters to shardflow (the key comes from the payload, by the
//! schema), so the decoder below reads records and their data and skips the
//! rest. It is hand-written (a few varints and length-delimited fields) rather
//! than generated, to keep protobuf tooling out of the build.
//!
//! A record that starts with the magic bytes but whose checksum or protobuf
//! is wrong is a *bad aggregate*: it is not split but handed on whole, so the
//! decoder turns it into a dead letter (its bytes are never valid UTF-8, the
//! magic saw to that) and the shard moves on; the precise reason is logged and
//! counted in `shardflow_kinesis_bad_aggregates_total`.

use bytes::Bytes;
use md5::{Digest as _, Md5};

/// The four bytes every KPL aggregate starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const MD5_LEN: usize = 16;

/// What one Kinesis record turned out to be.
#[derive(Debug, PartialEq)]
pub enum Deaggregated {
    /// Not an aggregate: the record is one user record.
    Single,
    /// The user records of a valid aggregate, in order (sub-sequence = index).
    Aggregate(Vec<Bytes>),
    /// Looked like an aggregate but is not a valid one.
    Bad(String),
}

/// Splits `data` if it is a KPL aggregate. User records share `data`'s buffer.
pub fn deaggregate(data: &Bytes) -> Deaggregated {
    if data.len() < MAGIC.len() || data[..MAGIC.len()] != MAGIC {
        return Deaggregated::Single;
    }
    if data.len() < MAGIC.len() + MD5_LEN {
        return Deaggregated::Bad("KPL aggregate shorter than its checksum".into());
    }
    let body = data.slice(MAGIC.len()..data.len() - MD5_LEN);
    let digest = Md5::digest(&body);
    if digest.as_slice() != &data[data.len() - MD5_LEN..] {
        return Deaggregated::Bad("KPL aggregate MD5 mismatch".into());
    }
    match parse_aggregate(&body) {
        Ok(records) if records.is_empty() => {
            Deaggregated::Bad("KPL aggregate without user records".into())
        }
        Ok(records) => Deaggregated::Aggregate(records),
        Err(e) => Deaggregated::Bad(format!("KPL aggregate protobuf: {e}")),
    }
}

/// Builds an aggregate (tests, benches and the examples use it to produce
/// what the KPL would). Every record gets partition key index 0.
pub fn aggregate(partition_key: &str, records: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    put_len_delimited(&mut body, 1, partition_key.as_bytes());
    for r in records {
        let mut inner = Vec::new();
        put_varint(&mut inner, 1 << 3); // partition_key_index = 0
        put_varint(&mut inner, 0);
        put_len_delimited(&mut inner, 3, r);
        put_len_delimited(&mut body, 3, &inner);
    }
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&Md5::digest(&body));
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len_delimited(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A cursor over protobuf wire format.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.at >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.at).ok_or("truncated varint")?;
            self.at += 1;
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    /// (offset, len) of a length-delimited field's payload.
    fn len_delimited(&mut self) -> Result<(usize, usize), String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
        let start = self.at;
        let end = start.checked_add(len).ok_or("length overflow")?;
        if end > self.buf.len() {
            return Err(format!("field of {len} bytes runs past the end"));
        }
        self.at = end;
        Ok((start, len))
    }

    fn skip(&mut self, wire_type: u64) -> Result<(), String> {
        match wire_type {
            0 => self.varint().map(drop),
            1 => self.advance(8),
            2 => self.len_delimited().map(drop),
            5 => self.advance(4),
            t => Err(format!("unsupported wire type {t}")),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), String> {
        if self.at + n > self.buf.len() {
            return Err("truncated fixed-width field".into());
        }
        self.at += n;
        Ok(())
    }
}

fn parse_aggregate(body: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut r = Reader { buf: body, at: 0 };
    let mut keys = 0u64;
    let mut records = Vec::new();
    while !r.done() {
        let tag = r.varint()?;
        match (tag >> 3, tag & 7) {
            (1, 2) => {
                r.len_delimited()?;
                keys += 1;
            }
            (3, 2) => {
                let (start, len) = r.len_delimited()?;
                let (key_index, data) = parse_record(&body.slice(start..start + len))?;
                if key_index >= keys && keys > 0 {
                    // Tables precede records in what the KPL writes; an index
                    // past the table is a corrupt aggregate.
                    return Err(format!("partition key index {key_index} out of range"));
                }
                records.push(data);
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(records)
}

fn parse_record(body: &Bytes) -> Result<(u64, Bytes), String> {
    let mut r = Reader { buf: body, at: 0 };
    let mut key_index = None;
    let mut data = None;
    while !r.done() {
        let tag = r.varint()?;
        match (tag >> 3, tag & 7) {
            (1, 0) => key_index = Some(r.varint()?),
            (3, 2) => {
                let (start, len) = r.len_delimited()?;
                data = Some(body.slice(start..start + len));
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    match (key_index, data) {
        (Some(k), Some(d)) => Ok((k, d)),
        (None, _) => Err("user record without partition_key_index".into()),
        (_, None) => Err("user record without data".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_records_pass_through() {
        assert_eq!(
            deaggregate(&Bytes::from_static(b"{\"a\":1}")),
            Deaggregated::Single
        );
        assert_eq!(deaggregate(&Bytes::new()), Deaggregated::Single);
    }

    #[test]
    fn round_trips_an_aggregate() {
        let agg = aggregate("pk", &[b"one", b"", b"three"]);
        assert_eq!(
            deaggregate(&Bytes::from(agg)),
            Deaggregated::Aggregate(vec![
                Bytes::from_static(b"one"),
                Bytes::new(),
                Bytes::from_static(b"three")
            ])
        );
    }

    #[test]
    fn bad_checksum_and_truncation_are_bad_aggregates() {
        let mut agg = aggregate("pk", &[b"one", b"two"]);
        let n = agg.len();
        agg[n - 1] ^= 0xFF;
        assert!(matches!(
            deaggregate(&Bytes::from(agg.clone())),
            Deaggregated::Bad(m) if m.contains("MD5")
        ));
        assert!(matches!(
            deaggregate(&Bytes::from(MAGIC.to_vec())),
            Deaggregated::Bad(_)
        ));
        // Valid checksum over a truncated protobuf.
        let body = [0x1A, 0x10, 0x08];
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&body);
        bad.extend_from_slice(&Md5::digest(body));
        assert!(matches!(
            deaggregate(&Bytes::from(bad)),
            Deaggregated::Bad(m) if m.contains("protobuf")
        ));
    }
}
