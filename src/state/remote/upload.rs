//! [`RemoteStore::upload`]: a checkpoint directory's new files, then its
//! manifest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tokio::task::JoinSet;

use super::manifest::{self, file_key, manifest_key, Manifest, ManifestFile, FORMAT};
use super::{Inner, RemoteError, RemoteStore};

/// What [`RemoteStore::upload`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadReport {
    pub checkpoint_id: u64,
    /// Files sent to S3.
    pub files_uploaded: usize,
    /// Bytes of the files sent.
    pub bytes_uploaded: u64,
    /// Files already in the store, named again without being sent.
    pub files_reused: usize,
    /// Files of the checkpoint (uploaded plus reused).
    pub total_files: usize,
    /// Bytes of all the checkpoint's files.
    pub total_bytes: u64,
    /// From the call to the manifest being written.
    pub duration: Duration,
}

/// What a store knows is uploaded: the files of the newest manifest it
/// wrote, restored or (on its first upload) read.
#[derive(Default)]
pub(super) struct Known {
    seeded: bool,
    /// The newest checkpoint id seen in the store.
    newest: Option<u64>,
    /// `(name, size, sha256)` → whether the object was seen to exist (else
    /// it is only named by a manifest this store did not write).
    files: HashMap<(String, u64, String), bool>,
    /// Hashes of the SST files of the last upload, by identity: an SST
    /// file is immutable, and a checkpoint hard-links it, so a file of the
    /// same inode, size and mtime need not be read again.
    hashes: HashMap<Identity, String>,
}

impl Known {
    /// Takes `m`'s files as uploaded, `verified` if seen to exist.
    pub(super) fn learn(&mut self, m: &Manifest, verified: bool) {
        self.seeded = true;
        self.newest = self.newest.max(Some(m.checkpoint_id));
        self.files = m
            .files
            .iter()
            .map(|f| ((f.name.clone(), f.size, f.sha256.clone()), verified))
            .collect();
    }

    /// Notes the newest checkpoint id in the store.
    pub(super) fn saw(&mut self, newest: Option<u64>) {
        self.newest = self.newest.max(newest);
    }

    /// Drops what names the deleted objects `rels`.
    pub(super) fn forget(&mut self, rels: &[String]) {
        let gone: std::collections::HashSet<&str> = rels.iter().map(String::as_str).collect();
        self.files
            .retain(|(name, _, sha), _| !gone.contains(file_key(name, sha).as_str()));
    }
}

/// Who a file is on disk, beyond its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Identity {
    name: String,
    size: u64,
    device: u64,
    inode: u64,
    mtime_nanos: i128,
}

impl Identity {
    /// Only SST files, whose content never changes under a name.
    #[cfg(unix)]
    fn of(name: &str, meta: &std::fs::Metadata) -> Option<Identity> {
        use std::os::unix::fs::MetadataExt as _;
        name.ends_with(".sst").then(|| Identity {
            name: name.to_owned(),
            size: meta.len(),
            device: meta.dev(),
            inode: meta.ino(),
            mtime_nanos: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }

    #[cfg(not(unix))]
    fn of(_name: &str, _meta: &std::fs::Metadata) -> Option<Identity> {
        None
    }
}

/// A file of the checkpoint directory.
struct Local {
    name: String,
    path: PathBuf,
    size: u64,
    identity: Option<Identity>,
}

/// What becomes of a file.
enum Plan {
    /// Known to be in the store.
    Reuse,
    /// Named by a manifest this store did not write: reused if it exists.
    Check,
    Upload,
}

impl RemoteStore {
    /// Uploads the checkpoint directory `checkpoint_dir` (made by
    /// [`StateStore::create_checkpoint`](crate::state::StateStore::create_checkpoint))
    /// as checkpoint `checkpoint_id`: the files the store does not hold
    /// yet, then the manifest with `fingerprint` and `meta` (see the module
    /// doc). The directory can be deleted afterwards.
    pub async fn upload(
        &self,
        checkpoint_dir: &Path,
        checkpoint_id: u64,
        fingerprint: &str,
        meta: serde_json::Value,
    ) -> Result<UploadReport, RemoteError> {
        let started = Instant::now();
        let i = &self.inner;
        let mut known = i.known.lock().await;
        if !known.seeded {
            let ids = i.manifest_ids().await?;
            known.newest = ids.last().copied();
            if let Some(m) = i.newest_readable(&ids, |_, _| {}).await? {
                known.learn(&m, false);
            }
            known.seeded = true;
        }
        if let Some(newest) = known.newest.filter(|&n| n >= checkpoint_id) {
            tracing::warn!(store = %i.label, checkpoint = checkpoint_id, newest,
                "uploading a checkpoint whose id is not above the newest in the store");
        }
        let locals = i.list_dir(checkpoint_dir).await?;
        let hashed = i.hash_all(checkpoint_dir, locals, &known.hashes).await?;

        let mut files = Vec::with_capacity(hashed.len());
        let mut jobs = Vec::new();
        for (local, sha256) in &hashed {
            let f = ManifestFile {
                name: local.name.clone(),
                key: file_key(&local.name, sha256),
                size: local.size,
                sha256: sha256.clone(),
            };
            let plan = match known.files.get(&(f.name.clone(), f.size, f.sha256.clone())) {
                Some(true) => Plan::Reuse,
                Some(false) => Plan::Check,
                None => Plan::Upload,
            };
            if !matches!(plan, Plan::Reuse) {
                jobs.push((plan, f.clone(), local.path.clone()));
            }
            files.push(f);
        }
        let mut files_uploaded = 0;
        let mut bytes_uploaded = 0;
        let mut pending = jobs.into_iter();
        let mut set = JoinSet::new();
        // Each turn but the last finishes one job.
        for _ in 0..=pending.len() {
            while set.len() < i.concurrency {
                let Some((plan, f, path)) = pending.next() else {
                    break;
                };
                let inner = Arc::clone(i);
                set.spawn(async move { inner.send_file(plan, &f, &path).await });
            }
            match set.join_next().await {
                None => break,
                Some(Ok(Ok(Some(bytes)))) => {
                    files_uploaded += 1;
                    bytes_uploaded += bytes;
                }
                Some(Ok(Ok(None))) => {}
                Some(Ok(Err(e))) => {
                    set.shutdown().await;
                    return Err(e);
                }
                Some(Err(e)) => {
                    set.shutdown().await;
                    return Err(RemoteError::Io {
                        store: i.label.clone(),
                        path: checkpoint_dir.to_owned(),
                        source: std::io::Error::other(format!("an upload task failed: {e}")),
                    });
                }
            }
        }

        let manifest = Manifest {
            format: FORMAT,
            checkpoint_id,
            created_at: crate::time::now_millis().max(0) as u64,
            fingerprint: fingerprint.to_owned(),
            meta,
            files,
        };
        let key = i.key(&manifest_key(checkpoint_id));
        let body = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        i.client
            .put_object()
            .bucket(&i.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| i.s3_error("PutObject", &key, &e))?;

        known.learn(&manifest, true);
        known.hashes = hashed
            .iter()
            .filter_map(|(l, sha)| Some((l.identity.clone()?, sha.clone())))
            .collect();
        let report = UploadReport {
            checkpoint_id,
            files_uploaded,
            bytes_uploaded,
            files_reused: manifest.files.len() - files_uploaded,
            total_files: manifest.files.len(),
            total_bytes: manifest.bytes(),
            duration: started.elapsed(),
        };
        metrics::histogram!("shardflow_remote_checkpoint_seconds")
            .record(report.duration.as_secs_f64());
        metrics::counter!("shardflow_remote_checkpoint_bytes_total").increment(bytes_uploaded);
        let age = (crate::time::now_millis().max(0) as u64).saturating_sub(manifest.created_at);
        metrics::gauge!("shardflow_remote_checkpoint_age_seconds").set(age as f64 / 1000.0);
        tracing::debug!(store = %i.label, checkpoint = checkpoint_id, files = report.total_files,
            uploaded = files_uploaded, bytes = bytes_uploaded, took = ?report.duration,
            "remote checkpoint uploaded");
        Ok(report)
    }
}

impl Inner {
    /// The regular files of a checkpoint directory, by name; it must hold
    /// a `CURRENT` file and nothing but files.
    async fn list_dir(&self, dir: &Path) -> Result<Vec<Local>, RemoteError> {
        let not = |reason: String| RemoteError::NotACheckpoint {
            store: self.label.clone(),
            dir: dir.to_owned(),
            reason,
        };
        let mut entries = tokio::fs::read_dir(dir)
            .await
            .map_err(|e| self.io_error(dir, e))?;
        let mut out = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| self.io_error(dir, e))?
        {
            let path = entry.path();
            let meta = tokio::fs::metadata(&path)
                .await
                .map_err(|e| self.io_error(&path, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                return Err(not(format!(
                    "{} has a name that is not UTF-8",
                    path.display()
                )));
            };
            if !meta.is_file() {
                return Err(not(format!("{name} is not a regular file")));
            }
            out.push(Local {
                identity: Identity::of(&name, &meta),
                size: meta.len(),
                name,
                path,
            });
        }
        if !out.iter().any(|l| l.name == "CURRENT") {
            return Err(not("it has no CURRENT file".into()));
        }
        out.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Each file with its SHA-256, read from disk unless `memo` knows it.
    async fn hash_all(
        &self,
        dir: &Path,
        locals: Vec<Local>,
        memo: &HashMap<Identity, String>,
    ) -> Result<Vec<(Local, String)>, RemoteError> {
        let mut out = Vec::with_capacity(locals.len());
        let mut set = JoinSet::new();
        let mut pending = locals.into_iter();
        // Each turn but the last finishes one hashing task.
        for _ in 0..=pending.len() {
            while set.len() < self.concurrency {
                let Some(local) = pending.next() else { break };
                if let Some(sha) = local.identity.as_ref().and_then(|id| memo.get(id)) {
                    out.push((local, sha.clone()));
                    continue;
                }
                set.spawn_blocking(move || {
                    let hashed = manifest::hash_file(&local.path);
                    (local, hashed)
                });
            }
            match set.join_next().await {
                None => break,
                Some(Ok((mut local, Ok((size, sha))))) => {
                    // The size read, in case the file changed since listed.
                    local.size = size;
                    out.push((local, sha));
                }
                Some(Ok((local, Err(e)))) => {
                    set.shutdown().await;
                    return Err(self.io_error(&local.path, e));
                }
                Some(Err(e)) => {
                    set.shutdown().await;
                    return Err(self.io_error(
                        dir,
                        std::io::Error::other(format!("a hashing task failed: {e}")),
                    ));
                }
            }
        }
        out.sort_unstable_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// Carries out `plan` for `f`: the bytes sent, or `None` if the object
    /// was already there.
    async fn send_file(
        &self,
        plan: Plan,
        f: &ManifestFile,
        path: &Path,
    ) -> Result<Option<u64>, RemoteError> {
        let key = self.key(&f.key);
        if matches!(plan, Plan::Check) {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await
            {
                Ok(head) if head.content_length() == Some(f.size as i64) => return Ok(None),
                Ok(_) => {}
                Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {}
                Err(e) => return Err(self.s3_error("HeadObject", &key, &e)),
            }
        }
        if f.size > self.multipart_threshold {
            self.put_multipart(&key, path, f.size).await?;
        } else {
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| self.io_error(path, std::io::Error::other(e)))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_length(f.size as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| self.s3_error("PutObject", &key, &e))?;
        }
        Ok(Some(f.size))
    }

    /// Uploads a file in parts of `part_size`, each streamed from disk;
    /// aborts the upload (best effort) if a part fails.
    async fn put_multipart(&self, key: &str, path: &Path, size: u64) -> Result<(), RemoteError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.s3_error("CreateMultipartUpload", key, &e))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(RemoteError::S3 {
                store: self.label.clone(),
                op: "CreateMultipartUpload",
                key: key.to_owned(),
                reason: "no upload id in the response".into(),
            });
        };
        let result = self.put_parts(key, upload_id, path, size).await;
        if result.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await;
            if let Err(e) = aborted {
                tracing::warn!(store = %self.label, key, error = %crate::aws::error_text(&e),
                    "could not abort a multipart upload (a bucket lifecycle rule can clean it up)");
            }
        }
        result
    }

    async fn put_parts(
        &self,
        key: &str,
        upload_id: &str,
        path: &Path,
        size: u64,
    ) -> Result<(), RemoteError> {
        let part_size = self.part_size;
        let count = size.div_ceil(part_size).max(1);
        let mut parts = Vec::with_capacity(count as usize);
        for n in 0..count {
            let offset = n * part_size;
            let len = part_size.min(size - offset);
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(len))
                .build()
                .await
                .map_err(|e| self.io_error(path, std::io::Error::other(e)))?;
            let number = i32::try_from(n + 1).map_err(|_| RemoteError::S3 {
                store: self.label.clone(),
                op: "UploadPart",
                key: key.to_owned(),
                reason: format!("{count} parts are too many"),
            })?;
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(len as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| self.s3_error("UploadPart", key, &e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            );
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.s3_error("CompleteMultipartUpload", key, &e))?;
        Ok(())
    }
}
