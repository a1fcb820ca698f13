//! Kinesis faults while a producer writes and the pipeline consumes, all at
//! once: every connection reset (RST) at random moments mid-subscription,
//! subscriptions expiring every 1.5 s (the service's 5 minutes, shortened),
//! SubscribeToShard / ListShards / DescribeStreamConsumer throttled with
//! LimitExceededException, one ResourceInUseException, and an emulator
//! restart. Afterwards every record must have been counted exactly once into
//! state and written exactly once, with the pipeline never restarted:
//! consumption resumed by itself after each fault.
//!
//! (`kinesis_source.rs` covers a stalled subscription and a restart of the
//! emulator alone; this test piles the faults onto a live stream.)
//! `make soak` raises `SHARDFLOW_KINESIS_FAULT_RECORDS` and `…_SECS`.

mod emulator;
mod harness;

use std::time::{Duration, Instant};

use emulator::chaos::{ResetProxy, Throttle};
use harness::{knob, report};
use rand::Rng as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_expiry_throttling_and_a_restart_lose_and_repeat_nothing() {
    let n = knob("SHARDFLOW_KINESIS_FAULT_RECORDS", 4_000);
    let secs = knob("SHARDFLOW_KINESIS_FAULT_SECS", 10);
    let throttle = Throttle::new(
        0.3,
        &["SubscribeToShard", "ListShards", "DescribeStreamConsumer"],
    );
    let mut emu = emulator::Emulator::start_with(
        ferrokinesis::store::StoreOptions {
            subscribe_to_shard_session_ms: 1_500,
            ..emulator::options()
        },
        Some(throttle.clone()),
    )
    .await;
    let proxy = ResetProxy::start(emu.addr).await;
    // The producer talks to the emulator directly: the faults are the consumer's.
    let client = emu.client().await;
    emulator::create_stream(&client, "faulty", 2).await;

    let dir = tempfile::tempdir().unwrap();
    let config = emulator::config(
        dir.path(),
        &proxy.url(),
        "faulty",
        "stall_timeout = \"3s\"\nshard_refresh_interval = \"1s\"",
    );
    let run = emulator::Running::start(config);

    let events: Vec<(u32, u64)> = (0..n).map(|i| ((i % 23) as u32, i)).collect();
    let producer = {
        let client = client.clone();
        let records: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|&(k, i)| (format!("u{k}"), emulator::event_json(k, i)))
            .collect();
        tokio::spawn(async move {
            let chunks: Vec<_> = records.chunks(100).map(|c| c.to_vec()).collect();
            let pause = Duration::from_secs(secs) / chunks.len().max(1) as u32;
            for c in chunks {
                emulator::put(&client, "faulty", c).await;
                tokio::time::sleep(pause).await;
            }
        })
    };

    // Faults for `secs`: resets every 0.2–1 s, one ResourceInUse, and an
    // emulator restart halfway.
    throttle
        .script
        .lock()
        .unwrap()
        .push_back("ResourceInUseException");
    let started = Instant::now();
    let mut restarted = false;
    let mut rng = rand::rng();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
        proxy.reset();
        if !restarted && started.elapsed() > Duration::from_secs(secs / 2) {
            emu.restart().await;
            restarted = true;
        }
    }
    producer.await.unwrap();
    let throttled = throttle.injected();
    // Faults stop; consumption must finish by itself.
    throttle.set_probability(0.0);
    let out = emulator::wait_for_ids(&emulator::features_path(dir.path()), n as usize, 180).await;
    let summary = run.stop().await;

    let ids = emulator::id_counts(&out);
    assert_eq!(ids.len(), n as usize);
    let twice: Vec<_> = ids.iter().filter(|(_, &c)| c > 1).take(5).collect();
    assert!(
        twice.is_empty(),
        "written twice without a restart: {twice:?}"
    );
    assert_eq!(
        emulator::max_count_per_key(&out),
        emulator::expected_counts(events.iter().map(|e| e.0)),
        "counted into state exactly once"
    );
    assert_eq!(summary.records_in, n);
    assert!(proxy.resets() > 0, "no connection was reset");
    assert!(throttled > 0, "nothing was throttled");
    // Two shards: anything beyond two subscriptions was a renewal after an
    // expiry, a reset, a stall or the restart.
    assert!(
        throttle.subscribes() > 4,
        "{} subscriptions",
        throttle.subscribes()
    );
    report(&format!(
        "kinesis faults: {} connection resets, {} throttling/ResourceInUse answers, 1 emulator restart, \
         {} subscriptions for 2 shards (expiry every 1.5 s); {n} records in, {n} out exactly once",
        proxy.resets(),
        throttled,
        throttle.subscribes()
    ));
}
