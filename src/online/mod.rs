//! The online API's request path: features and scores on request, answered
//! by the engine stage from live state (HTTP is `crate::serve::api`).
//!
//! ```text
//! HTTP handler ──try_send──▶ bounded channel (max_in_flight) ──▶ engine stage
//!      ▲  503 when full                                          │ between events:
//!      │                                                         │ Engine::read / evaluate
//!      └──────────── oneshot reply (vector, statuses) ◀──────────┘
//!      └─ /v1/score: the model call, on the API's task, after the reply
//! ```
//!
//! **Why the engine answers.** The engine's in-memory cache is ahead of
//! RocksDB by up to a checkpoint, and only the engine thread may touch it,
//! so a read is a message to the engine stage, answered there with the
//! per-event path's own functions ([`Engine::read`], [`Engine::evaluate`];
//! what they touch and why it changes no state is in their module,
//! `engine/query.rs`). The engine does no I/O for a request beyond reading
//! a key that is not in memory; the model of `/v1/score` is called after
//! the engine replied, on the API's task, through the same
//! [`Scorer`](crate::inference::Scorer) (breaker, retries, fallback,
//! clients) as the batcher, so an open breaker answers both paths alike.
//!
//! **Bounded and fair.** The channel holds at most `[api] max_in_flight`
//! requests; one more is refused at once ([`QueryError::Busy`], 503 with
//! `Retry-After`), never queued without bound. A request waits at most
//! `[api] request_timeout` for the engine (busy with a long snapshot, a
//! cache miss, a loaded machine): then 503 too, and the engine skips it if
//! it gets there. The engine stage serves requests beside events and
//! barriers: each turn of its loop takes one input batch (at most
//! `batch_size` records) or one tick, then requests worth at most
//! `batch_size` keys ([`Inbox::serve`]); inside a batch it also answers
//! requests worth up to 32 keys after every 32 events; an idle input leaves
//! it waiting for either. So a flood of requests cannot stop ingest or
//! checkpoints (a turn answers requests worth about one key per event it
//! processed, plus `batch_size` keys), and a backlog of input delays a
//! request by a few dozen events, or a barrier's snapshot. While the
//! engine waits to hand its outputs on (a slow sink or model backpressures
//! the pipeline), it keeps answering requests: its state is between two
//! events then, and reads must not wait for a sink.
//!
//! **Which worker answers.** Under `[cluster]`, [`route`] names the worker
//! whose lease holds a key's shard (its API address is in the lease row):
//! a request for another worker's key is answered 307 to it, and a Feast
//! request naming keys of several workers is split among them ([`forward`]).

pub mod body;
pub mod feast;
pub mod forward;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::decode::Decoder;
use crate::engine::{Engine, Evaluation, Reading};
use crate::inference::resilience::Answer;
use crate::inference::{self, Scorer};
use crate::record::{Event, FeatureNames, Position};
use crate::time::{now_millis, Millis};

pub use body::{FeaturesBody, ScoreBody};

/// Most entities one `/v1/get-online-features` request may name (Feast's
/// servers take batches of this order; a bigger batch would hold the
/// engine for longer than a turn of input).
pub const MAX_ENTITIES: usize = 1_000;

/// What a request asks the engine.
pub enum Query {
    /// The vectors of `keys` as of `at` (default: the newest event time).
    Read {
        keys: Vec<Arc<str>>,
        at: Option<Millis>,
        reply: oneshot::Sender<Result<Readings, String>>,
    },
    /// The vector `event` would get if it arrived now.
    Evaluate {
        event: Box<Event>,
        reply: oneshot::Sender<Result<Evaluated, String>>,
    },
}

impl Query {
    /// What serving it costs, in keys read (for the per-turn budget).
    fn cost(&self) -> usize {
        match self {
            Query::Read { keys, .. } => keys.len().max(1),
            Query::Evaluate { .. } => 1,
        }
    }
}

/// The engine's answer to [`Query::Read`].
#[derive(Debug)]
pub struct Readings {
    /// The event time read at.
    pub at: Millis,
    /// The pipeline watermark when it was read.
    pub watermark: Millis,
    /// One per key, in request order.
    pub readings: Vec<Reading>,
}

/// The engine's answer to [`Query::Evaluate`].
#[derive(Debug)]
pub struct Evaluated {
    pub watermark: Millis,
    pub evaluation: Evaluation,
}

/// Why a request got no answer from the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("{0} requests are already waiting for the engine; retry shortly")]
    Busy(usize),
    #[error("the engine did not answer within {0:?}; retry shortly")]
    Timeout(Duration),
    #[error("the pipeline is not running")]
    Stopped,
    #[error("reading state: {0}")]
    Engine(String),
}

/// The API's end of the request channel: cheap to clone, one per handler.
#[derive(Clone)]
pub struct Queries {
    tx: mpsc::Sender<Query>,
    capacity: usize,
    timeout: Duration,
}

/// The engine's end of the request channel.
pub struct Inbox {
    rx: mpsc::Receiver<Query>,
}

/// A request channel holding at most `max_in_flight` requests, each waiting
/// at most `timeout` for its answer.
pub fn channel(max_in_flight: usize, timeout: Duration) -> (Queries, Inbox) {
    let capacity = max_in_flight.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    (
        Queries {
            tx,
            capacity,
            timeout,
        },
        Inbox { rx },
    )
}

impl Queries {
    /// Queues `query` (refused at once when the channel is full) and waits
    /// for the engine's answer.
    async fn ask<T>(
        &self,
        query: Query,
        answer: oneshot::Receiver<Result<T, String>>,
    ) -> Result<T, QueryError> {
        match self.tx.try_send(query) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("shardflow_api_rejected_total").increment(1);
                return Err(QueryError::Busy(self.capacity));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(QueryError::Stopped),
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(Ok(t))) => Ok(t),
            Ok(Ok(Err(e))) => Err(QueryError::Engine(e)),
            Ok(Err(_)) => Err(QueryError::Stopped),
            Err(_) => Err(QueryError::Timeout(self.timeout)),
        }
    }

    /// The vectors of `keys` as of `at`.
    pub async fn read(
        &self,
        keys: Vec<Arc<str>>,
        at: Option<Millis>,
    ) -> Result<Readings, QueryError> {
        let (reply, answer) = oneshot::channel();
        self.ask(Query::Read { keys, at, reply }, answer).await
    }

    /// The vector `event` would get now.
    pub async fn evaluate(&self, event: Event) -> Result<Evaluated, QueryError> {
        let (reply, answer) = oneshot::channel();
        let event = Box::new(event);
        self.ask(Query::Evaluate { event, reply }, answer).await
    }
}

impl Inbox {
    /// The next request, when one comes (pending forever once every
    /// [`Queries`] is gone, so a `select!` branch on it just stays quiet).
    pub async fn next(&mut self) -> Query {
        match self.rx.recv().await {
            Some(q) => q,
            None => std::future::pending().await,
        }
    }

    /// Answers `first` (if given) and then queued requests, without
    /// waiting, until they are worth `budget` keys; returns how many it
    /// answered. A request bigger than the budget is still answered whole:
    /// the budget bounds a turn, a request is at most [`MAX_ENTITIES`].
    pub fn serve(&mut self, engine: &mut Engine, first: Option<Query>, budget: usize) -> usize {
        let mut spent = 0;
        let mut served = 0;
        let mut next = first;
        loop {
            let query = match next.take() {
                Some(q) => q,
                None if spent < budget => match self.rx.try_recv() {
                    Ok(q) => q,
                    Err(_) => break,
                },
                None => break,
            };
            spent += query.cost();
            served += 1;
            answer(engine, query);
        }
        served
    }
}

/// Answers one request on the engine thread. A request whose caller gave
/// up (timed out) is skipped.
pub fn answer(engine: &mut Engine, query: Query) {
    match query {
        Query::Read { keys, at, reply } => {
            if reply.is_closed() {
                return;
            }
            let at = at
                .or_else(|| engine.newest_event_time())
                .unwrap_or_else(now_millis);
            let readings: Result<Vec<Reading>, _> =
                keys.iter().map(|key| engine.read(key, at)).collect();
            let result = readings
                .map(|readings| Readings {
                    at,
                    // One key: the watermark its windows follow (its shard's
                    // under per-shard watermarks); several: the pipeline's.
                    watermark: match &keys[..] {
                        [key] => engine.watermark_for(key),
                        _ => engine.watermark(),
                    },
                    readings,
                })
                .map_err(|e| e.to_string());
            let _ = reply.send(result);
        }
        Query::Evaluate { event, reply } => {
            if reply.is_closed() {
                return;
            }
            let result = engine
                .evaluate(&event)
                .map(|evaluation| Evaluated {
                    watermark: engine.watermark_for(&event.key),
                    evaluation,
                })
                .map_err(|e| e.to_string());
            let _ = reply.send(result);
        }
    }
}

/// Which worker answers a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This process: its engine holds the key's state.
    Local,
    /// Another worker holds the key's shard: its API's base URL
    /// (`http://host:port`), as its lease rows say.
    Owner(String),
    /// Nobody serves the key's shard right now (it is moving, or its
    /// owner's API address is unknown): try again shortly.
    Moving(String),
}

/// Where keys are answered under `[cluster]` (the lease worker's view of
/// the table: `crate::cluster::Directory`).
pub trait KeyRouter: Send + Sync {
    fn route(&self, key: &str) -> Route;
}

/// The router a run sets once its cluster worker exists (none without
/// `[cluster]`: every key is local).
pub type RouterSlot = Arc<std::sync::OnceLock<Arc<dyn KeyRouter>>>;

/// Where a request for `key` is answered. With a cluster, `MD5(key)`
/// names the shard whose hash range holds it, and the lease table its
/// owner: `Local` if this worker serves the shard, else the owner's API
/// (the handlers answer 307 to it), or `Moving` (503, retry). Without one,
/// every key is local.
pub fn route(router: &RouterSlot, key: &str) -> Route {
    match router.get() {
        Some(r) => r.route(key),
        None => Route::Local,
    }
}

/// The run's end of the API: what `run` passes the pipeline so that the
/// engine stage serves the requests and the batcher shares the API's model.
pub struct Link {
    pub inbox: Inbox,
    /// Set by the run under `[cluster]`: where keys are answered.
    pub router: RouterSlot,
    /// This API's base URL as other workers reach it (written in the lease
    /// rows this worker holds).
    pub advertise: Option<String>,
    /// The configured model (none without `[inference]`), shared with the
    /// API's `/v1/score`.
    pub scorer: Option<Arc<Scorer>>,
}

/// What the HTTP handlers call: the request channel, the decoder of scored
/// events, the model.
pub struct Online {
    queries: Queries,
    decoder: Decoder,
    scorer: Option<Arc<Scorer>>,
    router: RouterSlot,
    names: FeatureNames,
    /// The `[schema]` key, the entity name of Feast requests.
    entity: String,
    max_record_bytes: usize,
    /// Sends a Feast request's keys to the workers that own them.
    forwarder: forward::Forwarder,
}

/// Why a request failed, as the HTTP layer maps it to a status.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is wrong; the reason says how.
    BadRequest(String),
    /// 503 (the engine is busy, slow or stopped) or 500 (a state read failed).
    Query(QueryError),
    /// 502: the model failed for good (after retries, no fallback); the
    /// body still carries the vector.
    Model(Box<ScoreBody>, String),
    /// 307 to this base URL (another worker holds the key's shard).
    Elsewhere(String),
    /// 503 with Retry-After: the key's shard is moving between workers.
    Moving(String),
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        ApiError::Query(e)
    }
}

impl Online {
    /// The API for `config`, with the model `inference::build_with` makes
    /// from it (`sdk`: AWS settings instead of the standard chain), and the
    /// [`Link`] to pass the pipeline. Fails as the run would on a bad model.
    pub fn new(
        config: &Config,
        sdk: Option<aws_config::SdkConfig>,
    ) -> anyhow::Result<(Online, Link)> {
        let api = config.api.clone().unwrap_or_default();
        let scorer = inference::build_with(config, sdk)?;
        let (queries, inbox) = channel(api.max_in_flight, api.request_timeout.std());
        let router = RouterSlot::default();
        let online = Online {
            queries,
            decoder: Decoder::new(&config.schema),
            scorer: scorer.clone(),
            router: router.clone(),
            names: inference::feature_names(config),
            entity: config.schema.key.clone(),
            max_record_bytes: config.schema.max_record_bytes,
            forwarder: forward::Forwarder::new(api.request_timeout.std()),
        };
        Ok((
            online,
            Link {
                inbox,
                scorer,
                router,
                advertise: None,
            },
        ))
    }

    /// Ok when this worker answers `key`; else where to go instead.
    fn local(&self, key: &str) -> Result<(), ApiError> {
        match route(&self.router, key) {
            Route::Local => Ok(()),
            Route::Owner(base) => Err(ApiError::Elsewhere(base)),
            Route::Moving(why) => Err(ApiError::Moving(why)),
        }
    }

    /// The largest request body worth reading: a scored event up to
    /// `max_record_bytes` (the decoder refuses larger ones with its
    /// reason), and at least 2 MiB for Feast requests.
    pub fn body_limit(&self) -> usize {
        self.max_record_bytes.saturating_add(1).max(2 << 20)
    }

    /// `GET /v1/features/{key}?at=T`.
    pub async fn features(&self, key: &str, at: Option<Millis>) -> Result<FeaturesBody, ApiError> {
        self.local(key)?;
        let key: Arc<str> = Arc::from(key);
        let mut answer = self.queries.read(vec![key.clone()], at).await?;
        let reading = answer.readings.pop().ok_or_else(|| {
            ApiError::Query(QueryError::Engine("the engine answered no reading".into()))
        })?;
        Ok(FeaturesBody::new(key, answer.at, answer.watermark, reading))
    }

    /// `POST /v1/get-online-features`.
    ///
    /// Keys of one other worker: 307 there. Keys of several: this worker
    /// answers its own and forwards the others to their owners
    /// ([`forward`]), unless the request was itself `forwarded` (then every
    /// key must be this worker's, or 503: ownership moved meanwhile).
    pub async fn feast(
        &self,
        request: &[u8],
        forwarded: bool,
    ) -> Result<feast::Response, ApiError> {
        let request = feast::Request::parse(request, &self.entity, &self.names)
            .map_err(ApiError::BadRequest)?;
        let mut by_owner: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
        for (i, key) in request.keys.iter().enumerate() {
            let owner = match route(&self.router, key) {
                Route::Local => String::new(),
                Route::Owner(base) => base,
                Route::Moving(why) => return Err(ApiError::Moving(why)),
            };
            by_owner.entry(owner).or_default().push(i);
        }
        let remote = by_owner.keys().filter(|o| !o.is_empty()).count();
        if remote == 0 {
            let answer = self.queries.read(request.keys.clone(), None).await?;
            return Ok(request.respond(&self.entity, &answer.readings));
        }
        if forwarded {
            return Err(ApiError::Moving(
                "a forwarded request names keys this worker no longer serves (their shard moved); retry"
                    .into(),
            ));
        }
        if by_owner.len() == 1 {
            let owner = by_owner.into_keys().next().unwrap_or_default();
            return Err(ApiError::Elsewhere(owner));
        }
        let local = by_owner.remove("");
        let entity = &self.entity;
        let remote_parts =
            futures_util::future::join_all(by_owner.into_iter().map(|(owner, indices)| {
                let body = request.subset(&indices).body(entity);
                async move {
                    let answer = self.forwarder.feast(&owner, body).await;
                    (owner, indices, answer)
                }
            }));
        let local_part = async {
            match local {
                Some(indices) => {
                    let sub = request.subset(&indices);
                    let answer = self.queries.read(sub.keys.clone(), None).await?;
                    Ok::<_, ApiError>(Some((indices, sub.respond(entity, &answer.readings))))
                }
                None => Ok(None),
            }
        };
        let (remote_parts, local_part) = tokio::join!(remote_parts, local_part);
        let mut parts: Vec<(Vec<usize>, feast::Response)> = local_part?.into_iter().collect();
        for (owner, indices, answer) in remote_parts {
            match answer {
                Ok(response) => parts.push((indices, response)),
                Err(why) => {
                    tracing::warn!(owner = %owner, error = %why, "online API: forwarding a Feast request's keys failed");
                    return Err(ApiError::Moving(format!(
                        "the worker serving {} of these entities did not answer ({why}); retry",
                        indices.len()
                    )));
                }
            }
        }
        request.assemble(entity, parts).map_err(|e| {
            ApiError::Moving(format!("another worker's answer did not fit: {e}; retry"))
        })
    }

    /// `POST /v1/score`: the event's vector now, including itself, and the
    /// model's answer for it.
    pub async fn score(&self, body: &[u8]) -> Result<ScoreBody, ApiError> {
        let (key, event_time, fields) = self
            .decoder
            .decode_parts(body)
            .map_err(ApiError::BadRequest)?;
        self.local(&key)?;
        let event = Event {
            // Not used: an evaluation moves no watermark and has no id.
            position: Position::new(Arc::from("api"), "score"),
            arrival: now_millis(),
            key,
            event_time,
            fields,
            raw: bytes::Bytes::new(),
        };
        let evaluated = self.queries.evaluate(event.clone()).await?;
        let mut answer = ScoreBody::new(
            &event,
            evaluated.watermark,
            evaluated.evaluation,
            &self.names,
        );
        let (Some(scorer), Some(features)) = (&self.scorer, answer.vector()) else {
            return Ok(answer);
        };
        let started = std::time::Instant::now();
        let outcome = scorer.primary.predict(&[features]).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        match outcome {
            Answer::Primary(p) => {
                let prediction = p.predictions.into_iter().next();
                answer.predicted(
                    prediction,
                    scorer.primary.model().name(),
                    p.variant,
                    false,
                    latency_ms,
                );
                Ok(answer)
            }
            Answer::Fallback {
                prediction, model, ..
            } => {
                let p = prediction.predictions.into_iter().next();
                answer.predicted(p, model, prediction.variant, true, latency_ms);
                Ok(answer)
            }
            Answer::Failed(reason) => Err(ApiError::Model(Box::new(answer), reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::engine::FeatureStatus;
    use crate::state::StateStore;

    fn config() -> Config {
        let text = r#"
[source]
type = "generator"
[schema]
key = "userId"
timestamp = "ts"
fields = { amount = "f64" }
[[features]]
name = "n"
agg = "count"
window = { type = "tumbling", size = "1m" }
[[sinks]]
type = "stdout"
kinds = ["features"]
"#;
        Config::from_str_at(text, Path::new("test.toml"), |_| None).unwrap()
    }

    fn engine(dir: &Path) -> Engine {
        let config = config();
        let store = StateStore::open(dir, &config.state_fingerprint(), false).unwrap();
        Engine::new(&config, store).unwrap()
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once_and_a_slow_engine_times_out() {
        let (queries, _inbox) = channel(1, Duration::from_millis(200));
        let waiting = {
            let q = queries.clone();
            tokio::spawn(async move { q.read(vec!["u1".into()], None).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = std::time::Instant::now();
        let refused = queries.read(vec!["u2".into()], None).await;
        assert_eq!(refused.unwrap_err(), QueryError::Busy(1));
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "refused at once"
        );
        // Nobody serves the queue: the first request gives up in time.
        let e = waiting.await.unwrap().unwrap_err();
        assert_eq!(e, QueryError::Timeout(Duration::from_millis(200)));
    }

    #[tokio::test]
    async fn requests_to_a_stopped_pipeline_fail_fast() {
        let (queries, inbox) = channel(4, Duration::from_secs(5));
        drop(inbox);
        let e = queries.read(vec!["u1".into()], None).await.unwrap_err();
        assert_eq!(e, QueryError::Stopped);
        assert_eq!(e.to_string(), "the pipeline is not running");
    }

    #[tokio::test]
    async fn the_engine_answers_a_budget_of_keys_per_turn() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = engine(dir.path());
        let (queries, mut inbox) = channel(8, Duration::from_secs(5));
        let keys = |n: usize| {
            (0..n)
                .map(|i| Arc::from(format!("u{i}")))
                .collect::<Vec<_>>()
        };
        let asks: Vec<_> = (0..4)
            .map(|_| {
                let q = queries.clone();
                tokio::spawn(async move { q.read(keys(3), Some(1_000)).await })
            })
            .collect();
        while inbox.rx.len() < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // 3 + 3 keys reach a budget of 5: two requests this turn.
        assert_eq!(inbox.serve(&mut engine, None, 5), 2);
        assert_eq!(inbox.rx.len(), 2);
        // A request bigger than the budget is answered whole.
        assert_eq!(inbox.serve(&mut engine, None, 1), 1);
        assert_eq!(inbox.serve(&mut engine, None, 100), 1);
        assert_eq!(inbox.serve(&mut engine, None, 100), 0);
        for ask in asks {
            let answer = ask.await.unwrap().unwrap();
            assert_eq!(answer.at, 1_000);
            assert_eq!(answer.watermark, Millis::MIN);
            assert_eq!(answer.readings.len(), 3);
            for r in &answer.readings {
                assert_eq!(r.statuses, vec![FeatureStatus::NotFound]);
            }
        }
    }

    #[tokio::test]
    async fn an_evaluation_includes_the_event_and_a_read_defaults_to_the_newest_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = engine(dir.path());
        let config = config();
        let decoder = Decoder::new(&config.schema);
        let event = |t: i64| {
            let text = format!(r#"{{"userId":"u1","ts":{t},"amount":1}}"#);
            decoder
                .decode_str(Position::new(Arc::from("p"), "1"), 0, &text)
                .unwrap()
        };
        let mut out = Vec::new();
        engine
            .process(&event(1_700_000_040_000), 0, &mut out)
            .unwrap();
        let (queries, mut inbox) = channel(8, Duration::from_secs(5));
        let q = queries.clone();
        let second = event(1_700_000_040_001);
        let evaluated = tokio::spawn(async move { q.evaluate(second).await });
        let q = queries.clone();
        let read = tokio::spawn(async move { q.read(vec!["u1".into()], None).await });
        while inbox.rx.len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(inbox.serve(&mut engine, None, 10), 2);
        let Evaluation::Features(r) = evaluated.await.unwrap().unwrap().evaluation else {
            panic!("not late")
        };
        assert_eq!(r.features.values, vec![Some(crate::record::Value::Int(2))]);
        let read = read.await.unwrap().unwrap();
        assert_eq!(read.at, 1_700_000_040_000, "the newest event time");
        assert_eq!(
            read.readings[0].features.values,
            vec![Some(crate::record::Value::Int(1))],
            "the evaluation added nothing"
        );
    }

    #[test]
    fn every_key_is_local_until_the_cluster_routes() {
        assert_eq!(route(&RouterSlot::default(), "u1"), Route::Local);
    }
}
