//! Backpressure end to end: with the model server stalled, the batcher holds
//! at most `max_in_flight` batches, the bounded channels fill, and the source
//! stops reading; when the server recovers, the run completes with every
//! record accounted for. Also: batches in flight overlap.

mod inference_support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inference_support::*;
use shardflow::config::Config;
use shardflow::pipeline::{self, RunOptions, Stats};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_stops_the_source_and_the_run_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = FaultServer::start(&config(
        &format!(
            "backend = \"embedded\"\nmodel = \"{}\"",
            repo("config/models/fraud.toml")
        ),
        "",
        default_sinks(),
    ))
    .await;
    server.stall(true);
    let out = dir.path().join("out.ndjson");
    let count = 30_000u64;
    let text = format!(
        r#"
[pipeline]
state_dir = "{state}"
checkpoint_interval = "200ms"
channel_capacity = 4
batch_size = 256

[source]
type = "generator"
rate = 0
count = {count}
start_time = 1700000000000
keys = 200

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64", merchant = "string" }}

{FEATURES}

[inference]
{inference}

[[sinks]]
type = "file"
path = "{out}"
kinds = ["prediction", "late", "dead_letter"]
"#,
        state = dir.path().join("state").display(),
        out = out.display(),
        inference = sagemaker(
            &server.url,
            "max_batch = 64\nmax_in_flight = 4\nrequest_timeout = \"30s\""
        ),
    );
    let config = Config::from_str_at(&text, Path::new("test.toml"), |_| None).unwrap();
    let stats = Arc::new(Stats::default());
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let options = RunOptions {
        aws: Some(sdk()),
        ..RunOptions::default()
    };
    let run = tokio::spawn(pipeline::run(config, options, stop_rx, stats.clone()));

    // Stalled: input is read until the channels are full, then not at all.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read_stalled = stats.records_in.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let read_later = stats.records_in.load(Ordering::SeqCst);
    assert_eq!(
        read_stalled, read_later,
        "the source kept reading while the model was stalled"
    );
    // Bounded: 3 channels of 4 batches of 256, plus what each stage holds and
    // 4 batches of 64 in flight; far from the 30,000 available.
    assert!(
        read_stalled <= 8_000,
        "{read_stalled} records read while stalled"
    );
    assert!(read_stalled > 0);
    assert!(
        server.requests() <= 4,
        "{} requests: more than max_in_flight",
        server.requests()
    );

    // Recovery: everything flows and the run ends.
    let resumed = Instant::now();
    server.stall(false);
    let summary = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the run finishes after the server recovers")
        .unwrap()
        .unwrap();
    let took = resumed.elapsed();
    assert_eq!(summary.records_in, count);
    let lines = std::fs::read_to_string(&out).unwrap();
    let mut predictions = 0;
    let mut others = 0;
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "prediction" {
            assert_eq!(v["fallback"], false);
            predictions += 1;
        } else {
            others += 1;
        }
    }
    assert_eq!(
        predictions + others,
        count,
        "count in = count out + late + dead letters"
    );
    assert_eq!(others, 0);
    eprintln!(
        "stalled at {read_stalled} records read; after recovery {count} records in {took:?} ({:.0}/s)",
        (count - read_stalled) as f64 / took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_flight_overlap_and_leave_in_order() {
    let embedded = config(
        &format!(
            "backend = \"embedded\"\nmodel = \"{}\"",
            repo("config/models/fraud.toml")
        ),
        "",
        default_sinks(),
    );
    let server = FaultServer::start(&embedded).await;
    server.delay(Duration::from_millis(100));
    let elapsed = |in_flight: usize| {
        let c = config(
            &sagemaker(
                &server.url,
                &format!("max_batch = 10\nmax_wait = \"1ms\"\nmax_in_flight = {in_flight}"),
            ),
            "",
            default_sinks(),
        );
        async move {
            let started = Instant::now();
            let out = run_batcher(scorer(&c), &c, records(80, 80), 80).await;
            let (p, _) = split(&out);
            let ids: Vec<usize> = p
                .iter()
                .map(|p| p.features.id[2..].parse().unwrap())
                .collect();
            assert_eq!(ids, (0..80).collect::<Vec<_>>());
            started.elapsed()
        }
    };
    // 8 batches of 100 ms: ≥ 800 ms one at a time, about 200 ms four at a time.
    let serial = elapsed(1).await;
    let parallel = elapsed(4).await;
    assert!(serial >= Duration::from_millis(800), "{serial:?}");
    assert!(
        parallel < serial / 2,
        "in flight {parallel:?} vs serial {serial:?}"
    );
}
