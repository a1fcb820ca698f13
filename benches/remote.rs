//! Remote checkpoints (issue 20): how long a checkpoint of the `windows`
//! bench's state takes to reach S3 and to come back, and how many bytes it
//! sends, for 100 k and 1 M keys (`SHARDFLOW_BENCH_KEYS` lists others).
//!
//! The S3 side is the embedded S3-compatible server the tests use (s3s-fs
//! on a local directory, 127.0.0.1), so the numbers are shardflow's own
//! cost (RocksDB checkpoint, hashing, streaming, the manifest) plus a local
//! disk, not a network's.
//!
//! For each size: state from 10 events per key (tumbling 1 min count, sum,
//! max; a checkpoint every 250 k events), then
//! - `full`: the first remote checkpoint, every file sent;
//! - `incremental`: after 1 % more events and a commit, the next one (only
//!   new SST files are sent; criterion times it over several rounds);
//! - `restore`: the newest checkpoint downloaded into an empty directory
//!   and opened.

#[path = "../tests/s3/mod.rs"]
mod s3;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, SamplingMode};
use shardflow::config::Config;
use shardflow::engine::Engine;
use shardflow::record::{Event, FieldValue, Position};
use shardflow::state::remote::RemoteStore;
use shardflow::state::StateStore;

const T0: i64 = 1_700_000_000_000;
const CHECKPOINT_EVERY: usize = 250_000;

fn config() -> Config {
    let window = r#"{ type = "tumbling", size = "1m" }"#;
    let text = format!(
        r#"
[source]
type = "generator"
[schema]
key = "userId"
timestamp = "ts"
fields = {{ amount = "f64" }}
[watermark]
max_out_of_orderness = "5s"
idle_timeout = "1d"
[[features]]
name = "count"
agg = "count"
window = {window}
[[features]]
name = "sum"
agg = "sum"
field = "amount"
window = {window}
[[features]]
name = "max"
agg = "max"
field = "amount"
window = {window}
[[sinks]]
type = "stdout"
kinds = ["features"]
"#
    );
    Config::from_str_at(&text, Path::new("bench.toml"), |_| None).expect("bench config")
}

/// Event `i` of a run over `keys` keys: 10 k events per second of event
/// time, keys drawn by a xorshift.
fn event(i: usize, keys: u64, rng: &mut u64, partition: &Arc<str>) -> Event {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    Event {
        position: Position::new(partition.clone(), i.to_string()),
        arrival: 0,
        key: format!("user-{}", *rng % keys).into(),
        event_time: T0 + (i as i64) / 10,
        fields: vec![Some(FieldValue::F64((*rng % 10_000) as f64 / 100.0))].into(),
        raw: Default::default(),
    }
}

/// A state directory fed by the engine, checkpoint by checkpoint.
struct Fed {
    dir: tempfile::TempDir,
    store: StateStore,
    engine: Engine,
    next: usize,
    checkpoint: u64,
    keys: u64,
    rng: u64,
    partition: Arc<str>,
}

impl Fed {
    fn new(config: &Config, keys: u64) -> Fed {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path(), &config.state_fingerprint(), false).unwrap();
        let engine = Engine::new(config, store.clone()).unwrap();
        Fed {
            dir,
            store,
            engine,
            next: 0,
            checkpoint: 0,
            keys,
            rng: 0x9E37_79B9_7F4A_7C15,
            partition: Arc::from("p0"),
        }
    }

    /// `n` more events, then a commit.
    fn feed(&mut self, n: usize) {
        let mut out = Vec::with_capacity(4096);
        for _ in 0..n {
            let e = event(self.next, self.keys, &mut self.rng, &self.partition);
            self.next += 1;
            self.engine.process(&e, 0, &mut out).unwrap();
            out.clear();
            if self.next.is_multiple_of(CHECKPOINT_EVERY) {
                self.commit(&e.position);
            }
        }
        let last = Position::new(self.partition.clone(), (self.next - 1).to_string());
        self.commit(&last);
    }

    fn commit(&mut self, last: &Position) {
        self.checkpoint += 1;
        let delta = self.engine.snapshot(self.checkpoint).unwrap();
        self.store
            .commit(self.checkpoint, delta, std::slice::from_ref(last))
            .unwrap();
        self.engine.committed(self.checkpoint);
    }

    /// A RocksDB checkpoint of the committed state, in a fresh directory.
    fn local_checkpoint(&self) -> (tempfile::TempDir, std::path::PathBuf) {
        let staging = tempfile::tempdir_in(self.dir.path().parent().unwrap()).unwrap();
        let dir = staging.path().join("checkpoint");
        self.store.create_checkpoint(&dir).unwrap();
        (staging, dir)
    }
}

fn keys_from_env() -> Vec<u64> {
    std::env::var("SHARDFLOW_BENCH_KEYS")
        .ok()
        .map(|v| v.split(',').filter_map(|k| k.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000])
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(s3::S3Server::start());
    runtime.block_on(server.create_bucket("bench"));
    let client = runtime.block_on(server.client());
    let config = config();
    let fingerprint = config.state_fingerprint();
    let mut table = Vec::new();

    let mut group = c.benchmark_group("remote_checkpoint");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for keys in keys_from_env() {
        let mut fed = Fed::new(&config, keys);
        let started = Instant::now();
        fed.feed(keys as usize * 10);
        let ingest = started.elapsed();
        let remote = RemoteStore::new(client.clone(), "bench", format!("k{keys}/"));

        let checkpoint_started = Instant::now();
        let (staging, dir) = fed.local_checkpoint();
        let local = checkpoint_started.elapsed();
        let full = runtime
            .block_on(remote.upload(&dir, fed.checkpoint, &fingerprint, serde_json::Value::Null))
            .unwrap();
        drop(staging);

        // Steady state: 1 % more events and a commit between uploads.
        let step = (keys as usize / 10).max(1_000);
        let mut last_incremental = None;
        group.bench_function(format!("incremental/{keys}_keys"), |b| {
            b.iter_custom(|rounds| {
                let mut total = Duration::ZERO;
                for _ in 0..rounds {
                    fed.feed(step);
                    let started = Instant::now();
                    let (staging, dir) = fed.local_checkpoint();
                    let report = runtime
                        .block_on(remote.upload(
                            &dir,
                            fed.checkpoint,
                            &fingerprint,
                            serde_json::Value::Null,
                        ))
                        .unwrap();
                    total += started.elapsed();
                    drop(staging);
                    last_incremental = Some(report);
                }
                total
            })
        });

        let restore_to = tempfile::tempdir().unwrap();
        let dest = restore_to.path().join("state");
        let started = Instant::now();
        let restored = runtime
            .block_on(remote.restore_newest(&dest, &fingerprint))
            .unwrap();
        let reopened = StateStore::open(&dest, &fingerprint, false).unwrap();
        let restore = started.elapsed();
        assert_eq!(reopened.committed_checkpoint().unwrap(), fed.checkpoint);

        let inc = last_incremental.expect("at least one incremental round");
        table.push(format!(
            "{keys:>9} {:>8.1}s {:>9.0}ms {:>9.0}ms {:>9.1} {:>6} {:>9.0}ms {:>9.2} {:>6}/{:<6} {:>9.0}ms {:>9.1}",
            ingest.as_secs_f64(),
            local.as_secs_f64() * 1e3,
            full.duration.as_secs_f64() * 1e3,
            mib(full.bytes_uploaded),
            full.files_uploaded,
            inc.duration.as_secs_f64() * 1e3,
            mib(inc.bytes_uploaded),
            inc.files_uploaded,
            inc.total_files,
            restore.as_secs_f64() * 1e3,
            mib(restored.bytes),
        ));
    }
    group.finish();
    println!(
        "\nremote checkpoints (state of 10 events per key, tumbling 1 min count/sum/max; incremental after {}% more events):",
        1
    );
    println!(
        "{:>9} {:>9} {:>11} {:>11} {:>9} {:>6} {:>11} {:>9} {:>13} {:>11} {:>9}",
        "keys",
        "ingest",
        "local ckpt",
        "full up",
        "full MiB",
        "files",
        "incr up",
        "incr MiB",
        "sent/files",
        "restore",
        "rest MiB"
    );
    for row in table {
        println!("{row}");
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
