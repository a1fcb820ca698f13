//! `[source] type = "s3"` (usually `[replay.source]`): records archived in
//! S3, by shardflow's own archive sink or by Kinesis Data Firehose, read
//! back through the same pipeline by `shardflow replay`.
//!
//! - `objects.rs`: gzip detection, NDJSON / concatenated JSON splitting.
//! - this file: listing, bounded concurrent fetching, decoding in order.
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

pub mod objects;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::objects::{Item, Layout, Splitter};
use super::{DecodedRecord, Source, SourceContext, SourceMessage};
use crate::archive::layout::{self, KeyInfo};
use crate::aws::{self, error_text};
use crate::config::{ArchiveFormat, Compression, S3SourceConfig, SchemaConfig};
use crate::decode::Decoder;
use crate::flow::BoxFuture;
use crate::record::{DeadLetter, Position, RawRecord};
use crate::time::{now_millis, Millis};

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
    last: HashMap<Arc<str>, (Arc<str>, Option<u64>), foldhash::fast::RandomState>,
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

/// A failed download, told apart from a decompression error by the reader.
#[derive(Debug)]
struct DownloadError(String);

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for DownloadError {}

/// A blocking `Read` over the chunks an async task downloads.
struct ChunkReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    current: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(io::Error::other(DownloadError(e))),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

/// How an attempt at decoding an object ended.
struct Decoded {
    /// Items (records and bad reports) handed on, counting skipped ones.
    items: u64,
    /// The download broke: retry from the start, skipping `items`.
    download_failed: Option<String>,
}

/// Downloads and decodes one object, retrying a broken download.
async fn read_object(
    s: ReadSettings,
    object: ObjectRef,
    out: mpsc::Sender<ObjectMsg>,
) -> anyhow::Result<()> {
    let mut skip = 0u64;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let response = s
            .client
            .get_object()
            .bucket(&s.bucket)
            .key(&object.key)
            .send()
            .await;
        let mut body = match response {
            Ok(r) => r.body,
            Err(e) => {
                if e.as_service_error().is_some_and(|e| e.is_no_such_key()) {
                    // Deleted since the listing: say so, and go on.
                    let _ = out
                        .send(ObjectMsg::Bad(bad(
                            &s.bucket,
                            &object.key,
                            0,
                            "the object was listed but no longer exists".into(),
                            Bytes::new(),
                        )))
                        .await;
                    return Ok(());
                }
                anyhow::bail!("GetObject: {}", error_text(&e));
            }
        };
        let (chunk_tx, chunk_rx) = mpsc::channel::<Result<Bytes, String>>(8);
        let reader = ChunkReader {
            rx: chunk_rx,
            current: Bytes::new(),
        };
        let decode = {
            let (s, object, out) = (s.clone(), object.clone(), out.clone());
            tokio::task::spawn_blocking(move || decode_object(reader, &s, &object, skip, &out))
        };
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => {
                    s.progress
                        .bytes_done
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if chunk_tx.send(Ok(chunk)).await.is_err() {
                        break; // the decoder stopped (bad data, or shutdown)
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = chunk_tx.send(Err(e.to_string())).await;
                    break;
                }
            }
        }
        drop(chunk_tx);
        let decoded = decode.await.context("decoder thread panicked")?;
        match decoded.download_failed {
            None => return Ok(()),
            Some(e) if attempt < s.attempts => {
                tracing::warn!(object = %object.key, attempt, error = %e, "download broke off; fetching the object again");
                skip = decoded.items;
                tokio::time::sleep(std::time::Duration::from_millis(200 << attempt.min(6))).await;
            }
            Some(e) => anyhow::bail!("download failed {attempt} times, last: {e}"),
        }
    }
}

fn bad(bucket: &str, key: &str, offset: u64, reason: String, raw: Bytes) -> DeadLetter {
    DeadLetter {
        reason: format!("s3://{bucket}/{key} at byte {offset} (decompressed): {reason}"),
        position: Position::new(
            Arc::from(format!("s3://{bucket}/{key}")),
            format!("@{offset}"),
        ),
        raw,
    }
}

/// One line of shardflow's archive (only `raw` lines are input records).
#[derive(Deserialize)]
struct ArchiveLine<'a> {
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    partition: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    sequence: Option<Cow<'a, str>>,
    #[serde(default)]
    sub_sequence: Option<u64>,
    #[serde(default)]
    watermark: Option<Millis>,
    #[serde(borrow, default)]
    data: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    data_base64: Option<Cow<'a, str>>,
}

/// Partition names, shared between records. An object holds a few
/// partitions, looked up once per line, hence the fast hasher.
#[derive(Default)]
pub struct Interner(HashMap<Box<str>, Arc<str>, foldhash::fast::RandomState>);

impl Interner {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.0.get(name) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(name);
        self.0.insert(name.into(), a.clone());
        a
    }
}

/// A `raw` archive line, decoded with the pipeline's schema, as the live
/// run decoded the record it archives; `None` for lines of other kinds, and
/// `Err` for a line that is not an archive line at all.
///
/// The record inside (`data`, JSON embedded as is) is decoded straight from
/// the line, so its bytes are read once more, not copied or re-validated
/// first.
pub fn archived_event(
    line: &[u8],
    interner: &mut Interner,
    arrival: Millis,
    decoder: &Decoder,
) -> Result<Option<DecodedRecord>, String> {
    // One check of the whole line: serde would check each string apart.
    let line = std::str::from_utf8(line).map_err(|e| {
        format!(
            "not an archive line: invalid UTF-8 at byte {}",
            e.valid_up_to()
        )
    })?;
    let l: ArchiveLine<'_> =
        serde_json::from_str(line).map_err(|e| format!("not an archive line: {e}"))?;
    if l.kind != "raw" {
        return Ok(None);
    }
    let (Some(partition), Some(sequence)) = (l.partition, l.sequence) else {
        return Err("raw line without partition and sequence".into());
    };
    let mut position = Position::new(interner.get(&partition), sequence.as_ref());
    position.sub_sequence = l.sub_sequence;
    let event = match (l.data, l.data_base64) {
        (Some(d), None) => decoder.decode_str(position, arrival, d.get()),
        (None, Some(b)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| format!("data_base64: {e}"))?;
            decoder.decode(RawRecord {
                position,
                arrival,
                bytes: Bytes::from(bytes),
                replay_watermark: None,
            })
        }
        _ => return Err("raw line needs exactly one of data and data_base64".into()),
    };
    Ok(Some(DecodedRecord {
        replay_watermark: l.watermark,
        event,
    }))
}

/// Decodes one object (blocking thread), handing records on in batches.
fn decode_object(
    reader: ChunkReader,
    s: &ReadSettings,
    object: &ObjectRef,
    skip: u64,
    out: &mpsc::Sender<ObjectMsg>,
) -> Decoded {
    let shardflow = object.info.written.is_some();
    let layout = match (s.format, shardflow) {
        (ArchiveFormat::Ndjson, _) | (ArchiveFormat::Auto, true) => Layout::Lines,
        (ArchiveFormat::Auto, false) => Layout::Concatenated,
    };
    let mut done = Decoded {
        items: 0,
        download_failed: None,
    };
    let key = &object.key;
    let send = |msg: ObjectMsg| out.blocking_send(msg).is_ok();
    let read_error = |e: io::Error, offset: u64, done: &mut Decoded| -> Option<DeadLetter> {
        if let Some(d) = e.get_ref().and_then(|i| i.downcast_ref::<DownloadError>()) {
            done.download_failed = Some(d.0.clone());
            return None;
        }
        let what = if e.kind() == io::ErrorKind::UnexpectedEof {
            "the compressed stream ends early (truncated object)".to_string()
        } else {
            format!("corrupt compressed data: {e}")
        };
        Some(bad(&s.bucket, key, offset, what, Bytes::new()))
    };
    let input = match objects::decompressed(reader, s.compression) {
        Ok(r) => r,
        Err(e) => {
            if let Some(d) = read_error(e, 0, &mut done) {
                send(ObjectMsg::Bad(d));
            }
            return done;
        }
    };
    let mut splitter = Splitter::new(input, layout);
    let mut interner = Interner::default();
    let arrival = now_millis();
    let mut batch = Vec::with_capacity(s.batch_size);
    let mut index = 0u64;
    let mut other_lines = 0u64;
    loop {
        let item = match splitter.next_item() {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(e) => {
                let offset = splitter.offset();
                let dead = read_error(e, offset, &mut done);
                // What was decoded before the failure goes on (a retry skips it).
                if !batch.is_empty() && !send(ObjectMsg::Batch(std::mem::take(&mut batch))) {
                    return done;
                }
                if let Some(d) = dead {
                    done.items += 1;
                    if done.items > skip {
                        send(ObjectMsg::Bad(d));
                    }
                }
                break;
            }
        };
        index += 1;
        let msg = match item {
            Item::Record(offset, bytes) => {
                if shardflow {
                    match archived_event(bytes, &mut interner, arrival, &s.decoder) {
                        Ok(Some(r)) => Ok(r),
                        Ok(None) => {
                            other_lines += 1;
                            continue;
                        }
                        Err(reason) => Err(bad(&s.bucket, key, offset, reason, Bytes::copy_from_slice(bytes))),
                    }
                } else {
                    let name = key.strip_prefix(&s.prefix).unwrap_or(key).trim_start_matches('/');
                    Ok(DecodedRecord {
                        replay_watermark: None,
                        event: s.decoder.decode(RawRecord {
                            position: Position::new(s.group.clone(), format!("{name}:{index}")),
                            arrival,
                            bytes: Bytes::copy_from_slice(bytes),
                            replay_watermark: None,
                        }),
                    })
                }
            }
            Item::Truncated(offset, bytes) => Err(bad(
                &s.bucket,
                key,
                offset,
                "truncated JSON: the object ends inside this record".into(),
                Bytes::copy_from_slice(bytes),
            )),
            Item::TooLong(offset) => Err(bad(
                &s.bucket,
                key,
                offset,
                format!(
                    "a record longer than {} bytes (or unbalanced JSON); the rest of the object is skipped",
                    objects::MAX_RECORD_BYTES
                ),
                Bytes::new(),
            )),
        };
        done.items += 1;
        if done.items <= skip {
            continue;
        }
        match msg {
            Ok(r) => {
                batch.push(r);
                if batch.len() >= s.batch_size
                    && !send(ObjectMsg::Batch(std::mem::take(&mut batch)))
                {
                    return done;
                }
            }
            Err(d) => {
                if !(batch.is_empty() || send(ObjectMsg::Batch(std::mem::take(&mut batch)))) {
                    return done;
                }
                if !send(ObjectMsg::Bad(d)) {
                    return done;
                }
            }
        }
    }
    if !batch.is_empty() {
        send(ObjectMsg::Batch(batch));
    }
    if other_lines > 0 {
        s.progress
            .other_lines
            .fetch_add(other_lines, Ordering::Relaxed);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lines_give_back_the_live_record() {
        let schema: SchemaConfig = toml::from_str(
            r#"
key = "u"
timestamp = "t"
"#,
        )
        .unwrap();
        let decoder = Decoder::new(&schema);
        let mut interner = Interner::default();
        let decode =
            |line: &[u8], interner: &mut Interner| archived_event(line, interner, 0, &decoder);
        let line = br#"{"kind":"raw","id":"p/7:1","partition":"p","sequence":"7","sub_sequence":1,"event_time":5,"watermark":-9,"data":{"u":"a b","t":1700000000000}}"#;
        let r = decode(line, &mut interner).unwrap().unwrap();
        assert_eq!(r.replay_watermark, Some(-9));
        let e = r.event.unwrap();
        assert_eq!(e.position.to_string(), "p/7:1");
        assert_eq!(&e.raw[..], br#"{"u":"a b","t":1700000000000}"#);
        assert_eq!((&*e.key, e.event_time), ("a b", 1_700_000_000_000));
        let b64 =
            br#"{"kind":"raw","partition":"p","sequence":"8","watermark":0,"data_base64":"IHt9"}"#;
        let r = decode(b64, &mut interner).unwrap().unwrap();
        let dead = r.event.unwrap_err();
        assert_eq!(&dead.raw[..], b" {}");
        assert_eq!(dead.reason, "missing field u");
        assert_eq!(dead.position.to_string(), "p/8");
        assert!(decode(br#"{"kind":"window","id":"x"}"#, &mut interner)
            .unwrap()
            .is_none());
        assert!(decode(br#"{"kind":"raw","partition":"p"#, &mut interner).is_err());
        // A record that is not an object is the record's problem, not the line's.
        let r = decode(
            br#"{"kind":"raw","partition":"p","sequence":"9","data":[1]}"#,
            &mut interner,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            r.event.unwrap_err().reason,
            "record is a JSON array, expected an object"
        );
    }

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
