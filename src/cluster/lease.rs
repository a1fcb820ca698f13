//! One lease: a row of the lease table, in the format KCL 3.x writes
//! (`DynamoDBLeaseSerializer`), with shardflow's attributes beside KCL's.
//!
//! KCL's attributes and their DynamoDB types, as its serializer writes them:
//!
//! | attribute | type | when written |
//! |---|---|---|
//! | `leaseKey` | S | always: the shard id (the hash key) |
//! | `leaseCounter` | N | always |
//! | `leaseOwner` | S | when owned |
//! | `ownerSwitchesSinceCheckpoint` | N | always |
//! | `checkpoint` | S | always: a sequence number or a sentinel |
//! | `checkpointSubSequenceNumber` | N | always (0 with a sentinel) |
//! | `pendingCheckpoint`, `pendingCheckpointSubSequenceNumber` | S, N | while a checkpoint is prepared |
//! | `pendingCheckpointState` | B | with a prepared checkpoint's state |
//! | `parentShardId`, `childShardIds` | SS | when not empty (DynamoDB has no empty set) |
//! | `startingHashKey`, `endingHashKey` | S | decimal 128-bit integers |
//! | `throughputKBps` | N | a double, when measured |
//! | `checkpointOwner` | S | during a graceful handoff: the old owner |
//! | `entityType` | S | `LEASE` |
//!
//! KCL 3 keeps other entities in the same table, keyed by `leaseKey` too:
//! worker metrics (`entityType = WORKER_METRIC_STATS`) and coordinator state
//! (`STREAM`, `LEADER`, `CLIENT_VERSION_MIGRATION`, `TABLE_MIGRATION`). A row
//! without `entityType` is a lease written before KCL 3. [`Lease::from_item`]
//! reads both kinds of lease rows, returns `None` for the other entities and
//! ignores attributes it does not know, so KCL's and shardflow's workers can
//! read each other's rows.
//!
//! shardflow's own attributes: [`SNAPSHOT`] (where the shard's state snapshot
//! of the checkpoint is, S), [`WATERMARK`] (the shard's watermark at the
//! checkpoint, N, epoch ms) and [`OWNER_ADDRESS`] (the API address of the
//! worker that actually owns the lease, S).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::time::Millis;

/// A lease table row: attribute name to value.
pub type Item = HashMap<String, AttributeValue>;

// KCL's attribute names (`DynamoDBLeaseSerializer`).
pub const LEASE_KEY: &str = "leaseKey";
pub const LEASE_OWNER: &str = "leaseOwner";
pub const LEASE_COUNTER: &str = "leaseCounter";
pub const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
pub const CHECKPOINT: &str = "checkpoint";
pub const CHECKPOINT_SUB: &str = "checkpointSubSequenceNumber";
pub const PENDING_CHECKPOINT: &str = "pendingCheckpoint";
pub const PENDING_CHECKPOINT_SUB: &str = "pendingCheckpointSubSequenceNumber";
pub const PENDING_CHECKPOINT_STATE: &str = "pendingCheckpointState";
pub const PARENT_SHARD_IDS: &str = "parentShardId";
pub const CHILD_SHARD_IDS: &str = "childShardIds";
pub const STARTING_HASH_KEY: &str = "startingHashKey";
pub const ENDING_HASH_KEY: &str = "endingHashKey";
pub const THROUGHPUT_KBPS: &str = "throughputKBps";
pub const CHECKPOINT_OWNER: &str = "checkpointOwner";
pub const ENTITY_TYPE: &str = "entityType";
/// The `entityType` of a lease.
pub const ENTITY_LEASE: &str = "LEASE";

// shardflow's attributes; the prefix keeps them clear of any name KCL adds.
pub const SNAPSHOT: &str = "shardflowSnapshot";
pub const WATERMARK: &str = "shardflowWatermark";
pub const OWNER_ADDRESS: &str = "shardflowOwnerAddress";

/// Where processing of a shard resumes: KCL's `ExtendedSequenceNumber`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// After this record (`sub`: the KPL sub-record within it, 0 for a
    /// plain record).
    Sequence {
        seq: String,
        sub: u64,
    },
    TrimHorizon,
    Latest,
    /// At the consumer's configured timestamp (KCL stores no time with it).
    AtTimestamp,
    /// The shard is closed and fully processed: its children may start.
    ShardEnd,
}

impl Checkpoint {
    /// The `checkpoint` attribute: the sequence number or the sentinel.
    pub fn sequence_number(&self) -> &str {
        match self {
            Checkpoint::Sequence { seq, .. } => seq,
            Checkpoint::TrimHorizon => "TRIM_HORIZON",
            Checkpoint::Latest => "LATEST",
            Checkpoint::AtTimestamp => "AT_TIMESTAMP",
            Checkpoint::ShardEnd => "SHARD_END",
        }
    }

    /// The `checkpointSubSequenceNumber` attribute (0 with a sentinel, as KCL
    /// writes it).
    pub fn sub_sequence_number(&self) -> u64 {
        match self {
            Checkpoint::Sequence { sub, .. } => *sub,
            _ => 0,
        }
    }

    /// Reads the two attributes back. KCL ignores the sub-sequence number of
    /// a sentinel, and so does this; anything but a sentinel or decimal
    /// digits is refused.
    pub fn from_parts(seq: &str, sub: u64) -> Result<Checkpoint, String> {
        Ok(match seq {
            "TRIM_HORIZON" => Checkpoint::TrimHorizon,
            "LATEST" => Checkpoint::Latest,
            "AT_TIMESTAMP" => Checkpoint::AtTimestamp,
            "SHARD_END" => Checkpoint::ShardEnd,
            s if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Checkpoint::Sequence {
                seq: s.to_owned(),
                sub,
            },
            s => return Err(format!("{s:?} is neither a sequence number nor a sentinel")),
        })
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Checkpoint::Sequence { seq, sub } if *sub != 0 => write!(f, "{seq}/{sub}"),
            c => f.write_str(c.sequence_number()),
        }
    }
}

/// A shard's range of hash keys, both ends included (as Kinesis states it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKeyRange {
    pub start: u128,
    pub end: u128,
}

/// One lease, as stored. The table's copy is the truth: every write
/// conditions on fields of a copy read from it (see `table.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The shard id.
    pub lease_key: String,
    /// The worker the lease is assigned to; during a graceful handoff the
    /// worker it goes to.
    pub owner: Option<String>,
    /// Bumped by every write of the holder (renewals, checkpoints) and by
    /// every change of owner: a counter that stops moving is an expired lease.
    pub counter: u64,
    pub checkpoint: Checkpoint,
    pub pending_checkpoint: Option<Checkpoint>,
    pub pending_checkpoint_state: Option<Vec<u8>>,
    pub owner_switches_since_checkpoint: u64,
    pub parent_shard_ids: BTreeSet<String>,
    pub child_shard_ids: BTreeSet<String>,
    pub hash_key_range: Option<HashKeyRange>,
    pub throughput_kbps: Option<f64>,
    /// Set only during a graceful handoff: the old owner, who still holds the
    /// lease (renews and checkpoints) until it releases it to `owner`.
    pub checkpoint_owner: Option<String>,
    /// shardflow: where the state snapshot of `checkpoint` is.
    pub snapshot: Option<String>,
    /// shardflow: the shard's watermark at `checkpoint`.
    pub watermark: Option<Millis>,
    /// shardflow: the API address of [`Lease::actual_owner`].
    pub owner_address: Option<String>,
}

impl Lease {
    /// A new, unowned lease of `shard_id`, to start from `checkpoint`.
    pub fn new(shard_id: impl Into<String>, checkpoint: Checkpoint) -> Lease {
        Lease {
            lease_key: shard_id.into(),
            owner: None,
            counter: 0,
            checkpoint,
            pending_checkpoint: None,
            pending_checkpoint_state: None,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: BTreeSet::new(),
            child_shard_ids: BTreeSet::new(),
            hash_key_range: None,
            throughput_kbps: None,
            checkpoint_owner: None,
            snapshot: None,
            watermark: None,
            owner_address: None,
        }
    }

    /// The worker that holds the lease now: the old owner while a handoff
    /// is pending, else the owner (KCL's `actualOwner`).
    pub fn actual_owner(&self) -> Option<&str> {
        self.checkpoint_owner.as_deref().or(self.owner.as_deref())
    }

    /// Whether a graceful handoff is pending (KCL's `shutdownRequested`).
    pub fn handoff_pending(&self) -> bool {
        self.checkpoint_owner.is_some()
    }

    /// The row KCL's `toDynamoRecord` writes for this lease, with
    /// shardflow's attributes. Absent and empty values are left out: KCL
    /// refuses empty strings and DynamoDB empty sets.
    pub fn to_item(&self) -> Item {
        let mut item = Item::new();
        let mut put = |name: &str, value: AttributeValue| {
            item.insert(name.to_owned(), value);
        };
        put(LEASE_KEY, s(&self.lease_key));
        put(LEASE_COUNTER, n(self.counter));
        if let Some(owner) = nonempty(&self.owner) {
            put(LEASE_OWNER, s(owner));
        }
        put(OWNER_SWITCHES, n(self.owner_switches_since_checkpoint));
        put(CHECKPOINT, s(self.checkpoint.sequence_number()));
        put(CHECKPOINT_SUB, n(self.checkpoint.sub_sequence_number()));
        if let Some(pending) = &self.pending_checkpoint {
            put(PENDING_CHECKPOINT, s(pending.sequence_number()));
            put(PENDING_CHECKPOINT_SUB, n(pending.sub_sequence_number()));
        }
        if let Some(state) = &self.pending_checkpoint_state {
            // KCL's `toDynamoRecord` writes a number here by mistake; its
            // reader and `updateLease` use bytes, as this does.
            put(
                PENDING_CHECKPOINT_STATE,
                AttributeValue::B(Blob::new(state.clone())),
            );
        }
        if !self.parent_shard_ids.is_empty() {
            put(PARENT_SHARD_IDS, ss(&self.parent_shard_ids));
        }
        if !self.child_shard_ids.is_empty() {
            put(CHILD_SHARD_IDS, ss(&self.child_shard_ids));
        }
        if let Some(range) = self.hash_key_range {
            put(STARTING_HASH_KEY, s(&range.start.to_string()));
            put(ENDING_HASH_KEY, s(&range.end.to_string()));
        }
        if let Some(kbps) = self.throughput_kbps {
            put(THROUGHPUT_KBPS, n(kbps));
        }
        if let Some(owner) = nonempty(&self.checkpoint_owner) {
            put(CHECKPOINT_OWNER, s(owner));
        }
        put(ENTITY_TYPE, s(ENTITY_LEASE));
        if let Some(snapshot) = nonempty(&self.snapshot) {
            put(SNAPSHOT, s(snapshot));
        }
        if let Some(watermark) = self.watermark {
            put(WATERMARK, n(watermark));
        }
        if let Some(address) = nonempty(&self.owner_address) {
            put(OWNER_ADDRESS, s(address));
        }
        item
    }

    /// Reads a row: `Ok(None)` for another entity of a KCL 3 table, an error
    /// for a lease row that cannot be read (a wrong type, a number that is
    /// not one, no `leaseKey` or `checkpoint`).
    pub fn from_item(item: &Item) -> Result<Option<Lease>, String> {
        let row = Row(item);
        match row.string(ENTITY_TYPE)? {
            None | Some(ENTITY_LEASE) => {}
            Some(_) => return Ok(None),
        }
        let lease_key = row
            .string(LEASE_KEY)?
            .ok_or_else(|| format!("no {LEASE_KEY}"))?
            .to_owned();
        let checkpoint = Checkpoint::from_parts(
            row.string(CHECKPOINT)?
                .ok_or_else(|| format!("no {CHECKPOINT}"))?,
            row.number(CHECKPOINT_SUB)?.unwrap_or(0),
        )?;
        let pending_checkpoint = match row.string(PENDING_CHECKPOINT)? {
            Some(seq) if !seq.is_empty() => Some(Checkpoint::from_parts(
                seq,
                row.number(PENDING_CHECKPOINT_SUB)?.unwrap_or(0),
            )?),
            _ => None,
        };
        let hash_key_range = match (
            row.string(STARTING_HASH_KEY)?.filter(|h| !h.is_empty()),
            row.string(ENDING_HASH_KEY)?.filter(|h| !h.is_empty()),
        ) {
            (Some(start), Some(end)) => {
                let parse = |name: &str, text: &str| {
                    text.parse::<u128>()
                        .map_err(|_| format!("{name} {text:?} is not a 128-bit hash key"))
                };
                let range = HashKeyRange {
                    start: parse(STARTING_HASH_KEY, start)?,
                    end: parse(ENDING_HASH_KEY, end)?,
                };
                if range.start > range.end {
                    return Err(format!("hash key range {start}..{end} is empty"));
                }
                Some(range)
            }
            _ => None,
        };
        Ok(Some(Lease {
            lease_key,
            owner: row.owned_string(LEASE_OWNER)?,
            counter: row.number(LEASE_COUNTER)?.unwrap_or(0),
            checkpoint,
            pending_checkpoint,
            pending_checkpoint_state: row.bytes(PENDING_CHECKPOINT_STATE),
            owner_switches_since_checkpoint: row.number(OWNER_SWITCHES)?.unwrap_or(0),
            parent_shard_ids: row.string_set(PARENT_SHARD_IDS)?,
            child_shard_ids: row.string_set(CHILD_SHARD_IDS)?,
            hash_key_range,
            throughput_kbps: row.number(THROUGHPUT_KBPS)?,
            checkpoint_owner: row.owned_string(CHECKPOINT_OWNER)?,
            snapshot: row.owned_string(SNAPSHOT)?,
            watermark: row.number(WATERMARK)?,
            owner_address: row.owned_string(OWNER_ADDRESS)?,
        }))
    }
}

pub(crate) fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

pub(crate) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn ss(values: &BTreeSet<String>) -> AttributeValue {
    AttributeValue::Ss(values.iter().cloned().collect())
}

fn nonempty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// Typed reads of a row's attributes; each error names the attribute.
struct Row<'a>(&'a Item);

impl<'a> Row<'a> {
    fn string(&self, name: &str) -> Result<Option<&'a str>, String> {
        match self.0.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::S(v)) => Ok(Some(v)),
            Some(other) => Err(wrong_type(name, "S", other)),
        }
    }

    /// An owner or an address: empty counts as absent.
    fn owned_string(&self, name: &str) -> Result<Option<String>, String> {
        Ok(self
            .string(name)?
            .filter(|v| !v.is_empty())
            .map(str::to_owned))
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        match self.0.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(v)) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{name} = {v} is out of range")),
            Some(other) => Err(wrong_type(name, "N", other)),
        }
    }

    fn string_set(&self, name: &str) -> Result<BTreeSet<String>, String> {
        match self.0.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(BTreeSet::new()),
            Some(AttributeValue::Ss(v)) => Ok(v.iter().cloned().collect()),
            Some(other) => Err(wrong_type(name, "SS", other)),
        }
    }

    /// Bytes only: KCL's `toDynamoRecord` may have left a number here (see
    /// [`Lease::to_item`]), which holds no state.
    fn bytes(&self, name: &str) -> Option<Vec<u8>> {
        match self.0.get(name) {
            Some(AttributeValue::B(b)) => Some(b.as_ref().to_vec()),
            _ => None,
        }
    }
}

fn wrong_type(name: &str, want: &str, got: &AttributeValue) -> String {
    let got = match got {
        AttributeValue::S(_) => "S",
        AttributeValue::N(_) => "N",
        AttributeValue::B(_) => "B",
        AttributeValue::Ss(_) => "SS",
        AttributeValue::Ns(_) => "NS",
        AttributeValue::Bs(_) => "BS",
        AttributeValue::M(_) => "M",
        AttributeValue::L(_) => "L",
        AttributeValue::Bool(_) => "BOOL",
        _ => "another type",
    };
    format!("{name} is {got}, not {want}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Lease {
        Lease {
            owner: Some("w1".into()),
            counter: 7,
            pending_checkpoint: Some(Checkpoint::Sequence {
                seq: "49590338271490256608559692540925702759324208523137515618".into(),
                sub: 3,
            }),
            pending_checkpoint_state: Some(vec![0, 1, 255]),
            owner_switches_since_checkpoint: 2,
            parent_shard_ids: ["shardId-000000000000".to_owned()].into(),
            child_shard_ids: ["shardId-000000000002".into(), "shardId-000000000003".into()].into(),
            hash_key_range: Some(HashKeyRange {
                start: 0,
                end: u128::MAX,
            }),
            throughput_kbps: Some(12.5),
            checkpoint_owner: Some("w0".into()),
            snapshot: Some("s3://b/p/ckpt-9".into()),
            watermark: Some(-5),
            owner_address: Some("10.0.0.1:9100".into()),
            ..Lease::new("shardId-000000000001", Checkpoint::ShardEnd)
        }
    }

    #[test]
    fn every_field_round_trips() {
        let lease = full();
        assert_eq!(Lease::from_item(&lease.to_item()), Ok(Some(lease)));
        let bare = Lease::new("shardId-0", Checkpoint::Latest);
        let item = bare.to_item();
        assert_eq!(item.len(), 6, "{item:?}");
        assert_eq!(Lease::from_item(&item), Ok(Some(bare)));
    }

    #[test]
    fn checkpoints_read_as_kcl_writes_them() {
        for c in [
            Checkpoint::TrimHorizon,
            Checkpoint::Latest,
            Checkpoint::AtTimestamp,
            Checkpoint::ShardEnd,
            Checkpoint::Sequence {
                seq: "1".into(),
                sub: 0,
            },
        ] {
            let back = Checkpoint::from_parts(c.sequence_number(), c.sub_sequence_number());
            assert_eq!(back, Ok(c));
        }
        assert_eq!(Checkpoint::from_parts("LATEST", 4), Ok(Checkpoint::Latest));
        assert!(Checkpoint::from_parts("", 0).is_err());
        assert!(Checkpoint::from_parts("12a", 0).is_err());
    }

    #[test]
    fn other_entities_are_skipped_and_bad_rows_named() {
        let mut item = full().to_item();
        item.insert(ENTITY_TYPE.into(), s("WORKER_METRIC_STATS"));
        assert_eq!(Lease::from_item(&item), Ok(None));
        let mut item = full().to_item();
        item.remove(ENTITY_TYPE);
        item.insert("someoneElse".into(), AttributeValue::Bool(true));
        assert!(Lease::from_item(&item).unwrap().is_some());
        item.insert(LEASE_COUNTER.into(), s("3"));
        assert_eq!(
            Lease::from_item(&item),
            Err("leaseCounter is S, not N".into())
        );
        item.insert(LEASE_COUNTER.into(), n("-1"));
        assert!(Lease::from_item(&item)
            .unwrap_err()
            .contains("out of range"));
    }
}
