//! The last position passed on per partition: what a barrier carries, and
//! so where a restart resumes each partition.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::record::Position;

/// The last position passed on, per partition (the decode stage's side of
/// the checkpoint: the positions its next barrier carries).
pub(crate) struct LastPositions(HashMap<Arc<str>, Position>);

impl LastPositions {
    /// Starting from the positions of the last committed checkpoint.
    pub(crate) fn new(resume_from: Vec<Position>) -> Self {
        LastPositions(
            resume_from
                .into_iter()
                .map(|p| (p.partition.clone(), p))
                .collect(),
        )
    }

    /// Notes a batch passed on. Barriers fall between batches, so only each
    /// partition's last position in the batch is ever read.
    pub(crate) fn note<'a>(&mut self, batch: impl DoubleEndedIterator<Item = &'a Position>) {
        note_last_positions(batch, &mut self.0);
    }

    /// Sets (or forgets) the position of one partition.
    pub(crate) fn reset(&mut self, partition: &Arc<str>, at: Option<Position>) {
        match at {
            Some(p) => {
                self.0.insert(partition.clone(), p);
            }
            None => {
                self.0.remove(partition);
            }
        }
    }

    /// Every partition's last position, ordered by partition.
    pub(crate) fn sorted(&self) -> Vec<Position> {
        let mut positions: Vec<Position> = self.0.values().cloned().collect();
        positions.sort_by(|a, b| a.partition.cmp(&b.partition));
        positions
    }
}

/// Records in `positions` the last position of each partition in `batch`:
/// one map update per partition, not one per record. A batch usually holds
/// records of a few partitions (a shard, an archive object), so the
/// partitions seen are kept in a short list compared by pointer first, and
/// in a set only when there are many.
fn note_last_positions<'a>(
    batch: impl DoubleEndedIterator<Item = &'a Position>,
    positions: &mut HashMap<Arc<str>, Position>,
) {
    const LIST_MAX: usize = 16;
    let mut list: Vec<&Arc<str>> = Vec::new();
    let mut set: HashSet<&str> = HashSet::new();
    for position in batch.rev() {
        let p = &position.partition;
        if list.iter().any(|s| Arc::ptr_eq(s, p) || s[..] == p[..]) {
            continue;
        }
        if list.len() < LIST_MAX {
            list.push(p);
        } else if !set.insert(&p[..]) {
            continue;
        }
        positions.insert(p.clone(), position.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RawRecord;

    /// The same positions as noting every record in order, for batches of
    /// a few partitions (the list) and of many (the set), with partition
    /// names shared and not shared.
    #[test]
    fn last_positions_match_noting_every_record() {
        for partitions in [1usize, 3, 16, 17, 40] {
            let names: Vec<Arc<str>> = (0..partitions).map(|p| format!("p{p}").into()).collect();
            let batch: Vec<RawRecord> = (0..500u64)
                .map(|i| {
                    let p = (i * 7 + i / 5) as usize % partitions;
                    // Every third record carries its own copy of the name.
                    let name = if i % 3 == 0 {
                        Arc::from(&names[p][..])
                    } else {
                        names[p].clone()
                    };
                    RawRecord {
                        position: Position::new(name, i.to_string()),
                        arrival: 0,
                        bytes: bytes::Bytes::new(),
                        replay_watermark: None,
                    }
                })
                .collect();
            let start: HashMap<Arc<str>, Position> =
                [(Arc::from("other"), Position::new("other".into(), "1"))]
                    .into_iter()
                    .collect();
            let mut every = start.clone();
            for raw in &batch {
                every.insert(raw.position.partition.clone(), raw.position.clone());
            }
            let mut last = start;
            note_last_positions(batch.iter().map(|r| &r.position), &mut last);
            assert_eq!(last, every, "{partitions} partitions");
        }
    }
}
