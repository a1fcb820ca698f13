//! `[source] type = "file"`: NDJSON files, one partition per file.
//!
//! Arrival order is file order. Several files are read round-robin, one batch
//! at a time, so that a run is deterministic and no file races ahead of the
//! others in event time. A record's sequence is its 1-based line number; its
//! resume offset is the byte offset after the line, where a restart seeks to.

use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use smol_str::SmolStr;
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};

use super::{Source, SourceContext};
use crate::config::FileSourceConfig;
use crate::decode::scan::bytes_equal;
use crate::flow::BoxFuture;
use crate::record::{PartitionStatus, Position, RawRecord};
use crate::time::now_millis;

/// Records of a batch share chunks of this size (a longer line gets one of its own).
const CHUNK_BYTES: usize = 64 << 10;

pub struct FileSource {
    config: FileSourceConfig,
}

impl FileSource {
    pub fn new(config: FileSourceConfig) -> Self {
        FileSource { config }
    }
}

struct PartitionReader {
    partition: Arc<str>,
    reader: BufReader<File>,
    /// Bytes of complete lines consumed so far.
    offset: u64,
    line: u64,
    /// Bytes of a last line still missing its newline (follow mode).
    partial: Vec<u8>,
    at_end: bool,
}

impl PartitionReader {
    async fn open(path: &PathBuf, ctx: &SourceContext) -> anyhow::Result<Self> {
        let partition: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
        let mut file = File::open(path)
            .await
            .with_context(|| format!("cannot open source file {}", path.display()))?;
        let (mut offset, mut line) = (0, 0);
        if let Some(pos) = ctx.resume_position(&partition) {
            let len = file.metadata().await?.len();
            let resume = pos.resume_offset.map_or(0, NonZeroU64::get);
            match pos.sequence.parse::<u64>() {
                Ok(n) if resume <= len => {
                    offset = resume;
                    line = n;
                    file.seek(std::io::SeekFrom::Start(offset)).await?;
                    tracing::info!(partition = %partition, line, offset, "resuming file after the last checkpoint");
                }
                _ => tracing::warn!(
                    partition = %partition,
                    checkpoint_offset = resume,
                    file_len = len,
                    "file is shorter than the checkpoint says (replaced or truncated?); reading it from the start"
                ),
            }
        }
        Ok(PartitionReader {
            partition,
            reader: BufReader::with_capacity(1 << 20, file),
            offset,
            line,
            partial: Vec::new(),
            at_end: false,
        })
    }

    /// Reads up to `max` records. At end of file a last line without a
    /// newline is taken only when `accept_unterminated` (the file is final).
    ///
    /// Lines are found in the reader's own buffer and copied once, into the
    /// batch's chunk; only a line the buffer holds part of (its end not yet
    /// read, or a file's unterminated tail) goes through `partial` first.
    async fn read_batch(
        &mut self,
        max: usize,
        accept_unterminated: bool,
    ) -> anyhow::Result<Vec<RawRecord>> {
        let mut batch = Vec::with_capacity(max.min(1024));
        let arrival = now_millis();
        // The records' bytes are slices of shared chunks, not one
        // allocation (and its regrowth) per line; the lengths of those in
        // `chunk` that have no slice of it yet.
        let mut chunk = BytesMut::new();
        let mut unsliced = Vec::with_capacity(max.min(1024));
        while batch.len() < max {
            let buf = self
                .reader
                .fill_buf()
                .await
                .with_context(|| format!("reading {}", self.partition))?;
            // The line and how much of `buf` it took.
            let (line, used): (&[u8], usize) = if buf.is_empty() {
                self.at_end = true;
                if !accept_unterminated || self.partial.is_empty() {
                    break;
                }
                (&self.partial, 0)
            } else if let Some(i) = newline(buf) {
                if self.partial.is_empty() {
                    (&buf[..=i], i + 1)
                } else {
                    self.partial.extend_from_slice(&buf[..=i]);
                    (&self.partial, i + 1)
                }
            } else {
                // A line whose end is not in the buffer yet.
                self.partial.extend_from_slice(buf);
                let n = buf.len();
                self.reader.consume(n);
                continue;
            };
            self.offset += line.len() as u64;
            self.line += 1;
            let mut text = line;
            while let [rest @ .., b'\n' | b'\r'] = text {
                text = rest;
            }
            if !text.iter().all(u8::is_ascii_whitespace) {
                if chunk.capacity() - chunk.len() < text.len() {
                    hand_out(&mut chunk, &mut batch, &mut unsliced);
                    chunk = BytesMut::with_capacity(CHUNK_BYTES.max(text.len()));
                }
                chunk.extend_from_slice(text);
                unsliced.push(text.len());
                // Inline in the position: no allocation for a line number.
                let mut digits = itoa::Buffer::new();
                let sequence = SmolStr::new_inline(digits.format(self.line));
                let mut position = Position::new(self.partition.clone(), sequence);
                position.resume_offset = NonZeroU64::new(self.offset);
                batch.push(RawRecord {
                    position,
                    arrival,
                    bytes: Bytes::new(),
                    replay_watermark: None,
                });
            }
            self.reader.consume(used);
            self.partial.clear();
            if self.at_end {
                break;
            }
        }
        hand_out(&mut chunk, &mut batch, &mut unsliced);
        Ok(batch)
    }
}

/// Gives the last `lens.len()` records of `batch` their bytes: consecutive
/// slices of what `chunk` holds, frozen once, so that each record takes a
/// count of the chunk rather than a split of it (which cost more than
/// copying its line).
fn hand_out(chunk: &mut BytesMut, batch: &mut [RawRecord], lens: &mut Vec<usize>) {
    if lens.is_empty() {
        return;
    }
    let frozen = chunk.split().freeze();
    let first = batch.len() - lens.len();
    let mut at = 0;
    for (record, &n) in batch[first..].iter_mut().zip(lens.iter()) {
        record.bytes = frozen.slice(at..at + n);
        at += n;
    }
    lens.clear();
}

/// Where the first newline of `buf` is, eight bytes at a time. Lines are
/// short (tens of bytes), and a general search's setup cost more than this
/// loop over them.
fn newline(buf: &[u8]) -> Option<usize> {
    let mut words = buf.chunks_exact(8);
    for (i, word) in (&mut words).enumerate() {
        let hit = bytes_equal(u64::from_le_bytes(word.try_into().expect("8 bytes")), b'\n');
        if hit != 0 {
            return Some(i * 8 + (hit.trailing_zeros() / 8) as usize);
        }
    }
    let tail = buf.len() - words.remainder().len();
    words
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| tail + p)
}

impl Source for FileSource {
    fn describe(&self) -> String {
        let paths: Vec<_> = self
            .config
            .all_paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "file {} ({}one partition per file)",
            paths.join(", "),
            if self.config.follow { "followed, " } else { "" }
        )
    }

    fn run(self: Box<Self>, mut ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move {
            let mut readers = Vec::new();
            for path in self.config.all_paths() {
                readers.push(PartitionReader::open(&path, &ctx).await?);
            }
            // Every file holds the watermark before its first record, and
            // stops holding it once read to its end.
            let names: Vec<_> = readers.iter().map(|r| r.partition.clone()).collect();
            for status in [PartitionStatus::Known, PartitionStatus::Reading] {
                if !ctx.partitions(names.clone(), status).await {
                    return Ok(());
                }
            }
            let follow = self.config.follow;
            loop {
                if ctx.is_shutting_down() {
                    ctx.end(false).await;
                    return Ok(());
                }
                let mut progressed = false;
                for r in readers.iter_mut() {
                    if r.at_end && !follow {
                        continue;
                    }
                    r.at_end = false;
                    let batch = r.read_batch(ctx.batch_size, !follow).await?;
                    progressed |= !batch.is_empty();
                    if !ctx.send(batch).await {
                        return Ok(());
                    }
                    if r.at_end
                        && !follow
                        && !ctx
                            .partitions(vec![r.partition.clone()], PartitionStatus::Finished)
                            .await
                    {
                        return Ok(());
                    }
                }
                if !follow && readers.iter().all(|r| r.at_end) {
                    ctx.end(true).await;
                    return Ok(());
                }
                if follow && !progressed {
                    tokio::select! {
                        _ = tokio::time::sleep(self.config.poll_interval.std()) => {}
                        _ = ctx.shutdown.changed() => {}
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::newline;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// Against a byte-by-byte search, over bytes drawn mostly near the
        /// newline's value (a borrow across bytes is where a word test
        /// goes wrong) and high bytes.
        #[test]
        fn the_first_newline_is_the_one_a_byte_search_finds(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![0u8..=12, 0x80u8..=0x8c, proptest::num::u8::ANY],
                0..40,
            ),
        ) {
            proptest::prop_assert_eq!(newline(&bytes), bytes.iter().position(|&b| b == b'\n'));
        }
    }
}
