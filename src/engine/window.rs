//! Window assignment and the per-key slice store.
//!
//! One concept, one file: about 500 lines of code, its tests below.
//!
//! A window spec (size, slide) is kept as slices of length `slide` (a
//! tumbling window is a sliding one with `slide == size`). Window `j` is the
//! window whose *last* slice has index `j`: it covers slices `j-n+1 ..= j`
//! (`n = size / slide`) and ends at `(j + 1) * slide`. An event updates
//! exactly one slice.
//!
//! Reading a window must not cost O(n). Slice indices are cut into aligned
//! blocks of `n`; any window spans at most two blocks, a suffix of block
//! `b - 1` and a prefix of block `b` (the van Herk/Gil-Werman scheme). Each
//! slice caches the merge of its block up to it (`prefix`) and from it to
//! the block's end (`suffix`), so a window is one merge of two cached values.
//! The caches are rebuilt lazily: an update at slice `i` only lowers the
//! block's "prefix valid up to" mark below `i` and raises its "suffix valid
//! from" mark above `i`, and a read recomputes just the invalid stretch it
//! needs. With events arriving roughly in order, updates hit the newest
//! slices, the prefix stretch to rebuild is as long as the disorder (in
//! slices), and a block's suffix is built about once, so ingest, per-event
//! reads and firing are all amortised O(1) in `n`. Distinct count is the
//! exception documented in `aggregate.rs`.
//!
//! Slices are stored sparsely (a key with two events in an hour-long window
//! keeps two slices, not 360). A window holding at most
//! [`DIRECT_MERGE_MAX`] slices, the usual case for a sparse key, is merged
//! slice by slice instead: still O(1) in `n`, and it builds no caches.

use std::collections::VecDeque;

use crate::record::Event;

use super::aggregate::{distinct_value, Acc, AddOutcome, FeatureSlot};
use super::rules::{self, saturate};
use crate::config::AggKind;
use crate::record::Value;

/// Slice length, window length in slices, window size, all in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size: i64,
    pub slide: i64,
    /// `size / slide`, at least 1.
    pub n: i64,
}

impl Geometry {
    pub fn new(size: i64, slide: i64) -> Geometry {
        let slide = slide.max(1);
        Geometry {
            size,
            slide,
            n: (size / slide).max(1),
        }
    }

    /// The slice an event time falls in.
    pub fn slice_of(&self, t: i64) -> i64 {
        t.div_euclid(self.slide)
    }

    /// End (exclusive) of window `j`: the exact value, clamped to `i64`.
    /// Called several times per event: `i64` arithmetic while it does not
    /// overflow (for any real time), the 128-bit sum only when it would.
    pub fn end_of(&self, j: i64) -> i64 {
        match j.checked_add(1).and_then(|e| e.checked_mul(self.slide)) {
            Some(end) => end,
            None => saturate((j as i128 + 1) * self.slide as i128),
        }
    }

    /// Start of window `j`, clamped like [`Geometry::end_of`].
    pub fn start_of(&self, j: i64) -> i64 {
        let start = j
            .checked_add(1)
            .and_then(|e| e.checked_mul(self.slide))
            .and_then(|e| e.checked_sub(self.size));
        match start {
            Some(start) => start,
            None => saturate((j as i128 + 1) * self.slide as i128 - self.size as i128),
        }
    }

    /// Smallest window index not purged at watermark `w`
    /// ([`rules::first_live_window`]).
    pub fn first_live_window(&self, w: i64, lateness: i64) -> i64 {
        rules::first_live_window(self.slide, lateness, w)
    }

    /// Largest window index due at watermark `w`
    /// ([`rules::last_due_window`]).
    pub fn last_due_window(&self, w: i64) -> i64 {
        rules::last_due_window(self.slide, w)
    }

    /// Timer value at which window `j` is purged ([`rules::purge_at`]; due
    /// per [`rules::due`]).
    pub fn purge_due_of_window(&self, j: i64, lateness: i64) -> i64 {
        rules::purge_at(self.end_of(j), lateness)
    }

    /// Timer value at which slice `idx` is purged: when its last window is.
    pub fn purge_due_of_slice(&self, idx: i64, lateness: i64) -> i64 {
        self.purge_due_of_window(self.last_window_of_slice(idx), lateness)
    }

    /// The last window (by index) containing slice `idx`.
    pub fn last_window_of_slice(&self, idx: i64) -> i64 {
        idx.saturating_add(self.n - 1)
    }

    /// Whether every window containing `t` is purged at `w` ([`rules::late`]).
    pub fn is_late(&self, t: i64, w: i64, lateness: i64) -> bool {
        rules::late(
            self.last_window_of_slice(self.slice_of(t)),
            self.slide,
            lateness,
            w,
        )
    }
}

/// Windows with at most this many slices are merged slice by slice,
/// without the block caches.
const DIRECT_MERGE_MAX: usize = 8;

/// One slice of one key: its accumulators and the block caches.
#[derive(Clone, Debug)]
pub struct Slice {
    pub idx: i64,
    pub acc: Acc,
    /// Boxed: only sliding windows build them, and a tumbling window's
    /// slice should not carry their space.
    prefix: Option<Box<Acc>>,
    suffix: Option<Box<Acc>>,
    /// Changed since the last snapshot.
    pub dirty: bool,
    /// Present in the slices column family (or in a delta already handed
    /// to the pipeline), so purging it must delete it there.
    pub stored: bool,
}

impl Slice {
    /// A slice read from the store; `stored`: in the slices column family
    /// (rather than inline in its key's record).
    pub fn restored(idx: i64, acc: Acc, stored: bool) -> Slice {
        Slice {
            idx,
            acc,
            prefix: None,
            suffix: None,
            dirty: false,
            stored,
        }
    }
}

/// Where [`KeyWindows::merge`] left a window's value.
#[derive(Clone, Copy, Debug)]
pub enum Merged {
    /// In the slice at this position (a tumbling window).
    Slice(usize),
    /// In the scratch accumulator.
    Scratch,
}

/// Validity marks of one block's caches.
#[derive(Clone, Copy, Debug)]
struct BlockMark {
    block: i64,
    /// Prefix caches of slices with `idx ≤ prefix_upto` are valid.
    prefix_upto: i64,
    /// Suffix caches of slices with `idx ≥ suffix_from` are valid.
    suffix_from: i64,
}

/// The live slices of one (spec, key), sorted by index.
#[derive(Clone, Debug, Default)]
pub struct KeyWindows {
    pub slices: VecDeque<Slice>,
    marks: Vec<BlockMark>,
}

impl KeyWindows {
    pub fn from_slices(slices: VecDeque<Slice>) -> KeyWindows {
        KeyWindows {
            slices,
            marks: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    /// Frees the room of an empty deque and block marks.
    pub fn release(&mut self) {
        debug_assert!(self.slices.is_empty());
        self.slices = VecDeque::new();
        self.marks = Vec::new();
    }

    /// Asks the CPU to start loading the memory the next event or visit of
    /// this key reads (its slices and block marks), without waiting for it.
    pub fn prefetch(&self) {
        /// The oldest slices (purging reads them) and the newest (an event
        /// usually lands in one, and the window it reads ends there): all
        /// of a short window's, the ends of a long one.
        const SLICES: usize = 8;
        let n = self.slices.len();
        let oldest = n.min(SLICES);
        let newest = n.saturating_sub(SLICES).max(oldest);
        for s in self
            .slices
            .range(..oldest)
            .chain(self.slices.range(newest..))
        {
            prefetch_lines(s);
        }
        // Where a new slice would go, the usual event of a sparse key (one
        // that sees an event per window or fewer): the slot after the
        // newest, which a deque with room fills without reallocating. Only
        // an address, never read: a guess that is wrong (the slot wrapped
        // to the buffer's start) loads a line for nothing.
        if self.slices.len() < self.slices.capacity() {
            let next = match self.slices.back() {
                Some(last) => std::ptr::from_ref(last).wrapping_add(1),
                // Empty: the front slice's start is where the next goes.
                None => self.slices.as_slices().0.as_ptr(),
            };
            prefetch_lines(next);
        }
        prefetch_lines(self.marks.as_ptr());
    }

    fn mark(&mut self, geo: &Geometry, block: i64) -> &mut BlockMark {
        let pos = match self.marks.iter().position(|m| m.block == block) {
            Some(p) => p,
            None => {
                self.marks.push(BlockMark {
                    block,
                    prefix_upto: block.saturating_mul(geo.n).saturating_sub(1),
                    suffix_from: block.saturating_add(1).saturating_mul(geo.n),
                });
                self.marks.len() - 1
            }
        };
        &mut self.marks[pos]
    }

    /// Adds an event to slice `idx`, creating it if needed.
    pub fn add(
        &mut self,
        geo: &Geometry,
        slots: &[FeatureSlot],
        idx: i64,
        event: &Event,
        seq: u64,
    ) -> AddOutcome {
        // Most keys are sparse: one live slice, two while the next window
        // starts before the last one is purged. The deque's first growth
        // makes room for four; three unused slices per key, in memory
        // faulted in fresh, were most of a tumbling job's state.
        if self.slices.capacity() == 0 {
            // New or released (the usual case of a sparse key): a plain
            // allocation, not the deque's growth path.
            self.slices = VecDeque::with_capacity(1);
        } else if self.slices.len() == self.slices.capacity() && self.slices.len() < 2 {
            self.slices.reserve_exact(1);
        }
        let pos = match self.slices.back() {
            Some(last) if last.idx == idx => self.slices.len() - 1,
            Some(last) if last.idx > idx => {
                match self.slices.binary_search_by_key(&idx, |s| s.idx) {
                    Ok(p) => p,
                    Err(p) => {
                        self.slices.insert(p, Self::new_slice(idx, slots));
                        p
                    }
                }
            }
            _ => {
                self.slices.push_back(Self::new_slice(idx, slots));
                self.slices.len() - 1
            }
        };
        let slice = &mut self.slices[pos];
        slice.dirty = true;
        let outcome = slice.acc.add(slots, event, seq);
        // Only a block whose caches were built has a mark; a block without
        // one has nothing valid to invalidate (a mark made later starts
        // empty), so sparse keys never allocate marks at all.
        let block = idx.div_euclid(geo.n);
        if let Some(mark) = self.marks.iter_mut().find(|m| m.block == block) {
            mark.prefix_upto = mark.prefix_upto.min(idx - 1);
            mark.suffix_from = mark.suffix_from.max(idx + 1);
        }
        outcome
    }

    fn new_slice(idx: i64, slots: &[FeatureSlot]) -> Slice {
        Slice {
            idx,
            acc: Acc::empty(slots),
            prefix: None,
            suffix: None,
            dirty: true,
            stored: false,
        }
    }

    /// Merges window `j` into `out` (cleared first). Returns whether the
    /// window holds any event.
    pub fn window(&mut self, geo: &Geometry, slots: &[FeatureSlot], j: i64, out: &mut Acc) -> bool {
        out.clear(slots);
        if geo.n == 1 {
            return match self.slices.binary_search_by_key(&j, |s| s.idx) {
                Ok(p) => {
                    out.assign(&self.slices[p].acc);
                    true
                }
                Err(_) => false,
            };
        }
        // A window holding few slices (a sparse key: most keys of a long
        // sliding window) is cheaper to merge directly than to keep block
        // caches for, and the bound keeps it O(1) in `n`.
        let lo = self
            .slices
            .partition_point(|s| s.idx <= j.saturating_sub(geo.n));
        let hi = self.slices.partition_point(|s| s.idx <= j);
        if hi.saturating_sub(lo) <= DIRECT_MERGE_MAX {
            for s in self.slices.range(lo..hi.max(lo)) {
                out.merge(&s.acc);
            }
            return out.count > 0;
        }
        let b = j.div_euclid(geo.n);
        if j.rem_euclid(geo.n) != geo.n - 1 {
            if let Some(p) = self.suffix_pos(geo, slots, b - 1, j - geo.n + 1) {
                if let Some(s) = &self.slices[p].suffix {
                    out.merge(s);
                }
            }
        }
        if let Some(p) = self.prefix_pos(geo, slots, b, j) {
            if let Some(s) = &self.slices[p].prefix {
                out.merge(s);
            }
        }
        out.count > 0
    }

    /// Makes window `j`'s value readable through [`KeyWindows::merged`]:
    /// a window of one slice (every tumbling window, most of a sparse key's
    /// sliding ones) is read in place (firing visits a key per window, and
    /// copying the slice into `scratch` first was most of reading it), any
    /// other window is merged into `scratch`. `None` when the window holds
    /// no event.
    pub fn merge(
        &mut self,
        geo: &Geometry,
        slots: &[FeatureSlot],
        j: i64,
        scratch: &mut Acc,
    ) -> Option<Merged> {
        if geo.n == 1 {
            return match self.slices.front() {
                Some(first) if first.idx == j => Some(Merged::Slice(0)),
                _ => self
                    .slices
                    .binary_search_by_key(&j, |s| s.idx)
                    .ok()
                    .map(Merged::Slice),
            };
        }
        // Merging one slice into the cleared scratch gives its own lanes.
        let lo = self
            .slices
            .partition_point(|s| s.idx <= j.saturating_sub(geo.n));
        if self.slices.get(lo).is_some_and(|s| s.idx <= j)
            && self.slices.get(lo + 1).is_none_or(|s| s.idx > j)
        {
            return (self.slices[lo].acc.count > 0).then_some(Merged::Slice(lo));
        }
        self.window(geo, slots, j, scratch)
            .then_some(Merged::Scratch)
    }

    /// The value [`KeyWindows::merge`] made readable.
    pub fn merged<'a>(&'a self, at: Merged, scratch: &'a Acc) -> &'a Acc {
        match at {
            Merged::Slice(p) => &self.slices[p].acc,
            Merged::Scratch => scratch,
        }
    }

    /// Position of the last slice of block `b` with `idx ≤ j`, with its
    /// prefix cache made valid.
    fn prefix_pos(
        &mut self,
        geo: &Geometry,
        slots: &[FeatureSlot],
        b: i64,
        j: i64,
    ) -> Option<usize> {
        let lo = b * geo.n;
        let p = self.slices.partition_point(|s| s.idx <= j).checked_sub(1)?;
        if self.slices[p].idx < lo {
            return None;
        }
        let upto = self.mark(geo, b).prefix_upto;
        if self.slices[p].idx <= upto {
            return Some(p);
        }
        let block_start = self.slices.partition_point(|s| s.idx < lo);
        let start = self
            .slices
            .partition_point(|s| s.idx <= upto)
            .max(block_start);
        for q in start..=p {
            let prev = if q > block_start {
                self.slices[q - 1].prefix.take()
            } else {
                None
            };
            let Slice { acc, prefix, .. } = &mut self.slices[q];
            let dst = prefix.get_or_insert_with(|| Box::new(Acc::empty(slots)));
            dst.assign(acc);
            if let Some(prev) = prev {
                dst.merge(&prev);
                self.slices[q - 1].prefix = Some(prev);
            }
        }
        let idx = self.slices[p].idx;
        self.mark(geo, b).prefix_upto = idx;
        Some(p)
    }

    /// Position of the first slice of block `b` with `idx ≥ q`, with its
    /// suffix cache made valid.
    fn suffix_pos(
        &mut self,
        geo: &Geometry,
        slots: &[FeatureSlot],
        b: i64,
        q: i64,
    ) -> Option<usize> {
        let hi = (b + 1) * geo.n;
        let p = self.slices.partition_point(|s| s.idx < q);
        if p >= self.slices.len() || self.slices[p].idx >= hi {
            return None;
        }
        let from = self.mark(geo, b).suffix_from;
        if self.slices[p].idx >= from {
            return Some(p);
        }
        let block_end = self.slices.partition_point(|s| s.idx < hi);
        let valid = self.slices.partition_point(|s| s.idx < from).min(block_end);
        for r in (p..valid).rev() {
            let next = if r + 1 < block_end {
                self.slices[r + 1].suffix.take()
            } else {
                None
            };
            let Slice { acc, suffix, .. } = &mut self.slices[r];
            let dst = suffix.get_or_insert_with(|| Box::new(Acc::empty(slots)));
            dst.assign(acc);
            if let Some(next) = next {
                dst.merge(&next);
                self.slices[r + 1].suffix = Some(next);
            }
        }
        let idx = self.slices[p].idx;
        self.mark(geo, b).suffix_from = idx;
        Some(p)
    }

    /// A copy of the slices of window `j`, without their block caches: what
    /// the online API's score adds an event to, so that the key's own
    /// slices stay untouched. Window `j` of the copy has the same value as
    /// window `j` here, to the bit: a block cache is a function of the
    /// slices it covers (each is rebuilt from them, in the same order,
    /// whenever one changes), and every slice a read of window `j` merges,
    /// directly or through a cache, is in the window.
    pub fn window_copy(&self, geo: &Geometry, j: i64) -> KeyWindows {
        let lo = self
            .slices
            .partition_point(|s| s.idx <= j.saturating_sub(geo.n));
        let hi = self.slices.partition_point(|s| s.idx <= j);
        let slices = self
            .slices
            .range(lo..hi.max(lo))
            .map(|s| Slice::restored(s.idx, s.acc.clone(), s.stored))
            .collect();
        KeyWindows::from_slices(slices)
    }

    /// The slices of window `j`, for distinct counts.
    pub fn window_slices(&self, geo: &Geometry, j: i64) -> impl Iterator<Item = &Acc> {
        let lo = self
            .slices
            .partition_point(|s| s.idx < j.saturating_sub(geo.n - 1));
        let hi = self.slices.partition_point(|s| s.idx <= j);
        self.slices.range(lo..hi.max(lo)).map(|s| &s.acc)
    }

    /// Feature values of window `j` (merged into `scratch` unless it is one
    /// slice), passed to `put` slot by slot. Returns whether the window has
    /// events.
    pub fn values(
        &mut self,
        geo: &Geometry,
        slots: &[FeatureSlot],
        j: i64,
        scratch: &mut Acc,
        put: impl FnMut(&FeatureSlot, Option<Value>),
    ) -> bool {
        if geo.n == 1 {
            // A tumbling window is its one slice: read it in place rather
            // than copy it into `scratch` (this runs for every event).
            let p = match self.slices.back() {
                Some(last) if last.idx == j => self.slices.len() - 1,
                _ => match self.slices.binary_search_by_key(&j, |s| s.idx) {
                    Ok(p) => p,
                    Err(_) => return false,
                },
            };
            self.values_of_merged(geo, slots, j, &self.slices[p].acc, put);
            return true;
        }
        let Some(at) = self.merge(geo, slots, j, scratch) else {
            return false;
        };
        self.values_of_merged(geo, slots, j, self.merged(at, scratch), put);
        true
    }

    /// Like [`values`](Self::values) when `merged` already holds window `j`.
    pub fn values_of_merged(
        &self,
        geo: &Geometry,
        slots: &[FeatureSlot],
        j: i64,
        merged: &Acc,
        mut put: impl FnMut(&FeatureSlot, Option<Value>),
    ) {
        for (i, slot) in slots.iter().enumerate() {
            let v = if slot.agg == AggKind::DistinctCount {
                distinct_value(self.window_slices(geo, j), i)
            } else {
                merged.value(i)
            };
            put(slot, v);
        }
    }

    /// The first window after `j_after` that holds an event.
    pub fn first_data_window_after(&self, geo: &Geometry, j_after: i64) -> Option<i64> {
        let lo = j_after.saturating_sub(geo.n - 2);
        // Usually the oldest slice (purging drops the ones before it): a
        // binary search over slices of a few cache lines each costs more.
        let p = match self.slices.front() {
            Some(front) if front.idx >= lo => 0,
            _ => self.slices.partition_point(|s| s.idx < lo),
        };
        self.slices
            .get(p)
            .map(|s| s.idx.max(j_after.saturating_add(1)))
    }

    /// Drops the slices all of whose windows are purged at `w`, calling
    /// `on_removed` with each removed slice that is in the store.
    pub fn purge(
        &mut self,
        geo: &Geometry,
        w: i64,
        lateness: i64,
        mut on_removed: impl FnMut(i64),
    ) {
        let before = self.slices.len();
        while let Some(front) = self.slices.front() {
            if !rules::due(geo.purge_due_of_slice(front.idx, lateness), w) {
                break;
            }
            if front.stored {
                on_removed(front.idx);
            }
            self.slices.pop_front();
        }
        if self.slices.len() == before {
            return;
        }
        match self.slices.front() {
            Some(front) => {
                let first_block = front.idx.div_euclid(geo.n);
                self.marks.retain(|m| m.block >= first_block);
            }
            None => self.marks.clear(),
        }
    }
}

/// Starts loading the cache lines of `*value` (non-blocking, a hint only:
/// it never faults, whatever the address).
pub(super) fn prefetch_lines<T>(value: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = value.cast::<i8>();
        for offset in (0..std::mem::size_of::<T>().max(1)).step_by(64) {
            // SAFETY: a prefetch of any address is sound; it reads nothing
            // the program sees and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::record::{FieldValue, Position};

    fn slots() -> Vec<FeatureSlot> {
        [
            AggKind::Count,
            AggKind::Sum,
            AggKind::Max,
            AggKind::First,
            AggKind::Last,
        ]
        .iter()
        .enumerate()
        .map(|(i, agg)| FeatureSlot {
            index: i,
            name: agg.as_str().into(),
            agg: *agg,
            field: (*agg != AggKind::Count).then_some(0),
            max_distinct: 10,
        })
        .collect()
    }

    fn event(t: i64, v: f64) -> Event {
        Event {
            position: Position::new("p".into(), "0"),
            arrival: 0,
            key: "k".into(),
            event_time: t,
            fields: vec![Some(FieldValue::F64(v))].into(),
            raw: Default::default(),
        }
    }

    /// Blocks, caches and lazy invalidation agree with a direct merge for
    /// every window, after every update, in a scrambled order; windows hold
    /// from none to all of their 12 slices, so both the cached and the
    /// slice-by-slice path are taken.
    #[test]
    fn cached_windows_equal_direct_merges() {
        let geo = Geometry::new(120, 10);
        let slots = slots();
        let mut kw = KeyWindows::default();
        let mut plain: Vec<(i64, Acc)> = Vec::new();
        let times: Vec<i64> = (0..90).map(|i| (i * 37 + i * i * 11) % 260).collect();
        let mut cached_path = 0;
        for (seq, &t) in times.iter().enumerate() {
            let e = event(t, (t % 17) as f64);
            let idx = geo.slice_of(t);
            kw.add(&geo, &slots, idx, &e, seq as u64);
            match plain.iter_mut().find(|(i, _)| *i == idx) {
                Some((_, acc)) => {
                    acc.add(&slots, &e, seq as u64);
                }
                None => {
                    let mut acc = Acc::empty(&slots);
                    acc.add(&slots, &e, seq as u64);
                    plain.push((idx, acc));
                }
            }
            let mut out = Acc::empty(&slots);
            for j in -2..40 {
                let mut expect = Acc::empty(&slots);
                let mut slices = 0;
                for (i, acc) in &plain {
                    if *i > j - geo.n && *i <= j {
                        expect.merge(acc);
                        slices += 1;
                    }
                }
                if slices > DIRECT_MERGE_MAX {
                    cached_path += 1;
                }
                let has = kw.window(&geo, &slots, j, &mut out);
                assert_eq!(has, expect.count > 0, "window {j}");
                assert_eq!(out, expect, "window {j} after {t}");
            }
        }
        assert!(
            cached_path > 100,
            "only {cached_path} reads took the cached path"
        );
    }

    /// A sparse key holds room for the slices it has, not the deque's
    /// usual four, and gives it all back once its slices are purged.
    #[test]
    fn sparse_keys_hold_room_for_their_slices_only() {
        let geo = Geometry::new(10, 10);
        let slots = slots();
        let mut kw = KeyWindows::default();
        kw.add(&geo, &slots, 0, &event(5, 1.0), 0);
        assert_eq!(kw.slices.capacity(), 1);
        kw.add(&geo, &slots, 1, &event(15, 1.0), 1);
        assert_eq!(kw.slices.capacity(), 2);
        kw.add(&geo, &slots, 2, &event(25, 1.0), 2);
        assert!(kw.slices.capacity() >= 3);
        kw.purge(&geo, i64::MAX, 0, |_| {});
        assert!(kw.is_empty());
        kw.release();
        assert_eq!(kw.slices.capacity(), 0);
        // Empty again, it starts over as a sparse key.
        kw.add(&geo, &slots, 9, &event(95, 1.0), 3);
        assert_eq!(kw.slices.capacity(), 1);
    }

    #[test]
    fn geometry_edges() {
        let g = Geometry::new(60, 20);
        assert_eq!(g.slice_of(-1), -1);
        assert_eq!(g.end_of(2), 60);
        assert_eq!(g.start_of(2), 0);
        // Window 2 = [0, 60): due at 59, purged at 59 + 10.
        assert_eq!(g.last_due_window(58), 1);
        assert_eq!(g.last_due_window(59), 2);
        assert_eq!(g.first_live_window(68, 10), 2);
        assert_eq!(g.first_live_window(69, 10), 3);
        assert_eq!(g.last_due_window(i64::MAX), i64::MAX / 20 - 1);
        assert!(!g.is_late(0, 68, 10));
        assert!(g.is_late(0, 69 + 40, 10));
    }

    /// A window's bounds are the exact 128-bit values clamped, whether the
    /// `i64` arithmetic overflows on the way or not.
    #[test]
    fn window_bounds_are_the_clamped_exact_values() {
        let sizes = [
            (1, 1),
            (60, 20),
            (3_600_000, 10_000),
            (i64::MAX, 1 << 40),
            (7, 3),
        ];
        for (size, slide) in sizes {
            let g = Geometry::new(size, slide);
            let edge = i64::MAX / g.slide;
            for j in [
                i64::MIN,
                i64::MIN + 1,
                -edge - 1,
                -edge,
                -1,
                0,
                1,
                edge - 1,
                edge,
                i64::MAX,
            ] {
                let end = (j as i128 + 1) * g.slide as i128;
                assert_eq!(g.end_of(j), saturate(end), "{g:?}, j {j}");
                assert_eq!(
                    g.start_of(j),
                    saturate(end - g.size as i128),
                    "{g:?}, j {j}"
                );
            }
        }
    }

    /// A purge time is the clamped window end plus the lateness. For every
    /// window an event can be in (its end lies past the event) and every
    /// lateness config allows (`≥ 0`), that is the exact sum, clamped.
    #[test]
    fn purge_time_is_the_clamped_exact_sum() {
        for (size, slide) in [(1, 1), (60, 20), (1 << 10, 1 << 10), (7, 3)] {
            let g = Geometry::new(size, slide);
            for t in [i64::MIN, i64::MIN + 1, -1, 0, 59, i64::MAX - 1, i64::MAX] {
                let first = g.slice_of(t);
                for j in [
                    first,
                    first.saturating_add(1),
                    g.last_window_of_slice(first),
                ] {
                    for lateness in [0, 1, 45, i64::MAX] {
                        let exact = (j as i128 + 1) * g.slide as i128 + lateness as i128;
                        assert_eq!(
                            g.purge_due_of_window(j, lateness),
                            saturate(exact),
                            "{g:?}, t {t}, j {j}, lateness {lateness}"
                        );
                    }
                }
            }
        }
    }
}
