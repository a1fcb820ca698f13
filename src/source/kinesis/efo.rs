//! One shard's enhanced fan-out subscription: SubscribeToShard, renewed
//! until the shard ends or the run stops.
//!
//! Two tasks per shard, joined by a bounded channel of `shard_buffer` events:
//! the *reader* holds the HTTP/2 event stream, the *forwarder* hands records
//! to the pipeline. When the pipeline is slow the forwarder waits, the
//! channel fills, the reader stops polling the event stream and HTTP/2 flow
//! control stops the service from sending more. Memory per shard is bounded
//! by `shard_buffer` events (an event holds at most what the service sends in
//! one push, about 2 MB/s of shard throughput).
//!
//! Where to (re)subscribe is tracked by the reader itself, never by trusting
//! `ContinuationSequenceNumber`'s exact meaning: after a record was delivered,
//! `AFTER_SEQUENCE_NUMBER` of it (no gap, no duplicate); before any record,
//! the starting position again (`LATEST` becomes `AT_TIMESTAMP` of the first
//! subscription, so records written between two subscriptions are not lost).
//! The continuation only tells whether the shard is over: an event without
//! one, or one announcing `ChildShards` with no records left, is SHARD_END,
//! and a shard at its end is never subscribed to again.
//!
//! Inactivity deadline: the service pushes an event every few seconds even
//! with no data, so a subscription silent for `stall_timeout` is half-open.
//! It is dropped (which resets the HTTP/2 stream) and renewed from the same
//! position; `shardflow_kinesis_resubscribes_total{reason="stall"}` counts it.
//! Time spent waiting for the pipeline does not count as silence.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{ShardIteratorType, StartingPosition, SubscribeToShardEventStream};
use aws_sdk_kinesis::Client;
use bytes::Bytes;
use smol_str::SmolStr;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::deagg::{deaggregate, Deaggregated};
use crate::aws::{error_text, Backoff};
use crate::record::{PartitionStatus, Position, RawRecord};
use crate::source::SourceMessage;
use crate::state::HashRange;
use crate::time::{now_millis, Millis};

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Latest,
    TrimHorizon,
    AtTimestamp(Millis),
    /// Right after a fully delivered record.
    After(String),
    /// At a KPL aggregate of which sub-records `0..=skip_through` were delivered.
    Inside {
        sequence: String,
        skip_through: u64,
    },
}

impl Start {
    /// The resume point a checkpointed position stands for.
    pub fn from_checkpoint(p: &Position) -> Start {
        match p.sub_sequence {
            None => Start::After(p.sequence.to_string()),
            Some(sub) => Start::Inside {
                sequence: p.sequence.to_string(),
                skip_through: sub,
            },
        }
    }

    /// True for a sequence number this position says was handed on in full.
    fn already_delivered(&self, sequence: &str) -> bool {
        match self {
            Start::After(s) => cmp_sequence(sequence, s).is_le(),
            Start::Inside { sequence: s, .. } => cmp_sequence(sequence, s).is_lt(),
            _ => false,
        }
    }

    fn to_sdk(&self) -> StartingPosition {
        let b = StartingPosition::builder();
        let b = match self {
            Start::Latest => b.r#type(ShardIteratorType::Latest),
            Start::TrimHorizon => b.r#type(ShardIteratorType::TrimHorizon),
            Start::AtTimestamp(ms) => b
                .r#type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(*ms)),
            Start::After(seq) => b
                .r#type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
            Start::Inside { sequence, .. } => b
                .r#type(ShardIteratorType::AtSequenceNumber)
                .sequence_number(sequence),
        };
        b.build().expect("the type is always set")
    }
}

/// Orders two decimal sequence numbers (up to 128 digits) numerically.
pub fn cmp_sequence(a: &str, b: &str) -> std::cmp::Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// How a shard's task ended.
/// A shard as `ListShards` or a `SHARD_END` event describes it.
#[derive(Clone, Debug)]
pub struct ShardInfo {
    pub id: String,
    pub parents: Vec<String>,
    /// Its hash key range (`None` if the service sent none or a bad one).
    pub range: Option<HashRange>,
}

#[derive(Debug)]
pub enum Outcome {
    /// SHARD_END: every record was handed on; these children may follow
    /// (shard id, parent ids).
    Ended(Vec<ShardInfo>),
    /// The run is stopping (or the pipeline is gone).
    Stopped,
}

pub struct ShardTask {
    pub client: Client,
    pub consumer_arn: Arc<str>,
    pub shard: Arc<str>,
    pub start: Start,
    pub stall_timeout: Duration,
    pub shard_buffer: usize,
    pub batch_size: usize,
    pub output: mpsc::Sender<SourceMessage>,
    pub shutdown: watch::Receiver<bool>,
}

/// What the reader gives the forwarder.
enum Chunk {
    Records(Vec<RawRecord>),
    /// The subscription started (`Reading`) or was lost (`Known`): the
    /// shard's idle clock runs only while it can deliver.
    Status(PartitionStatus),
}

impl ShardTask {
    pub async fn run(self) -> Outcome {
        let (tx, rx) = mpsc::channel(self.shard_buffer);
        let forwarder = tokio::spawn(forward(
            rx,
            self.shard.clone(),
            self.output.clone(),
            self.batch_size,
            self.shutdown.clone(),
        ));
        let outcome = self.read(tx).await;
        // The reader dropped its sender: the forwarder drains what is left
        // (all of it at SHARD_END, so children start strictly after).
        let delivered = forwarder.await.unwrap_or(false);
        match outcome {
            Outcome::Ended(children) if delivered => Outcome::Ended(children),
            _ => Outcome::Stopped,
        }
    }

    async fn read(mut self, tx: mpsc::Sender<Chunk>) -> Outcome {
        let shard = self.shard.to_string();
        let behind = metrics::gauge!("shardflow_millis_behind_latest", "shard" => shard.clone());
        let records_total =
            metrics::counter!("shardflow_kinesis_records_total", "shard" => shard.clone());
        let bytes_total =
            metrics::counter!("shardflow_kinesis_bytes_total", "shard" => shard.clone());
        let resubscribes = |reason: &'static str| {
            metrics::counter!("shardflow_kinesis_resubscribes_total", "shard" => shard.clone(), "reason" => reason)
                .increment(1)
        };
        let source_stage = crate::telemetry::StageClock::new("source");
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut last_subscribe: Option<Instant> = None;
        let mut first = true;
        // Whether the pipeline was told this shard is being read.
        let mut reading = false;

        loop {
            if *self.shutdown.borrow() {
                return Outcome::Stopped;
            }
            // At most one SubscribeToShard per shard and consumer per second.
            if let Some(t) = last_subscribe {
                if !self.sleep_until(t + Duration::from_secs(1)).await {
                    return Outcome::Stopped;
                }
            }
            last_subscribe = Some(Instant::now());
            let requested = self.start.to_sdk();
            if self.start == Start::Latest {
                // Should this subscription end before a record arrives, the
                // next one starts when this one did, not at a later LATEST.
                self.start = Start::AtTimestamp(now_millis());
            }
            let request = self
                .client
                .subscribe_to_shard()
                .consumer_arn(&*self.consumer_arn)
                .shard_id(&*self.shard)
                .starting_position(requested)
                .send();
            // The initial response is bounded by the same deadline: a
            // request sent on a half-open pooled connection must not hang.
            let response = tokio::select! {
                r = tokio::time::timeout(self.stall_timeout, request) => r,
                _ = self.shutdown.changed() => return Outcome::Stopped,
            };
            if !matches!(response, Ok(Ok(_))) && !self.stop_reading(&tx, &mut reading).await {
                return Outcome::Stopped;
            }
            let mut output = match response {
                Err(_) => {
                    tracing::warn!(shard = %self.shard, stall_timeout = ?self.stall_timeout, "SubscribeToShard unanswered for stall_timeout; retrying");
                    resubscribes("stall");
                    continue;
                }
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    let code = e.code().unwrap_or("network").to_owned();
                    let delay = match code.as_str() {
                        // A zombie subscription (a previous connection the
                        // service still holds) is taken over by a call more
                        // than 5 s later: wait that long, then retry.
                        "ResourceInUseException" => {
                            Duration::from_secs(5)
                                + backoff.next_delay().min(Duration::from_secs(5))
                        }
                        _ => backoff.next_delay(),
                    };
                    tracing::warn!(shard = %self.shard, error = %error_text(&e), retry_in = ?delay, "SubscribeToShard failed; retrying");
                    resubscribes("error");
                    if !self.sleep_for(delay).await {
                        return Outcome::Stopped;
                    }
                    continue;
                }
            };
            if !reading {
                if tx
                    .send(Chunk::Status(PartitionStatus::Reading))
                    .await
                    .is_err()
                {
                    return Outcome::Stopped;
                }
                reading = true;
            }
            if first {
                tracing::info!(shard = %self.shard, start = ?self.start, "subscribed");
                first = false;
            } else {
                tracing::debug!(shard = %self.shard, start = ?self.start, "resubscribed");
            }

            loop {
                let next = tokio::select! {
                    r = tokio::time::timeout(self.stall_timeout, output.event_stream.recv()) => r,
                    _ = self.shutdown.changed() => return Outcome::Stopped,
                };
                let event = match next {
                    Err(_) => {
                        tracing::warn!(shard = %self.shard, stall_timeout = ?self.stall_timeout, "subscription silent for stall_timeout; resubscribing");
                        resubscribes("stall");
                        if !self.stop_reading(&tx, &mut reading).await {
                            return Outcome::Stopped;
                        }
                        break;
                    }
                    Ok(Err(e)) => {
                        if !self.stop_reading(&tx, &mut reading).await {
                            return Outcome::Stopped;
                        }
                        let delay = backoff.next_delay();
                        tracing::warn!(shard = %self.shard, error = %error_text(&e), retry_in = ?delay, "subscription failed; resubscribing");
                        resubscribes("error");
                        if !self.sleep_for(delay).await {
                            return Outcome::Stopped;
                        }
                        break;
                    }
                    Ok(Ok(None)) => {
                        // Subscriptions last 5 minutes; renew.
                        resubscribes("renewal");
                        break;
                    }
                    Ok(Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(ev)))) => ev,
                    Ok(Ok(Some(other))) => {
                        tracing::debug!(shard = %self.shard, event = ?other, "ignoring an unknown event");
                        continue;
                    }
                };
                backoff.reset();
                behind.set(event.millis_behind_latest as f64);
                let had_records = !event.records.is_empty();
                let child_shards = event.child_shards.unwrap_or_default();
                let shard_end = event.continuation_sequence_number.is_empty()
                    || (!child_shards.is_empty() && !had_records);
                let arrival = now_millis();
                // The service's (or emulator's) share of the delay.
                if let Some(put) = event
                    .records
                    .first()
                    .and_then(|r| r.approximate_arrival_timestamp)
                    .and_then(|t| t.to_millis().ok())
                {
                    source_stage.since(put, arrival);
                }
                let mut batch = Vec::with_capacity(event.records.len());
                let mut last_sequence = None;
                for record in event.records {
                    // Sequence numbers grow within a shard. A record at or
                    // before what was delivered is never handed on twice,
                    // whatever a server (or emulator) resends.
                    if self.start.already_delivered(&record.sequence_number) {
                        continue;
                    }
                    let sequence = SmolStr::from(record.sequence_number.as_str());
                    let data = Bytes::from(record.data.into_inner());
                    records_total.increment(1);
                    bytes_total.increment(data.len() as u64);
                    let skip_through = match &self.start {
                        Start::Inside {
                            sequence: s,
                            skip_through,
                        } if **s == *sequence => Some(*skip_through),
                        _ => None,
                    };
                    split_record(
                        &self.shard,
                        sequence.clone(),
                        data,
                        arrival,
                        skip_through,
                        &mut batch,
                    );
                    last_sequence = Some(sequence);
                }
                if let Some(seq) = last_sequence {
                    self.start = Start::After(seq.to_string());
                }
                if !batch.is_empty() {
                    let sent = tokio::select! {
                        r = tx.send(Chunk::Records(batch)) => r.is_ok(),
                        _ = self.shutdown.changed() => false,
                    };
                    if !sent {
                        return Outcome::Stopped;
                    }
                }
                if shard_end {
                    let children = child_shards
                        .iter()
                        .map(|c| ShardInfo {
                            id: c.shard_id.clone(),
                            parents: c.parent_shards.clone(),
                            range: c.hash_key_range.as_ref().and_then(|r| {
                                HashRange::parse(&r.starting_hash_key, &r.ending_hash_key).ok()
                            }),
                        })
                        .collect::<Vec<_>>();
                    tracing::info!(shard = %self.shard, children = ?children.iter().map(|c| &c.id).collect::<Vec<_>>(), "shard ended (SHARD_END)");
                    behind.set(0.0);
                    return Outcome::Ended(children);
                }
            }
        }
    }

    /// The subscription is lost: until the next one, the shard holds the
    /// watermark without counting towards idleness. False if the
    /// pipeline is gone.
    async fn stop_reading(&self, tx: &mpsc::Sender<Chunk>, reading: &mut bool) -> bool {
        if !*reading {
            return true;
        }
        *reading = false;
        tx.send(Chunk::Status(PartitionStatus::Known)).await.is_ok()
    }

    async fn sleep_until(&mut self, t: Instant) -> bool {
        tokio::select! {
            _ = tokio::time::sleep_until(t) => true,
            _ = self.shutdown.changed() => false,
        }
    }

    async fn sleep_for(&mut self, d: Duration) -> bool {
        self.sleep_until(Instant::now() + d).await
    }
}

/// Turns one Kinesis record into the records the pipeline gets: itself, or
/// the user records of a KPL aggregate (sub-sequence = index), skipping
/// those a checkpoint already covers.
fn split_record(
    shard: &Arc<str>,
    sequence: SmolStr,
    data: Bytes,
    arrival: Millis,
    skip_through: Option<u64>,
    out: &mut Vec<RawRecord>,
) {
    let position = |sub: Option<u64>| Position {
        partition: shard.clone(),
        sequence: sequence.clone(),
        sub_sequence: sub,
        resume_offset: None,
    };
    match deaggregate(&data) {
        Deaggregated::Single => {
            // A checkpoint inside a record only exists for aggregates; a
            // plain record at the checkpointed sequence was delivered.
            if skip_through.is_none() {
                out.push(RawRecord {
                    position: position(None),
                    arrival,
                    bytes: data,
                    replay_watermark: None,
                });
            }
        }
        Deaggregated::Aggregate(parts) => {
            for (i, bytes) in parts.into_iter().enumerate() {
                let i = i as u64;
                if skip_through.is_some_and(|s| i <= s) {
                    continue;
                }
                out.push(RawRecord {
                    position: position(Some(i)),
                    arrival,
                    bytes,
                    replay_watermark: None,
                });
            }
        }
        Deaggregated::Bad(reason) => {
            metrics::counter!("shardflow_kinesis_bad_aggregates_total", "shard" => shard.to_string())
                .increment(1);
            tracing::warn!(shard = %shard, sequence = %sequence, %reason, "bad KPL aggregate; passed on whole as a dead letter");
            if skip_through.is_none() {
                out.push(RawRecord {
                    position: position(None),
                    arrival,
                    bytes: data,
                    replay_watermark: None,
                });
            }
        }
    }
}

/// Hands a shard's records to the pipeline in batches of at most
/// `batch_size`. True when everything it was given was handed on.
async fn forward(
    mut rx: mpsc::Receiver<Chunk>,
    shard: Arc<str>,
    output: mpsc::Sender<SourceMessage>,
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    while let Some(chunk) = rx.recv().await {
        let records = match chunk {
            Chunk::Records(records) => records,
            Chunk::Status(status) => {
                let sent = tokio::select! {
                    r = output.send(SourceMessage::Partitions(vec![shard.clone()], status)) => r.is_ok(),
                    _ = shutdown.changed() => false,
                };
                if !sent {
                    return false;
                }
                continue;
            }
        };
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let batch: Vec<RawRecord> = records.by_ref().take(batch_size).collect();
            let sent = tokio::select! {
                r = output.send(SourceMessage::Batch(batch)) => r.is_ok(),
                _ = shutdown.changed() => false,
            };
            if !sent {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kinesis::deagg::aggregate;

    #[test]
    fn checkpoints_map_to_resume_points() {
        let mut p = Position::new(Arc::from("shardId-000000000001"), "42");
        assert_eq!(Start::from_checkpoint(&p), Start::After("42".into()));
        p.sub_sequence = Some(3);
        assert_eq!(
            Start::from_checkpoint(&p),
            Start::Inside {
                sequence: "42".into(),
                skip_through: 3
            }
        );
    }

    #[test]
    fn restart_inside_an_aggregate_skips_what_was_delivered() {
        let shard: Arc<str> = Arc::from("s");
        let agg = Bytes::from(aggregate("k", &[b"a", b"b", b"c", b"d"]));
        let mut out = Vec::new();
        split_record(
            &shard,
            SmolStr::from("7"),
            agg.clone(),
            0,
            Some(1),
            &mut out,
        );
        let subs: Vec<_> = out.iter().map(|r| r.position.sub_sequence).collect();
        assert_eq!(subs, vec![Some(2), Some(3)]);
        assert_eq!(&out[0].bytes[..], b"c");
        out.clear();
        split_record(&shard, SmolStr::from("7"), agg, 0, None, &mut out);
        assert_eq!(out.len(), 4);
        assert_eq!(out[3].position.to_string(), "s/7:3");
    }

    #[test]
    fn sequences_compare_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(cmp_sequence("9", "10"), Less);
        assert_eq!(cmp_sequence("0010", "10"), Equal);
        let after = Start::After("100".into());
        assert!(after.already_delivered("99") && after.already_delivered("100"));
        assert!(!after.already_delivered("101"));
        let inside = Start::Inside {
            sequence: "100".into(),
            skip_through: 2,
        };
        assert!(inside.already_delivered("99") && !inside.already_delivered("100"));
    }
}
