//! Which worker serves a key, for the online API: the lease worker's view
//! of the table (each shard's hash range, holder and its API address),
//! refreshed at every listing and whenever a shard starts or stops here.
//!
//! A key is answered here only while this worker *reads* the key's shard:
//! its state is in this engine. While a shard is being restored, or has no
//! holder (between a release and the next take), its keys are `Moving`
//! (503, retry); a shard another worker holds sends its keys there (307).

use std::collections::HashSet;
use std::sync::RwLock;

use super::lease::{Checkpoint, Lease};
use crate::online::{KeyRouter, Route};
use crate::state::{hash_key, HashRange};

/// See the module doc.
pub struct Directory {
    me: String,
    entries: RwLock<Vec<Entry>>,
}

struct Entry {
    shard: String,
    range: HashRange,
    holder: Option<String>,
    address: Option<String>,
    here: bool,
}

impl Directory {
    pub fn new(me: impl Into<String>) -> Directory {
        Directory {
            me: me.into(),
            entries: RwLock::new(Vec::new()),
        }
    }

    /// A new listing of the table; `serving` the shards read here now.
    pub fn listed(&self, leases: &[Lease], serving: &HashSet<String>) {
        let entries = leases
            .iter()
            .filter(|l| l.checkpoint != Checkpoint::ShardEnd)
            .filter_map(|l| {
                let r = l.hash_key_range?;
                Some(Entry {
                    shard: l.lease_key.clone(),
                    range: HashRange {
                        start: r.start,
                        end: r.end,
                    },
                    holder: l.actual_owner().map(str::to_owned),
                    address: l.owner_address.clone(),
                    here: serving.contains(&l.lease_key),
                })
            })
            .collect();
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = entries;
    }

    /// A shard started (`here`) or stopped being read here.
    pub fn serving(&self, shard: &str, here: bool) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        for e in entries.iter_mut().filter(|e| e.shard == shard) {
            e.here = here;
            if !here && e.holder.as_deref() == Some(&self.me) {
                e.holder = None;
            }
        }
    }
}

impl KeyRouter for Directory {
    fn route(&self, key: &str) -> Route {
        let hash = hash_key(key);
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let Some(e) = entries.iter().find(|e| e.range.contains(&hash)) else {
            return Route::Moving("no lease holds this key's shard yet".into());
        };
        if e.here {
            return Route::Local;
        }
        match (&e.holder, &e.address) {
            (Some(h), _) if *h == self.me => {
                Route::Moving(format!("shard {} is being restored here", e.shard))
            }
            (Some(_), Some(address)) => Route::Owner(address.clone()),
            (Some(h), None) => Route::Moving(format!(
                "shard {} is held by {h}, whose API address is not in its lease",
                e.shard
            )),
            (None, _) => Route::Moving(format!("shard {} is between holders", e.shard)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::lease::HashKeyRange;

    fn lease(key: &str, range: (u128, u128), owner: Option<&str>, address: Option<&str>) -> Lease {
        let mut l = Lease::new(key, Checkpoint::TrimHorizon);
        l.hash_key_range = Some(HashKeyRange {
            start: range.0,
            end: range.1,
        });
        l.owner = owner.map(str::to_owned);
        l.owner_address = address.map(str::to_owned);
        l
    }

    #[test]
    fn keys_go_to_the_worker_that_reads_their_shard() {
        let mid = u128::MAX / 2;
        let d = Directory::new("a");
        let leases = [
            lease("s0", (0, mid), Some("a"), Some("http://a:1")),
            lease("s1", (mid + 1, u128::MAX), Some("b"), Some("http://b:1")),
        ];
        let key_in = |lo: u128, hi: u128| {
            (0..1000)
                .map(|i| format!("u{i}"))
                .find(|k| (lo..=hi).contains(&u128::from_be_bytes(hash_key(k))))
                .unwrap()
        };
        let (ka, kb) = (key_in(0, mid), key_in(mid + 1, u128::MAX));
        assert!(
            matches!(d.route(&ka), Route::Moving(_)),
            "nothing listed yet"
        );
        d.listed(&leases, &HashSet::new());
        assert!(matches!(d.route(&ka), Route::Moving(m) if m.contains("restored")));
        assert_eq!(d.route(&kb), Route::Owner("http://b:1".into()));
        d.serving("s0", true);
        assert_eq!(d.route(&ka), Route::Local);
        d.serving("s0", false);
        assert!(matches!(d.route(&ka), Route::Moving(m) if m.contains("between")));
    }
}
