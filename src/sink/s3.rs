//! `[[sinks]] type = "s3"`: the archive. Outputs become gzip-compressed
//! NDJSON objects under `prefix` + `YYYY/MM/DD/HH/` (Firehose's layout),
//! named by checkpoint (see `archive/layout.rs`), so that a restart
//! rewrites the same objects instead of adding copies.
//!
//! An object is compressed as outputs arrive and goes up in parts of
//! `part_bytes` (a multipart upload) once it outgrows one part, so memory
//! stays at about one part. It closes at `max_bytes`, or at the first
//! checkpoint barrier after `max_age`, or at the last barrier. Its hour is
//! the event time of its first record that has one (the wall clock when
//! it opened, for an object of dead letters only).
//!
//! Acknowledgement: a checkpoint is acknowledged only once every output
//! before its barrier is in a completed upload, so the sink holds the acks
//! of the checkpoints an open object spans (at most `max_open_checkpoints`,
//! after which it closes the object early) and the pipeline commits them
//! when the object is uploaded. A failed upload (after the SDK's retries)
//! fails the run without committing, and the restart writes the object again.

use std::io::Write as _;
use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use flate2::write::GzEncoder;

use super::{Sink, SinkContext};
use crate::archive::{self, layout};
use crate::aws::{self, error_text};
use crate::config::S3SinkConfig;
use crate::flow::BoxFuture;
use crate::record::{LineWriter, Output};
use crate::time::{now_millis, Millis};

struct Multipart {
    key: String,
    upload_id: String,
    parts: Vec<CompletedPart>,
    bytes: u64,
}

struct OpenObject {
    first_checkpoint: u64,
    seq: u32,
    opened: Instant,
    opened_wall: Millis,
    /// Event time of the first record that has one: the object's hour.
    time: Option<Millis>,
    encoder: GzEncoder<Vec<u8>>,
    upload: Option<Multipart>,
    records: u64,
}

impl OpenObject {
    fn compressed_bytes(&self) -> u64 {
        self.upload.as_ref().map_or(0, |u| u.bytes) + self.encoder.get_ref().len() as u64
    }
}

pub struct S3Sink {
    config: S3SinkConfig,
    ctx: SinkContext,
    client: Option<Client>,
    open: Option<OpenObject>,
    /// The newest barrier seen; an object opened now holds outputs of the next.
    last_barrier: u64,
    /// The newest barrier all of whose outputs are uploaded.
    durable: u64,
    /// (first checkpoint, seq) of the last object opened.
    last_name: Option<(u64, u32)>,
    line: Vec<u8>,
    lines: LineWriter,
    objects_written: metrics::Counter,
    bytes_written: metrics::Counter,
}

impl S3Sink {
    pub fn new(config: S3SinkConfig, ctx: SinkContext) -> Self {
        let label = format!("s3://{}/{}", config.bucket, config.prefix);
        let before = ctx.next_checkpoint.saturating_sub(1);
        S3Sink {
            objects_written: metrics::counter!("shardflow_s3_objects_total", "archive" => label.clone()),
            bytes_written: metrics::counter!("shardflow_s3_bytes_total", "archive" => label),
            config,
            ctx,
            client: None,
            open: None,
            last_barrier: before,
            durable: before,
            last_name: None,
            line: Vec::with_capacity(1024),
            lines: LineWriter::default(),
        }
    }

    async fn client(&mut self) -> anyhow::Result<Client> {
        if self.client.is_none() {
            self.client = Some(aws::s3::client(&self.config.client()).await?);
        }
        Ok(self.client.clone().expect("set above"))
    }

    fn open_object(&mut self) -> OpenObject {
        let first_checkpoint = self.last_barrier + 1;
        let seq = match self.last_name {
            Some((c, s)) if c == first_checkpoint => s + 1,
            _ => 0,
        };
        self.last_name = Some((first_checkpoint, seq));
        OpenObject {
            first_checkpoint,
            seq,
            opened: Instant::now(),
            opened_wall: now_millis(),
            time: None,
            encoder: GzEncoder::new(
                Vec::with_capacity(self.config.part_bytes as usize + (1 << 20)),
                flate2::Compression::new(self.config.gzip_level),
            ),
            upload: None,
            records: 0,
        }
    }

    fn key(&self, o: &OpenObject) -> String {
        format!(
            "{}{}{}",
            self.config.prefix,
            layout::hour_path(o.time.unwrap_or(o.opened_wall)),
            layout::object_name(self.ctx.epoch, o.first_checkpoint, o.seq)
        )
    }

    /// Uploads the compressed bytes so far as the next part.
    async fn upload_part(&mut self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let mut o = self.open.take().expect("an open object");
        let result = self.upload_part_of(&client, &mut o).await;
        self.open = Some(o);
        result
    }

    async fn upload_part_of(&self, client: &Client, o: &mut OpenObject) -> anyhow::Result<()> {
        let bucket = &self.config.bucket;
        if o.upload.is_none() {
            let key = self.key(o);
            let created = client
                .create_multipart_upload()
                .bucket(bucket)
                .key(&key)
                .content_type(archive::CONTENT_TYPE)
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "CreateMultipartUpload s3://{bucket}/{key}: {}",
                        error_text(&e)
                    )
                })?;
            let upload_id = created
                .upload_id()
                .ok_or_else(|| {
                    anyhow::anyhow!("CreateMultipartUpload s3://{bucket}/{key}: no upload id")
                })?
                .to_owned();
            o.upload = Some(Multipart {
                key,
                upload_id,
                parts: Vec::new(),
                bytes: 0,
            });
        }
        let body = std::mem::take(o.encoder.get_mut());
        let up = o.upload.as_mut().expect("created above");
        let number = up.parts.len() as i32 + 1;
        let len = body.len() as u64;
        let sent = client
            .upload_part()
            .bucket(bucket)
            .key(&up.key)
            .upload_id(&up.upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await;
        match sent {
            Ok(out) => {
                up.parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_owned))
                        .build(),
                );
                up.bytes += len;
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "UploadPart {number} of s3://{bucket}/{}: {}",
                    up.key,
                    error_text(&e)
                );
                abort(client, bucket, up).await;
                o.upload = None;
                anyhow::bail!(msg)
            }
        }
    }

    /// Finishes the open object and uploads it; afterwards everything up to
    /// the newest barrier is durable.
    async fn close(&mut self) -> anyhow::Result<()> {
        let Some(mut o) = self.open.take() else {
            self.durable = self.last_barrier;
            return Ok(());
        };
        let client = self.client().await?;
        let bucket = self.config.bucket.clone();
        let started = Instant::now();
        let total;
        let key;
        if o.upload.is_some() {
            // The gzip trailer goes into the last part.
            let rest = std::mem::replace(
                &mut o.encoder,
                GzEncoder::new(Vec::new(), flate2::Compression::none()),
            )
            .finish()?;
            *o.encoder.get_mut() = rest;
            self.upload_part_of(&client, &mut o).await?;
            let up = o.upload.take().expect("multipart upload");
            let done = client
                .complete_multipart_upload()
                .bucket(&bucket)
                .key(&up.key)
                .upload_id(&up.upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(up.parts.clone()))
                        .build(),
                )
                .send()
                .await;
            if let Err(e) = done {
                let msg = format!(
                    "CompleteMultipartUpload s3://{bucket}/{}: {}",
                    up.key,
                    error_text(&e)
                );
                abort(&client, &bucket, &up).await;
                anyhow::bail!(msg);
            }
            total = up.bytes;
            key = up.key;
        } else {
            key = self.key(&o);
            let body = o.encoder.finish()?;
            total = body.len() as u64;
            client
                .put_object()
                .bucket(&bucket)
                .key(&key)
                .content_type(archive::CONTENT_TYPE)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!("PutObject s3://{bucket}/{key}: {}", error_text(&e))
                })?;
        }
        self.objects_written.increment(1);
        self.bytes_written.increment(total);
        tracing::debug!(key, records = o.records, bytes = total, took = ?started.elapsed(), "archive object uploaded");
        self.durable = self.last_barrier;
        Ok(())
    }
}

/// Best effort: a failed multipart upload should not leave parts billed.
async fn abort(client: &Client, bucket: &str, up: &Multipart) {
    if let Err(e) = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(&up.key)
        .upload_id(&up.upload_id)
        .send()
        .await
    {
        tracing::warn!(key = %up.key, error = %error_text(&e), "could not abort the multipart upload (a bucket lifecycle rule can clean it up)");
    }
}

impl Sink for S3Sink {
    fn describe(&self) -> String {
        format!(
            "s3://{}/{}YYYY/MM/DD/HH/ (gzip NDJSON, objects up to {} bytes or {})",
            self.config.bucket, self.config.prefix, self.config.max_bytes, self.config.max_age
        )
    }

    fn blocks(&self) -> bool {
        true
    }

    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for out in outputs {
                if self.open.is_none() {
                    self.open = Some(self.open_object());
                }
                let o = self.open.as_mut().expect("opened above");
                self.line.clear();
                self.lines.write(out, &mut self.line);
                o.encoder.write_all(&self.line)?;
                o.records += 1;
                if o.time.is_none() {
                    o.time = out.time();
                }
                if o.compressed_bytes() >= self.config.max_bytes {
                    self.close().await?;
                } else if o.encoder.get_ref().len() as u64 >= self.config.part_bytes {
                    self.upload_part().await?;
                }
            }
            Ok(())
        })
    }

    /// Uploads whatever is open (shutdown, or a sink used without barriers).
    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { self.close().await })
    }

    fn checkpoint(&mut self, id: u64, last: bool) -> BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(async move {
            self.last_barrier = id;
            let Some(o) = &self.open else {
                self.durable = id;
                return Ok(id);
            };
            let spans = (id + 1).saturating_sub(o.first_checkpoint) as usize;
            if last
                || o.opened.elapsed() >= self.config.max_age.std()
                || o.compressed_bytes() >= self.config.max_bytes
                || spans >= self.ctx.max_open_checkpoints
            {
                self.close().await?;
            }
            Ok(self.durable)
        })
    }
}
