//! Durable state: RocksDB column families and the checkpoint commit.
//!
//! Until the window engine lands, only `meta` is used: the config
//! fingerprint, the last checkpoint id and the per-partition positions.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};

use crate::record::Position;

const CF_META: &str = "meta";
const KEY_FINGERPRINT: &[u8] = b"fingerprint";
const KEY_CHECKPOINT: &[u8] = b"checkpoint";
const POSITION_PREFIX: &[u8] = b"pos/";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state in {dir} was written by a different configuration (fingerprint {found}, this config {expected}); keys, timestamps or [[features]] changed. Start over with --reset-state, or point [pipeline] state_dir elsewhere")]
    FingerprintMismatch {
        dir: String,
        found: String,
        expected: String,
    },
    #[error("state store: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("state store: corrupt entry {0}")]
    Corrupt(String),
}

/// Engine changes since the previous snapshot, committed with a checkpoint.
#[derive(Default)]
pub struct StateDelta {
    batch: WriteBatch,
}

impl StateDelta {
    pub fn empty() -> Self {
        StateDelta::default()
    }
}

#[derive(Clone)]
pub struct StateStore {
    db: Arc<DB>,
}

impl StateStore {
    pub fn open(dir: &Path, fingerprint: &str, reset: bool) -> Result<StateStore, StateError> {
        if reset && dir.exists() {
            DB::destroy(&Options::default(), dir)?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = vec![ColumnFamilyDescriptor::new(CF_META, Options::default())];
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let store = StateStore { db: Arc::new(db) };
        let meta = store.meta();
        match store.db.get_cf(meta, KEY_FINGERPRINT)? {
            Some(found) if found != fingerprint.as_bytes() => {
                return Err(StateError::FingerprintMismatch {
                    dir: dir.display().to_string(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                    expected: fingerprint.to_string(),
                })
            }
            Some(_) => {}
            None => store.db.put_cf(meta, KEY_FINGERPRINT, fingerprint)?,
        }
        Ok(store)
    }

    fn meta(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(CF_META)
            .expect("meta column family is created on open")
    }

    pub fn committed_checkpoint(&self) -> Result<u64, StateError> {
        match self.db.get_cf(self.meta(), KEY_CHECKPOINT)? {
            None => Ok(0),
            Some(v) => {
                Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(
                    |_| StateError::Corrupt("checkpoint id".into()),
                )?))
            }
        }
    }

    pub fn committed_positions(&self) -> Result<Vec<Position>, StateError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.meta(), POSITION_PREFIX) {
            let (k, v) = item?;
            if !k.starts_with(POSITION_PREFIX) {
                break;
            }
            let pos: Position = serde_json::from_slice(&v).map_err(|e| {
                StateError::Corrupt(format!("position {}: {e}", String::from_utf8_lossy(&k)))
            })?;
            out.push(pos);
        }
        Ok(out)
    }

    pub fn commit(
        &self,
        checkpoint_id: u64,
        delta: StateDelta,
        positions: &[Position],
    ) -> Result<(), StateError> {
        let mut batch = delta.batch;
        let meta = self.meta();
        for p in positions {
            let mut key = POSITION_PREFIX.to_vec();
            key.extend_from_slice(p.partition.as_bytes());
            let value = serde_json::to_vec(p).map_err(|e| StateError::Corrupt(e.to_string()))?;
            batch.put_cf(meta, key, value);
        }
        batch.put_cf(meta, KEY_CHECKPOINT, checkpoint_id.to_be_bytes());
        self.db.write(batch)?;
        Ok(())
    }
}
