//! Hash ranges of the stored state: state built by the engine from random
//! events, split into the ranges of equal Kinesis shards, exported and
//! ingested into fresh stores, comes back whole, entry for entry; so do
//! the ranges of merged shards; deleting a range leaves the others.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use proptest::prelude::*;
use shardflow::config::Config;
use shardflow::engine::{Engine, EngineOptions};
use shardflow::state::{codec, hash_key, Cf, HashRange, StateStore};

/// The column families a range spans.
const RANGE_CFS: [Cf; 2] = [Cf::Windows, Cf::Slices];

/// Every entry of the range column families, by column family and key.
type Entries = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;

fn entries(store: &StateStore, range: HashRange) -> Entries {
    let mut out = Entries::new();
    for cf in RANGE_CFS {
        store
            .scan_range(cf, range, |k, v| {
                out.insert((cf, k.to_vec()), v.to_vec());
            })
            .expect("entries");
    }
    out
}

/// The hash a stored key starts with.
fn hash_of(key: &[u8]) -> &[u8; 16] {
    key[..16].try_into().expect("a key starts with a hash")
}

fn in_range(entries: &Entries, range: HashRange) -> Entries {
    entries
        .iter()
        .filter(|((_, k), _)| range.contains(hash_of(k)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The ranges of a stream of `n` (a power of two) shards of equal size, as
/// Kinesis creates them.
fn shards(n: u32) -> Vec<HashRange> {
    let size = (u128::MAX >> n.trailing_zeros()) + 1;
    (0..u128::from(n))
        .map(|i| HashRange {
            start: i * size,
            end: i * size + (size - 1),
        })
        .collect()
}

/// Raw material for one event: key, clock advance, lag, amount, merchant,
/// and a checkpoint after it.
type Raw = (u8, i64, i64, Option<i32>, u8, bool);

fn raw() -> impl Strategy<Value = Raw> {
    (
        any::<u8>(),
        0i64..8,
        prop_oneof![3 => 0i64..10, 1 => 0i64..80],
        proptest::option::weighted(0.8, 0i32..20),
        0u8..6,
        proptest::bool::weighted(0.15),
    )
}

fn steps(raws: &[Raw]) -> Vec<Step> {
    let mut clock = 0;
    let mut out = Vec::new();
    for (i, &(key, advance, lag, amount, merchant, checkpoint)) in raws.iter().enumerate() {
        clock += advance;
        out.push(Step::Event(In {
            partition: 0,
            seq: i as u32,
            key,
            time: 1_000 + clock - lag,
            amount,
            merchant,
        }));
        if checkpoint {
            out.push(Step::Checkpoint { deferred: false });
        }
    }
    out.push(Step::Checkpoint { deferred: false });
    out
}

/// The store after the engine ran `steps` with every checkpoint committed.
fn built(dir: &Path, config: &Config, steps: &[Step], inline_max: usize) -> StateStore {
    let store = open(dir, config);
    let engine = Engine::with_options(
        config,
        store.clone(),
        EngineOptions {
            cache_capacity: 8,
            inline_record_max: inline_max,
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    let mut driver = Driver::new(engine, store.clone(), 0);
    let mut outputs = Vec::new();
    for step in steps {
        driver.step(step, &mut outputs);
    }
    driver.commit_queued();
    store
}

/// A fresh store with `files` ingested.
fn ingested(dir: &Path, config: &Config, files: &[PathBuf]) -> StateStore {
    let store = open(dir, config);
    store.ingest_range(files).expect("ingest");
    store
}

fn check(steps: &[Step], inline_max: usize, deleted: usize) {
    let config = config(10, 1_000_000, 30, ALL_FEATURES);
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |name: String| dir.path().join(name);
    let store = built(&at("original".into()), &config, steps, inline_max);
    let original = entries(&store, HashRange::ALL);
    // Every key starts with the hash Kinesis routes its entity key by.
    for (cf, k) in original.keys() {
        let key = match cf {
            Cf::Windows => codec::parse_key_prefix(k).expect("windows key").1,
            _ => codec::parse_slice_key(k).expect("slices key").1,
        };
        assert_eq!(hash_of(k), &hash_key(&key), "{key}");
    }

    let quarters = shards(4);
    let mut files = Vec::new();
    let mut union = Entries::new();
    for (i, &range) in quarters.iter().enumerate() {
        let exported = store
            .export_range(range, &at(format!("export{i}")))
            .expect("export");
        let got = entries(
            &ingested(&at(format!("quarter{i}")), &config, &exported),
            HashRange::ALL,
        );
        assert_eq!(got, in_range(&original, range), "quarter {i}");
        for (k, v) in got {
            assert!(union.insert(k, v).is_none(), "in two quarters");
        }
        files.push(exported);
    }
    assert_eq!(union, original, "the quarters together");

    let halves = shards(2);
    assert_eq!(
        (quarters[0].start, quarters[1].end),
        (halves[0].start, halves[0].end)
    );
    assert_eq!(
        (quarters[2].start, quarters[3].end),
        (halves[1].start, halves[1].end)
    );
    let mut union = Entries::new();
    for (h, &range) in halves.iter().enumerate() {
        let exported = store
            .export_range(range, &at(format!("half{h}")))
            .expect("export");
        let got = entries(
            &ingested(&at(format!("half{h}-store")), &config, &exported),
            HashRange::ALL,
        );
        assert_eq!(got, in_range(&original, range), "half {h}");
        // The two quarters' files in one ingest give the same store.
        let both = [files[2 * h].clone(), files[2 * h + 1].clone()].concat();
        let merged = entries(
            &ingested(&at(format!("merged{h}")), &config, &both),
            HashRange::ALL,
        );
        assert_eq!(merged, got, "quarters {} and {} merged", 2 * h, 2 * h + 1);
        union.extend(got);
    }
    assert_eq!(union, original, "the halves together");

    store.delete_range(quarters[deleted]).expect("delete");
    let mut rest = original;
    rest.retain(|(_, k), _| !quarters[deleted].contains(hash_of(k)));
    assert_eq!(
        entries(&store, HashRange::ALL),
        rest,
        "quarter {deleted} deleted"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn ranges_export_ingest_and_delete_entry_for_entry(
        raws in proptest::collection::vec(raw(), 1..120),
        // 0: every state's slices in the slices column family.
        inline_max in prop_oneof![Just(0usize), Just(1024)],
        deleted in 0usize..4,
    ) {
        check(&steps(&raws), inline_max, deleted);
    }
}
