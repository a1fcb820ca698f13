//! The window operator: one [`KeyState`] per (window spec, key), held in a
//! write-back cache over RocksDB, with event-time timers that fire and purge
//! its windows. When a window fires, is purged or re-fires, and when a timer
//! is due, it asks [`rules`].
//!
//! This file holds the operator's data ([`Operator`], [`KeyState`],
//! [`SpecPlan`], the maps [`States`] and [`Timers`]) and nothing that acts
//! on it, so every file below imports it and it imports none of them. Each
//! job has a file, with an `impl Operator` block on the same struct:
//!
//! * [`ingest`](super::ingest): building the operator and the per-event
//!   path ([`Operator::add_event`]: steps 2 and 3 of the engine's
//!   per-event order).
//! * [`cache`](super::cache): which states are in memory. It loads a state
//!   on a miss, tracks dirty states, evicts clean states after a commit and
//!   prefetches.
//! * [`timers`](super::timers): the timer index, firing, re-firing,
//!   purging, and switching window results on.
//! * [`snapshot`](super::snapshot): a state's stored form, both the delta a
//!   checkpoint writes and the record a cache miss reads back.
//! * [`query`](super::query): the online API's reads, which use the
//!   per-event path's functions on the states and change none of them.
//!
//! The operator is one struct, not one struct per job. Adding an event and
//! visiting a key each need the cache's map, its dirty list, the pending
//! slice deletes, the timer index and the stats at once. They take them as
//! disjoint borrows of one struct (`let Operator { .. } = self;`), with one
//! hash lookup per key. With one struct per job, each would have to expose
//! the same fields to the others anyway. So the fields are `pub(super)`, and
//! each field's doc names the file that owns it.

use std::collections::{BTreeMap, VecDeque};

use smallvec::SmallVec;
use smol_str::SmolStr;

use crate::record::Key;
use crate::state::{StateDelta, StateStore};
use crate::time::Millis;

use super::aggregate::{Acc, FeatureSlot};
use super::window::{Geometry, KeyWindows};

/// The features sharing one window spec, and so one set of slices.
#[derive(Clone, Debug)]
pub(super) struct SpecPlan {
    pub(super) id: u16,
    pub(super) geo: Geometry,
    pub(super) slots: Vec<FeatureSlot>,
}

/// Counters the engine reports as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub events: u64,
    pub late: u64,
    pub window_results: u64,
    pub distinct_overflows: u64,
    pub cache_loads: u64,
    pub cache_evictions: u64,
    /// Keys visited at their timer (firing, purging).
    pub timer_visits: u64,
    /// Keys that arrived on a shard not owning their hash (per-shard mode).
    pub misrouted_keys: u64,
}

/// The state of one (spec, key): its live slices, a firing cursor `fired`
/// (every window `j ≤ fired` has been handled: fired, passed while empty,
/// or purged), the next revision of each fired window not yet purged, and
/// one timer (see [`timers`](super::timers)). The rest records how it
/// stands against the store (see [`snapshot`](super::snapshot)) and the
/// checkpoints (see [`cache`](super::cache)).
pub(super) struct KeyState {
    pub(super) windows: KeyWindows,
    pub(super) fired: i64,
    /// `(window, next revision)` of fired windows not yet purged, by window.
    pub(super) revisions: VecDeque<(i64, u32)>,
    pub(super) timer: Option<i64>,
    /// The timer as of the last snapshot (what the store has, or will have).
    pub(super) persisted_timer: Option<i64>,
    /// `fired` as of the last snapshot.
    pub(super) persisted_fired: i64,
    /// `revisions` changed since the last snapshot.
    pub(super) revisions_changed: bool,
    pub(super) dirty: bool,
    pub(super) snapshot_id: u64,
    /// The `windows` entry exists in the store (or in a handed-out delta).
    pub(super) stored: bool,
    /// The slices live in the slices column family, not inline in the
    /// `windows` record: the record grew past the inline limit. Stays so
    /// until the state empties.
    pub(super) separate: bool,
}

impl KeyState {
    pub(super) fn new() -> KeyState {
        KeyState {
            windows: KeyWindows::default(),
            fired: i64::MIN,
            revisions: VecDeque::new(),
            timer: None,
            persisted_timer: None,
            persisted_fired: i64::MIN,
            revisions_changed: false,
            dirty: false,
            snapshot_id: 0,
            stored: false,
            separate: false,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.revisions.is_empty()
    }
}

pub(super) struct Operator {
    pub(super) specs: Vec<SpecPlan>,
    pub(super) lateness: i64,
    /// Whether window results are produced (some sink subscribes to them).
    /// Without them the per-event vectors, purging and the late side output
    /// are unchanged, and a key is visited once per purge instead of once
    /// per window with data.
    pub(super) results: bool,
    /// [`cache`](super::cache): the states in memory.
    pub(super) states: States,
    /// [`timers`](super::timers): the timer index.
    pub(super) timers: Timers,
    /// [`ranges`](super::ranges): per-shard mode's key → timer domain.
    pub(super) domains: Domains,
    /// [`cache`](super::cache): the states changed since the last snapshot.
    pub(super) dirty: Vec<(u16, Key)>,
    /// Deletes of purged slices since the last snapshot (queued by
    /// [`timers`](super::timers), handed out by [`snapshot`](super::snapshot)).
    pub(super) pending: StateDelta,
    /// [`cache`](super::cache): where misses are read from.
    pub(super) store: StateStore,
    /// [`cache`](super::cache): RocksDB may hold state not in the cache
    /// (after a restore or an eviction).
    pub(super) store_may_have: bool,
    /// [`cache`](super::cache): the last committed checkpoint.
    pub(super) committed: u64,
    /// [`cache`](super::cache): the soft bound on states in memory.
    pub(super) capacity: usize,
    /// [`snapshot`](super::snapshot): see
    /// [`EngineOptions::inline_record_max`](super::EngineOptions).
    pub(super) inline_max: usize,
    /// One accumulator per spec, to merge a window's slices into.
    pub(super) scratch: Vec<Acc>,
    /// [`timers`](super::timers): windows the current event updated after
    /// they were fired (step 5).
    pub(super) refire: Vec<(u16, Key, i64, i64)>,
    /// [`timers`](super::timers): the chunk of due keys being visited
    /// (kept for its allocation).
    pub(super) visiting: Vec<Key>,
    /// [`timers`](super::timers): window results the last chunk of visits
    /// gave per key, to reserve the next chunk's room at once.
    pub(super) results_per_visit: usize,
    pub(super) stats: EngineStats,
}

impl Operator {
    /// Whether window results are produced.
    pub(super) fn window_results(&self) -> bool {
        self.results
    }
}

/// A key's states, one slot per window spec (indexed by spec id). `None`:
/// not in memory, because it never existed, was purged and dropped, or was
/// evicted (then the store has it). Held inline, so an event reaches the
/// states of all its specs with one probe and no further pointer chase.
pub(super) type KeyStates = SmallVec<[Option<KeyState>; 2]>;

/// What the cache holds of a key: its states and the MD5 hash that starts
/// each of its stored keys ([`hash_key`](crate::state::hash_key)).
///
/// The hash is computed when the entry is made (the key's first event or
/// visit since it was last in memory), not per event or per checkpoint
/// write. It is kept here, once per key, rather than in each [`KeyState`]:
/// there it would cost 16 bytes per inline slot of [`KeyStates`], used or
/// not (32 per key), here 16 per key whatever the number of specs.
pub(super) struct KeyEntry {
    pub(super) hash: [u8; 16],
    pub(super) slots: KeyStates,
    /// The newest event time added to the key's state since the entry was
    /// made (`Millis::MIN`: none yet), the online API's `last_event_time`.
    /// Memory only, like the hash: it is not part of the stored record
    /// (which would change the state layout for a freshness hint), so an
    /// entry made again after an eviction or a restart knows it from the
    /// key's next event on.
    pub(super) newest: Millis,
}

// The hash and the newest event time cost 24 bytes per key, no padding (a
// map bucket, key and entry, was 336 bytes without them when this was
// written).
const _: () = assert!(std::mem::size_of::<KeyEntry>() == std::mem::size_of::<KeyStates>() + 24);

/// A key as its stored state is addressed: its [`KeyEntry::hash`] and the
/// key itself.
pub(super) type KeyRef<'a> = (&'a [u8; 16], &'a str);

/// foldhash: per-process seeded and several times faster than SipHash on
/// short keys; this map is hit for every event and every firing. Keys up to
/// 23 bytes are stored inline ([`SmolStr`]), so comparing the probed entry's
/// key does not chase a pointer to another cache line.
pub(super) type States = hashbrown::HashMap<SmolStr, KeyEntry, foldhash::fast::RandomState>;

/// A key as the per-event and firing paths look it up in [`States`]: hashed
/// as the stored `SmolStr` is (as its `str`), compared in a few word loads
/// ([`same`](crate::decode::scan::same)) instead of a call to `memcmp`,
/// which for keys this short costs more than the compare.
#[derive(Hash)]
pub(super) struct Lookup<'a>(pub(super) &'a str);

impl hashbrown::Equivalent<SmolStr> for Lookup<'_> {
    #[inline]
    fn equivalent(&self, key: &SmolStr) -> bool {
        crate::decode::scan::same(self.0, key)
    }
}

impl From<&Lookup<'_>> for SmolStr {
    fn from(key: &Lookup<'_>) -> SmolStr {
        SmolStr::from(key.0)
    }
}

/// The timer index: the keys of each spec whose timer is at an instant,
/// ordered by that instant (a window end or a purge time).
/// Timers by (domain, due, spec): a domain's timers are one range of the
/// map, fired at that domain's watermark (see [`Domains`]).
///
/// A bucket is a queue: a firing burst takes its keys from the front in
/// chunks of the budget, in O(chunk) each (taking a chunk off a `Vec`'s
/// front moved the rest, O(keys²/chunk) for a window end most keys share),
/// and keys landing in it meanwhile queue behind the ones still waiting.
pub(super) type Timers = BTreeMap<(u32, i64, u16), VecDeque<Key>>;

/// Per-shard mode: the open shards' hash ranges `(start, end, domain)`,
/// sorted and disjoint. A key's windows follow the watermark of the shard
/// whose range holds its hash; a key no range holds (and every key outside
/// per-shard mode, where this is empty) follows the pipeline watermark.
#[derive(Clone, Debug, Default)]
pub(super) struct Domains(pub(super) Vec<(u128, u128, u32)>);

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use smol_str::SmolStr;

    use super::{KeyEntry, Lookup, States};

    /// A `Lookup` finds what the map holds under the same key, and only
    /// that: it hashes as the stored key does, and compares whole keys
    /// (keys of every length the word compare treats apart, and keys that
    /// share a prefix or a suffix).
    #[test]
    fn a_lookup_finds_exactly_its_own_key() {
        let keys = [
            "",
            "a",
            "ab",
            "abc",
            "abcd",
            "abcdefg",
            "abcdefgh",
            "abcdefghijklmnop",
            "abcdefghijklmnopq",
            "u-0123456789abcdefghij",
            "123e4567-e89b-12d3-a456-426614174000",
            "42989",
            "42988",
            "x2989",
        ];
        let mut states = States::default();
        for (i, k) in keys.iter().enumerate() {
            let hasher = states.hasher();
            assert_eq!(
                hasher.hash_one(Lookup(k)),
                hasher.hash_one(SmolStr::from(*k))
            );
            states.entry_ref(&Lookup(k)).or_insert_with(|| KeyEntry {
                hash: [i as u8; 16],
                slots: Default::default(),
                newest: 0,
            });
        }
        assert_eq!(states.len(), keys.len());
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(
                states.get(&Lookup(k)).map(|e| e.hash),
                Some([i as u8; 16]),
                "{k}"
            );
            assert_eq!(states.get(*k).map(|e| e.hash), Some([i as u8; 16]), "{k}");
        }
        assert!(states.get(&Lookup("abcdefghijklmnoq")).is_none());
        assert!(states.get(&Lookup("42987")).is_none());
    }
}
