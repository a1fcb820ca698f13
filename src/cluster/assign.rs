//! Which leases a worker takes, from one listing of the table: expired
//! leases first, up to an even share, then at most one steal from the
//! busiest worker. A pure function of the listing, what this worker
//! observed of each counter, and what it holds, so it is tested alone.
//!
//! * **Expired** is judged by this worker's clock only: a lease whose
//!   counter has not moved for `failover_time` since this worker first saw
//!   that value (KCL's rule; clocks are never compared across machines), or
//!   a lease with no owner at all. A new worker therefore waits one
//!   `failover_time` before it takes a silent worker's leases.
//! * **Ready**: a lease whose parents all reached `SHARD_END` (or whose
//!   parents have no lease any more). A child never starts before its
//!   parents are done, wherever they ran.
//! * **Even share**: `ceil(open leases / live workers)`, live workers being
//!   the holders of unexpired leases and this one.
//! * **Steal** only when no lease is free, this worker is under its share,
//!   and the busiest worker holds at least two more leases than this one;
//!   one at a time, through a graceful handoff.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::lease::{Checkpoint, Lease};

/// When this worker first saw each lease's current counter.
#[derive(Debug, Default)]
pub struct Observed(HashMap<String, (u64, Instant)>);

impl Observed {
    /// Notes the counters of a listing made at `now`; forgets leases gone.
    pub fn note(&mut self, leases: &[Lease], now: Instant) {
        let keys: HashSet<&str> = leases.iter().map(|l| l.lease_key.as_str()).collect();
        self.0.retain(|k, _| keys.contains(k.as_str()));
        for l in leases {
            match self.0.get_mut(&l.lease_key) {
                Some((counter, since)) if *counter == l.counter => {
                    let _ = since;
                }
                _ => {
                    self.0.insert(l.lease_key.clone(), (l.counter, now));
                }
            }
        }
    }

    /// Whether `lease` is expired at `now`: unowned, or its counter still
    /// for `failover_time`.
    pub fn expired(&self, lease: &Lease, now: Instant, failover_time: Duration) -> bool {
        if lease.actual_owner().is_none() {
            return true;
        }
        match self.0.get(&lease.lease_key) {
            Some((counter, since)) if *counter == lease.counter => {
                now.saturating_duration_since(*since) >= failover_time
            }
            _ => false,
        }
    }
}

/// What the worker should do after a listing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Expired leases to take, in order.
    pub take: Vec<String>,
    /// A lease to ask its holder for (graceful handoff).
    pub steal: Option<String>,
    /// Leases that are this worker's in the table but not held here (a
    /// handoff to this worker completed): start them.
    pub adopt: Vec<String>,
    /// The even share.
    pub target: usize,
}

/// The inputs of [`plan`] besides the listing.
pub struct View<'a> {
    pub me: &'a str,
    /// Leases this worker holds (or is acquiring or releasing).
    pub held: &'a HashSet<String>,
    pub observed: &'a Observed,
    pub now: Instant,
    pub failover_time: Duration,
    /// A steal asked for and not yet completed.
    pub steal_pending: bool,
}

/// Whether every parent of `lease` is done: at `SHARD_END`, or without a
/// lease (trimmed from the stream, and its lease deleted).
pub fn parents_done(lease: &Lease, by_key: &BTreeMap<&str, &Lease>) -> bool {
    lease.parent_shard_ids.iter().all(|p| {
        by_key
            .get(p.as_str())
            .is_none_or(|l| l.checkpoint == Checkpoint::ShardEnd)
    })
}

/// Where `key` comes in `worker`'s order of taking: a hash of both, so
/// stable for a worker and different between workers.
fn take_order(worker: &str, key: &str) -> [u8; 16] {
    crate::state::hash_key(&format!("{worker}\u{0}{key}"))
}

pub fn plan(leases: &[Lease], v: &View<'_>) -> Plan {
    let by_key: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
    let open: Vec<&Lease> = leases
        .iter()
        .filter(|l| l.checkpoint != Checkpoint::ShardEnd)
        .collect();
    let expired = |l: &Lease| v.observed.expired(l, v.now, v.failover_time);

    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    load.insert(v.me, 0);
    for l in &open {
        if let Some(owner) = l.actual_owner() {
            if !expired(l) && owner != v.me {
                *load.entry(owner).or_default() += 1;
            }
        }
    }
    let mine = v.held.len();
    let workers = load.len().max(1);
    let target = open.len().div_ceil(workers);

    let mut plan = Plan {
        target,
        ..Plan::default()
    };
    for l in &open {
        if l.actual_owner() == Some(v.me)
            && !l.handoff_pending()
            && !v.held.contains(&l.lease_key)
            && parents_done(l, &by_key)
        {
            plan.adopt.push(l.lease_key.clone());
        }
    }
    let mut have = mine + plan.adopt.len();
    let mut candidates: Vec<&&Lease> = open
        .iter()
        .filter(|l| {
            !v.held.contains(&l.lease_key)
                && l.actual_owner() != Some(v.me)
                && expired(l)
                && parents_done(l, &by_key)
        })
        .collect();
    // In an order of this worker's own (a child's parents are never
    // candidates with it, as a child waits for SHARD_END): workers that
    // start together, or survive the same crash, race for different leases
    // instead of all for the first (KCL shuffles for the same reason).
    candidates.sort_by_cached_key(|l| take_order(v.me, &l.lease_key));
    for l in candidates.iter() {
        if have >= target {
            break;
        }
        plan.take.push(l.lease_key.clone());
        have += 1;
    }
    if plan.take.is_empty() && candidates.is_empty() && have < target && !v.steal_pending {
        let busiest = load
            .iter()
            .filter(|(w, _)| **w != v.me)
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)));
        if let Some((&victim, &count)) = busiest {
            if count >= have + 2 {
                plan.steal = open
                    .iter()
                    .filter(|l| {
                        l.actual_owner() == Some(victim)
                            && !l.handoff_pending()
                            && !expired(l)
                            && parents_done(l, &by_key)
                    })
                    .map(|l| l.lease_key.clone())
                    .max();
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, owner: Option<&str>, counter: u64) -> Lease {
        let mut l = Lease::new(key, Checkpoint::TrimHorizon);
        l.owner = owner.map(str::to_owned);
        l.counter = counter;
        l
    }

    fn view<'a>(
        me: &'a str,
        held: &'a HashSet<String>,
        observed: &'a Observed,
        now: Instant,
    ) -> View<'a> {
        View {
            me,
            held,
            observed,
            now,
            failover_time: Duration::from_secs(10),
            steal_pending: false,
        }
    }

    #[test]
    fn unowned_leases_are_taken_up_to_the_even_share() {
        let leases: Vec<Lease> = (0..8).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        let mut observed = Observed::default();
        let now = Instant::now();
        observed.note(&leases, now);
        let held = HashSet::new();
        let p = plan(&leases, &view("a", &held, &observed, now));
        assert_eq!(p.target, 8, "alone: every lease");
        assert_eq!(p.take.len(), 8);
    }

    #[test]
    fn workers_race_for_free_leases_in_different_orders() {
        let leases: Vec<Lease> = (0..8).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        let mut observed = Observed::default();
        let now = Instant::now();
        observed.note(&leases, now);
        let held = HashSet::new();
        let a = plan(&leases, &view("a", &held, &observed, now)).take;
        assert_eq!(
            a,
            plan(&leases, &view("a", &held, &observed, now)).take,
            "stable"
        );
        let firsts: HashSet<String> = ["a", "b", "c", "d"]
            .iter()
            .map(|w| plan(&leases, &view(w, &held, &observed, now)).take[0].clone())
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
    }

    #[test]
    fn a_live_owner_is_waited_for_and_a_silent_one_expires() {
        let leases = vec![lease("s0", Some("b"), 5), lease("s1", Some("b"), 7)];
        let mut observed = Observed::default();
        let t0 = Instant::now();
        observed.note(&leases, t0);
        let held = HashSet::new();
        let p = plan(
            &leases,
            &view("a", &held, &observed, t0 + Duration::from_secs(9)),
        );
        assert!(p.take.is_empty(), "{p:?}");
        // s1's counter moved meanwhile: only s0 is silent.
        let later = vec![lease("s0", Some("b"), 5), lease("s1", Some("b"), 8)];
        observed.note(&later, t0 + Duration::from_secs(5));
        let p = plan(
            &later,
            &view("a", &held, &observed, t0 + Duration::from_secs(11)),
        );
        assert_eq!(p.take, vec!["s0".to_owned()]);
    }

    #[test]
    fn a_child_waits_for_its_parents() {
        let mut parent = lease("p", Some("b"), 1);
        let mut child = lease("c", None, 0);
        child.parent_shard_ids.insert("p".into());
        let mut observed = Observed::default();
        let now = Instant::now();
        observed.note(&[parent.clone(), child.clone()], now);
        let held = HashSet::new();
        let p = plan(
            &[parent.clone(), child.clone()],
            &view("a", &held, &observed, now),
        );
        assert!(p.take.is_empty(), "{p:?}");
        parent.checkpoint = Checkpoint::ShardEnd;
        let p = plan(&[parent, child], &view("a", &held, &observed, now));
        assert_eq!(p.take, vec!["c".to_owned()]);
    }

    #[test]
    fn one_steal_from_the_busiest_when_nothing_is_free() {
        let leases: Vec<Lease> = (0..6)
            .map(|i| lease(&format!("s{i}"), Some("b"), 1))
            .collect();
        let mut observed = Observed::default();
        let now = Instant::now();
        observed.note(&leases, now);
        let held = HashSet::new();
        let p = plan(&leases, &view("a", &held, &observed, now));
        assert_eq!(p.target, 3);
        assert!(p.take.is_empty());
        assert_eq!(p.steal.as_deref(), Some("s5"));
        let mut v = view("a", &held, &observed, now);
        v.steal_pending = true;
        assert_eq!(plan(&leases, &v).steal, None, "one at a time");
    }

    #[test]
    fn balanced_workers_do_not_steal() {
        // 8 leases over a (3), b (3), c (2): nobody is two above anybody.
        let owners = ["a", "a", "a", "b", "b", "b", "c", "c"];
        let leases: Vec<Lease> = owners
            .iter()
            .enumerate()
            .map(|(i, o)| lease(&format!("s{i}"), Some(o), 1))
            .collect();
        let mut observed = Observed::default();
        let now = Instant::now();
        observed.note(&leases, now);
        let held: HashSet<String> = ["s6", "s7"].map(String::from).into();
        let p = plan(&leases, &view("c", &held, &observed, now));
        assert_eq!(
            p,
            Plan {
                target: 3,
                ..Plan::default()
            }
        );
    }

    #[test]
    fn a_completed_handoff_is_adopted() {
        let leases = vec![lease("s0", Some("a"), 3)];
        let mut observed = Observed::default();
        let now = Instant::now();
        observed.note(&leases, now);
        let held = HashSet::new();
        let p = plan(&leases, &view("a", &held, &observed, now));
        assert_eq!(p.adopt, vec!["s0".to_owned()]);
        assert!(p.take.is_empty());
    }
}
