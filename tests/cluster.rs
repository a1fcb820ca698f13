//! `[cluster]` end to end: several `shardflow run` processes on one Kinesis
//! stream (the embedded ferrokinesis), leases in DynamoDB (the embedded
//! dynoxide), shard snapshots in S3 (s3s-fs), all on 127.0.0.1.
//!
//! What proves that state moved exactly once: every event carries its key's
//! own counter `n` (0, 1, 2, ...), and the feature `count_1d` of event `n`
//! must be `n + 1`, whichever worker processed it, however often its shard
//! moved. A lost or doubly counted event would shift every later count of
//! its key. Outputs are read as a downstream reader must: deduplicated by
//! id, every copy of an id equal.

mod dynamo;
mod emulator;
mod harness;
mod s3;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dynamo::DynamoServer;
use emulator::Emulator;
use harness::{ndjson, Proc};
use s3::S3Server;

const STREAM: &str = "clustered";
const TABLE: &str = "shardflow-leases";
const BUCKET: &str = "state";
const KEYS: u32 = 64;

const S3_ENV: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
    ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
];

struct Peers {
    kinesis: Emulator,
    dynamo: DynamoServer,
    s3: S3Server,
}

async fn peers(shards: i32) -> Peers {
    if std::env::var_os("RUST_LOG").is_none() {
        // Conditional writes that fail are the protocol, not news.
        std::env::set_var(
            "RUST_LOG",
            "warn,ferrokinesis=error,dynoxide=error,s3s=error,s3s_fs=error",
        );
    }
    let kinesis = Emulator::start(emulator::options()).await;
    emulator::create_stream(&kinesis.client().await, STREAM, shards).await;
    let dynamo = DynamoServer::start().await;
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    Peers {
        kinesis,
        dynamo,
        s3,
    }
}

/// A worker's directory and config: its own state and outputs, the shared
/// stream, table and store.
fn worker_dir(root: &Path, name: &str, p: &Peers) -> PathBuf {
    worker_dir_with(root, name, p, "")
}

/// [`worker_dir`] with more config (an `[api]` table).
fn worker_dir_with(root: &Path, name: &str, p: &Peers, extra: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"
[pipeline]
state_dir = "state"
checkpoint_interval = "200ms"
batch_size = 64

[checkpoint_store]
type = "s3"
bucket = "{BUCKET}"
prefix = "cluster"
endpoint_url = "{s3}"
max_attempts = 3

[cluster]
lease_table = "{TABLE}"
worker_id = "{name}"
failover_time = "3s"
handoff_timeout = "10s"
endpoint_url = "{dynamo}"

[source]
type = "kinesis"
stream_name = "{STREAM}"
consumer_name = "cluster-tests"
starting_position = "trim_horizon"
endpoint_url = "{kinesis}"
shard_refresh_interval = "1s"
{common}
{extra}
"#,
        common = common_config(),
        s3 = p.s3.url(),
        dynamo = p.dynamo.url(),
        kinesis = p.kinesis.url(),
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    dir
}

/// What every worker (and the single process it is compared with) shares
/// besides the source: the schema, a count per day (every event's `count_1d`
/// is its key's counter + 1) and per 10 ms, whose windows come due as the
/// stream goes on (a key's events are in order on its shard: nothing late).
fn common_config() -> &'static str {
    r#"
[schema]
key = "userId"
timestamp = "timestamp"
fields = { n = "i64" }

[watermark]
max_out_of_orderness = "0ms"
idle_timeout = "1h"

[[features]]
name = "count_1d"
agg = "count"
window = { type = "tumbling", size = "1d" }

[[features]]
name = "count_10ms"
agg = "count"
window = { type = "tumbling", size = "10ms" }

[[sinks]]
type = "file"
path = "features.ndjson"
kinds = ["features", "dead_letter", "late", "window"]
"#
}

fn start(dir: &Path) -> Proc {
    start_with_metrics(dir, "off")
}

/// [`start`] with `/metrics` on `metrics`.
fn start_with_metrics(dir: &Path, metrics: &str) -> Proc {
    Proc::run_with(
        dir,
        Path::new("config.toml"),
        metrics,
        "stderr.log",
        "warn,shardflow::cluster=info",
        &[],
        &S3_ENV,
    )
}

/// Events `from..to` of every key, as `(partition key, data)`: the
/// partition key is the entity key, so a key's events stay on one shard.
fn events(from: u64, to: u64) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for n in from..to {
        for k in 0..KEYS {
            out.push((format!("u{k}"), emulator::event_json(k, n)));
        }
    }
    out
}

/// Every worker's feature records, deduplicated by id (each copy equal),
/// by key and counter `n`: the count the engine gave.
fn counts(dirs: &[&Path]) -> BTreeMap<(String, i64), i64> {
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for dir in dirs {
        for line in ndjson(&dir.join("features.ndjson")) {
            let id = line["id"].as_str().unwrap().to_owned();
            if let Some(seen) = by_id.get(&id) {
                assert_eq!(
                    seen["features"], line["features"],
                    "two copies of {id} differ"
                );
            }
            by_id.insert(id, line);
        }
    }
    let mut counts = BTreeMap::new();
    for line in by_id.values().filter(|l| l["kind"] != "window") {
        assert!(
            line.get("features").is_some(),
            "not a feature record: {line}"
        );
        let key = line["key"].as_str().unwrap().to_owned();
        // The event time is the fixed day's start + n.
        let n = line["event_time"].as_i64().unwrap() - 1_700_000_000_000;
        let count = line["features"]["count_1d"].as_i64().unwrap();
        counts.insert((key, n), count);
    }
    counts
}

/// Every window result in `dirs`' outputs, by id (every copy equal).
fn windows(dirs: &[&Path]) -> BTreeMap<String, serde_json::Value> {
    let mut by_id = BTreeMap::new();
    for dir in dirs {
        for line in ndjson(&dir.join("features.ndjson")) {
            if line["kind"] != "window" {
                continue;
            }
            let id = line["id"].as_str().unwrap().to_owned();
            if let Some(seen) = by_id.get(&id) {
                assert_eq!(seen, &line, "two copies of {id} differ");
            }
            by_id.insert(id, line);
        }
    }
    by_id
}

/// One `shardflow run` without `[cluster]` on the whole stream, from its
/// start, until `events` feature records are out; its window results.
async fn single_process(
    root: &Path,
    p: &Peers,
    events: usize,
) -> BTreeMap<String, serde_json::Value> {
    let dir = root.join("single");
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"
[pipeline]
state_dir = "state"
checkpoint_interval = "200ms"

[source]
type = "kinesis"
stream_name = "{STREAM}"
consumer_name = "single-process"
starting_position = "trim_horizon"
endpoint_url = "{kinesis}"
{common}
"#,
        kinesis = p.kinesis.url(),
        common = common_config(),
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let mut run = start(&dir);
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts(&[&dir]).len() < events {
        run.assert_running();
        assert!(Instant::now() < deadline, "{}", run.stderr());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run.terminate(30).await;
    windows(&[&dir])
}

/// Waits until events `0..upto` of every key are out, checking each
/// count; panics with the workers' logs after `secs`.
async fn wait_counts(dirs: &[&Path], procs: &mut [&mut Proc], upto: u64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let c = counts(dirs);
        for ((key, n), count) in &c {
            assert_eq!(
                *count,
                n + 1,
                "key {key} event {n}: count {count}, state lost or doubled"
            );
        }
        if c.len() as u64 == u64::from(KEYS) * upto {
            return;
        }
        for p in procs.iter_mut() {
            p.assert_running();
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.stderr()).collect();
            panic!(
                "{} of {} events out after {secs}s\n{}",
                c.len(),
                u64::from(KEYS) * upto,
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Leases per owner, as the table says now.
async fn owners(p: &Peers) -> BTreeMap<String, usize> {
    let table = p.dynamo.table(TABLE, "observer").await;
    let mut out = BTreeMap::new();
    for l in table.list().await.unwrap() {
        if let Some(o) = l.actual_owner() {
            *out.entry(o.to_owned()).or_default() += 1;
        }
    }
    out
}

async fn wait_owners(
    p: &Peers,
    want: impl Fn(&BTreeMap<String, usize>) -> bool,
    secs: u64,
    procs: &mut [&mut Proc],
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let o = owners(p).await;
        if want(&o) {
            return;
        }
        for p in procs.iter_mut() {
            p.assert_running();
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.stderr()).collect();
            panic!(
                "lease owners {o:?} after {secs}s\n{}",
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_eight_shards_and_survive_a_sigkill() {
    let p = peers(8).await;
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| worker_dir(root.path(), n, &p))
        .collect();
    let mut a = start(&dirs[0]);
    let metrics = [harness::free_addr(), harness::free_addr()];
    let mut b = start_with_metrics(&dirs[1], &metrics[0]);
    let mut c = start_with_metrics(&dirs[2], &metrics[1]);
    let client = p.kinesis.client().await;
    emulator::put(&client, STREAM, events(0, 20)).await;
    let all: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    wait_counts(&all, &mut [&mut a, &mut b, &mut c], 20, 90).await;
    // Balanced: 3, 3 and 2 leases (steals converge there).
    wait_owners(
        &p,
        |o| o.len() == 3 && o.values().all(|&n| (2..=3).contains(&n)),
        60,
        &mut [&mut a, &mut b, &mut c],
    )
    .await;
    emulator::put(&client, STREAM, events(20, 40)).await;
    wait_counts(&all, &mut [&mut a, &mut b, &mut c], 40, 60).await;

    // A crash: a's shards go to b and c within failover_time + restore.
    a.kill9();
    let killed = Instant::now();
    emulator::put(&client, STREAM, events(40, 60)).await;
    wait_counts(&all, &mut [&mut b, &mut c], 60, 90).await;
    wait_owners(
        &p,
        |o| !o.contains_key("a") && o.values().sum::<usize>() == 8,
        30,
        &mut [&mut b, &mut c],
    )
    .await;
    harness::report(&format!(
        "cluster: SIGKILL of a worker to its shards' events out again: {:.1}s",
        killed.elapsed().as_secs_f64()
    ));
    let failovers: f64 = metrics
        .iter()
        .map(|m| {
            let page = harness::scrape(m).expect("metrics answer");
            harness::metric_sum(&page, "shardflow_cluster_failovers_total")
        })
        .sum();
    // a's 2 or 3 leases (a loaded machine may add a lease that missed
    // its renewals meanwhile).
    assert!(failovers >= 2.0, "a's leases taken over: {failovers}");

    // A clean stop hands every lease off: c ends up with all of them at
    // once, not after failover_time.
    b.terminate(30).await;
    wait_owners(&p, |o| o.get("c") == Some(&8), 30, &mut [&mut c]).await;
    emulator::put(&client, STREAM, events(60, 70)).await;
    wait_counts(&all, &mut [&mut c], 70, 60).await;
    if std::env::var_os("SHARDFLOW_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", c.stderr());
    }
    c.terminate(30).await;
    let o = owners(&p).await;
    assert!(
        o.is_empty(),
        "every lease released at the clean stop: {o:?}"
    );

    // However the shards moved, the window results are one process's.
    let clustered = windows(&all);
    let single = single_process(root.path(), &p, KEYS as usize * 70).await;
    assert!(
        clustered.len() > KEYS as usize * 5,
        "{} windows",
        clustered.len()
    );
    assert_eq!(
        clustered.keys().collect::<Vec<_>>(),
        single.keys().collect::<Vec<_>>()
    );
    assert_eq!(clustered, single);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_is_fenced_and_the_counts_stay_exact() {
    let p = peers(4).await;
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| worker_dir(root.path(), n, &p))
        .collect();
    let all: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let mut a = start(&dirs[0]);
    let client = p.kinesis.client().await;
    emulator::put(&client, STREAM, events(0, 10)).await;
    wait_counts(&all, &mut [&mut a], 10, 60).await;
    let mut b = start(&dirs[1]);
    wait_owners(
        &p,
        |o| o.get("a") == Some(&2) && o.get("b") == Some(&2),
        60,
        &mut [&mut a, &mut b],
    )
    .await;

    // a stops answering (a GC pause, a partition) for longer than failover_time.
    harness::signal(a.pid(), "STOP");
    emulator::put(&client, STREAM, events(10, 30)).await;
    wait_owners(&p, |o| o.get("b") == Some(&4), 30, &mut [&mut b]).await;
    wait_counts(&all, &mut [&mut b], 30, 60).await;

    // Back: its renewals and checkpoints fail the lease conditions, it drops
    // the shards it lost, and what it wrote meanwhile has the same ids and
    // values as b's (the counts check every copy).
    harness::signal(a.pid(), "CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.stderr().contains("dropping the shard") {
        a.assert_running();
        assert!(
            Instant::now() < deadline,
            "a never noticed:\n{}",
            a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    emulator::put(&client, STREAM, events(30, 40)).await;
    wait_counts(&all, &mut [&mut a, &mut b], 40, 60).await;
    // It rejoins by graceful handoff.
    wait_owners(
        &p,
        |o| o.get("a") == Some(&2) && o.get("b") == Some(&2),
        60,
        &mut [&mut a, &mut b],
    )
    .await;
    emulator::put(&client, STREAM, events(40, 50)).await;
    wait_counts(&all, &mut [&mut a, &mut b], 50, 60).await;
    a.terminate(30).await;
    b.terminate(30).await;
}

/// `GET path` on `addr`: status, headers, body (HTTP/1.1, one exchange,
/// answered within 10 s).
async fn get(addr: &str, path: &str) -> (u16, String, String) {
    exchange(addr, "GET", path, "", "").await
}

/// `POST path` of a JSON `body` with `headers` (each ending in CRLF).
async fn post(addr: &str, path: &str, headers: &str, body: &str) -> (u16, String, String) {
    exchange(addr, "POST", path, headers, body).await
}

async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("an answer within 10 s")
        .expect("an HTTP exchange");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// The online API under `[cluster]`: a worker answers the keys of the
/// shards it reads and sends the others, with a 307, to the worker whose
/// lease holds their shard (its API address is in the lease row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_its_keys_and_redirects_the_others_to_their_owner() {
    let p = peers(4).await;
    let root = tempfile::tempdir().unwrap();
    let apis = [harness::free_addr(), harness::free_addr()];
    let dirs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .zip(&apis)
        .map(|(n, api)| {
            worker_dir_with(root.path(), n, &p, &format!("\n[api]\naddr = \"{api}\"\n"))
        })
        .collect();
    let all: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let mut a = start(&dirs[0]);
    let client = p.kinesis.client().await;
    emulator::put(&client, STREAM, events(0, 10)).await;
    wait_counts(&all, &mut [&mut a], 10, 60).await;
    // b joins once everything is counted: the shards handed to it carry
    // state but no new record, and are read as of their newest event.
    let mut b = start(&dirs[1]);
    wait_owners(
        &p,
        |o| o.get("a") == Some(&2) && o.get("b") == Some(&2),
        60,
        &mut [&mut a, &mut b],
    )
    .await;
    // A listing later, both workers know where every shard is read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut local, mut redirected) = (0, 0);
    for k in 0..KEYS {
        let path = format!("/v1/features/u{k}");
        let (mut status, mut head, mut body) = get(&apis[0], &path).await;
        if status == 307 {
            redirected += 1;
            let location = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("location: ")
                        .or_else(|| l.strip_prefix("Location: "))
                })
                .unwrap_or_else(|| panic!("a 307 without Location: {head}"))
                .trim()
                .to_owned();
            assert_eq!(location, format!("http://{}{path}", apis[1]), "sent to b");
            (status, head, body) = get(&apis[1], &path).await;
        } else {
            local += 1;
        }
        assert_eq!(status, 200, "u{k}: {head}\n{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["features"]["count_1d"], 10, "u{k}: {json}");
    }
    assert!(
        local > 0 && redirected > 0,
        "{local} answered by a, {redirected} redirected"
    );

    // A Feast request for keys of both workers (and one nobody has) is
    // answered whole by either, in the request's order: each forwards the
    // other's keys to it.
    let mut keys: Vec<String> = (0..KEYS).rev().map(|k| format!("\"u{k}\"")).collect();
    keys.insert(3, "\"nobody\"".into());
    let request = format!(
        r#"{{"features": ["stats:count_1d"], "entities": {{"userId": [{}]}}}}"#,
        keys.join(", ")
    );
    for api in &apis {
        let (status, head, body) = post(api, "/v1/get-online-features", "", &request).await;
        assert_eq!(status, 200, "{head}\n{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let entities = json["results"][0]["values"].as_array().unwrap();
        let values = json["results"][1]["values"].as_array().unwrap();
        let statuses = json["results"][1]["statuses"].as_array().unwrap();
        assert_eq!(entities.len(), keys.len());
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(entities[i].to_string(), *key, "entity {i}");
            if key.contains("nobody") {
                assert_eq!(statuses[i], "NOT_FOUND", "{json}");
            } else {
                assert_eq!(
                    (&values[i], &statuses[i]),
                    (&serde_json::json!(10), &serde_json::json!("PRESENT")),
                    "{key}: {json}"
                );
            }
        }
    }
    // A forwarded request is answered only for the receiver's own keys.
    let (status, head, body) = post(
        &apis[0],
        "/v1/get-online-features",
        "x-shardflow-forwarded: 1\r\n",
        &request,
    )
    .await;
    assert_eq!(status, 503, "{head}\n{body}");
    assert!(body.contains("no longer serves"), "{body}");
    a.terminate(30).await;
    b.terminate(30).await;
}

/// Workers `a` and `b` (the first two of `names`, whose directories are
/// all made) on a stream of `shards` shards: 10 events per key counted,
/// the leases balanced between them.
struct Pair {
    p: Peers,
    root: tempfile::TempDir,
    dirs: Vec<PathBuf>,
    a: Proc,
    b: Proc,
    client: aws_sdk_kinesis::Client,
}

async fn balanced_pair(shards: i32, names: &[&str]) -> Pair {
    let p = peers(shards).await;
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = names
        .iter()
        .map(|n| worker_dir(root.path(), n, &p))
        .collect();
    let all: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let mut a = start(&dirs[0]);
    let mut b = start(&dirs[1]);
    let client = p.kinesis.client().await;
    emulator::put(&client, STREAM, events(0, 10)).await;
    wait_counts(&all, &mut [&mut a, &mut b], 10, 60).await;
    let each = shards as usize / 2;
    wait_owners(
        &p,
        |o| o.get("a") == Some(&each) && o.get("b") == Some(&each),
        60,
        &mut [&mut a, &mut b],
    )
    .await;
    Pair {
        p,
        root,
        dirs,
        a,
        b,
        client,
    }
}

/// The open shards of the stream, in hash order.
async fn open_shards(client: &aws_sdk_kinesis::Client) -> Vec<aws_sdk_kinesis::types::Shard> {
    let mut open: Vec<_> = client
        .list_shards()
        .stream_name(STREAM)
        .send()
        .await
        .unwrap()
        .shards
        .unwrap_or_default()
        .into_iter()
        .filter(|s| {
            s.sequence_number_range
                .as_ref()
                .is_some_and(|r| r.ending_sequence_number.is_none())
        })
        .collect();
    open.sort_by_key(|s| {
        s.hash_key_range
            .as_ref()
            .map(|r| r.starting_hash_key.parse::<u128>().unwrap())
    });
    open
}

/// Resharding under two workers: a split, then a merge of its children.
/// Each child starts only after its parents' `SHARD_END`, with their state
/// restricted to its range (or the union of both parents'), wherever they
/// ran: the counts of every key go on exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_split_and_merge_while_two_workers_run() {
    let Pair {
        p,
        root: _root,
        dirs,
        mut a,
        mut b,
        client,
    } = balanced_pair(2, &["a", "b"]).await;
    let all: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();

    let open = open_shards(&client).await;
    let parent = open[0].shard_id.clone();
    let range = open[0].hash_key_range.as_ref().unwrap();
    let lo: u128 = range.starting_hash_key.parse().unwrap();
    let hi: u128 = range.ending_hash_key.parse().unwrap();
    client
        .split_shard()
        .stream_name(STREAM)
        .shard_to_split(&parent)
        .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
        .send()
        .await
        .unwrap();
    emulator::wait_active(&client, STREAM).await;
    emulator::put(&client, STREAM, events(10, 20)).await;
    wait_counts(&all, &mut [&mut a, &mut b], 20, 90).await;

    let children: Vec<String> = open_shards(&client)
        .await
        .into_iter()
        .filter(|s| s.parent_shard_id.as_deref() == Some(parent.as_str()))
        .map(|s| s.shard_id)
        .collect();
    assert_eq!(children.len(), 2);
    client
        .merge_shards()
        .stream_name(STREAM)
        .shard_to_merge(&children[0])
        .adjacent_shard_to_merge(&children[1])
        .send()
        .await
        .unwrap();
    emulator::wait_active(&client, STREAM).await;
    emulator::put(&client, STREAM, events(20, 30)).await;
    wait_counts(&all, &mut [&mut a, &mut b], 30, 90).await;

    // The table tells the lineage: parents at SHARD_END, the merged child
    // with both of them as parents.
    let leases = p
        .dynamo
        .table(TABLE, "observer")
        .await
        .list()
        .await
        .unwrap();
    let by_key: BTreeMap<&str, _> = leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
    for ended in children.iter().chain([&parent]) {
        assert_eq!(
            by_key[ended.as_str()].checkpoint.to_string(),
            "SHARD_END",
            "{ended}"
        );
    }
    let merged = leases
        .iter()
        .find(|l| l.parent_shard_ids.len() == 2)
        .expect("the merged shard's lease");
    assert!(children.iter().all(|c| merged.parent_shard_ids.contains(c)));
    a.terminate(30).await;
    b.terminate(30).await;
}

/// A worker joining a balanced cluster gets its share by graceful
/// handoffs, one lease at a time, while the counts go on exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_worker_takes_its_share_one_handoff_at_a_time() {
    let Pair {
        p,
        root: _root,
        dirs,
        mut a,
        mut b,
        client,
    } = balanced_pair(6, &["a", "b", "c"]).await;
    let all: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();

    let c_metrics = harness::free_addr();
    let mut c = start_with_metrics(&dirs[2], &c_metrics);
    let table = p.dynamo.table(TABLE, "observer").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = 10;
    let mut most_pending = 0;
    loop {
        // Events keep coming while the leases move.
        emulator::put(&client, STREAM, events(next, next + 1)).await;
        next += 1;
        let leases = table.list().await.unwrap();
        let pending = leases
            .iter()
            .filter(|l| l.owner.as_deref() == Some("c") && l.handoff_pending())
            .count();
        most_pending = most_pending.max(pending);
        let held = leases
            .iter()
            .filter(|l| l.owner.as_deref() == Some("c") && !l.handoff_pending())
            .count();
        if held == 2 {
            break;
        }
        c.assert_running();
        assert!(
            Instant::now() < deadline,
            "c holds {held} leases after 60s\n{}",
            c.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(most_pending <= 1, "{most_pending} handoffs at once");
    wait_owners(
        &p,
        |o| o.len() == 3 && o.values().all(|&n| n == 2),
        30,
        &mut [&mut a, &mut b, &mut c],
    )
    .await;
    emulator::put(&client, STREAM, events(next, next + 10)).await;
    wait_counts(&all, &mut [&mut a, &mut b, &mut c], next + 10, 60).await;
    // By handoff; on a machine loaded enough that a holder misses its
    // renewals for failover_time, one may instead be taken as expired
    // (the counts above hold either way).
    let page = harness::scrape(&c_metrics).expect("c's metrics answer");
    let handoffs = harness::metric_sum(&page, "shardflow_cluster_handoff_seconds_count");
    let failovers = harness::metric_sum(&page, "shardflow_cluster_failovers_total");
    assert!(
        handoffs >= 1.0 && handoffs + failovers == 2.0,
        "{handoffs} handoffs, {failovers} failovers\n{page}"
    );
    for w in [a, b, c] {
        w.terminate(30).await;
    }
}

/// DynamoDB out of reach for one worker. Shorter than `failover_time`: it
/// keeps its shards and goes on processing them (renewals and checkpoints
/// retried). Longer: it drops them before the other worker takes them over,
/// and rejoins by handoff once the table is back. Counts stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_outage_is_ridden_out_until_failover_time() {
    let p = peers(4).await;
    let proxy = emulator::chaos::ResetProxy::start(p.dynamo.addr).await;
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| worker_dir(root.path(), n, &p))
        .collect();
    // A longer failover_time, so that the short outage is well inside it on
    // a loaded machine; a reaches the table through the proxy.
    for dir in &dirs {
        let path = dir.join("config.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replace("failover_time = \"3s\"", "failover_time = \"6s\"");
        if dir.ends_with("a") {
            text = text.replace(&p.dynamo.url(), &proxy.url());
        }
        std::fs::write(&path, text).unwrap();
    }
    let all: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let mut a = start(&dirs[0]);
    let client = p.kinesis.client().await;
    emulator::put(&client, STREAM, events(0, 10)).await;
    wait_counts(&all, &mut [&mut a], 10, 60).await;
    let mut b = start(&dirs[1]);
    let balanced = |o: &BTreeMap<String, usize>| o.get("a") == Some(&2) && o.get("b") == Some(&2);
    wait_owners(&p, balanced, 60, &mut [&mut a, &mut b]).await;

    // Short: every event is out while the table is still unreachable for a.
    proxy.set_down(true);
    emulator::put(&client, STREAM, events(10, 20)).await;
    wait_counts(&all, &mut [&mut a, &mut b], 20, 60).await;
    // Until a's next renewal (every 2 s) failed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.stderr().contains("lease renewal failed; retrying") {
        assert!(Instant::now() < deadline, "{}", a.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.set_down(false);
    assert!(balanced(&owners(&p).await), "a kept its leases");
    emulator::put(&client, STREAM, events(20, 30)).await;
    wait_counts(&all, &mut [&mut a, &mut b], 30, 60).await;

    // Long: b takes everything, a drops its shards on its own.
    proxy.set_down(true);
    emulator::put(&client, STREAM, events(30, 40)).await;
    wait_owners(&p, |o| o.get("b") == Some(&4), 60, &mut [&mut a, &mut b]).await;
    wait_counts(&all, &mut [&mut a, &mut b], 40, 60).await;
    assert!(
        a.stderr()
            .contains("dropping the shard before another worker may take it"),
        "{}",
        a.stderr()
    );
    proxy.set_down(false);
    wait_owners(&p, balanced, 60, &mut [&mut a, &mut b]).await;
    emulator::put(&client, STREAM, events(40, 50)).await;
    wait_counts(&all, &mut [&mut a, &mut b], 50, 60).await;
    a.terminate(30).await;
    b.terminate(30).await;
}
