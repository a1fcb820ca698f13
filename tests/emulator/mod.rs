//! The Kinesis emulator (ferrokinesis, embedded) on 127.0.0.1 for tests, and
//! what the tests do with it: streams, producers, pipelines, outputs.
#![allow(dead_code)]

pub mod chaos;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use ferrokinesis::store::{Store, StoreOptions};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::service::TowerToHyperService;
use shardflow::aws::{kinesis::client, ClientSettings};
use shardflow::config::Config;
use shardflow::flow::Stats;
use shardflow::pipeline::{RunOptions, RunSummary};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Dummy credentials for the emulator, through the standard chain (the
/// environment). Set once, before any client reads the environment.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        // Quiet by default (the emulator logs every request at info).
        if std::env::var_os("RUST_LOG").is_none() {
            std::env::set_var("RUST_LOG", "warn,ferrokinesis=error");
        }
        shardflow::telemetry::init_logging(shardflow::telemetry::LogFormat::Human);
    });
}

pub fn options() -> StoreOptions {
    StoreOptions {
        create_stream_ms: 0,
        delete_stream_ms: 0,
        update_stream_ms: 0,
        shard_limit: 200,
        ..StoreOptions::default()
    }
}

/// A running emulator. Dropping it stops the listener and every connection.
pub struct Emulator {
    pub addr: SocketAddr,
    pub store: Store,
    server: tokio::task::JoinHandle<()>,
    throttle: Option<Arc<chaos::Throttle>>,
}

impl Emulator {
    pub async fn start(options: StoreOptions) -> Emulator {
        Self::start_with(options, None).await
    }

    /// An emulator whose answers pass through `throttle` (injected
    /// throttling and ResourceInUse errors), kept across restarts.
    pub async fn start_with(
        options: StoreOptions,
        throttle: Option<Arc<chaos::Throttle>>,
    ) -> Emulator {
        let (app, store) = ferrokinesis::create_app(options);
        let app = chaos::wrap(app, throttle.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, app));
        Emulator {
            addr,
            store,
            server,
            throttle,
        }
    }

    /// Kills the listener and every open connection, keeps the data, and
    /// serves it again on the same port.
    pub async fn restart(&mut self) {
        self.server.abort();
        let _ = (&mut self.server).await;
        let app = chaos::wrap(
            ferrokinesis::create_router(self.store.clone()),
            self.throttle.clone(),
        );
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.server = tokio::spawn(serve(listener, app));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        client_for(&self.url()).await
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn client_for(url: &str) -> Client {
    init();
    client(&ClientSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(url.into()),
        extra_root_pem: None,
        max_attempts: None,
    })
    .await
    .unwrap()
}

/// HTTP/1.1 and h2c; connections die with the task. Request bodies up to
/// 8 MiB, as the ferrokinesis binary allows (axum's default is 2 MiB, less
/// than a PutRecords of several 1 MiB records).
async fn serve(listener: TcpListener, app: axum::Router) {
    let app = app.layer(axum::extract::DefaultBodyLimit::max(8 << 20));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = AutoBuilder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap();
    wait_active(client, name).await;
}

pub async fn wait_active(client: &Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .unwrap();
        if d.stream_description_summary.unwrap().stream_status
            == aws_sdk_kinesis::types::StreamStatus::Active
        {
            return;
        }
        assert!(Instant::now() < deadline, "stream {name} not active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One JSON event: key `u{key}`, the producer's per-key counter `n`, a
/// fixed-day event time (so a 1-day tumbling count holds every event).
pub fn event_json(key: u32, n: u64) -> Vec<u8> {
    format!(
        r#"{{"userId":"u{key}","timestamp":{},"n":{n}}}"#,
        1_700_000_000_000u64 + n
    )
    .into_bytes()
}

/// Puts `(partition key, data)` records in PutRecords batches, retrying
/// failed entries.
pub async fn put(client: &Client, stream: &str, records: Vec<(String, Vec<u8>)>) {
    for chunk in records.chunks(500) {
        let mut entries: Vec<_> = chunk
            .iter()
            .map(|(k, d)| {
                PutRecordsRequestEntry::builder()
                    .partition_key(k)
                    .data(Blob::new(d.clone()))
                    .build()
                    .unwrap()
            })
            .collect();
        for _ in 0..20 {
            let out = client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries.clone()))
                .send()
                .await
                .unwrap();
            if out.failed_record_count.unwrap_or(0) == 0 {
                break;
            }
            let mut i = 0;
            entries.retain(|_| {
                i += 1;
                out.records[i - 1].error_code.is_some()
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A pipeline config: the Kinesis source, a count over one day per key,
/// features to a file.
pub fn config(dir: &Path, url: &str, stream: &str, source_extra: &str) -> Config {
    let text = format!(
        r#"
[pipeline]
state_dir = "{state}"
checkpoint_interval = "200ms"
batch_size = 64

[source]
type = "kinesis"
stream_name = "{stream}"
consumer_name = "tests"
starting_position = "trim_horizon"
endpoint_url = "{url}"
{source_extra}

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ n = "i64" }}

[[features]]
name = "count_1d"
agg = "count"
window = {{ type = "tumbling", size = "1d" }}

[[sinks]]
type = "file"
path = "{out}"
kinds = ["features", "dead_letter"]
"#,
        state = dir.join("state").display(),
        out = features_path(dir).display(),
    );
    Config::from_str_at(&text, Path::new("kinesis-test.toml"), |_| None).unwrap()
}

pub fn features_path(dir: &Path) -> PathBuf {
    dir.join("features.ndjson")
}

/// A pipeline running in this process until `stop`.
pub struct Running {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<RunSummary>>,
}

impl Running {
    pub fn start(config: Config) -> Running {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(shardflow::pipeline::run(
            config,
            RunOptions {
                ..RunOptions::default()
            },
            rx,
            Arc::new(Stats::default()),
        ));
        Running { shutdown: tx, task }
    }

    /// Like SIGTERM: drain, final checkpoint, return.
    pub async fn stop(self) -> RunSummary {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the pipeline stops within 30 s")
            .unwrap()
            .unwrap()
    }
}

/// Every complete line of an NDJSON file (a running sink's last line may
/// still be half-written: it is left for the next read).
pub fn lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the file holds `n` distinct feature ids (or panics after `secs`).
pub async fn wait_for_ids(path: &Path, n: usize, secs: u64) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let l = lines(path);
        let ids: HashSet<_> = l
            .iter()
            .filter(|v| v["kind"] == "features")
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        if ids.len() >= n {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records arrived within {secs} s",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per key, the highest count a feature vector reported: with exactly-once
/// state this is the number of that key's events, never more.
pub fn max_count_per_key(features: &[serde_json::Value]) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for v in features.iter().filter(|v| v["kind"] == "features") {
        let key = v["key"].as_str().unwrap().to_owned();
        let c = v["features"]["count_1d"].as_i64().unwrap();
        let e = m.entry(key).or_insert(0);
        *e = (*e).max(c);
    }
    m
}

/// Counts per key of what was put.
pub fn expected_counts(keys: impl IntoIterator<Item = u32>) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for k in keys {
        *m.entry(format!("u{k}")).or_insert(0) += 1;
    }
    m
}

/// Ids of the features records, with how often each appeared.
pub fn id_counts(features: &[serde_json::Value]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for v in features.iter().filter(|v| v["kind"] == "features") {
        *m.entry(v["id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    m
}
