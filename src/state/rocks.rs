//! The RocksDB side of [`StateStore`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, Options, WriteBatch, WriteBufferManager, WriteOptions, DB,
};

use super::codec::{self, key_prefix};
use super::{Cf, Op, StateDelta, StateError};
use crate::record::Position;

const META_FINGERPRINT: &[u8] = b"fingerprint";
/// How keys and values are laid out. State from before this key existed is
/// layout 1 (slices and timers in their own column families); layout 2 had
/// no MD5 hash of the entity key in front of `windows` and `slices` keys.
const META_LAYOUT: &[u8] = b"layout";
const LAYOUT: &str = "3";
/// When this state was created (epoch ms): names a run's archive objects
/// apart from those of an earlier state (e.g. after `--reset-state`).
const META_CREATED: &[u8] = b"created_at";
const META_CHECKPOINT: &[u8] = b"checkpoint";
const META_POSITIONS: &[u8] = b"positions";
const META_SOURCE_PREFIX: &[u8] = b"source/";

fn source_meta_key(name: &str) -> Vec<u8> {
    [META_SOURCE_PREFIX, name.as_bytes()].concat()
}

/// The engine's watermarks and arrival counter (see `engine::EngineMeta`).
pub(crate) const META_ENGINE: &[u8] = b"engine";

/// Shared handle to the state database. Cloning is cheap; the engine reads
/// through one clone while the pipeline commits through another.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    dir: PathBuf,
}

/// What the store holds, for tests and diagnostics (a full scan).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyCounts {
    /// Slices, inline in window records or in the slices column family.
    pub slices: usize,
    /// `(spec, key)` window records.
    pub windows: usize,
    /// Window records with a pending timer.
    pub timers: usize,
}

/// The ops of a delta sorted by column family and key, the last op on a key
/// winning (as it would in the batch). A memtable insert that follows the
/// previous one in key order reuses its skip-list position; in the engine's
/// order (hash order of dirty keys) every insert searches from the top,
/// which made commits more than twice as slow. The sort compares a 16-byte key
/// prefix held inline first, so most comparisons touch no key bytes.
fn in_key_order(delta: &StateDelta) -> Vec<Op> {
    fn head(key: &[u8]) -> u128 {
        let mut b = [0u8; 16];
        let n = key.len().min(16);
        b[..n].copy_from_slice(&key[..n]);
        u128::from_be_bytes(b)
    }
    let mut order: Vec<(Cf, u128, u32)> = delta
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| (op.cf, head(delta.key(op)), i as u32))
        .collect();
    let key_of = |i: u32| delta.key(&delta.ops[i as usize]);
    order.sort_unstable_by(|a, b| {
        (a.0, a.1)
            .cmp(&(b.0, b.1))
            .then_with(|| key_of(a.2).cmp(key_of(b.2)))
            .then(a.2.cmp(&b.2))
    });
    let mut out: Vec<Op> = Vec::with_capacity(order.len());
    for (_, _, i) in order {
        let op = delta.ops[i as usize];
        if let Some(prev) = out.last_mut() {
            if prev.cf == op.cf && delta.key(prev) == delta.key(&op) {
                *prev = op;
                continue;
            }
        }
        out.push(op);
    }
    out
}

/// RocksDB's memory, all of it charged to one LRU cache: block cache plus
/// memtables. With the defaults (64 MiB memtables per column family, two
/// of them, and a separate cache) the resident set of a long run climbed
/// for minutes before levelling off; with one budget it is bounded.
const ROCKSDB_MEMORY: usize = 96 << 20;
/// Memtables take at most this much of [`ROCKSDB_MEMORY`]; a column family
/// flushes at [`MEMTABLE_SIZE`] (small memtables also keep inserts into
/// them cheap: a skip list's depth grows with its size).
const MEMTABLE_BUDGET: usize = 48 << 20;
const MEMTABLE_SIZE: usize = 16 << 20;

/// What the column families share.
struct Memory {
    cache: Cache,
    memtables: WriteBufferManager,
}

impl Memory {
    fn new() -> Memory {
        let cache = Cache::new_lru_cache(ROCKSDB_MEMORY);
        let memtables = WriteBufferManager::new_write_buffer_manager_with_cache(
            MEMTABLE_BUDGET,
            false,
            cache.clone(),
        );
        Memory { cache, memtables }
    }

    fn apply(&self, opts: &mut Options) {
        opts.set_write_buffer_manager(&self.memtables);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&self.cache);
        opts.set_block_based_table_factory(&table);
    }
}

fn cf_options(memory: &Memory) -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(DBCompressionType::Lz4);
    opts.set_write_buffer_size(MEMTABLE_SIZE);
    memory.apply(&mut opts);
    opts
}

impl StateStore {
    /// Opens (creating) the DB at `dir`. State written under another
    /// fingerprint is refused unless `reset`, which wipes the directory's
    /// state and starts over.
    pub fn open(dir: &Path, fingerprint: &str, reset: bool) -> Result<StateStore, StateError> {
        let io = |source| StateError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let memory = Memory::new();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        memory.apply(&mut opts);
        if reset {
            DB::destroy(&opts, dir)?;
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Column families that an earlier version created (`pending`) are
        // opened too: RocksDB refuses to open a DB without all of them.
        let existing = DB::list_cf(&opts, dir).unwrap_or_default();
        let names: Vec<String> = Cf::ALL
            .iter()
            .map(|cf| cf.name().to_owned())
            .chain(existing.into_iter().filter(|n| {
                n != rocksdb::DEFAULT_COLUMN_FAMILY_NAME && Cf::ALL.iter().all(|cf| cf.name() != n)
            }))
            .collect();
        let cfs = names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options(&memory)));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let store = StateStore {
            inner: Arc::new(Inner {
                db,
                dir: dir.to_owned(),
            }),
        };
        let layout = store.get(Cf::Meta, META_LAYOUT)?;
        match store.get(Cf::Meta, META_FINGERPRINT)? {
            Some(found) if found != fingerprint.as_bytes() => {
                return Err(StateError::FingerprintMismatch {
                    dir: dir.to_owned(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                    expected: fingerprint.to_owned(),
                });
            }
            Some(_) if layout.as_deref() != Some(LAYOUT.as_bytes()) => {
                return Err(StateError::LayoutMismatch {
                    dir: dir.to_owned(),
                    found: layout.map_or("1".into(), |l| String::from_utf8_lossy(&l).into_owned()),
                    expected: LAYOUT.to_owned(),
                });
            }
            Some(_) => {}
            None => {
                let mut batch = WriteBatch::default();
                let meta = store.cf(Cf::Meta)?;
                batch.put_cf(meta, META_FINGERPRINT, fingerprint);
                batch.put_cf(meta, META_LAYOUT, LAYOUT);
                let mut w = WriteOptions::default();
                w.set_sync(true);
                store.inner.db.write_opt(batch, &w)?;
            }
        }
        if store.get(Cf::Meta, META_CREATED)?.is_none() {
            let now = crate::time::now_millis().max(0).to_string();
            let mut w = WriteOptions::default();
            w.set_sync(true);
            store
                .inner
                .db
                .put_cf_opt(store.cf(Cf::Meta)?, META_CREATED, now, &w)?;
        }
        Ok(store)
    }

    /// When this state was created, in epoch milliseconds.
    pub fn created_at(&self) -> Result<u64, StateError> {
        let bytes = self.get(Cf::Meta, META_CREATED)?.unwrap_or_default();
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StateError::Corrupt {
                what: "creation time",
                detail: format!("{:?}", String::from_utf8_lossy(&bytes)),
            })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The DB, for the other `impl StateStore` blocks of this module's
    /// siblings (`ranges.rs`).
    pub(super) fn db(&self) -> &DB {
        &self.inner.db
    }

    pub(super) fn cf(&self, cf: Cf) -> Result<&ColumnFamily, StateError> {
        self.inner
            .db
            .cf_handle(cf.name())
            .ok_or_else(|| StateError::Corrupt {
                what: "column families",
                detail: format!("column family {} is missing", cf.name()),
            })
    }

    pub(crate) fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.inner.db.get_cf(self.cf(cf)?, key)?)
    }

    /// Last committed checkpoint id (0 if none).
    pub fn committed_checkpoint(&self) -> Result<u64, StateError> {
        match self.get(Cf::Meta, META_CHECKPOINT)? {
            None => Ok(0),
            Some(bytes) => codec::Reader::new(&bytes)
                .u64()
                .map_err(|e| StateError::Corrupt {
                    what: "checkpoint id",
                    detail: e.to_string(),
                }),
        }
    }

    /// The per-partition positions committed with the last checkpoint.
    pub fn committed_positions(&self) -> Result<Vec<Position>, StateError> {
        match self.get(Cf::Meta, META_POSITIONS)? {
            None => Ok(Vec::new()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                what: "positions",
                detail: e.to_string(),
            }),
        }
    }

    /// A value the source keeps between runs under `name` (outside
    /// checkpoints: it is not part of the exactly-once state).
    pub fn source_meta(&self, name: &str) -> Result<Option<String>, StateError> {
        Ok(self
            .get(Cf::Meta, &source_meta_key(name))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Stores (synced) a value for [`source_meta`](Self::source_meta).
    pub fn put_source_meta(&self, name: &str, value: &str) -> Result<(), StateError> {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.inner
            .db
            .put_cf_opt(self.cf(Cf::Meta)?, source_meta_key(name), value, &w)?;
        Ok(())
    }

    /// Atomically writes, in one `WriteBatch` (synced), the engine's delta,
    /// the positions and the checkpoint id.
    pub fn commit(
        &self,
        checkpoint_id: u64,
        delta: StateDelta,
        positions: &[Position],
    ) -> Result<(), StateError> {
        let committed = self.committed_checkpoint()?;
        if checkpoint_id <= committed {
            return Err(StateError::CheckpointOrder {
                id: checkpoint_id,
                committed,
            });
        }
        // Looked up once: a handle lookup compares column family names.
        let handles = [
            self.cf(Cf::Slices)?,
            self.cf(Cf::Windows)?,
            self.cf(Cf::Meta)?,
        ];
        // Sized up front: growing a batch of many MiB by doubling copies it
        // and faults in fresh pages each time.
        let mut batch = WriteBatch::with_capacity_bytes(delta.bytes() + delta.len() * 8 + 4096);
        for op in in_key_order(&delta) {
            let cf = handles[op.cf as usize];
            if op.delete {
                batch.delete_cf(cf, delta.key(&op));
            } else {
                batch.put_cf(cf, delta.key(&op), delta.value(&op));
            }
        }
        let positions = serde_json::to_vec(positions).map_err(|e| StateError::Corrupt {
            what: "positions",
            detail: e.to_string(),
        })?;
        let meta = self.cf(Cf::Meta)?;
        batch.put_cf(meta, META_POSITIONS, positions);
        batch.put_cf(meta, META_CHECKPOINT, checkpoint_id.to_le_bytes());
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.inner.db.write_opt(batch, &w)?;
        Ok(())
    }

    /// Creates a RocksDB checkpoint of the whole DB in `dir`, which must
    /// not exist (its parent must): SST files are hard-linked (so `dir`
    /// should be on the same file system as the state), the MANIFEST,
    /// OPTIONS and CURRENT files are copied, and memtables are flushed
    /// first, so the checkpoint holds every commit made before the call
    /// and never part of one (a commit is one `WriteBatch`). To know which
    /// commit it holds, call this from the task that commits, between
    /// commits: it then holds [`committed_checkpoint`](Self::committed_checkpoint).
    ///
    /// [`StateStore::open`] opens such a directory (or a copy of it) as a
    /// state directory of its own.
    pub fn create_checkpoint(&self, dir: &Path) -> Result<(), StateError> {
        if dir.symlink_metadata().is_ok() {
            return Err(StateError::Io {
                dir: dir.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a checkpoint directory must not exist yet",
                ),
            });
        }
        Checkpoint::new(&self.inner.db)?.create_checkpoint(dir)?;
        Ok(())
    }

    /// Every persisted timer `(due, spec, key)`, read from the window
    /// records (restore only; a full scan).
    pub(crate) fn load_timers(&self) -> Result<Vec<(i64, u16, String)>, StateError> {
        let mut timers = Vec::new();
        self.scan_windows(|spec, key, record| {
            if let Some(due) = record.timer {
                timers.push((due, spec, key));
            }
        })?;
        Ok(timers)
    }

    /// Calls `f` with every key and value of `cf`, in key order (a full
    /// scan); a [`CodecError`](codec::CodecError) from `f` reports `cf` as
    /// corrupt.
    fn scan(
        &self,
        cf: Cf,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), codec::CodecError>,
    ) -> Result<(), StateError> {
        for item in self.inner.db.iterator_cf(self.cf(cf)?, IteratorMode::Start) {
            let (k, v) = item?;
            f(&k, &v).map_err(|e| StateError::Corrupt {
                what: cf.name(),
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Calls `f` with every window record, in key order (a full scan).
    fn scan_windows(
        &self,
        mut f: impl FnMut(u16, String, codec::WindowRecord<'_>),
    ) -> Result<(), StateError> {
        self.scan(Cf::Windows, |k, v| {
            let (spec, key) = codec::parse_key_prefix(k)?;
            f(spec, key, codec::WindowRecord::decode(v)?);
            Ok(())
        })
    }

    /// A key's window record ([`codec::WindowRecord`]); `hash` is
    /// [`hash_key(key)`](super::hash_key).
    pub(crate) fn load_key(
        &self,
        hash: &[u8; 16],
        spec: u16,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StateError> {
        self.get(Cf::Windows, &key_prefix(hash, spec, key))
    }

    /// The slices `(slice_start, bytes)` of a key whose record keeps them
    /// in the slices column family.
    pub(crate) fn load_slices(
        &self,
        hash: &[u8; 16],
        spec: u16,
        key: &str,
    ) -> Result<Vec<(i64, Vec<u8>)>, StateError> {
        let prefix = key_prefix(hash, spec, key);
        let mut slices = Vec::new();
        let iter = self.inner.db.iterator_cf(
            self.cf(Cf::Slices)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let start =
                codec::parse_slice_start(&k, prefix.len()).map_err(|e| StateError::Corrupt {
                    what: "slices",
                    detail: e.to_string(),
                })?;
            slices.push((start, v.into_vec()));
        }
        Ok(slices)
    }

    /// Whether any key state is stored (so cache misses must read RocksDB).
    pub(crate) fn has_key_state(&self) -> Result<bool, StateError> {
        let mut iter = self
            .inner
            .db
            .iterator_cf(self.cf(Cf::Windows)?, IteratorMode::Start);
        Ok(iter.next().transpose()?.is_some())
    }

    /// Every stored slice as `(spec, key, slice_start)`, inline in a
    /// window record or in the slices column family (a full scan; tests and
    /// diagnostics).
    pub fn stored_slices(&self) -> Result<Vec<(u16, String, i64)>, StateError> {
        let mut slices = Vec::new();
        self.scan_windows(|spec, key, record| {
            for (start, _) in record.inline.into_iter().flatten() {
                slices.push((spec, key.clone(), start));
            }
        })?;
        self.scan(Cf::Slices, |k, _| {
            slices.push(codec::parse_slice_key(k)?);
            Ok(())
        })?;
        slices.sort_unstable();
        Ok(slices)
    }

    /// Counts window records, their pending timers and all stored slices
    /// (a full scan; tests and diagnostics).
    pub fn key_counts(&self) -> Result<KeyCounts, StateError> {
        let mut counts = KeyCounts::default();
        self.scan_windows(|_, _, record| {
            counts.windows += 1;
            counts.timers += usize::from(record.timer.is_some());
            counts.slices += record.inline.map_or(0, |s| s.len());
        })?;
        self.scan(Cf::Slices, |_, _| {
            counts.slices += 1;
            Ok(())
        })?;
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describe(delta: &StateDelta, ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| {
                let key = String::from_utf8_lossy(delta.key(op));
                if op.delete {
                    format!("del {} {key}", op.cf.name())
                } else {
                    let value = String::from_utf8_lossy(delta.value(op));
                    format!("put {} {key} {value}", op.cf.name())
                }
            })
            .collect()
    }

    /// Sorted by (column family, key), including keys that differ only
    /// after their first 16 bytes, and the last op on a key wins, as it
    /// does inside a `WriteBatch`.
    #[test]
    fn ops_come_out_in_key_order_with_the_last_write_winning() {
        let long = "0123456789abcdef";
        let mut delta = StateDelta::empty();
        delta.put(Cf::Windows, b"b", b"1");
        delta.put(Cf::Slices, format!("{long}z").as_bytes(), b"1");
        delta.delete_with(Cf::Slices, |b| b.extend_from_slice(b"a"));
        delta.put(Cf::Windows, b"a", b"1");
        let mut later = StateDelta::empty();
        later.put(Cf::Slices, format!("{long}y").as_bytes(), b"1");
        later.put(Cf::Windows, b"b", b"2");
        later.put(Cf::Slices, b"a", b"again");
        later.delete_with(Cf::Windows, |b| b.extend_from_slice(b"a"));
        delta.append(later);
        assert_eq!(
            describe(&delta, &in_key_order(&delta)),
            vec![
                format!("put slices {long}y 1"),
                format!("put slices {long}z 1"),
                "put slices a again".to_string(),
                "del windows a".into(),
                "put windows b 2".into(),
            ]
        );
    }

    /// State without a layout version is from before slices moved into the
    /// window records: refused with a way out, and `--reset-state` opens it.
    #[test]
    fn state_of_an_older_layout_is_refused_unless_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), "fp", false).unwrap();
        let meta = store.cf(Cf::Meta).unwrap();
        store.inner.db.delete_cf(meta, META_LAYOUT).unwrap();
        drop(store);
        let err = StateStore::open(dir.path(), "fp", false)
            .err()
            .expect("an older layout is refused");
        let text = err.to_string();
        assert!(
            text.contains("uses state layout 1") && text.contains("--reset-state"),
            "{text}"
        );
        let store = StateStore::open(dir.path(), "fp", true).expect("reset opens it");
        drop(store);
        StateStore::open(dir.path(), "fp", false).expect("and it stays readable");
    }

    /// Layout 2 keys have no hash in front: refused the same way.
    #[test]
    fn state_of_layout_2_is_refused_unless_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), "fp", false).unwrap();
        let meta = store.cf(Cf::Meta).unwrap();
        store.inner.db.put_cf(meta, META_LAYOUT, "2").unwrap();
        drop(store);
        let err = StateStore::open(dir.path(), "fp", false)
            .err()
            .expect("layout 2 is refused");
        let text = err.to_string();
        assert!(
            text.contains("uses state layout 2")
                && text.contains(&format!("reads layout {LAYOUT}"))
                && text.contains("--reset-state"),
            "{text}"
        );
        drop(StateStore::open(dir.path(), "fp", true).expect("reset opens it"));
        StateStore::open(dir.path(), "fp", false).expect("and it stays readable");
    }
}
