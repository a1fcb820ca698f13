//! Partition key = entity key, through the binary against the emulator.
//!
//! A stream whose producers partition by merchant spreads each user's
//! events over shards: a feature pipeline reading it counts the misrouted
//! keys (`shardflow_cluster_misrouted_keys_total`) and says so. The fix is
//! the documented re-key pipeline: a stateless shardflow whose Kinesis sink
//! forwards every input record's own bytes (`payload = "original"`,
//! `kinds = ["raw"]`) to a second stream, partitioned by the entity key. A
//! feature pipeline on that stream sees no misrouted key and counts every
//! event.

mod emulator;
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use emulator::Emulator;
use harness::Proc;

const USERS: u32 = 40;
const PER_USER: u64 = 10;

fn features_config(dir: &Path, url: &str, stream: &str) -> String {
    format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "200ms"

[source]
type = "kinesis"
stream_name = "{stream}"
consumer_name = "features"
starting_position = "trim_horizon"
endpoint_url = "{url}"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ n = "i64" }}

[watermark]
max_out_of_orderness = "1h"

[[features]]
name = "count_1d"
agg = "count"
window = {{ type = "tumbling", size = "1d" }}

[[sinks]]
type = "file"
path = "{dir}/features.ndjson"
kinds = ["features", "dead_letter", "late"]
"#,
        dir = dir.display()
    )
}

fn rekey_config(dir: &Path, url: &str) -> String {
    format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "200ms"

[source]
type = "kinesis"
stream_name = "by-merchant"
consumer_name = "rekey"
starting_position = "trim_horizon"
endpoint_url = "{url}"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ n = "i64" }}

# No [[features]]: every input record is forwarded as it came, keyed by userId.
[[sinks]]
type = "kinesis"
stream_name = "by-user"
kinds = ["raw"]
payload = "original"
endpoint_url = "{url}"
region = "us-east-1"

[[sinks]]
type = "file"
path = "{dir}/dead.ndjson"
kinds = ["dead_letter"]
"#,
        dir = dir.display()
    )
}

/// Starts `shardflow run` on `config` in a directory of its own.
fn start(root: &Path, name: &str, config: String, metrics: &str) -> (Proc, std::path::PathBuf) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    (Proc::run(&dir, &path, metrics, "run.log"), dir)
}

/// The highest `count_1d` per key in a feature file.
fn max_counts(dir: &Path) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for line in harness::ndjson(&dir.join("features.ndjson")) {
        let count = line["features"]["count_1d"].as_i64().unwrap_or(0);
        let key = line["key"].as_str().unwrap_or_default().to_owned();
        let max = out.entry(key).or_insert(0);
        *max = count.max(*max);
    }
    out
}

/// Waits until every user's count is `PER_USER` in `dir`'s features and a
/// scrape of `metrics` shows the misrouted-key counter; returns it.
async fn wait_done(p: &mut Proc, dir: &Path, metrics: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let counts = max_counts(dir);
        let done = counts.len() == USERS as usize && counts.values().all(|&c| c == PER_USER as i64);
        if done {
            // The counter is published at each checkpoint.
            tokio::time::sleep(Duration::from_millis(600)).await;
            let page = harness::scrape(metrics).expect("metrics answer");
            if page.contains("shardflow_cluster_misrouted_keys_total") {
                return harness::metric_sum(&page, "shardflow_cluster_misrouted_keys_total");
            }
        }
        p.assert_running();
        assert!(
            Instant::now() < deadline,
            "counts {counts:?} after 120 s\n{}",
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keyed_otherwise_is_flagged_and_the_rekey_pipeline_fixes_it() {
    let emu = Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "by-merchant", 4).await;
    emulator::create_stream(&client, "by-user", 4).await;
    // Each user's events are spread over merchants, so over shards.
    let mut originals = BTreeSet::new();
    let mut records = Vec::new();
    for n in 0..PER_USER {
        for k in 0..USERS {
            let data = emulator::event_json(k, n);
            originals.insert(data.clone());
            records.push((format!("merchant-{}", (k as u64 * 7 + n) % 13), data));
        }
    }
    emulator::put(&client, "by-merchant", records).await;

    let root = tempfile::tempdir().unwrap();
    let url = emu.url();
    let direct_metrics = harness::free_addr();
    let (mut direct, direct_dir) = start(
        root.path(),
        "direct",
        features_config(&root.path().join("direct"), &url, "by-merchant"),
        &direct_metrics,
    );
    let (mut rekey, _) = start(
        root.path(),
        "rekey",
        rekey_config(&root.path().join("rekey"), &url),
        "off",
    );
    let keyed_metrics = harness::free_addr();
    let (mut keyed, keyed_dir) = start(
        root.path(),
        "keyed",
        features_config(&root.path().join("keyed"), &url, "by-user"),
        &keyed_metrics,
    );

    let misrouted = wait_done(&mut direct, &direct_dir, &direct_metrics).await;
    assert!(
        misrouted > 0.0 && misrouted <= f64::from(USERS),
        "misrouted keys on the merchant-keyed stream: {misrouted}"
    );
    let log = direct.stderr();
    assert!(log.contains("does not own its hash"), "{log}");
    assert_eq!(log.matches("does not own its hash").count(), 1, "told once");
    let misrouted = wait_done(&mut keyed, &keyed_dir, &keyed_metrics).await;
    assert_eq!(misrouted, 0.0, "{}", keyed.stderr());
    rekey.assert_running();
    direct.terminate(30).await;
    keyed.terminate(30).await;
    rekey.terminate(30).await;

    // The re-keyed stream holds the original bytes, each once, partitioned
    // by the user.
    let shards = client
        .list_shards()
        .stream_name("by-user")
        .send()
        .await
        .unwrap()
        .shards
        .unwrap_or_default();
    let mut forwarded = Vec::new();
    for shard in shards {
        let mut it = client
            .get_shard_iterator()
            .stream_name("by-user")
            .shard_id(shard.shard_id)
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator;
        for _ in 0..100 {
            let Some(i) = it else { break };
            let out = client.get_records().shard_iterator(i).send().await.unwrap();
            if out.records.is_empty() {
                break;
            }
            for r in out.records {
                let data = r.data.into_inner();
                let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
                assert_eq!(r.partition_key.as_deref(), v["userId"].as_str());
                forwarded.push(data);
            }
            it = out.next_shard_iterator;
        }
    }
    let unique: BTreeSet<Vec<u8>> = forwarded.iter().cloned().collect();
    assert_eq!(unique, originals, "every original record, byte for byte");
}
