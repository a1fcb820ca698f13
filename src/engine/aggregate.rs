//! Aggregate accumulators: one [`Acc`] per window slice holds a lane per
//! feature of the window spec (features sharing a spec share slices).
//!
//! Every lane except distinct count is a commutative monoid, so a window's
//! value is the [`Acc::merge`] of its slices in any grouping; the window
//! module exploits that with block prefix/suffix aggregates (amortised O(1)
//! per result). First and last are monoids too: "first" is the minimum of
//! `(event_time, arrival_seq)`, "last" the maximum, which is exactly "by event
//! time, ties by arrival order". Stddev merges Welford partials (Chan et al.).
//!
//! Distinct count is a set union, not a small monoid: keeping prefix/suffix
//! *sets* would multiply memory by the window length, so its lane is left out
//! of merges and a window's distinct count is computed by unioning the sets of
//! the window's slices (O(values in the window), bounded by
//! `size/slide × max_distinct`). A slice that would exceed `max_distinct`
//! stops collecting and is marked overflowed: every window containing it
//! reports `null` for that feature, a warning is logged and the
//! `shardflow_distinct_overflow_total` counter is incremented. Nothing is
//! truncated silently.

use std::collections::HashSet;
use std::sync::Arc;

use smallvec::SmallVec;
use smol_str::SmolStr;

use crate::config::AggKind;
use crate::record::{Event, FieldValue, Value};
use crate::state::codec::{CodecError, Reader, Writer};

/// One feature as the engine computes it.
#[derive(Clone, Debug)]
pub struct FeatureSlot {
    /// Position in config order (the feature vector's order).
    pub index: usize,
    /// Cloned into every window result of the feature: inline, a copy.
    pub name: SmolStr,
    pub agg: AggKind,
    /// Index into `Event::fields`; `None` for count.
    pub field: Option<usize>,
    pub max_distinct: usize,
}

/// A value with its order key, for first and last.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stamped {
    pub time: i64,
    pub seq: u64,
    pub value: f64,
}

/// Welford partial: count, mean, sum of squared deviations.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Welford {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Welford {
    fn push(&mut self, x: f64) {
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (x - self.mean);
    }

    fn merge(&mut self, o: &Welford) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *o;
            return;
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        let (na, nb) = (self.n as f64, o.n as f64);
        self.mean += delta * nb / n as f64;
        self.m2 += o.m2 + delta * delta * na * nb / n as f64;
        self.n = n;
    }
}

/// A distinct-count key: field values compared exactly.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DistinctKey {
    /// f64 bits, with -0.0 folded into 0.0.
    F64(u64),
    I64(i64),
    Str(Arc<str>),
    Bool(bool),
}

impl DistinctKey {
    fn of(v: &FieldValue) -> DistinctKey {
        match v {
            FieldValue::F64(x) => DistinctKey::F64(if *x == 0.0 { 0 } else { x.to_bits() }),
            FieldValue::I64(x) => DistinctKey::I64(*x),
            FieldValue::Str(s) => DistinctKey::Str(s.clone()),
            FieldValue::Bool(b) => DistinctKey::Bool(*b),
        }
    }
}

/// The distinct values of one slice, or the fact that there were too many.
#[derive(Clone, Debug, PartialEq)]
pub enum DistinctSet {
    Values(HashSet<DistinctKey>),
    Overflow,
}

/// One feature's accumulator.
#[derive(Clone, Debug, PartialEq)]
pub enum Lane {
    /// Reads [`Acc::count`].
    Count,
    Sum {
        n: u64,
        sum: f64,
    },
    Min {
        n: u64,
        v: f64,
    },
    Max {
        n: u64,
        v: f64,
    },
    Mean {
        n: u64,
        sum: f64,
    },
    First(Option<Stamped>),
    Last(Option<Stamped>),
    Stddev(Welford),
    /// `None` until a value arrives; never merged (see the module docs).
    Distinct(Option<Box<DistinctSet>>),
}

impl Lane {
    fn empty(agg: AggKind) -> Lane {
        match agg {
            AggKind::Count => Lane::Count,
            AggKind::Sum => Lane::Sum { n: 0, sum: 0.0 },
            AggKind::Min => Lane::Min {
                n: 0,
                v: f64::INFINITY,
            },
            AggKind::Max => Lane::Max {
                n: 0,
                v: f64::NEG_INFINITY,
            },
            AggKind::Mean => Lane::Mean { n: 0, sum: 0.0 },
            AggKind::First => Lane::First(None),
            AggKind::Last => Lane::Last(None),
            AggKind::Stddev => Lane::Stddev(Welford::default()),
            AggKind::DistinctCount => Lane::Distinct(None),
        }
    }

    fn merge(&mut self, o: &Lane) {
        match (self, o) {
            (Lane::Sum { n, sum }, Lane::Sum { n: n2, sum: s2 })
            | (Lane::Mean { n, sum }, Lane::Mean { n: n2, sum: s2 }) => {
                *n += n2;
                *sum += s2;
            }
            (Lane::Min { n, v }, Lane::Min { n: n2, v: v2 }) => {
                *n += n2;
                *v = v.min(*v2);
            }
            (Lane::Max { n, v }, Lane::Max { n: n2, v: v2 }) => {
                *n += n2;
                *v = v.max(*v2);
            }
            (Lane::First(a), Lane::First(Some(b)))
                if a.is_none_or(|a| (b.time, b.seq) < (a.time, a.seq)) =>
            {
                *a = Some(*b);
            }
            (Lane::Last(a), Lane::Last(Some(b)))
                if a.is_none_or(|a| (b.time, b.seq) > (a.time, a.seq)) =>
            {
                *a = Some(*b);
            }
            (Lane::Stddev(a), Lane::Stddev(b)) => a.merge(b),
            // Count reads Acc::count; distinct is unioned separately.
            _ => {}
        }
    }

    /// Copies `o` into `self` without reallocating (distinct sets are not copied).
    fn assign(&mut self, o: &Lane) {
        if let Lane::Distinct(_) = o {
            return;
        }
        *self = o.clone();
    }
}

/// Lanes held inline in an [`Acc`]; a window spec with more features
/// spills to the heap.
const INLINE_LANES: usize = 3;

/// The accumulators of one slice (or of a merge of slices).
#[derive(Clone, Debug, PartialEq)]
pub struct Acc {
    /// Events in the slice; every event counts, with or without fields.
    pub count: u64,
    /// Inline: a sparse key creates a slice for most of its events, and
    /// a heap block per slice cost an allocation per event and a cache
    /// miss per update.
    pub lanes: SmallVec<[Lane; INLINE_LANES]>,
}

/// Result of adding one event to an accumulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AddOutcome {
    /// A distinct-count lane went past its bound with this event.
    pub distinct_overflowed: bool,
}

impl Acc {
    pub fn empty(slots: &[FeatureSlot]) -> Acc {
        Acc {
            count: 0,
            lanes: slots.iter().map(|s| Lane::empty(s.agg)).collect(),
        }
    }

    /// Resets to the identity, keeping the allocation.
    pub fn clear(&mut self, slots: &[FeatureSlot]) {
        self.count = 0;
        for (lane, slot) in self.lanes.iter_mut().zip(slots) {
            *lane = Lane::empty(slot.agg);
        }
    }

    /// Adds one event (its arrival order is `seq`).
    pub fn add(&mut self, slots: &[FeatureSlot], event: &Event, seq: u64) -> AddOutcome {
        let mut outcome = AddOutcome::default();
        self.count += 1;
        for (lane, slot) in self.lanes.iter_mut().zip(slots) {
            let Some(field) = slot
                .field
                .and_then(|i| event.fields.get(i))
                .and_then(|f| f.as_ref())
            else {
                continue;
            };
            if let Lane::Distinct(set) = lane {
                let set = set.get_or_insert_with(|| Box::new(DistinctSet::Values(HashSet::new())));
                if let DistinctSet::Values(values) = &mut **set {
                    let key = DistinctKey::of(field);
                    if !values.contains(&key) {
                        if values.len() >= slot.max_distinct {
                            **set = DistinctSet::Overflow;
                            outcome.distinct_overflowed = true;
                        } else {
                            values.insert(key);
                        }
                    }
                }
                continue;
            }
            let Some(x) = field.as_f64() else { continue };
            match lane {
                Lane::Sum { n, sum } | Lane::Mean { n, sum } => {
                    *n += 1;
                    *sum += x;
                }
                Lane::Min { n, v } => {
                    *n += 1;
                    *v = v.min(x);
                }
                Lane::Max { n, v } => {
                    *n += 1;
                    *v = v.max(x);
                }
                Lane::First(cur) => {
                    let s = Stamped {
                        time: event.event_time,
                        seq,
                        value: x,
                    };
                    if cur.is_none_or(|c| (s.time, s.seq) < (c.time, c.seq)) {
                        *cur = Some(s);
                    }
                }
                Lane::Last(cur) => {
                    let s = Stamped {
                        time: event.event_time,
                        seq,
                        value: x,
                    };
                    if cur.is_none_or(|c| (s.time, s.seq) > (c.time, c.seq)) {
                        *cur = Some(s);
                    }
                }
                Lane::Stddev(w) => w.push(x),
                Lane::Count | Lane::Distinct(_) => {}
            }
        }
        outcome
    }

    /// `self ⊕= other` for every mergeable lane.
    pub fn merge(&mut self, other: &Acc) {
        self.count += other.count;
        for (a, b) in self.lanes.iter_mut().zip(other.lanes.iter()) {
            a.merge(b);
        }
    }

    /// `self = other` (mergeable lanes only), reusing the allocation.
    pub fn assign(&mut self, other: &Acc) {
        self.count = other.count;
        for (a, b) in self.lanes.iter_mut().zip(other.lanes.iter()) {
            a.assign(b);
        }
    }

    /// The value of lane `i`; `None` when no event carried the field.
    /// Distinct lanes are answered by [`distinct_value`] instead.
    pub fn value(&self, i: usize) -> Option<Value> {
        match self.lanes.get(i)? {
            Lane::Count => Some(Value::Int(self.count as i64)),
            Lane::Sum { n, sum } => (*n > 0).then_some(Value::Float(*sum)),
            Lane::Min { n, v } | Lane::Max { n, v } => (*n > 0).then_some(Value::Float(*v)),
            Lane::Mean { n, sum } => (*n > 0).then(|| Value::Float(*sum / *n as f64)),
            Lane::First(s) | Lane::Last(s) => s.map(|s| Value::Float(s.value)),
            Lane::Stddev(w) => (w.n > 0).then(|| Value::Float((w.m2 / w.n as f64).max(0.0).sqrt())),
            Lane::Distinct(_) => None,
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.count);
        for lane in self.lanes.iter() {
            match lane {
                Lane::Count => {}
                Lane::Sum { n, sum } | Lane::Mean { n, sum } => {
                    w.u64(*n);
                    w.f64(*sum);
                }
                Lane::Min { n, v } | Lane::Max { n, v } => {
                    w.u64(*n);
                    w.f64(*v);
                }
                Lane::First(s) | Lane::Last(s) => match s {
                    None => w.u8(0),
                    Some(s) => {
                        w.u8(1);
                        w.i64(s.time);
                        w.u64(s.seq);
                        w.f64(s.value);
                    }
                },
                Lane::Stddev(s) => {
                    w.u64(s.n);
                    w.f64(s.mean);
                    w.f64(s.m2);
                }
                Lane::Distinct(set) => match set.as_deref() {
                    None => w.u8(0),
                    Some(DistinctSet::Overflow) => w.u8(2),
                    Some(DistinctSet::Values(values)) => {
                        w.u8(1);
                        w.u32(values.len() as u32);
                        for v in values {
                            match v {
                                DistinctKey::F64(b) => {
                                    w.u8(0);
                                    w.u64(*b);
                                }
                                DistinctKey::I64(i) => {
                                    w.u8(1);
                                    w.i64(*i);
                                }
                                DistinctKey::Str(s) => {
                                    w.u8(2);
                                    w.bytes(s.as_bytes());
                                }
                                DistinctKey::Bool(b) => {
                                    w.u8(3);
                                    w.u8(u8::from(*b));
                                }
                            }
                        }
                    }
                },
            }
        }
    }

    pub fn decode(slots: &[FeatureSlot], r: &mut Reader<'_>) -> Result<Acc, CodecError> {
        let count = r.u64()?;
        let mut lanes = SmallVec::with_capacity(slots.len());
        for slot in slots {
            let lane = match slot.agg {
                AggKind::Count => Lane::Count,
                AggKind::Sum => Lane::Sum {
                    n: r.u64()?,
                    sum: r.f64()?,
                },
                AggKind::Mean => Lane::Mean {
                    n: r.u64()?,
                    sum: r.f64()?,
                },
                AggKind::Min => Lane::Min {
                    n: r.u64()?,
                    v: r.f64()?,
                },
                AggKind::Max => Lane::Max {
                    n: r.u64()?,
                    v: r.f64()?,
                },
                AggKind::First | AggKind::Last => {
                    let s = match r.u8()? {
                        0 => None,
                        1 => Some(Stamped {
                            time: r.i64()?,
                            seq: r.u64()?,
                            value: r.f64()?,
                        }),
                        t => return Err(CodecError(format!("bad first/last tag {t}"))),
                    };
                    if slot.agg == AggKind::First {
                        Lane::First(s)
                    } else {
                        Lane::Last(s)
                    }
                }
                AggKind::Stddev => Lane::Stddev(Welford {
                    n: r.u64()?,
                    mean: r.f64()?,
                    m2: r.f64()?,
                }),
                AggKind::DistinctCount => Lane::Distinct(match r.u8()? {
                    0 => None,
                    2 => Some(Box::new(DistinctSet::Overflow)),
                    1 => {
                        let len = r.u32()? as usize;
                        let mut values = HashSet::with_capacity(len.min(slot.max_distinct));
                        for _ in 0..len {
                            values.insert(match r.u8()? {
                                0 => DistinctKey::F64(r.u64()?),
                                1 => DistinctKey::I64(r.i64()?),
                                2 => DistinctKey::Str(Arc::from(
                                    std::str::from_utf8(r.bytes()?)
                                        .map_err(|e| CodecError(format!("distinct value: {e}")))?,
                                )),
                                3 => DistinctKey::Bool(r.u8()? != 0),
                                t => return Err(CodecError(format!("bad distinct tag {t}"))),
                            });
                        }
                        Some(Box::new(DistinctSet::Values(values)))
                    }
                    t => return Err(CodecError(format!("bad distinct set tag {t}"))),
                }),
            };
            lanes.push(lane);
        }
        Ok(Acc { count, lanes })
    }
}

/// The distinct count over several slices' lane `i`: `None` if any slice
/// overflowed its bound.
pub fn distinct_value<'a>(accs: impl Iterator<Item = &'a Acc>, i: usize) -> Option<Value> {
    let mut scratch: HashSet<&'a DistinctKey> = HashSet::new();
    for acc in accs {
        match acc.lanes.get(i) {
            Some(Lane::Distinct(Some(set))) => match &**set {
                DistinctSet::Overflow => return None,
                DistinctSet::Values(values) => scratch.extend(values.iter()),
            },
            _ => continue,
        }
    }
    Some(Value::Int(scratch.len() as i64))
}
