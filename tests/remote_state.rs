//! State that survives the machine: `shardflow run` with a
//! `[checkpoint_store]` in the embedded S3-compatible server, driven like a
//! user drives it.
//!
//! - Machine loss: a followed file grows while the run is SIGKILLed at
//!   random moments; after some kills its state directory is deleted too
//!   (the machine is gone), so the restart restores the newest remote
//!   checkpoint. Deduplicated by id, the outputs equal an uninterrupted
//!   run's, and no window fired twice (nothing counted twice).
//! - Damaged checkpoints: the newest one with a file missing is skipped for
//!   the one before, with a warning; with none usable the run fails with
//!   exit 1 and says why, never starting fresh.
//! - Local state older than the remote one is refused, naming
//!   `--restore-remote` and `--reset-state`; both flags then do what they
//!   say. A store that cannot be reached is a clear error at start.

mod harness;
mod s3;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{dedup, knob, ndjson, Proc};
use rand::{Rng as _, SeedableRng as _};
use s3::S3Server;

const KEYS: u64 = 20;
const T0: i64 = 1_700_000_000_000;
const STEP_MS: i64 = 100;
const BUCKET: &str = "state";

/// Record `i`: every 101st is malformed (a dead letter).
fn record(i: u64) -> String {
    if i % 101 == 100 {
        return format!(r#"{{"userId":"u{}","timestamp":"#, i % KEYS);
    }
    format!(
        r#"{{"userId":"u{}","timestamp":{},"amount":{}.5,"merchant":"m{}"}}"#,
        i % KEYS,
        T0 + i as i64 * STEP_MS,
        i % 89,
        i % 5
    )
}

fn is_good(i: u64) -> bool {
    i % 101 != 100
}

/// Credentials the embedded server accepts, over the harness's dummy ones.
const S3_ENV: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
    ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
];

/// A run's directory and config: `input.ndjson` (followed or not), state in
/// `state/`, checkpoints also in `s3://state/<prefix>` (unless `prefix` is
/// None), outputs in `out/`.
fn setup(
    root: &Path,
    name: &str,
    url: &str,
    prefix: Option<&str>,
    follow: bool,
    every: u32,
) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("input.ndjson"))
        .unwrap();
    let store = prefix.map_or(String::new(), |p| {
        format!(
            "\n[checkpoint_store]\ntype = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"{p}\"\nevery = {every}\nretain = 2\nendpoint_url = \"{url}\"\nmax_attempts = 3\n"
        )
    });
    let config = format!(
        r#"
[pipeline]
state_dir = "state"
checkpoint_interval = "200ms"
batch_size = 64
{store}
[source]
type = "file"
path = "input.ndjson"
follow = {follow}
poll_interval = "50ms"

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
name = "merchants_1m"
agg = "distinct_count"
field = "merchant"
window = {{ type = "tumbling", size = "1m" }}
{sinks}
"#,
        schema = harness::SCHEMA,
        watermark = harness::watermark("1s"),
        sinks = [
            harness::file_sink("out/features.ndjson", &["features"]),
            harness::file_sink("out/windows.ndjson", &["window"]),
            harness::file_sink("out/dead.ndjson", &["dead_letter", "late"]),
        ]
        .concat()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    dir
}

fn start(dir: &Path, args: &[&str]) -> Proc {
    Proc::run_with(
        dir,
        Path::new("config.toml"),
        "off",
        "stderr.log",
        "warn,shardflow::checkpoint=info",
        args,
        &S3_ENV,
    )
}

fn append(dir: &Path, records: impl Iterator<Item = u64>) {
    let mut text = String::new();
    for i in records {
        text.push_str(&record(i));
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("input.ndjson"))
        .unwrap();
    // One write: the source never sees half a line it cannot wait out.
    f.write_all(text.as_bytes()).unwrap();
}

/// Distinct feature-record and dead-letter ids written so far.
fn progress(dir: &Path) -> (usize, usize) {
    let ids = |file: &str| {
        ndjson(&dir.join("out").join(file))
            .iter()
            .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
            .collect::<BTreeSet<_>>()
            .len()
    };
    (ids("features.ndjson"), ids("dead.ndjson"))
}

async fn wait_for(procs: &mut [&mut Proc], dirs: &[&Path], want: (usize, usize), secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !dirs.iter().all(|d| progress(d) == want) {
        for p in procs.iter_mut() {
            p.assert_running();
        }
        assert!(
            Instant::now() < deadline,
            "within {secs} s: want {want:?} (feature records, dead letters), have {:?}",
            dirs.iter().map(|d| progress(d)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checkpoint ids of the remote manifests under `prefix`, ascending.
async fn manifests(server: &S3Server, prefix: &str) -> Vec<u64> {
    server
        .list(BUCKET, &format!("{prefix}manifests/"))
        .await
        .iter()
        .filter_map(|(k, _)| k.rsplit('/').next()?.strip_suffix(".json")?.parse().ok())
        .collect()
}

/// Waits until the store holds a manifest with an id above `above`.
async fn wait_for_manifest(server: &S3Server, prefix: &str, above: u64, run: &mut Proc) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(&newest) = manifests(server, prefix).await.last() {
            if newest > above {
                return newest;
            }
        }
        run.assert_running();
        assert!(
            Instant::now() < deadline,
            "no remote checkpoint above {above} within 60 s:\n{}",
            run.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The machine is gone: its state directory (and the upload staging beside it).
fn lose_machine(dir: &Path) {
    for d in ["state", "state.upload"] {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }
}

struct Outputs {
    features: BTreeMap<String, serde_json::Value>,
    windows: BTreeMap<String, serde_json::Value>,
    dead: BTreeMap<String, serde_json::Value>,
    repeated: usize,
}

fn outputs(dir: &Path) -> Outputs {
    let out = dir.join("out");
    let (features, r1) = dedup(&ndjson(&out.join("features.ndjson")), &[]);
    let (windows, r2) = dedup(&ndjson(&out.join("windows.ndjson")), &[]);
    let (dead, r3) = dedup(&ndjson(&out.join("dead.ndjson")), &[]);
    Outputs {
        features,
        windows,
        dead,
        repeated: r1 + r2 + r3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_machine_at_random_moments_changes_no_result() {
    let kills = knob("SHARDFLOW_REMOTE_KILLS", 4).max(2);
    let n = knob("SHARDFLOW_REMOTE_RECORDS", 3_000).max(KEYS * 4);
    let seed = knob("SHARDFLOW_REMOTE_SEED", rand::random::<u32>() as u64);
    eprintln!("schedule seed {seed} (SHARDFLOW_REMOTE_SEED={seed} replays it)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    let server = S3Server::start().await;
    server.create_bucket(BUCKET).await;
    let root = tempfile::tempdir().unwrap();
    let reference_dir = setup(
        root.path(),
        "reference",
        &server.url(),
        Some("ref/"),
        true,
        1,
    );
    let crash_dir = setup(root.path(), "crashed", &server.url(), Some("p/"), true, 1);

    append(&reference_dir, 0..KEYS);
    append(&crash_dir, 0..KEYS);
    let mut reference = start(&reference_dir, &[]);
    let mut crashed = start(&crash_dir, &[]);
    wait_for(
        &mut [&mut reference, &mut crashed],
        &[&reference_dir, &crash_dir],
        (KEYS as usize, 0),
        120,
    )
    .await;

    // The input grows in chunks over the whole schedule; each kill comes
    // once the run has made a remote checkpoint since its (re)start, so a
    // lost machine always has one to come back from.
    let chunks: Vec<Vec<u64>> = (KEYS..n)
        .collect::<Vec<_>>()
        .chunks(((n - KEYS) / (kills * 3)).max(1) as usize)
        .map(<[u64]>::to_vec)
        .collect();
    let mut chunks = chunks.into_iter();
    let mut restored = 0;
    let mut newest = 0;
    for k in 0..kills {
        for _ in 0..3 {
            if let Some(c) = chunks.next() {
                append(&reference_dir, c.iter().copied());
                append(&crash_dir, c.into_iter());
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
            }
        }
        newest = wait_for_manifest(&server, "p/", newest, &mut crashed).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        crashed.kill9();
        // The next kill waits for a checkpoint of the next run: one the
        // killed run finished meanwhile (its upload ran during the sleep
        // above, or was on the wire at the kill) must not count, or the
        // next run could be killed before it has restored anything.
        tokio::time::sleep(Duration::from_millis(100)).await;
        newest = manifests(&server, "p/")
            .await
            .last()
            .copied()
            .unwrap_or(newest);
        // Every other kill (and at least once) the machine is lost too.
        let lost = k % 2 == 1 || rng.random_bool(0.3);
        if lost {
            lose_machine(&crash_dir);
            restored += 1;
        }
        eprintln!("kill {} of {kills}, state lost: {lost}", k + 1);
        crashed = start(&crash_dir, &[]);
    }
    for c in chunks {
        append(&reference_dir, c.iter().copied());
        append(&crash_dir, c.into_iter());
    }

    let good = (0..n).filter(|&i| is_good(i)).count();
    wait_for(
        &mut [&mut reference, &mut crashed],
        &[&reference_dir, &crash_dir],
        (good, n as usize - good),
        300,
    )
    .await;
    // The record that moves the watermark fires windows; let the last
    // batch reach the files, then stop both cleanly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    crashed.terminate(60).await;
    reference.terminate(60).await;

    let log = std::fs::read_to_string(crash_dir.join("stderr.log")).unwrap();
    assert_eq!(
        log.matches("state restored from the remote checkpoint")
            .count(),
        restored,
        "every lost machine came back from a remote checkpoint:\n{log}"
    );
    let want = outputs(&reference_dir);
    let got = outputs(&crash_dir);
    assert_eq!(want.repeated, 0, "the uninterrupted run repeated outputs");
    harness::assert_same("feature records", &got.features, &want.features);
    harness::assert_same("window results", &got.windows, &want.windows);
    harness::assert_same("dead letters", &got.dead, &want.dead);
    assert!(
        got.windows.values().all(|w| w["revision"] == 0),
        "no window fired twice"
    );
    assert!(!got.windows.is_empty());

    // A clean stop leaves the remote store current: the newest remote
    // checkpoint is the last local one.
    let local = shardflow::state::StateStore::open(
        &crash_dir.join("state"),
        &shardflow::config::Config::load(&crash_dir.join("config.toml"))
            .unwrap()
            .state_fingerprint(),
        false,
    )
    .unwrap()
    .committed_checkpoint()
    .unwrap();
    assert_eq!(manifests(&server, "p/").await.last(), Some(&local));
    assert!(manifests(&server, "p/").await.len() <= 2, "retain = 2");
}

/// Runs `dir`'s config until it exits by itself (an error); returns stderr.
async fn run_to_exit(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut p = start(dir, args);
    let status = p.wait(120).await;
    (status, p.stderr())
}

/// Feature records written so far, repeats included.
fn feature_lines(dir: &Path) -> usize {
    ndjson(&dir.join("out/features.ndjson")).len()
}

/// Runs `dir`'s config (a followed file) until `done` holds and
/// `checkpoints` more remote checkpoints than there were are written (time
/// for the source to read what it would), then stops it cleanly (which
/// commits, and uploads, what it read); returns stderr.
async fn run_until(
    server: &S3Server,
    prefix: &str,
    dir: &Path,
    args: &[&str],
    checkpoints: usize,
    done: impl Fn() -> bool,
) -> String {
    let mut p = start(dir, args);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        p.assert_running();
        assert!(
            Instant::now() < deadline,
            "not done within 120 s:\n{}",
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut newest = manifests(server, prefix).await.last().copied().unwrap_or(0);
    for _ in 0..checkpoints {
        newest = wait_for_manifest(server, prefix, newest, &mut p).await;
    }
    p.terminate(60).await;
    p_stderr(dir)
}

fn p_stderr(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}

fn good_below(n: u64) -> usize {
    (0..n).filter(|&i| is_good(i)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_remote_checkpoints_fall_back_and_none_usable_is_an_error() {
    let server = S3Server::start().await;
    server.create_bucket(BUCKET).await;
    let root = tempfile::tempdir().unwrap();
    let dir = setup(
        root.path(),
        "run",
        &server.url(),
        Some("d/"),
        true,
        1_000_000,
    );

    // Two runs over a growing file, each stopped cleanly once it read all:
    // the older remote checkpoint has read 300 records, the newer 600.
    append(&dir, 0..300);
    run_until(&server, "d/", &dir, &[], 0, || {
        progress(&dir).0 == good_below(300)
    })
    .await;
    let older = *manifests(&server, "d/").await.last().unwrap();
    append(&dir, 300..600);
    run_until(&server, "d/", &dir, &[], 0, || {
        progress(&dir).0 == good_below(600)
    })
    .await;
    let ids = manifests(&server, "d/").await;
    assert_eq!(ids.len(), 2, "retain = 2: {ids:?}");
    assert_eq!(ids[0], older);
    let newer = ids[1];

    // The machine is lost, and a file only the newest checkpoint names is
    // gone: the restore takes the older one, with a warning, and the run
    // reads again what came after it, to the same outputs.
    let files = |id: u64| {
        let server = &server;
        async move {
            let key = format!("d/manifests/{id:020}.json");
            let m: serde_json::Value =
                serde_json::from_slice(&server.get(BUCKET, &key).await).unwrap();
            m["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["key"].as_str().unwrap().to_owned())
                .collect::<BTreeSet<_>>()
        }
    };
    let only_newer: Vec<String> = files(newer)
        .await
        .difference(&files(older).await)
        .cloned()
        .collect();
    assert!(!only_newer.is_empty());
    let client = server.client().await;
    client
        .delete_object()
        .bucket(BUCKET)
        .key(format!("d/{}", only_newer[0]))
        .send()
        .await
        .unwrap();
    let before = outputs(&dir);
    let lines = feature_lines(&dir);
    lose_machine(&dir);
    std::fs::write(dir.join("stderr.log"), "").unwrap();
    let again = good_below(600) - good_below(300);
    let err = run_until(&server, "d/", &dir, &[], 0, || {
        feature_lines(&dir) >= lines + again
    })
    .await;
    assert!(
        err.contains("remote checkpoint unusable") && err.contains(&format!("checkpoint={newer}")),
        "a warning names the damaged checkpoint:\n{err}"
    );
    assert!(
        err.contains("state restored from the remote checkpoint"),
        "{err}"
    );
    let after = outputs(&dir);
    harness::assert_same("feature records", &after.features, &before.features);
    harness::assert_same("window results", &after.windows, &before.windows);
    assert_eq!(
        feature_lines(&dir),
        lines + again,
        "exactly the records after the older checkpoint, again"
    );

    // Every checkpoint damaged: a clear error and exit 1, no fresh start.
    for (key, _) in server.list(BUCKET, "d/files/").await {
        client
            .delete_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
    }
    lose_machine(&dir);
    let lines = feature_lines(&dir);
    let (status, err) = run_to_exit(&dir, &[]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("checkpoint store s3://{BUCKET}/d:")) && err.contains("usable"),
        "the error names the store and says no checkpoint is usable:\n{err}"
    );
    assert_eq!(
        feature_lines(&dir),
        lines,
        "nothing was produced from a fresh start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_local_state_is_refused_and_the_flags_choose() {
    let server = S3Server::start().await;
    server.create_bucket(BUCKET).await;
    let root = tempfile::tempdir().unwrap();
    let dir = setup(root.path(), "run", &server.url(), Some("o/"), true, 1);

    append(&dir, 0..200);
    run_until(&server, "o/", &dir, &[], 2, || {
        progress(&dir).0 == good_below(200)
    })
    .await;
    // A copy of this state stays behind while another run moves on.
    let copy = root.path().join("old-state");
    copy_dir(&dir.join("state"), &copy);
    append(&dir, 200..400);
    run_until(&server, "o/", &dir, &[], 2, || {
        progress(&dir).0 == good_below(400)
    })
    .await;
    let newest = *manifests(&server, "o/").await.last().unwrap();

    lose_machine(&dir);
    copy_dir(&copy, &dir.join("state"));
    let (status, err) = run_to_exit(&dir, &[]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("older than the newest remote checkpoint {newest}"))
            && err.contains("--restore-remote")
            && err.contains("--reset-state"),
        "{err}"
    );

    // --restore-remote takes the remote state, which had read everything.
    let lines = feature_lines(&dir);
    run_until(&server, "o/", &dir, &["--restore-remote"], 2, || true).await;
    assert_eq!(feature_lines(&dir), lines, "nothing read again");

    // --reset-state starts over (everything read again), and its
    // checkpoints are the newest in the store from then on.
    let newest = *manifests(&server, "o/").await.last().unwrap();
    run_until(&server, "o/", &dir, &["--reset-state"], 2, || {
        feature_lines(&dir) == lines + good_below(400)
    })
    .await;
    assert!(*manifests(&server, "o/").await.last().unwrap() > newest);
    let lines = feature_lines(&dir);
    run_until(&server, "o/", &dir, &[], 2, || true).await;
    assert_eq!(
        feature_lines(&dir),
        lines,
        "the reset state is taken up, not refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_a_clear_error_at_start() {
    let server = S3Server::start().await;
    let root = tempfile::tempdir().unwrap();
    // No bucket: the store cannot be listed.
    let dir = setup(root.path(), "run", &server.url(), Some("x/"), true, 1);
    append(&dir, 0..10);
    let (status, err) = run_to_exit(&dir, &[]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("checkpoint store s3://{BUCKET}/x:")),
        "{err}"
    );
    assert!(!dir.join("out/features.ndjson").exists() || progress(&dir).0 == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_never_blocks_local_checkpoints() {
    let server = S3Server::start().await;
    server.create_bucket(BUCKET).await;
    let root = tempfile::tempdir().unwrap();
    let dir = setup(root.path(), "run", &server.url(), Some("f/"), true, 1);
    append(&dir, 0..100);
    let metrics = harness::free_addr();
    let mut p = Proc::run_with(
        &dir,
        Path::new("config.toml"),
        &metrics,
        "stderr.log",
        "warn,shardflow::checkpoint=info",
        &[],
        &S3_ENV,
    );
    wait_for_manifest(&server, "f/", 0, &mut p).await;
    let scrape =
        |name: &str| harness::scrape(&metrics).map_or(0.0, |page| harness::metric_sum(&page, name));

    // The store goes away: uploads fail and are retried, while local
    // checkpoints go on and the input is still read and written.
    drop(server);
    let checkpoints = scrape("shardflow_checkpoints_total");
    append(&dir, 100..200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(scrape("shardflow_remote_checkpoint_failures_total") >= 2.0
        && scrape("shardflow_checkpoints_total") >= checkpoints + 10.0
        && progress(&dir).0 == good_below(200))
    {
        p.assert_running();
        assert!(
            Instant::now() < deadline,
            "with the store gone: {} failed uploads, {} local checkpoints after {checkpoints}, {:?} outputs:\n{}",
            scrape("shardflow_remote_checkpoint_failures_total"),
            scrape("shardflow_checkpoints_total"),
            progress(&dir),
            p.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A clean stop cannot upload its final checkpoint: it says so, exit 1,
    // with the state committed locally.
    harness::signal(p.pid(), "TERM");
    let status = p.wait(120).await;
    let err = p.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("committed locally but not in s3://state/f"),
        "{err}"
    );
    assert!(
        err.contains("remote checkpoint failed; local checkpoints go on"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
