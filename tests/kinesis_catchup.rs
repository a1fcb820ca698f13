//! A new consumer catching up from `trim_horizon`, through the binary, against
//! the emulator: 8 shards of backlog (20,000 records, 25 ms of event time
//! apart, in order within every shard), then one record a day later on each
//! shard. No record is late by the documented rule, since every shard holds
//! the watermark from the moment `ListShards` returned it, whichever shard
//! the subscriptions happen to drain first. The run's `/metrics` also shows
//! where the records' time went (`shardflow_stage_seconds` per stage).

mod emulator;
mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

const SHARDS: u128 = 8;
const RECORDS: u64 = 20_000;
const DAY: u64 = 86_400_000;
const T0: u64 = 1_700_000_000_000;

fn body(key: &str, t: u64) -> Vec<u8> {
    format!(r#"{{"userId":"{key}","timestamp":{t},"amount":1.0}}"#).into_bytes()
}

/// The shard (of `SHARDS` even ranges, as CreateStream lays them out) that
/// Kinesis routes a partition key to.
fn shard_of(key: &str) -> u128 {
    let hash = u128::from_be_bytes(Md5::digest(key.as_bytes()).into());
    hash / (u128::MAX / SHARDS + 1)
}

fn config(dir: &Path, endpoint: &str) -> String {
    format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "1s"

[source]
type = "kinesis"
stream_name = "catchup"
consumer_name = "catchup-test"
starting_position = "trim_horizon"
endpoint_url = "{endpoint}"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64" }}

[watermark]
max_out_of_orderness = "1s"
allowed_lateness = "1m"

[[features]]
name = "count_1m"
agg = "count"
window = {{ type = "tumbling", size = "1m" }}

[[sinks]]
type = "file"
path = "{dir}/features.ndjson"
kinds = ["features"]

[[sinks]]
type = "file"
path = "{dir}/late.ndjson"
kinds = ["late", "dead_letter"]
"#,
        dir = dir.display()
    )
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_from_trim_horizon_marks_no_record_late() {
    let emu = emulator::Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "catchup", SHARDS as i32).await;

    // 20,000 records in event-time order: put in that order, each shard's
    // share stays in order too.
    let backlog: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| {
            let key = format!("user{}", i % 1_000);
            let t = T0 + i * 25;
            let b = body(&key, t);
            (key, b)
        })
        .collect();
    emulator::put(&client, "catchup", backlog).await;
    // Then one record a day later on each shard.
    let mut later = Vec::new();
    for shard in 0..SHARDS {
        let key = (0..)
            .map(|n| format!("later{n}"))
            .find(|k| shard_of(k) == shard)
            .unwrap();
        let b = body(&key, T0 + RECORDS * 25 + DAY);
        later.push((key, b));
    }
    emulator::put(&client, "catchup", later).await;
    let total = RECORDS as usize + SHARDS as usize;

    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("catchup.toml");
    std::fs::write(&config_path, config(dir.path(), &emu.url())).unwrap();
    let metrics = harness::free_addr();
    let mut run = harness::Proc::run(dir.path(), &config_path, &metrics, "run.log");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let seen = count_lines(&dir.path().join("features.ndjson"))
            + count_lines(&dir.path().join("late.ndjson"));
        if seen >= total {
            break;
        }
        run.assert_running();
        assert!(
            Instant::now() < deadline,
            "{seen} of {total} records came out within 180 s:\n{}",
            run.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = harness::scrape(&metrics).expect("the metrics endpoint answers");
    run.terminate(30).await;

    // Where the records' time went, stage by stage (one sample per batch).
    for stage in ["source", "decode", "engine", "sink"] {
        let count: f64 = page
            .lines()
            .filter(|l| l.contains(&format!("stage=\"{stage}\"")))
            .map(|l| harness::metric_sum(l, "shardflow_stage_seconds_count"))
            .sum();
        assert!(
            count > 0.0,
            "no shardflow_stage_seconds sample for {stage}:\n{page}"
        );
    }
    assert!(page.contains("shardflow_stage_seconds_bucket{stage=\"engine\",le=\"0.001\"}"));

    let late = count_lines(&dir.path().join("late.ndjson"));
    let features = count_lines(&dir.path().join("features.ndjson"));
    assert_eq!(late, 0, "{late} of {total} records came out late");
    assert_eq!(features, total);
}
