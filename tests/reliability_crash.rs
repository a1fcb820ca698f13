//! Crash recovery of the real binary: a producer puts a known sequence into
//! the Kinesis emulator while `shardflow run` is killed with SIGKILL at random
//! moments and restarted; a second, uninterrupted run reads the same stream
//! with its own consumer and state. After deduplication by id the two must
//! agree exactly: the same feature vectors and predictions for every record,
//! the same window results, the same dead letters; none missing, no window
//! fired twice, and every count equal to what the known sequence implies.
//!
//! Why the comparison is exact: every key lives on one shard and event times
//! grow along each shard, so no event is ever late and no window re-fires,
//! whatever the interleaving of shards (which differs between the runs and
//! after every restart). Idleness is off (1 h) so processing time plays no
//! part. The first kill comes only after both runs have seen every shard and
//! checkpointed, so no restart starts with a shard unknown to the watermark.
//!
//! `make test`: 3 kills over ~3,000 records. `make soak`: `SHARDFLOW_CRASH_KILLS`
//! (20+), `SHARDFLOW_CRASH_RECORDS`, `SHARDFLOW_CRASH_PRODUCE_SECS`;
//! `SHARDFLOW_CRASH_SEED` replays a schedule.

mod emulator;
mod harness;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{dedup, knob, ndjson, report, Proc};
use rand::{Rng as _, SeedableRng as _};
use shardflow::source::kinesis::efo::cmp_sequence;

const KEYS: u64 = 40;
const T0: i64 = 1_700_000_000_000;
/// Event time between consecutive records.
const STEP_MS: i64 = 50;
const COUNT_WINDOW_MS: i64 = 10_000;

/// Record `i` of the known sequence: every 101st is malformed (a dead letter).
fn record(i: u64) -> (String, Vec<u8>) {
    let key = format!("u{}", i % KEYS);
    let body = if i % 101 == 100 {
        format!(r#"{{"userId":"{key}","timestamp":"#)
    } else {
        format!(
            r#"{{"userId":"{key}","timestamp":{},"amount":{}.25,"merchant":"m{}"}}"#,
            T0 + i as i64 * STEP_MS,
            i % 97,
            i % 7
        )
    };
    (key, body.into_bytes())
}

fn is_good(i: u64) -> bool {
    i % 101 != 100
}

const MODEL: &str = r#"
name = "crash-model"
version = "1"
type = "logistic"
bias = -3.0
threshold = 0.5

[weights]
count_10s = 0.2
amount_sum_30s = 0.001
amount_max_1m = 0.01
merchants_1m = 0.1

[impute]
count_10s = 0.0
amount_sum_30s = 0.0
amount_max_1m = 0.0
merchants_1m = 0.0
"#;

/// A run's directory with its config; `consumer` keeps the runs' enhanced
/// fan-out consumers apart.
fn setup(root: &Path, name: &str, url: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.toml"), MODEL).unwrap();
    let config = format!(
        r#"
[pipeline]
state_dir = "state"
checkpoint_interval = "300ms"
batch_size = 64

[source]
type = "kinesis"
stream_name = "events"
consumer_name = "{name}"
starting_position = "trim_horizon"
endpoint_url = "{url}"
stall_timeout = "5s"

{schema}
{watermark}

[[features]]
name = "count_10s"
agg = "count"
window = {{ type = "tumbling", size = "10s" }}

[[features]]
name = "amount_sum_30s"
agg = "sum"
field = "amount"
window = {{ type = "sliding", size = "30s", slide = "10s" }}

[[features]]
name = "amount_max_1m"
agg = "max"
field = "amount"
window = {{ type = "tumbling", size = "1m" }}

[[features]]
name = "merchants_1m"
agg = "distinct_count"
field = "merchant"
window = {{ type = "tumbling", size = "1m" }}

[inference]
backend = "embedded"
model = "model.toml"
max_batch = 32
max_wait = "5ms"
{sinks}
"#,
        schema = harness::SCHEMA,
        watermark = harness::watermark("2s"),
        sinks = [
            harness::file_sink("out/predictions.ndjson", &["prediction"]),
            harness::file_sink("out/windows.ndjson", &["window"]),
            harness::file_sink("out/dead.ndjson", &["dead_letter", "late"]),
        ]
        .concat()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    dir
}

fn start(dir: &Path) -> Proc {
    Proc::run(dir, Path::new("config.toml"), "off", "stderr.log")
}

/// Distinct prediction and dead-letter ids written so far.
fn progress(dir: &Path) -> (usize, usize) {
    let ids = |file: &str| {
        ndjson(&dir.join("out").join(file))
            .iter()
            .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    (ids("predictions.ndjson"), ids("dead.ndjson"))
}

async fn wait_for(procs: &mut [&mut Proc], dirs: &[&Path], want: (usize, usize), secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let done = dirs.iter().all(|d| progress(d) == want);
        if done {
            return;
        }
        for p in procs.iter_mut() {
            p.assert_running();
            p.sample_rss();
        }
        assert!(
            Instant::now() < deadline,
            "within {secs} s: want {want:?} (predictions, dead letters), have {:?}",
            dirs.iter().map(|d| progress(d)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The deduplicated outputs of a run, and how many replayed copies it wrote.
struct Outputs {
    predictions: BTreeMap<String, serde_json::Value>,
    windows: BTreeMap<String, serde_json::Value>,
    dead: BTreeMap<String, serde_json::Value>,
    repeated: usize,
}

fn outputs(dir: &Path) -> Outputs {
    let out = dir.join("out");
    // Latency is measured, not computed: it may differ between copies.
    let (predictions, r1) = dedup(&ndjson(&out.join("predictions.ndjson")), &["latency_ms"]);
    let (windows, r2) = dedup(&ndjson(&out.join("windows.ndjson")), &[]);
    let (dead, r3) = dedup(&ndjson(&out.join("dead.ndjson")), &[]);
    Outputs {
        predictions,
        windows,
        dead,
        repeated: r1 + r2 + r3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_changes_no_result() {
    let kills = knob("SHARDFLOW_CRASH_KILLS", 3);
    let n = knob("SHARDFLOW_CRASH_RECORDS", 3_000).max(KEYS * 2);
    let produce = Duration::from_secs(knob("SHARDFLOW_CRASH_PRODUCE_SECS", 8));
    let seed = knob("SHARDFLOW_CRASH_SEED", rand::random::<u32>() as u64);
    let shards = knob("SHARDFLOW_CRASH_SHARDS", 2) as i32;
    eprintln!("crash schedule seed {seed} (SHARDFLOW_CRASH_SEED={seed} replays it)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    let emu = emulator::Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "events", shards).await;
    let root = tempfile::tempdir().unwrap();
    let reference_dir = setup(root.path(), "reference", &emu.url());
    let crash_dir = setup(root.path(), "crashed", &emu.url());

    // Warm-up: one record per key, so both runs know every shard (and have
    // checkpointed that) before anything is killed.
    emulator::put(&client, "events", (0..KEYS).map(record).collect()).await;
    let mut reference = start(&reference_dir);
    let mut crashed = start(&crash_dir);
    wait_for(
        &mut [&mut reference, &mut crashed],
        &[&reference_dir, &crash_dir],
        (KEYS as usize, 0),
        120,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            let chunks: Vec<Vec<u64>> = (KEYS..n)
                .collect::<Vec<_>>()
                .chunks(50)
                .map(|c| c.to_vec())
                .collect();
            let pause = produce / chunks.len().max(1) as u32;
            for chunk in chunks {
                emulator::put(&client, "events", chunk.into_iter().map(record).collect()).await;
                tokio::time::sleep(pause).await;
            }
        })
    };

    // Kills spread over the production time (and a little after it).
    let mean_gap = (produce.as_millis() as u64 / kills.max(1)).max(400);
    let mut peak_rss = 0;
    for k in 0..kills {
        let gap = Duration::from_millis(rng.random_range(200..2 * mean_gap));
        let until = Instant::now() + gap;
        while Instant::now() < until {
            crashed.assert_running();
            crashed.sample_rss();
            reference.sample_rss();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak_rss = peak_rss.max(crashed.kill9());
        eprintln!("kill {} of {kills} after {gap:?}", k + 1);
        // Sometimes restart at once, sometimes after a pause.
        if rng.random_bool(0.5) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
        }
        crashed = start(&crash_dir);
    }
    producer.await.unwrap();

    let good = (0..n).filter(|&i| is_good(i)).count();
    let bad = n as usize - good;
    wait_for(
        &mut [&mut reference, &mut crashed],
        &[&reference_dir, &crash_dir],
        (good, bad),
        300,
    )
    .await;
    // Window results fire with the record that moves the watermark; give
    // the last batch's outputs a moment to reach the files, then stop both.
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak_rss = peak_rss.max(crashed.terminate(30).await);
    let reference_rss = reference.terminate(30).await;

    let want = outputs(&reference_dir);
    let got = outputs(&crash_dir);
    assert_eq!(want.repeated, 0, "the uninterrupted run repeated outputs");
    harness::assert_same("predictions", &got.predictions, &want.predictions);
    harness::assert_same("window results", &got.windows, &want.windows);
    harness::assert_same("dead letters", &got.dead, &want.dead);
    assert_eq!(got.predictions.len(), good, "a prediction for every record");
    assert_eq!(got.dead.len(), bad, "a dead letter for every bad record");
    assert!(
        got.dead
            .values()
            .all(|d| d["kind"] == "dead_letter" && d["reason"].as_str().unwrap().contains("JSON")),
        "dead letters carry their reason: {:?}",
        got.dead.values().next()
    );

    // Independently of the reference: counts are what the sequence implies.
    let events: Vec<(String, i64)> = (0..n)
        .filter(|&i| is_good(i))
        .map(|i| (format!("u{}", i % KEYS), T0 + i as i64 * STEP_MS))
        .collect();
    let (per_record, windows) = harness::tumbling_counts(events.clone(), COUNT_WINDOW_MS);
    let mut by_key_order: HashMap<String, Vec<i64>> = HashMap::new();
    for ((key, _), c) in events.into_iter().zip(per_record) {
        by_key_order.entry(key).or_default().push(c);
    }
    let mut seen: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for (id, p) in &got.predictions {
        // ids are shardId/sequence: order within a key is sequence order.
        let seq = id.rsplit('/').next().unwrap().to_owned();
        let key = p["key"].as_str().unwrap().to_owned();
        let c = p["features"]["count_10s"].as_i64().unwrap();
        seen.entry(key).or_default().push((seq, c));
    }
    for (key, mut v) in seen {
        v.sort_by(|a, b| cmp_sequence(&a.0, &b.0));
        let got: Vec<i64> = v.into_iter().map(|(_, c)| c).collect();
        assert_eq!(got, by_key_order[&key], "count_10s of {key}'s records");
    }
    let mut fired = std::collections::HashSet::new();
    for w in got.windows.values() {
        assert_eq!(w["revision"], 0, "a window fired twice: {w}");
        let key = (
            w["feature"].as_str().unwrap().to_owned(),
            w["key"].as_str().unwrap().to_owned(),
            w["window_end"].as_i64().unwrap(),
        );
        assert!(fired.insert(key.clone()), "window {key:?} fired twice");
        if key.0 == "count_10s" {
            assert_eq!(
                w["value"].as_i64(),
                windows.get(&(key.1.clone(), key.2)).copied(),
                "window {key:?}"
            );
        }
    }
    assert!(
        got.windows.len() > KEYS as usize,
        "windows fired: {}",
        got.windows.len()
    );

    report(&format!(
        "crash: {kills} SIGKILLs survived, {n} records in, {good} predictions, {bad} dead letters, \
         {} window results (identical to the uninterrupted run), {} replayed copies deduplicated, \
         peak RSS {} MiB (uninterrupted run {} MiB), seed {seed}",
        got.windows.len(),
        got.repeated,
        peak_rss / 1024,
        reference_rss / 1024
    ));
}
