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

use crate::record::Key;
use crate::state::{hash_key, HashRange};

use super::operator::{Domains, Operator, Timers};
use super::watermark::GLOBAL;
use super::EngineError;

impl Domains {
    /// The domain of a key with this hash.
    pub(super) fn of(&self, hash: &[u8; 16]) -> u32 {
        if self.0.is_empty() {
            return GLOBAL;
        }
        let h = u128::from_be_bytes(*hash);
        let i = self.0.partition_point(|r| r.0 <= h);
        match i.checked_sub(1).map(|i| self.0[i]) {
            Some((start, end, d)) if start <= h && h <= end => d,
            _ => GLOBAL,
        }
    }
}

impl Operator {
    /// Adds the timers of `range` that the store holds. Returns how many.
    pub(super) fn adopt_range(&mut self, range: HashRange) -> Result<usize, EngineError> {
        self.store_may_have = true;
        let mut adopted = 0;
        for (due, spec, key) in self.store.load_timers_in(range)? {
            if usize::from(spec) >= self.specs.len() {
                return Err(EngineError::Corrupt(format!(
                    "timer for unknown window spec {spec}"
                )));
            }
            let hash = hash_key(&key);
            debug_assert!(range.contains(&hash));
            self.timers
                .entry((self.domains.of(&hash), due, spec))
                .or_default()
                .push_back(Key::from(key));
            adopted += 1;
        }
        Ok(adopted)
    }

    /// Per-shard mode: the open shards' ranges changed (`domains`, as
    /// [`Watermarks::domains`](super::Watermarks::domains) says). Every timer
    /// not in the domain its key now maps to moves there: the keys of a
    /// finished parent to its children, the keys restored before their
    /// shard was announced to it. Returns how many moved.
    pub(super) fn set_domains(&mut self, mut domains: Vec<(HashRange, u32)>) -> usize {
        domains.sort_by_key(|(r, _)| r.start);
        self.domains = Domains(
            domains
                .into_iter()
                .map(|(r, d)| (r.start, r.end, d))
                .collect(),
        );
        let mut moved = 0;
        let old = std::mem::take(&mut self.timers);
        let mut timers = Timers::new();
        for ((d, due, spec), keys) in old {
            for key in keys {
                let hash = match self.states.get(&*key) {
                    Some(entry) => entry.hash,
                    None => hash_key(&key),
                };
                let to = self.domains.of(&hash);
                moved += usize::from(to != d);
                timers.entry((to, due, spec)).or_default().push_back(key);
            }
        }
        self.timers = timers;
        moved
    }

    /// The timer domain of `key` (its hash from the cache, or computed).
    pub(super) fn domain_of_key(&self, key: &str) -> u32 {
        if self.domains.0.is_empty() {
            return GLOBAL;
        }
        match self.states.get(key) {
            Some(entry) => self.domains.of(&entry.hash),
            None => self.domains.of(&hash_key(key)),
        }
    }

    /// Drops every state and timer of `range`. The states must be clean
    /// with respect to a snapshot already taken. Returns how many keys left
    /// the cache.
    pub(super) fn forget_range(&mut self, range: HashRange) -> usize {
        let before = self.states.len();
        self.states.retain(|_, entry| !range.contains(&entry.hash));
        let mut hashes = std::collections::HashMap::<Key, bool>::new();
        let mut inside = |key: &Key| {
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
