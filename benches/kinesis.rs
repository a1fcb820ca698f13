//! Kinesis end to end (issue 4): a bench binary rather than criterion,
//! because what it reports is a delay distribution, not a mean time per
//! iteration. Both parts use the ferrokinesis emulator embedded on
//! 127.0.0.1, so they measure shardflow plus a local emulator, not AWS.
//!
//! - `throughput`: records put into an 8-shard stream beforehand, then the
//!   pipeline (enhanced fan-out source → decode → window engine → file sink)
//!   reads them all from TRIM_HORIZON, in this process. Records/s from the
//!   first record to the last.
//! - `latency`: the release binary runs the shipped `config/kinesis.toml`
//!   (8 shards, four window features, the embedded model, predictions on
//!   stdout) while a producer puts records at a steady rate with the current
//!   time as event time. For every record, the delay from the start of the
//!   PutRecords call that carried it to the moment its prediction line is
//!   read from the binary's stdout (ids are `shard/sequence`, as the
//!   PutRecords response reports them). Prints min/p50/p90/p99/max.
//!   ferrokinesis pushes a shard's new records every 200 ms (AWS pushes them
//!   as they arrive), so about 100 ms of the median, and up to 200 ms of any
//!   delay, is the emulator's polling; the minimum shows the rest.
//!
//!   With `--metrics-addr` on, it also prints `shardflow_stage_seconds` per
//!   stage (`source` is the emulator's share, from ApproximateArrivalTimestamp
//!   to receipt; ferrokinesis stamps whole seconds, so it reads up to 1 s
//!   high there), and `SHARDFLOW_BENCH_CHECKPOINT` (default `5s`) sets the
//!   checkpoint interval: a short one makes the file sinks fsync often.
//!
//! ```sh
//! make bench                                  # both, defaults
//! cargo bench --bench kinesis -- latency      # one part
//! SHARDFLOW_BENCH_RECORDS=200000 SHARDFLOW_BENCH_RATE=5000 SHARDFLOW_BENCH_SECS=30 cargo bench --bench kinesis
//! ```

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/emulator/mod.rs"]
mod emulator;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::collections::HashMap;
use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use shardflow::flow::Stats;
use shardflow::pipeline::RunOptions;

const SHARDS: i32 = 8;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; anything else not starting with `-`
    // selects a part by name, as criterion's filters do.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f));
    emulator::init();
    if wanted("throughput") {
        throughput(env_or("SHARDFLOW_BENCH_RECORDS", 100_000)).await;
    }
    if wanted("latency") {
        latency(
            env_or("SHARDFLOW_BENCH_RATE", 1_000),
            env_or("SHARDFLOW_BENCH_SECS", 20),
        )
        .await;
    }
}

async fn throughput(records: u64) {
    let emu = emulator::Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "bench", SHARDS).await;
    let batch: Vec<(String, Vec<u8>)> = (0..records)
        .map(|n| {
            (
                format!("u{}", n % 1000),
                emulator::event_json((n % 1000) as u32, n),
            )
        })
        .collect();
    emulator::put(&client, "bench", batch).await;

    let dir = tempfile::tempdir().unwrap();
    let config = emulator::config(dir.path(), &emu.url(), "bench", "");
    let stats = Arc::new(Stats::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(shardflow::pipeline::run(
        config,
        RunOptions::default(),
        shutdown,
        stats.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    // The clock starts at the first record: consumer registration (the
    // emulator's CREATING delay) is not consumption.
    while stats.records_in.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = Instant::now();
    while stats.records_in.load(Ordering::Relaxed) < records && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = first.elapsed();
    let got = stats.records_in.load(Ordering::Relaxed);
    stop.send(true).unwrap();
    run.await.unwrap().unwrap();
    println!(
        "kinesis/throughput: {got} records from {SHARDS} shards in {took:.2?}: {:.0} records/s",
        got as f64 / took.as_secs_f64()
    );
}

/// Prediction ids and the moment each line was read.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

async fn latency(rate: u64, secs: u64) {
    let emu = emulator::Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "RealtimeEvents", SHARDS).await;
    emulator::create_stream(&client, "RealtimeFeatures", 1).await;

    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.path().join("config/models")).unwrap();
    for file in ["config/kinesis.toml", "config/models/fraud.toml"] {
        std::fs::copy(repo.join(file), dir.path().join(file)).unwrap();
    }
    // SHARDFLOW_BENCH_CHECKPOINT: a shorter interval makes the file sinks
    // fsync more often; the delays show whether that stalls the readers.
    let checkpoint = std::env::var("SHARDFLOW_BENCH_CHECKPOINT").unwrap_or_else(|_| "5s".into());
    let shipped = std::fs::read_to_string(dir.path().join("config/kinesis.toml")).unwrap();
    std::fs::write(
        dir.path().join("config/kinesis.toml"),
        shipped.replace(
            "checkpoint_interval = \"5s\"",
            &format!("checkpoint_interval = \"{checkpoint}\""),
        ),
    )
    .unwrap();
    let metrics_addr = harness::free_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardflow"))
        .current_dir(dir.path())
        .args([
            "run",
            "--config",
            "config/kinesis.toml",
            "--metrics-addr",
            &metrics_addr,
        ])
        .env("KINESIS_ENDPOINT", emu.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting shardflow");
    let stdout = child.stdout.take().unwrap();
    let seen: Seen = Arc::default();
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(id) = v["id"].as_str() {
                        seen.lock().unwrap().entry(id.to_owned()).or_insert(at);
                    }
                }
            }
        })
    };

    // Wait until the binary consumes (a first record round-trips), so that
    // start-up and consumer registration are not part of the delays.
    let warmup = put_batch(&client, 0, 1).await;
    let ready_by = Instant::now() + Duration::from_secs(60);
    while !seen.lock().unwrap().contains_key(&warmup[0].0) {
        assert!(Instant::now() < ready_by, "no prediction within 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Steady rate: a PutRecords call every 10 ms carrying rate/100 records.
    let per_tick = (rate / 100).max(1);
    let mut sent: Vec<(String, Instant)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut n = 1u64;
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        sent.extend(put_batch(&client, n, per_tick).await);
        n += per_tick;
    }
    let put_took = started.elapsed();

    let drain_by = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let seen = seen.lock().unwrap();
            sent.iter().filter(|(id, _)| !seen.contains_key(id)).count()
        };
        if missing == 0 || Instant::now() > drain_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stages = harness::scrape(&metrics_addr).map(|page| stage_quantiles(&page));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = reader.join();

    let seen = seen.lock().unwrap();
    let mut delays: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, at)| seen.get(id).map(|got| got.saturating_duration_since(*at)))
        .collect();
    delays.sort();
    let missing = sent.len() - delays.len();
    let pct = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize];
    println!(
        "kinesis/latency: {} records put at {:.0}/s over {SHARDS} shards, {missing} without a prediction; \
         PutRecord → prediction on stdout: min {:.1?}, p50 {:.1?}, p90 {:.1?}, p99 {:.1?}, max {:.1?}",
        sent.len(),
        sent.len() as f64 / put_took.as_secs_f64(),
        pct(0.0),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
    );
    println!("kinesis/latency: checkpoint_interval {checkpoint}; shardflow_stage_seconds (per batch, from buckets; `source` is the emulator's share, the others count from receipt):");
    for (stage, p50, p99, count) in stages.unwrap_or_default() {
        println!("  {stage:<9} p50 ≤ {p50:>6.3} s   p99 ≤ {p99:>6.3} s   ({count} batches)");
    }
}

/// Per stage, the upper bounds of the buckets holding the median and the
/// 99th percentile of `shardflow_stage_seconds`, and the sample count.
fn stage_quantiles(page: &str) -> Vec<(String, f64, f64, u64)> {
    let mut buckets: std::collections::BTreeMap<String, Vec<(f64, u64)>> = Default::default();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("shardflow_stage_seconds_bucket{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").unwrap_or_default();
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        };
        let (Some(stage), Some(le)) = (label("stage"), label("le")) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        buckets
            .entry(stage)
            .or_default()
            .push((le, value.trim().parse().unwrap_or(0)));
    }
    let order = ["source", "decode", "engine", "inference", "sink"];
    let mut out: Vec<_> = buckets
        .into_iter()
        .filter_map(|(stage, mut b)| {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            let total = b.last()?.1;
            let at = |q: f64| {
                b.iter()
                    .find(|(_, n)| *n as f64 >= q * total as f64)
                    .map_or(f64::INFINITY, |(le, _)| *le)
            };
            (total > 0).then(|| (stage, at(0.5), at(0.99), total))
        })
        .collect();
    out.sort_by_key(|(s, ..)| order.iter().position(|o| o == s).unwrap_or(order.len()));
    out
}

/// Puts `count` events (event time = now) in one PutRecords call; returns
/// each accepted record's id with the moment the call started. Entries the
/// emulator rejects are not retried: they are simply not measured.
async fn put_batch(
    client: &aws_sdk_kinesis::Client,
    first: u64,
    count: u64,
) -> Vec<(String, Instant)> {
    let now_ms = shardflow::time::now_millis();
    let entries: Vec<_> = (first..first + count)
        .map(|n| {
            let key = n % 1000;
            let data = format!(
                r#"{{"userId":"u{key}","timestamp":{now_ms},"amount":{}.5,"merchant":"m{}"}}"#,
                n % 500,
                n % 37
            );
            PutRecordsRequestEntry::builder()
                .partition_key(format!("u{key}"))
                .data(Blob::new(data.into_bytes()))
                .build()
                .unwrap()
        })
        .collect();
    let at = Instant::now();
    let out = client
        .put_records()
        .stream_name("RealtimeEvents")
        .set_records(Some(entries))
        .send()
        .await
        .expect("PutRecords");
    out.records
        .into_iter()
        .filter_map(|r| Some((format!("{}/{}", r.shard_id?, r.sequence_number?), at)))
        .collect()
}
