//! Scale-out (issue 21): what a cluster of `shardflow run` workers costs in
//! time and in DynamoDB requests. A bench binary rather than criterion:
//! every number is a whole-process timing (workers started, SIGKILLed,
//! SIGTERMed), printed as a table. Everything runs on 127.0.0.1, as in
//! `tests/cluster.rs`: the embedded ferrokinesis (the stream), dynoxide (the
//! lease table, behind a counting proxy) and s3s-fs (shard snapshots), the
//! workers being the real binary as child processes. Numbers are those of
//! whatever profile built it (`cargo bench --profile dev` is what they were
//! taken with: the lease protocol's timing dominates, not CPU).
//!
//! - `failover`: three workers on an 8-shard stream under a steady producer
//!   (200 events/s over 64 keys, partition key = entity key). One worker is
//!   SIGKILLed; timed until every shard it held is processing again: an
//!   event put to that shard after the kill is in a survivor's output. The
//!   survivors' logs give the phases (lease taken, state restored). Then
//!   the worker is restarted under a new name and the cluster rebalanced
//!   before the next round. p50 (nearest rank) and max over the rounds.
//! - `handoff`: a 2-shard stream with 10 k / 100 k distinct keys per shard,
//!   all on one worker `a`. Worker `b` joins and steals a shard by graceful
//!   handoff: timed from the steal request (b's log) until b's output holds
//!   a probe event of that shard put after it. Then `a` is SIGTERMed: timed
//!   until b processes a probe of a's other shard put after the signal.
//!   Snapshot bytes are the S3 objects the lease names.
//! - `throughput`: 1, 2 and 3 workers on one machine, 8 shards, the events
//!   pre-loaded, the workers started together: events/s from the start
//!   (lease creation, assignment and rebalancing included), and over what
//!   is left once the table is balanced (the first worker takes every
//!   lease; the others steal one at a time).
//! - `dynamo`: DynamoDB requests per second by operation at steady state,
//!   three workers on 8 shards, counted by a TCP proxy in front of the
//!   emulator (by `X-Amz-Target`; answers of status >= 400 counted as
//!   refused), and what they cost on demand; the S3 requests of the shard
//!   snapshots likewise (a proxy in front of s3s-fs, by method), since a
//!   user pays for those too. With the defaults and with the timings of
//!   `tests/cluster.rs`, idle (every shard read before) and at 200 events/s.
//!
//! Outputs go to a `stdout` sink redirected to a file: it writes each batch
//! at once, where a file sink flushes at checkpoints only, which would add
//! up to `checkpoint_interval` to every "processing again".
//!
//! ```sh
//! cargo bench --profile dev --bench cluster                 # everything
//! cargo bench --profile dev --bench cluster -- failover     # one part
//! SHARDFLOW_BENCH_FAILOVER=3s:10,10s:3 SHARDFLOW_BENCH_HANDOFF_KEYS=10000,100000 \
//! SHARDFLOW_BENCH_EVENTS=600000 SHARDFLOW_BENCH_WORKERS=1,2,3 SHARDFLOW_BENCH_DYNAMO_SECS=30 \
//!   cargo bench --profile dev --bench cluster
//! ```

#[path = "../tests/dynamo/mod.rs"]
mod dynamo;
#[path = "../tests/emulator/mod.rs"]
mod emulator;
#[path = "../tests/harness/mod.rs"]
mod harness;
#[path = "../tests/s3/mod.rs"]
mod s3;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use dynamo::DynamoServer;
use emulator::Emulator;
use harness::Proc;
use s3::S3Server;
use shardflow::cluster::{Checkpoint, HashKeyRange, Lease, LeaseTable};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const STREAM: &str = "bench";
const BUCKET: &str = "state";
/// Event time of counter 0: a fixed day, so a 1-day count holds every event.
const T0: u64 = 1_700_000_000_000;
/// The workers' `RUST_LOG` (`SHARDFLOW_BENCH_LOG` overrides): the info
/// lines the phases are read from (lease moves, subscriptions, the engine
/// adopting a shard's state).
const LOG_LEVEL: &str =
    "warn,shardflow::cluster=info,shardflow::pipeline::engine=info,shardflow::source::kinesis=info";
const S3_ENV: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
    ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
];
/// On-demand prices (us-east-1, standard table class), dollars per million
/// request units.
const WRITE_PRICE: f64 = 1.25;
const READ_PRICE: f64 = 0.25;
/// S3 Standard requests, dollars per million.
const S3_PUT_PRICE: f64 = 5.0;
const S3_GET_PRICE: f64 = 0.4;
const MONTH_SECS: f64 = 30.0 * 86_400.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
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
    init();
    println!(
        "cluster bench: shardflow = {} (profile of this build: {})",
        env!("CARGO_BIN_EXE_shardflow"),
        if cfg!(debug_assertions) {
            "dev (debug assertions on)"
        } else {
            "optimised"
        }
    );
    if wanted("failover") {
        for plan in env_list("SHARDFLOW_BENCH_FAILOVER", "3s:10,10s:3") {
            let (time, reps) = plan.split_once(':').unwrap_or((&plan, "10"));
            failover(time, reps.parse().expect("rounds")).await;
        }
    }
    if wanted("handoff") {
        for keys in env_list("SHARDFLOW_BENCH_HANDOFF_KEYS", "10000,100000") {
            handoff(keys.parse().expect("keys per shard")).await;
        }
    }
    if wanted("throughput") {
        let counts: Vec<usize> = env_list("SHARDFLOW_BENCH_WORKERS", "1,2,3")
            .iter()
            .map(|n| n.parse().expect("worker count"))
            .collect();
        throughput(env_or("SHARDFLOW_BENCH_EVENTS", 600_000), &counts).await;
    }
    if wanted("dynamo") {
        dynamo_calls(env_or("SHARDFLOW_BENCH_DYNAMO_SECS", 30)).await;
    }
}

/// Credentials for all three emulators in this process, S3's last (the
/// only server that checks who signs).
fn init() {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var(
            "RUST_LOG",
            "warn,ferrokinesis=error,dynoxide=error,s3s=error,s3s_fs=error",
        );
    }
    emulator::init();
    dynamo::init();
    s3::init();
}

/// Wall clock in microseconds: what log timestamps, puts and polls share.
fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn secs(us: i64) -> f64 {
    us as f64 / 1e6
}

// ---------------------------------------------------------------- peers --

/// The stream, the lease table's server (workers reach it through the
/// counting proxy; the bench's own observer goes direct, uncounted) and the
/// snapshot store.
struct Peers {
    kinesis: Emulator,
    dynamo: DynamoServer,
    proxy: Proxy,
    s3: S3Server,
    s3_proxy: Proxy,
    client: aws_sdk_kinesis::Client,
}

impl Peers {
    async fn start(shards: i32) -> Peers {
        let kinesis = Emulator::start(emulator::options()).await;
        let client = kinesis.client().await;
        emulator::create_stream(&client, STREAM, shards).await;
        let dynamo = DynamoServer::start().await;
        let proxy = Proxy::start(dynamo.addr, Protocol::Dynamo).await;
        let s3 = S3Server::start().await;
        s3.create_bucket(BUCKET).await;
        let s3_proxy = Proxy::start(s3.addr, Protocol::S3).await;
        Peers {
            kinesis,
            dynamo,
            proxy,
            s3,
            s3_proxy,
            client,
        }
    }
}

/// What a group of workers shares: their table, consumer, snapshot prefix,
/// stream and timings.
#[derive(Clone)]
struct Setup {
    table: String,
    consumer: String,
    prefix: String,
    stream: String,
    failover: String,
    checkpoint: String,
    refresh: String,
    handoff_timeout: String,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        Setup {
            table: format!("leases-{tag}"),
            consumer: format!("bench-{tag}"),
            prefix: tag.to_owned(),
            stream: STREAM.to_owned(),
            failover: "3s".into(),
            checkpoint: "1s".into(),
            refresh: "30s".into(),
            handoff_timeout: "30s".into(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "failover_time {}, checkpoint_interval {}, shard_refresh_interval {}, handoff_timeout {}",
            self.failover, self.checkpoint, self.refresh, self.handoff_timeout
        )
    }

    /// Writes `root/name/config.toml` and starts `shardflow run` there.
    fn start(&self, root: &Path, name: &str, p: &Peers) -> Worker {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            r#"
[pipeline]
state_dir = "state"
checkpoint_interval = "{checkpoint}"

[checkpoint_store]
type = "s3"
bucket = "{BUCKET}"
prefix = "{prefix}"
endpoint_url = "{s3}"
max_attempts = 3

[cluster]
lease_table = "{table}"
worker_id = "{name}"
failover_time = "{failover}"
handoff_timeout = "{handoff_timeout}"
endpoint_url = "{dynamo}"

[source]
type = "kinesis"
stream_name = "{stream}"
consumer_name = "{consumer}"
starting_position = "trim_horizon"
endpoint_url = "{kinesis}"
shard_refresh_interval = "{refresh}"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ n = "i64" }}

[watermark]
max_out_of_orderness = "1h"
idle_timeout = "1h"

[[features]]
name = "count_1d"
agg = "count"
window = {{ type = "tumbling", size = "1d" }}

# stdout (to a file): written at once per batch; a file sink flushes at
# checkpoints only, which would add up to checkpoint_interval to every
# "processing again" below.
[[sinks]]
type = "stdout"
kinds = ["features", "dead_letter", "late"]
"#,
            checkpoint = self.checkpoint,
            prefix = self.prefix,
            s3 = p.s3_proxy.url(),
            table = self.table,
            failover = self.failover,
            handoff_timeout = self.handoff_timeout,
            dynamo = p.proxy.url(),
            stream = self.stream,
            consumer = self.consumer,
            kinesis = p.kinesis.url(),
            refresh = self.refresh,
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let proc = Proc::run_with_stdout(
            &dir,
            Path::new("config.toml"),
            "off",
            "stderr.log",
            &std::env::var("SHARDFLOW_BENCH_LOG").unwrap_or_else(|_| LOG_LEVEL.into()),
            &[],
            &S3_ENV,
            "features.ndjson",
        );
        Worker {
            name: name.to_owned(),
            tail: Tail::new(dir.join("features.ndjson")),
            dir,
            proc: Some(proc),
            started_us: now_us(),
        }
    }
}

/// The workers' directories: removed at the end, or kept (and named) with
/// `SHARDFLOW_BENCH_KEEP=1` to read the logs afterwards.
struct Root(Option<tempfile::TempDir>);

impl Root {
    fn new() -> Root {
        Root(Some(tempfile::tempdir().unwrap()))
    }

    fn path(&self) -> &Path {
        self.0.as_ref().expect("present").path()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if std::env::var_os("SHARDFLOW_BENCH_KEEP").is_some() {
            if let Some(dir) = self.0.take() {
                println!("  (kept {})", dir.keep().display());
            }
        }
    }
}

/// One `shardflow run` (none once killed or stopped) and its output.
struct Worker {
    name: String,
    dir: PathBuf,
    proc: Option<Proc>,
    tail: Tail,
    started_us: i64,
}

impl Worker {
    fn log(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn alive(&self) -> bool {
        self.proc.is_some()
    }

    fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill9();
        }
    }

    async fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.terminate(60).await;
        }
    }

    fn check(&mut self) {
        if let Some(p) = &mut self.proc {
            p.assert_running();
        }
    }

    fn cpu_secs(&self) -> f64 {
        self.proc
            .as_ref()
            .map_or(0.0, |p| cpu_secs(&format!("/proc/{}/stat", p.pid())))
    }
}

/// User + system CPU time of a process, from its `stat` (100 ticks/s).
fn cpu_secs(stat: &str) -> f64 {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    let Some((_, rest)) = text.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn check_all(workers: &mut [Worker]) {
    for w in workers.iter_mut() {
        w.check();
    }
}

fn logs(workers: &[Worker]) -> String {
    workers
        .iter()
        .map(|w| format!("--- {} ---\n{}", w.name, w.stderr()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The lines an NDJSON file gained since the last call (complete lines only).
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The ids of the lines completed since the last call.
    fn ids(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        complete
            .split(|&b| b == b'\n')
            .filter_map(|l| {
                let s = std::str::from_utf8(l).ok()?;
                let i = s.find("\"id\":\"")? + 6;
                let j = s[i..].find('"')? + i;
                Some(s[i..j].to_owned())
            })
            .collect()
    }
}

/// Distinct output ids over every worker, as a deduplicating reader sees them.
#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    repeated: u64,
}

impl Seen {
    /// New distinct ids of the running workers' outputs: (worker, id, when).
    fn poll(&mut self, workers: &mut [Worker]) -> Vec<(usize, String, i64)> {
        let now = now_us();
        let mut out = Vec::new();
        for (i, w) in workers.iter_mut().enumerate() {
            if !w.alive() {
                continue;
            }
            for id in w.tail.ids() {
                if self.ids.insert(id.clone()) {
                    out.push((i, id, now));
                } else {
                    self.repeated += 1;
                }
            }
        }
        out
    }
}

fn shard_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(s, _)| s)
}

// ------------------------------------------------------------- producers --

fn event(key: &str, n: u64) -> Vec<u8> {
    format!(r#"{{"userId":"{key}","timestamp":{},"n":{n}}}"#, T0 + n).into_bytes()
}

/// Puts `(partition key = entity key, data)` records in PutRecords calls of
/// 500, retrying refused entries; returns each record's key and shard.
async fn preload(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    records: &[(String, Vec<u8>)],
) -> Vec<(String, String)> {
    let mut placed = Vec::with_capacity(records.len());
    for chunk in records.chunks(500) {
        let mut todo: Vec<&(String, Vec<u8>)> = chunk.iter().collect();
        for _ in 0..50 {
            let entries: Vec<_> = todo
                .iter()
                .map(|(k, d)| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(k)
                        .data(Blob::new(d.clone()))
                        .build()
                        .unwrap()
                })
                .collect();
            let out = client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await
                .expect("PutRecords");
            let mut retry = Vec::new();
            for (r, rec) in out.records.iter().zip(todo) {
                match (&r.shard_id, &r.error_code) {
                    (Some(shard), None) => placed.push((rec.0.clone(), shard.clone())),
                    _ => retry.push(rec),
                }
            }
            todo = retry;
            if todo.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(todo.is_empty(), "PutRecords kept refusing entries");
    }
    placed
}

/// A steady producer: every `period`, one PutRecords of `per_tick` events
/// cycling over `keys` (each key's counter `n` from `first_n`). Remembers
/// when the call carrying each record id started. Stops when dropped.
struct Producer {
    puts: Arc<Mutex<HashMap<String, i64>>>,
    sent: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Producer {
    fn start(
        client: aws_sdk_kinesis::Client,
        stream: &str,
        keys: Vec<String>,
        per_tick: usize,
        period: Duration,
        first_n: u64,
    ) -> Producer {
        let puts: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
        let sent = Arc::new(AtomicU64::new(0));
        let stream = stream.to_owned();
        let task = {
            let (puts, sent) = (puts.clone(), sent.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = 0u64;
                loop {
                    tick.tick().await;
                    let entries: Vec<_> = (0..per_tick)
                        .map(|j| {
                            let at = i + j as u64;
                            let key = &keys[(at % keys.len() as u64) as usize];
                            let n = first_n + at / keys.len() as u64;
                            PutRecordsRequestEntry::builder()
                                .partition_key(key)
                                .data(Blob::new(event(key, n)))
                                .build()
                                .unwrap()
                        })
                        .collect();
                    i += per_tick as u64;
                    let at = now_us();
                    // A refused entry or a failed call is simply not
                    // measured.
                    let Ok(out) = client
                        .put_records()
                        .stream_name(&stream)
                        .set_records(Some(entries))
                        .send()
                        .await
                    else {
                        continue;
                    };
                    let mut puts = puts.lock().unwrap();
                    for r in out.records {
                        if let (Some(s), Some(q)) = (r.shard_id, r.sequence_number) {
                            puts.insert(format!("{s}/{q}"), at);
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Producer { puts, sent, task }
    }

    /// When the call that put record `id` started.
    fn put_at(&self, id: &str) -> Option<i64> {
        self.puts.lock().unwrap().get(id).copied()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- leases --

async fn list(obs: &LeaseTable) -> Vec<Lease> {
    obs.list().await.unwrap_or_default()
}

/// Every shard leased by a live worker, none in a handoff, each live worker
/// within one lease of the others.
fn balanced(leases: &[Lease], alive: &[&str], shards: usize) -> bool {
    if leases.len() != shards {
        return false;
    }
    let mut per: BTreeMap<&str, usize> = alive.iter().map(|a| (*a, 0)).collect();
    for l in leases {
        if l.handoff_pending() {
            return false;
        }
        match l.owner.as_deref().and_then(|o| per.get_mut(o)) {
            Some(c) => *c += 1,
            None => return false,
        }
    }
    let min = per.values().min().copied().unwrap_or(0);
    let max = per.values().max().copied().unwrap_or(0);
    max - min <= 1
}

fn owner_counts(leases: &[Lease]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in leases {
        let o = l.actual_owner().unwrap_or("-").to_owned();
        *out.entry(o).or_default() += 1;
    }
    out
}

/// Waits (at most `secs`) until the lease table is balanced over the live
/// workers and, with a producer, every shard has had an event put after
/// that moment come out. Returns the seconds waited.
async fn wait_steady(
    obs: &LeaseTable,
    workers: &mut [Worker],
    seen: &mut Seen,
    producer: Option<&Producer>,
    shards: usize,
    secs: u64,
) -> f64 {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut balanced_at: Option<i64> = None;
    let mut fresh: HashSet<String> = HashSet::new();
    let mut round = 0u64;
    loop {
        for (_, id, _) in seen.poll(workers) {
            if let (Some(b), Some(put)) = (balanced_at, producer.and_then(|p| p.put_at(&id))) {
                if put > b {
                    fresh.insert(shard_of(&id).to_owned());
                }
            }
        }
        if round.is_multiple_of(5) {
            let leases = list(obs).await;
            let alive: Vec<&str> = workers
                .iter()
                .filter(|w| w.alive())
                .map(|w| w.name.as_str())
                .collect();
            if balanced(&leases, &alive, shards) {
                balanced_at.get_or_insert_with(now_us);
            } else {
                balanced_at = None;
                fresh.clear();
            }
            if Instant::now() > deadline {
                panic!(
                    "not steady after {secs}s: leases {:?}, {} of {shards} shards fresh\n{}",
                    owner_counts(&leases),
                    fresh.len(),
                    logs(workers)
                );
            }
        }
        if balanced_at.is_some() && (producer.is_none() || fresh.len() == shards) {
            return started.elapsed().as_secs_f64();
        }
        check_all(workers);
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------ logs --

/// Wall-clock µs and shard of each line of `log` containing `msg`, from `since`.
fn log_times(log: &Path, msg: &str, since: i64) -> Vec<(i64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(msg))
        .filter_map(|l| {
            let ts = chrono::DateTime::parse_from_rfc3339(l.split_whitespace().next()?)
                .ok()?
                .timestamp_micros();
            let shard = l
                .split_whitespace()
                .find_map(|t| t.strip_prefix("shard="))
                .unwrap_or("")
                .to_owned();
            (ts >= since).then_some((ts, shard))
        })
        .collect()
}

/// The first time any of `logs` says `msg` about `shard` (any shard when
/// empty) from `since`.
fn first_log(logs: &[PathBuf], msg: &str, shard: &str, since: i64) -> Option<i64> {
    logs.iter()
        .flat_map(|l| log_times(l, msg, since))
        .filter(|(_, s)| shard.is_empty() || s == shard)
        .map(|(t, _)| t)
        .min()
}

/// WARN and ERROR lines of every log, by level and message (fields cut).
fn warnings<'a>(logs: impl IntoIterator<Item = &'a Path>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for log in logs {
        for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
            let mut t = line.split_whitespace();
            let (_ts, level) = (t.next(), t.next().unwrap_or(""));
            if level != "WARN" && level != "ERROR" {
                continue;
            }
            let msg = line
                .split_once(": ")
                .map_or(line, |(_, m)| m)
                .split(' ')
                .take_while(|w| !w.contains('='))
                .collect::<Vec<_>>()
                .join(" ");
            *out.entry(format!("{level} {msg}")).or_default() += 1;
        }
    }
    out
}

fn print_warnings<'a>(what: &str, logs: impl IntoIterator<Item = &'a Path>) {
    let w = warnings(logs);
    if w.is_empty() {
        println!("{what}: no WARN/ERROR lines in the workers' logs");
    } else {
        println!("{what}: WARN/ERROR lines in the workers' logs:");
        for (msg, n) in w {
            println!("  {n:>5} × {msg}");
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn opt_s(v: Option<i64>) -> String {
    v.map_or_else(|| "-".into(), |us| format!("{:.2}", secs(us)))
}

// -------------------------------------------------------------- failover --

struct Round {
    victim: String,
    shards: usize,
    /// Per shard: lease taken, state restored, first post-kill event out
    /// (µs after the kill); the slowest shard's values.
    taken: Option<i64>,
    restored: Option<i64>,
    adopted: Option<i64>,
    first: i64,
    last: i64,
    slowest: String,
    table_taken: Option<i64>,
    rebalance: f64,
}

async fn failover(time: &str, rounds: usize) {
    const SHARDS: usize = 8;
    let p = Peers::start(SHARDS as i32).await;
    let root = Root::new();
    let setup = Setup {
        failover: time.to_owned(),
        ..Setup::new(&format!("failover-{time}"))
    };
    println!(
        "\ncluster/failover: 3 workers, {SHARDS} shards, 200 events/s over 64 keys, {}; {rounds} rounds",
        setup.describe()
    );
    let obs = p.dynamo.table(&setup.table, "observer").await;
    let keys: Vec<String> = (0..64).map(|k| format!("u{k}")).collect();
    let producer = Producer::start(
        p.client.clone(),
        STREAM,
        keys,
        20,
        Duration::from_millis(100),
        0,
    );
    let letters = ["a", "b", "c"];
    let mut workers: Vec<Worker> = letters
        .iter()
        .map(|l| setup.start(root.path(), &format!("{l}1"), &p))
        .collect();
    let mut retired: Vec<Worker> = Vec::new();
    let mut seen = Seen::default();
    let waited = wait_steady(&obs, &mut workers, &mut seen, Some(&producer), SHARDS, 240).await;
    println!("  start-up to balanced and every shard processing: {waited:.1}s");
    let mut rows: Vec<Round> = Vec::new();
    for round in 0..rounds {
        let slot = round % 3;
        let victim = workers[slot].name.clone();
        let leases = list(&obs).await;
        let held: BTreeSet<String> = leases
            .iter()
            .filter(|l| l.actual_owner() == Some(victim.as_str()))
            .map(|l| l.lease_key.clone())
            .collect();
        seen.poll(&mut workers);
        let kill = now_us();
        workers[slot].kill9();
        let survivors: Vec<String> = workers
            .iter()
            .filter(|w| w.alive())
            .map(|w| w.name.clone())
            .collect();
        let mut resumed: BTreeMap<String, i64> = BTreeMap::new();
        let mut table_taken: Option<i64> = None;
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut i = 0u64;
        while resumed.len() < held.len() {
            for (_, id, at) in seen.poll(&mut workers) {
                let shard = shard_of(&id);
                if held.contains(shard)
                    && !resumed.contains_key(shard)
                    && producer.put_at(&id).is_some_and(|t| t > kill)
                {
                    resumed.insert(shard.to_owned(), at - kill);
                }
            }
            if table_taken.is_none() && i.is_multiple_of(4) {
                let now = list(&obs).await;
                // (A failed listing is empty: not "all taken".)
                let mine: Vec<&Lease> =
                    now.iter().filter(|l| held.contains(&l.lease_key)).collect();
                let all = mine.len() == held.len()
                    && mine.iter().all(|l| {
                        !l.handoff_pending()
                            && l.owner
                                .as_deref()
                                .is_some_and(|o| survivors.iter().any(|s| s == o))
                    });
                if all {
                    table_taken = Some(now_us() - kill);
                }
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {} of {} shards of {victim} resumed after 180 s\n{}",
                resumed.len(),
                held.len(),
                logs(&workers)
            );
            check_all(&mut workers);
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let survivor_logs: Vec<PathBuf> = workers
            .iter()
            .filter(|w| w.alive())
            .map(Worker::log)
            .collect();
        let (slowest, last) = resumed
            .iter()
            .max_by_key(|(_, t)| **t)
            .map(|(s, t)| (s.clone(), *t))
            .unwrap_or_default();
        // Who took which shard when: two survivors both go for the first
        // expired leases in key order; the loser's conditional write fails
        // and it takes another at its next renewal.
        let takes: Vec<String> = held
            .iter()
            .map(|s| {
                let by = workers
                    .iter()
                    .filter(|w| w.alive())
                    .filter_map(|w| {
                        first_log(
                            std::slice::from_ref(&w.log()),
                            "took an expired lease",
                            s,
                            kill,
                        )
                        .map(|t| (t, w.name.clone()))
                    })
                    .min();
                match by {
                    Some((t, w)) => format!("{}→{w} {:.2}s", &s[s.len() - 2..], secs(t - kill)),
                    None => format!("{}→?", &s[s.len() - 2..]),
                }
            })
            .collect();
        let phase = |msg: &str| {
            held.iter()
                .filter_map(|s| first_log(&survivor_logs, msg, s, kill).map(|t| t - kill))
                .max()
        };
        let row = Round {
            victim: victim.clone(),
            shards: held.len(),
            taken: phase("took an expired lease"),
            restored: phase("shard state restored; reading it"),
            adopted: phase("shard acquired: the engine adopted its state"),
            first: resumed.values().copied().min().unwrap_or(0),
            last,
            slowest,
            table_taken,
            rebalance: 0.0,
        };
        // Back to three workers: a new process under a new name, as a
        // restarted process would be, with an empty state directory.
        let name = format!("{}{}", letters[slot], round / 3 + 2);
        let old = std::mem::replace(&mut workers[slot], setup.start(root.path(), &name, &p));
        retired.push(old);
        let rebalance =
            wait_steady(&obs, &mut workers, &mut seen, Some(&producer), SHARDS, 240).await;
        println!(
            "  round {:>2}: killed {} ({} leases): taken {}s [{}], restored {}s, adopted {}s, processing again {:.2}s (first shard {:.2}s, slowest {}); rejoin + rebalance {rebalance:.1}s",
            round + 1,
            row.victim,
            row.shards,
            opt_s(row.taken),
            takes.join(", "),
            opt_s(row.restored),
            opt_s(row.adopted),
            secs(row.last),
            secs(row.first),
            row.slowest,
        );
        rows.push(Round { rebalance, ..row });
    }
    let sorted = |f: &dyn Fn(&Round) -> Option<f64>| {
        let mut v: Vec<f64> = rows.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    println!("cluster/failover (failover_time {time}): SIGKILL → ..., seconds over {} rounds (p50 nearest rank)", rows.len());
    println!(
        "  {:<44} {:>6} {:>6} {:>6} {:>6}",
        "", "min", "p50", "max", "mean"
    );
    for (label, v) in [
        (
            "leases taken (survivors' logs, slowest shard)",
            sorted(&|r| r.taken.map(secs)),
        ),
        (
            "leases taken (table, polled every 200 ms)",
            sorted(&|r| r.table_taken.map(secs)),
        ),
        (
            "state restored (logs, slowest shard)",
            sorted(&|r| r.restored.map(secs)),
        ),
        (
            "engine adopted the state (logs, slowest)",
            sorted(&|r| r.adopted.map(secs)),
        ),
        (
            "first shard processing again",
            sorted(&|r| Some(secs(r.first))),
        ),
        (
            "EVERY shard processing again = failover",
            sorted(&|r| Some(secs(r.last))),
        ),
        (
            "rejoin + rebalance to 3/3/2 (not failover)",
            sorted(&|r| Some(r.rebalance)),
        ),
    ] {
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "  {label:<44} {:>6.2} {:>6.2} {:>6.2} {mean:>6.2}",
            pct(&v, 0.0),
            pct(&v, 0.5),
            pct(&v, 1.0)
        );
    }
    println!(
        "  events put: {}, distinct ids out: {}, repeated ids (replays after a kill): {}",
        producer.sent.load(Ordering::Relaxed),
        seen.ids.len(),
        seen.repeated
    );
    drop(producer);
    for w in &mut workers {
        w.stop().await;
    }
    let all: Vec<PathBuf> = workers.iter().chain(&retired).map(Worker::log).collect();
    print_warnings("cluster/failover", all.iter().map(PathBuf::as_path));
}

// --------------------------------------------------------------- handoff --

async fn handoff(keys_per_shard: usize) {
    let p = Peers::start(2).await;
    let root = Root::new();
    let setup = Setup {
        checkpoint: std::env::var("SHARDFLOW_BENCH_HANDOFF_CHECKPOINT")
            .unwrap_or_else(|_| "1s".into()),
        ..Setup::new(&format!("handoff-{keys_per_shard}"))
    };
    println!(
        "\ncluster/handoff: 2 shards, {keys_per_shard} keys per shard (one event each), {}",
        setup.describe()
    );
    let total = 2 * keys_per_shard;
    let records: Vec<(String, Vec<u8>)> = (0..total)
        .map(|k| {
            let key = format!("u{k}");
            let data = event(&key, 0);
            (key, data)
        })
        .collect();
    let put_started = Instant::now();
    let placed = preload(&p.client, STREAM, &records).await;
    let put_took = put_started.elapsed();
    let mut per_shard: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (key, shard) in &placed {
        let e = per_shard
            .entry(shard.clone())
            .or_insert_with(|| (0, key.clone()));
        e.0 += 1;
    }
    println!(
        "  put {total} events in {put_took:.1?}; keys per shard: {:?}",
        per_shard
            .iter()
            .map(|(s, (n, _))| (s, n))
            .collect::<Vec<_>>()
    );
    let obs = p.dynamo.table(&setup.table, "observer").await;
    let mut workers = vec![setup.start(root.path(), "a", &p)];
    let mut seen = Seen::default();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first: Option<Instant> = None;
    while seen.ids.len() < total {
        if !seen.poll(&mut workers).is_empty() {
            first.get_or_insert_with(Instant::now);
        }
        check_all(&mut workers);
        assert!(
            Instant::now() < deadline,
            "a: {} of {total} out after 900 s\n{}",
            seen.ids.len(),
            logs(&workers)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "  a processed {total} events in {took:.1}s from its first output ({:.0} events/s)",
        total as f64 / took.max(1e-9)
    );
    // a's state is in S3 (a periodic snapshot of both shards) before b joins.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let leases = list(&obs).await;
        if leases.len() == 2 && leases.iter().all(|l| l.snapshot.is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot of both shards after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Probes: an event of each shard every 100 ms, from keys already held.
    let probe_keys: Vec<String> = per_shard.values().map(|(_, k)| k.clone()).collect();
    let producer = Producer::start(
        p.client.clone(),
        STREAM,
        probe_keys,
        2,
        Duration::from_millis(100),
        1,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. b joins and steals one shard by graceful handoff.
    workers.push(setup.start(root.path(), "b", &p));
    let a_log = workers[0].log();
    let b_log = workers[1].log();
    // Every output from here on: (worker, id, when seen).
    let mut outs: Outs = Vec::new();
    let (stolen, request, resumed) =
        wait_handoff(&mut workers, &mut seen, &producer, &mut outs, |since| {
            log_times(&b_log, "asked for a graceful handoff", since)
                .into_iter()
                .next()
        })
        .await;
    let steal = Phases {
        how: "b joins: graceful handoff (steal)".into(),
        shard: stolen.clone(),
        noticed: first_log(
            std::slice::from_ref(&a_log),
            "graceful handoff asked: stopping the shard",
            &stolen,
            request,
        ),
        released: first_log(
            std::slice::from_ref(&a_log),
            "lease released shard=",
            &stolen,
            request,
        ),
        taken: first_log(
            std::slice::from_ref(&b_log),
            "lease handed to this worker",
            &stolen,
            request,
        ),
        restored: first_log(
            std::slice::from_ref(&b_log),
            "shard state restored; reading it",
            &stolen,
            request,
        ),
        subscribed: first_log(
            std::slice::from_ref(&b_log),
            "subscribed shard=",
            &stolen,
            request,
        ),
        adopted: first_log(
            std::slice::from_ref(&b_log),
            "shard acquired: the engine adopted its state",
            &stolen,
            request,
        ),
        processing: resumed,
        start: request,
        snapshot: snapshot_size(&p, &obs, &setup, &stolen).await,
    };

    // 2. a is stopped with SIGTERM: its last shard goes to b at once.
    let leases = list(&obs).await;
    let other = leases
        .iter()
        .find(|l| l.actual_owner() == Some("a"))
        .map(|l| l.lease_key.clone())
        .expect("a holds the other shard");
    let term = now_us();
    harness::signal(workers[0].proc.as_ref().unwrap().pid(), "TERM");
    let mut a_exit: Option<i64> = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    let resumed = loop {
        if a_exit.is_none() {
            if let Some(status) = workers[0].proc.as_mut().unwrap().exited() {
                assert!(
                    status.success(),
                    "a after SIGTERM: {status}\n{}",
                    workers[0].stderr()
                );
                a_exit = Some(now_us());
            }
        }
        outs.extend(seen.poll(&mut workers));
        let hit = outs
            .iter()
            .filter(|(w, id, _)| *w == 1 && shard_of(id) == other)
            .filter(|(_, id, _)| producer.put_at(id).is_some_and(|t| t > term))
            .map(|(_, _, at)| *at)
            .min();
        if let Some(at) = hit {
            break at;
        }
        workers[1].check();
        assert!(
            Instant::now() < deadline,
            "b never processed {other} after a's SIGTERM\n{}",
            logs(&workers)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // a has exited or is about to; its Proc is done.
    let deadline = Instant::now() + Duration::from_secs(60);
    while a_exit.is_none() && Instant::now() < deadline {
        if let Some(status) = workers[0].proc.as_mut().unwrap().exited() {
            assert!(status.success(), "a after SIGTERM: {status}");
            a_exit = Some(now_us());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workers[0].proc = None;
    // A second more of b's output, for its gaps.
    for _ in 0..20 {
        outs.extend(seen.poll(&mut workers));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sigterm = Phases {
        how: "SIGTERM of a (b running)".into(),
        shard: other.clone(),
        noticed: first_log(
            std::slice::from_ref(&a_log),
            "clean stop: handing every lease off",
            "",
            term,
        ),
        released: first_log(
            std::slice::from_ref(&a_log),
            "lease released shard=",
            &other,
            term,
        ),
        taken: first_log(
            std::slice::from_ref(&b_log),
            "took an expired lease",
            &other,
            term,
        ),
        restored: first_log(
            std::slice::from_ref(&b_log),
            "shard state restored; reading it",
            &other,
            term,
        ),
        subscribed: first_log(
            std::slice::from_ref(&b_log),
            "subscribed shard=",
            &other,
            term,
        ),
        adopted: first_log(
            std::slice::from_ref(&b_log),
            "shard acquired: the engine adopted its state",
            &other,
            term,
        ),
        processing: resumed,
        start: term,
        snapshot: snapshot_size(&p, &obs, &setup, &other).await,
    };
    println!(
        "cluster/handoff ({keys_per_shard} keys per shard), seconds from the request (steal) or the signal (SIGTERM):"
    );
    println!(
        "  {:<34} {:<21} {:>7} {:>8} {:>6} {:>8} {:>10} {:>7} {:>10} {:>16}",
        "",
        "shard",
        "noticed",
        "released",
        "taken",
        "restored",
        "subscribed",
        "adopted",
        "PROCESSING",
        "snapshot"
    );
    for ph in [&steal, &sigterm] {
        let rel = |t: Option<i64>| opt_s(t.map(|t| t - ph.start));
        println!(
            "  {:<34} {:<21} {:>7} {:>8} {:>6} {:>8} {:>10} {:>7} {:>10.2} {:>16}",
            ph.how,
            ph.shard,
            rel(ph.noticed),
            rel(ph.released),
            rel(ph.taken),
            rel(ph.restored),
            rel(ph.subscribed),
            rel(ph.adopted),
            secs(ph.processing - ph.start),
            ph.snapshot
                .map_or("-".into(), |(files, bytes)| format!("{bytes} B/{files} f")),
        );
    }
    let gap = |g: Option<f64>| g.map_or_else(|| "-".into(), |g| format!("{g:.2}s"));
    println!(
        "  longest pause in the output of the shard that did not move (probes every 100 ms): a's {} during the steal, b's {} during the SIGTERM handoff (b adopting the second range)",
        gap(output_gap(&outs, 0, &other, request, steal.processing + 1_000_000)),
        gap(output_gap(&outs, 1, &stolen, term, sigterm.processing + 1_000_000)),
    );
    println!(
        "  a exited {}s after SIGTERM; repeated ids (duplicates): {}",
        opt_s(a_exit.map(|t| t - term)),
        seen.repeated
    );
    drop(producer);
    workers[1].stop().await;
    print_warnings(
        "cluster/handoff",
        workers
            .iter()
            .map(Worker::log)
            .collect::<Vec<_>>()
            .iter()
            .map(PathBuf::as_path),
    );
}

type Outs = Vec<(usize, String, i64)>;

/// The longest time between two consecutive outputs of `shard` by worker
/// `w` seen within `[from, to]` (seconds; probes come every 100 ms).
fn output_gap(outs: &Outs, w: usize, shard: &str, from: i64, to: i64) -> Option<f64> {
    let mut at: Vec<i64> = outs
        .iter()
        .filter(|(x, id, t)| *x == w && shard_of(id) == shard && (from..=to).contains(t))
        .map(|(_, _, t)| *t)
        .collect();
    at.sort_unstable();
    at.windows(2)
        .map(|p| secs(p[1] - p[0]))
        .max_by(f64::total_cmp)
}

struct Phases {
    how: String,
    shard: String,
    noticed: Option<i64>,
    released: Option<i64>,
    taken: Option<i64>,
    restored: Option<i64>,
    subscribed: Option<i64>,
    adopted: Option<i64>,
    processing: i64,
    start: i64,
    snapshot: Option<(usize, u64)>,
}

/// Waits until `request` finds the steal in b's log (its time and shard),
/// then until b (worker 1) outputs a probe of that shard put after it.
async fn wait_handoff(
    workers: &mut [Worker],
    seen: &mut Seen,
    producer: &Producer,
    outs: &mut Outs,
    request: impl Fn(i64) -> Option<(i64, String)>,
) -> (String, i64, i64) {
    let since = workers[1].started_us;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut asked: Option<(i64, String)> = None;
    loop {
        outs.extend(seen.poll(workers));
        if asked.is_none() {
            asked = request(since);
        }
        if let Some((t, shard)) = &asked {
            let hit = outs
                .iter()
                .filter(|(w, id, _)| *w == 1 && shard_of(id) == shard)
                .filter(|(_, id, _)| producer.put_at(id).is_some_and(|p| p > *t))
                .map(|(_, _, at)| *at)
                .min();
            if let Some(at) = hit {
                return (shard.clone(), *t, at);
            }
        }
        check_all(workers);
        assert!(
            Instant::now() < deadline,
            "no handoff to b within 240 s (asked: {asked:?})\n{}",
            logs(workers)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Files and bytes of the snapshot the lease of `shard` names now.
async fn snapshot_size(
    p: &Peers,
    _obs: &LeaseTable,
    setup: &Setup,
    shard: &str,
) -> Option<(usize, u64)> {
    // Every snapshot of the shard in the store, by directory
    // (`shards/<shard>/<worker>-<commit>/`): the largest complete one. (The
    // one the lease names may be replaced and deleted under a listing.)
    let objects = p.s3.list(BUCKET, &setup.prefix).await;
    let marker = format!("shards/{shard}/");
    let mut dirs: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (key, size) in &objects {
        let Some(i) = key.find(&marker) else { continue };
        let rest = &key[i + marker.len()..];
        let dir = rest.split('/').next().unwrap_or("").to_owned();
        let e = dirs.entry(dir).or_default();
        e.0 += 1;
        e.1 += size;
    }
    dirs.into_values().max_by_key(|(_, bytes)| *bytes)
}

// ------------------------------------------------------------ throughput --

async fn throughput(events: usize, counts: &[usize]) {
    const SHARDS: i32 = 8;
    const KEYS: usize = 1000;
    let p = Peers::start(SHARDS).await;
    let records: Vec<(String, Vec<u8>)> = (0..events)
        .map(|i| {
            let key = format!("u{}", i % KEYS);
            let data = event(&key, (i / KEYS) as u64);
            (key, data)
        })
        .collect();
    println!(
        "\ncluster/throughput: {events} events pre-loaded over {KEYS} keys, {SHARDS} shards, 1-day count per key, stdout sink to a file"
    );
    println!(
        "  this machine: {} cores shared by the workers, the three emulators and this bench",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let put = Instant::now();
    preload(&p.client, STREAM, &records).await;
    println!("  put in {:.1?}", put.elapsed());
    let mut table: Vec<String> = Vec::new();
    // failover_time/checkpoint_interval pairs: the defaults, and the tests'.
    for timing in env_list("SHARDFLOW_BENCH_TP_TIMINGS", "10s/5s,3s/1s") {
        let (failover, checkpoint) = timing.split_once('/').expect("failover/checkpoint");
        table.push(format!(
            " failover_time {failover}, checkpoint_interval {checkpoint}:"
        ));
        println!("{}", table.last().unwrap());
        for preassigned in [true, false] {
            for &n in counts {
                // Same stream, a table and consumer of its own: every run reads it all.
                let tag = format!("tp{n}-{}-{failover}-{checkpoint}", u8::from(preassigned));
                let setup = Setup {
                    failover: failover.into(),
                    checkpoint: checkpoint.into(),
                    ..Setup::new(&tag)
                };
                table.push(throughput_run(&p, &setup, n, events, preassigned).await);
            }
        }
    }
    println!("cluster/throughput (events/s; pre-assigned: the table names each worker's share before they start; cold: they start together and the first takes every lease):");
    for line in table {
        println!("{line}");
    }
}

/// The leases of the stream's shards, written before any worker starts and
/// owned round-robin by `owners`: a balanced cluster restarted with fixed
/// worker ids, each adopting its own.
async fn preassign(p: &Peers, setup: &Setup, owners: &[&str]) {
    let table = p.dynamo.table(&setup.table, "bench").await;
    table.ensure().await.unwrap();
    let out = p
        .client
        .list_shards()
        .stream_name(&setup.stream)
        .send()
        .await
        .unwrap();
    for (i, s) in out.shards().iter().enumerate() {
        let mut l = Lease::new(s.shard_id(), Checkpoint::TrimHorizon);
        let r = s.hash_key_range().expect("a hash key range");
        l.hash_key_range = Some(HashKeyRange {
            start: r.starting_hash_key().parse().unwrap(),
            end: r.ending_hash_key().parse().unwrap(),
        });
        l.owner = Some(owners[i % owners.len()].to_owned());
        table.create_if_absent(&l).await.unwrap();
    }
}

/// `n` workers on the pre-loaded stream until every event is out: one line
/// of the table.
async fn throughput_run(
    p: &Peers,
    setup: &Setup,
    n: usize,
    events: usize,
    preassigned: bool,
) -> String {
    const SHARDS: i32 = 8;
    let mut table: Vec<String> = Vec::new();
    let root = Root::new();
    let obs = p.dynamo.table(&setup.table, "observer").await;
    let names: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if preassigned {
        preassign(p, setup, &names).await;
    }
    let started = Instant::now();
    let me0 = cpu_secs("/proc/self/stat");
    let mut workers: Vec<Worker> = names
        .iter()
        .map(|name| setup.start(root.path(), name, p))
        .collect();
    let mut seen = Seen::default();
    let mut per_worker = vec![0usize; n];
    let mut first: Option<Instant> = None;
    // Since when the table has been balanced, with the count out then
    // and the CPU used so far.
    let mut balanced_since: Option<(Instant, usize, f64)> = None;
    // Per lease: owner and counter as last seen changing, and when; the
    // longest a held lease went without a renewal the table shows.
    let mut renewed: HashMap<String, (Option<String>, u64, Instant)> = HashMap::new();
    let mut max_gap = (0.0f64, String::new());
    p.proxy.reset_max();
    let calls0 = p.proxy.snapshot();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut round = 0u64;
    while seen.ids.len() < events {
        for (w, _, _) in seen.poll(&mut workers) {
            per_worker[w] += 1;
            first.get_or_insert_with(Instant::now);
        }
        if round.is_multiple_of(5) {
            let leases = list(&obs).await;
            let now = Instant::now();
            for l in &leases {
                let owner = l.actual_owner().map(str::to_owned);
                match renewed.get(&l.lease_key) {
                    Some((o, c, at)) if *o == owner && *c == l.counter => {
                        let gap = now.duration_since(*at).as_secs_f64();
                        if owner.is_some() && gap > max_gap.0 {
                            max_gap = (gap, format!("{} held by {:?}", l.lease_key, owner));
                        }
                    }
                    _ => {
                        renewed.insert(l.lease_key.clone(), (owner, l.counter, now));
                    }
                }
            }
            if leases.is_empty() {
                // The listing failed: no news.
            } else if balanced(&leases, &names, SHARDS as usize) {
                if balanced_since.is_none() {
                    let cpu = workers.iter().map(Worker::cpu_secs).sum::<f64>()
                        + cpu_secs("/proc/self/stat");
                    balanced_since = Some((Instant::now(), seen.ids.len(), cpu));
                }
            } else {
                balanced_since = None;
            }
        }
        check_all(&mut workers);
        assert!(
            Instant::now() < deadline,
            "{} of {events} out after 900 s\n{}",
            seen.ids.len(),
            logs(&workers)
        );
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = Instant::now();
    let cpu_workers: f64 = workers.iter().map(Worker::cpu_secs).sum();
    let cpu_me = cpu_secs("/proc/self/stat") - me0;
    let took = done.duration_since(started).as_secs_f64();
    let drain = first.map_or(took, |f| done.duration_since(f).as_secs_f64());
    let steady = match balanced_since {
        Some((at, out, cpu)) if events - out >= events / 10 => {
            let s = done.duration_since(at).as_secs_f64();
            let busy = (cpu_workers + cpu_secs("/proc/self/stat") - cpu) / s;
            format!(
                "{:>7.0} events/s over the last {} events, once balanced at {:.1}s ({busy:.2} cores busy)",
                (events - out) as f64 / s,
                events - out,
                at.duration_since(started).as_secs_f64()
            )
        }
        Some((at, out, _)) => format!(
            "balanced only at {:.1}s with {} events left: no steady-state figure",
            at.duration_since(started).as_secs_f64(),
            events - out
        ),
        None => "never balanced".into(),
    };
    let calls = p.proxy.snapshot();
    let lat = |op: &str| {
        let (now, then) = (
            calls.get(op).copied().unwrap_or_default(),
            calls0.get(op).copied().unwrap_or_default(),
        );
        let answered = (now.answered - then.answered).max(1);
        format!(
            "{op} {} calls, mean {:.0} ms, max {:.0} ms",
            now.calls - then.calls,
            (now.latency_sum - then.latency_sum).as_secs_f64() * 1e3 / answered as f64,
            now.latency_max.as_secs_f64() * 1e3
        )
    };
    let lost = warnings(
        workers
            .iter()
            .map(Worker::log)
            .collect::<Vec<_>>()
            .iter()
            .map(PathBuf::as_path),
    )
    .iter()
    .filter(|(m, _)| m.contains("lease lost"))
    .map(|(_, n)| *n)
    .sum::<usize>();
    println!(
        "  {n} worker(s), {}: longest a held lease went unrenewed (table polled every 250 ms): {:.2}s ({}), failover_time {}; leases lost: {lost}; DynamoDB from the workers: {}; {}",
        if preassigned { "pre-assigned" } else { "cold" },
        max_gap.0,
        max_gap.1,
        setup.failover,
        lat("UpdateItem"),
        lat("Scan")
    );
    let mode = if preassigned { "pre-assigned" } else { "cold" };
    table.push(format!(
        "  {mode:<12} {n} worker(s): {:>7.0} events/s from the start ({took:.1}s), {:>7.0} from the first output ({drain:.1}s); {steady}; per worker {per_worker:?}; CPU workers {cpu_workers:.1}s + bench/emulators {cpu_me:.1}s = {:.2} cores busy on average; repeated ids {}",
        events as f64 / took,
        events as f64 / drain,
        (cpu_workers + cpu_me) / took,
        seen.repeated
    ));
    println!("{}", table.last().unwrap());
    for w in &mut workers {
        w.stop().await;
    }
    print_warnings(
        &format!("cluster/throughput {n}, {}", setup.describe()),
        workers
            .iter()
            .map(Worker::log)
            .collect::<Vec<_>>()
            .iter()
            .map(PathBuf::as_path),
    );
    table.pop().unwrap()
}

// ---------------------------------------------------------------- dynamo --

async fn dynamo_calls(window: u64) {
    const SHARDS: usize = 8;
    let defaults = |tag: &str| Setup {
        failover: "10s".into(),
        checkpoint: "5s".into(),
        refresh: "30s".into(),
        ..Setup::new(tag)
    };
    let tests = |tag: &str| Setup {
        failover: "3s".into(),
        checkpoint: "200ms".into(),
        refresh: "1s".into(),
        ..Setup::new(tag)
    };
    let cases: [(&str, Setup, u64); 4] = [
        ("defaults, idle", defaults("d-idle"), 0),
        ("defaults, 200 events/s", defaults("d-load"), 200),
        ("tests/cluster.rs timings, idle", tests("t-idle"), 0),
        (
            "tests/cluster.rs timings, 200 events/s",
            tests("t-load"),
            200,
        ),
    ];
    let mut summary: Vec<String> = Vec::new();
    for (label, setup, rate) in cases {
        let p = Peers::start(SHARDS as i32).await;
        let root = Root::new();
        let obs = p.dynamo.table(&setup.table, "observer").await;
        let keys: Vec<String> = (0..64).map(|k| format!("u{k}")).collect();
        // Every shard has a position (so it has state and checkpoints) even idle.
        let warmup: Vec<(String, Vec<u8>)> = (0..640)
            .map(|i| {
                let key = keys[i % 64].clone();
                let data = event(&key, (i / 64) as u64);
                (key, data)
            })
            .collect();
        preload(&p.client, STREAM, &warmup).await;
        let producer = (rate > 0).then(|| {
            Producer::start(
                p.client.clone(),
                STREAM,
                keys.clone(),
                (rate / 10) as usize,
                Duration::from_millis(100),
                10,
            )
        });
        let mut workers: Vec<Worker> = ["a", "b", "c"]
            .iter()
            .map(|n| setup.start(root.path(), n, &p))
            .collect();
        let mut seen = Seen::default();
        let waited = wait_steady(
            &obs,
            &mut workers,
            &mut seen,
            producer.as_ref(),
            SHARDS,
            300,
        )
        .await;
        // Settled: a few renewal rounds after the last move.
        tokio::time::sleep(Duration::from_secs(5)).await;
        p.proxy.reset_max();
        let before = p.proxy.snapshot();
        let s3_before = p.s3_proxy.snapshot();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(window) {
            seen.poll(&mut workers);
            check_all(&mut workers);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let after = p.proxy.snapshot();
        let s3_after = p.s3_proxy.snapshot();
        let leases = list(&obs).await;
        let still_balanced = balanced(&leases, &["a", "b", "c"], SHARDS);
        // Item sizes, by DynamoDB's rules, for the request units.
        let items = p
            .dynamo
            .client()
            .await
            .scan()
            .table_name(&setup.table)
            .send()
            .await
            .unwrap();
        let sizes: Vec<usize> = items.items().iter().map(item_size).collect();
        let max_item = sizes.iter().copied().max().unwrap_or(0);
        let table_bytes: usize = sizes.iter().sum();
        let wru = max_item.div_ceil(1024).max(1) as f64;
        let scan_rru = table_bytes.div_ceil(4096).max(1) as f64;
        let get_rru = max_item.div_ceil(4096).max(1) as f64;
        println!(
            "\ncluster/dynamo: {label}: 3 workers, {SHARDS} shards, {}; steady after {waited:.1}s; {elapsed:.1}s counted{}",
            setup.describe(),
            if still_balanced { "" } else { " (LEASES MOVED during the window)" }
        );
        println!(
            "  lease items: {} rows, largest {max_item} B, table {table_bytes} B → {wru} WRU per write, {scan_rru} RRU per consistent Scan, {get_rru} per GetItem",
            sizes.len()
        );
        println!(
            "  {:<14} {:>7} {:>9} {:>8} {:>9} {:>12} {:>15}",
            "operation",
            "calls",
            "calls/s",
            "refused",
            "units/s",
            "$ per month",
            "latency mean/max"
        );
        let (mut total_calls, mut total_cost, mut writes, mut reads) = (0u64, 0.0, 0.0, 0.0);
        for (op, now) in &after {
            let then = before.get(op).copied().unwrap_or_default();
            let calls = now.calls - then.calls;
            let refused = now.refused - then.refused;
            if calls == 0 {
                continue;
            }
            let per_s = calls as f64 / elapsed;
            let (units, price) = match op.as_str() {
                "PutItem" | "UpdateItem" | "DeleteItem" => (per_s * wru, WRITE_PRICE),
                "Scan" => (per_s * scan_rru, READ_PRICE),
                "GetItem" | "Query" => (per_s * get_rru, READ_PRICE),
                // Control plane (DescribeTable, CreateTable, ...): not billed per request.
                _ => (0.0, 0.0),
            };
            if price == WRITE_PRICE {
                writes += units;
            } else if price == READ_PRICE {
                reads += units;
            }
            let cost = units * MONTH_SECS * price / 1e6;
            total_calls += calls;
            total_cost += cost;
            let mean_ms = (now.latency_sum - then.latency_sum).as_secs_f64() * 1e3
                / (now.answered - then.answered).max(1) as f64;
            println!(
                "  {op:<14} {calls:>7} {per_s:>9.2} {refused:>8} {units:>9.2} {cost:>12.2} {:>8.1}/{:.0} ms",
                mean_ms,
                now.latency_max.as_secs_f64() * 1e3
            );
        }
        println!(
            "  {:<14} {total_calls:>7} {:>9.2} {:>8} {:>9} {total_cost:>12.2}",
            "total",
            total_calls as f64 / elapsed,
            "",
            ""
        );
        // The snapshots every checkpoint uploads are S3 requests, billed too.
        let (mut s3_calls, mut s3_cost) = (0u64, 0.0);
        let mut s3_ops = Vec::new();
        for (op, now) in &s3_after {
            let calls = now.calls - s3_before.get(op).map_or(0, |c| c.calls);
            if calls == 0 {
                continue;
            }
            let per_s = calls as f64 / elapsed;
            let price = match op.as_str() {
                "PUT" | "POST" | "GET (list)" => S3_PUT_PRICE,
                "DELETE" | "DELETE (batch)" => 0.0,
                _ => S3_GET_PRICE,
            };
            s3_calls += calls;
            s3_cost += per_s * MONTH_SECS * price / 1e6;
            s3_ops.push(format!("{op} {per_s:.2}/s"));
        }
        println!(
            "  S3 (snapshots): {:.2} requests/s ({}) → ${s3_cost:.2} per month at ${S3_PUT_PRICE}/M PUT/POST/LIST, ${S3_GET_PRICE}/M GET, DELETE free",
            s3_calls as f64 / elapsed,
            s3_ops.join(", ")
        );
        summary.push(format!(
            "  {label:<40} {:>8.2} calls/s  {writes:>7.2} WRU/s  {reads:>6.2} RRU/s  ${total_cost:>8.2}/month | S3 {:>6.2} req/s ${s3_cost:>8.2}/month",
            total_calls as f64 / elapsed,
            s3_calls as f64 / elapsed
        ));
        drop(producer);
        for w in &mut workers {
            w.stop().await;
        }
        print_warnings(
            &format!("cluster/dynamo {label}"),
            workers
                .iter()
                .map(Worker::log)
                .collect::<Vec<_>>()
                .iter()
                .map(PathBuf::as_path),
        );
    }
    println!(
        "\ncluster/dynamo: 3 workers, 8 shards, on-demand ${WRITE_PRICE}/M WRU, ${READ_PRICE}/M RRU, 30-day month, GSI writes not counted; S3 ${S3_PUT_PRICE}/M PUT, ${S3_GET_PRICE}/M GET:"
    );
    for line in summary {
        println!("{line}");
    }
}

/// An item's size by DynamoDB's rules: attribute names plus values (a
/// number takes about one byte per two significant digits, plus one).
fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    fn number(n: &str) -> usize {
        n.chars().filter(char::is_ascii_digit).count().div_ceil(2) + 1
    }
    fn value(v: &AttributeValue) -> usize {
        match v {
            AttributeValue::S(s) => s.len(),
            AttributeValue::N(n) => number(n),
            AttributeValue::B(b) => b.as_ref().len(),
            AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
            AttributeValue::Ns(v) => v.iter().map(|n| number(n)).sum(),
            AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len()).sum(),
            AttributeValue::L(l) => 3 + l.iter().map(|v| 1 + value(v)).sum::<usize>(),
            AttributeValue::M(m) => {
                3 + m.iter().map(|(k, v)| 1 + k.len() + value(v)).sum::<usize>()
            }
            _ => 1,
        }
    }
    item.iter().map(|(k, v)| k.len() + value(v)).sum()
}

// ----------------------------------------------------------------- proxy --

#[derive(Clone, Copy, Default, Debug)]
struct OpCount {
    calls: u64,
    /// Answers with a status of 400 or more (a failed condition, throttling).
    refused: u64,
    /// Request to answer, over the answered ones; the longest since
    /// [`Proxy::reset_max`].
    latency_sum: Duration,
    answered: u64,
    latency_max: Duration,
}

type Counts = Arc<Mutex<BTreeMap<String, OpCount>>>;

/// What a proxied request is named by.
#[derive(Clone, Copy)]
enum Protocol {
    /// DynamoDB: the operation of its `X-Amz-Target` header.
    Dynamo,
    /// S3: the request line's method (`GET (list)` for a listing).
    S3,
}

impl Protocol {
    /// The operation a request line or header line names, if it does.
    fn classify(self, line: &str) -> Option<String> {
        match self {
            Protocol::Dynamo => {
                let target = line
                    .get(..13)
                    .is_some_and(|h| h.eq_ignore_ascii_case("x-amz-target:"));
                target.then(|| {
                    line[13..]
                        .trim()
                        .rsplit('.')
                        .next()
                        .unwrap_or("?")
                        .to_owned()
                })
            }
            Protocol::S3 => {
                // A body without a final CRLF runs into the next request
                // line: the method is the last one on the line.
                let line = line.strip_suffix(" HTTP/1.1")?;
                let (at, method) = ["GET /", "PUT /", "POST /", "DELETE /", "HEAD /"]
                    .iter()
                    .filter_map(|m| line.rfind(m).map(|i| (i, m.trim_end_matches(" /"))))
                    .max()?;
                let uri = &line[at + method.len() + 1..];
                let list = method == "GET" && uri.contains("list-type=");
                // DeleteObjects (`POST /bucket?delete`) is a delete: free.
                if method == "POST" && uri.contains("?delete") {
                    return Some("DELETE (batch)".into());
                }
                Some(if list {
                    "GET (list)".into()
                } else {
                    method.to_owned()
                })
            }
        }
    }
}

/// A TCP forwarder in front of an emulator that counts requests by
/// operation ([`Protocol`]) and answers by status. HTTP/1.1 as the SDK
/// speaks it: one request at a time per connection, so the n-th status
/// line answers the n-th request.
struct Proxy {
    addr: SocketAddr,
    counts: Counts,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr, protocol: Protocol) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts: Counts = Arc::default();
        let task = {
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((down, _)) = accepted else { continue };
                            connections.spawn(forward(down, upstream, protocol, counts.clone()));
                        }
                        Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    }
                }
            })
        };
        Proxy { addr, counts, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn snapshot(&self) -> BTreeMap<String, OpCount> {
        self.counts.lock().unwrap().clone()
    }

    fn reset_max(&self) {
        for c in self.counts.lock().unwrap().values_mut() {
            c.latency_max = Duration::ZERO;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet: every connection ends.
        self.task.abort();
    }
}

async fn forward(down: TcpStream, upstream: SocketAddr, protocol: Protocol, counts: Counts) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = (down.set_nodelay(true), up.set_nodelay(true));
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
    let pending: Mutex<VecDeque<(String, Instant)>> = Mutex::default();
    let requests = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut lines: Vec<u8> = Vec::new();
        loop {
            let n = match down_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            lines.extend_from_slice(&buf[..n]);
            // Header lines follow a CRLF (DynamoDB's JSON bodies have none).
            if let Some(end) = lines.windows(2).rposition(|w| w == b"\r\n") {
                for line in lines[..end].split(|&b| b == b'\n') {
                    let line = String::from_utf8_lossy(line);
                    let line = line.trim();
                    if let Some(op) = protocol.classify(line) {
                        counts.lock().unwrap().entry(op.clone()).or_default().calls += 1;
                        pending.lock().unwrap().push_back((op, Instant::now()));
                    }
                }
                lines.drain(..end + 2);
            }
            if lines.len() > 64 << 10 {
                let cut = lines.len() - 256;
                lines.drain(..cut);
            }
            if up_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = up_w.shutdown().await;
    };
    let responses = async {
        const STATUS: &[u8] = b"HTTP/1.1 ";
        let mut buf = vec![0u8; 64 << 10];
        let mut acc: Vec<u8> = Vec::new();
        loop {
            let n = match up_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            acc.extend_from_slice(&buf[..n]);
            loop {
                match acc.windows(STATUS.len()).position(|w| w == STATUS) {
                    Some(i) if acc.len() >= i + STATUS.len() + 3 => {
                        let code = &acc[i + STATUS.len()..i + STATUS.len() + 3];
                        let refused = code[0] >= b'4';
                        // An interim 100 Continue answers nothing yet.
                        let op = if code == b"100" {
                            None
                        } else {
                            pending.lock().unwrap().pop_front()
                        };
                        if let Some((op, sent)) = op {
                            let took = sent.elapsed();
                            let mut counts = counts.lock().unwrap();
                            let c = counts.entry(op).or_default();
                            c.refused += u64::from(refused);
                            c.answered += 1;
                            c.latency_sum += took;
                            c.latency_max = c.latency_max.max(took);
                        }
                        acc.drain(..i + STATUS.len() + 3);
                    }
                    Some(i) => {
                        acc.drain(..i);
                        break;
                    }
                    None => {
                        let keep = acc.len().saturating_sub(STATUS.len());
                        acc.drain(..keep);
                        break;
                    }
                }
            }
            if down_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = down_w.shutdown().await;
    };
    tokio::join!(requests, responses);
}
