//! Remote checkpoints: copies of the RocksDB state in S3, and their restore.
//!
//! A [`RemoteStore`] keeps RocksDB checkpoints (directories made by
//! [`StateStore::create_checkpoint`](super::StateStore::create_checkpoint))
//! under one prefix of one bucket, so that a new host can start from the
//! state of one that is gone. The store knows nothing of what the state
//! means: the caller passes the checkpoint id, the state fingerprint and
//! an opaque `meta` value (positions, watermarks) with each upload.
//!
//! # Layout
//!
//! Under `s3://bucket/prefix/`:
//!
//! - `files/<name>.<h>`: one checkpoint file, where `<name>` is its name in
//!   the checkpoint directory (`000123.sst`, `MANIFEST-000045`, `CURRENT`)
//!   and `<h>` the first 16 hex digits of the SHA-256 of its content.
//! - `manifests/<id>.json`: one checkpoint, `<id>` its checkpoint id as 20
//!   zero-padded digits (so key order is id order). The [`Manifest`] holds
//!   the format version, the id, `created_at` (epoch ms), the state
//!   fingerprint, the caller's `meta`, and every file as `{name, key, size,
//!   sha256}`, `key` relative to the prefix (so a copied prefix still
//!   restores).
//!
//! # Content addressing
//!
//! RocksDB names SST files by a counter of its own DB, so two incarnations
//! of the state produce different files of the same name: a host that died
//! half-way through an upload, and another that restored an older
//! checkpoint and went on numbering from there. With the content's hash in
//! every key they never overwrite each other, and an object, once written,
//! never changes. It also makes uploads incremental: SST files are
//! immutable, so a file already named by the previous manifest (same name,
//! size and hash) is not uploaded again. The other files (`MANIFEST-*`,
//! `OPTIONS-*`, `CURRENT`, a WAL) are small and go by their hash like the
//! rest. What a store knows to be uploaded is seeded, on its first upload,
//! from the newest readable manifest (each such file checked once with a
//! `HeadObject` before it is reused), then kept from its own uploads and
//! restores.
//!
//! # Write order
//!
//! [`upload`](RemoteStore::upload) writes every file first, at most
//! [`with_concurrency`](RemoteStore::with_concurrency) at a time (files
//! above a threshold in multipart uploads, each streamed from disk), and
//! the manifest last, once all of them are in. A reader that sees a
//! manifest therefore sees a whole checkpoint; an upload that fails leaves
//! only unreferenced files, which [`retain`](RemoteStore::retain) deletes.
//! Checkpoint ids must increase: an upload under an id that is already in
//! the store replaces that manifest.
//!
//! # Retention
//!
//! [`retain`](RemoteStore::retain)`(keep)` keeps the newest `keep`
//! (at least one) readable manifests and every manifest newer than the
//! oldest of them, and deletes the older manifests first; then it deletes
//! every object under `files/` that no kept manifest names and that is not
//! newer than the newest kept manifest (the files of an upload under way
//! are written before its manifest, so they are newer). Retention and
//! uploads must come from one writer: in one process a `RemoteStore` (and
//! its clones) runs them one at a time, but two processes writing one
//! prefix can delete each other's files.
//!
//! # Restore
//!
//! [`restore_newest`](RemoteStore::restore_newest) tries the manifests
//! newest first. It downloads a manifest's files into a temporary directory
//! beside the destination and checks each one's size and SHA-256. A
//! damaged checkpoint (an unreadable manifest, a missing file, a size or
//! hash that differs) is logged with a warning naming it and the problem,
//! and the previous one is tried; on success the temporary directory is
//! renamed to the destination, which must be missing or empty. Some
//! checkpoints are refused outright instead, as restoring an older one in
//! their place would hide a mistake: one written under another state
//! fingerprint ([`RemoteError::FingerprintMismatch`]) or in a newer
//! manifest format. Failing S3 requests (other than a missing object) and
//! local I/O errors end the restore too. When no manifest could be
//! restored the error is [`RemoteError::NoUsableCheckpoint`], listing each
//! id tried and why: a store never turns into a silent fresh start (a
//! caller that wants one on an empty store asks
//! [`newest_manifest`](RemoteStore::newest_manifest) first).
//!
//! # Metrics
//!
//! `shardflow_remote_checkpoint_seconds` (histogram: the duration of each
//! upload), `shardflow_remote_checkpoint_bytes_total` (counter: bytes
//! uploaded), `shardflow_remote_checkpoint_age_seconds` (gauge: the age of
//! the newest manifest, set after each upload).

mod error;
mod manifest;
mod restore;
mod shards;
mod upload;

use std::sync::Arc;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;

pub use self::error::RemoteError;
pub use self::manifest::{file_key, manifest_key, Manifest, ManifestFile, ManifestSummary, FORMAT};
pub use self::restore::RestoreReport;
pub use self::shards::SNAPSHOT_META;
pub use self::upload::UploadReport;

use self::manifest::{manifest_id, FILES, MANIFESTS};
use crate::aws::error_text;

/// Files up or down at the same time, by default.
const CONCURRENCY: usize = 4;
/// Files larger than this go up in a multipart upload, by default.
const MULTIPART_THRESHOLD: u64 = 64 << 20;
/// The part size of multipart uploads, by default (S3 wants at least
/// 5 MiB for every part but the last).
const PART_SIZE: u64 = 16 << 20;
/// Pages of a listing (up to 1000 keys each) before a server that never
/// ends one is given up on.
const MAX_PAGES: usize = 100_000;
/// Keys per DeleteObjects request (S3's limit).
const DELETE_BATCH: usize = 1000;

/// A remote checkpoint store: one prefix of one S3 bucket. Cloning is
/// cheap, and clones share what the store knows is uploaded.
#[derive(Clone)]
pub struct RemoteStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    bucket: String,
    /// The prefix without surrounding slashes, plus `/` unless empty.
    root: String,
    /// `s3://bucket/prefix`, for messages.
    label: String,
    concurrency: usize,
    multipart_threshold: u64,
    part_size: u64,
    /// Held by uploads, retention and restores, so they run one at a time.
    known: tokio::sync::Mutex<upload::Known>,
}

/// What [`RemoteStore::retain`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetainReport {
    pub manifests_kept: usize,
    pub manifests_deleted: usize,
    pub files_deleted: usize,
}

/// An object of a listing.
struct Listed {
    /// Relative to the prefix.
    rel: String,
    /// Last modified, in nanoseconds since the epoch (0 if not told).
    modified: i128,
}

impl RemoteStore {
    /// A store under `prefix` of `bucket` (slashes around `prefix` do not
    /// matter; empty is the bucket's root). Nothing is sent until the
    /// first call: [`check`](Self::check) validates the store at start-up.
    pub fn new(
        client: Client,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
    ) -> RemoteStore {
        let bucket = bucket.into();
        let prefix = prefix.into().trim_matches('/').to_owned();
        let root = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        RemoteStore {
            inner: Arc::new(Inner {
                label: format!("s3://{bucket}/{prefix}"),
                client,
                bucket,
                root,
                concurrency: CONCURRENCY,
                multipart_threshold: MULTIPART_THRESHOLD,
                part_size: PART_SIZE,
                known: tokio::sync::Mutex::new(upload::Known::default()),
            }),
        }
    }

    /// Transfers at most `n` (at least 1) files at a time (default 4).
    /// Like [`with_multipart`](Self::with_multipart), call it before the
    /// store is cloned or used: a builder of a shared store makes a new
    /// one, which knows nothing uploaded.
    pub fn with_concurrency(self, n: usize) -> RemoteStore {
        self.configure(|i| i.concurrency = n.max(1))
    }

    /// Uploads files larger than `threshold` bytes in parts of `part_size`
    /// bytes (default: above 64 MiB, in 16 MiB parts). S3 refuses parts
    /// under 5 MiB but the last; S3-compatible servers may not.
    pub fn with_multipart(self, threshold: u64, part_size: u64) -> RemoteStore {
        self.configure(|i| {
            i.multipart_threshold = threshold;
            i.part_size = part_size.max(1);
        })
    }

    fn configure(self, f: impl FnOnce(&mut Inner)) -> RemoteStore {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            client: shared.client.clone(),
            bucket: shared.bucket.clone(),
            root: shared.root.clone(),
            label: shared.label.clone(),
            concurrency: shared.concurrency,
            multipart_threshold: shared.multipart_threshold,
            part_size: shared.part_size,
            known: tokio::sync::Mutex::new(upload::Known::default()),
        });
        f(&mut inner);
        RemoteStore {
            inner: Arc::new(inner),
        }
    }

    /// The store as `s3://bucket/prefix`.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Whether the bucket can be listed under the prefix (one
    /// `ListObjectsV2` of at most one key): a missing bucket, refused
    /// credentials or an unreachable endpoint fail here, naming the store.
    pub async fn check(&self) -> Result<(), RemoteError> {
        let i = &self.inner;
        i.client
            .list_objects_v2()
            .bucket(&i.bucket)
            .prefix(&i.root)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| i.s3_error("ListObjectsV2", &i.root, &e))?;
        Ok(())
    }

    /// The newest readable manifest's id, creation time and fingerprint,
    /// or `None` when the store holds no readable manifest (unreadable
    /// ones are skipped with a warning).
    pub async fn newest_manifest(&self) -> Result<Option<ManifestSummary>, RemoteError> {
        let ids = self.inner.manifest_ids().await?;
        Ok(self
            .inner
            .newest_readable(&ids, |_, _| {})
            .await?
            .map(|m| m.summary()))
    }

    /// Keeps the newest `keep` (at least 1) readable manifests and deletes
    /// the rest, then the files no kept manifest names (see the module
    /// doc's *Retention* for the exact rule). Run it after an upload, from
    /// the same writer.
    pub async fn retain(&self, keep: usize) -> Result<RetainReport, RemoteError> {
        let i = &*self.inner;
        let mut known = i.known.lock().await;
        let keep = keep.max(1);
        let listed = i.list(MANIFESTS).await?;
        let mut manifests: Vec<(u64, i128)> = listed
            .iter()
            .filter_map(|o| Some((manifest_id(&o.rel)?, o.modified)))
            .collect();
        manifests.sort_unstable();
        // Newest first: read until `keep` of them are readable.
        let mut referenced = std::collections::HashSet::new();
        let mut readable = 0;
        let mut kept = 0;
        let mut newest_kept_at = i128::MIN;
        for &(id, modified) in manifests.iter().rev() {
            if readable == keep {
                break;
            }
            kept += 1;
            newest_kept_at = newest_kept_at.max(modified);
            match i.read_manifest(id).await? {
                Ok(m) => {
                    readable += 1;
                    referenced.extend(m.files.into_iter().map(|f| f.key));
                }
                Err(reason) => {
                    tracing::warn!(store = %i.label, checkpoint = id, %reason, "retention skips an unreadable manifest");
                }
            }
        }
        let old: Vec<String> = manifests[..manifests.len() - kept]
            .iter()
            .map(|&(id, _)| manifest_key(id))
            .collect();
        i.delete(&old).await?;
        let files = i.list(FILES).await?;
        let unreferenced: Vec<String> = files
            .into_iter()
            .filter(|o| !referenced.contains(&o.rel) && o.modified <= newest_kept_at)
            .map(|o| o.rel)
            .collect();
        i.delete(&unreferenced).await?;
        known.forget(&unreferenced);
        tracing::debug!(store = %i.label, kept, manifests_deleted = old.len(), files_deleted = unreferenced.len(), "remote checkpoints retained");
        Ok(RetainReport {
            manifests_kept: kept,
            manifests_deleted: old.len(),
            files_deleted: unreferenced.len(),
        })
    }
}

impl Inner {
    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.root)
    }

    /// GetObject of `key`; `None` when there is no such object.
    async fn get_object(
        &self,
        key: &str,
    ) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>, RemoteError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(self.s3_error("GetObject", key, &e)),
        }
    }

    /// An S3 failure that is not an SDK error (a body that broke off, a
    /// request the SDK would not build).
    fn failure(&self, op: &'static str, key: &str, reason: impl std::fmt::Display) -> RemoteError {
        RemoteError::S3 {
            store: self.label.clone(),
            op,
            key: key.to_owned(),
            reason: reason.to_string(),
        }
    }

    fn s3_error<E, R>(&self, op: &'static str, key: &str, e: &SdkError<E, R>) -> RemoteError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        RemoteError::S3 {
            store: self.label.clone(),
            op,
            key: key.to_owned(),
            reason: error_text(e),
        }
    }

    fn io_error(&self, path: &std::path::Path, source: std::io::Error) -> RemoteError {
        RemoteError::Io {
            store: self.label.clone(),
            path: path.to_owned(),
            source,
        }
    }

    /// Every object under `rel_prefix`, in key order.
    async fn list(&self, rel_prefix: &str) -> Result<Vec<Listed>, RemoteError> {
        let prefix = self.key(rel_prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.s3_error("ListObjectsV2", &prefix, &e))?;
            for o in page.contents() {
                let Some(rel) = o.key().and_then(|k| k.strip_prefix(&self.root)) else {
                    continue;
                };
                let modified = o.last_modified().map_or(0, |t| {
                    i128::from(t.secs()) * 1_000_000_000 + i128::from(t.subsec_nanos())
                });
                out.push(Listed {
                    rel: rel.to_owned(),
                    modified,
                });
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => return Ok(out),
            }
        }
        Err(RemoteError::S3 {
            store: self.label.clone(),
            op: "ListObjectsV2",
            key: prefix,
            reason: format!("the listing did not end after {MAX_PAGES} pages"),
        })
    }

    /// The ids of the manifests in the store, ascending.
    async fn manifest_ids(&self) -> Result<Vec<u64>, RemoteError> {
        let mut ids: Vec<u64> = self
            .list(MANIFESTS)
            .await?
            .iter()
            .filter_map(|o| manifest_id(&o.rel))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Reads manifest `id`: `Ok(Err(reason))` when it is damaged (gone,
    /// not JSON, inconsistent), an error when S3 fails or the manifest is
    /// of another format.
    async fn read_manifest(&self, id: u64) -> Result<Result<Manifest, String>, RemoteError> {
        let key = self.key(&manifest_key(id));
        let Some(out) = self.get_object(&key).await? else {
            return Ok(Err(format!("manifest {key} is gone")));
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| self.failure("GetObject", &key, e))?;
        match manifest::Manifest::parse(&bytes.into_bytes(), id) {
            Ok(Ok(m)) => Ok(Ok(m)),
            Ok(Err(found)) => Err(RemoteError::UnsupportedFormat {
                store: self.label.clone(),
                checkpoint_id: id,
                found,
                expected: FORMAT,
            }),
            Err(reason) => Ok(Err(format!("manifest {key}: {reason}"))),
        }
    }

    /// The newest of `ids` (ascending) that reads, telling `skipped` of
    /// each that does not.
    async fn newest_readable(
        &self,
        ids: &[u64],
        mut skipped: impl FnMut(u64, &str),
    ) -> Result<Option<Manifest>, RemoteError> {
        for &id in ids.iter().rev() {
            match self.read_manifest(id).await? {
                Ok(m) => return Ok(Some(m)),
                Err(reason) => {
                    tracing::warn!(store = %self.label, checkpoint = id, %reason, "skipping an unreadable checkpoint manifest");
                    skipped(id, &reason);
                }
            }
        }
        Ok(None)
    }

    /// Deletes the objects `rels` (relative keys), a batch at a time.
    async fn delete(&self, rels: &[String]) -> Result<(), RemoteError> {
        for batch in rels.chunks(DELETE_BATCH) {
            let objects = batch
                .iter()
                .map(|rel| ObjectIdentifier::builder().key(self.key(rel)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.failure("DeleteObjects", &self.root, e))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| self.failure("DeleteObjects", &self.root, e))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.s3_error("DeleteObjects", &batch[0], &e))?;
            if let Some(failed) = out.errors().first() {
                return Err(RemoteError::S3 {
                    store: self.label.clone(),
                    op: "DeleteObjects",
                    key: failed.key().unwrap_or_default().to_owned(),
                    reason: format!(
                        "{}: {} ({} of {} keys not deleted)",
                        failed.code().unwrap_or("error"),
                        failed.message().unwrap_or(""),
                        out.errors().len(),
                        batch.len()
                    ),
                });
            }
        }
        Ok(())
    }
}
