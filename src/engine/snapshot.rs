//! Snapshot encoding: a state's stored form. This module owns what a
//! checkpoint writes for the states changed since the previous snapshot
//! ([`Operator::snapshot`], the state delta), and how a stored record
//! becomes a state again on a cache miss ([`KeyState::decode`]). The bytes
//! of a record are `state::codec`'s [`WindowRecord`].
//!
//! A (spec, key) state is stored as one `windows` record: its firing cursor,
//! revisions and timer, with its slices inline. When the record would pass
//! `inline_max` bytes, the state becomes *separate*: from then on the record
//! only says so, and each slice is an entry of its own in the `slices`
//! column family. It stays separate until it empties.
//!
//! The invariants:
//!
//! * **Every dirty state is in the next snapshot.** A snapshot encodes each
//!   dirty state, which is then clean, with `snapshot_id` set to that
//!   snapshot (the cache evicts it only once that id is committed).
//! * **The persisted fields mirror the store.** `persisted_timer`,
//!   `persisted_fired`, `stored`, and each slice's `stored` describe what
//!   the store holds once the deltas handed out so far are committed. A
//!   separate state's record is rewritten only when the record's contents
//!   differ from that, and only its dirty slices are written.
//! * **Purges come first.** A delta starts with the deletes of the slices
//!   purged since the previous snapshot (`pending`), then holds the puts
//!   and deletes of the dirty states.
//! * **An empty state leaves nothing behind.** Its record is deleted (its
//!   separate slices were deleted as they were purged), and it is inline
//!   again.
//! * **Either layout reads back.** Decoding takes the slices from the
//!   record or from the `slices` column family, as the record says,
//!   whatever `inline_max` is now, so it can change between runs. A slice
//!   is stored at its start (`idx · slide`, saturating) and read back at
//!   `start.div_euclid(slide)`.
//!
//! [`WindowRecord`]: crate::state::codec::WindowRecord

use std::collections::VecDeque;

use crate::state::codec::{write_key_prefix, write_slice_key, Reader, WindowRecord, Writer};
use crate::state::{Cf, StateDelta, StateStore};

use super::aggregate::Acc;
use super::operator::{KeyEntry, KeyRef, KeyState, Operator, SpecPlan};
use super::window::{KeyWindows, Slice};
use super::EngineError;

/// By default a `windows` record holds its key's slices inline up to this
/// size ([`EngineOptions::inline_record_max`](super::EngineOptions)). An
/// inline record is rewritten whole at every checkpoint that changes the
/// key, which is one put instead of a put per changed slice and a delete
/// per purged one; past about a KiB rewriting the unchanged slices costs
/// more than those ops (long windows with many or large slices).
pub(super) const INLINE_RECORD_MAX: usize = 1024;

impl KeyState {
    /// Puts the key's `windows` record into `delta`: its slices inline, or
    /// the mark that they are in the slices column family (`separate`).
    fn put_record(&self, plan: &SpecPlan, (hash, key): KeyRef<'_>, delta: &mut StateDelta) {
        let slide = plan.geo.slide;
        delta.put_with(
            Cf::Windows,
            |b| write_key_prefix(b, hash, plan.id, key),
            |b| {
                encode_into(b, |w| {
                    let revisions = self.revisions.iter().copied();
                    WindowRecord::write_head(w, self.fired, self.timer, revisions);
                    if self.separate {
                        WindowRecord::write_separate(w);
                    } else {
                        let slices = self.windows.slices.iter().map(|s| {
                            let start = s.idx.saturating_mul(slide);
                            (start, |w: &mut Writer| s.acc.encode(w))
                        });
                        WindowRecord::write_inline(w, slices);
                    }
                })
            },
        );
    }

    /// The record just put holds what the state has now.
    fn record_put(&mut self) {
        self.persisted_timer = self.timer;
        self.persisted_fired = self.fired;
        self.revisions_changed = false;
        self.stored = true;
    }

    /// The state stored as `record`, reading its slices from the store when
    /// the record does not hold them.
    pub(super) fn decode(
        plan: &SpecPlan,
        (hash, key): KeyRef<'_>,
        record: &[u8],
        store: &StateStore,
    ) -> Result<KeyState, EngineError> {
        let corrupt = |e: crate::state::codec::CodecError| EngineError::Corrupt(e.to_string());
        let record = WindowRecord::decode(record).map_err(corrupt)?;
        let separate = record.inline.is_none();
        let stored_slices;
        let slices: Vec<(i64, &[u8])> = match record.inline {
            Some(inline) => inline,
            None => {
                stored_slices = store.load_slices(hash, plan.id, key)?;
                stored_slices.iter().map(|(s, b)| (*s, &b[..])).collect()
            }
        };
        let mut restored = VecDeque::with_capacity(slices.len());
        for (start, bytes) in slices {
            let acc = Acc::decode(&plan.slots, &mut Reader::new(bytes)).map_err(corrupt)?;
            restored.push_back(Slice::restored(
                start.div_euclid(plan.geo.slide),
                acc,
                separate,
            ));
        }
        Ok(KeyState {
            windows: KeyWindows::from_slices(restored),
            fired: record.fired,
            revisions: record.revisions.into(),
            timer: record.timer,
            persisted_timer: record.timer,
            persisted_fired: record.fired,
            revisions_changed: false,
            dirty: false,
            snapshot_id: 0,
            stored: true,
            separate,
        })
    }
}

/// Encodes the changes of one dirty `(spec, key)` state into `delta`.
fn snapshot_key(
    plan: &SpecPlan,
    (key, st): (KeyRef<'_>, &mut KeyState),
    (id, inline_max): (u64, usize),
    delta: &mut StateDelta,
) {
    let spec = plan.id;
    let (hash, name) = key;
    st.dirty = false;
    st.snapshot_id = id;
    if st.is_empty() {
        // Separate slices were deleted as they were purged.
        if st.stored {
            delta.delete_with(Cf::Windows, |b| write_key_prefix(b, hash, spec, name));
            st.stored = false;
        }
        st.separate = false;
        return;
    }
    // The record must say where the slices are when that changes.
    let mut switched = false;
    if !st.separate {
        st.put_record(plan, key, delta);
        if delta.last_value_len() <= inline_max {
            for slice in st.windows.slices.iter_mut() {
                slice.dirty = false;
            }
            st.record_put();
            return;
        }
        // Too large to rewrite at every checkpoint: from now on each slice
        // is stored on its own, starting with all of them.
        delta.pop();
        st.separate = true;
        switched = true;
        for slice in st.windows.slices.iter_mut() {
            slice.dirty = true;
        }
    }
    // Most keys change only a slice between checkpoints; rewriting their
    // record too would double the batch.
    let record_changed = switched
        || !st.stored
        || st.fired != st.persisted_fired
        || st.timer != st.persisted_timer
        || st.revisions_changed;
    for slice in st.windows.slices.iter_mut().filter(|s| s.dirty) {
        let start = slice.idx.saturating_mul(plan.geo.slide);
        delta.put_with(
            Cf::Slices,
            |b| write_slice_key(b, hash, spec, name, start),
            |b| encode_into(b, |w| slice.acc.encode(w)),
        );
        slice.dirty = false;
        slice.stored = true;
    }
    if record_changed {
        st.put_record(plan, key, delta);
    }
    st.record_put();
}

/// Runs a [`Writer`] over the end of `buf`.
fn encode_into(buf: &mut Vec<u8>, encode: impl FnOnce(&mut Writer)) {
    let mut w = Writer {
        buf: std::mem::take(buf),
    };
    encode(&mut w);
    *buf = w.buf;
}

impl Operator {
    /// Encodes every change since the previous snapshot.
    pub(super) fn snapshot(&mut self, id: u64) -> StateDelta {
        // Drained, not taken: the list regrows to the same length by the
        // next checkpoint, and growing it again would copy it each time.
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut delta = std::mem::take(&mut self.pending);
        // About one slice per dirty key, with its key and value.
        delta.reserve(dirty.len(), 64);
        // When the dirty (spec, key) states are at least half as many as
        // the keys in memory (the usual case between two checkpoints of a
        // busy stream), one pass over the map in memory order beats a hash
        // lookup, usually a cache miss, per dirty state.
        if dirty.len().saturating_mul(2) >= self.states.len() {
            for (key, KeyEntry { hash, slots, .. }) in &mut self.states {
                for (plan, slot) in self.specs.iter().zip(slots.iter_mut()) {
                    if let Some(st) = slot.as_mut().filter(|st| st.dirty) {
                        let key = (&*hash, key.as_str());
                        snapshot_key(plan, (key, st), (id, self.inline_max), &mut delta);
                    }
                }
            }
        } else {
            for (spec, key) in dirty.drain(..) {
                let si = usize::from(spec);
                let Some(KeyEntry { hash, slots, .. }) = self.states.get_mut(&*key) else {
                    continue;
                };
                if let Some(st) = slots[si].as_mut().filter(|st| st.dirty) {
                    snapshot_key(
                        &self.specs[si],
                        ((hash, &key), st),
                        (id, self.inline_max),
                        &mut delta,
                    );
                }
            }
        }
        dirty.clear();
        self.dirty = dirty;
        delta
    }
}
