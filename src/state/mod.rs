//! Durable state: RocksDB column families, checkpoint deltas and commits.
//!
//! The engine keeps its hot state in memory and hands the pipeline a
//! [`StateDelta`] at every checkpoint barrier; the pipeline commits it with
//! the source positions in one atomic `WriteBatch` once the sinks have
//! acknowledged everything before the barrier. State and positions therefore
//! always agree, which is what makes a restart count no event twice.
//!
//! Column families (keys in [`codec`]; byte order equals logical order):
//! - `slices`:  `(spec, key, slice_start)` → a slice's accumulators
//! - `windows`: `(spec, key)` → the key's firing cursor, revisions, timer
//! - `timers`:  `(due window end, spec, key)` → empty, so firing is a range scan
//! - `meta`:    fingerprint, checkpoint id, positions, engine watermarks,
//!   and what a source keeps between runs (the Kinesis consumer ARN)
//!
//! There is no queue of late or dead-letter records awaiting delivery: they
//! are outputs like any other, delivered before the checkpoint that follows
//! them commits. After a crash they are produced again from the replayed
//! input (the watermark they were judged against is restored with the
//! state), with the same ids, so persisting them would only add a write.

pub mod codec;
mod rocks;

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
    #[error("checkpoint {id} cannot be committed: checkpoint {committed} is already committed (ids must increase)")]
    CheckpointOrder { id: u64, committed: u64 },
    #[error("corrupt state in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

/// A column family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Slices,
    Windows,
    Timers,
    Meta,
}

impl Cf {
    pub const ALL: [Cf; 4] = [Cf::Slices, Cf::Windows, Cf::Timers, Cf::Meta];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Slices => "slices",
            Cf::Windows => "windows",
            Cf::Timers => "timers",
            Cf::Meta => "meta",
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
}

/// State changes between two checkpoint barriers, already encoded (so the
/// engine can keep changing its state while the delta waits for the sinks).
/// Deltas must be committed in the order they were taken; [`append`]
/// merges a later one into an earlier one if the pipeline coalesces
/// checkpoints.
///
/// [`append`]: StateDelta::append
#[derive(Clone, Debug, Default)]
pub struct StateDelta {
    pub(crate) ops: Vec<Op>,
}

impl StateDelta {
    pub fn empty() -> Self {
        StateDelta::default()
    }

    /// Number of puts and deletes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends a later delta; the combined delta commits both in order.
    pub fn append(&mut self, later: StateDelta) {
        self.ops.extend(later.ops);
    }

    pub(crate) fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(cf, key, value));
    }

    pub(crate) fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.ops.push(Op::Delete(cf, key));
    }
}
