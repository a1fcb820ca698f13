//! `[[sinks]] type = "stdout"`: NDJSON on standard output.
//!
//! Each batch is written with one `write` call and flushed at once, so a
//! person watching sees records as they are produced.

use std::io::Write as _;

use super::Sink;
use crate::record::Output;
use crate::source::BoxFuture;

pub struct StdoutSink {
    buf: Vec<u8>,
}

impl StdoutSink {
    pub fn new() -> Self {
        StdoutSink {
            buf: Vec::with_capacity(64 << 10),
        }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for StdoutSink {
    fn describe(&self) -> String {
        "stdout (NDJSON)".into()
    }

    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.buf.clear();
            for o in outputs {
                o.write_ndjson(&mut self.buf);
            }
            let mut out = std::io::stdout().lock();
            match out.write_all(&self.buf).and_then(|_| out.flush()) {
                Ok(()) => Ok(()),
                // A closed pipe (`shardflow run | head`) ends the run, not in a panic.
                Err(e) => Err(anyhow::anyhow!("writing to stdout: {e}")),
            }
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            std::io::stdout()
                .lock()
                .flush()
                .map_err(|e| anyhow::anyhow!("flushing stdout: {e}"))
        })
    }
}
