//! `[[sinks]] type = "stdout"`: NDJSON on standard output.
//!
//! Each batch is written with one `write` call and flushed at once, so a
//! person watching sees records as they are produced.

use std::io::Write as _;

use super::Sink;
use crate::flow::BoxFuture;
use crate::record::{LineWriter, Output};

/// The reader of standard output went away (`shardflow run | head`). The
/// run stops without committing what stdout did not take, so a next run
/// produces it again; `shardflow` exits 0, as a pipe's writer should.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader; stopping (outputs it did not take are produced again on the next run)")]
pub struct StdoutClosed;

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::anyhow!("writing to stdout: {e}")
    }
}

pub struct StdoutSink {
    buf: Vec<u8>,
    lines: LineWriter,
}

impl StdoutSink {
    pub fn new() -> Self {
        StdoutSink {
            buf: Vec::with_capacity(64 << 10),
            lines: LineWriter::default(),
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

    fn blocks(&self) -> bool {
        true
    }

    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.buf.clear();
            for o in outputs {
                self.lines.write(o, &mut self.buf);
            }
            let mut out = std::io::stdout().lock();
            out.write_all(&self.buf)
                .and_then(|_| out.flush())
                .map_err(stdout_error)
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move { std::io::stdout().lock().flush().map_err(stdout_error) })
    }
}
