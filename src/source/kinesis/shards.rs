//! Which shards may be read now: the KCL's parent-before-child rule.
//!
//! After a split or a merge, records of one partition key continue in a child
//! shard. To keep per-key order, a child is read only once every parent that
//! still exists reached SHARD_END *and* its last records were handed to the
//! pipeline (whose channel is FIFO, so they are processed first). A parent no
//! longer listed (trimmed past retention) does not hold its children back.
//!
//! The graph only grows while a run lasts: shards come from `ListShards`
//! (periodically) and from the `ChildShards` of a finished subscription
//! (immediately, so that a child starts without waiting for the next refresh).

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Done,
}

#[derive(Debug)]
struct Node {
    parents: Vec<String>,
    state: State,
}

#[derive(Debug, Default)]
pub struct ShardGraph {
    nodes: BTreeMap<String, Node>,
}

impl ShardGraph {
    /// Adds a shard, or ignores it when it is known. Parents are the
    /// `ParentShardId` and `AdjacentParentShardId` of the shard.
    /// Returns whether the shard is new.
    pub fn add(&mut self, shard: &str, parents: impl IntoIterator<Item = String>) -> bool {
        if self.nodes.contains_key(shard) {
            return false;
        }
        self.nodes.insert(
            shard.to_owned(),
            Node {
                parents: parents.into_iter().filter(|p| !p.is_empty()).collect(),
                state: State::Waiting,
            },
        );
        true
    }

    /// Shards that may start now, marked running, each with whether one of
    /// its parents is known (and so was read to its end first). Sorted by
    /// shard id, so that start-up is deterministic.
    pub fn take_ready(&mut self) -> Vec<(String, bool)> {
        let ready: Vec<(String, bool)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == State::Waiting)
            .filter(|(_, n)| {
                n.parents.iter().all(|p| match self.nodes.get(p) {
                    Some(parent) => parent.state == State::Done,
                    None => true,
                })
            })
            .map(|(id, n)| {
                let known_parent = n.parents.iter().any(|p| self.nodes.contains_key(p));
                (id.clone(), known_parent)
            })
            .collect();
        for (id, _) in &ready {
            if let Some(n) = self.nodes.get_mut(id) {
                n.state = State::Running;
            }
        }
        ready
    }

    /// The shard reached SHARD_END and everything it held was handed on.
    pub fn finish(&mut self, shard: &str) {
        if let Some(n) = self.nodes.get_mut(shard) {
            n.state = State::Done;
        }
    }

    pub fn running(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.state == State::Running)
            .count()
    }

    /// Shards waiting for a parent, for the log.
    pub fn waiting(&self) -> BTreeSet<&str> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == State::Waiting)
            .map(|(id, _)| id.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn ids(ready: Vec<(String, bool)>) -> Vec<String> {
        ready.into_iter().map(|(id, _)| id).collect()
    }

    #[test]
    fn children_wait_for_every_parent() {
        let mut g = ShardGraph::default();
        g.add("a", s(&[]));
        g.add("b", s(&[]));
        g.add("c", s(&["a"])); // split of a
        g.add("m", s(&["c", "b"])); // merge of c and b
        assert_eq!(
            g.take_ready(),
            vec![("a".to_string(), false), ("b".to_string(), false)]
        );
        assert!(g.take_ready().is_empty());
        g.finish("b");
        assert!(g.take_ready().is_empty(), "m still waits for c");
        g.finish("a");
        assert_eq!(g.take_ready(), vec![("c".to_string(), true)]);
        g.finish("c");
        assert_eq!(ids(g.take_ready()), s(&["m"]));
        assert_eq!(g.running(), 1);
    }

    #[test]
    fn trimmed_parents_do_not_block() {
        let mut g = ShardGraph::default();
        g.add("child", s(&["gone", ""]));
        assert_eq!(g.take_ready(), vec![("child".to_string(), false)]);
    }

    #[test]
    fn adding_twice_keeps_state() {
        let mut g = ShardGraph::default();
        g.add("a", s(&[]));
        assert_eq!(ids(g.take_ready()), s(&["a"]));
        g.add("a", s(&[]));
        assert!(g.take_ready().is_empty());
        assert!(g.waiting().is_empty());
    }
}
