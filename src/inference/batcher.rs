//! The micro-batcher between enrichment and sinks.
//!
//! Feature records are collected into a batch that closes at `max_batch`
//! records, when its first record has waited `max_wait`, or at a checkpoint
//! barrier (so every record before a barrier is scored before the barrier
//! passes). Other outputs pass straight through. While a batch is scored the
//! stage takes no input, so the bounded channels push back to the source.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::Model;
use crate::config::InferenceConfig;
use crate::pipeline::Message;
use crate::record::{DeadLetter, FeatureRecord, FeatureVector, Output, Position, PredictionRecord};

/// Scores feature records in micro-batches: a batch closes at `max_batch`
/// records, when its first record has waited `max_wait`, or at a barrier.
pub async fn run(
    model: Arc<dyn Model>,
    config: InferenceConfig,
    keep_features: bool,
    mut input: mpsc::Receiver<Message<Output>>,
    output: mpsc::Sender<Message<Output>>,
) -> anyhow::Result<()> {
    let batch_sizes = metrics::histogram!("shardflow_inference_batch_size");
    let failures = metrics::counter!("shardflow_inference_failures_total");
    let name = model.name();
    let mut pending: Vec<FeatureRecord> = Vec::with_capacity(config.max_batch);
    let mut deadline: Option<tokio::time::Instant> = None;

    async fn score(
        model: &dyn Model,
        name: &Arc<str>,
        pending: &mut Vec<FeatureRecord>,
        batch_sizes: &metrics::Histogram,
        failures: &metrics::Counter,
    ) -> Vec<Output> {
        let records = std::mem::take(pending);
        if records.is_empty() {
            return Vec::new();
        }
        batch_sizes.record(records.len() as f64);
        let rows: Vec<&FeatureVector> = records.iter().map(|r| &r.features).collect();
        let started = Instant::now();
        let result = model.predict(&rows).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(answer) if answer.predictions.len() == records.len() => records
                .into_iter()
                .zip(answer.predictions)
                .map(|(features, prediction)| {
                    Output::Prediction(PredictionRecord {
                        features,
                        prediction,
                        model: name.clone(),
                        variant: answer.variant.clone(),
                        fallback: false,
                        latency_ms,
                    })
                })
                .collect(),
            Ok(answer) => {
                failures.increment(1);
                let reason = format!(
                    "inference failed: model {name} returned {} predictions for {} rows",
                    answer.predictions.len(),
                    records.len()
                );
                records
                    .into_iter()
                    .map(|r| inference_dead_letter(r, &reason))
                    .collect()
            }
            Err(e) => {
                failures.increment(1);
                let reason = format!("inference failed: {e:#}");
                records
                    .into_iter()
                    .map(|r| inference_dead_letter(r, &reason))
                    .collect()
            }
        }
    }

    loop {
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            message = input.recv() => match message {
                Some(Message::Batch(batch)) => {
                    let mut out = Vec::with_capacity(batch.len());
                    for o in batch {
                        match o {
                            Output::Features(f) => {
                                if keep_features {
                                    out.push(Output::Features(f.clone()));
                                }
                                if pending.is_empty() {
                                    deadline = Some(tokio::time::Instant::now() + config.max_wait.std());
                                }
                                pending.push(f);
                                if pending.len() >= config.max_batch {
                                    out.extend(score(&*model, &name, &mut pending, &batch_sizes, &failures).await);
                                    deadline = None;
                                }
                            }
                            other => out.push(other),
                        }
                    }
                    if !out.is_empty() && output.send(Message::Batch(out)).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Message::Barrier(b)) => {
                    let out = score(&*model, &name, &mut pending, &batch_sizes, &failures).await;
                    deadline = None;
                    if !out.is_empty() && output.send(Message::Batch(out)).await.is_err() {
                        return Ok(());
                    }
                    if output.send(Message::Barrier(b)).await.is_err() {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
            _ = timeout => {
                let out = score(&*model, &name, &mut pending, &batch_sizes, &failures).await;
                deadline = None;
                if output.send(Message::Batch(out)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// A feature record the model could not score, kept whole in the dead letter.
fn inference_dead_letter(record: FeatureRecord, reason: &str) -> Output {
    let (partition, sequence) = record.id.rsplit_once('/').unwrap_or((&record.id, ""));
    let position = Position::new(Arc::from(partition), sequence);
    let raw = Output::Features(record).to_ndjson();
    Output::DeadLetter(DeadLetter {
        reason: reason.to_string(),
        position,
        raw: bytes::Bytes::from(raw.trim_end().to_string()),
    })
}
