//! Backpressure: with 64 shards and a pipeline that takes nothing, the
//! source reads only what its bounded per-shard buffers hold, then stops
//! reading the event streams; what it read is counted by its own metric.

mod emulator;

use std::time::Duration;

use shardflow::source::{SourceContext, SourceMessage};

/// Sums a counter over its labels in Prometheus text.
fn sum(rendered: &str, name: &str) -> f64 {
    rendered
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_shards_and_a_stalled_pipeline_stay_bounded() {
    let metrics = shardflow::telemetry::install_metrics().unwrap();
    let mut options = emulator::options();
    // Small events, so that the bound is easy to state: ≤ 10 records each.
    options.subscribe_to_shard_event_record_limit = 10;
    let emu = emulator::Emulator::start(options).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "wide", 64).await;
    // 64 shards × ~150 records: far more than the buffers hold.
    let records: Vec<_> = (0..10_000u64)
        .map(|n| {
            (
                format!("key-{n}"),
                emulator::event_json((n % 500) as u32, n),
            )
        })
        .collect();
    emulator::put(&client, "wide", records).await;

    let dir = tempfile::tempdir().unwrap();
    let config = emulator::config(dir.path(), &emu.url(), "wide", "shard_buffer = 1");
    let source = shardflow::source::build(&config).unwrap();
    // The pipeline: a channel of one batch that nobody reads.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SourceMessage>(1);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(source.run(SourceContext {
        output: tx,
        shutdown,
        resume_from: Vec::new(),
        batch_size: 64,
        state: None,
    }));

    // Let every shard subscribe and fill its buffer.
    let mut read = 0.0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        read = sum(&metrics.render(), "shardflow_kinesis_records_total");
    }
    // Per shard: one event in the buffer, one the reader holds, one the
    // forwarder is sending (≤ 10 records each); the channel holds one batch.
    let bound = 64.0 * 3.0 * 10.0 + 64.0;
    eprintln!("read {read} of 10000 records while the pipeline took nothing (bound {bound})");
    assert!(read > 0.0, "the source read something");
    assert!(
        read <= bound,
        "read {read} records with nothing consumed (bound {bound})"
    );
    assert!(read < 10_000.0);

    // Consuming again drains everything: the stop was backpressure only.
    let mut got = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got < 10_000 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(SourceMessage::Batch(b))) => got += b.len(),
            // Shards known, reading, their hash ranges: for the watermark.
            Ok(Some(SourceMessage::Partitions(..) | SourceMessage::Ranges(_))) => {}
            other => panic!("after {got} records: {other:?}"),
        }
    }
    stop.send(true).unwrap();
    while rx.recv().await.is_some() {}
    task.await.unwrap().unwrap();
}
