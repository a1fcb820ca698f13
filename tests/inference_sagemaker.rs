//! The SageMaker backend against `serve-model` on 127.0.0.1: the same
//! predictions as the embedded model, over JSON and CSV, with the invoked
//! variant recorded; and the shadow model.

mod inference_support;

use std::time::{Duration, Instant};

use inference_support::*;
use shardflow::record::Output;

const MODEL: &str = "model = \"config/models/fraud.toml\"";

fn embedded_config() -> shardflow::config::Config {
    config(
        &format!(
            "backend = \"embedded\"\n{}",
            MODEL.replace("config/", &repo("config/"))
        ),
        "",
        default_sinks(),
    )
}

/// Scores the same records with the embedded model and with `extra` against
/// serve-model, and checks every prediction is identical.
async fn equal_to_embedded(extra: &str, expect_variant: &str) {
    let embedded = embedded_config();
    let server = FaultServer::start(&embedded).await;
    let remote = config(&sagemaker(&server.url, extra), "", default_sinks());
    let records = records(500, 37);
    let local = run_batcher(scorer(&embedded), &embedded, records.clone(), 64).await;
    let over_http = run_batcher(scorer(&remote), &remote, records, 64).await;
    let (a, dead_a) = split(&local);
    let (b, dead_b) = split(&over_http);
    assert!(dead_a.is_empty() && dead_b.is_empty(), "{dead_b:?}");
    assert_eq!(a.len(), 500);
    assert_eq!(b.len(), 500);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.features.id, y.features.id);
        assert_eq!(x.prediction, y.prediction, "record {}", x.features.id);
        assert!(!y.fallback);
        assert_eq!(&*y.model, "fraud");
        assert_eq!(y.variant.as_deref(), Some(expect_variant));
    }
    // The model answers; all four features are imputed, so nothing is null.
    assert!(b.iter().all(|p| p.prediction["score"].is_f64()));
    assert!(server.requests() >= 500 / 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_predictions_equal_the_embedded_model() {
    equal_to_embedded("content_type = \"application/json\"", "AllTraffic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_inputs_key_and_target_variant() {
    equal_to_embedded("json_key = \"inputs\"\ntarget_variant = \"blue\"", "blue").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_predictions_equal_the_embedded_model() {
    equal_to_embedded(
        "content_type = \"text/csv\"\ncsv_output_columns = [\"score\", \"label\"]",
        "AllTraffic",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_predictions_are_written_off_the_latency_path() {
    let embedded = embedded_config();
    let server = FaultServer::start(&embedded).await;
    // The shadow variant answers slowly; the primary must not wait for it.
    server.only_variant(Some("shadow"));
    server.delay(Duration::from_millis(300));
    let remote = config(
        &sagemaker(
            &server.url,
            "target_variant = \"main\"\nmax_batch = 10\nmax_wait = \"1ms\"\nrequest_timeout = \"5s\"\nshadow = { target_variant = \"shadow\", max_in_flight = 2 }",
        ),
        "",
        "[[sinks]]\ntype = \"stdout\"\nkinds = [\"prediction\", \"shadow\"]\n",
    );
    let started = Instant::now();
    let out = run_batcher(scorer(&remote), &remote, records(200, 7), 10).await;
    let elapsed = started.elapsed();
    let (primary, dead) = split(&out);
    assert!(dead.is_empty());
    assert_eq!(primary.len(), 200);
    assert!(primary.iter().all(|p| p.variant.as_deref() == Some("main")));
    // Primary latency is that of the fast variant.
    let slowest = primary.iter().map(|p| p.latency_ms).fold(0.0, f64::max);
    assert!(
        slowest < 250.0,
        "primary waited for the shadow: {slowest} ms"
    );
    let shadow: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Shadow(p) => Some(p),
            _ => None,
        })
        .collect();
    // Two shadow batches at a time, 300 ms each: most batches are skipped,
    // but some were scored, each record at most once, and with the same
    // prediction as the primary (same model behind both variants).
    assert!(!shadow.is_empty(), "no shadow records");
    assert!(shadow.len() < 200, "shadow never skipped: {}", shadow.len());
    let mut ids: Vec<_> = shadow.iter().map(|p| p.features.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), shadow.len());
    for s in &shadow {
        assert_eq!(s.variant.as_deref(), Some("shadow"));
        let p = primary
            .iter()
            .find(|p| p.features.id == s.features.id)
            .unwrap();
        assert_eq!(p.prediction, s.prediction);
    }
    assert!(out
        .iter()
        .any(|o| o.to_ndjson().starts_with("{\"kind\":\"shadow\"")));
    // The run waits for outstanding shadow batches only at the end of input.
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}
