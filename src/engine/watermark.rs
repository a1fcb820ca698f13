//! Per-partition watermarks and the pipeline watermark (Flink semantics).
//!
//! `W_p = max event time seen in p − max_out_of_orderness − 1`. The pipeline
//! watermark is the minimum of `W_p` over the partitions that are known and
//! not idle, and it never goes backwards.
//!
//! **A partition holds the watermark from the moment the source knows it**,
//! not from its first event: a source announces every partition it will read
//! ([`PartitionStatus::Known`]: every shard `ListShards` returned, every file,
//! every generator partition) before any record, so a Kinesis catch-up from
//! `trim_horizon` cannot let the first shard drained move event time past
//! the records the other shards have yet to deliver. A known partition with
//! no event yet holds the watermark at −∞.
//!
//! **Idleness counts only while the partition can deliver.** Its idle clock
//! starts when the source says it is [`PartitionStatus::Reading`] (a
//! subscription started, a file opened), restarts with each of its events,
//! and stops while the source cannot read it ([`PartitionStatus::Known`]
//! again: resubscribing after an error or a stall, a child shard waiting for
//! its parents). A partition with no event for `idle_timeout` of that clock
//! stops holding the watermark until it receives again; if every partition
//! is idle the watermark stays where it is. The processing time the engine
//! is given excludes the time the pipeline spent backpressured (see
//! `pipeline.rs`), so a partition is never idle because the pipeline made it
//! wait. [`PartitionStatus::Finished`] (SHARD_END, announced after the
//! children; a file read to its end) removes the partition.
//!
//! **Per-shard mode** (a Kinesis source, [`Watermarks::per_shard`]): each
//! partition also keeps its *own* watermark, `W_p` never backwards, which
//! governs the windows of the keys in its hash key range (the engine's timer
//! domains: a key's timers live in the domain of the shard its MD5 falls
//! in). The pipeline watermark above still exists, for keys no shard's range
//! holds ([`GLOBAL`]) and for gauges. A finished shard is kept, flagged, so
//! indexes stay stable; the open shards overlapping its range (its children)
//! are raised to its watermark, and the engine moves its keys' timers to
//! them. An idle shard is raised to the lowest watermark of the shards still
//! delivering. Which partitions' own watermarks moved is kept for the engine
//! ([`Watermarks::drain_changed`]) so it fires only those domains.
//!
//! A partition a source never announced (tests that drive the engine
//! directly) is known from its first event, with its clock started there.
//! After a restore, partitions come back with their maximum event times and
//! a clock that starts at the first processing time the engine sees, unless
//! the source announces them first (it does, before its first record): then
//! they hold until their reading starts again, so a restart does not let the
//! watermark race ahead either.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::record::PartitionStatus;
use crate::state::HashRange;
use crate::time::Millis;

/// The timers' domain of keys no shard's range holds (and of every key
/// outside per-shard mode): they follow the pipeline watermark.
pub const GLOBAL: u32 = u32::MAX;

/// Where a partition's idle clock stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IdleClock {
    /// Restored and not yet announced: starts at the next processing time seen.
    #[default]
    Unstarted,
    /// The source cannot deliver from it now: never idle.
    Stopped,
    /// Processing time of its last event, or of when its reading started.
    Since(Millis),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionMark {
    pub name: Arc<str>,
    pub max_event_time: Millis,
    /// Per-shard mode: the shard's hash key range (its keys' windows follow
    /// its watermark), once the source said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<HashRange>,
    /// Per-shard mode: the shard's own watermark (never backwards).
    #[serde(default = "minus_infinity")]
    pub own: Millis,
    /// Per-shard mode: read to its end or released; kept so that partition
    /// indexes (the timers' domains) stay stable for the run.
    #[serde(default)]
    pub finished: bool,
    #[serde(skip)]
    pub clock: IdleClock,
}

fn minus_infinity() -> Millis {
    Millis::MIN
}

impl PartitionMark {
    fn new(name: Arc<str>, clock: IdleClock) -> PartitionMark {
        PartitionMark {
            name,
            max_event_time: Millis::MIN,
            range: None,
            own: Millis::MIN,
            finished: false,
            clock,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Watermarks {
    out_of_orderness: Millis,
    idle_timeout: Millis,
    partitions: Vec<PartitionMark>,
    current: Millis,
    /// Index of the partition of the previous event (most events repeat it).
    last: usize,
    /// Replay: the watermark comes from the archive (see [`Watermarks::advance_to`]).
    archived: bool,
    /// Per-shard mode (see the module doc): each partition's `own`
    /// watermark governs the keys of its hash range.
    per_shard: bool,
    /// Per-shard mode: partitions whose own watermark advanced since the
    /// engine last asked ([`Watermarks::drain_changed`]).
    changed: Vec<usize>,
    /// The processing time of the last [`recompute`](Self::recompute), as
    /// long as nothing it reads has changed since: an event that moves
    /// nothing at that same time (a batch shares one) then skips the walk
    /// over every partition. Any other change clears it.
    settled_at: Option<Millis>,
}

impl Watermarks {
    pub fn new(out_of_orderness: Millis, idle_timeout: Millis) -> Watermarks {
        Watermarks {
            out_of_orderness,
            idle_timeout,
            partitions: Vec::new(),
            current: Millis::MIN,
            last: 0,
            archived: false,
            per_shard: false,
            changed: Vec::new(),
            settled_at: None,
        }
    }

    /// Per-shard mode: a shard's watermark governs the windows of the keys
    /// in its hash range.
    pub fn per_shard(mut self) -> Watermarks {
        self.per_shard = true;
        self
    }

    pub fn is_per_shard(&self) -> bool {
        self.per_shard
    }

    /// The watermark of domain `d`: a partition's own (per-shard mode), or
    /// the pipeline watermark for [`GLOBAL`].
    pub fn of(&self, d: u32) -> Millis {
        match self.partitions.get(d as usize) {
            Some(p) if d != GLOBAL => p.own,
            _ => self.current,
        }
    }

    /// Whether a partition's own watermark moved since the last
    /// [`drain_changed`](Self::drain_changed).
    pub fn any_changed(&self) -> bool {
        !self.changed.is_empty()
    }

    /// Calls `f` with each partition whose own watermark moved since the
    /// last call.
    pub fn drain_changed(&mut self, mut f: impl FnMut(u32)) {
        for i in self.changed.drain(..) {
            f(i as u32);
        }
    }

    /// Per-shard mode: the hash ranges of the open partitions that have one,
    /// with their indexes (the timers' domains).
    pub fn domains(&self) -> Vec<(HashRange, u32)> {
        self.partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.finished)
            .filter_map(|(i, p)| p.range.map(|r| (r, i as u32)))
            .collect()
    }

    /// Per-shard mode: the partition of the last observed event, and its
    /// hash range if the source told it.
    pub fn last_range(&self) -> Option<(u32, HashRange)> {
        if !self.per_shard {
            return None;
        }
        let p = self.partitions.get(self.last)?;
        Some((self.last as u32, p.range?))
    }

    /// Per-shard mode: the source said which hash keys `partition` holds.
    pub fn set_range(&mut self, partition: &Arc<str>, range: HashRange) {
        self.settled_at = None;
        let idx = self.index(partition, IdleClock::Stopped);
        self.partitions[idx].range = Some(range);
    }

    fn raise(&mut self, idx: usize, w: Millis) {
        let p = &mut self.partitions[idx];
        if w > p.own {
            p.own = w;
            if !self.changed.contains(&idx) {
                self.changed.push(idx);
            }
        }
    }

    /// Restores a checkpointed state.
    pub fn restore(&mut self, current: Millis, partitions: Vec<PartitionMark>) {
        self.settled_at = None;
        self.current = current;
        self.partitions = partitions;
        self.last = 0;
    }

    pub fn current(&self) -> Millis {
        self.current
    }

    pub fn partitions(&self) -> &[PartitionMark] {
        &self.partitions
    }

    fn index(&mut self, partition: &Arc<str>, clock: IdleClock) -> usize {
        match self.partitions.get(self.last) {
            Some(p) if Arc::ptr_eq(&p.name, partition) || p.name == *partition => self.last,
            _ => match self.partitions.iter().position(|p| p.name == *partition) {
                Some(i) => i,
                None => {
                    self.settled_at = None;
                    self.partitions
                        .push(PartitionMark::new(partition.clone(), clock));
                    self.partitions.len() - 1
                }
            },
        }
    }

    /// Step 4 for one event: advances its partition, then the pipeline
    /// watermark. Returns the (possibly unchanged) pipeline watermark.
    pub fn observe(&mut self, partition: &Arc<str>, event_time: Millis, now: Millis) -> Millis {
        let idx = self.index(partition, IdleClock::Since(now));
        self.last = idx;
        let p = &mut self.partitions[idx];
        let moved = p.clock != IdleClock::Since(now) || p.finished || event_time > p.max_event_time;
        p.clock = IdleClock::Since(now);
        p.finished = false;
        p.max_event_time = p.max_event_time.max(event_time);
        let max_event_time = p.max_event_time;
        if self.per_shard {
            let own = self.bound(max_event_time);
            self.raise(idx, own);
        } else if !moved && self.settled_at == Some(now) {
            return self.current;
        }
        self.recompute(now)
    }

    /// `W_p` of a partition that saw `max_event_time`.
    fn bound(&self, max_event_time: Millis) -> Millis {
        max_event_time
            .saturating_sub(self.out_of_orderness)
            .saturating_sub(1)
    }

    /// A source's word on one of its partitions (see the module docs).
    /// Returns the (possibly unchanged) pipeline watermark.
    pub fn status(&mut self, partition: &Arc<str>, status: PartitionStatus, now: Millis) -> Millis {
        match status {
            PartitionStatus::Known => {
                let idx = self.index(partition, IdleClock::Stopped);
                self.partitions[idx].clock = IdleClock::Stopped;
            }
            PartitionStatus::Reading => {
                let idx = self.index(partition, IdleClock::Since(now));
                self.partitions[idx].clock = IdleClock::Since(now);
            }
            PartitionStatus::Finished if self.per_shard => self.finish_shard(partition),
            PartitionStatus::Finished => {
                self.partitions.retain(|p| p.name != *partition);
                self.last = 0;
            }
        }
        self.recompute(now)
    }

    /// Per-shard mode: a shard read to its end. The open shards whose
    /// ranges overlap it (its children) start from its watermark; the
    /// engine moves its keys' timers to them.
    fn finish_shard(&mut self, partition: &Arc<str>) {
        self.settled_at = None;
        let Some(idx) = self.partitions.iter().position(|p| p.name == *partition) else {
            return;
        };
        self.partitions[idx].finished = true;
        let (own, range) = (self.partitions[idx].own, self.partitions[idx].range);
        let Some(range) = range else { return };
        let children: Vec<usize> = (0..self.partitions.len())
            .filter(|&i| {
                let q = &self.partitions[i];
                i != idx && !q.finished && q.range.is_some_and(|r| r.overlaps(&range))
            })
            .collect();
        for c in children {
            self.raise(c, own);
        }
    }

    /// Cluster mode: a shard acquired, at the maximum event time its last
    /// holder had reached. It holds like a known partition until it reads.
    pub fn adopt(
        &mut self,
        partition: &Arc<str>,
        range: HashRange,
        max_event_time: Option<Millis>,
        own: Option<Millis>,
    ) {
        self.settled_at = None;
        let idx = self.index(partition, IdleClock::Stopped);
        let p = &mut self.partitions[idx];
        p.clock = IdleClock::Stopped;
        p.finished = false;
        p.range = Some(range);
        if let Some(m) = max_event_time {
            p.max_event_time = p.max_event_time.max(m);
        }
        if self.per_shard {
            let bound = self.bound(self.partitions[idx].max_event_time);
            self.raise(idx, own.unwrap_or(Millis::MIN).max(bound));
        }
    }

    /// Cluster mode: a shard released. It stops holding the watermark; the
    /// next event or tick moves the watermark (nothing fires at the
    /// barrier that released it).
    pub fn forget(&mut self, partition: &Arc<str>) {
        self.settled_at = None;
        if self.per_shard {
            if let Some(p) = self.partitions.iter_mut().find(|p| p.name == *partition) {
                p.finished = true;
            }
            return;
        }
        self.partitions.retain(|p| p.name != *partition);
        self.last = 0;
    }

    /// Processing time passed: idle partitions stop holding the watermark.
    pub fn tick(&mut self, now: Millis) -> Millis {
        self.recompute(now)
    }

    /// Replay: the watermark the archived run had reached (never backwards).
    ///
    /// From the first call on, the watermark follows the archived one only:
    /// the live run knew partitions before their first records (and so held
    /// the watermark where a replay, seeing only records, would not), and
    /// its watermark after each record arrives with the next one.
    pub fn advance_to(&mut self, w: Millis) -> Millis {
        self.settled_at = None;
        self.archived = true;
        self.current = self.current.max(w);
        self.current
    }

    /// End of a bounded input: the watermark becomes +∞.
    pub fn finish(&mut self) -> Millis {
        self.settled_at = None;
        self.current = Millis::MAX;
        for i in 0..self.partitions.len() {
            if self.per_shard {
                self.raise(i, Millis::MAX);
            }
        }
        self.current
    }

    fn recompute(&mut self, now: Millis) -> Millis {
        if self.archived {
            return self.current;
        }
        let mut min: Option<Millis> = None;
        let mut idle = Vec::new();
        for (i, p) in self.partitions.iter_mut().enumerate() {
            if p.finished {
                continue;
            }
            let seen = match p.clock {
                IdleClock::Stopped => None,
                IdleClock::Since(t) => Some(t),
                IdleClock::Unstarted => {
                    p.clock = IdleClock::Since(now);
                    Some(now)
                }
            };
            if seen.is_some_and(|seen| now.saturating_sub(seen) >= self.idle_timeout) {
                idle.push(i);
                continue;
            }
            let w = p
                .max_event_time
                .saturating_sub(self.out_of_orderness)
                .saturating_sub(1);
            min = Some(min.map_or(w, |m| m.min(w)));
        }
        if let Some(m) = min {
            self.current = self.current.max(m);
            // Per-shard mode: an idle shard's keys follow the slowest shard
            // still delivering, as they would under the pipeline minimum.
            if self.per_shard {
                let floor = self
                    .partitions
                    .iter()
                    .enumerate()
                    .filter(|(i, p)| !p.finished && !idle.contains(i))
                    .map(|(_, p)| p.own)
                    .min();
                if let Some(floor) = floor {
                    for i in idle {
                        self.raise(i, floor);
                    }
                }
            }
        }
        self.settled_at = Some(now);
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skipping the walk over partitions for an event that moves nothing
    /// gives the watermarks a walk after every call gives, whatever the
    /// calls before.
    #[test]
    fn an_event_that_moves_nothing_changes_no_watermark() {
        let names: Vec<Arc<str>> = ["a", "b", "c"].map(Arc::from).to_vec();
        let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for case in 0..300 {
            let (mut fast, mut walked) = (Watermarks::new(5, 40), Watermarks::new(5, 40));
            let mut now = 0;
            for step in 0..200 {
                if next(4) == 0 {
                    now += next(30) as Millis;
                }
                let p = &names[next(3) as usize];
                let op = next(12);
                let t = 1_000 + next(50) as Millis + step;
                let status = [
                    PartitionStatus::Known,
                    PartitionStatus::Reading,
                    PartitionStatus::Finished,
                ][next(3) as usize];
                let apply = |w: &mut Watermarks| match op {
                    0 => w.status(p, status, now),
                    1 => w.tick(now),
                    2 => {
                        w.forget(p);
                        w.current()
                    }
                    _ => w.observe(p, t, now),
                };
                walked.settled_at = None;
                assert_eq!(
                    apply(&mut fast),
                    apply(&mut walked),
                    "case {case}, step {step}"
                );
            }
        }
    }

    #[test]
    fn minimum_over_active_partitions_and_idleness() {
        let mut w = Watermarks::new(5, 100);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert_eq!(w.observe(&a, 100, 0), 94);
        assert_eq!(w.observe(&b, 50, 10), 94, "never backwards");
        assert_eq!(w.observe(&a, 200, 20), 94, "b holds it back");
        assert_eq!(w.observe(&b, 120, 30), 114);
        assert_eq!(w.observe(&a, 210, 115), 114, "b not idle yet");
        assert_eq!(w.tick(130), 204, "b idle for 100ms");
        assert_eq!(
            w.observe(&b, 130, 140),
            204,
            "b active again, still monotone"
        );
        assert_eq!(w.tick(1_000), 204, "all idle: unchanged");
        assert_eq!(w.finish(), Millis::MAX);
    }

    #[test]
    fn a_known_partition_holds_from_its_announcement() {
        let mut w = Watermarks::new(0, 100);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        w.status(&a, PartitionStatus::Known, 0);
        w.status(&b, PartitionStatus::Known, 0);
        w.status(&a, PartitionStatus::Reading, 0);
        assert_eq!(
            w.observe(&a, 86_400_000, 1),
            Millis::MIN,
            "b has delivered nothing yet"
        );
        assert_eq!(w.tick(10_000), Millis::MIN, "b is not reading: never idle");
        w.status(&b, PartitionStatus::Reading, 10_000);
        assert_eq!(
            w.tick(10_050),
            Millis::MIN,
            "b's idle clock started at 10 000"
        );
        assert_eq!(w.observe(&b, 1_000, 10_060), 999);
        w.status(&b, PartitionStatus::Known, 10_070);
        assert_eq!(
            w.observe(&a, 86_400_001, 50_000),
            999,
            "resubscribing: b holds"
        );
        w.status(&b, PartitionStatus::Reading, 50_000);
        assert_eq!(w.observe(&a, 86_400_002, 50_099), 999);
        assert_eq!(
            w.tick(50_100),
            86_400_001,
            "b idle 100 ms after its reading restarted"
        );
    }

    #[test]
    fn a_finished_partition_stops_holding_after_its_children_are_known() {
        let mut w = Watermarks::new(0, 1_000);
        let (parent, child, other): (Arc<str>, Arc<str>, Arc<str>) =
            ("parent".into(), "child".into(), "other".into());
        for p in [&parent, &other] {
            w.status(p, PartitionStatus::Known, 0);
            w.status(p, PartitionStatus::Reading, 0);
        }
        w.observe(&parent, 100, 1);
        assert_eq!(w.observe(&other, 5_000, 2), 99);
        w.status(&child, PartitionStatus::Known, 3);
        assert_eq!(
            w.status(&parent, PartitionStatus::Finished, 3),
            99,
            "the child holds"
        );
        w.status(&child, PartitionStatus::Reading, 4);
        assert_eq!(w.observe(&child, 200, 5), 199);
        assert_eq!(w.partitions().len(), 2);
    }

    #[test]
    fn restored_partitions_hold_once_announced() {
        let restored = vec![PartitionMark {
            max_event_time: 1_000,
            ..PartitionMark::new("a".into(), IdleClock::default())
        }];
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut announced = Watermarks::new(0, 100);
        announced.restore(999, restored.clone());
        announced.status(&a, PartitionStatus::Known, 0);
        announced.observe(&b, 90_000, 0);
        assert_eq!(announced.tick(10_000), 999, "a holds until it reads again");
        let mut silent = Watermarks::new(0, 100);
        silent.restore(999, restored);
        assert_eq!(silent.observe(&b, 90_000, 0), 999);
        assert_eq!(
            silent.observe(&b, 90_000, 150),
            89_999,
            "never announced: idle after idle_timeout"
        );
    }
}
