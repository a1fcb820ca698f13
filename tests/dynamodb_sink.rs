//! The `dynamodb` sink against a real DynamoDB peer (dynoxide, embedded, on
//! 127.0.0.1), mostly through the binary as a user runs it: a file source,
//! window features and an embedded model, and a Scan of the table
//! afterwards. The newest vector per key is the item; an older replay does
//! not move items back (conditional mode) and does in batch mode, as
//! documented; a missing table or a wrong key stops the run at start;
//! throttling and unprocessed batch items, injected by a proxy between the
//! two, are retried without losing an item; an endpoint that stops
//! answering fails the run without committing, and the next run writes
//! what the failed one could not.

mod dynamo;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, KeyType, ScalarAttributeType};
use dynamo::{DynamoServer, Row};
use serde_json::{json, Value as Json};
use shardflow::config::{DynamoDbSinkConfig, WriteMode};
use shardflow::record::{FeatureRecord, FeatureVector, Output, Value};
use shardflow::sink::dynamodb::DynamoDbSink;
use shardflow::sink::Sink;

const TABLE: &str = "user-features";
const T0: i64 = 1_700_000_000_000;
/// Every test finishes well within this.
const LIMIT: Duration = Duration::from_secs(180);
/// One `shardflow run` over a few thousand events.
const RUN_LIMIT: Duration = Duration::from_secs(90);

async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(LIMIT, body)
        .await
        .expect("the test did not finish in time");
}

// ---------------------------------------------------------------------------
// Input, config, the binary.

/// `n` events over `keys` keys (`{prefix}0`…), 50 ms apart from `t0`, a
/// quarter of them 2,001 ms behind (out of order, within the 5 s the
/// watermark allows, so never late). With 40 keys a key's events are 2 s
/// apart, so its shifted events come before its previous one: ten of 40
/// keys' last event in the file is not their newest. No key has two events
/// at one time.
fn events(prefix: &str, keys: usize, n: usize, t0: i64) -> String {
    let mut text = String::new();
    for i in 0..n {
        let key = format!("{prefix}{}", (i * 7) % keys);
        let back = if (i / keys + i) % 4 == 1 { 2_001 } else { 0 };
        let t = t0 + 50 * i as i64 - back;
        let amount = (i % 13) as f64 * 1.25 + 0.5;
        text.push_str(&format!(
            "{{\"userId\":\"{key}\",\"timestamp\":{t},\"amount\":{amount}}}\n"
        ));
    }
    text
}

/// A logistic model over the config's features, with impute values.
const MODEL: &str = r#"
name = "fraud-test"
version = "7"
type = "logistic"
bias = -3.0
threshold = 0.5
[weights]
txn_count_1m = 0.2
amount_sum_1m = 0.01
amount_max_1m = 0.05
[impute]
txn_count_1m = 0.0
amount_sum_1m = 0.0
amount_max_1m = 0.0
"#;

/// A config reading `input` into `dir`: features and predictions to NDJSON
/// files (what the items are compared with) and to the table through
/// `endpoint` with the extra `dynamodb` keys.
fn config(dir: &Path, name: &str, input: &Path, endpoint: &str, dynamodb: &str) -> PathBuf {
    let model = dir.join("model.toml");
    std::fs::write(&model, MODEL).unwrap();
    let d = dir.display();
    let text = format!(
        r#"
[pipeline]
state_dir = "{d}/state-{name}"
checkpoint_interval = "200ms"

[source]
type = "file"
path = "{input}"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64" }}

[watermark]
max_out_of_orderness = "5s"
idle_timeout = "1h"
allowed_lateness = "0s"

[[features]]
name = "txn_count_1m"
agg = "count"
window = {{ type = "tumbling", size = "1m" }}

[[features]]
name = "amount_sum_1m"
agg = "sum"
field = "amount"
window = {{ type = "sliding", size = "1m", slide = "10s" }}

[[features]]
name = "amount_max_1m"
agg = "max"
field = "amount"
window = {{ type = "tumbling", size = "1m" }}

[[features]]
name = "amount_mean_5s"
agg = "mean"
field = "amount"
window = {{ type = "tumbling", size = "5s" }}

[inference]
backend = "embedded"
model = "{model}"

[[sinks]]
type = "file"
path = "{d}/{name}-features.ndjson"
kinds = ["features"]

[[sinks]]
type = "file"
path = "{d}/{name}-predictions.ndjson"
kinds = ["prediction"]

[[sinks]]
type = "dynamodb"
table = "{TABLE}"
endpoint_url = "{endpoint}"
{dynamodb}
"#,
        input = input.display(),
        model = model.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

struct Ran {
    code: Option<i32>,
    stderr: String,
    stdout: String,
}

/// `shardflow <args>` to its end (killed after [`RUN_LIMIT`]). The dummy
/// credentials `dynamo::init` put in this process's environment are
/// inherited.
async fn shardflow(args: &[&str], config: &Path) -> Ran {
    dynamo::init();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardflow"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(RUN_LIMIT, child)
        .await
        .unwrap_or_else(|_| panic!("shardflow {args:?} did not end within {RUN_LIMIT:?}"))
        .unwrap();
    Ran {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

async fn run(config: &Path) -> Ran {
    shardflow(&["run", "--quiet", "--metrics-addr", "off"], config).await
}

async fn run_ok(config: &Path) {
    let ran = run(config).await;
    assert_eq!(ran.code, Some(0), "shardflow run failed:\n{}", ran.stderr);
}

fn read_lines(path: &Path) -> Vec<Json> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// What the table must hold, and what it holds.

/// Numbers as f64, so `3` (an integer count) equals DynamoDB's `"3"`.
fn norm(v: &Json) -> Json {
    match v {
        Json::Number(n) => json!(n.as_f64().unwrap()),
        Json::Array(a) => Json::Array(a.iter().map(norm).collect()),
        Json::Object(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), norm(v))).collect()),
        other => other.clone(),
    }
}

/// The item an NDJSON features or prediction line must become.
fn expected_item(line: &Json, key_attribute: &str) -> Json {
    let mut item = serde_json::Map::new();
    item.insert(key_attribute.into(), line["key"].clone());
    item.insert("event_time".into(), line["event_time"].clone());
    item.insert("id".into(), line["id"].clone());
    for (name, v) in line["features"].as_object().unwrap() {
        item.insert(name.clone(), v.clone());
    }
    if line["kind"] == "prediction" {
        for field in ["prediction", "model", "variant", "fallback"] {
            item.insert(field.into(), line[field].clone());
        }
    }
    norm(&Json::Object(item))
}

/// Per key, the output with the newest event time (these inputs have no
/// ties within a key), from several runs' NDJSON files.
fn newest_per_key(files: &[PathBuf], key_attribute: &str) -> BTreeMap<String, Json> {
    let mut newest: BTreeMap<String, Json> = BTreeMap::new();
    for file in files {
        let lines = read_lines(file);
        assert!(!lines.is_empty(), "{} is empty", file.display());
        for line in lines {
            let key = line["key"].as_str().unwrap().to_owned();
            let t = line["event_time"].as_i64().unwrap();
            let keep = newest
                .get(&key)
                .is_none_or(|old| old["event_time"].as_f64().unwrap() < t as f64);
            if keep {
                newest.insert(key, expected_item(&line, key_attribute));
            }
        }
    }
    newest
}

fn attribute_json(v: &AttributeValue) -> Json {
    match v {
        AttributeValue::S(s) => json!(s),
        AttributeValue::N(n) => json!(n.parse::<f64>().unwrap()),
        AttributeValue::Bool(b) => json!(b),
        AttributeValue::Null(_) => Json::Null,
        AttributeValue::L(l) => Json::Array(l.iter().map(attribute_json).collect()),
        AttributeValue::M(m) => Json::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), attribute_json(v)))
                .collect(),
        ),
        other => panic!("an attribute the sink does not write: {other:?}"),
    }
}

/// Every item of `table` (a consistent Scan, page by page), by key.
async fn scan(server: &DynamoServer, table: &str, key_attribute: &str) -> BTreeMap<String, Json> {
    let client = server.client().await;
    let mut items = BTreeMap::new();
    let mut start: Option<Row> = None;
    for _page in 0..1_000 {
        let page = client
            .scan()
            .table_name(table)
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .unwrap();
        for item in page.items() {
            let Some(AttributeValue::S(key)) = item.get(key_attribute) else {
                panic!("an item without its key: {item:?}");
            };
            let as_json: serde_json::Map<String, Json> = item
                .iter()
                .map(|(k, v)| (k.clone(), attribute_json(v)))
                .collect();
            items.insert(key.clone(), Json::Object(as_json));
        }
        match page.last_evaluated_key() {
            Some(last) => start = Some(last.clone()),
            None => return items,
        }
    }
    panic!("more than 1,000 Scan pages");
}

fn assert_items(got: &BTreeMap<String, Json>, want: &BTreeMap<String, Json>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the table's keys"
    );
    for (key, item) in want {
        assert_eq!(&got[key], item, "the item of {key}");
    }
}

/// A table's key: (attribute, HASH or RANGE, type).
type Keys<'a> = &'a [(&'a str, KeyType, ScalarAttributeType)];

async fn create_table(server: &DynamoServer, table: &str, key_attribute: &str) {
    server
        .create_table(
            table,
            &[(key_attribute, KeyType::Hash, ScalarAttributeType::S)],
        )
        .await;
}

// ---------------------------------------------------------------------------
// A proxy between shardflow and the emulator that injects faults into write
// requests (`PutItem`, `BatchWriteItem`) and passes everything else.

#[derive(Default)]
struct Faults {
    /// Answer every n-th write request with ProvisionedThroughputExceeded (0: never).
    throttle_every: AtomicU64,
    /// Write only the first half of every other BatchWriteItem, answering the
    /// rest as UnprocessedItems.
    unprocess: AtomicBool,
    /// Close the connection of every write request without an answer.
    reset_writes: AtomicBool,
    writes: AtomicU64,
    batches: AtomicU64,
    throttled: AtomicU64,
    unprocessed: AtomicU64,
    resets: AtomicU64,
}

struct Proxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept loop owns the connections' tasks: aborting it ends them.
        self.task.abort();
    }
}

type Body = axum::body::Body;

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let shared = faults.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let faults = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, upstream, faults.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Proxy { addr, faults, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

const THROTTLED: &str = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"Rate of requests exceeds the allowed throughput (injected by the test proxy)"}"#;

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    upstream: SocketAddr,
    faults: Arc<Faults>,
) -> Result<hyper::Response<Body>, std::io::Error> {
    let op = req
        .headers()
        .get("x-amz-target")
        .and_then(|t| t.to_str().ok())
        .and_then(|t| t.strip_prefix("DynamoDB_20120810."))
        .unwrap_or("")
        .to_owned();
    let write = op == "PutItem" || op == "BatchWriteItem";
    if write && faults.reset_writes.load(Ordering::SeqCst) {
        faults.resets.fetch_add(1, Ordering::SeqCst);
        return Err(std::io::Error::other("connection closed by the test proxy"));
    }
    if write {
        let n = faults.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let every = faults.throttle_every.load(Ordering::SeqCst);
        if every > 0 && n.is_multiple_of(every) {
            faults.throttled.fetch_add(1, Ordering::SeqCst);
            return Ok(hyper::Response::builder()
                .status(400)
                .header("content-type", "application/x-amz-json-1.0")
                .body(Body::from(THROTTLED))
                .unwrap());
        }
    }
    let (mut parts, body) = req.into_parts();
    let mut body = axum::body::to_bytes(Body::new(body), 64 << 20)
        .await
        .map_err(std::io::Error::other)?;
    // Half of this batch goes back as unprocessed.
    let mut held: Option<(String, Vec<Json>)> = None;
    if op == "BatchWriteItem"
        && faults.unprocess.load(Ordering::SeqCst)
        && faults
            .batches
            .fetch_add(1, Ordering::SeqCst)
            .is_multiple_of(2)
    {
        let mut request: Json = serde_json::from_slice(&body).unwrap();
        let items = request["RequestItems"].as_object_mut().unwrap();
        let (table, list) = items.iter_mut().next().unwrap();
        let list = list.as_array_mut().unwrap();
        let rest = list.split_off(list.len() - list.len() / 2);
        if !rest.is_empty() {
            faults
                .unprocessed
                .fetch_add(rest.len() as u64, Ordering::SeqCst);
            held = Some((table.clone(), rest));
            body = serde_json::to_vec(&request).unwrap().into();
            parts.headers.remove("content-length");
        }
    }
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    let answer = sender
        .send_request(hyper::Request::from_parts(parts, Body::from(body)))
        .await
        .map_err(std::io::Error::other)?;
    let (mut parts, body) = answer.into_parts();
    let mut body = axum::body::to_bytes(Body::new(body), 64 << 20)
        .await
        .map_err(std::io::Error::other)?;
    if let Some((table, rest)) = held {
        let mut answer: Json = serde_json::from_slice(&body).unwrap();
        answer["UnprocessedItems"] = json!({ table: rest });
        body = serde_json::to_vec(&answer).unwrap().into();
        // The checksum and length were the emulator's body's.
        parts.headers.remove("x-amz-crc32");
        parts.headers.remove("content-length");
    }
    Ok(hyper::Response::from_parts(parts, Body::from(body)))
}

// ---------------------------------------------------------------------------
// The tests.

/// Items equal the newest prediction of each key; a second pipeline (fresh
/// state) over older events of the same keys leaves them alone and adds
/// its new keys and newer events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_puts_keep_the_newest_prediction_and_an_older_replay_changes_nothing() {
    bounded(async {
        let server = DynamoServer::start().await;
        create_table(&server, TABLE, "userId").await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let extra =
            "key_attribute = \"userId\"\nkinds = [\"features\", \"prediction\"]\nconcurrency = 8";

        let input = d.join("events.ndjson");
        std::fs::write(&input, events("u", 40, 1_200, T0)).unwrap();
        run_ok(&config(d, "live", &input, &server.url(), extra)).await;
        let live = [d.join("live-predictions.ndjson")];
        let want = newest_per_key(&live, "userId");
        assert_eq!(want.len(), 40);
        let lines = read_lines(&live[0]);
        let last_is_older = want
            .iter()
            .filter(|(key, item)| {
                let last = lines
                    .iter()
                    .rev()
                    .find(|l| l["key"] == key.as_str())
                    .unwrap();
                last["event_time"].as_f64() < item["event_time"].as_f64()
            })
            .count();
        assert!(
            last_is_older >= 5,
            "only {last_is_older} keys end out of order"
        );
        assert_items(&scan(&server, TABLE, "userId").await, &want);
        // The items are predictions, with their features.
        let u1 = &want["u1"];
        assert_eq!(u1["model"], "fraud-test");
        assert!(u1["prediction"]["score"].is_number(), "{u1}");
        assert!(u1["txn_count_1m"].as_f64().unwrap() >= 1.0, "{u1}");

        // An hour older for every key, then three new keys, and u1 a day
        // newer (in event-time order, so that none of them is late).
        let mut older = events("u", 40, 400, T0 - 3_600_000);
        older.push_str(&events("new", 3, 3, T0 - 3_600_000 + 30_000));
        older.push_str(&events("u", 40, 1, T0 + 86_400_000).replace("u0", "u1"));
        let input2 = d.join("older.ndjson");
        std::fs::write(&input2, older).unwrap();
        run_ok(&config(d, "older", &input2, &server.url(), extra)).await;
        let both = [live[0].clone(), d.join("older-predictions.ndjson")];
        let want = newest_per_key(&both, "userId");
        assert_eq!(want.len(), 43);
        assert!(want["u1"]["event_time"].as_f64().unwrap() > T0 as f64 + 8e7);
        assert!(want["u2"]["id"].as_str().unwrap().contains("events.ndjson"));
        assert_items(&scan(&server, TABLE, "userId").await, &want);
    })
    .await;
}

/// Batch mode writes every item in batches of 25; being unconditional, an
/// older replay moves items back, as the README warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_writes_every_item_and_may_move_them_back_on_replay() {
    bounded(async {
        let server = DynamoServer::start().await;
        create_table(&server, TABLE, "key").await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let extra = "kinds = [\"features\"]\nwrite_mode = \"batch\"";

        let input = d.join("events.ndjson");
        std::fs::write(&input, events("u", 130, 2_000, T0)).unwrap();
        run_ok(&config(d, "live", &input, &server.url(), extra)).await;
        let live = [d.join("live-features.ndjson")];
        let want = newest_per_key(&live, "key");
        assert_eq!(want.len(), 130);
        let got = scan(&server, TABLE, "key").await;
        assert_items(&got, &want);
        assert!(
            got["u5"].get("prediction").is_none(),
            "a features item has no prediction"
        );

        let input2 = d.join("older.ndjson");
        std::fs::write(&input2, events("u", 130, 130, T0 - 3_600_000)).unwrap();
        run_ok(&config(d, "older", &input2, &server.url(), extra)).await;
        let want = newest_per_key(&[d.join("older-features.ndjson")], "key");
        assert_eq!(want.len(), 130);
        assert_items(&scan(&server, TABLE, "key").await, &want);
    })
    .await;
}

/// The sink itself (not through the binary): what it counts, which is what
/// its metrics say. 1,000 outputs over 100 keys per checkpoint are 100
/// conditional puts or 4 batches; older outputs are stale, not errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_counts_requests_items_stale_puts_and_coalesced_outputs() {
    bounded(async {
        let server = DynamoServer::start().await;
        create_table(&server, TABLE, "key").await;
        let names: Vec<Arc<str>> = vec!["count".into()];
        let names: Arc<[Arc<str>]> = names.into();
        let outputs = |round: i64, t0: i64| -> Vec<Output> {
            (0..1_000)
                .map(|i| {
                    Output::Features(FeatureRecord {
                        id: format!("r{round}/{i}"),
                        key: format!("k{}", i % 100).into(),
                        event_time: t0 + i,
                        features: FeatureVector {
                            names: names.clone(),
                            values: vec![Some(Value::Int(i))],
                        },
                        arrival: 0,
                    })
                })
                .collect()
        };
        let mut sink = DynamoDbSink::connect(sink_config(&server.url(), WriteMode::Conditional))
            .await
            .unwrap();
        assert!(
            sink.describe().contains("conditional PutItem"),
            "{}",
            sink.describe()
        );
        let first = outputs(1, T0);
        let refs: Vec<&Output> = first.iter().collect();
        sink.write(&refs).await.unwrap();
        assert_eq!(sink.checkpoint(1, false).await.unwrap(), 1);
        let s = sink.stats();
        assert_eq!(
            (s.items, s.requests, s.stale, s.coalesced),
            (100, 100, 0, 900)
        );

        // A restart's outputs again: the same times, written again.
        sink.write(&refs).await.unwrap();
        sink.checkpoint(2, false).await.unwrap();
        assert_eq!((sink.stats().items, sink.stats().stale), (200, 0));

        // Older events: every put is refused by its condition.
        let older = outputs(3, T0 - 10_000);
        let refs: Vec<&Output> = older.iter().collect();
        sink.write(&refs).await.unwrap();
        sink.checkpoint(3, false).await.unwrap();
        let s = sink.stats();
        assert_eq!((s.items, s.requests, s.stale), (200, 300, 100));
        let items = scan(&server, TABLE, "key").await;
        assert_eq!(items.len(), 100);
        // k7's newest event is the last of its ten: i = 907.
        assert_eq!(items["k7"]["id"], "r1/907");
        assert_eq!(items["k7"]["count"], json!(907.0));

        // Batch mode: 100 items are 4 requests, older or not.
        let mut batch = DynamoDbSink::connect(sink_config(&server.url(), WriteMode::Batch))
            .await
            .unwrap();
        let refs: Vec<&Output> = older.iter().collect();
        batch.write(&refs).await.unwrap();
        batch.checkpoint(1, true).await.unwrap();
        let s = batch.stats();
        assert_eq!((s.items, s.requests, s.stale), (100, 4, 0));
        assert_eq!(scan(&server, TABLE, "key").await["k7"]["id"], "r3/907");
    })
    .await;
}

fn sink_config(endpoint: &str, write_mode: WriteMode) -> DynamoDbSinkConfig {
    DynamoDbSinkConfig {
        table: TABLE.into(),
        key_attribute: "key".into(),
        kinds: vec![shardflow::record::OutputKind::Features],
        write_mode,
        concurrency: 8,
        max_attempts: 3,
        request_timeout: shardflow::time::Duration::from_millis(10_000),
        max_buffered_keys: 100_000,
        endpoint_url: Some(endpoint.into()),
        region: None,
    }
}

/// A missing table, or one whose key is not `key_attribute` (S) alone,
/// stops `run` before it reads input, with what is wrong; `check` says what
/// it can without the network, and refuses kinds the sink cannot write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_or_a_wrong_key_stops_the_run_at_start() {
    bounded(async {
        let server = DynamoServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let input = d.join("events.ndjson");
        std::fs::write(&input, events("u", 5, 50, T0)).unwrap();
        let extra = "key_attribute = \"userId\"\nkinds = [\"prediction\"]";

        let ran = run(&config(d, "missing", &input, &server.url(), extra)).await;
        assert_eq!(ran.code, Some(1), "{}", ran.stderr);
        assert!(
            ran.stderr.contains(&format!("DynamoDB table {TABLE} does not exist (region us-east-1, endpoint {})", server.url()))
                && ran.stderr.contains("shardflow does not create it")
                && ran.stderr.contains("AttributeName=userId,KeyType=HASH"),
            "{}",
            ran.stderr
        );
        let out = d.join("missing-predictions.ndjson");
        assert!(read_lines(&out).is_empty(), "input was read before the table was checked");

        let wrong: [(&str, Keys, &str); 3] = [
            ("t-other-key", &[("id", KeyType::Hash, ScalarAttributeType::S)], "its key is id (HASH, S)"),
            ("t-number-key", &[("userId", KeyType::Hash, ScalarAttributeType::N)], "its key is userId (HASH, N)"),
            (
                "t-range-key",
                &[
                    ("userId", KeyType::Hash, ScalarAttributeType::S),
                    ("event_time", KeyType::Range, ScalarAttributeType::N),
                ],
                "its key is userId (HASH, S), event_time (RANGE, N)",
            ),
        ];
        for (table, keys, want) in wrong {
            server.create_table(table, keys).await;
            let path = config(d, table, &input, &server.url(), extra);
            let text = std::fs::read_to_string(&path).unwrap().replace(TABLE, table);
            std::fs::write(&path, text).unwrap();
            let ran = run(&path).await;
            assert_eq!(ran.code, Some(1), "{table}: {}", ran.stderr);
            assert!(
                ran.stderr.contains(&format!("DynamoDB table {table}: {want}"))
                    && ran.stderr.contains("must be userId (HASH, S) alone"),
                "{table}: {}",
                ran.stderr
            );
        }

        // `check` calls no AWS API: a closed port is fine.
        let closed = "http://127.0.0.1:9";
        let ran = shardflow(&["check"], &config(d, "check", &input, closed, extra)).await;
        assert_eq!(ran.code, Some(0), "{}", ran.stderr);
        assert!(
            ran.stdout.contains(&format!("sink:      dynamodb table {TABLE} (hash key userId; newest item per key, conditional PutItem, ≤ 16 requests in flight) ← prediction")),
            "{}",
            ran.stdout
        );
        let bad = config(d, "bad", &input, closed, "kinds = [\"features\", \"late\"]");
        let ran = shardflow(&["check"], &bad).await;
        assert_eq!(ran.code, Some(2), "{}", ran.stderr);
        assert!(
            ran.stderr.contains("type = \"dynamodb\": kinds may only hold \"features\" and \"prediction\""),
            "{}",
            ran.stderr
        );
    })
    .await;
}

/// Throttling (every third write request) in both modes, and half of every
/// other batch answered as unprocessed: retried, and every item is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_unprocessed_items_are_retried_and_nothing_is_lost() {
    bounded(async {
        let server = DynamoServer::start().await;
        let proxy = Proxy::start(server.addr).await;
        proxy.faults.throttle_every.store(3, Ordering::SeqCst);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let input = d.join("events.ndjson");
        std::fs::write(&input, events("u", 90, 1_500, T0)).unwrap();

        create_table(&server, TABLE, "key").await;
        let extra = "kinds = [\"prediction\"]\nmax_attempts = 10";
        run_ok(&config(d, "conditional", &input, &proxy.url(), extra)).await;
        let want = newest_per_key(&[d.join("conditional-predictions.ndjson")], "key");
        assert_eq!(want.len(), 90);
        assert_items(&scan(&server, TABLE, "key").await, &want);
        let throttled = proxy.faults.throttled.load(Ordering::SeqCst);
        assert!(throttled >= 20, "only {throttled} requests throttled");

        // The same run in batch mode, into a fresh table.
        server.client().await.delete_table().table_name(TABLE).send().await.unwrap();
        create_table(&server, TABLE, "key").await;
        proxy.faults.unprocess.store(true, Ordering::SeqCst);
        let extra = "kinds = [\"prediction\"]\nmax_attempts = 10\nwrite_mode = \"batch\"";
        run_ok(&config(d, "batch", &input, &proxy.url(), extra)).await;
        assert_items(&scan(&server, TABLE, "key").await, &want);
        let unprocessed = proxy.faults.unprocessed.load(Ordering::SeqCst);
        let throttled_batches = proxy.faults.throttled.load(Ordering::SeqCst) - throttled;
        assert!(unprocessed > 0 && throttled_batches > 0, "{unprocessed} unprocessed, {throttled_batches} throttled");
        eprintln!("[dynamodb] injected: {throttled} throttled puts, {throttled_batches} throttled batches, {unprocessed} unprocessed items");
    })
    .await;
}

/// Writes that never get an answer fail the run after `max_attempts`,
/// naming the table, and the checkpoint is not committed: the next run on
/// the same state reads the input again and writes every item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_stops_answering_fails_the_run_and_commits_nothing() {
    bounded(async {
        let server = DynamoServer::start().await;
        create_table(&server, TABLE, "key").await;
        let proxy = Proxy::start(server.addr).await;
        // DescribeTable at start passes; every write after it is cut.
        proxy.faults.reset_writes.store(true, Ordering::SeqCst);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let input = d.join("events.ndjson");
        std::fs::write(&input, events("u", 30, 600, T0)).unwrap();
        let extra = "kinds = [\"features\"]\nmax_attempts = 3\nconcurrency = 4";
        let path = config(d, "cut", &input, &proxy.url(), extra);

        let ran = run(&path).await;
        assert_eq!(ran.code, Some(1), "{}", ran.stderr);
        assert!(
            ran.stderr
                .contains(&format!("DynamoDB table {TABLE}: PutItem of key"))
                && ran.stderr.contains("failed after 3 attempts"),
            "{}",
            ran.stderr
        );
        let resets = proxy.faults.resets.load(Ordering::SeqCst);
        assert!(resets >= 3, "{resets} writes cut");
        assert!(scan(&server, TABLE, "key").await.is_empty());

        proxy.faults.reset_writes.store(false, Ordering::SeqCst);
        run_ok(&path).await;
        // The features file has both runs' lines (the first run's file sink
        // wrote before the table refused); the newest per key is the same.
        let want = newest_per_key(&[d.join("cut-features.ndjson")], "key");
        assert_eq!(want.len(), 30);
        assert_items(&scan(&server, TABLE, "key").await, &want);
    })
    .await;
}
