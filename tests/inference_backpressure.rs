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
use shardflow::flow::Stats;
use shardflow::pipeline::{self, RunOptions};

/// Polls `state` every 10 ms until `done` says it is reached, at most
/// `limit` long; `state` panics itself when it sees something that must never
/// happen. Fails naming `what` and the last state.
async fn wait_until<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    mut state: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    const EVERY: Duration = Duration::from_millis(10);
    let polls = limit.as_millis() / EVERY.as_millis();
    let started = Instant::now();
    let mut last = state();
    for _ in 0..polls {
        if done(&last) {
            return last;
        }
        if started.elapsed() > limit {
            break;
        }
        tokio::time::sleep(EVERY).await;
        last = state();
    }
    if done(&last) {
        return last;
    }
    panic!(
        "not reached within {limit:?} ({:?} waited): {what}; last state: {last:?}",
        started.elapsed()
    );
}

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
    let (channel_capacity, batch_size, max_batch, max_in_flight) = (4u64, 256u64, 64u64, 4u64);
    // One input batch fills every in-flight slot at once.
    assert_eq!(batch_size, max_in_flight * max_batch);
    // No checkpoint barrier before the end of the input (1 h): every channel
    // slot holds a batch, so the stalled pipeline's fill is exact.
    let text = format!(
        r#"
[pipeline]
state_dir = "{state}"
checkpoint_interval = "1h"
channel_capacity = {channel_capacity}
batch_size = {batch_size}

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
            &format!(
                "max_batch = {max_batch}\nmax_in_flight = {max_in_flight}\nrequest_timeout = \"30s\""
            )
        ),
    );
    let config = Config::from_str_at(&text, Path::new("test.toml"), |_| None).unwrap();
    let stats = Arc::new(Stats::default());
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let options = RunOptions {
        aws: Some(sdk()),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let run = tokio::spawn(pipeline::run(config, options, stop_rx, stats.clone()));

    // Stalled: the batcher sends the first input batch as `max_in_flight`
    // requests of `max_batch` records, which the server holds, and takes no
    // more input. Every record counted in (by the decode stage) is then held
    // on the way there: in that batch, the channel before the batcher
    // (`channel_capacity` batches), the engine stage (one batch it cannot
    // send), the channel before it, and the decode stage (one batch it cannot
    // send): `2 · channel_capacity + 3` batches. Counted in up to exactly that
    // with `max_in_flight` requests held, every one of those places is full
    // and the decode stage is blocked: it reads nothing more from the source.
    // One record more would be past the bound, which every poll checks.
    let full = batch_size * (2 * channel_capacity + 3);
    let state = || {
        let read = stats.records_in.load(Ordering::SeqCst);
        let held = server.active();
        assert!(
            read <= full,
            "the source kept reading while the model was stalled: {read} records counted in, \
             at most {full} fit before the batcher"
        );
        assert!(
            server.requests() <= max_in_flight && held <= max_in_flight,
            "{} requests ({held} held): more than max_in_flight = {max_in_flight}",
            server.requests()
        );
        (read, held)
    };
    let blocked = |&(read, held): &(u64, u64)| read == full && held == max_in_flight;
    let (read_stalled, _) = wait_until(
        &format!(
            "the pipeline filled up to {full} records with {max_in_flight} requests held \
             (records counted in, requests held)"
        ),
        Duration::from_secs(60),
        state,
        blocked,
    )
    .await;
    let blocked_after = started.elapsed();
    // Still exactly there, with nothing answered and the run alive: this is
    // the backpressure bound, not a moment on the way past it.
    assert!(blocked(&state()), "{:?}", state());
    assert_eq!(server.requests(), max_in_flight, "nothing was retried");
    assert!(!run.is_finished(), "the run ended while the server stalled");
    assert!(read_stalled < count);

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
        "stalled at {read_stalled} records read (blocked after {blocked_after:?}); after recovery {count} records in {took:?} ({:.0}/s)",
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
    let c = |url: &str, in_flight: u64| {
        config(
            &sagemaker(
                url,
                &format!("max_batch = 10\nmax_wait = \"1ms\"\nmax_in_flight = {in_flight}"),
            ),
            "",
            default_sinks(),
        )
    };
    let in_order = |out: &[shardflow::record::Output]| {
        let (p, _) = split(out);
        let ids: Vec<usize> = p
            .iter()
            .map(|p| p.features.id[2..].parse().unwrap())
            .collect();
        assert_eq!(ids, (0..80).collect::<Vec<_>>());
    };

    // One at a time: 8 batches of 100 ms, never two at the server at once.
    let server = FaultServer::start(&embedded).await;
    server.delay(Duration::from_millis(100));
    let serial = c(&server.url, 1);
    let started = Instant::now();
    in_order(&run_batcher(scorer(&serial), &serial, records(80, 80), 80).await);
    let took = started.elapsed();
    assert_eq!(server.requests(), 8);
    assert_eq!(
        server.max_active(),
        1,
        "max_in_flight = 1 overlapped requests"
    );
    assert!(took >= Duration::from_millis(800), "{took:?}");

    // Four at a time: with the server answering nothing, four requests
    // arrive together and no fifth; once it answers, all 8 batches leave in
    // input order.
    let server = FaultServer::start(&embedded).await;
    server.stall(true);
    let parallel = c(&server.url, 4);
    let run = tokio::spawn({
        let parallel = parallel.clone();
        async move { run_batcher(scorer(&parallel), &parallel, records(80, 80), 80).await }
    });
    let held = wait_until(
        "4 requests held at once by the stalled server (held, requests)",
        Duration::from_secs(30),
        || {
            let seen = (server.active(), server.requests());
            assert!(seen.1 <= 4, "{seen:?}: more than max_in_flight = 4");
            seen
        },
        |&(held, _)| held == 4,
    )
    .await;
    assert_eq!(held, (4, 4));
    server.stall(false);
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the batcher finishes once the server answers")
        .unwrap();
    in_order(&out);
    assert_eq!(server.requests(), 8);
    assert_eq!(
        server.max_active(),
        4,
        "more than max_in_flight = 4 at once"
    );
}
