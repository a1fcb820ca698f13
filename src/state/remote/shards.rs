//! Shard snapshots: the state of one hash range, as
//! [`StateStore::export_range`](crate::state::StateStore::export_range)
//! wrote it, kept under `shards/` beside the whole-state checkpoints.
//!
//! A cluster moves a shard's state between workers this way (see
//! `crate::cluster`): the holder uploads the range with the position it
//! matches, the lease row names the snapshot, the next holder downloads and
//! ingests it. A snapshot is a directory of at most three objects:
//! `windows.sst`, `slices.sst` (either may be missing when the range holds
//! nothing of that column family) and `meta.json`, the caller's opaque
//! description, written last. A snapshot without `meta.json` is incomplete
//! and is refused, so a writer that died half-way through an upload is
//! never read.

use std::path::{Path, PathBuf};

use aws_sdk_s3::primitives::ByteStream;
use tokio::io::AsyncWriteExt as _;

use super::{RemoteError, RemoteStore};

/// The object a snapshot's description is in; written after its files.
pub const SNAPSHOT_META: &str = "meta.json";

/// The files a snapshot may hold besides its description.
const SNAPSHOT_FILES: [&str; 2] = ["slices.sst", "windows.sst"];

impl RemoteStore {
    /// Uploads `files` (named `slices.sst` / `windows.sst`) and then `meta`
    /// under `rel_dir` (relative to the prefix, e.g. `shards/<id>/<name>`).
    pub async fn put_snapshot(
        &self,
        rel_dir: &str,
        files: &[PathBuf],
        meta: &[u8],
    ) -> Result<u64, RemoteError> {
        let i = &self.inner;
        let mut bytes = 0;
        for path in files {
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| SNAPSHOT_FILES.contains(n))
            else {
                return Err(i.failure(
                    "PutObject",
                    rel_dir,
                    format!("{} is not a range file", path.display()),
                ));
            };
            let key = i.key(&format!("{}/{name}", rel_dir.trim_end_matches('/')));
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| i.io_error(path, std::io::Error::other(e)))?;
            bytes += std::fs::metadata(path).map_or(0, |m| m.len());
            i.client
                .put_object()
                .bucket(&i.bucket)
                .key(&key)
                .body(body)
                .send()
                .await
                .map_err(|e| i.s3_error("PutObject", &key, &e))?;
        }
        let key = i.key(&format!(
            "{}/{SNAPSHOT_META}",
            rel_dir.trim_end_matches('/')
        ));
        i.client
            .put_object()
            .bucket(&i.bucket)
            .key(&key)
            .body(ByteStream::from(meta.to_vec()))
            .send()
            .await
            .map_err(|e| i.s3_error("PutObject", &key, &e))?;
        Ok(bytes + meta.len() as u64)
    }

    /// Downloads the snapshot under `rel_dir` into `dest` (created; must
    /// not hold the files already): its range files, for
    /// [`StateStore::ingest_range`](crate::state::StateStore::ingest_range),
    /// and its description. An incomplete snapshot (no `meta.json`) is an
    /// error.
    pub async fn get_snapshot(
        &self,
        rel_dir: &str,
        dest: &Path,
    ) -> Result<(Vec<PathBuf>, Vec<u8>), RemoteError> {
        let i = &self.inner;
        let rel_dir = rel_dir.trim_end_matches('/');
        let meta_key = i.key(&format!("{rel_dir}/{SNAPSHOT_META}"));
        let Some(out) = i.get_object(&meta_key).await? else {
            return Err(i.failure(
                "GetObject",
                &meta_key,
                "the snapshot is missing or incomplete (no meta.json)",
            ));
        };
        let meta = out
            .body
            .collect()
            .await
            .map_err(|e| i.failure("GetObject", &meta_key, e))?
            .into_bytes()
            .to_vec();
        tokio::fs::create_dir_all(dest)
            .await
            .map_err(|e| i.io_error(dest, e))?;
        let mut files = Vec::new();
        for name in SNAPSHOT_FILES {
            let key = i.key(&format!("{rel_dir}/{name}"));
            let Some(out) = i.get_object(&key).await? else {
                continue;
            };
            let path = dest.join(name);
            let io = |e| i.io_error(&path, e);
            let mut file = tokio::fs::File::create_new(&path).await.map_err(io)?;
            let mut body = out.body;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| i.failure("GetObject", &key, e))?;
                file.write_all(&chunk).await.map_err(io)?;
            }
            file.sync_all().await.map_err(io)?;
            files.push(path);
        }
        Ok((files, meta))
    }

    /// Deletes the snapshot under `rel_dir` (best effort for the caller:
    /// a snapshot no lease names any more is garbage).
    pub async fn delete_snapshot(&self, rel_dir: &str) -> Result<(), RemoteError> {
        let rel_dir = rel_dir.trim_end_matches('/');
        let rels: Vec<String> = SNAPSHOT_FILES
            .iter()
            .chain([&SNAPSHOT_META])
            .map(|n| format!("{rel_dir}/{n}"))
            .collect();
        self.inner.delete(&rels).await
    }
}
