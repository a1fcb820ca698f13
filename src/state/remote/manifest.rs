//! The manifest of a remote checkpoint, the object names, and file hashing.

use std::collections::HashSet;
use std::io::Read as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The manifest format this shardflow writes and reads.
pub const FORMAT: u32 = 1;

/// Where manifests live under the store's prefix.
pub(super) const MANIFESTS: &str = "manifests/";
/// Where checkpoint files live under the store's prefix.
pub(super) const FILES: &str = "files/";

/// The manifest of one remote checkpoint: `manifests/<id, 20 digits>.json`
/// under the store's prefix, written after every file it names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`] when written by this shardflow.
    pub format: u32,
    /// The checkpoint id the RocksDB checkpoint holds (its last commit).
    pub checkpoint_id: u64,
    /// When the manifest was written, in epoch milliseconds.
    pub created_at: u64,
    /// The state fingerprint of the configuration that wrote the state.
    pub fingerprint: String,
    /// What the caller stores beside the files (positions, watermarks, ...),
    /// opaque to the store.
    pub meta: serde_json::Value,
    /// Every file of the RocksDB checkpoint, by name.
    pub files: Vec<ManifestFile>,
}

/// One file of a remote checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// The file's name in the checkpoint directory (`000123.sst`, `CURRENT`).
    pub name: String,
    /// Its object key relative to the store's prefix:
    /// `files/<name>.<first 16 hex digits of sha256>`.
    pub key: String,
    /// Its length in bytes.
    pub size: u64,
    /// The SHA-256 of its content, 64 lowercase hex digits.
    pub sha256: String,
}

/// What [`RemoteStore::newest_manifest`](super::RemoteStore::newest_manifest)
/// tells about the newest readable manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestSummary {
    pub checkpoint_id: u64,
    /// Epoch milliseconds.
    pub created_at: u64,
    pub fingerprint: String,
}

impl Manifest {
    pub fn summary(&self) -> ManifestSummary {
        ManifestSummary {
            checkpoint_id: self.checkpoint_id,
            created_at: self.created_at,
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Total bytes of its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Whether it can be restored as a RocksDB directory: plain, distinct
    /// file names (nothing that leaves the directory), keys as
    /// [`file_key`] names them, well-formed hashes, and a `CURRENT` file
    /// (without one, opening the directory would create an empty DB: a
    /// silent fresh start).
    pub(super) fn validate(&self, id: u64) -> Result<(), String> {
        if self.checkpoint_id != id {
            return Err(format!(
                "it names checkpoint {} inside, not {id}",
                self.checkpoint_id
            ));
        }
        let mut names = HashSet::new();
        for f in &self.files {
            if !plain_name(&f.name) {
                return Err(format!("file name {:?} is not a plain file name", f.name));
            }
            if !names.insert(f.name.as_str()) {
                return Err(format!("file {} is listed twice", f.name));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("file {} has a malformed sha256", f.name));
            }
            if f.key != file_key(&f.name, &f.sha256) {
                return Err(format!(
                    "file {} has key {:?}, not {:?}",
                    f.name,
                    f.key,
                    file_key(&f.name, &f.sha256)
                ));
            }
        }
        if !names.contains("CURRENT") {
            return Err("it names no CURRENT file (not a RocksDB checkpoint)".into());
        }
        Ok(())
    }

    /// Reads a manifest: `Err` says why it cannot be used (a damaged
    /// manifest), `Ok(Err(found))` that it is of another format.
    pub(super) fn parse(bytes: &[u8], id: u64) -> Result<Result<Manifest, u32>, String> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let format = value.get("format").and_then(|f| f.as_u64());
        match format {
            Some(f) if f == u64::from(FORMAT) => {}
            Some(f) => return Ok(Err(u32::try_from(f).unwrap_or(u32::MAX))),
            None => return Err("manifest has no format version".into()),
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| format!("manifest is malformed: {e}"))?;
        manifest.validate(id)?;
        Ok(Ok(manifest))
    }
}

/// A name RocksDB could have written into its directory.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= 255
}

/// The key, relative to the store's prefix, of a file's content.
pub fn file_key(name: &str, sha256: &str) -> String {
    format!("{FILES}{name}.{}", &sha256[..16.min(sha256.len())])
}

/// The key, relative to the store's prefix, of checkpoint `id`'s manifest.
pub fn manifest_key(id: u64) -> String {
    format!("{MANIFESTS}{id:020}.json")
}

/// The checkpoint id of a manifest key relative to the prefix, if it is
/// one (`manifests/` + 20 digits + `.json`).
pub(super) fn manifest_id(rel_key: &str) -> Option<u64> {
    let digits = rel_key.strip_prefix(MANIFESTS)?.strip_suffix(".json")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// SHA-256 of bytes as lowercase hex.
pub(super) fn hex(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(digest.len() * 2);
    for b in digest {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// An incremental SHA-256.
#[derive(Default)]
pub(super) struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> String {
        hex(&self.0.finalize())
    }
}

/// The size and SHA-256 of a file, read in chunks (blocking).
pub(super) fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut hasher = Hasher::default();
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let sha = hex(&Sha256::digest(b"x"));
        Manifest {
            format: FORMAT,
            checkpoint_id: 7,
            created_at: 1,
            fingerprint: "fp".into(),
            meta: serde_json::json!({"positions": []}),
            files: vec![ManifestFile {
                name: "CURRENT".into(),
                key: file_key("CURRENT", &sha),
                size: 1,
                sha256: sha,
            }],
        }
    }

    #[test]
    fn keys_are_zero_padded_and_content_addressed() {
        assert_eq!(manifest_key(42), "manifests/00000000000000000042.json");
        assert_eq!(manifest_id("manifests/00000000000000000042.json"), Some(42));
        assert_eq!(manifest_id("manifests/42.json"), None);
        assert_eq!(manifest_id("files/00000000000000000042.json"), None);
        let sha = hex(&Sha256::digest(b"abc"));
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            file_key("000012.sst", &sha),
            "files/000012.sst.ba7816bf8f01cfea"
        );
    }

    #[test]
    fn manifests_round_trip_and_damage_is_named() {
        let m = manifest();
        let bytes = serde_json::to_vec(&m).unwrap();
        assert_eq!(Manifest::parse(&bytes, 7), Ok(Ok(m.clone())));
        assert!(Manifest::parse(&bytes, 8)
            .unwrap_err()
            .contains("checkpoint 7"));
        assert!(Manifest::parse(b"{", 7).unwrap_err().contains("not JSON"));
        let mut newer = serde_json::to_value(&m).unwrap();
        newer["format"] = 2.into();
        assert_eq!(Manifest::parse(newer.to_string().as_bytes(), 7), Ok(Err(2)));

        let mut escape = m.clone();
        escape.files[0].name = "../CURRENT".into();
        assert!(escape.validate(7).unwrap_err().contains("plain file name"));
        let mut no_current = m.clone();
        no_current.files[0].name = "OPTIONS-000007".into();
        no_current.files[0].key = file_key("OPTIONS-000007", &m.files[0].sha256);
        assert!(no_current.validate(7).unwrap_err().contains("CURRENT"));
        let mut twice = m.clone();
        twice.files.push(m.files[0].clone());
        assert!(twice.validate(7).unwrap_err().contains("twice"));
        let mut moved = m;
        moved.files[0].key = "files/elsewhere".into();
        assert!(moved.validate(7).unwrap_err().contains("has key"));
    }
}
