//! Hash ranges moving in and out of the engine (cluster mode): a shard's
//! state is the keys whose MD5 falls in its hash range (see
//! [`crate::state::HashRange`]), so adopting or forgetting a shard is
//! adopting or forgetting a range of keys.
//!
//! * **Adopt** after the range was ingested into the store: the range's
//!   timers join the index (they are in the ingested `windows` records), and
//!   cache misses read the store from now on.
//! * **Forget** right after a snapshot took the range's last changes: its
//!   states leave the cache and its timers the index, so nothing here fires,
//!   purges or writes the range again; the next holder does.

use std::sync::Arc;

use crate::state::{hash_key, HashRange};

use super::operator::Operator;
use super::EngineError;

impl Operator {
    /// Adds the timers of `range` that the store holds. Returns how many.
    pub(super) fn adopt_range(&mut self, range: HashRange) -> Result<usize, EngineError> {
        self.store_may_have = true;
        let mut adopted = 0;
        for (due, spec, key) in self.store.load_timers()? {
            if usize::from(spec) >= self.specs.len() {
                return Err(EngineError::Corrupt(format!(
                    "timer for unknown window spec {spec}"
                )));
            }
            if range.contains(&hash_key(&key)) {
                self.timers
                    .entry((due, spec))
                    .or_default()
                    .push(Arc::from(key));
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// Drops every state and timer of `range`. The states must be clean
    /// with respect to a snapshot already taken. Returns how many keys left
    /// the cache.
    pub(super) fn forget_range(&mut self, range: HashRange) -> usize {
        let before = self.states.len();
        self.states.retain(|_, entry| !range.contains(&entry.hash));
        let mut hashes = std::collections::HashMap::<Arc<str>, bool>::new();
        let mut inside = |key: &Arc<str>| {
            *hashes
                .entry(key.clone())
                .or_insert_with(|| range.contains(&hash_key(key)))
        };
        for keys in self.timers.values_mut() {
            keys.retain(|k| !inside(k));
        }
        self.timers.retain(|_, keys| !keys.is_empty());
        self.dirty.retain(|(_, k)| !inside(k));
        self.refire.retain(|(_, k, _, _)| !inside(k));
        before - self.states.len()
    }
}
