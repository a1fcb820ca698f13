//! `[source] type = "s3"` (usually `[replay.source]`): records archived in
//! S3, by shardflow's own archive sink or by Kinesis Data Firehose, read
//! back through the same pipeline by `shardflow replay`.
//!
//! - `objects.rs`: gzip detection, NDJSON / concatenated JSON splitting.
//! - `fetch.rs`: one object downloaded, decompressed, split and decoded.
//! - `archived.rs`: an archive line back into the live run's record.
//! - this file: listing, bounded concurrent fetching, handing on in order.
//!
//! The keys and object names of shardflow's archive are `archive/`'s (the
//! archive sink writes them); the S3 client is `aws/s3.rs`'s.
//!
//! Objects are listed (pruned by their hour directory when a time range is
//! given), ordered, then fetched `concurrency` at a time: each is streamed
//! and decoded on a blocking thread into a small bounded queue, and the
//! queues are drained strictly in object order. Records are decoded with
//! the schema on those blocking threads too ([`SourceMessage::Decoded`]):
//! an archive line is parsed once, where it is in cache, and the decoding
//! runs beside the engine. Memory is bounded by
//! `concurrency` × (a few chunks + a few batches), however large the
//! archive or its objects.
//!
//! Records of shardflow's archive (`kind = "raw"` lines) come back with
//! their original partition and position, so outputs keep their ids and
//! every partition keeps its own watermark, and with the watermark the live
//! run had before each of them. Other objects (Firehose) have no positions:
//! their records form one partition, `s3://bucket/prefix`, in key order,
//! with sequence `YYYY/MM/DD/HH/name:n` (the n-th record of the object), so
//! ids read `s3://bucket/prefix/YYYY/MM/DD/HH/name:n`.
//!
//! gzip verifies its checksum only at the end of an object: records that a
//! damaged stream yields before the damage is detected go on (as dead
//! letters when they do not decode, which is what garbage does).
//!
//! A bad object (corrupt gzip, truncated or overlong JSON, a bad archive
//! line) becomes a dead letter naming the object and the offset in its
//! decompressed bytes; the records before the damage are kept and the
//! replay goes on. A download that fails mid-object is retried from the
//! start of the object, skipping what was already handed on.

mod archived;
pub use archived::{archived_event, Interner};
mod fetch;
pub mod objects;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use smol_str::SmolStr;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::fetch::read_object;
use super::{DecodedRecord, EventTimeRange, Source, SourceContext, SourceMessage};
use crate::archive::layout::{self, KeyInfo};
use crate::aws::{self, error_text};
use crate::config::{ArchiveFormat, Compression, S3SourceConfig, SchemaConfig};
use crate::decode::Decoder;
use crate::flow::BoxFuture;
use crate::record::{DeadLetter, Position};
use crate::time::Millis;

/// An object being read ahead: its reference, the channel its reader
/// fills, and the reader's task.
type InFlight = (
    ObjectRef,
    mpsc::Receiver<ObjectMsg>,
    JoinHandle<anyhow::Result<()>>,
);

/// Counters a progress display reads while the archive is replayed.
#[derive(Debug, Default)]
pub struct ArchiveProgress {
    pub objects_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub objects_done: AtomicU64,
    /// Compressed bytes downloaded.
    pub bytes_done: AtomicU64,
    pub records: AtomicU64,
    pub bad_objects: AtomicU64,
    /// Archive records skipped because an earlier copy was read (a crash
    /// between an upload and its checkpoint's commit can leave two).
    pub duplicates: AtomicU64,
    /// Lines of other kinds in shardflow objects (not input records).
    pub other_lines: AtomicU64,
    /// Set once the listing is complete.
    pub listed: std::sync::atomic::AtomicBool,
}

pub struct S3Source {
    config: S3SourceConfig,
    from: Option<Millis>,
    to: Option<Millis>,
    progress: Arc<ArchiveProgress>,
    /// Records are decoded where their object is read
    /// ([`SourceMessage::Decoded`]).
    decoder: Arc<Decoder>,
}

impl S3Source {
    /// `from`/`to` override the config's time range (`--from`, `--to`).
    pub fn new(
        config: S3SourceConfig,
        schema: &SchemaConfig,
        from: Option<Millis>,
        to: Option<Millis>,
        progress: Arc<ArchiveProgress>,
    ) -> Self {
        let from = from.or(config.from_millis().ok().flatten());
        let to = to.or(config.to_millis().ok().flatten());
        S3Source {
            config,
            from,
            to,
            progress,
            decoder: Arc::new(Decoder::new(schema)),
        }
    }
}

/// One object to read.
#[derive(Clone, Debug)]
pub struct ObjectRef {
    pub key: String,
    pub size: u64,
    pub info: KeyInfo,
}

impl Source for S3Source {
    fn replays_watermarks(&self) -> bool {
        true
    }

    fn event_time_range(&self) -> Option<EventTimeRange> {
        Some((self.from, self.to))
    }

    fn describe(&self) -> String {
        let c = &self.config;
        let range = match (self.from, self.to) {
            (None, None) => String::new(),
            (f, t) => format!(
                ", events in [{}, {})",
                f.map_or("-∞".into(), crate::time::format_rfc3339_millis),
                t.map_or("+∞".into(), crate::time::format_rfc3339_millis)
            ),
        };
        format!(
            "s3://{}/{} ({} objects at once{range}{})",
            c.bucket,
            c.prefix,
            c.concurrency,
            c.endpoint_url
                .as_deref()
                .filter(|u| !u.is_empty())
                .map(|u| format!(", endpoint {u}"))
                .unwrap_or_default()
        )
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move {
            let result = self.read_all(&ctx).await;
            match result {
                Ok(exhausted) => {
                    ctx.end(exhausted).await;
                    Ok(())
                }
                Err(e) => {
                    ctx.end(false).await;
                    Err(e)
                }
            }
        })
    }
}

/// Lists the archive's objects in the time range, in reading order:
/// shardflow's objects in the order they were written, then any others by
/// key (Firehose's names sort by time).
pub async fn list_objects(
    client: &aws_sdk_s3::Client,
    config: &S3SourceConfig,
    from: Option<Millis>,
    to: Option<Millis>,
) -> anyhow::Result<Vec<ObjectRef>> {
    let slack = config.prune_slack.millis();
    // Keys sort by their hour directory: start listing at the first hour in range.
    let start_after = from.map(|f| {
        let first = f.saturating_sub(slack).saturating_sub(3_600_000);
        format!("{}{}", config.prefix, layout::hour_path(first.max(0)))
    });
    let mut pages = client
        .list_objects_v2()
        .bucket(&config.bucket)
        .prefix(&config.prefix)
        .set_start_after(start_after)
        .into_paginator()
        .send();
    let mut objects = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            anyhow::anyhow!(
                "listing s3://{}/{}: {}",
                config.bucket,
                config.prefix,
                error_text(&e)
            )
        })?;
        for o in page.contents() {
            let Some(key) = o.key() else { continue };
            if key.ends_with('/') {
                continue;
            }
            let info = layout::parse_key(&config.prefix, key);
            if !layout::hour_may_overlap(info.hour, from, to, slack) {
                continue;
            }
            objects.push(ObjectRef {
                key: key.to_owned(),
                size: o.size().unwrap_or(0).max(0) as u64,
                info,
            });
        }
    }
    objects.sort_by(|a, b| match (a.info.written, b.info.written) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.key.cmp(&b.key),
    });
    Ok(objects)
}

/// What an object's reader hands the source loop.
enum ObjectMsg {
    Batch(Vec<DecodedRecord>),
    Bad(DeadLetter),
}

/// Everything an object's reader needs besides the object.
#[derive(Clone)]
struct ReadSettings {
    client: aws_sdk_s3::Client,
    bucket: String,
    compression: Compression,
    format: ArchiveFormat,
    prefix: String,
    /// Partition of records without archived positions.
    group: Arc<str>,
    batch_size: usize,
    attempts: u32,
    progress: Arc<ArchiveProgress>,
    decoder: Arc<Decoder>,
}

impl S3Source {
    /// Reads every object in order. Ok(true) when all were read, Ok(false)
    /// when stopped by a shutdown.
    async fn read_all(&self, ctx: &SourceContext) -> anyhow::Result<bool> {
        let c = &self.config;
        let client = aws::s3::client(&c.client()).await?;
        let objects = list_objects(&client, c, self.from, self.to).await?;
        let total_bytes: u64 = objects.iter().map(|o| o.size).sum();
        self.progress
            .objects_total
            .store(objects.len() as u64, Ordering::Relaxed);
        self.progress
            .bytes_total
            .store(total_bytes, Ordering::Relaxed);
        self.progress.listed.store(true, Ordering::Relaxed);
        tracing::info!(
            objects = objects.len(),
            bytes = total_bytes,
            "replaying s3://{}/{}",
            c.bucket,
            c.prefix
        );
        let settings = ReadSettings {
            client,
            bucket: c.bucket.clone(),
            compression: c.compression,
            format: c.format,
            prefix: c.prefix.clone(),
            group: Arc::from(format!(
                "s3://{}/{}",
                c.bucket,
                c.prefix.trim_end_matches('/')
            )),
            batch_size: ctx.batch_size,
            attempts: c.max_attempts.max(1),
            progress: self.progress.clone(),
            decoder: self.decoder.clone(),
        };
        let mut pending = objects.into_iter();
        let mut ahead: VecDeque<InFlight> = VecDeque::new();
        let spawn = |o: ObjectRef| {
            let (tx, rx) = mpsc::channel(4);
            let handle = tokio::spawn(read_object(settings.clone(), o.clone(), tx));
            (o, rx, handle)
        };
        for o in pending.by_ref().take(c.concurrency) {
            ahead.push_back(spawn(o));
        }
        let mut dedup = Dedup::default();
        let mut shutdown = ctx.shutdown.clone();
        let abort_all = |ahead: &VecDeque<InFlight>| {
            for (_, _, h) in ahead {
                h.abort();
            }
        };
        while let Some((object, mut rx, handle)) = ahead.pop_front() {
            loop {
                if *shutdown.borrow() {
                    handle.abort();
                    abort_all(&ahead);
                    return Ok(false);
                }
                let msg = tokio::select! {
                    m = rx.recv() => m,
                    _ = shutdown.changed() => continue,
                };
                match msg {
                    Some(ObjectMsg::Batch(mut batch)) => {
                        let before = batch.len();
                        batch.retain(|r| dedup.first_time(r.position()));
                        let dropped = (before - batch.len()) as u64;
                        if dropped > 0 {
                            self.progress
                                .duplicates
                                .fetch_add(dropped, Ordering::Relaxed);
                        }
                        self.progress
                            .records
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        if !(batch.is_empty()
                            || ctx.output.send(SourceMessage::Decoded(batch)).await.is_ok())
                        {
                            abort_all(&ahead);
                            return Ok(false);
                        }
                    }
                    Some(ObjectMsg::Bad(dead)) => {
                        tracing::warn!(object = %dead.position.partition, at = %dead.position.sequence, reason = %dead.reason, "bad archive object: reported as a dead letter, going on");
                        self.progress.bad_objects.fetch_add(1, Ordering::Relaxed);
                        if ctx.output.send(SourceMessage::Bad(dead)).await.is_err() {
                            abort_all(&ahead);
                            return Ok(false);
                        }
                    }
                    None => break,
                }
            }
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    abort_all(&ahead);
                    return Err(e.context(format!("s3://{}/{}", c.bucket, object.key)));
                }
                Err(e) => {
                    abort_all(&ahead);
                    anyhow::bail!("reading s3://{}/{}: {e}", c.bucket, object.key);
                }
            }
            self.progress.objects_done.fetch_add(1, Ordering::Relaxed);
            if let Some(next) = pending.next() {
                ahead.push_back(spawn(next));
            }
        }
        Ok(true)
    }
}

/// Skips archive records already handed on: per partition, positions only
/// move forward (numeric sequences compared as numbers).
#[derive(Default)]
struct Dedup {
    last: HashMap<Arc<str>, (SmolStr, Option<u64>), foldhash::fast::RandomState>,
}

impl Dedup {
    fn first_time(&mut self, p: &Position) -> bool {
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !numeric(&p.sequence) {
            return true;
        }
        match self.last.get_mut(&p.partition) {
            Some((seq, sub)) => {
                // Numbers without leading zeros: longer is larger, else by digits.
                let newer = (p.sequence.len(), &*p.sequence, p.sub_sequence.unwrap_or(0))
                    > (seq.len(), &**seq, sub.unwrap_or(0));
                if !newer {
                    return false;
                }
                *seq = p.sequence.clone();
                *sub = p.sub_sequence;
                true
            }
            None => {
                self.last
                    .insert(p.partition.clone(), (p.sequence.clone(), p.sub_sequence));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_positions_moving_forward() {
        let mut d = Dedup::default();
        let p = |s: &str| Position::new("a".into(), s);
        assert!(d.first_time(&p("9")));
        assert!(d.first_time(&p("10")));
        assert!(!d.first_time(&p("9")));
        assert!(!d.first_time(&p("10")));
        assert!(d.first_time(&Position::new("b".into(), "1")));
        assert!(
            d.first_time(&p("file.json:1")),
            "non-numeric: never deduplicated"
        );
    }
}
