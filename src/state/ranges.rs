//! Kinesis hash ranges of the stored state: export one to SST files,
//! ingest such files into another store, delete one.
//!
//! Kinesis routes a record by the MD5 hash of its partition key, read as a
//! big-endian 128-bit integer, and a shard owns an inclusive range of those
//! integers. Every key of the `windows` and `slices` column families starts
//! with the same hash of its entity key ([`codec`](super::codec)), so when
//! the partition key is the entity key (the usual setup) the state of one
//! shard is one contiguous key range of each column family, and it can move
//! to another store with its shard. What the operations leave to their
//! caller is in [`HashRange`]'s docs.

use std::path::{Path, PathBuf};

use md5::{Digest as _, Md5};
use rocksdb::{
    DBCompressionType, IngestExternalFileOptions, Options, ReadOptions, Snapshot, SstFileWriter,
    WriteBatch, WriteOptions,
};

use super::{codec, Cf, StateError, StateStore};

/// The MD5 hash of an entity key, as Kinesis computes a record's hash key
/// from its partition key (the digest's bytes are the big-endian integer).
pub fn hash_key(key: &str) -> [u8; 16] {
    Md5::digest(key.as_bytes()).into()
}

/// An inclusive range of hash keys, as a shard's `HashKeyRange`
/// (`StartingHashKey` to `EndingHashKey`) describes it.
///
/// [`StateStore::export_range`], [`StateStore::ingest_range`] and
/// [`StateStore::delete_range`] see only the stored state. The engine
/// holds what it changed since the last commit in memory, and builds its
/// timer index and its idea of what the store holds when it starts. So
/// before an export or a delete, the engine's changes to the range must be
/// committed (and, for a delete, its states of the range dropped from its
/// cache, e.g. by stopping it); after an ingest or a delete, only an engine
/// started after it reads the store right. The `meta` column family
/// (positions, watermarks, checkpoint id) is not part of a range: the
/// caller moves the shard's position itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct HashRange {
    pub start: u128,
    pub end: u128,
}

/// A `HashKeyRange` that is not two decimal integers below 2¹²⁸ in order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hash key range {start:?} to {end:?}: {reason}")]
pub struct HashRangeError {
    pub start: String,
    pub end: String,
    pub reason: &'static str,
}

impl HashRange {
    /// Every hash key: the range of a stream's only shard.
    pub const ALL: HashRange = HashRange {
        start: 0,
        end: u128::MAX,
    };

    /// The range from the decimal strings Kinesis returns for a shard's
    /// `StartingHashKey` and `EndingHashKey`.
    pub fn parse(start: &str, end: &str) -> Result<HashRange, HashRangeError> {
        let error = |reason| HashRangeError {
            start: start.to_owned(),
            end: end.to_owned(),
            reason,
        };
        let number = |s: &str| {
            // `u128::from_str` also takes a leading `+`, which Kinesis never sends.
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error("a hash key is a decimal integer"));
            }
            s.parse::<u128>()
                .map_err(|_| error("a hash key is below 2^128"))
        };
        let range = HashRange {
            start: number(start)?,
            end: number(end)?,
        };
        if range.start > range.end {
            return Err(error("the range ends before it starts"));
        }
        Ok(range)
    }

    /// Whether `hash` (as [`hash_key`] returns it) is in the range.
    pub fn contains(&self, hash: &[u8; 16]) -> bool {
        (self.start..=self.end).contains(&u128::from_be_bytes(*hash))
    }

    /// The smallest key of the range.
    fn lower(&self) -> [u8; 16] {
        self.start.to_be_bytes()
    }

    /// Whether the two ranges share a hash key.
    pub fn overlaps(&self, other: &HashRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// The first 16-byte prefix past the range; `None` when the range ends
    /// at the last hash, where no 16 bytes are past every key.
    fn upper(&self) -> Option<[u8; 16]> {
        self.end.checked_add(1).map(u128::to_be_bytes)
    }
}

/// The column families a range spans, in the order they are ingested.
/// Slices come first: a failure between the two leaves at most slices that
/// no record points to, never a record saying its slices are stored when
/// they are not.
const RANGE_CFS: [Cf; 2] = [Cf::Slices, Cf::Windows];

/// The file an export writes for `cf`; an ingest reads the column family
/// back from the name.
fn file_name(cf: Cf) -> String {
    format!("{}.sst", cf.name())
}

/// The position in [`RANGE_CFS`] of the column family `path` holds.
fn cf_of_file(path: &Path) -> Result<usize, StateError> {
    let name = path.file_name().and_then(|n| n.to_str());
    RANGE_CFS
        .iter()
        .position(|&cf| name == Some(file_name(cf).as_str()))
        .ok_or_else(|| StateError::Corrupt {
            what: "hash range files",
            detail: format!(
                "{} is not named after a column family of a range (slices.sst, windows.sst)",
                path.display()
            ),
        })
}

/// Options of the SST files an export writes, as the column families' own
/// (see `rocks.rs`): a file is ingested as it is, not rewritten.
fn sst_options() -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(DBCompressionType::Lz4);
    opts
}

impl StateStore {
    /// Read options over `range` of a column family, at `snapshot` if given.
    /// A bulk read: its blocks stay out of the block cache, which holds
    /// what the engine's cache misses read.
    fn range_read(&self, range: HashRange, snapshot: Option<&Snapshot<'_>>) -> ReadOptions {
        let mut read = ReadOptions::default();
        if let Some(snapshot) = snapshot {
            read.set_snapshot(snapshot);
        }
        read.fill_cache(false);
        read.set_iterate_lower_bound(range.lower().to_vec());
        if let Some(upper) = range.upper() {
            read.set_iterate_upper_bound(upper.to_vec());
        }
        read
    }

    /// Calls `f` with every key and value of `range` in `cf`, in key order.
    fn for_each_in_range(
        &self,
        cf: Cf,
        read: ReadOptions,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let mut iter = self.db().raw_iterator_cf_opt(self.cf(cf)?, read);
        iter.seek_to_first();
        while let Some((k, v)) = iter.item() {
            f(k, v)?;
            iter.next();
        }
        iter.status()?;
        Ok(())
    }

    /// Writes the entries of `range` in the `windows` and `slices` column
    /// families to SST files in `dir` (created if missing), one per column
    /// family that has entries there, named after it (`windows.sst`,
    /// `slices.sst`); returns their paths, for
    /// [`ingest_range`](Self::ingest_range). Both are read from one
    /// snapshot, so they hold the same commits, all of each.
    ///
    /// Only committed state is exported: see [`HashRange`]. `dir` must not
    /// hold files of those names already.
    pub fn export_range(&self, range: HashRange, dir: &Path) -> Result<Vec<PathBuf>, StateError> {
        let io = |source| StateError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let paths = RANGE_CFS.map(|cf| dir.join(file_name(cf)));
        if let Some(path) = paths.iter().find(|p| p.symlink_metadata().is_ok()) {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists already", path.display()),
            )));
        }
        let snapshot = self.db().snapshot();
        let opts = sst_options();
        let mut files = Vec::new();
        for (cf, path) in RANGE_CFS.into_iter().zip(paths) {
            // Opened at the first entry: RocksDB cannot finish an empty file.
            let mut writer = SstFileWriter::create(&opts);
            let mut opened = false;
            self.for_each_in_range(cf, self.range_read(range, Some(&snapshot)), |k, v| {
                if !opened {
                    writer.open(&path)?;
                    opened = true;
                }
                writer.put(k, v)?;
                Ok(())
            })?;
            if opened {
                writer.finish()?;
                files.push(path);
            }
        }
        Ok(files)
    }

    /// Ingests files that [`export_range`](Self::export_range) wrote, from
    /// one export or from several of disjoint ranges, into the column
    /// families their names say. The files are copied, not moved. Ingested
    /// entries replace stored entries of the same key, and leave the other
    /// stored entries of their range alone, so the range should be empty
    /// here (see [`delete_range`](Self::delete_range)); the store must be of
    /// the same configuration (state fingerprint) as the exporting one.
    ///
    /// Each column family is ingested atomically, the two one after the
    /// other (slices first); after a failure, ingesting the same files
    /// again completes it. Read the result with an engine started after
    /// the call: see [`HashRange`].
    pub fn ingest_range(&self, files: &[PathBuf]) -> Result<(), StateError> {
        let mut by_cf: [Vec<&Path>; RANGE_CFS.len()] = Default::default();
        for file in files {
            by_cf[cf_of_file(file)?].push(file);
        }
        let opts = IngestExternalFileOptions::default();
        for (cf, paths) in RANGE_CFS.into_iter().zip(by_cf) {
            if !paths.is_empty() {
                self.db()
                    .ingest_external_file_cf_opts(self.cf(cf)?, &opts, paths)?;
            }
        }
        Ok(())
    }

    /// Deletes the entries of `range` in the `windows` and `slices` column
    /// families, in one synced write. The engine must hold no state of the
    /// range (see [`HashRange`]). The space comes back as RocksDB compacts
    /// the range's files, in its own time.
    pub fn delete_range(&self, range: HashRange) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        let lower = range.lower();
        for cf in RANGE_CFS {
            let handle = self.cf(cf)?;
            let upper = match range.upper() {
                Some(upper) => upper.to_vec(),
                // The range ends at the last hash: just past the last key.
                None => {
                    let mut iter = self.db().raw_iterator_cf(handle);
                    iter.seek_to_last();
                    iter.status()?;
                    match iter.key() {
                        Some(last) => [last, &[0]].concat(),
                        None => continue,
                    }
                }
            };
            if upper.as_slice() > lower.as_slice() {
                batch.delete_range_cf(handle, lower.as_slice(), upper.as_slice());
            }
        }
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.db().write_opt(batch, &w)?;
        Ok(())
    }

    /// Every persisted timer `(due, spec, key)` of `range`, read from its
    /// window records: a range scan, so adopting one shard costs that
    /// shard's keys, not the whole store's.
    pub(crate) fn load_timers_in(
        &self,
        range: HashRange,
    ) -> Result<Vec<(i64, u16, String)>, StateError> {
        let mut timers = Vec::new();
        self.for_each_in_range(Cf::Windows, self.range_read(range, None), |k, v| {
            let corrupt = |e: codec::CodecError| StateError::Corrupt {
                what: Cf::Windows.name(),
                detail: e.to_string(),
            };
            let (spec, key) = codec::parse_key_prefix(k).map_err(corrupt)?;
            if let Some(due) = codec::WindowRecord::decode(v).map_err(corrupt)?.timer {
                timers.push((due, spec, key));
            }
            Ok(())
        })?;
        Ok(timers)
    }

    /// Calls `f` with every key and value of `range` in `cf`, in key order
    /// (tests and diagnostics). `meta` has no hash ranges.
    pub fn scan_range(
        &self,
        cf: Cf,
        range: HashRange,
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StateError> {
        if !RANGE_CFS.contains(&cf) {
            return Err(StateError::Corrupt {
                what: "hash range",
                detail: format!("the {} column family has no hash ranges", cf.name()),
            });
        }
        self.for_each_in_range(cf, self.range_read(range, None), |k, v| {
            f(k, v);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::codec::{key_prefix, slice_key};
    use crate::state::StateDelta;

    fn entries(store: &StateStore, cf: Cf, range: HashRange) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        store
            .scan_range(cf, range, |k, v| out.push((k.to_vec(), v.to_vec())))
            .unwrap();
        out
    }

    /// md5 formatted as hex and read as a number, the way a Kinesis client
    /// library computes a hash key, independently of `from_be_bytes`.
    fn kinesis_hash_key(partition_key: &str) -> u128 {
        let hex: String = Md5::digest(partition_key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        u128::from_str_radix(&hex, 16).unwrap()
    }

    #[test]
    fn hash_keys_are_the_ones_kinesis_computes() {
        for key in ["userId-1", "", "ü", "k42"] {
            let hash = hash_key(key);
            assert_eq!(u128::from_be_bytes(hash), kinesis_hash_key(key), "{key}");
        }
        // The hash key Kinesis reports for a record with this partition key
        // (its decimal `HashKey`), as computed outside Rust.
        assert_eq!(
            u128::from_be_bytes(hash_key("userId-1")),
            210145843231340400705566355959033279821
        );
        let upper_half = HashRange::parse(
            "170141183460469231731687303715884105728",
            &u128::MAX.to_string(),
        )
        .unwrap();
        assert!(upper_half.contains(&hash_key("userId-1")));
    }

    #[test]
    fn ranges_parse_from_kinesis_decimal_strings() {
        let all = HashRange::parse("0", "340282366920938463463374607431768211455").unwrap();
        assert_eq!(all, HashRange::ALL);
        assert!(all.contains(&[0; 16]) && all.contains(&[0xFF; 16]));
        assert_eq!(all.upper(), None);
        let low = HashRange::parse("0", "170141183460469231731687303715884105727").unwrap();
        assert_eq!(low.end, (1 << 127) - 1);
        assert!(!low.contains(&(1u128 << 127).to_be_bytes()));
        assert_eq!(low.upper(), Some((1u128 << 127).to_be_bytes()));
        for (start, end) in [
            ("", "1"),
            ("+1", "2"),
            ("-1", "2"),
            ("0x10", "20"),
            ("1 ", "2"),
            ("0", "340282366920938463463374607431768211456"),
            ("5", "4"),
        ] {
            let err = HashRange::parse(start, end).expect_err(start);
            assert!(err.to_string().contains("invalid hash key range"), "{err}");
        }
    }

    /// Keys sort as their hashes do as integers, so a range of hashes is a
    /// range of keys.
    #[test]
    fn key_order_is_hash_order() {
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        let mut by_bytes: Vec<&str> = keys.iter().map(String::as_str).collect();
        by_bytes.sort_by_cached_key(|k| key_prefix(&hash_key(k), 0, k));
        let mut by_hash = by_bytes.clone();
        by_hash.sort_by_key(|k| kinesis_hash_key(k));
        assert_eq!(by_bytes, by_hash);
    }

    /// Entries at both ends of the hash space, including one past every
    /// 16-byte bound: the last range has no upper bound of its own.
    #[test]
    fn the_ends_of_the_hash_space_export_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("a"), "fp", false).unwrap();
        let (lowest, highest) = ([0u8; 16], [0xFF; 16]);
        let mut delta = StateDelta::empty();
        for hash in [lowest, highest] {
            delta.put(Cf::Windows, &key_prefix(&hash, 0, "k"), b"w");
            delta.put(
                Cf::Slices,
                &slice_key(&hash, u16::MAX, "k\u{10FFFF}", i64::MAX),
                b"s",
            );
        }
        store.commit(1, delta, &[]).unwrap();
        let top = HashRange {
            start: u128::MAX,
            end: u128::MAX,
        };
        let files = store.export_range(top, &dir.path().join("top")).unwrap();
        assert_eq!(files.len(), 2);
        assert!(
            store.export_range(top, &dir.path().join("top")).is_err(),
            "an export does not overwrite another"
        );
        let other = StateStore::open(&dir.path().join("b"), "fp", false).unwrap();
        other.ingest_range(&files).unwrap();
        for cf in RANGE_CFS {
            assert_eq!(
                entries(&other, cf, HashRange::ALL),
                entries(&store, cf, top)
            );
            assert_eq!(entries(&store, cf, top).len(), 1);
        }
        store.delete_range(top).unwrap();
        store.delete_range(top).unwrap(); // nothing left: still fine
        for cf in RANGE_CFS {
            let left = entries(&store, cf, HashRange::ALL);
            assert_eq!(left.len(), 1);
            assert_eq!(&left[0].0[..16], &lowest);
        }
        let empty = HashRange { start: 1, end: 1 };
        assert_eq!(
            store.export_range(empty, &dir.path().join("none")).unwrap(),
            Vec::<PathBuf>::new()
        );
        store.delete_range(HashRange::ALL).unwrap();
        assert!(!store.has_key_state().unwrap());
    }

    /// Adopting a shard reads its own range's timers, every one of them,
    /// and no other range's.
    #[test]
    fn timers_load_by_range() {
        use crate::state::codec::{WindowRecord, Writer};
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), "fp", false).unwrap();
        let mut delta = StateDelta::empty();
        for i in 0..300i64 {
            let key = format!("user-{i}");
            let mut w = Writer { buf: Vec::new() };
            // Every third key has no timer (its windows all fired).
            let timer = (i % 3 != 0).then_some(1_000 + i);
            WindowRecord::write_head(&mut w, 0, timer, std::iter::empty());
            WindowRecord::write_separate(&mut w);
            delta.put(
                Cf::Windows,
                &key_prefix(&hash_key(&key), (i % 2) as u16, &key),
                &w.buf,
            );
        }
        store.commit(1, delta, &[]).unwrap();
        let mut all = store.load_timers().unwrap();
        assert_eq!(all.len(), 200);
        let low = HashRange {
            start: 0,
            end: (1 << 127) - 1,
        };
        let high = HashRange {
            start: 1 << 127,
            end: u128::MAX,
        };
        let mut parts = store.load_timers_in(low).unwrap();
        assert!(parts.iter().all(|(_, _, k)| low.contains(&hash_key(k))));
        assert!(!parts.is_empty() && parts.len() < all.len());
        parts.extend(store.load_timers_in(high).unwrap());
        parts.sort();
        all.sort();
        assert_eq!(parts, all);
    }

    #[test]
    fn only_files_named_after_a_column_family_are_ingested() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), "fp", false).unwrap();
        let err = store
            .ingest_range(&[dir.path().join("meta.sst")])
            .expect_err("meta is no range");
        assert!(err.to_string().contains("meta.sst"), "{err}");
        assert!(store
            .scan_range(Cf::Meta, HashRange::ALL, |_, _| {})
            .is_err());
    }
}
