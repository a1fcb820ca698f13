//! [`RemoteStore::restore_newest`]: the newest checkpoint that downloads
//! whole and verified.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tokio::task::JoinSet;

use super::manifest::{Hasher, Manifest, ManifestFile};
use super::{Inner, RemoteError, RemoteStore};

/// What [`RemoteStore::restore_newest`] restored.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreReport {
    /// The manifest restored (its id, fingerprint, `meta`, files).
    pub manifest: Manifest,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Newer checkpoints that were damaged, `(id, reason)`, newest first.
    pub skipped: Vec<(u64, String)>,
    pub duration: Duration,
}

/// Why a checkpoint's files could not be fetched.
enum Fetch {
    /// The checkpoint is damaged: try the previous one.
    Damaged(String),
    /// S3 or the local disk failed: stop.
    Failed(RemoteError),
}

impl RemoteStore {
    /// Restores the newest usable checkpoint into `dest_dir`, which must be
    /// missing or an empty directory, and returns its manifest; the
    /// directory then opens with [`StateStore::open`](crate::state::StateStore::open).
    /// Damaged checkpoints are skipped with a warning; one of another
    /// state fingerprint than `fingerprint` is refused (see the module doc's
    /// *Restore*).
    pub async fn restore_newest(
        &self,
        dest_dir: &Path,
        fingerprint: &str,
    ) -> Result<RestoreReport, RemoteError> {
        let started = Instant::now();
        let i = &self.inner;
        let mut known = i.known.lock().await;
        i.check_destination(dest_dir).await?;
        let ids = i.manifest_ids().await?;
        let mut tried: Vec<(u64, String)> = Vec::new();
        for &id in ids.iter().rev() {
            let manifest = match i.read_manifest(id).await? {
                Ok(m) => m,
                Err(reason) => {
                    tracing::warn!(store = %i.label, checkpoint = id, %reason,
                        "remote checkpoint is damaged; trying the previous one");
                    tried.push((id, reason));
                    continue;
                }
            };
            if manifest.fingerprint != fingerprint {
                return Err(RemoteError::FingerprintMismatch {
                    store: i.label.clone(),
                    checkpoint_id: id,
                    found: manifest.fingerprint,
                    expected: fingerprint.to_owned(),
                });
            }
            let temp = temp_beside(dest_dir, id);
            let fetched = match i.fetch_all(&manifest, &temp).await {
                Ok(bytes) => i.install(&temp, dest_dir).await.map(|()| bytes),
                Err(Fetch::Damaged(reason)) => {
                    remove_temp(&temp).await;
                    tracing::warn!(store = %i.label, checkpoint = id, %reason,
                        "remote checkpoint is damaged; trying the previous one");
                    tried.push((id, reason));
                    continue;
                }
                Err(Fetch::Failed(e)) => Err(e),
            };
            let bytes = match fetched {
                Ok(bytes) => bytes,
                Err(e) => {
                    remove_temp(&temp).await;
                    return Err(e);
                }
            };
            known.learn(&manifest, true);
            known.saw(ids.last().copied());
            let duration = started.elapsed();
            tracing::info!(store = %i.label, checkpoint = id, files = manifest.files.len(), bytes,
                skipped = tried.len(), took = ?duration, "remote checkpoint restored");
            return Ok(RestoreReport {
                manifest,
                bytes,
                skipped: tried,
                duration,
            });
        }
        Err(RemoteError::NoUsableCheckpoint {
            store: i.label.clone(),
            tried,
        })
    }
}

impl Inner {
    /// Fails unless `dest` is missing or an empty directory.
    async fn check_destination(&self, dest: &Path) -> Result<(), RemoteError> {
        match tokio::fs::symlink_metadata(dest).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io_error(dest, e)),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(RemoteError::DestinationNotEmpty {
                    store: self.label.clone(),
                    dir: dest.to_owned(),
                })
            }
        }
        let mut entries = tokio::fs::read_dir(dest)
            .await
            .map_err(|e| self.io_error(dest, e))?;
        match entries.next_entry().await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(RemoteError::DestinationNotEmpty {
                store: self.label.clone(),
                dir: dest.to_owned(),
            }),
            Err(e) => Err(self.io_error(dest, e)),
        }
    }

    /// Downloads every file of `m` into the new directory `temp`, at most
    /// `concurrency` at a time, checking sizes and hashes: the bytes.
    async fn fetch_all(self: &Arc<Self>, m: &Manifest, temp: &Path) -> Result<u64, Fetch> {
        if tokio::fs::symlink_metadata(temp).await.is_ok() {
            // Left by a restore that died: the name is ours.
            remove_temp(temp).await;
        }
        tokio::fs::create_dir_all(temp)
            .await
            .map_err(|e| Fetch::Failed(self.io_error(temp, e)))?;
        let mut pending = m.files.iter().cloned();
        let mut set = JoinSet::new();
        let mut bytes = 0;
        // Each turn but the last finishes one file.
        for _ in 0..=m.files.len() {
            while set.len() < self.concurrency {
                let Some(f) = pending.next() else { break };
                let inner = Arc::clone(self);
                let path = temp.join(&f.name);
                set.spawn(async move { inner.fetch_file(&f, &path).await });
            }
            let failed = match set.join_next().await {
                None => break,
                Some(Ok(Ok(n))) => {
                    bytes += n;
                    continue;
                }
                Some(Ok(Err(e))) => e,
                Some(Err(e)) => Fetch::Failed(self.io_error(
                    temp,
                    std::io::Error::other(format!("a download task failed: {e}")),
                )),
            };
            set.shutdown().await;
            return Err(failed);
        }
        sync_dir(temp)
            .await
            .map_err(|e| Fetch::Failed(self.io_error(temp, e)))?;
        Ok(bytes)
    }

    /// Downloads one file to `path` (synced), hashing it on the way.
    async fn fetch_file(&self, f: &ManifestFile, path: &Path) -> Result<u64, Fetch> {
        let key = self.key(&f.key);
        let Some(out) = self.get_object(&key).await.map_err(Fetch::Failed)? else {
            return Err(Fetch::Damaged(format!(
                "file {} ({key}) is missing",
                f.name
            )));
        };
        let io = |e| Fetch::Failed(self.io_error(path, e));
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut body = out.body;
        let mut hasher = Hasher::default();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Fetch::Failed(self.failure("GetObject", &key, e)))?;
            size += chunk.len() as u64;
            if size > f.size {
                return Err(Fetch::Damaged(format!(
                    "file {} ({key}) is larger than the {} bytes the manifest says",
                    f.name, f.size
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        if size != f.size {
            return Err(Fetch::Damaged(format!(
                "file {} ({key}) has {size} bytes, the manifest says {}",
                f.name, f.size
            )));
        }
        let sha = hasher.finish();
        if sha != f.sha256 {
            return Err(Fetch::Damaged(format!(
                "file {} ({key}) has sha256 {sha}, the manifest says {}",
                f.name, f.sha256
            )));
        }
        file.sync_all().await.map_err(io)?;
        Ok(size)
    }

    /// Renames the complete `temp` to `dest` (missing or empty).
    async fn install(&self, temp: &Path, dest: &Path) -> Result<(), RemoteError> {
        match tokio::fs::remove_dir(dest).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(self.io_error(dest, e));
            }
            _ => {}
        }
        tokio::fs::rename(temp, dest)
            .await
            .map_err(|e| self.io_error(dest, e))?;
        sync_dir(&parent(dest))
            .await
            .map_err(|e| self.io_error(dest, e))
    }
}

/// `.<dest name>.restore-<id>-<pid>` beside `dest`: on its file system, so
/// that the rename is one step.
fn temp_beside(dest: &Path, id: u64) -> PathBuf {
    let name = dest
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    parent(dest).join(format!(".{name}.restore-{id}-{}", std::process::id()))
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

async fn remove_temp(temp: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(temp).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %temp.display(), error = %e, "could not remove a partial restore");
        }
    }
}

/// Makes a directory's entries durable (a no-op where directories cannot
/// be opened).
async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        tokio::fs::File::open(dir).await?.sync_all().await
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
