//! Per-partition watermarks and the pipeline watermark (Flink semantics).
//!
//! `W_p = max event time seen in p − max_out_of_orderness − 1`. The pipeline
//! watermark is the minimum of `W_p` over the partitions seen so far that are
//! not idle, and it never goes backwards. A partition is known from its first
//! event on: before every partition of a source has delivered something, the
//! watermark is driven by those that have (as with Flink's per-split
//! watermarks), so a partition that starts late may find its first events
//! late. A partition with no event for `idle_timeout` of processing time
//! stops holding the watermark back until it receives again; if every known
//! partition is idle the watermark stays where it is.
//!
//! After a restore, partitions come back with their maximum event times and
//! their idle clocks start at the first processing time the engine sees.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::record::Millis;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionMark {
    pub name: Arc<str>,
    pub max_event_time: Millis,
    /// Processing time of the last event; `None` until seen after a restore.
    #[serde(skip)]
    pub last_seen: Option<Millis>,
}

#[derive(Clone, Debug)]
pub struct Watermarks {
    out_of_orderness: Millis,
    idle_timeout: Millis,
    partitions: Vec<PartitionMark>,
    current: Millis,
    /// Index of the partition of the previous event (most events repeat it).
    last: usize,
}

impl Watermarks {
    pub fn new(out_of_orderness: Millis, idle_timeout: Millis) -> Watermarks {
        Watermarks {
            out_of_orderness,
            idle_timeout,
            partitions: Vec::new(),
            current: Millis::MIN,
            last: 0,
        }
    }

    /// Restores a checkpointed state.
    pub fn restore(&mut self, current: Millis, partitions: Vec<PartitionMark>) {
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

    /// Step 4 for one event: advances its partition, then the pipeline
    /// watermark. Returns the (possibly unchanged) pipeline watermark.
    pub fn observe(&mut self, partition: &Arc<str>, event_time: Millis, now: Millis) -> Millis {
        let idx = match self.partitions.get(self.last) {
            Some(p) if Arc::ptr_eq(&p.name, partition) || p.name == *partition => self.last,
            _ => match self.partitions.iter().position(|p| p.name == *partition) {
                Some(i) => i,
                None => {
                    self.partitions.push(PartitionMark {
                        name: partition.clone(),
                        max_event_time: Millis::MIN,
                        last_seen: None,
                    });
                    self.partitions.len() - 1
                }
            },
        };
        self.last = idx;
        let p = &mut self.partitions[idx];
        p.last_seen = Some(now);
        p.max_event_time = p.max_event_time.max(event_time);
        self.recompute(now)
    }

    /// Processing time passed: idle partitions stop holding the watermark.
    pub fn tick(&mut self, now: Millis) -> Millis {
        self.recompute(now)
    }

    /// Replay: the watermark the archived run had reached (never backwards).
    pub fn advance_to(&mut self, w: Millis) -> Millis {
        self.current = self.current.max(w);
        self.current
    }

    /// End of a bounded input: the watermark becomes +∞.
    pub fn finish(&mut self) -> Millis {
        self.current = Millis::MAX;
        self.current
    }

    fn recompute(&mut self, now: Millis) -> Millis {
        let mut min: Option<Millis> = None;
        for p in &mut self.partitions {
            let seen = *p.last_seen.get_or_insert(now);
            if now.saturating_sub(seen) >= self.idle_timeout {
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
        }
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
