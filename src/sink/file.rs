//! `[[sinks]] type = "file"`: NDJSON appended to a file, made durable at
//! each checkpoint, optionally rotated by size.
//!
//! Rotation renames nothing: the sink writes `path`, then `path.1`,
//! `path.2`, ... so a reader tailing one file never sees it move. On start
//! the sink appends to the highest-numbered existing file.
//!
//! A process killed between checkpoints (SIGKILL, power loss) can leave the
//! file ending in half a line: the write buffer is flushed whenever it fills,
//! not at line boundaries. Every checkpoint flushes whole lines, so such a
//! torn tail was written after the last checkpoint and the restarted run
//! produces that record again; on open the sink cuts the tail back to the
//! last complete line, so appending never glues a new line onto a broken one.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::Sink;
use crate::config::FileSinkConfig;
use crate::flow::BoxFuture;
use crate::record::{LineWriter, Output};

/// Bytes gathered before a `write` to the file.
const BUFFER: usize = 256 << 10;

pub struct FileSink {
    config: FileSinkConfig,
    file: File,
    /// Lines not yet written to `file`, formatted in place (no copy of
    /// each line into a writer's buffer): written out when `BUFFER` is
    /// reached, at rotation and at a flush.
    buf: Vec<u8>,
    lines: LineWriter,
    /// Index of the file being written: 0 is `path` itself.
    index: u32,
    /// Bytes of the current file, those still in `buf` included.
    bytes_in_file: u64,
}

fn numbered(path: &Path, index: u32) -> PathBuf {
    if index == 0 {
        return path.to_owned();
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening output file {}", path.display()))
}

/// Truncates `path` after its last newline if it ends in a partial line (see
/// the module doc) and returns the resulting length.
fn cut_torn_tail(path: &Path) -> anyhow::Result<u64> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening output file {}", path.display()))?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Scan backwards in blocks for the last newline.
    let mut end = len;
    let mut block = vec![0u8; 64 << 10];
    let keep = loop {
        let start = end.saturating_sub(block.len() as u64);
        let buf = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(buf)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            break start + i as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    if keep < len {
        tracing::warn!(
            file = %path.display(),
            dropped_bytes = len - keep,
            "output file ends in a partial line (the previous run was killed); cutting it back to the last complete line"
        );
        file.set_len(keep)
            .and_then(|_| file.sync_data())
            .with_context(|| format!("truncating the partial last line of {}", path.display()))?;
    }
    Ok(keep)
}

impl FileSink {
    pub fn open(config: FileSinkConfig) -> anyhow::Result<Self> {
        let mut index = 0;
        if config.rotate_bytes.is_some() {
            while numbered(&config.path, index + 1).exists() {
                index += 1;
            }
        }
        let path = numbered(&config.path, index);
        let file = open_append(&path)?;
        let bytes_in_file = cut_torn_tail(&path)?;
        Ok(FileSink {
            config,
            file,
            buf: Vec::with_capacity(BUFFER + 4096),
            lines: LineWriter::default(),
            index,
            bytes_in_file,
        })
    }

    /// Writes the first `upto` bytes of the buffer to the file. They leave
    /// the buffer even when the write fails, so that nothing writes them a
    /// second time after a part went out (the error stops the pipeline; the
    /// restart cuts a torn tail and produces the lines again).
    fn write_out(&mut self, upto: usize) -> anyhow::Result<()> {
        let written = self.file.write_all(&self.buf[..upto]);
        self.buf.drain(..upto);
        written.with_context(|| {
            format!(
                "writing {}",
                numbered(&self.config.path, self.index).display()
            )
        })
    }

    fn rotate(&mut self) -> anyhow::Result<()> {
        self.file.sync_data()?;
        self.index += 1;
        self.file = open_append(&numbered(&self.config.path, self.index))?;
        self.bytes_in_file = 0;
        Ok(())
    }
}

impl Sink for FileSink {
    fn describe(&self) -> String {
        match self.config.rotate_bytes {
            Some(n) => format!(
                "file {} (NDJSON, rotated every {n} bytes)",
                self.config.path.display()
            ),
            None => format!("file {} (NDJSON)", self.config.path.display()),
        }
    }

    fn blocks(&self) -> bool {
        true
    }

    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for o in outputs {
                let start = self.buf.len();
                self.lines.write(o, &mut self.buf);
                let line = (self.buf.len() - start) as u64;
                if let Some(limit) = self.config.rotate_bytes {
                    if self.bytes_in_file > 0 && self.bytes_in_file + line > limit {
                        // The line just formatted opens the next file.
                        self.write_out(start)?;
                        self.rotate()?;
                    }
                }
                self.bytes_in_file += line;
                if self.buf.len() >= BUFFER {
                    self.write_out(self.buf.len())?;
                }
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            self.write_out(self.buf.len())?;
            self.file
                .sync_data()
                .with_context(|| format!("flushing {}", self.config.path.display()))
        })
    }
}

impl Drop for FileSink {
    /// What is left goes to the file, as a `BufWriter` would have it (a
    /// sink dropped without a last flush, e.g. on an error elsewhere);
    /// an error here has no one to go to.
    fn drop(&mut self) {
        let _ = self.file.write_all(&self.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{DeadLetter, Position};

    fn dead(n: usize) -> Output {
        Output::DeadLetter(Box::new(DeadLetter {
            reason: "r".into(),
            position: Position::new("p".into(), n.to_string()),
            raw: bytes::Bytes::from_static(b"x"),
        }))
    }

    #[tokio::test]
    async fn rotates_by_size_and_resumes_in_the_last_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.ndjson");
        let config = FileSinkConfig {
            path: path.clone(),
            kinds: vec![],
            rotate_bytes: Some(200),
        };
        let outputs: Vec<Output> = (0..10).map(dead).collect();
        let refs: Vec<&Output> = outputs.iter().collect();
        let line_len = outputs[0].to_ndjson().len() as u64;
        {
            let mut sink = FileSink::open(config.clone()).unwrap();
            sink.write(&refs).await.unwrap();
            sink.flush().await.unwrap();
        }
        let per_file = 200 / line_len;
        let mut total = 0;
        let mut files = 0;
        while numbered(&path, files).exists() {
            let text = std::fs::read_to_string(numbered(&path, files)).unwrap();
            assert!(text.len() as u64 <= 200);
            total += text.lines().count();
            files += 1;
        }
        assert_eq!(total, 10);
        assert_eq!(files as u64, 10u64.div_ceil(per_file));
        // A new sink appends to the highest-numbered file.
        let mut sink = FileSink::open(config).unwrap();
        assert_eq!(sink.index, files - 1);
        sink.write(&refs[..1]).await.unwrap();
        sink.flush().await.unwrap();
    }

    /// Regression (reliability harness, SIGKILL): a run killed while its
    /// buffer was half flushed left `…"reason":"r","posi` at the end of the
    /// file, and the next run appended its first line to it, a corrupt line
    /// for every reader.
    #[tokio::test]
    async fn a_torn_last_line_is_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.ndjson");
        let outputs: Vec<Output> = (0..3).map(dead).collect();
        let whole = format!("{}{}", outputs[0].to_ndjson(), outputs[1].to_ndjson());
        let torn = &outputs[2].to_ndjson()[..20];
        std::fs::write(&path, format!("{whole}{torn}")).unwrap();
        let config = FileSinkConfig {
            path: path.clone(),
            kinds: vec![],
            rotate_bytes: None,
        };
        let mut sink = FileSink::open(config.clone()).unwrap();
        assert_eq!(sink.bytes_in_file, whole.len() as u64);
        sink.write(&[&outputs[2]]).await.unwrap();
        sink.flush().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{whole}{}", outputs[2].to_ndjson()));
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        // A file that is one partial line becomes empty; a clean one is kept.
        std::fs::write(&path, torn).unwrap();
        assert_eq!(FileSink::open(config.clone()).unwrap().bytes_in_file, 0);
        std::fs::write(&path, &whole).unwrap();
        assert_eq!(
            FileSink::open(config).unwrap().bytes_in_file,
            whole.len() as u64
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
    }
}
