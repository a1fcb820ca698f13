//! The lease table against a real DynamoDB peer (dynoxide, embedded, on
//! 127.0.0.1): KCL's schema, conditional writes fencing two workers, a
//! graceful handoff, every field through the table, rows of other entities
//! and rows written as KCL writes them.

mod dynamo;

use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeValue, BillingMode, KeyType, ProjectionType, ScalarAttributeType,
};
use dynamo::{n, row, s, ss, DynamoServer, Row};
use shardflow::cluster::{
    Checkpoint, Created, HashKeyRange, Lease, LeaseError, LeaseTable, Progress, OWNER_INDEX,
};

const TABLE: &str = "shardflow-leases";
const SHARD: &str = "shardId-000000000001";

/// Every test's body, bounded in time.
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("the test took over 60 s");
}

async fn ready(server: &DynamoServer, worker: &str) -> LeaseTable {
    let table = server.table(TABLE, worker).await;
    table.ensure().await.unwrap();
    table
}

fn assert_lost<T: std::fmt::Debug>(result: Result<T, LeaseError>, holder: Option<&str>) {
    match result {
        Err(LeaseError::Lost { table, current, .. }) => {
            assert_eq!(table, TABLE);
            let now = current.expect("the row as it is now");
            assert_eq!(now.actual_owner(), holder, "{now:?}");
        }
        other => panic!("expected Lost, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_creates_kcls_table_once() {
    bounded(async {
        let server = DynamoServer::start().await;
        let table = ready(&server, "w1").await;
        table.ensure().await.unwrap();

        let client = server.client().await;
        let names = client.list_tables().send().await.unwrap();
        assert_eq!(names.table_names(), [TABLE]);
        let d = client
            .describe_table()
            .table_name(TABLE)
            .send()
            .await
            .unwrap();
        let d = d.table().unwrap();
        let keys: Vec<_> = d
            .key_schema()
            .iter()
            .map(|k| (k.attribute_name(), k.key_type().as_str()))
            .collect();
        assert_eq!(keys, [("leaseKey", "HASH")]);
        let mode = d.billing_mode_summary().and_then(|b| b.billing_mode());
        assert_eq!(mode, Some(&BillingMode::PayPerRequest));
        let index = &d.global_secondary_indexes()[0];
        assert_eq!(index.index_name(), Some(OWNER_INDEX));
        let keys: Vec<_> = index
            .key_schema()
            .iter()
            .map(|k| (k.attribute_name(), k.key_type().as_str()))
            .collect();
        assert_eq!(keys, [("leaseOwner", "HASH"), ("leaseKey", "RANGE")]);
        let projection = index.projection().and_then(|p| p.projection_type());
        assert_eq!(projection, Some(&ProjectionType::KeysOnly));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_refuses_a_table_with_other_keys() {
    bounded(async {
        let server = DynamoServer::start().await;
        use KeyType::{Hash, Range};
        use ScalarAttributeType::{N, S};
        server
            .create_table("orders", &[("pk", Hash, S), ("sk", Range, S)])
            .await;
        server
            .create_table("numbered", &[("leaseKey", Hash, N)])
            .await;

        let err = server
            .table("orders", "w1")
            .await
            .ensure()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "table orders is not a lease table: its key is pk (HASH, S), sk (RANGE, S), a KCL \
             lease table's is leaseKey (HASH, S) alone; name another table, or delete this one"
        );
        let err = server
            .table("numbered", "w1")
            .await
            .ensure()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("its key is leaseKey (HASH, N)"),
            "{err}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_adds_the_owner_index_to_a_kcl2_table() {
    bounded(async {
        let server = DynamoServer::start().await;
        let client = server.client().await;
        let kcl2 = [("leaseKey", KeyType::Hash, ScalarAttributeType::S)];
        server.create_table(TABLE, &kcl2).await;
        ready(&server, "w1").await;
        let d = client
            .describe_table()
            .table_name(TABLE)
            .send()
            .await
            .unwrap();
        let indexes: Vec<_> = d
            .table()
            .unwrap()
            .global_secondary_indexes()
            .iter()
            .map(|i| i.index_name().unwrap())
            .collect();
        assert_eq!(indexes, [OWNER_INDEX]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_if_absent_creates_once() {
    bounded(async {
        let server = DynamoServer::start().await;
        let a = ready(&server, "a").await;
        let lease = Lease::new(SHARD, Checkpoint::TrimHorizon);
        assert_eq!(a.create_if_absent(&lease).await.unwrap(), Created::Created);
        let other = Lease::new(SHARD, Checkpoint::Latest);
        assert_eq!(
            a.create_if_absent(&other).await.unwrap(),
            Created::AlreadyExists
        );
        assert_eq!(a.get(SHARD).await.unwrap(), Some(lease));
        assert_eq!(a.get("shardId-000000000009").await.unwrap(), None);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_fence_each_other() {
    bounded(async {
        let server = DynamoServer::start().await;
        let a = ready(&server, "worker-a")
            .await
            .with_address("127.0.0.1:9101");
        let b = ready(&server, "worker-b")
            .await
            .with_address("127.0.0.1:9102");
        a.create_if_absent(&Lease::new(SHARD, Checkpoint::TrimHorizon))
            .await
            .unwrap();

        // A takes an unowned lease and renews it.
        let a1 = a.take(&a.get(SHARD).await.unwrap().unwrap()).await.unwrap();
        assert_eq!((a1.owner.as_deref(), a1.counter), (Some("worker-a"), 1));
        assert_eq!(a1.owner_switches_since_checkpoint, 0);
        assert_eq!(a1.owner_address.as_deref(), Some("127.0.0.1:9101"));
        let a2 = a.renew(&a1).await.unwrap();
        let stale_b = b.get(SHARD).await.unwrap().unwrap();
        let a3 = a.renew(&a2).await.unwrap();
        assert_eq!(a3.counter, 3);

        // Copies read before A's last renewal are refused, A's own included.
        assert_lost(a.renew(&a1).await, Some("worker-a"));
        assert_lost(b.renew(&stale_b).await, Some("worker-a"));
        assert_lost(b.take(&stale_b).await, Some("worker-a"));
        // B cannot renew or checkpoint a lease it does not hold.
        let fresh_b = b.get(SHARD).await.unwrap().unwrap();
        assert_lost(b.renew(&fresh_b).await, Some("worker-a"));
        let at = Checkpoint::Sequence {
            seq: "100".into(),
            sub: 0,
        };
        let progress = Progress::default();
        assert_lost(
            b.checkpoint(&fresh_b, &at, &progress).await,
            Some("worker-a"),
        );

        // A stops renewing: B, whose read shows a counter that no longer
        // moves, takes the lease.
        let b1 = b.take(&fresh_b).await.unwrap();
        assert_eq!((b1.owner.as_deref(), b1.counter), (Some("worker-b"), 4));
        assert_eq!(b1.owner_switches_since_checkpoint, 1);
        assert_eq!(b1.owner_address.as_deref(), Some("127.0.0.1:9102"));

        // Fencing: A's checkpoint and renewal on its last copy are refused.
        assert_lost(a.checkpoint(&a3, &at, &progress).await, Some("worker-b"));
        assert_lost(a.renew(&a3).await, Some("worker-b"));

        // B checkpoints, with shardflow's progress beside KCL's position.
        let progress = Progress {
            snapshot: Some("s3://bucket/ckpt/00042".into()),
            watermark: Some(1_700_000_000_000),
        };
        let b2 = b.checkpoint(&b1, &at, &progress).await.unwrap();
        assert_eq!((b2.counter, &b2.checkpoint), (5, &at));
        assert_eq!(b2.owner_switches_since_checkpoint, 0);
        assert_eq!(b2.snapshot, progress.snapshot);
        assert_eq!(b2.watermark, progress.watermark);
        assert_eq!(b.get(SHARD).await.unwrap(), Some(b2.clone()));

        // A takes it back; B's copy from before is fenced off although the
        // lease's owner fields look as B last saw them after this round.
        let a4 = a.take(&b2).await.unwrap();
        assert_lost(
            b.checkpoint(&b2, &at, &Progress::default()).await,
            Some("worker-a"),
        );
        let back_b = b.take(&a4).await.unwrap();
        assert_lost(
            b.checkpoint(&b2, &at, &Progress::default()).await,
            Some("worker-b"),
        );
        b.checkpoint(&back_b, &at, &Progress::default())
            .await
            .unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_write_finds_itself_done() {
    bounded(async {
        let server = DynamoServer::start().await;
        let a = ready(&server, "a").await;
        a.create_if_absent(&Lease::new(SHARD, Checkpoint::Latest))
            .await
            .unwrap();
        let a0 = a.get(SHARD).await.unwrap().unwrap();
        let a1 = a.take(&a0).await.unwrap();
        // The same write again, as after an answer lost in transit: the row
        // already shows it, so it is not a lost lease, and nothing changes.
        assert_eq!(a.take(&a0).await.unwrap(), a1);
        let a2 = a.renew(&a1).await.unwrap();
        assert_eq!(a.renew(&a1).await.unwrap(), a2);
        let at = Checkpoint::Sequence {
            seq: "7".into(),
            sub: 2,
        };
        let a3 = a.checkpoint(&a2, &at, &Progress::default()).await.unwrap();
        let again = a.checkpoint(&a2, &at, &Progress::default()).await.unwrap();
        assert_eq!(again, a3);
        // A different checkpoint on the same old copy is not that write.
        let other = Checkpoint::ShardEnd;
        assert_lost(
            a.checkpoint(&a2, &other, &Progress::default()).await,
            Some("a"),
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_handoff_keeps_one_holder() {
    bounded(async {
        let server = DynamoServer::start().await;
        let a = ready(&server, "a").await;
        let b = ready(&server, "b").await;
        a.create_if_absent(&Lease::new(SHARD, Checkpoint::Latest))
            .await
            .unwrap();
        let a1 = a.take(&a.get(SHARD).await.unwrap().unwrap()).await.unwrap();

        // B asks for the lease: A still holds it, B does not yet.
        let before = b.get(SHARD).await.unwrap().unwrap();
        let h = b.request_handoff(&before, "b").await.unwrap();
        assert_eq!(h.owner.as_deref(), Some("b"));
        assert_eq!(h.checkpoint_owner.as_deref(), Some("a"));
        assert_eq!(h.counter, a1.counter, "a handoff leaves the counter alone");
        assert_lost(b.request_handoff(&before, "c").await, Some("a"));
        assert!(!b.request_handoff(&h, "c").await.unwrap_err().is_lost());
        assert_lost(b.renew(&h).await, Some("a"));
        let a2 = a.renew(&h).await.unwrap();
        let last = Checkpoint::Sequence {
            seq: "555".into(),
            sub: 0,
        };
        let a3 = a
            .checkpoint(&a2, &last, &Progress::default())
            .await
            .unwrap();
        assert_lost(
            b.checkpoint(&a3, &last, &Progress::default()).await,
            Some("a"),
        );

        // A's release hands the lease to B, who holds it from then on.
        let r = a.release(&a3).await.unwrap();
        assert_eq!(
            (r.owner.as_deref(), r.checkpoint_owner.as_deref()),
            (Some("b"), None)
        );
        assert_lost(a.renew(&a3).await, Some("b"));
        let b1 = b.renew(&r).await.unwrap();

        // A release without a handoff leaves the lease unowned (and a
        // repeated one finds itself done); a release on owner fields that
        // changed since is refused.
        let gone = b.release(&b1).await.unwrap();
        assert_eq!(
            (gone.owner.as_deref(), gone.counter),
            (None, b1.counter + 1)
        );
        assert_eq!(b.release(&b1).await.unwrap(), gone);
        assert!(
            a.request_handoff(&gone, "a").await.is_err(),
            "nobody to hand off from"
        );
        a.take(&gone).await.unwrap();
        assert_lost(b.release(&b1).await, Some("a"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_conditional_on_the_counter() {
    bounded(async {
        let server = DynamoServer::start().await;
        let a = ready(&server, "a").await;
        a.create_if_absent(&Lease::new(SHARD, Checkpoint::ShardEnd))
            .await
            .unwrap();
        let read = a.get(SHARD).await.unwrap().unwrap();
        let held = a.take(&read).await.unwrap();
        assert_lost(a.delete(&read).await, Some("a"));
        a.delete(&held).await.unwrap();
        assert_eq!(a.get(SHARD).await.unwrap(), None);
        a.delete(&held).await.unwrap();
        assert!(matches!(
            a.renew(&held).await,
            Err(LeaseError::Lost { current: None, .. })
        ));
    })
    .await
}

/// Every field, with the extremes of each: u128 hash keys up to 2^128-1,
/// sub-sequence numbers, sets of shard ids, bytes, shardflow's attributes.
fn full_lease() -> Lease {
    Lease {
        owner: Some("worker-a".into()),
        counter: 12,
        pending_checkpoint: Some(Checkpoint::Sequence {
            seq: "49590338271490256608559692540925702759324208523137515619".into(),
            sub: 4,
        }),
        pending_checkpoint_state: Some(vec![0, 1, 2, 254, 255]),
        owner_switches_since_checkpoint: 3,
        parent_shard_ids: ["shardId-000000000000".into(), "shardId-000000000007".into()].into(),
        child_shard_ids: ["shardId-000000000002".into(), "shardId-000000000003".into()].into(),
        hash_key_range: Some(HashKeyRange {
            start: 1 << 127,
            end: u128::MAX,
        }),
        throughput_kbps: Some(1234.5),
        checkpoint_owner: Some("worker-z".into()),
        snapshot: Some("s3://bucket/prefix/checkpoints/00000017".into()),
        watermark: Some(-1),
        owner_address: Some("[::1]:9100".into()),
        ..Lease::new(
            SHARD,
            Checkpoint::Sequence {
                seq: "49590338271490256608559692540925702759324208523137515618".into(),
                sub: 9,
            },
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_round_trips_through_the_table() {
    bounded(async {
        let server = DynamoServer::start().await;
        let w = ready(&server, "worker-z").await;
        let lease = full_lease();
        w.create_if_absent(&lease).await.unwrap();
        assert_eq!(w.get(SHARD).await.unwrap().as_ref(), Some(&lease));
        assert_eq!(w.list().await.unwrap(), std::slice::from_ref(&lease));

        // Each sentinel and a sub-sequence number through a checkpoint.
        let mut now = lease;
        for at in [
            Checkpoint::TrimHorizon,
            Checkpoint::Latest,
            Checkpoint::AtTimestamp,
            Checkpoint::ShardEnd,
            Checkpoint::Sequence {
                seq: "1".into(),
                // KCL reads it as a Java long.
                sub: i64::MAX as u64,
            },
        ] {
            now = w.checkpoint(&now, &at, &Progress::default()).await.unwrap();
            let read = w.get(SHARD).await.unwrap().unwrap();
            assert_eq!(
                (&read.checkpoint, read.pending_checkpoint.as_ref()),
                (&at, None)
            );
            assert_eq!(read, now);
        }
        assert_eq!((now.snapshot, now.watermark), (None, None));
        assert_eq!(now.hash_key_range, full_lease().hash_key_range);
        assert_eq!(now.parent_shard_ids, full_lease().parent_shard_ids);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_skips_other_entities_and_bad_rows() {
    bounded(async {
        let server = DynamoServer::start().await;
        let w = ready(&server, "w").await.with_scan_page(1);
        for i in 0..3 {
            let lease = Lease::new(format!("shardId-00000000000{i}"), Checkpoint::Latest);
            w.create_if_absent(&lease).await.unwrap();
        }
        let metrics = AttributeValue::M(row(&[("cpu", AttributeValue::L(vec![n("12.5")]))]));
        let foreign = [
            // KCL 3's other entities in the lease table.
            row(&[
                ("leaseKey", s("worker-7f3c")),
                ("entityType", s("WORKER_METRIC_STATS")),
                ("lut", n("1700000000")),
                ("sts", metrics),
            ]),
            row(&[
                ("leaseKey", s("Leader")),
                ("entityType", s("LEADER")),
                ("leaseOwner", s("worker-7f3c")),
                ("leaseCounter", s("not a number either")),
            ]),
            // Lease rows that cannot be read: skipped, the others listed.
            row(&[
                ("leaseKey", s("shardId-broken")),
                ("leaseCounter", s("3")),
                ("checkpoint", s("LATEST")),
            ]),
            row(&[("leaseKey", s("shardId-unset")), ("leaseCounter", n("1"))]),
        ];
        for item in foreign {
            server.put(TABLE, item).await;
        }
        let leases = w.list().await.unwrap();
        let keys: Vec<_> = leases.iter().map(|l| l.lease_key.as_str()).collect();
        let want: Vec<_> = (0..3).map(|i| format!("shardId-00000000000{i}")).collect();
        assert_eq!(keys, want);
    })
    .await
}

const KCL_SEQ: &str = "49590338271490256608559692538361571095921575989136588898";
const KCL_PENDING: &str = "49590338271490256608559692538361571095921575989136588899";

/// A row exactly as KCL's `DynamoDBLeaseSerializer.toDynamoRecord` writes a
/// lease of a split shard's child during a handoff (`entityType` and all).
fn kcl_item(entity_type: bool) -> Row {
    let mut item = row(&[
        ("leaseKey", s(SHARD)),
        ("leaseCounter", n("42")),
        ("leaseOwner", s("kcl-worker-2")),
        ("ownerSwitchesSinceCheckpoint", n("2")),
        ("checkpoint", s(KCL_SEQ)),
        ("checkpointSubSequenceNumber", n("3")),
        ("pendingCheckpoint", s(KCL_PENDING)),
        ("pendingCheckpointSubSequenceNumber", n("0")),
        ("parentShardId", ss(&["shardId-000000000000"])),
        (
            "childShardIds",
            ss(&["shardId-000000000004", "shardId-000000000005"]),
        ),
        ("startingHashKey", s("0")),
        (
            "endingHashKey",
            s("170141183460469231731687303715884105727"),
        ),
        ("throughputKBps", n("87.25")),
        ("checkpointOwner", s("kcl-worker-1")),
    ]);
    if entity_type {
        item.insert("entityType".into(), s("LEASE"));
    }
    item
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_written_by_kcl_reads_and_keeps_kcls_attributes() {
    bounded(async {
        let server = DynamoServer::start().await;
        let w = ready(&server, "kcl-worker-1").await;
        for entity_type in [true, false] {
            server.put(TABLE, kcl_item(entity_type)).await;
            let lease = w.get(SHARD).await.unwrap().expect("a lease");
            let expected = Lease {
                owner: Some("kcl-worker-2".into()),
                counter: 42,
                pending_checkpoint: Some(Checkpoint::Sequence {
                    seq: KCL_PENDING.into(),
                    sub: 0,
                }),
                owner_switches_since_checkpoint: 2,
                parent_shard_ids: ["shardId-000000000000".into()].into(),
                child_shard_ids: ["shardId-000000000004".into(), "shardId-000000000005".into()]
                    .into(),
                hash_key_range: Some(HashKeyRange {
                    start: 0,
                    end: (1 << 127) - 1,
                }),
                throughput_kbps: Some(87.25),
                checkpoint_owner: Some("kcl-worker-1".into()),
                ..Lease::new(
                    SHARD,
                    Checkpoint::Sequence {
                        seq: KCL_SEQ.into(),
                        sub: 3,
                    },
                )
            };
            assert_eq!(lease, expected);
            assert_eq!(lease.actual_owner(), Some("kcl-worker-1"));
            // shardflow writes as KCL does: renewing leaves KCL's other
            // attributes as they were.
            let renewed = w.renew(&lease).await.unwrap();
            let stored = server.get(TABLE, "leaseKey", SHARD).await;
            let mut expected = kcl_item(entity_type);
            expected.insert("leaseCounter".into(), n("43"));
            assert_eq!(stored, Some(expected));
            assert_eq!(renewed.counter, 43);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_then_name_the_table() {
    bounded(async {
        dynamo::init();
        // A port nobody listens on: every attempt is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = dynamo::client_for(&format!("http://127.0.0.1:{port}")).await;
        let t = LeaseTable::new(client, TABLE, "a").with_retry(dynamo::quick_retry());
        let started = Instant::now();
        let err = t.get(SHARD).await.unwrap_err();
        assert!(!err.is_lost());
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("lease table {TABLE}: get of lease {SHARD}: ")),
            "{text}"
        );
        assert!(text.ends_with("(after 3 attempts)"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let err = t.ensure().await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("lease table {TABLE}: describe")),
            "{err}"
        );
    })
    .await
}
