//! The micro-batcher between the engine stage and the sinks.
//!
//! Feature records are collected into a batch that closes at `max_batch`
//! records, when its first record has waited `max_wait`, or at a checkpoint
//! barrier. A closed batch is scored in its own task; up to `max_in_flight`
//! batches are scored at once. Results leave in input order (a queue of slots,
//! emitted from the front), so predictions keep their per-key order even when
//! a later batch finishes first. Other outputs (windows, late events, dead
//! letters) take a slot in the same queue and leave in order too.
//!
//! Backpressure: while all `max_in_flight` slots are scoring, the batcher
//! takes no input, so the bounded channels before it fill and the source
//! stops reading. Memory is bounded by `max_in_flight · max_batch` records
//! in flight plus the channels.
//!
//! Barriers: a barrier closes the open batch, waits until every slot before
//! it has been emitted (scored, fallen back or dead-lettered), and only then
//! passes. That is what makes a checkpoint cover exactly the records before it.
//!
//! Shadow: when a shadow model is configured, each closed batch is also sent
//! to it in a separate task, if one of its `max_in_flight` permits is free
//! (otherwise the shadow skips that batch and counts it). Shadow answers are
//! emitted whenever they arrive, as `kind = "shadow"`, and are never waited
//! for, except at the very end of the input, so they cannot slow the primary.
//! A checkpoint does not wait for them either: shadow output is best effort.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::resilience::Answer;
use super::Scorer;
use crate::config::InferenceConfig;
use crate::flow::Message;
use crate::record::{DeadLetter, FeatureRecord, FeatureVector, Output, Position, PredictionRecord};

/// One place in the output order: a batch being scored, or outputs ready to go.
enum Queued {
    /// Outputs that need no model: emitted as soon as they reach the front.
    Ready(Vec<Output>),
    /// A batch being scored.
    Scoring(JoinHandle<Vec<Output>>),
}

struct Batcher {
    scorer: Arc<Scorer>,
    config: InferenceConfig,
    output: mpsc::Sender<Message<Output>>,
    queue: VecDeque<Queued>,
    /// `Scoring` slots in `queue`.
    scoring: usize,
    pending: Vec<FeatureRecord>,
    /// Outputs waiting for the next slot boundary.
    ready: Vec<Output>,
    deadline: Option<tokio::time::Instant>,
    shadow_tx: Option<mpsc::Sender<Vec<Output>>>,
    batch_sizes: metrics::Histogram,
    in_flight: metrics::Gauge,
    shadow_skipped: metrics::Counter,
}

/// The downstream stage stopped: the pipeline is shutting down.
struct Closed;

/// Scores feature records in micro-batches; see the module docs.
pub async fn run(
    scorer: Arc<Scorer>,
    config: InferenceConfig,
    keep_features: bool,
    mut input: mpsc::Receiver<Message<Output>>,
    output: mpsc::Sender<Message<Output>>,
) -> anyhow::Result<()> {
    let (shadow_tx, mut shadow_rx) = match &scorer.shadow {
        Some(s) => {
            let (tx, rx) = mpsc::channel(s.permits.available_permits().max(1));
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let mut b = Batcher {
        batch_sizes: metrics::histogram!("shardflow_inference_batch_size"),
        in_flight: metrics::gauge!("shardflow_inference_batches_in_flight"),
        shadow_skipped: metrics::counter!("shardflow_inference_shadow_skipped_total"),
        pending: Vec::with_capacity(config.max_batch),
        scorer,
        config,
        output,
        queue: VecDeque::new(),
        scoring: 0,
        ready: Vec::new(),
        deadline: None,
        shadow_tx,
    };
    loop {
        let timeout = async {
            match b.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let shadow = async {
            match shadow_rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let front = async {
            match b.queue.front_mut() {
                Some(Queued::Scoring(h)) => h.await,
                _ => std::future::pending().await,
            }
        };
        let has_room = b.scoring < b.config.max_in_flight;
        let step = tokio::select! {
            biased;
            Some(outputs) = shadow => Step::Shadow(outputs),
            done = front => Step::Front(done),
            message = input.recv(), if has_room => Step::Input(message),
            _ = timeout, if has_room => Step::Deadline,
        };
        let result = match step {
            Step::Shadow(outputs) => b.send(outputs).await,
            Step::Front(done) => {
                b.queue.pop_front();
                b.scoring -= 1;
                b.in_flight.set(b.scoring as f64);
                let outputs = done.context("a scoring task panicked")?;
                match b.send(outputs).await {
                    Ok(()) => b.emit_ready().await,
                    Err(c) => Err(c),
                }
            }
            Step::Input(Some(Message::Batch(batch))) => b.take(batch, keep_features).await,
            Step::Input(Some(Message::Barrier(barrier))) => {
                let last = barrier.last;
                let r = b.drain().await;
                if r.is_ok() && last {
                    // The end: let outstanding shadow batches finish (they are
                    // bounded by request_timeout and never retried).
                    b.shadow_tx = None;
                    if let Some(rx) = shadow_rx.as_mut() {
                        let wait =
                            b.config.request_timeout.std() + std::time::Duration::from_secs(1);
                        let _ = tokio::time::timeout(wait, async {
                            while let Some(outputs) = rx.recv().await {
                                if b.output.send(Message::Batch(outputs)).await.is_err() {
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                }
                match r {
                    Ok(()) => b
                        .output
                        .send(Message::Barrier(barrier))
                        .await
                        .map_err(|_| Closed),
                    Err(c) => Err(c),
                }
            }
            Step::Input(None) => {
                let _ = b.drain().await;
                return Ok(());
            }
            Step::Deadline => {
                b.close_batch();
                b.emit_ready().await
            }
        };
        if result.is_err() {
            return Ok(());
        }
    }
}

enum Step {
    Shadow(Vec<Output>),
    Front(Result<Vec<Output>, tokio::task::JoinError>),
    Input(Option<Message<Output>>),
    Deadline,
}

impl Batcher {
    async fn send(&self, outputs: Vec<Output>) -> Result<(), Closed> {
        if outputs.is_empty() {
            return Ok(());
        }
        self.output
            .send(Message::Batch(outputs))
            .await
            .map_err(|_| Closed)
    }

    /// Takes one input batch: features join the open batch, the rest queue up.
    async fn take(&mut self, batch: Vec<Output>, keep_features: bool) -> Result<(), Closed> {
        for o in batch {
            match o {
                Output::Features(f) => {
                    if keep_features {
                        self.ready.push(Output::Features(f.clone()));
                    }
                    if self.pending.is_empty() {
                        self.deadline =
                            Some(tokio::time::Instant::now() + self.config.max_wait.std());
                    }
                    self.pending.push(f);
                    if self.pending.len() >= self.config.max_batch {
                        // Backpressure inside a large input batch: wait for a slot.
                        while self.scoring >= self.config.max_in_flight {
                            self.emit_front().await?;
                        }
                        self.close_batch();
                    }
                }
                other => self.ready.push(other),
            }
        }
        if !self.ready.is_empty() {
            self.queue
                .push_back(Queued::Ready(std::mem::take(&mut self.ready)));
        }
        self.emit_ready().await
    }

    /// Closes the open batch (if any) into a scoring slot. The caller makes
    /// sure a slot is free.
    fn close_batch(&mut self) {
        self.deadline = None;
        if !self.ready.is_empty() {
            self.queue
                .push_back(Queued::Ready(std::mem::take(&mut self.ready)));
        }
        if self.pending.is_empty() {
            return;
        }
        let records =
            std::mem::replace(&mut self.pending, Vec::with_capacity(self.config.max_batch));
        self.batch_sizes.record(records.len() as f64);
        if let (Some(shadow), Some(tx)) = (&self.scorer.shadow, &self.shadow_tx) {
            match shadow.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let copy = records.clone();
                    let scorer = self.scorer.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let outputs = score_shadow(&scorer, copy).await;
                        let _ = tx.send(outputs).await;
                        drop(permit);
                    });
                }
                Err(_) => self.shadow_skipped.increment(1),
            }
        }
        let scorer = self.scorer.clone();
        self.queue
            .push_back(Queued::Scoring(tokio::spawn(score(scorer, records))));
        self.scoring += 1;
        self.in_flight.set(self.scoring as f64);
    }

    /// Waits for the front slot and emits it.
    async fn emit_front(&mut self) -> Result<(), Closed> {
        match self.queue.pop_front() {
            Some(Queued::Ready(outputs)) => self.send(outputs).await,
            Some(Queued::Scoring(handle)) => {
                self.scoring -= 1;
                let outputs = match handle.await {
                    Ok(outputs) => outputs,
                    Err(e) => {
                        // A scoring task cannot fail, only panic: a bug. Stop
                        // emitting rather than lose its records silently.
                        tracing::error!("a scoring task panicked: {e}");
                        return Err(Closed);
                    }
                };
                self.in_flight.set(self.scoring as f64);
                self.send(outputs).await
            }
            None => Ok(()),
        }
    }

    /// Emits the `Ready` slots at the front, without waiting on any scoring.
    async fn emit_ready(&mut self) -> Result<(), Closed> {
        while let Some(Queued::Ready(_)) = self.queue.front() {
            self.emit_front().await?;
        }
        Ok(())
    }

    /// Closes the open batch and emits everything queued, in order.
    async fn drain(&mut self) -> Result<(), Closed> {
        while self.scoring >= self.config.max_in_flight {
            self.emit_front().await?;
        }
        self.close_batch();
        while !self.queue.is_empty() {
            self.emit_front().await?;
        }
        Ok(())
    }
}

static FAILED_BATCHES: AtomicU64 = AtomicU64::new(0);

/// Scores one batch with the primary model: predictions, fallback
/// predictions or dead letters, one output per record, in record order.
async fn score(scorer: Arc<Scorer>, records: Vec<FeatureRecord>) -> Vec<Output> {
    let rows: Vec<&FeatureVector> = records.iter().map(|r| &r.features).collect();
    let started = Instant::now();
    let answer = scorer.primary.predict(&rows).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(rows);
    crate::telemetry::StageClock::new("inference").left(records.first().map(|r| r.arrival));
    let (prediction, model, fallback) = match answer {
        Answer::Primary(p) => (p, scorer.primary.model().name(), false),
        Answer::Fallback {
            prediction,
            model,
            error,
        } => {
            log_failure(&error, records.len(), "answered by the fallback");
            (prediction, model, true)
        }
        Answer::Failed(reason) => {
            log_failure(&reason, records.len(), "sent to dead letters");
            metrics::counter!("shardflow_dead_letters_total", "stage" => "inference")
                .increment(records.len() as u64);
            return records
                .into_iter()
                .map(|r| inference_dead_letter(r, &reason))
                .collect();
        }
    };
    records
        .into_iter()
        .zip(prediction.predictions)
        .map(|(features, p)| {
            Output::Prediction(Box::new(PredictionRecord {
                features,
                prediction: p,
                model: model.clone(),
                variant: prediction.variant.clone(),
                fallback,
                latency_ms,
            }))
        })
        .collect()
}

/// Scores a copy of a batch with the shadow model. Failures are counted and
/// logged, never dead-lettered: the primary already accounts for every record.
async fn score_shadow(scorer: &Scorer, records: Vec<FeatureRecord>) -> Vec<Output> {
    let Some(shadow) = &scorer.shadow else {
        return Vec::new();
    };
    let rows: Vec<&FeatureVector> = records.iter().map(|r| &r.features).collect();
    let started = Instant::now();
    let answer = shadow.model.predict(&rows).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(rows);
    crate::telemetry::StageClock::new("inference").left(records.first().map(|r| r.arrival));
    match answer {
        Answer::Primary(p) => {
            let model = shadow.model.model().name();
            records
                .into_iter()
                .zip(p.predictions)
                .map(|(features, prediction)| {
                    Output::Shadow(Box::new(PredictionRecord {
                        features,
                        prediction,
                        model: model.clone(),
                        variant: p.variant.clone(),
                        fallback: false,
                        latency_ms,
                    }))
                })
                .collect()
        }
        Answer::Fallback { error, .. } | Answer::Failed(error) => {
            metrics::counter!("shardflow_inference_shadow_failures_total").increment(1);
            tracing::debug!(error = %error, rows = records.len(), "shadow batch failed");
            Vec::new()
        }
    }
}

/// Logs the first 20 failed batches, then every 1000th: an outage must be
/// visible without flooding the log at thousands of batches a second.
fn log_failure(error: &str, rows: usize, what: &str) {
    let n = FAILED_BATCHES.fetch_add(1, Ordering::Relaxed);
    if n < 20 || n.is_multiple_of(1000) {
        tracing::warn!(rows, failed_batches = n + 1, error = %error, "model failed; batch {what}");
    }
}

/// A feature record the model could not score, kept whole in the dead letter.
fn inference_dead_letter(record: FeatureRecord, reason: &str) -> Output {
    let (partition, sequence) = record.id.rsplit_once('/').unwrap_or((&record.id, ""));
    let position = Position::new(Arc::from(partition), sequence);
    let raw = Output::Features(record).to_ndjson();
    Output::DeadLetter(Box::new(DeadLetter {
        reason: reason.to_string(),
        position,
        raw: bytes::Bytes::from(raw.trim_end().to_string()),
    }))
}
