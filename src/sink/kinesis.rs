//! `[[sinks]] type = "kinesis"`: each output becomes one Kinesis record (its
//! NDJSON line, newline included, so that a consumer concatenating records
//! gets NDJSON), partitioned by the output's key (its id when it has none:
//! dead letters).
//!
//! With `payload = "original"` a `raw` output is sent as the input record's
//! own bytes, partitioned by its decoded entity key: a stateless shardflow
//! so configured re-keys a stream whose producers partition otherwise
//! (README: "Partition key = entity key").
//!
//! Records are sent with PutRecords in batches of at most 500 records and
//! 5 MiB. A full batch is sent as soon as it fills (memory stays bounded);
//! `flush`, called at every checkpoint barrier, sends the rest and returns
//! only when **every** record written so far was accepted. PutRecords can
//! fail partially: only the entries that failed (throttled, internal errors)
//! are sent again, with jittered exponential backoff, in their original
//! order. After `max_attempts` a flush fails, so the checkpoint is not
//! committed and a restart produces those outputs again (same ids).

use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;

use super::Sink;
use crate::aws::{self, error_text, Backoff, ClientSettings};
use crate::config::{KinesisPayload, KinesisSinkConfig};
use crate::flow::BoxFuture;
use crate::record::{LineWriter, Output};

const MAX_RECORDS: usize = 500;
const MAX_REQUEST_BYTES: usize = 5 << 20;
const MAX_RECORD_BYTES: usize = 1 << 20;
const MAX_KEY_CHARS: usize = 256;

struct Entry {
    key: String,
    data: Vec<u8>,
}

impl Entry {
    fn size(&self) -> usize {
        self.key.len() + self.data.len()
    }
}

pub struct KinesisSink {
    config: KinesisSinkConfig,
    /// Built at the first write: building needs the async AWS chain.
    client: Option<Client>,
    pending: Vec<Entry>,
    pending_bytes: usize,
    lines: LineWriter,
}

impl KinesisSink {
    pub fn new(config: KinesisSinkConfig) -> Self {
        KinesisSink {
            config,
            client: None,
            pending: Vec::new(),
            pending_bytes: 0,
            lines: LineWriter::default(),
        }
    }

    async fn client(&mut self) -> anyhow::Result<Client> {
        if self.client.is_none() {
            self.client = Some(
                aws::kinesis::client(&ClientSettings {
                    region: self.config.region.clone(),
                    endpoint_url: self.config.endpoint_url.clone(),
                    extra_root_pem: None,
                    max_attempts: None,
                })
                .await?,
            );
        }
        Ok(self.client.clone().expect("set above"))
    }

    /// Sends the oldest full-or-not batch of pending records until accepted.
    async fn send_one_batch(&mut self) -> anyhow::Result<()> {
        let (mut n, mut bytes) = (0, 0);
        for e in &self.pending {
            if n == MAX_RECORDS || bytes + e.size() > MAX_REQUEST_BYTES {
                break;
            }
            n += 1;
            bytes += e.size();
        }
        let batch: Vec<Entry> = self.pending.drain(..n).collect();
        self.pending_bytes -= bytes;
        let client = self.client().await?;
        put_all(
            &client,
            &self.config.stream_name,
            batch,
            self.config.max_attempts,
        )
        .await
    }

    fn batch_is_full(&self) -> bool {
        self.pending.len() >= MAX_RECORDS || self.pending_bytes >= MAX_REQUEST_BYTES
    }
}

/// PutRecords until every entry was accepted, resending only failed ones.
async fn put_all(
    client: &Client,
    stream: &str,
    mut entries: Vec<Entry>,
    max_attempts: u32,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut attempt = 0;
    while !entries.is_empty() {
        attempt += 1;
        let request = entries.iter().map(|e| {
            PutRecordsRequestEntry::builder()
                .partition_key(&e.key)
                .data(Blob::new(e.data.clone()))
                .build()
                .expect("partition key and data are set")
        });
        let result = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(request.collect()))
            .send()
            .await;
        let problem = match result {
            Ok(out) if out.failed_record_count.unwrap_or(0) == 0 => return Ok(()),
            Ok(out) => {
                let mut first_error = None;
                let mut i = 0;
                entries.retain(|_| {
                    let r = out.records.get(i);
                    i += 1;
                    let failed = r.is_none_or(|r| r.error_code.is_some());
                    if failed && first_error.is_none() {
                        first_error = r.and_then(|r| r.error_code.clone());
                    }
                    failed
                });
                format!(
                    "{} of {} records failed ({})",
                    entries.len(),
                    i,
                    first_error.unwrap_or_default()
                )
            }
            Err(e) => error_text(&e),
        };
        if attempt >= max_attempts {
            anyhow::bail!(
                "PutRecords to {stream}: {} records still not accepted after {attempt} attempts: {problem}",
                entries.len()
            );
        }
        let delay = backoff.next_delay();
        tracing::warn!(stream, attempt, retry_in = ?delay, %problem, "PutRecords incomplete; resending the failed records");
        metrics::counter!("shardflow_kinesis_sink_retries_total", "stream" => stream.to_owned())
            .increment(1);
        tokio::time::sleep(delay).await;
    }
    Ok(())
}

/// A partition key of at most 256 characters (Kinesis' limit).
fn partition_key(o: &Output) -> String {
    let key = match o.key() {
        Some(k) if !k.is_empty() => k.to_owned(),
        _ => o.id(),
    };
    match key.char_indices().nth(MAX_KEY_CHARS) {
        Some((cut, _)) => key[..cut].to_owned(),
        None => key,
    }
}

impl Sink for KinesisSink {
    fn describe(&self) -> String {
        format!("kinesis stream {} (PutRecords)", self.config.stream_name)
    }

    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for o in outputs {
                let data = match (self.config.payload, o) {
                    (KinesisPayload::Original, Output::Raw(r)) => r.data.to_vec(),
                    _ => {
                        let mut data = Vec::with_capacity(256);
                        self.lines.write(o, &mut data);
                        data
                    }
                };
                let entry = Entry {
                    key: partition_key(o),
                    data,
                };
                if entry.size() > MAX_RECORD_BYTES {
                    anyhow::bail!(
                        "output {} is {} bytes, over Kinesis' 1 MiB record limit",
                        o.id(),
                        entry.size()
                    );
                }
                self.pending_bytes += entry.size();
                self.pending.push(entry);
                while self.batch_is_full() {
                    self.send_one_batch().await?;
                }
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            while !self.pending.is_empty() {
                self.send_one_batch().await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::DeadLetter;

    #[test]
    fn partition_keys_are_bounded() {
        let o = Output::DeadLetter(Box::new(DeadLetter {
            reason: "x".into(),
            position: crate::record::Position::new("p".into(), "1"),
            raw: bytes::Bytes::new(),
        }));
        assert_eq!(partition_key(&o), "p/1");
    }
}
