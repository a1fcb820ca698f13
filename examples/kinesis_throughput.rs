//! Measures end-to-end consumption from Kinesis: an embedded emulator on
//! 127.0.0.1 with N shards, records put beforehand, then the pipeline
//! (enhanced fan-out source → decode → window engine → file sink) reads them
//! all from TRIM_HORIZON. Prints records/s.
//!
//! ```sh
//! cargo run --release --example kinesis_throughput -- 8 200000
//! ```

#[path = "../tests/emulator/mod.rs"]
mod emulator;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardflow::pipeline::{RunOptions, Stats};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let shards: i32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let records: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);

    let emu = emulator::Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "bench", shards).await;
    let put_started = Instant::now();
    let batch: Vec<(String, Vec<u8>)> = (0..records)
        .map(|n| {
            (
                format!("u{}", n % 1000),
                emulator::event_json((n % 1000) as u32, n),
            )
        })
        .collect();
    emulator::put(&client, "bench", batch).await;
    eprintln!(
        "put {records} records into {shards} shards in {:?}",
        put_started.elapsed()
    );

    let dir = tempfile::tempdir().unwrap();
    let config = emulator::config(dir.path(), &emu.url(), "bench", "");
    let stats = Arc::new(Stats::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let run = tokio::spawn(shardflow::pipeline::run(
        config,
        RunOptions {
            ..RunOptions::default()
        },
        shutdown,
        stats.clone(),
    ));
    let deadline = started + Duration::from_secs(600);
    // The clock starts at the first record: consumer registration (the
    // emulator's 500 ms CREATING) is not consumption.
    while stats.records_in.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = Instant::now();
    eprintln!("first record after {:?}", started.elapsed());
    while stats.records_in.load(Ordering::Relaxed) < records && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = first.elapsed();
    let got = stats.records_in.load(Ordering::Relaxed);
    stop.send(true).unwrap();
    run.await.unwrap().unwrap();
    println!(
        "{got} records from {shards} shards in {took:.2?}: {:.0} records/s",
        got as f64 / took.as_secs_f64()
    );
}
