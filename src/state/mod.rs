//! Durable state: RocksDB column families, checkpoint deltas and commits.
//!
//! The engine keeps its hot state in memory and hands the pipeline a
//! [`StateDelta`] at every checkpoint barrier; the pipeline commits it with
//! the source positions in one atomic `WriteBatch` once the sinks have
//! acknowledged everything before the barrier. State and positions therefore
//! always agree, which is what makes a restart count no event twice.
//!
//! Column families (keys in [`codec`]; after the hash, byte order equals
//! logical order):
//! - `windows`: `(md5(key), spec, key)` → the key's firing cursor,
//!   revisions, timer and, unless they grew large, its slices
//!   ([`codec::WindowRecord`])
//! - `slices`:  `(md5(key), spec, key, slice_start)` → a slice's
//!   accumulators, for the keys whose slices are too large to rewrite at
//!   every checkpoint
//! - `meta`:    fingerprint, layout version, checkpoint id, positions, engine
//!   watermarks, and what a source keeps between runs (the Kinesis consumer ARN)
//!
//! There is no queue of late or dead-letter records awaiting delivery: they
//! are outputs like any other, delivered before the checkpoint that follows
//! them commits. After a crash they are produced again from the replayed
//! input (the watermark they were judged against is restored with the
//! state), with the same ids, so persisting them would only add a write.
//!
//! The MD5 hash in front is the one Kinesis routes a record by, so the state
//! of a shard's [`HashRange`] is one key range of each column family:
//! [`StateStore::export_range`], [`StateStore::ingest_range`] and
//! [`StateStore::delete_range`] move it between stores (`ranges.rs`).
//!
//! [`remote`] copies the whole DB to S3 and back: RocksDB checkpoints
//! ([`StateStore::create_checkpoint`]) uploaded as content-addressed files
//! plus one manifest per checkpoint, so a new host can start from them.

pub mod codec;
mod ranges;
pub mod remote;
mod rocks;

pub use ranges::{hash_key, HashRange, HashRangeError};
pub use rocks::{KeyCounts, StateStore};

/// The meta key of the engine's watermark state.
pub(crate) fn rocks_meta_key() -> &'static [u8] {
    rocks::META_ENGINE
}

use std::path::PathBuf;

/// What can go wrong with state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store error: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("cannot prepare the state directory {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the state in {} was written by a different configuration (state fingerprint {found}, this configuration has {expected}); \
         pass --reset-state to discard that state and start over",
        dir.display()
    )]
    FingerprintMismatch {
        dir: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "the state in {} uses state layout {found}, and this shardflow reads layout {expected}; \
         pass --reset-state to discard that state and start over (replay the archive to rebuild it)",
        dir.display()
    )]
    LayoutMismatch {
        dir: PathBuf,
        found: String,
        expected: String,
    },
    #[error("checkpoint {id} cannot be committed: checkpoint {committed} is already committed (ids must increase)")]
    CheckpointOrder { id: u64, committed: u64 },
    #[error("corrupt state in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

/// A column family. The discriminant is its position in [`Cf::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Slices = 0,
    Windows = 1,
    Meta = 2,
}

impl Cf {
    pub const ALL: [Cf; 3] = [Cf::Slices, Cf::Windows, Cf::Meta];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Slices => "slices",
            Cf::Windows => "windows",
            Cf::Meta => "meta",
        }
    }
}

/// One put or delete of a [`StateDelta`]: its key, then its value (empty
/// for a delete), stored back to back in the delta's buffer from `at`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Op {
    pub cf: Cf,
    pub delete: bool,
    at: usize,
    key_len: usize,
    value_len: usize,
}

/// State changes between two checkpoint barriers, already encoded (so the
/// engine can keep changing its state while the delta waits for the sinks).
/// Deltas must be committed in the order they were taken; [`append`]
/// merges a later one into an earlier one if the pipeline coalesces
/// checkpoints.
///
/// All keys and values live in one buffer: a checkpoint of a busy engine
/// holds a million ops, and two allocations per op (plus the page faults of
/// freshly grown memory) cost more than encoding them.
///
/// [`append`]: StateDelta::append
#[derive(Clone, Debug, Default)]
pub struct StateDelta {
    buf: Vec<u8>,
    pub(crate) ops: Vec<Op>,
}

impl StateDelta {
    pub fn empty() -> Self {
        StateDelta::default()
    }

    /// Room for about `ops` more ops of `bytes_per_op` bytes each.
    pub(crate) fn reserve(&mut self, ops: usize, bytes_per_op: usize) {
        self.buf.reserve(ops.saturating_mul(bytes_per_op));
        self.ops.reserve(ops);
    }

    /// Number of puts and deletes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of keys and values.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Appends a later delta; the combined delta commits both in order.
    pub fn append(&mut self, later: StateDelta) {
        let shift = self.buf.len();
        self.buf.extend_from_slice(&later.buf);
        self.ops.extend(later.ops.into_iter().map(|op| Op {
            at: op.at + shift,
            ..op
        }));
    }

    pub(crate) fn key(&self, op: &Op) -> &[u8] {
        &self.buf[op.at..op.at + op.key_len]
    }

    pub(crate) fn value(&self, op: &Op) -> &[u8] {
        let from = op.at + op.key_len;
        &self.buf[from..from + op.value_len]
    }

    /// A put whose key and value are written straight into the buffer.
    pub(crate) fn put_with(
        &mut self,
        cf: Cf,
        key: impl FnOnce(&mut Vec<u8>),
        value: impl FnOnce(&mut Vec<u8>),
    ) {
        let at = self.buf.len();
        key(&mut self.buf);
        let key_len = self.buf.len() - at;
        value(&mut self.buf);
        let value_len = self.buf.len() - at - key_len;
        self.push(cf, false, at, key_len, value_len);
    }

    /// Length of the last op's value.
    pub(crate) fn last_value_len(&self) -> usize {
        self.ops.last().map_or(0, |op| op.value_len)
    }

    /// Takes back the last op.
    pub(crate) fn pop(&mut self) {
        if let Some(op) = self.ops.pop() {
            self.buf.truncate(op.at);
        }
    }

    pub(crate) fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.put_with(
            cf,
            |b| b.extend_from_slice(key),
            |b| b.extend_from_slice(value),
        );
    }

    pub(crate) fn delete_with(&mut self, cf: Cf, key: impl FnOnce(&mut Vec<u8>)) {
        let at = self.buf.len();
        key(&mut self.buf);
        let key_len = self.buf.len() - at;
        self.push(cf, true, at, key_len, 0);
    }

    fn push(&mut self, cf: Cf, delete: bool, at: usize, key_len: usize, value_len: usize) {
        self.ops.push(Op {
            cf,
            delete,
            at,
            key_len,
            value_len,
        });
    }
}
