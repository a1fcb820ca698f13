//! Inference faults end to end: the real binary scores a bounded generator
//! stream with the SageMaker backend against `serve-model`'s router on
//! 127.0.0.1, while the model server goes through phases of 5xx bursts,
//! stalls (requests hang past `request_timeout`) and slow answers (timeouts).
//! Every record must come out exactly once, as a prediction (the model's or
//! the flagged fallback) or a dead letter; the breaker must open (calls
//! rejected, fallback used) and close again (the last predictions are the
//! model's); RSS is sampled throughout and reported.
//!
//! (`inference_faults.rs` proves each rule on the batcher in process; this
//! runs the whole pipeline in the shipped binary through a fault schedule.)

mod harness;
mod inference_support;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::{knob, metric_sum, ndjson, report, scrape, Proc};
use inference_support::{repo, Fault, FaultServer};

fn config(dir: &Path, url: &str, count: u64, rate: u64) {
    let text = format!(
        r#"
[pipeline]
state_dir = "state"
checkpoint_interval = "200ms"

[source]
type = "generator"
seed = 7
rate = {rate}
count = {count}
keys = 200
partitions = 2
start_time = 1700000000000
bad_fraction = 0.01

{schema}
{features}

[inference]
backend = "sagemaker"
endpoint_name = "fraud"
endpoint_url = "{url}"
max_batch = 20
max_wait = "2ms"
max_in_flight = 4
request_timeout = "200ms"
max_retries = 1
retry_base = "5ms"
breaker_min_requests = 5
breaker_cooldown = "300ms"
fallback = "constant"
fallback_score = 0.5
{sinks}
"#,
        schema = harness::SCHEMA,
        features = inference_support::FEATURES,
        sinks = [
            harness::file_sink("out/predictions.ndjson", &["prediction"]),
            harness::file_sink("out/dead.ndjson", &["dead_letter"]),
        ]
        .concat()
    );
    std::fs::write(dir.join("config.toml"), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_stalls_and_timeouts_account_for_every_record() {
    let count = knob("SHARDFLOW_INFERENCE_FAULT_RECORDS", 15_000);
    let rate = 1_500;
    let model_config = inference_support::config(
        &format!(
            "backend = \"embedded\"\nmodel = \"{}\"",
            repo("config/models/fraud.toml")
        ),
        "",
        inference_support::default_sinks(),
    );
    let server = FaultServer::start(&model_config).await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &server.url, count, rate);
    let metrics = harness::free_addr();
    let mut run = Proc::run(dir.path(), Path::new("config.toml"), &metrics, "stderr.log");

    // The fault schedule, by seconds since the first records were read.
    let schedule: [(f64, &str); 7] = [
        (1.0, "5xx"),
        (2.5, "ok"),
        (3.5, "stall"),
        (5.0, "ok"),
        (6.0, "slow"),
        (7.0, "ok"),
        (f64::MAX, ""),
    ];
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut started: Option<Instant> = None;
    let mut phase = 0;
    let mut injected = std::collections::BTreeMap::new();
    let mut last_page = String::new();
    let status = loop {
        if let Some(status) = run.exited() {
            break status;
        }
        let t = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        if started.is_some() && t >= schedule[phase].0 {
            let what = schedule[phase].1;
            server.always(None);
            server.stall(false);
            server.delay(Duration::ZERO);
            match what {
                "5xx" => server.always(Some(Fault::Status500)),
                "stall" => server.stall(true),
                "slow" => server.delay(Duration::from_millis(400)),
                _ => {}
            }
            if what != "ok" {
                *injected.entry(what).or_insert(0) += 1;
            }
            phase += 1;
        }
        run.sample_rss();
        if let Some(page) = scrape(&metrics) {
            if started.is_none() && metric_sum(&page, "shardflow_records_in_total") > 0.0 {
                started = Some(Instant::now());
            }
            last_page = page;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish:\n{}",
            run.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}:\n{}", run.stderr());
    assert!(phase >= 6, "the run ended before the fault schedule did");

    let predictions = ndjson(&dir.path().join("out/predictions.ndjson"));
    let dead = ndjson(&dir.path().join("out/dead.ndjson"));
    let mut ids = HashSet::new();
    for r in predictions.iter().chain(&dead) {
        let id = r["id"].as_str().unwrap().to_owned();
        assert!(ids.insert(id.clone()), "{id} came out twice");
    }
    assert_eq!(ids.len() as u64, count, "every record exactly once");
    assert!(dead
        .iter()
        .all(|d| !d["reason"].as_str().unwrap().is_empty()));
    let fallback = predictions.iter().filter(|p| p["fallback"] == true).count();
    assert!(fallback > 0, "no fallback while the model failed");
    assert!(
        predictions
            .iter()
            .rev()
            .take(200)
            .all(|p| p["fallback"] == false),
        "the breaker did not close again: the last predictions are fallbacks"
    );
    let rejected = metric_sum(&last_page, "shardflow_inference_breaker_rejections_total");
    assert!(rejected > 0.0, "the breaker never opened");
    report(&format!(
        "inference faults: {} 5xx burst, {} stall, {} slow phase (requests: {} served, breaker rejected {rejected} calls, {} retries); \
         {count} records in, {} predictions ({} model, {fallback} fallback) + {} dead letters; peak RSS {} MiB",
        injected.get("5xx").unwrap_or(&0),
        injected.get("stall").unwrap_or(&0),
        injected.get("slow").unwrap_or(&0),
        server.requests(),
        metric_sum(&last_page, "shardflow_inference_retries_total"),
        predictions.len(),
        predictions.len() - fallback,
        dead.len(),
        run.peak_rss_kib / 1024
    ));
}
