//! `[[sinks]] type = "dynamodb"`: a feature store. Each key's newest
//! feature vector (or prediction) is one item of an existing table, read by
//! applications with `GetItem` at request time.
//!
//! # The item
//!
//! `key_attribute` (S, the table's hash key) holds the output's key,
//! `event_time` (N, epoch ms) and `id` (S) say which event it is, and each
//! configured feature is an attribute of its name: a number (N), or NULL
//! for a missing value, so that every item has every feature and a reader
//! tells "no value" (NULL) from "not a feature of this config" (absent). A
//! prediction adds `prediction` (M: the model's answer as in the NDJSON
//! record, e.g. `{"score": 0.93, "label": 1}`), `model` (S), `variant` (S
//! or NULL) and `fallback` (BOOL). Non-finite values and numbers beyond
//! DynamoDB's range (magnitude ≥ 1e126) are NULL, as NDJSON writes them
//! `null`; magnitudes below 1e-130 are 0. The config refuses features named
//! like one of these attributes.
//!
//! # Coalescing
//!
//! An item costs the same write units whichever vector it holds, and only
//! the newest is read, so between two checkpoint barriers the sink keeps
//! one output per key and writes it at the barrier: 10,000 events over
//! 1,000 keys are 1,000 writes. "Newest" is what writing every output with
//! the condition below, in order, would leave: the greatest event time, a
//! tie going to the later output, except that a features record never
//! replaces the prediction of the same event (the prediction holds the
//! features too). An out-of-order event therefore does not overwrite a
//! newer one of its key. At most `max_buffered_keys` keys are held; at that
//! many they are written before the barrier, so memory stays bounded.
//!
//! # Writes
//!
//! `write_mode = "conditional"` (the default) writes each item with
//! `PutItem` under `attribute_not_exists(#key) OR #event_time <= :t`,
//! `concurrency` requests in flight: a replay of older events or a restart
//! that produces outputs again never moves an item back in event time
//! (equal times are written again, with the same content after a restart).
//! A failed condition means a newer item is there: it is counted in
//! `shardflow_dynamodb_sink_stale_total` and is not an error.
//! `BatchWriteItem` cannot carry conditions and costs the same write units
//! per item, so it buys fewer requests, not cheaper writes:
//! `write_mode = "batch"` sends batches of up to 25 items (keys are unique
//! within a flush, as a batch requires), resends the `UnprocessedItems` with
//! jittered backoff, and is unconditional: a replay of older events (or two
//! pipelines on one table) can move an item back.
//!
//! Throttling, 5xx answers, network errors and attempts without an answer
//! in `request_timeout` are retried with jittered exponential backoff, each
//! request up to `max_attempts` times (the SDK's own retries are off, so
//! the count is exact); then the flush fails naming the table, the barrier
//! is not acknowledged, the checkpoint is not committed, and the run stops.
//! A restart produces the outputs after the last commit again. Any other
//! error (validation, access denied, a table deleted) fails at once.
//!
//! # The table
//!
//! shardflow does not create the table (capacity, encryption, TTL and
//! backups are an operator's choices). At start, `DescribeTable` checks that
//! it exists and that its key is `key_attribute` (HASH, S) alone; otherwise
//! the run stops before reading input, saying what is wrong. Outputs whose
//! key DynamoDB cannot store (empty, or over 2,048 bytes) are skipped with
//! a warning and counted in `shardflow_dynamodb_sink_skipped_total`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeValue, KeyType, PutRequest, ScalarAttributeType, TableDescription, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use tokio::task::JoinSet;

use super::Sink;
use crate::aws::{self, dynamodb::is_retryable, error_text, Backoff, ClientSettings};
use crate::config::{DynamoDbSinkConfig, WriteMode};
use crate::flow::BoxFuture;
use crate::record::{FeatureRecord, Key, Output, Value};
use crate::time::Millis;

/// Most items of one `BatchWriteItem` (DynamoDB's limit).
pub const MAX_BATCH_ITEMS: usize = 25;
/// Longest hash key value DynamoDB stores, in bytes.
const MAX_KEY_BYTES: usize = 2048;
/// The attribute the condition compares.
const EVENT_TIME: &str = "event_time";
const CONDITION: &str = "attribute_not_exists(#k) OR #t <= :t";
/// Backoff between attempts: 100 ms doubling to 5 s, jittered.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// An item: attribute name to value.
pub type Item = HashMap<String, AttributeValue>;

/// What the sink has done so far (the same counts as its metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DynamoDbSinkStats {
    /// Items DynamoDB accepted.
    pub items: u64,
    /// Write requests sent (`PutItem` or `BatchWriteItem`), retries included.
    pub requests: u64,
    /// Conditional puts refused because the item held a newer event.
    pub stale: u64,
    /// Attempts that were retried.
    pub retries: u64,
    /// Outputs left unwritten for a newer output of their key (coalescing).
    pub coalesced: u64,
    /// Outputs whose key DynamoDB cannot store.
    pub skipped: u64,
}

/// A counter kept both as a number (for [`DynamoDbSinkStats`]) and as a
/// metric.
struct Count {
    total: AtomicU64,
    metric: metrics::Counter,
}

impl Count {
    fn new(name: &'static str, table: &str) -> Count {
        Count {
            total: AtomicU64::new(0),
            metric: metrics::counter!(name, "table" => table.to_owned()),
        }
    }

    fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
        self.metric.increment(n);
    }

    fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

struct Counts {
    items: Count,
    requests: Count,
    stale: Count,
    retries: Count,
    coalesced: Count,
    skipped: Count,
}

/// What every write request needs; shared by the requests in flight.
struct Writer {
    client: Client,
    table: String,
    /// Set when not AWS's (messages name it).
    endpoint_url: Option<String>,
    key_attribute: String,
    max_attempts: u32,
    timeout: Duration,
    counts: Counts,
}

pub struct DynamoDbSink {
    config: DynamoDbSinkConfig,
    writer: Arc<Writer>,
    /// The newest output per key since the last write.
    pending: Latest,
}

/// The newest output of each key (see "Coalescing" in the module doc).
#[derive(Default)]
struct Latest {
    by_key: HashMap<Key, Output>,
}

/// What [`Latest::offer`] did with an output.
#[derive(Debug, PartialEq, Eq)]
enum Offered {
    /// The first of its key.
    Added,
    /// Its key had one: the newer of the two is kept, the other is not
    /// written.
    Coalesced,
    /// Its key cannot be a DynamoDB hash key.
    Skipped,
    /// Not a kind with a feature vector.
    Ignored,
}

impl Latest {
    fn offer(&mut self, o: &Output) -> Offered {
        let Some(key) = record(o).map(|r| &r.key) else {
            return Offered::Ignored;
        };
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Offered::Skipped;
        }
        match self.by_key.get_mut(key) {
            Some(current) => {
                if replaces(o, current) {
                    *current = o.clone();
                }
                Offered::Coalesced
            }
            None => {
                self.by_key.insert(key.clone(), o.clone());
                Offered::Added
            }
        }
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Each key's item, with its event time; empties the set.
    fn take_items(&mut self, key_attribute: &str) -> Vec<(Millis, Item)> {
        self.by_key
            .drain()
            .filter_map(|(_, o)| Some((o.time()?, item(&o, key_attribute)?)))
            .collect()
    }
}

impl DynamoDbSink {
    /// Builds the client and checks the table (see the module doc): an
    /// error names what is wrong with it.
    pub async fn connect(config: DynamoDbSinkConfig) -> anyhow::Result<DynamoDbSink> {
        let client = aws::dynamodb::client(&ClientSettings {
            region: config.region.clone(),
            endpoint_url: config.endpoint_url.clone(),
            extra_root_pem: None,
            // Our retries, not the SDK's: `max_attempts` is then exact and
            // every attempt is counted.
            max_attempts: Some(1),
        })
        .await
        .with_context(|| format!("DynamoDB table {}", config.table))?;
        let table = config.table.clone();
        let writer = Writer {
            client,
            endpoint_url: config.endpoint_url.clone().filter(|u| !u.is_empty()),
            key_attribute: config.key_attribute.clone(),
            max_attempts: config.max_attempts.max(1),
            timeout: config.request_timeout.std(),
            counts: Counts {
                items: Count::new("shardflow_dynamodb_sink_items_total", &table),
                requests: Count::new("shardflow_dynamodb_sink_requests_total", &table),
                stale: Count::new("shardflow_dynamodb_sink_stale_total", &table),
                retries: Count::new("shardflow_dynamodb_sink_retries_total", &table),
                coalesced: Count::new("shardflow_dynamodb_sink_coalesced_total", &table),
                skipped: Count::new("shardflow_dynamodb_sink_skipped_total", &table),
            },
            table,
        };
        writer.check_table().await?;
        Ok(DynamoDbSink {
            config,
            writer: Arc::new(writer),
            pending: Latest::default(),
        })
    }

    pub fn stats(&self) -> DynamoDbSinkStats {
        let c = &self.writer.counts;
        DynamoDbSinkStats {
            items: c.items.get(),
            requests: c.requests.get(),
            stale: c.stale.get(),
            retries: c.retries.get(),
            coalesced: c.coalesced.get(),
            skipped: c.skipped.get(),
        }
    }

    /// Keeps `o` if it is its key's newest output so far.
    fn coalesce(&mut self, o: &Output) {
        match self.pending.offer(o) {
            Offered::Added | Offered::Ignored => {}
            Offered::Coalesced => self.writer.counts.coalesced.add(1),
            Offered::Skipped => {
                tracing::warn!(
                    table = %self.writer.table,
                    id = %o.id(),
                    "skipping an output whose key DynamoDB cannot store (empty or over 2048 bytes)"
                );
                self.writer.counts.skipped.add(1);
            }
        }
    }

    /// Writes every pending item; returns once all are written (or stale).
    async fn write_pending(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let retries_before = self.writer.counts.retries.get();
        let items = self.pending.take_items(&self.writer.key_attribute);
        let n = items.len();
        let concurrency = self.config.concurrency.max(1);
        match self.config.write_mode {
            WriteMode::Conditional => {
                let jobs = items.into_iter().map(|(t, item)| {
                    let writer = self.writer.clone();
                    async move { writer.put(t, item).await }
                });
                run_bounded(concurrency, jobs).await?;
            }
            WriteMode::Batch => {
                let mut items = items.into_iter().map(|(_, item)| item).peekable();
                let mut batches = Vec::with_capacity(n.div_ceil(MAX_BATCH_ITEMS));
                while items.peek().is_some() {
                    batches.push(items.by_ref().take(MAX_BATCH_ITEMS).collect::<Vec<_>>());
                }
                let jobs = batches.into_iter().map(|batch| {
                    let writer = self.writer.clone();
                    async move { writer.batch(batch).await }
                });
                run_bounded(concurrency, jobs).await?;
            }
        }
        let retries = self.writer.counts.retries.get() - retries_before;
        if retries > 0 {
            tracing::warn!(table = %self.writer.table, items = n, retries, took = ?started.elapsed(), "DynamoDB writes needed retries (throttling, server errors or the network)");
        } else {
            tracing::debug!(table = %self.writer.table, items = n, took = ?started.elapsed(), "DynamoDB items written");
        }
        Ok(())
    }
}

/// The feature record inside an output the sink takes.
fn record(o: &Output) -> Option<&FeatureRecord> {
    match o {
        Output::Features(r) => Some(r),
        Output::Prediction(p) => Some(&p.features),
        _ => None,
    }
}

/// Whether `new` takes the place of `current` as its key's item (see
/// "Coalescing" in the module doc).
fn replaces(new: &Output, current: &Output) -> bool {
    let (Some(n), Some(c)) = (record(new), record(current)) else {
        return false;
    };
    if n.event_time != c.event_time {
        return n.event_time > c.event_time;
    }
    let features_after_its_prediction =
        matches!((new, current), (Output::Features(_), Output::Prediction(_))) && n.id == c.id;
    !features_after_its_prediction
}

/// A DynamoDB number for `v`, or `None` where DynamoDB has none (see the
/// module doc). Rust writes the shortest digits that read back as `v`,
/// never an exponent: at most 17 significant digits, within DynamoDB's 38.
fn number(v: f64) -> Option<String> {
    if !v.is_finite() || v.abs() >= 1e126 {
        return None;
    }
    if v == 0.0 || v.abs() < 1e-130 {
        return Some("0".into());
    }
    Some(format!("{v}"))
}

fn value(v: Option<Value>) -> AttributeValue {
    let n = match v {
        Some(Value::Int(i)) => Some(i.to_string()),
        Some(Value::Float(f)) => number(f),
        None => None,
    };
    n.map_or(AttributeValue::Null(true), AttributeValue::N)
}

/// A JSON value (a model's answer) as a DynamoDB attribute.
fn json(v: &serde_json::Value) -> AttributeValue {
    use serde_json::Value as J;
    match v {
        J::Null => AttributeValue::Null(true),
        J::Bool(b) => AttributeValue::Bool(*b),
        J::Number(n) => n
            .as_i64()
            .map(|i| i.to_string())
            .or_else(|| n.as_u64().map(|u| u.to_string()))
            .or_else(|| n.as_f64().and_then(number))
            .map_or(AttributeValue::Null(true), AttributeValue::N),
        J::String(s) => AttributeValue::S(s.clone()),
        J::Array(a) => AttributeValue::L(a.iter().map(json).collect()),
        J::Object(m) => AttributeValue::M(m.iter().map(|(k, v)| (k.clone(), json(v))).collect()),
    }
}

/// The item of a features or prediction output (see the module doc).
pub fn item(o: &Output, key_attribute: &str) -> Option<Item> {
    let r = record(o)?;
    let mut item = Item::with_capacity(r.features.names.len() + 7);
    item.insert(
        key_attribute.to_owned(),
        AttributeValue::S(r.key.to_string()),
    );
    item.insert(
        EVENT_TIME.to_owned(),
        AttributeValue::N(r.event_time.to_string()),
    );
    item.insert("id".to_owned(), AttributeValue::S(r.id.clone()));
    for (name, v) in r.features.names.iter().zip(&r.features.values) {
        item.insert(name.to_string(), value(*v));
    }
    if let Output::Prediction(p) = o {
        item.insert("prediction".to_owned(), json(&p.prediction));
        item.insert("model".to_owned(), AttributeValue::S(p.model.to_string()));
        item.insert(
            "variant".to_owned(),
            p.variant
                .as_deref()
                .map_or(AttributeValue::Null(true), |v| {
                    AttributeValue::S(v.to_owned())
                }),
        );
        item.insert("fallback".to_owned(), AttributeValue::Bool(p.fallback));
    }
    Some(item)
}

/// Runs `jobs` as tasks, at most `limit` at once; the first error stops the
/// rest (dropping the set aborts them) and is returned.
async fn run_bounded<F>(limit: usize, jobs: impl Iterator<Item = F>) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    async fn next(set: &mut JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
        match set.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(anyhow::anyhow!("a DynamoDB write task failed: {e}")),
            None => Ok(()),
        }
    }
    let mut set = JoinSet::new();
    for job in jobs {
        if set.len() >= limit {
            next(&mut set).await?;
        }
        set.spawn(job);
    }
    while !set.is_empty() {
        next(&mut set).await?;
    }
    Ok(())
}

/// What one attempt's failure means.
enum Failure {
    /// Worth another attempt; why.
    Retry(String),
    /// Would fail again: the message for the error.
    Fatal(String),
}

fn failure<E>(e: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if is_retryable(&e) {
        Failure::Retry(error_text(&e))
    } else {
        Failure::Fatal(error_text(&e))
    }
}

impl Writer {
    /// Sleeps before attempt `attempt + 1`, or fails when `attempt` was the
    /// last one.
    async fn retry_or_fail(
        &self,
        backoff: &mut Backoff,
        attempt: u32,
        what: impl FnOnce() -> String,
        why: &str,
    ) -> anyhow::Result<()> {
        if attempt >= self.max_attempts {
            bail!(
                "DynamoDB table {}: {} failed after {attempt} attempts: {why}",
                self.table,
                what()
            );
        }
        self.counts.retries.add(1);
        let delay = backoff.next_delay();
        tracing::debug!(table = %self.table, attempt, retry_in = ?delay, "retrying: {why}");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// `PutItem` unless the table holds a newer event of the key.
    async fn put(&self, event_time: Millis, item: Item) -> anyhow::Result<()> {
        let key = match item.get(&self.key_attribute) {
            Some(AttributeValue::S(k)) => k.clone(),
            _ => String::new(),
        };
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(CONDITION)
            .expression_attribute_names("#k", &self.key_attribute)
            .expression_attribute_names("#t", EVENT_TIME)
            .expression_attribute_values(":t", AttributeValue::N(event_time.to_string()));
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        for attempt in 1.. {
            self.counts.requests.add(1);
            let why = match tokio::time::timeout(self.timeout, request.clone().send()).await {
                Ok(Ok(_)) => {
                    self.counts.items.add(1);
                    return Ok(());
                }
                Ok(Err(e))
                    if e.as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    self.counts.stale.add(1);
                    return Ok(());
                }
                Ok(Err(e)) => match failure(e) {
                    Failure::Retry(why) => why,
                    Failure::Fatal(why) => {
                        bail!(
                            "DynamoDB table {}: PutItem of key {key:?}: {why}",
                            self.table
                        )
                    }
                },
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            let what = || format!("PutItem of key {key:?}");
            self.retry_or_fail(&mut backoff, attempt, what, &why)
                .await?;
        }
        unreachable!("the loop returns")
    }

    /// `BatchWriteItem` of `items` (at most 25, keys unique) until each was
    /// processed.
    async fn batch(&self, items: Vec<Item>) -> anyhow::Result<()> {
        let mut requests = items
            .into_iter()
            .map(|item| {
                let put = PutRequest::builder().set_item(Some(item)).build()?;
                Ok(WriteRequest::builder().put_request(put).build())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        for attempt in 1.. {
            self.counts.requests.add(1);
            let sent = self
                .client
                .batch_write_item()
                .request_items(&self.table, requests.clone())
                .send();
            let why = match tokio::time::timeout(self.timeout, sent).await {
                Ok(Ok(out)) => {
                    let left = out
                        .unprocessed_items
                        .and_then(|mut u| u.remove(&self.table))
                        .unwrap_or_default();
                    self.counts
                        .items
                        .add(requests.len().saturating_sub(left.len()) as u64);
                    if left.is_empty() {
                        return Ok(());
                    }
                    let why = format!("{} of {} items unprocessed", left.len(), requests.len());
                    requests = left;
                    why
                }
                Ok(Err(e)) => match failure(e) {
                    Failure::Retry(why) => why,
                    Failure::Fatal(why) => bail!(
                        "DynamoDB table {}: BatchWriteItem of {} items: {why}",
                        self.table,
                        requests.len()
                    ),
                },
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            let left = requests.len();
            let what = || format!("BatchWriteItem ({left} items not written)");
            self.retry_or_fail(&mut backoff, attempt, what, &why)
                .await?;
        }
        unreachable!("the loop returns")
    }

    /// `DescribeTable`: the table must exist with the key the items have.
    async fn check_table(&self) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        for attempt in 1.. {
            let sent = self.client.describe_table().table_name(&self.table).send();
            let why = match tokio::time::timeout(self.timeout, sent).await {
                Ok(Ok(out)) => return self.check_keys(out.table()),
                Ok(Err(e))
                    if e.as_service_error()
                        .is_some_and(|e| e.is_resource_not_found_exception()) =>
                {
                    bail!(
                        "DynamoDB table {} does not exist{}; shardflow does not create it: create \
                         it with the hash key {:?} of type S, e.g. `aws dynamodb create-table \
                         --table-name {} --attribute-definitions AttributeName={},AttributeType=S \
                         --key-schema AttributeName={},KeyType=HASH --billing-mode PAY_PER_REQUEST`",
                        self.table,
                        self.where_(),
                        self.key_attribute,
                        self.table,
                        self.key_attribute,
                        self.key_attribute,
                    )
                }
                Ok(Err(e)) => match failure(e) {
                    Failure::Retry(why) => why,
                    Failure::Fatal(why) => {
                        bail!(
                            "DynamoDB table {}{}: DescribeTable: {why}",
                            self.table,
                            self.where_()
                        )
                    }
                },
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            let what = || format!("DescribeTable{}", self.where_());
            self.retry_or_fail(&mut backoff, attempt, what, &why)
                .await?;
        }
        unreachable!("the loop returns")
    }

    /// ` (region R, endpoint E)`: where the table was looked for.
    fn where_(&self) -> String {
        let config = self.client.config();
        let region = config.region().map_or("no region", |r| r.as_ref());
        match &self.endpoint_url {
            Some(url) => format!(" (region {region}, endpoint {url})"),
            None => format!(" (region {region})"),
        }
    }

    fn check_keys(&self, table: Option<&TableDescription>) -> anyhow::Result<()> {
        let Some(table) = table else {
            bail!(
                "DynamoDB table {}: DescribeTable answered without a table",
                self.table
            );
        };
        let attributes = table.attribute_definitions();
        let keys: Vec<(String, &str, &str)> = table
            .key_schema()
            .iter()
            .map(|k| {
                let name = k.attribute_name();
                let ty = attributes
                    .iter()
                    .find(|a| a.attribute_name() == name)
                    .map_or("?", |a| a.attribute_type().as_str());
                (name.to_owned(), k.key_type().as_str(), ty)
            })
            .collect();
        let want = (
            self.key_attribute.clone(),
            KeyType::Hash.as_str(),
            ScalarAttributeType::S.as_str(),
        );
        if keys != [want] {
            let shown: Vec<String> = keys
                .iter()
                .map(|(name, kind, ty)| format!("{name} ({kind}, {ty})"))
                .collect();
            bail!(
                "DynamoDB table {}: its key is {}, but the sink writes items keyed by \
                 key_attribute = {:?}, so the table's key must be {} (HASH, S) alone: set \
                 key_attribute to the table's hash key, or name another table",
                self.table,
                shown.join(", "),
                self.key_attribute,
                self.key_attribute,
            );
        }
        tracing::debug!(table = %self.table, status = ?table.table_status(), "DynamoDB table checked");
        Ok(())
    }
}

impl Sink for DynamoDbSink {
    fn describe(&self) -> String {
        describe(&self.config)
    }

    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for o in outputs {
                self.coalesce(o);
                if self.pending.len() >= self.config.max_buffered_keys {
                    self.write_pending().await?;
                }
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.write_pending())
    }
}

/// The sink as `check` and the logs show it.
pub fn describe(c: &DynamoDbSinkConfig) -> String {
    let how = match c.write_mode {
        WriteMode::Conditional => "conditional PutItem",
        WriteMode::Batch => "BatchWriteItem of ≤ 25, unconditional",
    };
    format!(
        "dynamodb table {} (hash key {}; newest item per key, {how}, ≤ {} requests in flight)",
        c.table, c.key_attribute, c.concurrency
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{FeatureVector, PredictionRecord};

    fn features(id: &str, key: &str, t: Millis, values: Vec<Option<Value>>) -> Output {
        let names: Vec<Arc<str>> = vec!["count".into(), "sum".into()];
        Output::Features(FeatureRecord {
            id: id.into(),
            key: key.into(),
            event_time: t,
            features: FeatureVector {
                names: names.into(),
                values,
            },
            arrival: 0,
        })
    }

    fn prediction(of: &Output) -> Output {
        let Output::Features(r) = of else {
            panic!("features")
        };
        Output::Prediction(Box::new(PredictionRecord {
            features: r.clone(),
            prediction: serde_json::json!({"score": 0.25, "label": 0, "why": [null, "x", true]}),
            model: "fraud".into(),
            variant: None,
            fallback: false,
            latency_ms: 1.0,
        }))
    }

    fn n(v: &str) -> AttributeValue {
        AttributeValue::N(v.into())
    }

    #[test]
    fn a_features_item_has_every_feature_and_nulls_for_missing_values() {
        let o = features(
            "f/1",
            "u1",
            1_700_000_000_000,
            vec![Some(Value::Int(3)), None],
        );
        let item = item(&o, "userId").unwrap();
        let want: Item = [
            ("userId", AttributeValue::S("u1".into())),
            ("event_time", n("1700000000000")),
            ("id", AttributeValue::S("f/1".into())),
            ("count", n("3")),
            ("sum", AttributeValue::Null(true)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(item, want);
    }

    #[test]
    fn a_prediction_item_adds_the_answer_as_a_map() {
        let f = features("f/1", "u1", 5, vec![Some(Value::Float(12.5)), None]);
        let item = item(&prediction(&f), "key").unwrap();
        assert_eq!(item["count"], n("12.5"));
        assert_eq!(item["model"], AttributeValue::S("fraud".into()));
        assert_eq!(item["variant"], AttributeValue::Null(true));
        assert_eq!(item["fallback"], AttributeValue::Bool(false));
        let AttributeValue::M(p) = &item["prediction"] else {
            panic!("{:?}", item["prediction"])
        };
        assert_eq!(p["score"], n("0.25"));
        assert_eq!(p["label"], n("0"));
        assert_eq!(
            p["why"],
            AttributeValue::L(vec![
                AttributeValue::Null(true),
                AttributeValue::S("x".into()),
                AttributeValue::Bool(true)
            ])
        );
        assert_eq!(item.len(), 9, "{item:?}");
        // Kinds without a vector make no item.
        let w = Output::Window(crate::record::WindowResult {
            key: "u1".into(),
            feature: "count".into(),
            window_start: 0,
            window_end: 1,
            value: None,
            revision: 0,
        });
        assert!(item_of(&w).is_none());
    }

    fn item_of(o: &Output) -> Option<Item> {
        item(o, "key")
    }

    #[test]
    fn numbers_are_what_dynamodb_can_store() {
        assert_eq!(number(12.5).as_deref(), Some("12.5"));
        assert_eq!(number(0.1 + 0.2).as_deref(), Some("0.30000000000000004"));
        assert_eq!(number(-0.0).as_deref(), Some("0"));
        assert_eq!(number(1e-200).as_deref(), Some("0"));
        assert_eq!(number(1e20).as_deref(), Some("100000000000000000000"));
        assert_eq!(number(1e126), None);
        assert_eq!(number(f64::NAN), None);
        assert_eq!(number(f64::INFINITY), None);
        // Every digit string reads back as the value it came from.
        for v in [1.0 / 3.0, 123456.789, -9.87e-12, 2.5e100] {
            assert_eq!(number(v).unwrap().parse::<f64>().unwrap(), v);
        }
        assert_eq!(
            value(Some(Value::Float(f64::NAN))),
            AttributeValue::Null(true)
        );
        assert_eq!(value(Some(Value::Int(i64::MIN))), n("-9223372036854775808"));
    }

    #[test]
    fn coalescing_keeps_the_newest_event_per_key() {
        let older = features("f/1", "u1", 10, vec![Some(Value::Int(1)), None]);
        let newer = features("f/2", "u1", 20, vec![Some(Value::Int(2)), None]);
        let late_arrival = features("f/3", "u1", 15, vec![Some(Value::Int(3)), None]);
        let same_time = features("f/4", "u1", 20, vec![Some(Value::Int(4)), None]);
        assert!(replaces(&newer, &older));
        assert!(
            !replaces(&late_arrival, &newer),
            "out of order: older event"
        );
        assert!(
            replaces(&same_time, &newer),
            "a tie goes to the later output"
        );
        // A prediction replaces the features of its event; those features
        // arriving after it do not take its place back.
        let p = prediction(&newer);
        assert!(replaces(&p, &newer));
        assert!(!replaces(&newer, &p));
        // A newer event's features replace an older prediction.
        let newest = features("f/5", "u1", 30, vec![None, None]);
        assert!(replaces(&newest, &p));
    }

    #[test]
    fn ten_outputs_over_three_keys_are_three_items() {
        let mut latest = Latest::default();
        let mut offered = Vec::new();
        // (key, event time) in arrival order; u2's last arrival is older.
        let events = [
            ("u1", 1),
            ("u2", 5),
            ("u3", 2),
            ("u1", 3),
            ("u2", 9),
            ("u1", 3),
            ("u3", 4),
            ("u2", 7),
            ("u1", 8),
            ("u3", 4),
        ];
        for (i, (key, t)) in events.iter().enumerate() {
            let o = features(
                &format!("f/{i}"),
                key,
                *t,
                vec![Some(Value::Int(i as i64)), None],
            );
            offered.push(latest.offer(&o));
        }
        let added = offered.iter().filter(|o| **o == Offered::Added).count();
        assert_eq!((added, latest.len()), (3, 3));
        assert_eq!(
            latest.offer(&features("f/x", "", 1, vec![None, None])),
            Offered::Skipped
        );
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            latest.offer(&features("f/y", &long, 1, vec![None, None])),
            Offered::Skipped
        );
        let mut items: Vec<(String, Millis, AttributeValue)> = latest
            .take_items("key")
            .into_iter()
            .map(|(t, item)| {
                let AttributeValue::S(k) = &item["key"] else {
                    panic!()
                };
                (k.clone(), t, item["id"].clone())
            })
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let s = |v: &str| AttributeValue::S(v.into());
        assert_eq!(
            items,
            [
                ("u1".to_string(), 8, s("f/8")),
                ("u2".to_string(), 9, s("f/4")),
                ("u3".to_string(), 4, s("f/9")),
            ]
        );
        assert!(latest.is_empty());
    }
}
