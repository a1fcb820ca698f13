//! The fan-out stage: each output to the sinks that subscribe to its
//! kind, each barrier to every sink (with an acknowledgement each) and
//! then to the committer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::DownstreamGone;
use crate::checkpoint::PendingCommit;
use crate::flow::{Message, Stats};
use crate::record::{KindSet, Output, OutputKind};
use crate::sink::SinkMessage;

/// Hands outputs to the sinks that subscribe to them and barriers to all.
pub(super) async fn fanout_stage(
    mut input: mpsc::Receiver<Message<Output>>,
    sinks: Vec<mpsc::Sender<SinkMessage>>,
    subscribed: KindSet,
    commits: mpsc::Sender<PendingCommit>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let counters: Vec<metrics::Counter> = OutputKind::ALL
        .iter()
        .map(|k| metrics::counter!("shardflow_outputs_total", "kind" => k.as_str()))
        .collect();
    let mut unsubscribed_reported = 0u64;
    while let Some(message) = input.recv().await {
        match message {
            Message::Batch(batch) => {
                if batch.is_empty() {
                    continue;
                }
                // Counted per batch: an atomic add per output was a
                // measurable part of a pipeline that writes millions.
                let mut counts = [0u64; OutputKind::ALL.len()];
                for o in &batch {
                    let kind = o.kind();
                    counts[kind as usize] += 1;
                    // Nothing is dropped silently: a dead letter or late event
                    // that no sink takes is at least logged (the first 100,
                    // then every 10,000th) and always counted.
                    if matches!(kind, OutputKind::DeadLetter | OutputKind::Late)
                        && !subscribed.contains(kind)
                    {
                        unsubscribed_reported += 1;
                        if unsubscribed_reported <= 100
                            || unsubscribed_reported.is_multiple_of(10_000)
                        {
                            tracing::warn!(kind = %kind, id = %o.id(), record = %o.to_ndjson().trim_end(), "no sink subscribes to this kind");
                        }
                    }
                }
                for (kind, &n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                    counters[kind].increment(n);
                    stats.outputs[kind].fetch_add(n, Ordering::Relaxed);
                }
                let batch = Arc::new(batch);
                for s in &sinks {
                    if s.send(SinkMessage::Batch(batch.clone())).await.is_err() {
                        return Err(DownstreamGone("a sink").into());
                    }
                }
            }
            Message::Barrier(b) => {
                let mut acks = Vec::with_capacity(sinks.len());
                for s in &sinks {
                    let (tx, rx) = oneshot::channel();
                    let message = SinkMessage::Barrier {
                        id: b.id,
                        last: b.last,
                        ack: tx,
                    };
                    if s.send(message).await.is_err() {
                        return Err(DownstreamGone("a sink").into());
                    }
                    acks.push(rx);
                }
                let last = b.last;
                if commits.send((b, acks)).await.is_err() {
                    return Err(DownstreamGone("the committer").into());
                }
                if last {
                    break;
                }
            }
        }
    }
    Ok(())
}
