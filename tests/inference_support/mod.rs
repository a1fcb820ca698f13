//! Shared by the inference tests: serve-model's router on 127.0.0.1 with
//! fault injection in front of it, and helpers to drive the batcher.
//!
//! Faults live here, in test code, never in the product: an axum middleware
//! wrapped around `serve-model`'s router adds delay, stalls, 500s, 429s,
//! 400s and wrong row counts, and a TCP proxy in front of the server drops
//! connections without an answer.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sagemakerruntime::config::{Credentials, SharedCredentialsProvider};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shardflow::config::Config;
use shardflow::flow::{Barrier, Message};
use shardflow::inference::{self, batcher, Scorer};
use shardflow::record::{FeatureRecord, FeatureVector, Output, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// What the server does with one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// 500 InternalFailure.
    Status500,
    /// 429 ThrottlingException.
    Throttle,
    /// 400 ValidationError: a model error that must not be retried.
    BadRequest,
    /// A valid answer with one prediction missing.
    WrongRows,
    /// The connection closes without an answer (done by the TCP proxy).
    Drop,
}

#[derive(Default)]
struct Plan {
    /// Faults for the next requests, one each, before `always`.
    script: VecDeque<Fault>,
    /// A fault for every request.
    always: Option<Fault>,
    /// Random faults: (probability, fault), drawn per request.
    random: Vec<(f64, Fault)>,
    /// Only requests for this target variant are faulted (and delayed).
    only_variant: Option<String>,
    delay: Duration,
}

/// A running model server with fault injection.
pub struct FaultServer {
    /// `http://127.0.0.1:port` of the proxy, for `endpoint_url`.
    pub url: String,
    plan: Arc<Mutex<Plan>>,
    stall: watch::Sender<bool>,
    /// Requests that reached the HTTP layer (dropped connections excluded).
    pub requests: Arc<AtomicU64>,
    /// Requests the server holds right now (arrived, not yet answered).
    pub active: Arc<AtomicU64>,
    /// The most requests it held at once.
    pub max_active: Arc<AtomicU64>,
    /// Connections the proxy dropped on purpose.
    pub drops: Arc<AtomicU64>,
    shutdown: watch::Sender<bool>,
}

#[derive(Clone)]
struct Shared {
    plan: Arc<Mutex<Plan>>,
    stall: watch::Receiver<bool>,
    requests: Arc<AtomicU64>,
    active: Arc<AtomicU64>,
    max_active: Arc<AtomicU64>,
}

/// Counts a request as held by the server from its arrival until its answer
/// is made or the client gives up on it (the handler's future is dropped).
struct Held(Arc<AtomicU64>);

impl Held {
    fn new(active: &Arc<AtomicU64>, max_active: &AtomicU64) -> Held {
        let now = active.fetch_add(1, Ordering::SeqCst) + 1;
        max_active.fetch_max(now, Ordering::SeqCst);
        Held(active.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FaultServer {
    /// Serves the model of `config` (its `model` or `fallback_model`).
    pub async fn start(config: &Config) -> FaultServer {
        let inf = &config.inference;
        let path = inf
            .model
            .as_ref()
            .or(inf.fallback_model.as_ref())
            .expect("the test config names a model file");
        let model = inference::load_embedded(config, path).expect("model loads");
        let router =
            shardflow::serve::model::router(model, inference::feature_names(config), "AllTraffic")
                .expect("router");
        let plan = Arc::new(Mutex::new(Plan::default()));
        let (stall, stall_rx) = watch::channel(false);
        let requests = Arc::new(AtomicU64::new(0));
        let active = Arc::new(AtomicU64::new(0));
        let max_active = Arc::new(AtomicU64::new(0));
        let shared = Shared {
            plan: plan.clone(),
            stall: stall_rx,
            requests: requests.clone(),
            active: active.clone(),
            max_active: max_active.clone(),
        };
        let app = router.layer(axum::middleware::from_fn_with_state(shared, faults));
        let (shutdown, shutdown_rx) = watch::channel(false);

        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inner_addr = inner.local_addr().unwrap();
        let mut rx = shutdown_rx.clone();
        tokio::spawn(shardflow::serve::serve_on(inner, app, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));

        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", proxy.local_addr().unwrap());
        let drops = Arc::new(AtomicU64::new(0));
        tokio::spawn(run_proxy(
            proxy,
            inner_addr,
            plan.clone(),
            drops.clone(),
            shutdown_rx,
        ));
        FaultServer {
            url,
            plan,
            stall,
            requests,
            active,
            max_active,
            drops,
            shutdown,
        }
    }

    pub fn script(&self, faults: &[Fault]) {
        self.plan
            .lock()
            .unwrap()
            .script
            .extend(faults.iter().copied());
    }
    pub fn always(&self, fault: Option<Fault>) {
        self.plan.lock().unwrap().always = fault;
    }
    pub fn random(&self, faults: &[(f64, Fault)]) {
        self.plan.lock().unwrap().random = faults.to_vec();
    }
    pub fn only_variant(&self, variant: Option<&str>) {
        self.plan.lock().unwrap().only_variant = variant.map(str::to_string);
    }
    pub fn delay(&self, d: Duration) {
        self.plan.lock().unwrap().delay = d;
    }
    /// While stalled, requests hang without an answer.
    pub fn stall(&self, on: bool) {
        let _ = self.stall.send(on);
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    /// Requests held right now: arrived and not answered (stalled or delayed).
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::SeqCst)
    }
    /// The most requests held at once so far.
    pub fn max_active(&self) -> u64 {
        self.max_active.load(Ordering::SeqCst)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        let _ = self.stall.send(false);
        let _ = self.shutdown.send(true);
    }
}

impl Plan {
    /// The fault for the next request, if any.
    fn next(&mut self) -> Option<Fault> {
        if let Some(f) = self.script.pop_front() {
            return Some(f);
        }
        if self.always.is_some() {
            return self.always;
        }
        let mut x: f64 = rand::random();
        for (p, f) in &self.random {
            if x < *p {
                return Some(*f);
            }
            x -= p;
        }
        None
    }
}

async fn faults(State(s): State<Shared>, request: Request, next: Next) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let _held = Held::new(&s.active, &s.max_active);
    let variant = request
        .headers()
        .get("x-amzn-sagemaker-target-variant")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (fault, delay) = {
        let mut plan = s.plan.lock().unwrap();
        let applies = plan.only_variant.is_none() || plan.only_variant == variant;
        if applies {
            (plan.next(), plan.delay)
        } else {
            (None, Duration::ZERO)
        }
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut stall = s.stall.clone();
    let _ = stall.wait_for(|stalled| !*stalled).await;
    let error = |status: StatusCode, kind: &'static str| {
        (
            status,
            [
                ("x-amzn-errortype", kind),
                ("content-type", "application/json"),
            ],
            format!("{{\"message\":\"injected {kind}\"}}"),
        )
            .into_response()
    };
    match fault {
        Some(Fault::Status500) => error(StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure"),
        Some(Fault::Throttle) => error(StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
        Some(Fault::BadRequest) => error(StatusCode::BAD_REQUEST, "ValidationError"),
        Some(Fault::WrongRows) => {
            let response = next.run(request).await;
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            json["predictions"].as_array_mut().unwrap().pop();
            let mut response = Response::from_parts(parts, Body::from(json.to_string()));
            response.headers_mut().remove("content-length");
            response
        }
        // Drops happen in the proxy; anything that gets here is answered.
        Some(Fault::Drop) | None => next.run(request).await,
    }
}

/// Forwards connections to the server; closes one without an answer when the
/// plan says `Drop` for the request it carries.
async fn run_proxy(
    listener: tokio::net::TcpListener,
    target: SocketAddr,
    plan: Arc<Mutex<Plan>>,
    drops: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut client, _) = tokio::select! {
            accepted = listener.accept() => match accepted { Ok(c) => c, Err(_) => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let plan = plan.clone();
        let drops = drops.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            let (mut server_read, mut server_write) = server.into_split();
            let (mut client_read, mut client_write) = client.split();
            let upstream = async {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    // A new request starts with its method.
                    if buf[..n].starts_with(b"POST ") {
                        let mut p = plan.lock().unwrap();
                        if p.script.front() == Some(&Fault::Drop)
                            || (p.script.is_empty() && p.always == Some(Fault::Drop))
                        {
                            p.script.pop_front();
                            drops.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            };
            let downstream = tokio::io::copy(&mut server_read, &mut client_write);
            tokio::select! {
                _ = upstream => {}
                _ = downstream => {}
            }
            // Both halves drop here: the client sees the connection close.
        });
    }
}

/// An AWS configuration with static test credentials: nothing is read from
/// the environment or the network.
pub fn sdk() -> SdkConfig {
    SdkConfig::builder()
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "test", "test", None, None, "tests",
        )))
        .behavior_version(BehaviorVersion::latest())
        .build()
}

/// The features of config/local.toml and a model over them.
pub const FEATURES: &str = r#"
[[features]]
name = "txn_count_1m"
agg = "count"
window = { type = "sliding", size = "1m", slide = "10s" }

[[features]]
name = "amount_sum_1m"
agg = "sum"
field = "amount"
window = { type = "sliding", size = "1m", slide = "10s" }

[[features]]
name = "amount_max_5m"
agg = "max"
field = "amount"
window = { type = "tumbling", size = "5m" }

[[features]]
name = "merchants_5m"
agg = "distinct_count"
field = "merchant"
window = { type = "tumbling", size = "5m" }
"#;

pub fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// A config with the generator source, the shipped features and `inference`
/// as the `[inference]` table's body.
pub fn config(inference: &str, source_extra: &str, sinks: &str) -> Config {
    let text = format!(
        r#"
[pipeline]
checkpoint_interval = "200ms"

[source]
type = "generator"
{source_extra}

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64", merchant = "string" }}

{FEATURES}

[inference]
{inference}

{sinks}
"#
    );
    Config::from_str_at(&text, Path::new("test.toml"), |_| None)
        .unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// `[inference]` for the SageMaker backend against `url`.
pub fn sagemaker(url: &str, extra: &str) -> String {
    format!(
        "backend = \"sagemaker\"\nendpoint_name = \"fraud\"\nendpoint_url = \"{url}\"\n{extra}\n"
    )
}

pub fn default_sinks() -> &'static str {
    "[[sinks]]\ntype = \"stdout\"\nkinds = [\"prediction\"]\n"
}

/// Deterministic feature records: `n` records over `keys` keys, ids
/// `p/<i>`, with integers, floats and a few nulls (which the model imputes).
pub fn records(n: usize, keys: usize) -> Vec<FeatureRecord> {
    let names: shardflow::record::FeatureNames = [
        "txn_count_1m",
        "amount_sum_1m",
        "amount_max_5m",
        "merchants_5m",
    ]
    .iter()
    .map(|s| Arc::from(*s))
    .collect::<Vec<_>>()
    .into();
    (0..n)
        .map(|i| {
            let x = i as f64;
            FeatureRecord {
                id: format!("p/{i}"),
                key: format!("u{}", i % keys).into(),
                event_time: 1_700_000_000_000 + i as i64,
                features: FeatureVector {
                    names: names.clone(),
                    values: vec![
                        Some(Value::Int((i % 17) as i64)),
                        if i % 11 == 3 {
                            None
                        } else {
                            Some(Value::Float(x * 1.37 + 0.1))
                        },
                        Some(Value::Float((x * 0.731).sin() * 300.0)),
                        Some(Value::Int((i % 5) as i64)),
                    ],
                },
                arrival: 0,
            }
        })
        .collect()
}

/// Runs the batcher over `records`, sent in input batches of `chunk` with a
/// barrier at the end, and returns everything it emitted (barriers dropped).
pub async fn run_batcher(
    scorer: Arc<Scorer>,
    config: &Config,
    records: Vec<FeatureRecord>,
    chunk: usize,
) -> Vec<Output> {
    let (in_tx, in_rx) = mpsc::channel(4);
    let (out_tx, mut out_rx) = mpsc::channel(4);
    let task = tokio::spawn(batcher::run(
        scorer,
        config.inference.clone(),
        false,
        in_rx,
        out_tx,
    ));
    let feeder = tokio::spawn(async move {
        let mut it = records.into_iter().peekable();
        while it.peek().is_some() {
            let batch: Vec<Output> = it.by_ref().take(chunk).map(Output::Features).collect();
            if in_tx.send(Message::Batch(batch)).await.is_err() {
                return;
            }
        }
        let _ = in_tx
            .send(Message::Barrier(Barrier {
                id: 1,
                positions: Vec::new(),
                end_of_input: true,
                last: true,
                ..Barrier::default()
            }))
            .await;
    });
    let mut out = Vec::new();
    let collect = async {
        while let Some(m) = out_rx.recv().await {
            match m {
                Message::Batch(b) => out.extend(b),
                Message::Barrier(b) => {
                    if b.last {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .expect("the batcher finishes within 60 s");
    feeder.await.unwrap();
    drop(out_rx);
    task.await.unwrap().unwrap();
    out
}

/// Builds the scorer of `config` with the test AWS configuration.
pub fn scorer(config: &Config) -> Arc<Scorer> {
    inference::build_with(config, Some(sdk()))
        .expect("scorer builds")
        .expect("a model is configured")
}

/// Predictions by record id, and dead letters' (id, reason).
pub fn split(
    outputs: &[Output],
) -> (
    Vec<&shardflow::record::PredictionRecord>,
    Vec<(String, String)>,
) {
    let mut predictions = Vec::new();
    let mut dead = Vec::new();
    for o in outputs {
        match o {
            Output::Prediction(p) => predictions.push(&**p),
            Output::DeadLetter(d) => dead.push((d.position.to_string(), d.reason.clone())),
            _ => {}
        }
    }
    (predictions, dead)
}

pub fn header(v: &str) -> HeaderValue {
    HeaderValue::from_str(v).unwrap()
}
