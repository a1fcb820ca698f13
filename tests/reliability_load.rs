//! Load: the real binary at the highest rate this machine sustains (the
//! generator unthrottled: it produces as fast as the pipeline takes, so the
//! rate is set by backpressure) through features, the embedded model and the
//! sinks, while the test samples its RSS, throughput and checkpoint
//! durations every second. At the end the RocksDB state is opened and its
//! entries counted: they must not exceed what the live windows of every key
//! need (purged windows leave nothing behind).
//!
//! `make test` runs it for `SHARDFLOW_LOAD_SECS` = 20 s and checks the state
//! bound, checkpoint durations (below 10 s each: bounded, not fast; timing is
//! not asserted) and a memory ceiling. `make soak` runs it for 30 minutes
//! and also requires RSS to stay flat: the highest RSS of the second half no
//! more than 10 % (+32 MiB) above that of the first half, once RocksDB's
//! memtables and the state cache have filled. The samples go to `load.csv`
//! in `SHARDFLOW_REPORT_DIR`, which `scripts/plot_load.py` turns into a PNG.

mod harness;
mod inference_support;

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::{knob, metric_sum, report, scrape, Proc};
use shardflow::config::Config;
use shardflow::state::StateStore;

const KEYS: u64 = 2_000;

fn config_text(model: &str) -> String {
    format!(
        r#"
[pipeline]
state_dir = "state"
checkpoint_interval = "1s"
progress_interval = 0

[source]
type = "generator"
seed = 11
rate = 0
keys = {KEYS}
skew = 0.8
partitions = 4
start_time = 1700000000000
bad_fraction = 0.001

{schema}
{watermark}
{features}

[inference]
backend = "embedded"
model = "{model}"

# Predictions go to stdout (discarded): a file would grow by gigabytes in a soak.
[[sinks]]
type = "stdout"
kinds = ["prediction", "dead_letter", "late"]

[[sinks]]
type = "file"
path = "out/windows.ndjson"
kinds = ["window"]
rotate_bytes = 104857600
"#,
        schema = harness::SCHEMA,
        watermark = harness::watermark("2s"),
        features = inference_support::FEATURES
    )
}

/// The most state entries live windows need, per column family: for each
/// window geometry and key, the slices a window spans plus the one being
/// filled ahead of the watermark, and one window-state and one timer entry
/// per slice (an upper bound; a key usually has fewer).
fn live_bound(config: &Config) -> (usize, usize) {
    let mut geometries: Vec<(i64, i64)> = config
        .features
        .iter()
        .map(|f| {
            let w = f.window.get_ref();
            (w.size_millis(), w.slide_millis())
        })
        .collect();
    geometries.sort();
    geometries.dedup();
    let ooo_slices =
        |slide: i64| (config.watermark.max_out_of_orderness.millis() / slide + 2) as usize;
    let slices: usize = geometries
        .iter()
        .map(|&(size, slide)| (size / slide) as usize + ooo_slices(slide))
        .sum();
    (slices * KEYS as usize, geometries.len() * KEYS as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_load_keeps_memory_state_and_checkpoints_bounded() {
    let secs = knob("SHARDFLOW_LOAD_SECS", 20);
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&inference_support::repo("config/models/fraud.toml"));
    std::fs::write(dir.path().join("config.toml"), &text).unwrap();
    let config = Config::from_str_at(&text, Path::new("load.toml"), |_| None).unwrap();

    let csv_path = harness::report_dir()
        .unwrap_or_else(|| dir.path().to_owned())
        .join("load.csv");
    let mut csv = std::fs::File::create(&csv_path).unwrap();
    writeln!(
        csv,
        "seconds,rss_mib,records_in,records_per_s,checkpoint_max_s,checkpoints"
    )
    .unwrap();

    let metrics = harness::free_addr();
    let mut run = Proc::run(dir.path(), Path::new("config.toml"), &metrics, "stderr.log");
    let started = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let (mut last_in, mut last_t) = (0.0, 0.0);
    let mut checkpoint_max: f64 = 0.0;
    let mut page = String::new();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        run.assert_running();
        let rss = run.sample_rss();
        let t = started.elapsed().as_secs_f64();
        if let Some(p) = scrape(&metrics) {
            page = p;
        }
        let records = metric_sum(&page, "shardflow_records_in_total");
        let cp = page
            .lines()
            .find(|l| l.starts_with("shardflow_checkpoint_duration_seconds{quantile=\"1\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        checkpoint_max = checkpoint_max.max(cp);
        let rate = (records - last_in) / (t - last_t).max(1e-3);
        (last_in, last_t) = (records, t);
        writeln!(
            csv,
            "{t:.1},{:.1},{records},{rate:.0},{cp:.3},{}",
            rss as f64 / 1024.0,
            metric_sum(&page, "shardflow_checkpoints_total")
        )
        .unwrap();
        samples.push((t, rss));
    }
    let peak = run.terminate(60).await;
    let records = last_in;
    assert!(records > 0.0, "nothing was processed:\n{page}");

    // State: nothing beyond the live horizon.
    let store = StateStore::open(
        &dir.path().join("state"),
        &config.state_fingerprint(),
        false,
    )
    .expect("the state opens after the run");
    let counts = store.key_counts().unwrap();
    let (slice_bound, window_bound) = live_bound(&config);
    assert!(
        counts.slices <= slice_bound && counts.windows <= window_bound && counts.timers <= slice_bound,
        "state beyond the live windows: {counts:?}, bounds: {slice_bound} slices, {window_bound} window states"
    );
    assert!(
        checkpoint_max < 10.0,
        "a checkpoint took {checkpoint_max} s"
    );
    assert!(peak < 1024 * 1024, "peak RSS {} MiB", peak / 1024);

    // Flat memory, over a run long enough for RocksDB's memtables to cycle.
    let half = samples.len() / 2;
    let first = samples[..half].iter().map(|s| s.1).max().unwrap_or(0);
    let second = samples[half..].iter().map(|s| s.1).max().unwrap_or(0);
    if secs >= 300 {
        assert!(
            second as f64 <= first as f64 * 1.10 + 32.0 * 1024.0,
            "RSS grew: first half peak {} MiB, second half peak {} MiB (see {})",
            first / 1024,
            second / 1024,
            csv_path.display()
        );
    }
    report(&format!(
        "load: {secs} s unthrottled, {records} records in ({:.0}/s), peak RSS {} MiB (first half {} MiB, second half {} MiB), \
         longest checkpoint {checkpoint_max:.3} s, state {} slices / {} window states / {} timers (bounds {slice_bound}/{window_bound}/{slice_bound}), samples in {}",
        records / secs as f64,
        peak / 1024,
        first / 1024,
        second / 1024,
        counts.slices,
        counts.windows,
        counts.timers,
        csv_path.display()
    ));
}
