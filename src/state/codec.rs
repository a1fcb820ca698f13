//! Byte layouts of RocksDB keys and values.
//!
//! A key of the `windows` and `slices` column families starts with the
//! 16-byte MD5 hash of the entity key, as Kinesis reads it (a big-endian
//! 128-bit integer), so that the keys of one shard's hash range are one
//! contiguous run of the column family ([`HashRange`](super::HashRange)).
//! After the hash, byte order equals logical order: integers are
//! big-endian with the sign bit flipped, and a string is escaped (`0x00`
//! becomes `0x00 0xFF`) and terminated by `0x00 0x01`, so that no encoded
//! string is a prefix of another and `"a" < "ab" < "b"` still holds.
//! Values use a fixed little-endian layout read by [`Reader`], which reports
//! truncated or malformed bytes as errors rather than panicking.

use std::fmt;

/// Appends an `i64` so that byte order equals numeric order.
pub fn put_i64_ordered(buf: &mut Vec<u8>, v: i64) {
    buf.extend_from_slice(&((v as u64) ^ (1 << 63)).to_be_bytes());
}

/// Appends a `u16` big-endian (already order-preserving).
pub fn put_u16_ordered(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_be_bytes());
}

/// Appends an escaped, terminated string (order-preserving, prefix-free).
pub fn put_str_ordered(buf: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        buf.push(b);
        if b == 0 {
            buf.push(0xFF);
        }
    }
    buf.extend_from_slice(&[0x00, 0x01]);
}

/// A malformed stored value or key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed state bytes: {}", self.0)
    }
}

impl std::error::Error for CodecError {}

/// Reads what the `put_*` functions and [`Writer`] wrote.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.bytes.len() < n {
            return Err(CodecError(format!(
                "expected {n} more bytes, found {}",
                self.bytes.len()
            )));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn i64_ordered(&mut self) -> Result<i64, CodecError> {
        Ok((u64::from_be_bytes(self.array()?) ^ (1 << 63)) as i64)
    }

    pub fn u16_ordered(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn str_ordered(&mut self) -> Result<String, CodecError> {
        let mut out = Vec::new();
        loop {
            let b = self.take(1)?[0];
            if b != 0 {
                out.push(b);
                continue;
            }
            match self.take(1)?[0] {
                0xFF => out.push(0),
                0x01 => break,
                other => return Err(CodecError(format!("bad string escape 0x00 0x{other:02x}"))),
            }
        }
        String::from_utf8(out).map_err(|e| CodecError(format!("key is not UTF-8: {e}")))
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn i64(&mut self) -> Result<i64, CodecError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub fn f64(&mut self) -> Result<f64, CodecError> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// Fixed little-endian value layout, the counterpart of [`Reader`].
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        // Values are bounded by max_distinct × record size, far below 4 GiB.
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
}

/// Bytes of the MD5 hash that starts every `windows` and `slices` key.
pub const KEY_HASH_LEN: usize = 16;

/// `(md5(key), spec, key)`: a key's `windows` record, and the prefix of its
/// slices. `hash` is [`hash_key(key)`](super::hash_key); the caller passes
/// it so that a key is hashed once while in memory, not at every write.
pub fn key_prefix(hash: &[u8; KEY_HASH_LEN], spec: u16, key: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(key.len() + KEY_HASH_LEN + 12);
    write_key_prefix(&mut buf, hash, spec, key);
    buf
}

/// Appends [`key_prefix`] to `buf`.
pub fn write_key_prefix(buf: &mut Vec<u8>, hash: &[u8; KEY_HASH_LEN], spec: u16, key: &str) {
    buf.extend_from_slice(hash);
    put_u16_ordered(buf, spec);
    put_str_ordered(buf, key);
}

/// `(md5(key), spec, key, slice_start)` in the slices column family.
pub fn slice_key(hash: &[u8; KEY_HASH_LEN], spec: u16, key: &str, slice_start: i64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(key.len() + KEY_HASH_LEN + 20);
    write_slice_key(&mut buf, hash, spec, key, slice_start);
    buf
}

/// Appends [`slice_key`] to `buf`.
pub fn write_slice_key(
    buf: &mut Vec<u8>,
    hash: &[u8; KEY_HASH_LEN],
    spec: u16,
    key: &str,
    slice_start: i64,
) {
    write_key_prefix(buf, hash, spec, key);
    put_i64_ordered(buf, slice_start);
}

/// Inverse of [`key_prefix`], without the hash. The hash is not checked
/// against the key: that would cost an MD5 per record of every full scan.
pub fn parse_key_prefix(bytes: &[u8]) -> Result<(u16, String), CodecError> {
    let mut r = Reader::new(bytes);
    r.take(KEY_HASH_LEN)?;
    let spec = r.u16_ordered()?;
    let key = r.str_ordered()?;
    if !r.is_empty() {
        return Err(CodecError("trailing bytes after a window key".into()));
    }
    Ok((spec, key))
}

/// Where a `windows` record keeps its key's slices.
const SLICES_INLINE: u8 = 0;
const SLICES_SEPARATE: u8 = 1;

/// A `(md5(key), spec, key)` record of the `windows` column family:
///
/// `fired i64 | timer (u8 0 | u8 1, i64) | n u32, (window i64, revision u32)ⁿ |
///  SLICES_SEPARATE | SLICES_INLINE, m u32, (slice_start i64, len u32, acc)ᵐ`
///
/// Slices are inline unless they grew large, so that a checkpoint writes a
/// key's changes in one put, with no per-slice puts and deletes, and a
/// cache miss reads one value. The timer is here too: a restore rebuilds the
/// timer index from these records.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRecord<'a> {
    pub fired: i64,
    pub timer: Option<i64>,
    pub revisions: Vec<(i64, u32)>,
    /// `(slice_start, accumulator bytes)`; `None`: in the slices column family.
    pub inline: Option<Vec<(i64, &'a [u8])>>,
}

impl<'a> WindowRecord<'a> {
    /// Writes everything up to the slices.
    pub fn write_head(
        w: &mut Writer,
        fired: i64,
        timer: Option<i64>,
        revisions: impl ExactSizeIterator<Item = (i64, u32)>,
    ) {
        w.i64(fired);
        match timer {
            Some(t) => {
                w.u8(1);
                w.i64(t);
            }
            None => w.u8(0),
        }
        w.u32(revisions.len() as u32);
        for (j, r) in revisions {
            w.i64(j);
            w.u32(r);
        }
    }

    /// Ends a record whose slices are in the slices column family.
    pub fn write_separate(w: &mut Writer) {
        w.u8(SLICES_SEPARATE);
    }

    /// Ends a record with `slices` inline, each `(slice_start, encode its
    /// accumulators)`.
    pub fn write_inline<S>(w: &mut Writer, slices: impl ExactSizeIterator<Item = (i64, S)>)
    where
        S: FnOnce(&mut Writer),
    {
        w.u8(SLICES_INLINE);
        w.u32(slices.len() as u32);
        for (start, encode) in slices {
            w.i64(start);
            let at = w.buf.len();
            w.u32(0);
            encode(w);
            let len = (w.buf.len() - at - 4) as u32;
            w.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
    }

    pub fn decode(bytes: &'a [u8]) -> Result<WindowRecord<'a>, CodecError> {
        let mut r = Reader::new(bytes);
        let fired = r.i64()?;
        let timer = match r.u8()? {
            0 => None,
            _ => Some(r.i64()?),
        };
        let n = r.u32()? as usize;
        // Bounded by the bytes present, not by a count a corrupt value claims.
        let mut revisions = Vec::with_capacity(n.min(bytes.len() / 12));
        for _ in 0..n {
            revisions.push((r.i64()?, r.u32()?));
        }
        let inline = match r.u8()? {
            SLICES_SEPARATE => None,
            SLICES_INLINE => {
                let m = r.u32()? as usize;
                let mut slices = Vec::with_capacity(m.min(bytes.len() / 12));
                for _ in 0..m {
                    slices.push((r.i64()?, r.bytes()?));
                }
                Some(slices)
            }
            other => return Err(CodecError(format!("unknown slice storage {other}"))),
        };
        if !r.is_empty() {
            return Err(CodecError("trailing bytes after a window record".into()));
        }
        Ok(WindowRecord {
            fired,
            timer,
            revisions,
            inline,
        })
    }
}

/// Inverse of [`slice_key`], without the hash (unchecked, as in
/// [`parse_key_prefix`]).
pub fn parse_slice_key(bytes: &[u8]) -> Result<(u16, String, i64), CodecError> {
    let mut r = Reader::new(bytes);
    r.take(KEY_HASH_LEN)?;
    let spec = r.u16_ordered()?;
    let key = r.str_ordered()?;
    let start = r.i64_ordered()?;
    Ok((spec, key, start))
}

/// The slice start stored after a [`key_prefix`].
pub fn parse_slice_start(bytes: &[u8], prefix_len: usize) -> Result<i64, CodecError> {
    let rest = bytes
        .get(prefix_len..)
        .ok_or_else(|| CodecError("slice key shorter than its prefix".into()))?;
    Reader::new(rest).i64_ordered()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: [u8; KEY_HASH_LEN] = [7; KEY_HASH_LEN];

    #[test]
    fn byte_order_is_logical_order_after_the_hash() {
        let keys = ["", "\0", "\0a", "a", "a\0", "ab", "b"];
        let mut encoded: Vec<_> = keys.iter().map(|k| key_prefix(&H, 1, k)).collect();
        let sorted = encoded.clone();
        encoded.sort();
        assert_eq!(encoded, sorted);
        let times = [i64::MIN, -5, -1, 0, 1, 60_000, i64::MAX];
        let enc: Vec<_> = times.iter().map(|t| slice_key(&H, 0, "k", *t)).collect();
        let mut s = enc.clone();
        s.sort();
        assert_eq!(enc, s);
    }

    /// The hash decides the order before spec and key do.
    #[test]
    fn the_hash_comes_first() {
        let mut low = H;
        low[15] -= 1;
        assert!(key_prefix(&low, u16::MAX, "z") < key_prefix(&H, 0, ""));
        assert!(slice_key(&low, 9, "z", i64::MAX) < slice_key(&H, 0, "", i64::MIN));
        assert_eq!(&key_prefix(&H, 3, "k")[..KEY_HASH_LEN], &H);
    }

    #[test]
    fn keys_round_trip() {
        for key in ["", "u1", "a\0b\0"] {
            let p = key_prefix(&H, 3, key);
            assert_eq!(parse_key_prefix(&p).unwrap(), (3, key.to_string()));
            assert_eq!(
                parse_slice_start(&slice_key(&H, 3, key, 99), p.len()).unwrap(),
                99
            );
            assert_eq!(
                parse_slice_key(&slice_key(&H, 3, key, -99)).unwrap(),
                (3, key.to_string(), -99)
            );
        }
        assert!(parse_key_prefix(&[1, 2, 3]).is_err());
        assert!(parse_key_prefix(&key_prefix(&H, 3, "k")[..KEY_HASH_LEN + 1]).is_err());
        assert!(parse_slice_key(&[0, 1]).is_err());
    }

    #[test]
    fn window_records_round_trip_and_refuse_garbage() {
        let mut w = Writer::default();
        WindowRecord::write_head(&mut w, -7, Some(60_000), [(1, 2), (3, 4)].into_iter());
        WindowRecord::write_inline(
            &mut w,
            [(-10i64, b"ab".as_slice()), (20, b"".as_slice())]
                .into_iter()
                .map(|(start, acc)| (start, move |w: &mut Writer| w.buf.extend_from_slice(acc))),
        );
        let inline = w.buf;
        assert_eq!(
            WindowRecord::decode(&inline).unwrap(),
            WindowRecord {
                fired: -7,
                timer: Some(60_000),
                revisions: vec![(1, 2), (3, 4)],
                inline: Some(vec![(-10, b"ab".as_slice()), (20, b"".as_slice())]),
            }
        );
        let mut w = Writer::default();
        WindowRecord::write_head(&mut w, 5, None, std::iter::empty());
        WindowRecord::write_separate(&mut w);
        let separate = WindowRecord::decode(&w.buf).unwrap();
        assert_eq!((separate.timer, separate.inline), (None, None));
        for cut in 0..inline.len() {
            assert!(
                WindowRecord::decode(&inline[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = inline.clone();
        longer.push(0);
        assert!(WindowRecord::decode(&longer).is_err());
        let mut huge = w.buf.clone();
        huge[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(WindowRecord::decode(&huge).is_err());
    }
}
