//! What can go wrong with a remote checkpoint store.

use std::path::PathBuf;

/// An error of a [`RemoteStore`](super::RemoteStore). Every message names
/// the store as `s3://bucket/prefix`.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// An S3 request failed (after the SDK's retries): a missing bucket,
    /// refused credentials, an unreachable endpoint, ...
    #[error("checkpoint store {store}: {op} {key}: {reason}")]
    S3 {
        store: String,
        /// The S3 operation (`ListObjectsV2`, `PutObject`, ...).
        op: &'static str,
        /// The object key or listing prefix.
        key: String,
        reason: String,
    },
    /// A local file or directory could not be read or written.
    #[error("checkpoint store {store}: {}: {source}", path.display())]
    Io {
        store: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The directory given to `upload` is not a RocksDB checkpoint.
    #[error("checkpoint store {store}: {} is not a checkpoint directory: {reason}", dir.display())]
    NotACheckpoint {
        store: String,
        dir: PathBuf,
        reason: String,
    },
    /// `restore_newest` was given a destination that holds something.
    #[error("checkpoint store {store}: cannot restore into {}: it exists and is not an empty directory", dir.display())]
    DestinationNotEmpty { store: String, dir: PathBuf },
    /// The newest readable checkpoint was written under another state
    /// fingerprint: restoring it is refused (older ones are not tried:
    /// they would be older state of that other configuration too).
    #[error(
        "checkpoint store {store}: checkpoint {checkpoint_id} was written by a different configuration \
         (state fingerprint {found}, this configuration has {expected}); refusing to restore it"
    )]
    FingerprintMismatch {
        store: String,
        checkpoint_id: u64,
        found: String,
        expected: String,
    },
    /// A manifest of a format this shardflow cannot read (written by a
    /// newer one): refused rather than silently restoring older state.
    #[error(
        "checkpoint store {store}: checkpoint {checkpoint_id} has manifest format {found}, \
         and this shardflow reads format {expected}; refusing to restore older state in its place"
    )]
    UnsupportedFormat {
        store: String,
        checkpoint_id: u64,
        found: u32,
        expected: u32,
    },
    /// No checkpoint could be restored: the store holds no manifest, or
    /// every manifest tried was damaged (each with its reason).
    #[error("{}", no_usable(store, tried))]
    NoUsableCheckpoint {
        store: String,
        /// `(checkpoint id, why it could not be restored)`, newest first.
        tried: Vec<(u64, String)>,
    },
}

fn no_usable(store: &str, tried: &[(u64, String)]) -> String {
    if tried.is_empty() {
        return format!(
            "checkpoint store {store}: no usable checkpoint: the store holds no manifest"
        );
    }
    let each: Vec<String> = tried
        .iter()
        .map(|(id, reason)| format!("checkpoint {id}: {reason}"))
        .collect();
    format!(
        "checkpoint store {store}: no usable checkpoint among the {} tried: {}",
        tried.len(),
        each.join("; ")
    )
}
