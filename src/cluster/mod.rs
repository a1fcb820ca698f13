//! Shards shared by several `shardflow run` processes through a lease table
//! in DynamoDB, in the format of the Kinesis Client Library 3.x, so the
//! table reads the same to KCL's tools (and a KCL application's table to
//! shardflow).
//!
//! # The lease model
//!
//! One row per shard ([`Lease`], keyed by the shard id). A worker *holds* a
//! lease when it is the row's [`Lease::actual_owner`]: `leaseOwner`, or
//! `checkpointOwner` while a graceful handoff is pending. Holding is proved
//! by the `leaseCounter`: the holder bumps it on every renewal and
//! checkpoint, every change of owner bumps it, and another worker that sees
//! it stand still for longer than the lease duration may take the lease.
//! No clock is compared between machines; only the counter a worker read
//! and what it still finds in the table.
//!
//! # Every write is conditional
//!
//! A write states what it read, and DynamoDB applies it only if the row
//! still says so; otherwise it fails with [`LeaseError::Lost`] ("the lease
//! moved") and changes nothing. What each condition fences:
//!
//! | operation | condition | what it prevents |
//! |---|---|---|
//! | [`LeaseTable::create_if_absent`] | no row with the key | two workers discovering a shard create its lease once; a second create is [`Created::AlreadyExists`] |
//! | [`LeaseTable::renew`] | counter as read, and held by me | renewing a lease someone took meanwhile (the take bumped the counter) |
//! | [`LeaseTable::take`] | counter as read | two takers of one expired lease both winning: the first bumps the counter, the second's condition fails |
//! | [`LeaseTable::checkpoint`] | counter as read, and held by me | a worker that lost the lease writing a checkpoint over the new holder's: the fencing that keeps one writer of a shard's position and state |
//! | [`LeaseTable::request_handoff`] | owner as read, no handoff pending | handing off a lease that changed hands, or two handoffs at once |
//! | [`LeaseTable::release`] | owner fields as read | releasing (or evicting) a lease that changed hands since it was read |
//! | [`LeaseTable::delete`] | counter as read | deleting a lease someone holds and renews |
//!
//! The checkpoint's condition is stricter than KCL's (the counter only,
//! its renewer and checkpointer sharing one copy of the lease): the holder
//! is checked too, which costs nothing and keeps the fence if a caller's
//! copy goes wrong. The counter keeps out a worker that lost the lease and
//! took it back since, whose copy predates the loss. A worker therefore
//! serialises its renewals and checkpoints of one lease through one copy,
//! the lease each write returns.
//!
//! A write whose answer was lost (a timeout, a dropped connection) is sent
//! again, and then finds its own earlier write in the row. When the row a
//! failed condition returns is what the write would have made, the write
//! counts as done, as KCL's renewal does. Throttling and other transient
//! failures are retried within [`Retry`]'s bounds; then the operation fails
//! with [`LeaseError::Failed`], naming the table.
//!
//! # Graceful handoff
//!
//! [`LeaseTable::request_handoff`] sets `leaseOwner` to the new worker and
//! `checkpointOwner` to the old one, who goes on holding the lease: it
//! renews, finishes what it has in flight, writes its last checkpoint and
//! [`LeaseTable::release`]s the lease, which removes `checkpointOwner` and
//! so hands the lease to `leaseOwner`. If the old owner dies first, the
//! counter stops and the new worker takes the lease like any expired one.

mod error;
mod expr;
pub mod lease;
mod schema;
mod table;

pub use self::error::LeaseError;
pub use self::lease::{Checkpoint, HashKeyRange, Lease};
pub use self::schema::{ENSURE_TIMEOUT, OWNER_INDEX};
pub use self::table::{Created, LeaseTable, Progress, Retry};

/// Leases this worker holds now (a gauge; KCL's `CurrentLeases`).
pub const METRIC_CURRENT_LEASES: &str = "shardflow_cluster_current_leases";
/// Leases this worker took (KCL's `TakenLeases`).
pub const METRIC_TAKEN_LEASES: &str = "shardflow_cluster_taken_leases_total";
/// Leases this worker lost (KCL's `LostLeases`).
pub const METRIC_LOST_LEASES: &str = "shardflow_cluster_lost_leases_total";
