//! One object's reader: GetObject streamed into a blocking thread that
//! decompresses, splits and decodes it into batches for the source loop; a
//! download that breaks off is fetched again, skipping what was handed on.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::archived::{archived_event, Interner};
use super::objects::{self, Item, Layout, Splitter};
use super::{ObjectMsg, ObjectRef, ReadSettings};
use crate::aws::error_text;
use crate::config::ArchiveFormat;
use crate::record::{DeadLetter, Position, RawRecord};
use crate::source::DecodedRecord;
use crate::time::now_millis;

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
pub(super) async fn read_object(
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
    // The batch handed on, and a new one of the same room in its place: one
    // grown from empty again copied its records at every doubling.
    let full =
        |batch: &mut Vec<DecodedRecord>| std::mem::replace(batch, Vec::with_capacity(s.batch_size));
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
                if !batch.is_empty() && !send(ObjectMsg::Batch(full(&mut batch))) {
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
                if batch.len() >= s.batch_size && !send(ObjectMsg::Batch(full(&mut batch))) {
                    return done;
                }
            }
            Err(d) => {
                if !(batch.is_empty() || send(ObjectMsg::Batch(full(&mut batch)))) {
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
