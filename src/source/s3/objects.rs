//! Splitting one archive object's (decompressed) bytes into records.
//!
//! Two layouts: NDJSON lines (shardflow's archive), and JSON values one
//! after another with or without whitespace between them (Firehose's
//! "concatenated JSON", which also covers NDJSON). The splitter never
//! builds a JSON tree: lines are found with `memchr`, concatenated values
//! by tracking nesting and strings byte by byte. Every record comes with
//! its byte offset in the decompressed object, so that a bad one can be
//! reported as `key` + offset.

use std::io::{self, BufRead, BufReader, Read};

use crate::config::Compression;

/// Largest record the splitter holds; a longer one is reported, and the
/// rest of its object skipped (nothing after it can be found reliably).
pub const MAX_RECORD_BYTES: usize = 64 << 20;

const CHUNK: usize = 256 << 10;

/// How records are separated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Lines,
    Concatenated,
}

/// One item found in an object.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A record's bytes and its offset in the decompressed object.
    Record(u64, &'a [u8]),
    /// The object ended inside a JSON value: the partial value and its offset.
    Truncated(u64, &'a [u8]),
    /// A record longer than [`MAX_RECORD_BYTES`] starts at this offset.
    TooLong(u64),
}

/// Wraps an object's byte stream in a gzip decoder when it is (or, with
/// `Compression::Auto`, looks) gzip-compressed. Concatenated gzip members
/// are read as one stream, as `gunzip` does.
pub fn decompressed<R: Read + 'static>(
    input: R,
    compression: Compression,
) -> io::Result<Box<dyn Read>> {
    let mut input = BufReader::with_capacity(CHUNK, input);
    let gzip = match compression {
        Compression::Gzip => true,
        Compression::None => false,
        Compression::Auto => input.fill_buf()?.starts_with(&[0x1f, 0x8b]),
    };
    Ok(if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(input))
    } else {
        Box::new(input)
    })
}

/// Streams records out of a reader with a bounded buffer.
pub struct Splitter<R> {
    input: R,
    layout: Layout,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Decompressed offset of `buf[0]`.
    base: u64,
    eof: bool,
    /// Concatenated layout: scanning state of the value at `start`.
    scan: usize,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Set after a `TooLong`: nothing more is read.
    stopped: bool,
}

impl<R: Read> Splitter<R> {
    pub fn new(input: R, layout: Layout) -> Self {
        Splitter {
            input,
            layout,
            buf: vec![0; CHUNK],
            start: 0,
            end: 0,
            base: 0,
            eof: false,
            scan: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            stopped: false,
        }
    }

    /// Decompressed bytes consumed so far: where a read error happened.
    pub fn offset(&self) -> u64 {
        self.base + self.end as u64
    }

    /// Reads more input behind the unconsumed bytes; false at end of input.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.scan -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).min(MAX_RECORD_BYTES + CHUNK);
            self.buf.resize(grown, 0);
        }
        loop {
            match self.input.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn take(&mut self, from: usize, to: usize, next: usize) -> (u64, usize, usize) {
        self.start = next;
        self.scan = next;
        (self.base + from as u64, from, to)
    }

    /// The next item, or `None` at the end of the object. An `Err` is a read
    /// (download or decompression) failure at [`Splitter::offset`].
    pub fn next_item(&mut self) -> io::Result<Option<Item<'_>>> {
        if self.stopped {
            return Ok(None);
        }
        loop {
            // Skip whitespace between records.
            while self.start < self.end && self.buf[self.start].is_ascii_whitespace() {
                self.start += 1;
            }
            if self.scan < self.start {
                self.scan = self.start;
                self.depth = 0;
                self.in_string = false;
                self.escaped = false;
            }
            if let Some((offset, from, to)) = self.find_end() {
                return Ok(Some(Item::Record(offset, &self.buf[from..to])));
            }
            if self.end - self.start >= MAX_RECORD_BYTES {
                self.stopped = true;
                return Ok(Some(Item::TooLong(self.base + self.start as u64)));
            }
            if !self.fill()? {
                if self.start >= self.end {
                    return Ok(None);
                }
                let (from, to) = (self.start, self.end);
                let offset = self.base + from as u64;
                self.start = self.end;
                self.scan = self.end;
                let open =
                    self.layout == Layout::Concatenated && (self.depth > 0 || self.in_string);
                let bytes = trim_end(&self.buf[from..to]);
                return Ok(Some(if open {
                    Item::Truncated(offset, bytes)
                } else {
                    Item::Record(offset, bytes)
                }));
            }
        }
    }

    /// Finds the end of the record at `start` within the buffered bytes.
    fn find_end(&mut self) -> Option<(u64, usize, usize)> {
        if self.start >= self.end {
            return None;
        }
        match self.layout {
            Layout::Lines => {
                let nl = memchr::memchr(b'\n', &self.buf[self.scan..self.end])? + self.scan;
                let to = self.start + trim_end(&self.buf[self.start..nl]).len();
                Some(self.take(self.start, to, nl + 1))
            }
            Layout::Concatenated => {
                let first = self.buf[self.start];
                if first != b'{' && first != b'[' {
                    // Not an object or a list: the value runs to the next
                    // whitespace or opening brace (the decoder says why it is bad).
                    let rest = &self.buf[self.start + 1..self.end];
                    let stop = rest
                        .iter()
                        .position(|b| b.is_ascii_whitespace() || *b == b'{' || *b == b'[')?;
                    let to = self.start + 1 + stop;
                    return Some(self.take(self.start, to, to));
                }
                let mut i = self.scan;
                while i < self.end {
                    let b = self.buf[i];
                    i += 1;
                    if self.in_string {
                        if self.escaped {
                            self.escaped = false;
                        } else if b == b'\\' {
                            self.escaped = true;
                        } else if b == b'"' {
                            self.in_string = false;
                        }
                        continue;
                    }
                    match b {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => {
                            self.depth = self.depth.saturating_sub(1);
                            if self.depth == 0 {
                                return Some(self.take(self.start, i, i));
                            }
                        }
                        _ => {}
                    }
                }
                self.scan = i;
                None
            }
        }
    }
}

fn trim_end(mut bytes: &[u8]) -> &[u8] {
    while let [rest @ .., last] = bytes {
        if last.is_ascii_whitespace() {
            bytes = rest;
        } else {
            break;
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn items(data: &[u8], layout: Layout) -> Vec<String> {
        let mut s = Splitter::new(data, layout);
        // A tiny buffer exercises refills in the middle of records.
        s.buf = vec![0; 3];
        let mut out = Vec::new();
        while let Some(item) = s.next_item().unwrap() {
            out.push(match item {
                Item::Record(o, b) => format!("{o}:{}", String::from_utf8_lossy(b)),
                Item::Truncated(o, b) => format!("truncated {o}:{}", String::from_utf8_lossy(b)),
                Item::TooLong(o) => format!("too long {o}"),
            });
        }
        out
    }

    #[test]
    fn splits_ndjson_lines() {
        assert_eq!(
            items(b"{\"a\":1}\r\n\n{\"b\":\"}\"}\n{\"c\"", Layout::Lines),
            ["0:{\"a\":1}", "10:{\"b\":\"}\"}", "20:{\"c\""]
        );
    }

    #[test]
    fn splits_concatenated_json_and_reports_truncation() {
        assert_eq!(
            items(
                b"{\"a\":{\"x\":\"}{\\\"\"}}{\"b\":[1,2]}\n {\"c\":3}{\"d\":",
                Layout::Concatenated
            ),
            [
                "0:{\"a\":{\"x\":\"}{\\\"\"}}",
                "18:{\"b\":[1,2]}",
                "31:{\"c\":3}",
                "truncated 38:{\"d\":"
            ]
        );
        assert_eq!(
            items(b"oops {\"a\":1}", Layout::Concatenated),
            ["0:oops", "5:{\"a\":1}"]
        );
    }

    #[test]
    fn gzip_is_detected_and_corruption_surfaces_as_an_error() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"a\":1}\n{\"b\":2}\n").unwrap();
        let bytes = gz.finish().unwrap();
        let plain = |b: Vec<u8>| {
            let mut out = String::new();
            decompressed(io::Cursor::new(b), Compression::Auto)
                .and_then(|mut r| r.read_to_string(&mut out))
                .map(|_| out)
        };
        assert_eq!(plain(bytes.clone()).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(plain(b"{\"a\":1}".to_vec()).unwrap(), "{\"a\":1}");
        let mut corrupt = bytes.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        corrupt[mid + 1] ^= 0xff;
        assert!(plain(corrupt).is_err());
        assert!(
            plain(bytes[..bytes.len() - 6].to_vec()).is_err(),
            "truncated gzip"
        );
    }
}
