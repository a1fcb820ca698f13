//! The S3 archive: the format `sink/s3.rs` writes and `source/s3/` reads
//! back (`shardflow replay`). Neither imports the other; both import this.
//!
//! - Keys (`layout.rs`): `prefix` + `YYYY/MM/DD/HH/` (UTC, Firehose's
//!   layout) + a name; shardflow's own objects are named by state epoch,
//!   first checkpoint and sequence, so that a restart rewrites the same
//!   objects and sorting the names gives the order they were written in.
//! - Objects: gzip-compressed NDJSON, one output per line in its NDJSON form
//!   (`record.rs`), uploaded as [`CONTENT_TYPE`]. The lines a replay reads
//!   are the `raw` ones: an input record with its partition, position and
//!   the watermark the live run had before it.
//!
//! The S3 source also reads Firehose's objects (concatenated JSON, gzip or
//! not), which follow only the key layout: splitting objects into records
//! is the source's (`source/s3/objects.rs`).

pub mod layout;

/// The content type of an archive object.
pub const CONTENT_TYPE: &str = "application/x-ndjson";
