//! The online API (`[api]`) through the binary, as a user drives it: a
//! `shardflow run` over a followed NDJSON file, its outputs in files, and
//! HTTP requests on loopback. The answers are compared with what the
//! stream itself produced: `GET /v1/features` with the per-event vectors
//! of the file sink, `POST /v1/score` with the vector and prediction the
//! same event gets once it is appended to the file, a bad event's 400 with
//! the dead letter the same line becomes, and a flooded queue's 503s with a
//! run that served no request at all. With the SageMaker backend, the
//! model is `shardflow serve-model`.

mod harness;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{free_addr, ndjson, Proc};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000;

/// An HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One HTTP/1.1 request (`Connection: close`), answered within 10 s.
async fn http(addr: &str, method: &str, path: &str, body: &str) -> Reply {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let mut body = body.to_string();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        head: head.to_string(),
        body,
    }
}

fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        text = &rest[n + 2..];
    }
    out
}

/// Waits until `addr` answers HTTP (the API is listening), at most 30 s.
async fn wait_listening(addr: &str, proc: &mut Proc) {
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        proc.assert_running();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing listens on {addr}:\n{}",
            proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The records of an NDJSON output once it holds at least `n`, at most 60 s.
async fn wait_lines(path: &Path, n: usize, proc: &mut Proc) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let lines = ndjson(path);
        if lines.len() >= n {
            return lines;
        }
        proc.assert_running();
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} has {} of {n} lines:\n{}",
            path.display(),
            lines.len(),
            proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn line(key: &str, t: i64, amount: f64, merchant: &str) -> String {
    format!(
        "{{\"userId\":\"{key}\",\"timestamp\":{t},\"amount\":{amount},\"merchant\":\"{merchant}\"}}\n"
    )
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.flush().unwrap();
}

/// The features of `config/local.toml` (what `config/models/fraud.toml`
/// weighs), a file source (followed or not), file sinks in `dir`, and
/// `extra` (the `[api]` and `[inference]` tables).
fn config(dir: &Path, input: &Path, follow: bool, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "200ms"

[source]
type = "file"
path = "{input}"
follow = {follow}
poll_interval = "50ms"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64", merchant = "string" }}

[watermark]
max_out_of_orderness = "5s"
idle_timeout = "1h"
allowed_lateness = "0s"

[[features]]
name = "txn_count_1m"
agg = "count"
window = {{ type = "sliding", size = "1m", slide = "10s" }}

[[features]]
name = "amount_sum_1m"
agg = "sum"
field = "amount"
window = {{ type = "sliding", size = "1m", slide = "10s" }}

[[features]]
name = "amount_max_5m"
agg = "max"
field = "amount"
window = {{ type = "tumbling", size = "5m" }}

[[features]]
name = "merchants_5m"
agg = "distinct_count"
field = "merchant"
window = {{ type = "tumbling", size = "5m" }}

[[sinks]]
type = "file"
path = "{dir}/features.ndjson"
kinds = ["features"]

[[sinks]]
type = "file"
path = "{dir}/dead.ndjson"
kinds = ["dead_letter"]
{extra}
"#,
        dir = dir.display(),
        input = input.display(),
    );
    let path = dir.join("shardflow.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn model_path() -> String {
    format!("{}/config/models/fraud.toml", env!("CARGO_MANIFEST_DIR"))
}

fn embedded_model(dir: &Path) -> String {
    format!(
        "\n[inference]\nbackend = \"embedded\"\nmodel = \"{}\"\nmax_batch = 8\nmax_wait = \"5ms\"\n\n[[sinks]]\ntype = \"file\"\npath = \"{}/predictions.ndjson\"\nkinds = [\"prediction\"]\n",
        model_path(),
        dir.display()
    )
}

/// A score answer without its timing, for comparing two of them.
fn untimed(mut score: Value) -> Value {
    score.as_object_mut().unwrap().remove("latency_ms");
    score
}

/// The record of the event at `t` for `key` in an NDJSON output.
fn record_at(lines: &[Value], key: &str, t: i64) -> Value {
    lines
        .iter()
        .find(|l| l["key"] == key && l["event_time"] == t)
        .unwrap_or_else(|| panic!("no record for {key} at {t} in {lines:?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_are_the_stream_s_vectors_and_scoring_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    let events = [
        ("u1", T0, 12.5, "m1"),
        ("u2", T0 + 500, 3.0, "m2"),
        ("u1", T0 + 1_000, 40.0, "m2"),
        ("u2", T0 + 2_000, 1.0, "m2"),
        ("u1", T0 + 3_000, 7.25, "m3"),
    ];
    let text: String = events
        .iter()
        .map(|&(k, t, a, m)| line(k, t, a, m))
        .collect();
    std::fs::write(&input, text).unwrap();
    let api = free_addr();
    let extra = format!("\n[api]\naddr = \"{api}\"\n{}", embedded_model(dir.path()));
    let config = config(dir.path(), &input, true, &extra);
    let mut proc = Proc::run(dir.path(), &config, "off", "run.log");
    wait_listening(&api, &mut proc).await;
    let features = dir.path().join("features.ndjson");
    let streamed = wait_lines(&features, events.len(), &mut proc).await;

    // GET: the vector the stream gave u1's last event, at the newest event
    // time (u1's last event is the newest of all).
    let last = record_at(&streamed, "u1", T0 + 3_000);
    let got = http(&api, "GET", "/v1/features/u1", "").await;
    assert_eq!(got.status, 200, "{}", got.body);
    let body = got.json();
    assert_eq!(body["key"], "u1");
    assert_eq!(
        body["at"],
        T0 + 3_000,
        "at defaults to the newest event time"
    );
    assert_eq!(body["watermark"], T0 + 3_000 - 5_000 - 1);
    assert_eq!(body["features"], last["features"], "{body}");
    assert_eq!(body["last_event_time"], T0 + 3_000);
    for name in [
        "txn_count_1m",
        "amount_sum_1m",
        "amount_max_5m",
        "merchants_5m",
    ] {
        assert_eq!(body["statuses"][name], "PRESENT", "{body}");
    }
    assert_eq!(body["features"]["txn_count_1m"], 3);
    // `at` as epoch ms and as RFC 3339 (percent-encoded or not) alike.
    for at in [
        format!("{}", T0 + 3_000),
        "2023-11-14T22:13:23Z".into(),
        "2023-11-14T23:13:23%2B01:00".into(),
    ] {
        let r = http(&api, "GET", &format!("/v1/features/u1?at={at}"), "").await;
        assert_eq!(r.status, 200, "{at}: {}", r.body);
        assert_eq!(r.json()["features"], last["features"], "{at}");
        assert_eq!(r.json()["at"], T0 + 3_000, "{at}");
    }
    // u2's vector as of its last event's time is its last event's vector.
    let u2 = http(
        &api,
        "GET",
        &format!("/v1/features/u2?at={}", T0 + 2_000),
        "",
    )
    .await;
    assert_eq!(
        u2.json()["features"],
        record_at(&streamed, "u2", T0 + 2_000)["features"]
    );
    let bad = http(&api, "GET", "/v1/features/u1?at=yesterday", "").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"].as_str().unwrap().contains("yesterday"),
        "{}",
        bad.body
    );

    // An unknown key: 200, every status NOT_FOUND.
    let unknown = http(&api, "GET", "/v1/features/nobody", "").await;
    assert_eq!(unknown.status, 200, "{}", unknown.body);
    let unknown = unknown.json();
    for name in [
        "txn_count_1m",
        "amount_sum_1m",
        "amount_max_5m",
        "merchants_5m",
    ] {
        assert_eq!(unknown["statuses"][name], "NOT_FOUND", "{unknown}");
        assert_eq!(unknown["features"][name], Value::Null, "{unknown}");
    }
    assert_eq!(unknown["last_event_time"], Value::Null);

    // Score the next transaction twice: the same answer, including itself.
    let next = line("u1", T0 + 3_500, 100.0, "m9");
    let first = http(&api, "POST", "/v1/score", &next).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let second = http(&api, "POST", "/v1/score", &next).await;
    assert_eq!(second.status, 200, "{}", second.body);
    let score = untimed(first.json());
    assert_eq!(
        score,
        untimed(second.json()),
        "scoring twice gives one answer"
    );
    assert_eq!(score["late"], false);
    assert_eq!(score["features"]["txn_count_1m"], 4, "{score}");
    assert_eq!(
        score["features"]["amount_sum_1m"].as_f64().unwrap(),
        12.5 + 40.0 + 7.25 + 100.0
    );
    assert_eq!(score["features"]["amount_max_5m"].as_f64().unwrap(), 100.0);
    assert_eq!(score["features"]["merchants_5m"], 4);
    assert_eq!(score["model"], "fraud-logistic");
    assert_eq!(score["fallback"], false);
    assert!(score["prediction"]["score"].as_f64().is_some(), "{score}");
    // Nothing changed: the read is what it was, and the event, streamed
    // now, gets exactly the vector (and prediction) the score answered.
    let again = http(&api, "GET", "/v1/features/u1", "").await.json();
    assert_eq!(again, body, "scoring changed the state");
    append(&input, &next);
    let streamed = wait_lines(&features, events.len() + 1, &mut proc).await;
    let record = record_at(&streamed, "u1", T0 + 3_500);
    assert_eq!(record["features"], score["features"]);
    let predictions = wait_lines(
        &dir.path().join("predictions.ndjson"),
        events.len() + 1,
        &mut proc,
    )
    .await;
    let predicted = record_at(&predictions, "u1", T0 + 3_500);
    assert_eq!(predicted["prediction"], score["prediction"]);
    assert_eq!(predicted["model"], score["model"]);
    assert_eq!(predicted["variant"], score["variant"]);

    // A bad event: 400 with the reason the same line gets as a dead letter.
    let broken = "{\"userId\":\"u1\",\"amount\":1,\"merchant\":\"m1\"}\n";
    let refused = http(&api, "POST", "/v1/score", broken).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    append(&input, broken);
    let dead = wait_lines(&dir.path().join("dead.ndjson"), 1, &mut proc).await;
    assert_eq!(refused.json()["error"], dead[0]["reason"]);
    assert_eq!(dead[0]["reason"], "missing field timestamp");
    let not_json = http(&api, "POST", "/v1/score", "{\"userId\":").await;
    assert_eq!(not_json.status, 400, "{}", not_json.body);

    // Feast's shape, columnar, the entity first.
    let feast = http(
        &api,
        "POST",
        "/v1/get-online-features",
        r#"{"features": ["txn_count_1m", "user_stats:amount_max_5m"], "entities": {"userId": ["u1", "nobody", "u2"]}}"#,
    )
    .await;
    assert_eq!(feast.status, 200, "{}", feast.body);
    let feast = feast.json();
    let u1 = http(&api, "GET", "/v1/features/u1", "").await.json();
    let u2 = http(&api, "GET", "/v1/features/u2", "").await.json();
    assert_eq!(
        feast["metadata"]["feature_names"],
        json!(["userId", "txn_count_1m", "amount_max_5m"])
    );
    let results = feast["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["values"], json!(["u1", "nobody", "u2"]));
    assert_eq!(
        results[0]["statuses"],
        json!(["PRESENT", "PRESENT", "PRESENT"])
    );
    assert_eq!(
        results[1]["values"],
        json!([
            u1["features"]["txn_count_1m"],
            null,
            u2["features"]["txn_count_1m"]
        ])
    );
    assert_eq!(
        results[1]["statuses"],
        json!(["PRESENT", "NOT_FOUND", "PRESENT"])
    );
    assert_eq!(
        results[2]["values"],
        json!([
            u1["features"]["amount_max_5m"],
            null,
            u2["features"]["amount_max_5m"]
        ])
    );
    assert_eq!(
        results[1]["event_timestamps"],
        json!([
            "2023-11-14T22:13:23.500Z",
            "1970-01-01T00:00:00Z",
            "2023-11-14T22:13:22.000Z"
        ])
    );
    let keys: Vec<String> = (0..1_001).map(|i| format!("\"u{i}\"")).collect();
    let too_many = format!(
        r#"{{"features": ["txn_count_1m"], "entities": {{"userId": [{}]}}}}"#,
        keys.join(",")
    );
    let refused = http(&api, "POST", "/v1/get-online-features", &too_many).await;
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("at most 1000"), "{}", refused.body);
    let unknown = http(
        &api,
        "POST",
        "/v1/get-online-features",
        r#"{"features": ["nope"], "entities": {"userId": ["u1"]}}"#,
    )
    .await;
    assert_eq!(unknown.status, 400);
    assert!(unknown.body.contains("unknown feature"), "{}", unknown.body);
    assert_eq!(http(&api, "GET", "/v1/score", "").await.status, 405);

    proc.terminate(20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_queue_answers_503_and_leaves_the_stream_alone() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    let event = |i: i64| {
        line(
            &format!("u{}", i % 50),
            T0 + i * 10,
            (i % 17) as f64 * 1.5,
            &format!("m{}", i % 7),
        )
    };
    let (first, total) = (1_000i64, 3_000i64);
    std::fs::write(&input, (0..first).map(event).collect::<String>()).unwrap();
    // One address for the API and /metrics: one listener answers both.
    let api = free_addr();
    let extra = format!("\n[api]\naddr = \"{api}\"\nmax_in_flight = 1\n");
    let followed = config(dir.path(), &input, true, &extra);
    let mut proc = Proc::run(dir.path(), &followed, &api, "run.log");
    wait_listening(&api, &mut proc).await;
    let features = dir.path().join("features.ndjson");
    wait_lines(&features, first as usize, &mut proc).await;
    assert_eq!(http(&api, "GET", "/healthz", "").await.status, 200);

    // 64 clients, each sending up to 25 requests of 1,000 entities (and a
    // GET and a score between), while 2,000 more events are appended.
    let keys: Vec<String> = (0..1_000).map(|i| format!("\"u{}\"", i % 60)).collect();
    let feast = Arc::new(format!(
        r#"{{"features": ["txn_count_1m", "amount_sum_1m"], "entities": {{"userId": [{}]}}}}"#,
        keys.join(",")
    ));
    let (ok, busy) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let (api, feast) = (api.clone(), feast.clone());
            let (ok, busy) = (ok.clone(), busy.clone());
            tokio::spawn(async move {
                for round in 0..25 {
                    if started.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                    let r = match (c + round) % 8 {
                        0 => http(&api, "GET", "/v1/features/u3", "").await,
                        1 => {
                            let e = format!(
                                "{{\"userId\":\"u3\",\"timestamp\":{},\"amount\":1,\"merchant\":\"m1\"}}",
                                T0 + 100_000
                            );
                            http(&api, "POST", "/v1/score", &e).await
                        }
                        _ => http(&api, "POST", "/v1/get-online-features", &feast).await,
                    };
                    match r.status {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        503 => {
                            assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{r:?}");
                            assert!(r.body.contains("retry shortly"), "{}", r.body);
                            busy.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => panic!("unexpected answer {r:?}"),
                    };
                }
            })
        })
        .collect();
    for chunk in 0..10 {
        let from = first + chunk * (total - first) / 10;
        let to = first + (chunk + 1) * (total - first) / 10;
        append(&input, &(from..to).map(event).collect::<String>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in clients {
        c.await.expect("a client failed");
    }
    let (ok, busy) = (ok.load(Ordering::Relaxed), busy.load(Ordering::Relaxed));
    eprintln!(
        "[online_api] flood: {ok} answered, {busy} refused with 503, {:?}",
        started.elapsed()
    );
    assert!(
        busy > 0,
        "no 503 under a flood of a queue of one ({ok} answered)"
    );
    assert!(ok > 0, "nothing answered");
    let page = http(&api, "GET", "/metrics", "").await.body;
    assert!(
        harness::metric_sum(&page, "shardflow_api_rejected_total") >= busy as f64,
        "{page}"
    );
    let live = wait_lines(&features, total as usize, &mut proc).await;
    proc.terminate(20).await;

    // The same input without any request: the same vectors, id for id.
    let quiet = tempfile::tempdir().unwrap();
    let bounded = config(quiet.path(), &input, false, "");
    let mut reference = Proc::run(quiet.path(), &bounded, "off", "run.log");
    let status = reference.wait(60).await;
    assert!(status.success(), "{}", reference.stderr());
    let by_id = |lines: &[Value]| -> BTreeMap<String, Value> {
        lines
            .iter()
            .map(|l| (l["id"].as_str().unwrap().to_string(), l["features"].clone()))
            .collect()
    };
    let (live, quiet) = (
        by_id(&live),
        by_id(&ndjson(&quiet.path().join("features.ndjson"))),
    );
    assert_eq!(live.len(), total as usize);
    assert!(live == quiet, "the flood changed the stream's vectors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_score_goes_through_the_sagemaker_backend_to_serve_model() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    std::fs::write(&input, line("u1", T0, 20.0, "m1")).unwrap();
    let (model_addr, api) = (free_addr(), free_addr());
    let extra = format!(
        r#"
[api]
addr = "{api}"

[inference]
backend = "sagemaker"
endpoint_name = "fraud"
endpoint_url = "http://{model_addr}"
request_timeout = "2s"
max_retries = 1
retry_base = "100ms"
fallback = "embedded"
fallback_model = "{model}"

[[sinks]]
type = "file"
path = "{dir}/predictions.ndjson"
kinds = ["prediction"]
"#,
        model = model_path(),
        dir = dir.path().display()
    );
    let config = config(dir.path(), &input, true, &extra);
    // serve-model serves the config's fallback model, as SageMaker would
    // serve a container with it.
    let log = std::fs::File::create(dir.path().join("serve-model.log")).unwrap();
    let server = std::process::Command::new(env!("CARGO_BIN_EXE_shardflow"))
        .args(["serve-model", "--config"])
        .arg(&config)
        .args(["--addr", &model_addr])
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(server);
    let mut proc = Proc::run(dir.path(), &config, "off", "run.log");
    wait_listening(&api, &mut proc).await;
    wait_listening(&model_addr, &mut proc).await;
    let predictions = dir.path().join("predictions.ndjson");
    wait_lines(&predictions, 1, &mut proc).await;

    let next = line("u1", T0 + 1_000, 250.0, "m2");
    let score = http(&api, "POST", "/v1/score", &next).await;
    assert_eq!(score.status, 200, "{}", score.body);
    let score = score.json();
    assert_eq!(score["model"], "fraud", "{score}");
    assert_eq!(score["fallback"], false, "{score}");
    assert_eq!(score["variant"], "AllTraffic", "{score}");
    assert_eq!(score["features"]["txn_count_1m"], 2);
    append(&input, &next);
    let streamed = wait_lines(&predictions, 2, &mut proc).await;
    let record = record_at(&streamed, "u1", T0 + 1_000);
    assert_eq!(record["features"], score["features"]);
    assert_eq!(record["prediction"], score["prediction"]);
    assert_eq!(record["fallback"], false);
    proc.terminate(20).await;
}

/// A stdout nobody reads: the pipe fills, the stdout sink blocks, and the
/// pipeline backpressures up to the engine, which waits to hand its
/// outputs on. Requests are still answered meanwhile, from the state the
/// engine has reached, ahead of what the sinks have written; once stdout
/// is read again, the run goes on to the end of its input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_while_the_pipeline_is_backpressured() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    let total = 20_000i64;
    let text: String = (0..total)
        .map(|i| line(&format!("u{}", i % 10), T0 + i, 1.0, "m1"))
        .collect();
    std::fs::write(&input, text).unwrap();
    let api = free_addr();
    let extra = format!(
        "\n[api]\naddr = \"{api}\"\nrequest_timeout = \"2s\"\n\n[[sinks]]\ntype = \"stdout\"\nkinds = [\"features\"]\n"
    );
    let config = config(dir.path(), &input, true, &extra);
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardflow"))
        .args(["run", "--quiet", "--metrics-addr", "off", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stdout = child.stdout.take().unwrap();
    let _child = Kill(child);
    // Wait until the file sink's output stops growing short of the input:
    // the stdout sink is stuck and the pipeline with it.
    let features = dir.path().join("features.ndjson");
    let started = Instant::now();
    let (mut last, mut still_since) = (usize::MAX, Instant::now());
    let stuck = loop {
        let n = ndjson(&features).len();
        if n != last {
            (last, still_since) = (n, Instant::now());
        } else if still_since.elapsed() > Duration::from_millis(1_500) {
            break n;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never stuck ({n} lines)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stuck < total as usize,
        "the pipeline was not held back ({stuck} of {total})"
    );
    eprintln!("[online_api] backpressured: {stuck} of {total} features written");
    let written = ndjson(&features)
        .iter()
        .filter(|l| l["key"] == "u3")
        .count() as i64;
    for _ in 0..5 {
        let asked = Instant::now();
        let r = http(&api, "GET", "/v1/features/u3", "").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "answered in {:?}",
            asked.elapsed()
        );
        let count = r.json()["features"]["txn_count_1m"].as_i64().unwrap();
        assert!(
            count >= written && count > 0,
            "{count} read, {written} written"
        );
    }
    // Read stdout again: the run reaches the end of its input.
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink);
    });
    wait_lines_plain(&features, total as usize).await;
    drop(_child);
    reader.join().unwrap();
}

/// [`wait_lines`] without a [`Proc`].
async fn wait_lines_plain(path: &Path, n: usize) {
    let started = Instant::now();
    while ndjson(path).len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} lines of {n}",
            ndjson(path).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
