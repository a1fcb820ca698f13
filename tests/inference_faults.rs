//! Fault injection against serve-model: retries, no retry on 4xx, timeouts,
//! wrong row counts, the circuit breaker opening and closing, fallbacks
//! flagged, dead letters with reasons, and no record lost.

mod inference_support;

use std::collections::HashMap;
use std::time::Duration;

use inference_support::*;
use shardflow::inference::resilience::BreakerState;

fn embedded() -> shardflow::config::Config {
    config(
        &format!(
            "backend = \"embedded\"\nmodel = \"{}\"",
            repo("config/models/fraud.toml")
        ),
        "",
        default_sinks(),
    )
}

/// Fast resilience settings for tests (milliseconds, not seconds).
const FAST: &str = "max_batch = 10\nmax_wait = \"1ms\"\nrequest_timeout = \"500ms\"\nretry_base = \"5ms\"\nmax_retries = 3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_until_an_answer() {
    let server = FaultServer::start(&embedded()).await;
    server.script(&[Fault::Status500, Fault::Throttle, Fault::Drop]);
    let c = config(&sagemaker(&server.url, FAST), "", default_sinks());
    let out = run_batcher(scorer(&c), &c, records(10, 3), 10).await;
    let (p, dead) = split(&out);
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(p.len(), 10);
    assert!(p.iter().all(|p| !p.fallback));
    // 500, 429 and the answer reached HTTP; the drop happened in the proxy.
    assert_eq!(server.requests(), 3);
    assert_eq!(server.drops.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_errors_4xx_are_not_retried() {
    let server = FaultServer::start(&embedded()).await;
    server.script(&[Fault::BadRequest]);
    let c = config(&sagemaker(&server.url, FAST), "", default_sinks());
    let out = run_batcher(scorer(&c), &c, records(10, 3), 10).await;
    let (p, dead) = split(&out);
    assert!(p.is_empty());
    assert_eq!(dead.len(), 10);
    assert_eq!(server.requests(), 1);
    for (id, reason) in &dead {
        assert!(id.starts_with("p/"), "{id}");
        assert!(
            reason.contains("not retried") && reason.contains("ValidationError"),
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_row_count_is_an_error_not_a_shift() {
    let server = FaultServer::start(&embedded()).await;
    server.always(Some(Fault::WrongRows));
    let c = config(&sagemaker(&server.url, FAST), "", default_sinks());
    let out = run_batcher(scorer(&c), &c, records(20, 3), 10).await;
    let (p, dead) = split(&out);
    assert!(p.is_empty());
    assert_eq!(dead.len(), 20);
    assert!(
        dead[0].1.contains("answered 9 rows for 10 sent"),
        "{}",
        dead[0].1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried_then_dead_lettered() {
    let server = FaultServer::start(&embedded()).await;
    server.delay(Duration::from_millis(400));
    let c = config(
        &sagemaker(
            &server.url,
            "max_batch = 10\nrequest_timeout = \"50ms\"\nretry_base = \"5ms\"\nmax_retries = 2",
        ),
        "",
        default_sinks(),
    );
    let out = run_batcher(scorer(&c), &c, records(10, 3), 10).await;
    let (p, dead) = split(&out);
    assert!(p.is_empty());
    assert_eq!(dead.len(), 10);
    assert!(
        dead[0].1.contains("after 3 attempts") && dead[0].1.contains("timed out"),
        "{}",
        dead[0].1
    );
    assert_eq!(server.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_falls_back_and_closes_again() {
    let server = FaultServer::start(&embedded()).await;
    server.always(Some(Fault::Status500));
    let c = config(
        &sagemaker(
            &server.url,
            "max_batch = 10\nmax_in_flight = 1\nretry_base = \"1ms\"\nmax_retries = 0\n\
             breaker_min_requests = 4\nbreaker_cooldown = \"300ms\"\n\
             fallback = \"constant\"\nfallback_score = 0.5",
        ),
        "",
        default_sinks(),
    );
    let scorer = scorer(&c);
    // 10 batches, one at a time: the first 4 calls fail, the breaker opens,
    // and the other 6 batches fall back without calling the endpoint.
    let out = run_batcher(scorer.clone(), &c, records(100, 5), 10).await;
    let (p, dead) = split(&out);
    assert!(dead.is_empty());
    assert_eq!(p.len(), 100);
    assert!(p.iter().all(|p| p.fallback && &*p.model == "constant"));
    assert!(p
        .iter()
        .all(|p| p.prediction == serde_json::json!({"score": 0.5})));
    assert_eq!(server.requests(), 4, "calls while the breaker was open");
    assert_eq!(scorer.primary.breaker().state(), BreakerState::Open);

    // The endpoint recovers; after the cool-down one probe goes through and
    // closes the breaker: predictions are the model's again.
    server.always(None);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let out = run_batcher(scorer.clone(), &c, records(30, 5), 10).await;
    let (p, _) = split(&out);
    assert_eq!(p.len(), 30);
    assert!(
        p.iter().all(|p| !p.fallback && &*p.model == "fraud"),
        "{:?}",
        p[0]
    );
    assert_eq!(scorer.primary.breaker().state(), BreakerState::Closed);
    assert_eq!(server.requests(), 4 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_fallback_answers_flagged() {
    let server = FaultServer::start(&embedded()).await;
    server.always(Some(Fault::Status500));
    let c = config(
        &sagemaker(
            &server.url,
            &format!(
                "{FAST}\nmax_retries = 1\nfallback = \"embedded\"\nfallback_model = \"{}\"",
                repo("config/models/fraud.toml")
            )
            .replace("max_retries = 3\n", ""),
        ),
        "",
        default_sinks(),
    );
    let records = records(25, 4);
    let expected = run_batcher(scorer(&embedded()), &embedded(), records.clone(), 25).await;
    let out = run_batcher(scorer(&c), &c, records, 25).await;
    let (p, dead) = split(&out);
    let (e, _) = split(&expected);
    assert!(dead.is_empty());
    assert_eq!(p.len(), 25);
    for (got, want) in p.iter().zip(&e) {
        assert!(got.fallback);
        assert_eq!(&*got.model, "fraud-logistic");
        assert_eq!(got.prediction, want.prediction);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_mixed_faults_no_record_is_lost_and_key_order_holds() {
    let server = FaultServer::start(&embedded()).await;
    server.random(&[
        (0.15, Fault::Status500),
        (0.10, Fault::Throttle),
        (0.05, Fault::Drop),
        (0.05, Fault::WrongRows),
        (0.05, Fault::BadRequest),
    ]);
    server.delay(Duration::from_millis(2));
    let c = config(
        &sagemaker(
            &server.url,
            "max_batch = 8\nmax_wait = \"1ms\"\nmax_in_flight = 4\nrequest_timeout = \"1s\"\n\
             retry_base = \"2ms\"\nmax_retries = 2\nbreaker_min_requests = 1000",
        ),
        "",
        default_sinks(),
    );
    let n = 2_000;
    let input = records(n, 13);
    let key_of: HashMap<String, String> = input
        .iter()
        .map(|r| (r.id.clone(), r.key.to_string()))
        .collect();
    let out = run_batcher(scorer(&c), &c, input, 50).await;
    let (p, dead) = split(&out);
    // Count in = count out + dead letters, each record exactly once.
    assert_eq!(p.len() + dead.len(), n, "{} + {}", p.len(), dead.len());
    let mut seen: Vec<String> = p
        .iter()
        .map(|p| p.features.id.clone())
        .chain(dead.iter().map(|(id, _)| id.clone()))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n);
    assert!(
        !p.is_empty() && !dead.is_empty(),
        "{} predictions, {} dead",
        p.len(),
        dead.len()
    );
    for (_, reason) in &dead {
        assert!(reason.starts_with("inference failed after"), "{reason}");
    }
    // Outputs leave in input order: per key (and overall) ids ascend.
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut previous = None;
    for id in p
        .iter()
        .map(|p| p.features.id.clone())
        .chain(std::iter::empty())
    {
        let i: usize = id[2..].parse().unwrap();
        let key = key_of[&id].as_str();
        if let Some(prev) = last.insert(key, i) {
            assert!(prev < i, "key {key}: {prev} before {i}");
        }
        if let Some(prev) = previous {
            assert!(prev < i, "{prev} before {i}");
        }
        previous = Some(i);
    }
}
