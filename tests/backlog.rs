//! Promises kept under a backlog, through the binary: checkpoints keep their
//! cadence while input is always ready, and a firing burst (every key's
//! window due at once) stays within a stated memory bound.

mod harness;

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use harness::*;

fn write_events(path: &Path, n: u64, keys: u64, time: impl Fn(u64) -> u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        writeln!(
            f,
            r#"{{"userId":"u{}","timestamp":{},"amount":{}.5,"merchant":"m{}"}}"#,
            i % keys,
            time(i),
            i % 1000,
            i % 7
        )
        .unwrap();
    }
}

fn config(dir: &Path, interval: &str, extra: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "{interval}"

[source]
type = "file"
path = "{dir}/events.ndjson"
{SCHEMA}
[watermark]
max_out_of_orderness = "1s"
idle_timeout = "1h"
allowed_lateness = "0s"

[[features]]
name = "count_1m"
agg = "count"
window = {{ type = "tumbling", size = "1m" }}

[[features]]
name = "amount_sum_1m"
agg = "sum"
field = "amount"
window = {{ type = "tumbling", size = "1m" }}
{extra}"#,
        dir = dir.display()
    );
    let path = dir.join("backlog.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The `checkpoints=N` of the run's closing log line.
fn checkpoints_made(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("stopped"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("checkpoints="))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no closing line with checkpoints= in:\n{log}"))
}

/// A file read as fast as the pipeline goes: input is always ready, and a
/// barrier must still go out every `checkpoint_interval`. Counted: the
/// run's checkpoints against its duration over the interval. A run too
/// short to judge (a fast machine, a faster pipeline) is made again with
/// enough more events for about twelve intervals, at most twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_keep_their_cadence_under_a_backlog() {
    let mut n = knob("SHARDFLOW_BACKLOG_EVENTS", 300_000);
    for attempt in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        write_events(&dir.path().join("events.ndjson"), n, 10_000, |i| {
            1_700_000_000_000 + i
        });
        let sinks = file_sink(
            &dir.path().join("features.ndjson").display().to_string(),
            &["features"],
        );
        let cfg = config(dir.path(), "250ms", &sinks);
        let started = Instant::now();
        let mut proc = Proc::run_with_log_level(dir.path(), &cfg, "off", "run.log", "info");
        let status = proc.wait(300).await;
        let took = started.elapsed();
        assert!(status.success(), "{status}:\n{}", proc.stderr());
        let made = checkpoints_made(&proc.stderr());
        let due = took.as_secs_f64() / 0.25;
        report(&format!(
            "backlog: {n} events in {took:.1?}, {made} checkpoints for {due:.1} intervals of 250 ms"
        ));
        if due < 8.0 && attempt < 3 {
            n = (n as f64 * 12.0 / due.max(0.5)).ceil() as u64;
            continue;
        }
        assert!(
            due >= 8.0,
            "the run was too short ({took:?}) to say anything about cadence"
        );
        assert!(
            (made as f64) * 1.5 >= due && (made as f64) <= due * 1.5 + 1.0,
            "{made} checkpoints in {took:?} at 250 ms: not within 1.5× of {due:.1}"
        );
        return;
    }
}

/// 200,000 keys whose windows all come due at the end of input: window
/// results leave in chunks of `batch_size` keys through the same
/// backpressure as events, so the burst adds little to the state's own
/// footprint. The bound (stated in the README) is 400 MiB of peak RSS for
/// this run in the dev profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_burst_of_200k_keys_stays_within_its_memory_bound() {
    const BOUND_MIB: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let keys = 200_000;
    // One event per key, all in the first second of one minute: nothing
    // fires before the end of input.
    write_events(&dir.path().join("events.ndjson"), keys, keys, |i| {
        1_700_000_040_000 + i % 1_000
    });
    let windows = dir.path().join("windows.ndjson");
    let sinks = file_sink(&windows.display().to_string(), &["window"]);
    let cfg = config(dir.path(), "5s", &sinks);
    let mut proc = Proc::run(dir.path(), &cfg, "off", "run.log");
    let status = proc.wait(300).await;
    assert!(status.success(), "{status}:\n{}", proc.stderr());
    let results = ndjson(&windows).len() as u64;
    assert_eq!(results, 2 * keys, "every key's two windows fired once");
    let peak_mib = proc.peak_rss_kib / 1024;
    report(&format!(
        "burst: {results} window results of {keys} keys at once, peak RSS {peak_mib} MiB (bound {BOUND_MIB} MiB)"
    ));
    assert!(
        peak_mib <= BOUND_MIB,
        "peak RSS {peak_mib} MiB over the bound of {BOUND_MIB} MiB"
    );
}
