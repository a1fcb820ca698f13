//! The Kinesis source against the ferrokinesis emulator on 127.0.0.1:
//! exactly-once into state across shards and restarts, KPL aggregates,
//! resharding, stalls, emulator restarts, and the PutRecords sink.

mod emulator;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use emulator::*;
use shardflow::record::Position;
use shardflow::source::kinesis::deagg::aggregate;
use shardflow::source::kinesis::CONSUMER_ARN_META;
use shardflow::state::StateStore;

/// Records per test; `SHARDFLOW_KINESIS_TEST_RECORDS` raises it (the issue's
/// 100 k runs in about a minute in the dev profile).
fn records() -> u64 {
    std::env::var("SHARDFLOW_KINESIS_TEST_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn keyed(range: std::ops::Range<u64>, keys: u32) -> Vec<(u32, u64)> {
    range.map(|n| ((n % keys as u64) as u32, n)).collect()
}

fn as_records(events: &[(u32, u64)]) -> Vec<(String, Vec<u8>)> {
    events
        .iter()
        .map(|&(k, n)| (format!("u{k}"), event_json(k, n)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_shards_concurrent_producer_every_record_exactly_once() {
    let emu = Emulator::start(options()).await;
    let client = emu.client().await;
    create_stream(&client, "events", 4).await;
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(config(dir.path(), &emu.url(), "events", ""));

    // The producer writes while the pipeline consumes.
    let n = records();
    let events = keyed(0..n, 97);
    let producer = {
        let client = client.clone();
        let records = as_records(&events);
        tokio::spawn(async move {
            for chunk in records.chunks(2_000) {
                put(&client, "events", chunk.to_vec()).await;
            }
        })
    };
    producer.await.unwrap();
    let started = Instant::now();
    let out = wait_for_ids(&features_path(dir.path()), n as usize, 180).await;
    let summary = running.stop().await;
    eprintln!(
        "{n} records consumed (last one {:?} after the producer finished)",
        started.elapsed()
    );

    let ids = id_counts(&out);
    assert_eq!(ids.len(), n as usize);
    assert!(ids.values().all(|&c| c == 1), "a record was output twice");
    assert_eq!(
        max_count_per_key(&lines(&features_path(dir.path()))),
        expected_counts(events.iter().map(|e| e.0)),
        "window counts must match what was put"
    );
    let shards: std::collections::HashSet<_> = ids
        .keys()
        .map(|id| id.split('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(shards.len(), 4, "records come from every shard");
    assert_eq!(summary.records_in, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_after_the_last_checkpoint_and_survives_an_emulator_restart() {
    let mut emu = Emulator::start(options()).await;
    let client = emu.client().await;
    create_stream(&client, "events", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let events = keyed(0..3_000, 13);

    put(&client, "events", as_records(&events[..1_000])).await;
    let run = Running::start(config(dir.path(), &emu.url(), "events", ""));
    wait_for_ids(&features_path(dir.path()), 1_000, 60).await;
    run.stop().await;
    let first: HashMap<_, _> = id_counts(&lines(&features_path(dir.path())));

    // The consumer ARN is kept in state meta. A stale one (a consumer of
    // this stream that no longer exists) is replaced by the one found by
    // name on the next start.
    let cfg = config(dir.path(), &emu.url(), "events", "");
    let store = StateStore::open(&cfg.pipeline.state_dir, &cfg.state_fingerprint(), false).unwrap();
    let kept = store
        .source_meta(CONSUMER_ARN_META)
        .unwrap()
        .expect("consumer ARN in state");
    let summary = client
        .describe_stream_summary()
        .stream_name("events")
        .send()
        .await
        .unwrap();
    let stream_arn = summary.stream_description_summary.unwrap().stream_arn;
    let described = client
        .describe_stream_consumer()
        .stream_arn(&stream_arn)
        .consumer_name("tests")
        .send()
        .await
        .unwrap();
    assert_eq!(kept, described.consumer_description.unwrap().consumer_arn);
    let stale = format!("{stream_arn}/consumer/tests:1");
    store.put_source_meta(CONSUMER_ARN_META, &stale).unwrap();
    drop(store);

    // Second run: more records, and the emulator is killed (connections
    // reset, listener gone) and restarted in the middle.
    put(&client, "events", as_records(&events[1_000..2_000])).await;
    let run = Running::start(config(
        dir.path(),
        &emu.url(),
        "events",
        "stall_timeout = \"2s\"",
    ));
    wait_for_ids(&features_path(dir.path()), 2_000, 60).await;
    emu.restart().await;
    put(&client, "events", as_records(&events[2_000..])).await;
    let out = wait_for_ids(&features_path(dir.path()), 3_000, 90).await;
    run.stop().await;

    let store = StateStore::open(&cfg.pipeline.state_dir, &cfg.state_fingerprint(), false).unwrap();
    assert_eq!(store.source_meta(CONSUMER_ARN_META).unwrap(), Some(kept));
    drop(store);

    let all = id_counts(&out);
    assert_eq!(all.len(), 3_000);
    for (id, count) in &all {
        // A clean stop commits a final checkpoint: the second run starts
        // right after it, so nothing of the first run is produced again.
        assert_eq!(*count, 1, "{id} was output {count} times");
        let _ = first.get(id);
    }
    assert_eq!(
        max_count_per_key(&out),
        expected_counts(events.iter().map(|e| e.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpl_aggregates_are_split_and_a_restart_inside_one_repeats_nothing() {
    let emu = Emulator::start(options()).await;
    let client = emu.client().await;
    create_stream(&client, "events", 1).await;
    // 50 aggregates of 10 user records, one corrupt aggregate, one plain record.
    let mut records = Vec::new();
    let mut n = 0;
    for _ in 0..50 {
        let users: Vec<Vec<u8>> = (0..10)
            .map(|_| {
                n += 1;
                event_json((n % 7) as u32, n)
            })
            .collect();
        let refs: Vec<&[u8]> = users.iter().map(|u| u.as_slice()).collect();
        records.push(("agg".to_string(), aggregate("agg", &refs)));
    }
    let mut corrupt = aggregate("agg", &[b"x"]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    records.push(("agg".to_string(), corrupt));
    records.push(("plain".to_string(), event_json(1, 10_000)));
    put(&client, "events", records).await;

    let dir = tempfile::tempdir().unwrap();
    let run = Running::start(config(dir.path(), &emu.url(), "events", ""));
    let out = wait_for_ids(&features_path(dir.path()), 501, 60).await;
    run.stop().await;
    let ids = id_counts(&out);
    assert_eq!(ids.len(), 501);
    assert!(ids.keys().any(|id| id.ends_with(":9")));
    let dead: Vec<_> = out.iter().filter(|v| v["kind"] == "dead_letter").collect();
    assert_eq!(dead.len(), 1, "the corrupt aggregate is one dead letter");

    // Resume inside aggregate #3 after its sub-record 4: the source delivers
    // 5..=9 of it, then everything after, and nothing before.
    let agg3 = ids
        .keys()
        .filter(|id| id.ends_with(":0"))
        .map(|id| {
            id.split('/')
                .nth(1)
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect::<std::collections::BTreeSet<_>>();
    let mut seqs: Vec<_> = agg3.into_iter().collect();
    seqs.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
    let shard = ids
        .keys()
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let resume = Position {
        partition: Arc::from(shard.as_str()),
        sequence: seqs[3].as_str().into(),
        sub_sequence: Some(4),
        resume_offset: None,
    };
    let got = read_source(&emu.url(), vec![resume], 5 + 46 * 10 + 2).await;
    let first: Vec<String> = got.iter().take(6).map(|p| p.to_string()).collect();
    assert_eq!(
        first[..5],
        (5..10)
            .map(|i| format!("{shard}/{}:{i}", seqs[3]))
            .collect::<Vec<_>>()[..]
    );
    assert_eq!(first[5], format!("{shard}/{}:0", seqs[4]));
    let unique: std::collections::HashSet<_> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "nothing repeated");
}

/// Runs the source alone with these checkpointed positions and returns the
/// positions of the first `n` records it delivers.
async fn read_source(url: &str, resume_from: Vec<Position>, n: usize) -> Vec<Position> {
    use shardflow::source::{SourceContext, SourceMessage};
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), url, "events", "");
    let source = shardflow::source::build(&config).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(source.run(SourceContext {
        output: tx,
        shutdown,
        resume_from,
        batch_size: 100,
        state: None,
    }));
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(SourceMessage::Batch(b))) => got.extend(b.into_iter().map(|r| r.position)),
            // Shards known, reading, their hash ranges: for the watermark.
            Ok(Some(SourceMessage::Partitions(..) | SourceMessage::Ranges(_))) => {}
            other => panic!("source ended early ({} of {n}): {other:?}", got.len()),
        }
    }
    stop.send(true).unwrap();
    while rx.recv().await.is_some() {}
    task.await.unwrap().unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_while_consuming_lose_nothing_and_keep_key_order() {
    let emu = Emulator::start(options()).await;
    let client = emu.client().await;
    create_stream(&client, "events", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let run = Running::start(config(
        dir.path(),
        &emu.url(),
        "events",
        "shard_refresh_interval = \"1s\"",
    ));
    let events = keyed(0..3_000, 31);
    put(&client, "events", as_records(&events[..1_000])).await;

    // Split shard 0 at the middle of its hash range.
    let shards = client
        .list_shards()
        .stream_name("events")
        .send()
        .await
        .unwrap()
        .shards
        .unwrap();
    let s0 = &shards[0];
    let range = s0.hash_key_range.as_ref().unwrap();
    let lo: u128 = range.starting_hash_key.parse().unwrap();
    let hi: u128 = range.ending_hash_key.parse().unwrap();
    client
        .split_shard()
        .stream_name("events")
        .shard_to_split(&s0.shard_id)
        .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(&client, "events").await;
    put(&client, "events", as_records(&events[1_000..2_000])).await;

    // Merge the two children of the split.
    let open: Vec<_> = client
        .list_shards()
        .stream_name("events")
        .send()
        .await
        .unwrap()
        .shards
        .unwrap()
        .into_iter()
        .filter(|s| {
            s.sequence_number_range
                .as_ref()
                .is_some_and(|r| r.ending_sequence_number.is_none())
                && s.parent_shard_id.as_deref() == Some(s0.shard_id.as_str())
        })
        .collect();
    assert_eq!(open.len(), 2);
    client
        .merge_shards()
        .stream_name("events")
        .shard_to_merge(&open[0].shard_id)
        .adjacent_shard_to_merge(&open[1].shard_id)
        .send()
        .await
        .unwrap();
    wait_active(&client, "events").await;
    put(&client, "events", as_records(&events[2_000..])).await;

    let out = wait_for_ids(&features_path(dir.path()), 3_000, 120).await;
    run.stop().await;
    assert_eq!(id_counts(&out).len(), 3_000);
    // Per key, events arrive in the order they were put.
    let mut last: HashMap<String, i64> = HashMap::new();
    for v in out.iter().filter(|v| v["kind"] == "features") {
        let key = v["key"].as_str().unwrap().to_owned();
        let t = v["event_time"].as_i64().unwrap();
        let prev = last.insert(key.clone(), t);
        assert!(prev.is_none_or(|p| p < t), "key {key} out of order");
    }
    assert_eq!(
        max_count_per_key(&out),
        expected_counts(events.iter().map(|e| e.0))
    );
}

/// A TCP proxy whose connections can be frozen: they stay open but forward
/// nothing more, like a half-open connection. Connections accepted after a
/// freeze forward normally.
struct Proxy {
    addr: std::net::SocketAddr,
    epoch: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let e = epoch.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let mine = e.load(Ordering::SeqCst);
                let e = e.clone();
                conns.spawn(async move {
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let frozen = move || e.load(Ordering::SeqCst) != mine;
                    let f2 = frozen.clone();
                    let _ = tokio::join!(pump(cr, sw, frozen), pump(sr, cw, f2));
                });
            }
        });
        Proxy { addr, epoch, task }
    }

    fn freeze_current_connections(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes until EOF; once frozen, holds both ends open and idle.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        if frozen() {
            std::future::pending::<()>().await;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
        };
        if frozen() {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_renewed_within_stall_timeout() {
    let emu = Emulator::start(options()).await;
    let client = emu.client().await;
    create_stream(&client, "events", 1).await;
    let proxy = Proxy::start(emu.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}", proxy.addr);
    let run = Running::start(config(dir.path(), &url, "events", "stall_timeout = \"1s\""));
    let events = keyed(0..200, 5);
    put(&client, "events", as_records(&events[..100])).await;
    wait_for_ids(&features_path(dir.path()), 100, 60).await;

    // Every open connection goes silent without closing.
    proxy.freeze_current_connections();
    let frozen_at = Instant::now();
    put(&client, "events", as_records(&events[100..])).await;
    let out = wait_for_ids(&features_path(dir.path()), 200, 30).await;
    let took = frozen_at.elapsed();
    run.stop().await;
    assert!(
        took < Duration::from_secs(8),
        "renewed after {took:?} (stall_timeout 1 s + pacing)"
    );
    assert!(id_counts(&out).values().all(|&c| c == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_puts_every_output_and_flush_waits_for_all() {
    use shardflow::record::{DeadLetter, Output, WindowResult};
    use shardflow::sink::Sink as _;
    let emu = Emulator::start(options()).await;
    let client = emu.client().await;
    create_stream(&client, "out", 2).await;
    let mut sink =
        shardflow::sink::kinesis::KinesisSink::new(shardflow::config::KinesisSinkConfig {
            stream_name: "out".into(),
            kinds: vec![],
            endpoint_url: Some(emu.url()),
            region: Some("us-east-1".into()),
            max_attempts: 5,
            payload: Default::default(),
        });
    // 1 234 window results: more than two PutRecords batches.
    let outputs: Vec<Output> = (0..1_234)
        .map(|i| {
            Output::Window(WindowResult {
                key: format!("k{}", i % 10).into(),
                feature: "f".into(),
                window_start: 0,
                window_end: 1000 + i,
                value: None,
                revision: 0,
            })
        })
        .chain(std::iter::once(Output::DeadLetter(Box::new(DeadLetter {
            reason: "r".into(),
            position: Position::new(Arc::from("p"), "1"),
            raw: bytes::Bytes::from_static(b"x"),
        }))))
        .collect();
    let refs: Vec<&Output> = outputs.iter().collect();
    sink.write(&refs).await.unwrap();
    sink.flush().await.unwrap();

    // Read both shards back.
    let mut ids = std::collections::HashSet::new();
    for shard in ["shardId-000000000000", "shardId-000000000001"] {
        let mut it = client
            .get_shard_iterator()
            .stream_name("out")
            .shard_id(shard)
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator;
        while let Some(i) = it {
            let out = client.get_records().shard_iterator(i).send().await.unwrap();
            if out.records.is_empty() {
                break;
            }
            for r in out.records {
                let v: serde_json::Value = serde_json::from_slice(r.data.as_ref()).unwrap();
                ids.insert(v["id"].as_str().unwrap_or_default().to_owned());
                if v["kind"] == "window" {
                    assert_eq!(r.partition_key.as_deref(), v["key"].as_str());
                }
            }
            it = out.next_shard_iterator;
        }
    }
    assert_eq!(ids.len(), 1_235);
}
