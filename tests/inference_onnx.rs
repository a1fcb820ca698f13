//! `type = "onnx"` embedded models against onnxruntime: the fixtures of
//! tests/fixtures/onnx/ (written by scripts/make_onnx_fixtures.py, with
//! onnxruntime's scores for 40 rows, 10 of them with missing values) scored
//! by the embedded backend and through `serve-model` with the SageMaker
//! backend, within 1e-5 of onnxruntime; and the models that must be refused,
//! with the reason.

mod inference_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use inference_support::{config, default_sinks, repo, run_batcher, sagemaker, scorer, split};
use serde_json::Value as Json;
use shardflow::inference::resilience::Answer;
use shardflow::inference::{self, Model as _};
use shardflow::record::{FeatureNames, FeatureRecord, FeatureVector, Value};

/// The models shardflow scores, each with its reference answers.
const SCORED: [&str; 8] = [
    "logreg",
    "logreg_zipmap",
    "gbm",
    "hgb",
    "xgboost",
    "lightgbm",
    "mlp",
    "fixed_batch",
];
const TOLERANCE: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(repo(&format!("tests/fixtures/onnx/{name}")))
}

/// onnxruntime's answers for one fixture.
struct Reference {
    rows: Vec<Vec<Option<f64>>>,
    scores: Vec<f64>,
    labels: Option<Vec<i64>>,
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap();
    let json: Json = serde_json::from_str(&text).unwrap();
    let rows: Vec<Vec<Option<f64>>> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(Json::as_f64).collect())
        .collect();
    let scores = json["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .collect();
    let labels = json.get("labels").map(|l| {
        l.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    });
    let r = Reference {
        rows,
        scores,
        labels,
    };
    assert_eq!(r.rows.len(), r.scores.len());
    assert!(
        r.rows.iter().any(|row| row.iter().any(Option::is_none))
            && r.rows.iter().any(|row| row.iter().all(Option::is_some)),
        "{name}: the reference has rows with and without missing values"
    );
    r
}

fn names() -> FeatureNames {
    [
        "txn_count_1m",
        "amount_sum_1m",
        "amount_max_5m",
        "merchants_5m",
    ]
    .iter()
    .map(|s| Arc::from(*s))
    .collect::<Vec<_>>()
    .into()
}

fn vectors(r: &Reference) -> Vec<FeatureVector> {
    r.rows
        .iter()
        .map(|row| FeatureVector {
            names: names(),
            values: row.iter().map(|v| v.map(Value::Float)).collect(),
        })
        .collect()
}

fn embedded_config(model: &Path) -> shardflow::config::Config {
    config(
        &format!(
            "backend = \"embedded\"\nmodel = \"{}\"\nmax_batch = 7",
            model.display()
        ),
        "",
        default_sinks(),
    )
}

/// Asserts that `predictions` are onnxruntime's answers for `name`.
fn assert_matches(name: &str, how: &str, r: &Reference, predictions: &[Json]) {
    assert_eq!(predictions.len(), r.scores.len(), "{name} ({how})");
    for (i, (p, want)) in predictions.iter().zip(&r.scores).enumerate() {
        let got = p["score"]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} ({how}) row {i}: no score in {p}"));
        assert!(
            (got - want).abs() <= TOLERANCE,
            "{name} ({how}) row {i} {:?}: shardflow {got}, onnxruntime {want}",
            r.rows[i]
        );
        if let Some(labels) = &r.labels {
            assert_eq!(
                p["label"].as_i64(),
                Some(labels[i]),
                "{name} ({how}) row {i}: label of {p}"
            );
        }
    }
}

fn load(toml: &Path) -> anyhow::Result<shardflow::inference::embedded::EmbeddedModel> {
    inference::load_embedded(&embedded_config(&fixture("gbm.toml")), toml)
}

#[tokio::test]
async fn embedded_scores_equal_onnxruntime() {
    for name in SCORED {
        let r = reference(name);
        let model = load(&fixture(&format!("{name}.toml"))).unwrap();
        let vectors = vectors(&r);
        let rows: Vec<&FeatureVector> = vectors.iter().collect();
        // The whole set as one tensor, in batches of 7 and row by row.
        for batch in [rows.len(), 7, 1] {
            let mut predictions = Vec::new();
            for chunk in rows.chunks(batch) {
                let p = model.predict(chunk).await.unwrap();
                assert_eq!(p.variant.as_deref(), Some("1"));
                predictions.extend(p.predictions);
            }
            assert_matches(
                name,
                &format!("embedded, batches of {batch}"),
                &r,
                &predictions,
            );
        }
    }
}

/// The batcher feeds the ONNX model (on the blocking pool) like any other.
#[tokio::test]
async fn the_pipeline_scores_with_an_onnx_model() {
    let r = reference("xgboost");
    let config = embedded_config(&fixture("xgboost.toml"));
    let records: Vec<FeatureRecord> = vectors(&r)
        .into_iter()
        .enumerate()
        .map(|(i, features)| FeatureRecord {
            id: format!("p/{i}"),
            key: format!("u{}", i % 3).into(),
            event_time: 1_700_000_000_000 + i as i64,
            features,
            arrival: 0,
        })
        .collect();
    let outputs = run_batcher(scorer(&config), &config, records, 5).await;
    let (predictions, dead) = split(&outputs);
    assert!(dead.is_empty(), "{dead:?}");
    assert!(predictions
        .iter()
        .all(|p| &*p.model == "xgboost" && !p.fallback));
    let answers: Vec<Json> = predictions.iter().map(|p| p.prediction.clone()).collect();
    assert_matches("xgboost", "batcher", &r, &answers);
}

/// `serve-model`'s router on 127.0.0.1 serving `model`, until the sender drops.
async fn serve(model: &Path) -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = embedded_config(model);
    let m = inference::load_embedded(&config, model).unwrap();
    let router =
        shardflow::serve::model::router(m, inference::feature_names(&config), "AllTraffic")
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(shardflow::serve::serve_on(listener, router, async move {
        let _ = stopped.await;
    }));
    (url, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_model_scores_equal_onnxruntime() {
    for name in SCORED {
        let r = reference(name);
        let (url, _stop) = serve(&fixture(&format!("{name}.toml"))).await;
        let vectors = vectors(&r);
        let rows: Vec<&FeatureVector> = vectors.iter().collect();
        for (how, extra) in [
            ("serve-model, JSON", ""),
            (
                "serve-model, CSV",
                "content_type = \"text/csv\"\ncsv_output_columns = [\"score\", \"label\"]",
            ),
        ] {
            let config = config(&sagemaker(&url, extra), "", default_sinks());
            let scorer = scorer(&config);
            scorer.ready().await.unwrap();
            let mut predictions = Vec::new();
            for chunk in rows.chunks(16) {
                match scorer.primary.predict(chunk).await {
                    Answer::Primary(p) => predictions.extend(p.predictions),
                    Answer::Fallback { error, .. } | Answer::Failed(error) => {
                        panic!("{name} ({how}): {error}")
                    }
                }
            }
            assert_matches(name, how, &r, &predictions);
        }
    }
}

/// An endpoint that is down, and an ONNX fallback model answers.
#[tokio::test]
async fn fallback_model_may_be_onnx() {
    let r = reference("gbm");
    let config = config(
        &sagemaker(
            "http://127.0.0.1:1",
            &format!(
                "max_retries = 0\nrequest_timeout = \"2s\"\nfallback = \"embedded\"\nfallback_model = \"{}\"",
                fixture("gbm.toml").display()
            ),
        ),
        "",
        default_sinks(),
    );
    let scorer = scorer(&config);
    let vectors = vectors(&r);
    let rows: Vec<&FeatureVector> = vectors.iter().collect();
    match scorer.primary.predict(&rows).await {
        Answer::Fallback {
            prediction, model, ..
        } => {
            assert_eq!(&*model, "gbm");
            assert_matches("gbm", "fallback", &r, &prediction.predictions);
        }
        Answer::Primary(_) => panic!("nothing listens on port 1"),
        Answer::Failed(e) => panic!("the fallback failed: {e}"),
    }
}

/// A model file in a temporary directory, its ONNX file given by absolute path.
fn model_file(dir: &Path, onnx: &Path, body: &str) -> PathBuf {
    let path = dir.join("model.toml");
    let text = format!(
        "name = \"m\"\ntype = \"onnx\"\npath = \"{}\"\n{body}\n",
        onnx.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

const INPUTS: &str =
    r#"inputs = ["txn_count_1m", "amount_sum_1m", "amount_max_5m", "merchants_5m"]"#;

fn refusal(onnx: &Path, body: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = model_file(dir.path(), onnx, body);
    match load(&path) {
        Ok(_) => panic!("{} loaded with {body}", onnx.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn an_unsupported_operator_is_refused_by_name() {
    let e = refusal(
        &fixture("unsupported.onnx"),
        &format!("{INPUTS}\n[outputs]\nscore = \"probabilities\""),
    );
    assert!(
        e.contains("does not implement: Scaler (node scaled)"),
        "{e}"
    );
    // An operator only a discarded output needs does not matter (see
    // logreg_zipmap.toml, scored above); one that the outputs need does.
    let e = refusal(
        &fixture("logreg_zipmap.onnx"),
        &format!("{INPUTS}\n[outputs]\nscore = \"output_probability\""),
    );
    assert!(e.contains("does not implement: ZipMap"), "{e}");
}

#[test]
fn check_and_run_refuse_an_unsupported_operator() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("unsupported.toml");
    std::fs::write(
        &model,
        std::fs::read_to_string(fixture("unsupported.toml"))
            .unwrap()
            .replace(
                "path = \"unsupported.onnx\"",
                &format!("path = \"{}\"", fixture("unsupported.onnx").display()),
            ),
    )
    .unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nstate_dir = \"{}\"\n\n[source]\ntype = \"generator\"\ncount = 10\n\n[schema]\nkey = \"userId\"\ntimestamp = \"timestamp\"\nfields = {{ amount = \"f64\", merchant = \"string\" }}\n\n{}\n\n[inference]\nbackend = \"embedded\"\nmodel = \"{}\"\n\n{}",
            dir.path().join("state").display(),
            inference_support::FEATURES,
            model.display(),
            default_sinks()
        ),
    )
    .unwrap();
    for command in ["check", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_shardflow"))
            .args([command, "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: {:?}", out.status);
        if command == "check" {
            assert_eq!(out.status.code(), Some(2), "{stderr}");
        }
        assert!(
            stderr.contains("does not implement: Scaler"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn a_truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("gbm.onnx")).unwrap();
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = refusal(
        &cut,
        &format!("{INPUTS}\n[outputs]\nscore = \"probabilities\""),
    );
    assert!(
        e.contains("cut.onnx is not a valid ONNX model (truncated or not ONNX?)"),
        "{e}"
    );
}

#[test]
fn inputs_that_do_not_fit_the_model_are_refused() {
    let gbm = fixture("gbm.onnx");
    let e = refusal(
        &gbm,
        "inputs = [\"txn_count_1m\", \"amount_sum_1m\", \"amount_max_5m\"]\n[outputs]\nscore = \"probabilities\"",
    );
    assert!(
        e.contains("takes 4 values per row (shape [?, 4]), but `inputs` lists 3 features (txn_count_1m, amount_sum_1m, amount_max_5m)"),
        "{e}"
    );
    let e = refusal(
        &gbm,
        "inputs = [\"txn_count_1m\", \"amount_sum_1m\", \"amount_max_5m\", \"refunds_1h\"]\n[outputs]\nscore = \"probabilities\"",
    );
    assert!(
        e.contains("the model uses feature \"refunds_1h\", which is not one of the configured [[features]] or [schema] request_fields"),
        "{e}"
    );
    let e = refusal(
        &fixture("double_input.onnx"),
        &format!("{INPUTS}\n[outputs]\nscore = \"probabilities\""),
    );
    assert!(e.contains("is DOUBLE; shardflow feeds float32"), "{e}");
    let e = refusal(&gbm, &format!("{INPUTS}\n[outputs]\nscore = \"scores\""));
    assert!(
        e.contains("names tensor \"scores\", which the model does not have (its outputs: label, probabilities)"),
        "{e}"
    );
    let e = refusal(&gbm, &format!("{INPUTS}\n[outputs]\nscore = \"label\""));
    assert!(e.contains("holds I64, not floats"), "{e}");
    let e = refusal(
        &gbm,
        &format!("{INPUTS}\n[outputs]\nscore = \"probabilities\"\nscore_column = 2"),
    );
    assert!(e.contains("score_column 2 is out of range"), "{e}");
    let e = refusal(
        &gbm,
        &format!(
            "{INPUTS}\n[outputs]\nscore = \"probabilities\"\nlabel = \"label\"\nthreshold = 0.7"
        ),
    );
    assert!(e.contains("has both `label` and `threshold`"), "{e}");
    let e = refusal(
        &gbm,
        "inputs = [\"txn_count_1m\"]\n[outputs]\nscore = \"probabilities\"\n[impute]\nmerchants_5m = 0.0",
    );
    assert!(
        e.contains("[impute] has \"merchants_5m\", which is not one of the model's `inputs`"),
        "{e}"
    );
}

/// Without an [impute] value or `missing = "nan"`, a row with a missing
/// feature is not scored: its prediction says which feature was missing.
#[tokio::test]
async fn a_missing_feature_without_impute_is_a_null_score() {
    let dir = tempfile::tempdir().unwrap();
    let path = model_file(
        dir.path(),
        &fixture("gbm.onnx"),
        &format!("{INPUTS}\n[outputs]\nscore = \"probabilities\"\nlabel = \"label\"\n[impute]\namount_sum_1m = 0.0"),
    );
    let model = load(&path).unwrap();
    let r = reference("gbm");
    let vectors = vectors(&r);
    let rows: Vec<&FeatureVector> = vectors.iter().collect();
    let p = model.predict(&rows).await.unwrap().predictions;
    for (i, row) in r.rows.iter().enumerate() {
        let first_missing = row
            .iter()
            .enumerate()
            .skip(2)
            .find(|(_, v)| v.is_none())
            .map(|(j, _)| names()[j].clone());
        match first_missing {
            Some(feature) => {
                assert!(p[i]["score"].is_null(), "row {i}: {}", p[i]);
                assert_eq!(p[i]["missing"], &*feature, "row {i}");
            }
            None => assert!(p[i]["score"].is_f64(), "row {i}: {}", p[i]),
        }
    }
}

/// The example in config/models/ loads against the shipped features.
#[test]
fn the_shipped_example_loads() {
    let model = load(Path::new(&repo("config/models/fraud_gbm.toml"))).unwrap();
    let text = model.describe();
    assert!(text.contains("TreeEnsembleClassifier"), "{text}");
}

/// tract reads a `BRANCH_GTE` split as garbage (a silent wrong score): such
/// a tree ensemble is refused by name. The fixture's splits are
/// `BRANCH_LEQ`, a string of the same length, so one can be swapped in place.
#[test]
fn a_tree_ensemble_with_greater_or_equal_splits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixture("gbm.onnx")).unwrap();
    let at = bytes
        .windows(10)
        .position(|w| w == b"BRANCH_LEQ")
        .expect("the fixture has LEQ splits");
    bytes[at..at + 10].copy_from_slice(b"BRANCH_GTE");
    let onnx = dir.path().join("gte.onnx");
    std::fs::write(&onnx, bytes).unwrap();
    let e = refusal(
        &onnx,
        &format!("{INPUTS}\n[outputs]\nscore = \"probabilities\""),
    );
    assert!(
        e.contains("BRANCH_GTE split(s)") && e.contains("re-export"),
        "{e}"
    );
}

/// `[schema] request_fields` join the vector after the features; a model's
/// `inputs` name them like features. gbm.onnx's fourth column fed from the
/// request field `amount` (with `merchants_5m` in the vector but not an
/// input) scores onnxruntime's reference rows exactly: the column is taken
/// by name. Without `request_fields`, the same inputs are refused.
#[tokio::test]
async fn a_request_field_of_the_event_is_a_model_input() {
    let with_request = |request: &str, model: &Path| {
        let text = format!(
            r#"
[source]
type = "generator"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64", merchant = "string" }}
{request}

{}

[inference]
backend = "embedded"
model = "{}"

{}
"#,
            inference_support::FEATURES,
            model.display(),
            default_sinks()
        );
        shardflow::config::Config::from_str_at(&text, Path::new("test.toml"), |_| None).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let body = "inputs = [\"txn_count_1m\", \"amount_sum_1m\", \"amount_max_5m\", \"amount\"]\n\
                [outputs]\nscore = \"probabilities\"\nlabel = \"label\"\n\
                [impute]\namount_sum_1m = 0.0\namount_max_5m = 0.0\namount = 0.0";
    let path = model_file(dir.path(), &fixture("gbm.onnx"), body);
    let config = with_request("request_fields = [\"amount\"]", &path);
    let names = inference::feature_names(&config);
    assert_eq!(names.last().map(|n| &**n), Some("amount"));
    let model = inference::load_embedded(&config, &path).unwrap();
    let r = reference("gbm");
    let vectors: Vec<FeatureVector> = r
        .rows
        .iter()
        .map(|row| FeatureVector {
            names: names.clone(),
            // merchants_5m holds a value the model must not see.
            values: vec![row[0], row[1], row[2], Some(1e6), row[3]]
                .into_iter()
                .map(|v| v.map(Value::Float))
                .collect(),
        })
        .collect();
    let rows: Vec<&FeatureVector> = vectors.iter().collect();
    let p = model.predict(&rows).await.unwrap();
    assert_matches("gbm", "amount as a request field", &r, &p.predictions);

    let without = with_request("", &path);
    let e = format!(
        "{:#}",
        inference::load_embedded(&without, &path).err().unwrap()
    );
    assert!(
        e.contains("\"amount\", which is not one of the configured [[features]] or [schema] request_fields"),
        "{e}"
    );
}
