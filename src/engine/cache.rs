//! The state cache: which (spec, key) states are in memory over RocksDB.
//! It owns the map of states, loading on a miss, dirty tracking, eviction
//! after a commit, and prefetching.
//!
//! The invariants:
//!
//! * **Evicted only when clean.** An entry is evicted only when it is clean
//!   with respect to a *committed* checkpoint: it is not dirty, and its last
//!   snapshot is committed. So a read that falls through to RocksDB always
//!   finds the latest value. Purged (empty) states are dropped the same way,
//!   after their deletes are committed. The cache therefore holds every
//!   state touched since the last committed checkpoint, and `capacity` is a
//!   soft bound: state changed since the last commit always stays in memory.
//! * **Dirty once per snapshot.** A state is dirty from its first change
//!   after a snapshot until the next snapshot encodes it. [`touch`] marks it
//!   and lists it in `dirty` once.
//! * **A miss reads the store only when the store may have it.**
//!   `store_may_have` is true once the store may hold a state that is not in
//!   memory: after a restore that found key state, or after the first
//!   eviction. Until then a miss is a new state, with no read.
//! * **A key is hashed once per stay in memory.** Its entry's MD5 hash,
//!   which starts every stored key of it, is computed when the entry is
//!   made; the per-event path and the checkpoints use it as it is.
//! * **Prefetching only warms the CPU cache.** No result depends on it.
//! * **Online reads leave the cache as it is.** A read of the online API
//!   ([`query`](super::query)) of a key that is not in memory reads the
//!   store into a value of its own and drops it: no entry is made, nothing
//!   is marked dirty or evicted, so what is written and evicted later is
//!   what it would have been without the read.

use crate::record::Key;
use crate::state::{hash_key, StateStore};
use crate::time::Millis;

use super::operator::{
    EngineStats, KeyEntry, KeyRef, KeyState, Lookup, Operator, SpecPlan, States,
};
use super::window::prefetch_lines;
use super::EngineError;

/// Keys whose states are loaded into the CPU cache ahead of use
/// ([`Engine::prefetch`](super::Engine::prefetch)): enough to overlap many
/// misses, few enough that their lines are still cached when used.
pub const PREFETCH_AHEAD: usize = 32;

/// The entry of `key`, made (all slots empty, the key hashed) if it has none
/// in memory.
#[inline]
pub(super) fn key_states<'a>(states: &'a mut States, key: &str, specs: usize) -> &'a mut KeyEntry {
    // By reference: the key's owned form (an allocation for one longer
    // than 23 bytes, a UUID) is made only when the entry is.
    states.entry_ref(&Lookup(key)).or_insert_with(|| KeyEntry {
        hash: hash_key(key),
        slots: (0..specs).map(|_| None).collect(),
        newest: Millis::MIN,
    })
}

/// The stored state of `(spec, key)`, when the store may have one. It is
/// not put into the cache: [`slot_state`] does that for the per-event path,
/// while a read of the online API ([`query`](super::query)) works on the
/// value and drops it.
pub(super) fn load_stored(
    store: &StateStore,
    store_may_have: bool,
    plan: &SpecPlan,
    (hash, key): KeyRef<'_>,
) -> Result<Option<KeyState>, EngineError> {
    if !store_may_have {
        return Ok(None);
    }
    match store.load_key(hash, plan.id, key)? {
        Some(record) => Ok(Some(KeyState::decode(plan, (hash, key), &record, store)?)),
        None => Ok(None),
    }
}

/// The cached state of `(spec, key)` in its slot, else the stored one (read
/// into the slot), else `missing()` if that gives one. `hash` is the key's
/// [`KeyEntry::hash`].
pub(super) fn slot_state<'a>(
    slot: &'a mut Option<KeyState>,
    (store, store_may_have): (&StateStore, bool),
    plan: &SpecPlan,
    key: KeyRef<'_>,
    stats: &mut EngineStats,
    missing: impl FnOnce() -> Option<KeyState>,
) -> Result<Option<&'a mut KeyState>, EngineError> {
    if slot.is_none() {
        *slot = match load_stored(store, store_may_have, plan, key)? {
            Some(st) => {
                stats.cache_loads += 1;
                Some(st)
            }
            None => missing(),
        };
    }
    Ok(slot.as_mut())
}

/// Marks `st` dirty, listing it in `dirty` if it was not yet.
#[inline]
pub(super) fn touch(dirty: &mut Vec<(u16, Key)>, spec: u16, key: &Key, st: &mut KeyState) {
    if !st.dirty {
        st.dirty = true;
        dirty.push((spec, key.clone()));
    }
}

impl Operator {
    /// Starts loading the states of `keys` (the next few events' keys)
    /// into the CPU cache. Each lookup is independent of the others, so
    /// their cache misses overlap instead of stalling the events one by one.
    pub(super) fn prefetch<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        for key in keys {
            if let Some(entry) = self.states.get(&Lookup(key)) {
                for st in entry.slots.iter().flatten() {
                    // The state itself spans three lines, and the probe
                    // brought in only the one with the key.
                    prefetch_lines(st);
                    st.windows.prefetch();
                }
            }
        }
    }

    /// Checkpoint `id` is durable: drop purged states and, above capacity,
    /// clean ones.
    pub(super) fn committed(&mut self, id: u64) {
        self.committed = self.committed.max(id);
        let committed = self.committed;
        let clean = |st: &KeyState| !st.dirty && st.snapshot_id <= committed;
        let mut len = 0;
        self.states.retain(|_, entry| {
            for slot in entry.slots.iter_mut() {
                if slot.as_ref().is_some_and(|st| st.is_empty() && clean(st)) {
                    *slot = None;
                }
            }
            let held = entry.slots.iter().flatten().count();
            len += held;
            held > 0
        });
        if len <= self.capacity {
            return;
        }
        let before = len;
        self.states.retain(|_, entry| {
            for slot in entry.slots.iter_mut() {
                if len > self.capacity && slot.as_ref().is_some_and(clean) {
                    *slot = None;
                    len -= 1;
                }
            }
            entry.slots.iter().any(Option::is_some)
        });
        if len < before {
            // Evicted states now live only in RocksDB: misses must read it.
            self.stats.cache_evictions += (before - len) as u64;
            self.store_may_have = true;
        }
    }

    /// Number of (spec, key) states in memory.
    pub(super) fn cached_states(&self) -> usize {
        self.states
            .values()
            .map(|e| e.slots.iter().flatten().count())
            .sum()
    }
}
