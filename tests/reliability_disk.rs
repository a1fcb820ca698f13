//! Disk faults under the state directory: the real binary with its RocksDB
//! state on a small tmpfs that the test fills up while the run is
//! checkpointing, or remounts read-only (before a start, with and without
//! existing state). Each fault must stop the run with exit code 1
//! and an error naming the cause; after the fault is gone the next start
//! must open the state as it was last committed and continue exactly once
//! (every per-event count equal to what the input implies, no window result
//! differing from an earlier copy of itself).
//!
//! Mounting needs root (CAP_SYS_ADMIN). Not root, the test does nothing and
//! says so on the terminal (past the test harness's output capture) and in
//! the soak report: a disk-fault test that did not run must not look like
//! one that passed. Root without the capability (an unprivileged container),
//! it fails saying so.

mod harness;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{dedup, ndjson, report, Proc, Tmpfs};

const T0: i64 = 1_700_000_000_000;
const KEYS: u64 = 10;
const WINDOW_MS: i64 = 10_000;

fn line(i: u64) -> String {
    format!(
        "{{\"userId\":\"u{}\",\"timestamp\":{},\"amount\":{},\"merchant\":\"m1\"}}\n",
        i % KEYS,
        T0 + i as i64 * 100,
        i % 13
    )
}

fn append(input: &Path, range: std::ops::Range<u64>) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(input)
        .unwrap();
    for i in range {
        f.write_all(line(i).as_bytes()).unwrap();
    }
    f.sync_all().unwrap();
}

fn config(dir: &Path, state: &Path) -> PathBuf {
    let text = format!(
        r#"
[pipeline]
state_dir = "{state}"
checkpoint_interval = "100ms"

[source]
type = "file"
path = "input.ndjson"
follow = true
poll_interval = "50ms"

{schema}
{watermark}
[[features]]
name = "count_10s"
agg = "count"
window = {{ type = "tumbling", size = "10s" }}

[[features]]
name = "amount_sum_10s"
agg = "sum"
field = "amount"
window = {{ type = "tumbling", size = "10s" }}
{sink}
"#,
        state = state.display(),
        schema = harness::SCHEMA,
        watermark = harness::watermark("1s"),
        sink = harness::file_sink(
            "out/features.ndjson",
            &["features", "window", "dead_letter", "late"]
        ),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A run with its metrics on a free port; returns it and that address.
fn start(dir: &Path) -> (Proc, String) {
    let metrics = harness::free_addr();
    let run = Proc::run(dir, Path::new("config.toml"), &metrics, "stderr.log");
    (run, metrics)
}

/// Checkpoints the run has committed, once its metrics endpoint answers.
fn checkpoints(metrics: &str) -> Option<f64> {
    harness::scrape(metrics).map(|page| harness::metric_sum(&page, "shardflow_checkpoints_total"))
}

/// The effective user id, from /proc/self/status (`id -u` where there is no /proc).
fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let from_proc = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok());
    from_proc.unwrap_or_else(|| {
        let out = std::process::Command::new("id")
            .arg("-u")
            .output()
            .expect("neither /proc/self/status nor `id -u` tells the user id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("`id -u` prints a number")
    })
}

/// Says that the test did not run, and why, where it is seen: straight on
/// stderr (`eprintln!` would be captured, and shown only on failure) and in
/// the soak report.
fn skipped(reason: &str) {
    let line = format!("[reliability] disk faults: SKIPPED, not run: {reason}");
    let _ = writeln!(std::io::stderr(), "\n{line}");
    harness::append_report(&line);
}

fn feature_ids(dir: &Path) -> usize {
    ndjson(&dir.join("out/features.ndjson"))
        .iter()
        .filter(|v| v["kind"] == "features")
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Waits until `n` records came out, then until two more checkpoints
/// committed (what was read is committed, barring a barrier still on its way).
async fn wait_ids(dir: &Path, run: &mut Proc, metrics: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while feature_ids(dir) < n {
        run.assert_running();
        assert!(
            Instant::now() < deadline,
            "{} of {n} records",
            feature_ids(dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first = None;
    loop {
        let now = checkpoints(metrics);
        first = first.or(now);
        if let (Some(first), Some(now)) = (first, now) {
            if now >= first + 2.0 {
                return;
            }
        }
        run.assert_running();
        assert!(
            Instant::now() < deadline,
            "with all {n} records out, checkpoints committed: {first:?}, then {now:?} \
             (metrics on {metrics}); 2 more did not commit within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Feeds input until the run stops on its own; returns its exit code and stderr.
async fn feed_until_it_fails(dir: &Path, mut run: Proc, next: &mut u64) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = run.exited() {
            return (status.code().unwrap_or(-1), run.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "the run went on for 60 s on a broken state directory:\n{}",
            run.stderr()
        );
        append(&dir.join("input.ndjson"), *next..*next + 50);
        *next += 50;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_state_directory_is_fatal_and_leaves_state_usable() {
    let uid = euid();
    if uid != 0 {
        skipped(&format!(
            "mounting a tmpfs for the state directory needs root (CAP_SYS_ADMIN), \
             and this runs as uid {uid}; run it as root (e.g. in `docker run --privileged`)"
        ));
        return;
    }
    let fs = Tmpfs::mount("48m");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let state = fs.path.join("state");
    config(dir, &state);
    let input = dir.join("input.ndjson");
    let mut faults = Vec::new();

    // 1. Read-only from the start: no state can be created.
    fs.set_read_only(true);
    append(&input, 0..200);
    let mut next = 200;
    let (mut run, _) = start(dir);
    let status = run.wait(60).await;
    let log = run.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("Read-only file system") && log.contains(&state.display().to_string()),
        "the error names the cause and the directory:\n{log}"
    );
    faults.push("read-only at start");
    fs.set_read_only(false);

    // 2. A normal start, then the disk fills up under it.
    std::fs::remove_file(dir.join("stderr.log")).unwrap();
    let (mut run, metrics) = start(dir);
    wait_ids(dir, &mut run, &metrics, next as usize).await;
    let filler = fs.fill();
    let (code, log) = feed_until_it_fails(dir, run, &mut next).await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("No space left on device") && log.contains("checkpoint"),
        "the error names the cause:\n{log}"
    );
    faults.push("disk full while running");
    std::fs::remove_file(&filler).unwrap();

    // 3. Restart on the freed disk: the state opens and the run catches up.
    std::fs::remove_file(dir.join("stderr.log")).unwrap();
    let (mut run, metrics) = start(dir);
    wait_ids(dir, &mut run, &metrics, next as usize).await;

    // 4. A crash, and the file system comes back read-only (a remount
    //    under a live writer is refused by the kernel, so the fault arrives
    //    between runs): the start refuses at once, naming the cause.
    run.kill9();
    fs.set_read_only(true);
    std::fs::remove_file(dir.join("stderr.log")).unwrap();
    let (mut run, _) = start(dir);
    let status = run.wait(60).await;
    assert_eq!(status.code(), Some(1), "{}", run.stderr());
    assert!(
        run.stderr().contains("Read-only file system"),
        "{}",
        run.stderr()
    );
    faults.push("read-only with existing state");
    fs.set_read_only(false);

    // 5. Writable again: the run resumes from the last commit and finishes.
    let (mut run, metrics) = start(dir);
    append(&input, next..next + 100);
    next += 100;
    wait_ids(dir, &mut run, &metrics, next as usize).await;
    run.terminate(30).await;

    // Exactly once: every record's count is what the input implies.
    let out = ndjson(&dir.join("out/features.ndjson"));
    let features: Vec<_> = out
        .iter()
        .filter(|v| v["kind"] == "features")
        .cloned()
        .collect();
    let windows: Vec<_> = out
        .iter()
        .filter(|v| v["kind"] == "window")
        .cloned()
        .collect();
    let (features, repeated) = dedup(&features, &[]);
    let (windows, _) = dedup(&windows, &[]);
    assert_eq!(features.len(), next as usize);
    assert!(out
        .iter()
        .all(|v| v["kind"] != "dead_letter" && v["kind"] != "late"));
    let (per_event, window_counts) = harness::tumbling_counts(
        (0..next).map(|i| (format!("u{}", i % KEYS), T0 + i as i64 * 100)),
        WINDOW_MS,
    );
    let by_line: HashMap<u64, &serde_json::Value> = features
        .iter()
        .map(|(id, v)| (id.rsplit('/').next().unwrap().parse::<u64>().unwrap(), v))
        .collect();
    for (i, want) in per_event.iter().enumerate() {
        // File positions are 1-based line numbers.
        let got = &by_line[&(i as u64 + 1)]["features"]["count_10s"];
        assert_eq!(got.as_i64(), Some(*want), "record {i}");
    }
    for w in windows.values().filter(|w| w["feature"] == "count_10s") {
        let key = (
            w["key"].as_str().unwrap().to_owned(),
            w["window_end"].as_i64().unwrap(),
        );
        assert_eq!(w["value"].as_i64(), window_counts.get(&key).copied(), "{w}");
        assert_eq!(w["revision"], 0, "{w}");
    }
    report(&format!(
        "disk faults: {} injected ({}), each fatal with exit 1 and its cause; {next} records in, {} feature records out after dedup ({repeated} replayed copies), {} window results, state intact",
        faults.len(),
        faults.join(", "),
        features.len(),
        windows.len()
    ));
}
