//! The SageMaker backend against a model server that is not shardflow's: a
//! small HTTP server, written here, that answers `InvokeEndpoint` the way the
//! SageMaker runtime service does when things fail, then (per request, as
//! scripted) with a valid answer.
//!
//! The error shapes are the service's (restJson1, the AWS JSON error
//! convention): the error type in the `x-amzn-ErrorType` header (with the
//! service's `:http://internal.amazon.com/coral/…` suffix) and/or as `__type`
//! in a JSON body (with a `namespace#` prefix), the text in `message` or
//! `Message`, and for `ModelError` (HTTP 424: the container failed) the
//! container's `OriginalStatusCode` and `OriginalMessage` and the
//! `LogStreamArn`. The real aws-sdk-sagemakerruntime must parse each into its
//! modelled error; shardflow must retry what is worth retrying, a bounded
//! number of times, and say in the dead letter (or to the fallback) what the
//! service said.

mod inference_support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sagemakerruntime::error::ProvideErrorMetadata as _;
use aws_sdk_sagemakerruntime::operation::invoke_endpoint::InvokeEndpointError;
use aws_sdk_sagemakerruntime::primitives::Blob;
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use inference_support::*;
use serde_json::{json, Value as Json};
use shardflow::inference::resilience::{Answer, ErrorKind, ModelError as Classified};
use shardflow::inference::Model as _;
use shardflow::record::FeatureVector;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The service's suffix on `x-amzn-ErrorType` (the SDK strips it).
const CORAL: &str = ":http://internal.amazon.com/coral/com.amazon.sagemaker/";
const LOG_STREAM: &str =
    "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/fraud";

/// One scripted error answer.
#[derive(Debug, Clone)]
struct Failure {
    status: u16,
    /// `x-amzn-ErrorType`, when the answer carries one.
    error_type: Option<String>,
    content_type: &'static str,
    body: String,
}

/// HTTP 424 ModelError, as SageMaker words it: the container answered
/// `original_status` (0: it did not answer at all) with `original_message`.
fn model_error(original_status: i32, original_message: &str) -> Failure {
    let kind = if (400..500).contains(&original_status) {
        "client"
    } else {
        "server"
    };
    let mut body = json!({
        "LogStreamArn": LOG_STREAM,
        "Message": format!(
            "Received {kind} error ({original_status}) from primary with message \"{original_message}\". \
             See https://us-east-1.console.aws.amazon.com/cloudwatch/home?region=us-east-1#logEventViewer:\
             group=/aws/sagemaker/Endpoints/fraud in account 123456789012 for more information."
        ),
        "OriginalMessage": original_message,
        "OriginalStatusCode": original_status,
    });
    if kind == "client" {
        body["ErrorCode"] = json!("CLIENT_ERROR_FROM_MODEL");
    }
    Failure {
        status: 424,
        error_type: Some(format!("ModelError{CORAL}")),
        content_type: "application/json",
        body: body.to_string(),
    }
}

/// An error named in the header, with `body` as the JSON body.
fn with_header(status: u16, error_type: &str, body: Json) -> Failure {
    Failure {
        status,
        error_type: Some(format!("{error_type}{CORAL}")),
        content_type: "application/json",
        body: body.to_string(),
    }
}

/// An error named only by `__type` in the body.
fn in_body(status: u16, body: Json) -> Failure {
    Failure {
        status,
        error_type: None,
        content_type: "application/json",
        body: body.to_string(),
    }
}

/// One error shape and what must come of it.
struct Case {
    name: &'static str,
    failure: Failure,
    /// The SDK parsed it into the error it models for this answer.
    parsed: fn(&InvokeEndpointError) -> bool,
    retried: bool,
    /// Pieces the dead letter's reason must hold.
    reason: Vec<&'static str>,
}

const CONTAINER_400: &str = "{\"error\": \"expected 5 features, got 4\"}";
const CONTAINER_500: &str = "model crashed: CUDA error: out of memory";
const CONTAINER_TIMEOUT: &str =
    "Your invocation timed out while waiting for a response from container primary.";

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "ModelError, container 400",
            failure: model_error(400, CONTAINER_400),
            parsed: |e| match e {
                InvokeEndpointError::ModelError(m) => {
                    m.original_status_code() == Some(400)
                        && m.original_message() == Some(CONTAINER_400)
                        && m.log_stream_arn() == Some(LOG_STREAM)
                        && m.message().is_some_and(|t| t.starts_with("Received client error (400)"))
                }
                _ => false,
            },
            retried: false,
            reason: vec![
                "HTTP 424 ModelError (OriginalStatusCode 400): Received client error (400) from primary",
                "OriginalMessage: {\"error\": \"expected 5 features, got 4\"}",
                "LogStreamArn: arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/fraud",
            ],
        },
        Case {
            name: "ModelError, container 500",
            failure: model_error(500, CONTAINER_500),
            parsed: |e| match e {
                InvokeEndpointError::ModelError(m) => {
                    m.original_status_code() == Some(500)
                        && m.original_message() == Some(CONTAINER_500)
                }
                _ => false,
            },
            retried: true,
            reason: vec![
                "HTTP 424 ModelError (OriginalStatusCode 500): Received server error (500)",
                "OriginalMessage: model crashed: CUDA error: out of memory",
                "LogStreamArn: arn:aws:logs:",
            ],
        },
        Case {
            name: "ModelError, no answer from the container (status 0)",
            failure: model_error(0, CONTAINER_TIMEOUT),
            parsed: |e| match e {
                InvokeEndpointError::ModelError(m) => m.original_status_code() == Some(0),
                _ => false,
            },
            retried: true,
            reason: vec![
                "HTTP 424 ModelError (OriginalStatusCode 0)",
                "OriginalMessage: Your invocation timed out while waiting for a response from container primary.",
            ],
        },
        Case {
            name: "ValidationError",
            failure: with_header(
                400,
                "ValidationError",
                json!({"message": "Endpoint fraud of account 123456789012 not found."}),
            ),
            parsed: |e| {
                e.is_validation_error()
                    && e.message() == Some("Endpoint fraud of account 123456789012 not found.")
            },
            retried: false,
            reason: vec![
                "HTTP 400 ValidationError: Endpoint fraud of account 123456789012 not found.",
            ],
        },
        Case {
            name: "ThrottlingException 429, __type only",
            failure: in_body(
                429,
                json!({
                    "__type": "com.amazon.coral.availability#ThrottlingException",
                    "message": "Rate exceeded"
                }),
            ),
            // Not modelled for InvokeEndpoint: a generic error with its code.
            parsed: |e| e.code() == Some("ThrottlingException") && e.message() == Some("Rate exceeded"),
            retried: true,
            reason: vec!["HTTP 429 ThrottlingException: Rate exceeded"],
        },
        Case {
            name: "ThrottlingException 400 (AWS's common-errors status)",
            failure: with_header(400, "ThrottlingException", json!({"message": "Rate exceeded"})),
            parsed: |e| e.code() == Some("ThrottlingException"),
            retried: true,
            reason: vec!["HTTP 400 ThrottlingException: Rate exceeded"],
        },
        Case {
            name: "ServiceUnavailable 503, header and __type",
            failure: with_header(
                503,
                "ServiceUnavailable",
                json!({
                    "__type": "com.amazon.sagemaker.runtime#ServiceUnavailable",
                    "Message": "The service is unavailable. Try your call again."
                }),
            ),
            parsed: |e| {
                e.is_service_unavailable()
                    && e.message() == Some("The service is unavailable. Try your call again.")
            },
            retried: true,
            reason: vec![
                "HTTP 503 ServiceUnavailable: The service is unavailable. Try your call again.",
            ],
        },
        Case {
            name: "InternalFailure 500",
            failure: with_header(
                500,
                "InternalFailure",
                json!({"Message": "An internal failure occurred."}),
            ),
            parsed: |e| e.is_internal_failure(),
            retried: true,
            reason: vec!["HTTP 500 InternalFailure: An internal failure occurred."],
        },
        Case {
            name: "ModelNotReadyException 429",
            failure: with_header(
                429,
                "ModelNotReadyException",
                json!({"Message": "Model fraud-v2 is still loading; wait and try your request again."}),
            ),
            parsed: |e| e.is_model_not_ready_exception(),
            retried: true,
            reason: vec![
                "HTTP 429 ModelNotReadyException: Model fraud-v2 is still loading",
            ],
        },
        Case {
            name: "a load balancer's HTML 502, no AWS error shape",
            failure: Failure {
                status: 502,
                error_type: None,
                content_type: "text/html",
                body: "<html><head><title>502 Bad Gateway</title></head></html>".to_string(),
            },
            parsed: |e| e.code().is_none(),
            retried: true,
            reason: vec!["HTTP 502 without an AWS error code: \"<html><head><title>502 Bad Gateway"],
        },
    ]
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    content_type: Option<String>,
    accept: Option<String>,
    signed: bool,
    rows: usize,
}

#[derive(Default)]
struct Plan {
    /// Answers for the next requests, one each; then every request succeeds.
    script: Mutex<VecDeque<Failure>>,
    seen: Mutex<Vec<Seen>>,
}

/// A stand-in for a SageMaker runtime endpoint on 127.0.0.1, hyper only.
struct Foreign {
    url: String,
    plan: Arc<Plan>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Foreign {
    async fn start() -> Foreign {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let plan = Arc::new(Plan::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let shared = plan.clone();
        let task = tokio::spawn(async move {
            // Dropped at the end: every open connection is aborted with it.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => break,
                    },
                    _ = &mut stopped => break,
                };
                let plan = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let plan = plan.clone();
                        async move { Ok::<_, Infallible>(answer(&plan, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                // Reap finished connections so the set stays small.
                while connections.try_join_next().is_some() {}
            }
        });
        Foreign {
            url,
            plan,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The next `times` requests get `failure`.
    fn fail(&self, failure: &Failure, times: usize) {
        let mut script = self.plan.script.lock().unwrap();
        script.extend(std::iter::repeat_n(failure.clone(), times));
    }

    fn seen(&self) -> Vec<Seen> {
        self.plan.seen.lock().unwrap().clone()
    }

    fn requests(&self) -> usize {
        self.plan.seen.lock().unwrap().len()
    }

    /// Stops accepting, closes every connection, and waits for it.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the server stops within 5 s")
                .unwrap();
        }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        // A test that panicked before `stop`: still stop the server.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn read_body(body: Incoming) -> Vec<u8> {
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        match frame.map(|f| f.into_data()) {
            Ok(Ok(data)) => out.extend_from_slice(&data),
            Ok(Err(_trailers)) => {}
            Err(_) => break,
        }
    }
    out
}

/// The scripted failure, or the foreign model's answer: one prediction per
/// row of `{"instances": [[…], …]}`, `score = 0.5 · f0 + 1`.
async fn answer(plan: &Plan, request: Request<Incoming>) -> Response<String> {
    let (parts, body) = request.into_parts();
    let body = read_body(body).await;
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let rows: Vec<Json> = serde_json::from_slice::<Json>(&body)
        .ok()
        .and_then(|v| v.get("instances").and_then(Json::as_array).cloned())
        .unwrap_or_default();
    let request_id = {
        let mut seen = plan.seen.lock().unwrap();
        seen.push(Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            content_type: header("content-type"),
            accept: header("accept"),
            signed: header("authorization").is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256 ")),
            rows: rows.len(),
        });
        format!("7c9e6679-7425-40de-944b-{:012x}", seen.len())
    };
    let failure = plan.script.lock().unwrap().pop_front();
    let response = Response::builder().header("x-amzn-RequestId", request_id);
    match failure {
        Some(f) => {
            let mut response = response
                .status(f.status)
                .header("content-type", f.content_type);
            if let Some(t) = &f.error_type {
                response = response.header("x-amzn-ErrorType", t.as_str());
            }
            response.body(f.body).unwrap()
        }
        None => {
            let predictions: Vec<Json> = rows
                .iter()
                .map(|r| json!({ "score": r[0].as_f64().unwrap_or(f64::NAN) * 0.5 + 1.0 }))
                .collect();
            response
                .status(200)
                .header("content-type", "application/json")
                .header("x-Amzn-Invoked-Production-Variant", "AllTraffic")
                .body(json!({ "predictions": predictions }).to_string())
                .unwrap()
        }
    }
}

/// Fast retries, a breaker that stays closed, one batch of 10.
const FAST: &str = "max_batch = 10\nmax_wait = \"1ms\"\nrequest_timeout = \"2s\"\nretry_base = \"5ms\"\nmax_retries = 3\nbreaker_min_requests = 1000";
/// 1 + max_retries.
const MAX_ATTEMPTS: usize = 4;

fn feature_rows(n: usize) -> Vec<FeatureVector> {
    records(n, 3).into_iter().map(|r| r.features).collect()
}

/// The expected score of record `p/<i>` (its first feature is `i % 17`).
fn expected_score(i: usize) -> f64 {
    (i % 17) as f64 * 0.5 + 1.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_parses_each_error_into_its_modelled_error_and_shardflow_classifies_it() {
    let server = Foreign::start().await;
    let sdk = aws_sdk_sagemakerruntime::config::Builder::from(&sdk())
        .endpoint_url(&server.url)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    let client = aws_sdk_sagemakerruntime::Client::from_conf(sdk);
    let c = config(&sagemaker(&server.url, FAST), "", default_sinks());
    let model = shardflow::inference::sagemaker::SageMakerModel::new(
        shardflow::inference::sagemaker::EndpointSettings::primary(&c.inference).unwrap(),
    )
    .with_sdk_config(inference_support::sdk());
    let rows = feature_rows(3);
    let refs: Vec<&FeatureVector> = rows.iter().collect();
    let within = Duration::from_secs(10);

    for case in cases() {
        // The SDK alone.
        server.fail(&case.failure, 1);
        let err = tokio::time::timeout(
            within,
            client
                .invoke_endpoint()
                .endpoint_name("fraud")
                .content_type("application/json")
                .body(Blob::new(r#"{"instances":[[1]]}"#))
                .send(),
        )
        .await
        .expect("the SDK answers in time")
        .expect_err(case.name);
        let service = err.into_service_error();
        assert!((case.parsed)(&service), "{}: {service:?}", case.name);

        // shardflow's model: the same answer, classified.
        server.fail(&case.failure, 1);
        let err = tokio::time::timeout(within, model.predict(&refs))
            .await
            .expect("the model answers in time")
            .expect_err(case.name);
        let classified = err
            .chain()
            .find_map(|c| c.downcast_ref::<Classified>())
            .unwrap_or_else(|| panic!("{}: not classified: {err:#}", case.name));
        let want = if case.retried {
            ErrorKind::Transient
        } else {
            ErrorKind::Permanent
        };
        assert_eq!(classified.kind, want, "{}: {classified}", case.name);
        for piece in &case.reason {
            assert!(
                classified.message.contains(piece),
                "{}: {piece:?} not in {:?}",
                case.name,
                classified.message
            );
        }
    }

    // With the script used up, the foreign model answers, and shardflow reads it.
    let answer = tokio::time::timeout(within, model.predict(&refs))
        .await
        .unwrap()
        .unwrap();
    let scores: Vec<f64> = answer
        .predictions
        .iter()
        .map(|p| p["score"].as_f64().unwrap())
        .collect();
    assert_eq!(
        scores,
        vec![expected_score(0), expected_score(1), expected_score(2)]
    );
    assert_eq!(answer.variant.as_deref(), Some("AllTraffic"));

    // Every request was a signed InvokeEndpoint in the format shardflow sends.
    let seen = server.seen();
    assert_eq!(seen.len(), 2 * cases().len() + 1);
    for s in &seen {
        assert_eq!(s.method, "POST");
        assert_eq!(s.path, "/endpoints/fraud/invocations");
        assert_eq!(s.content_type.as_deref(), Some("application/json"));
        assert!(s.signed, "{s:?}");
    }
    let from_shardflow: Vec<&Seen> = seen.iter().skip(1).step_by(2).collect();
    assert!(from_shardflow
        .iter()
        .all(|s| s.rows == 3 && s.accept.as_deref() == Some("application/json")));
    server.stop().await;
}

/// Each error, persisting: the transient ones are tried `MAX_ATTEMPTS` times
/// and then dead-lettered; the permanent ones once, though the next try would
/// have been answered. Every dead letter's reason says what the service said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_is_retried_or_not_and_its_dead_letters_say_why() {
    for case in cases() {
        let server = Foreign::start().await;
        server.fail(&case.failure, if case.retried { 10 } else { 1 });
        let c = config(&sagemaker(&server.url, FAST), "", default_sinks());
        let out = run_batcher(scorer(&c), &c, records(10, 3), 10).await;
        let (predictions, dead) = split(&out);
        assert!(predictions.is_empty(), "{}: {predictions:?}", case.name);
        assert_eq!(dead.len(), 10, "{}", case.name);
        let (attempts, how) = if case.retried {
            (
                MAX_ATTEMPTS,
                format!("after {MAX_ATTEMPTS} attempts (giving up)"),
            )
        } else {
            (1, "after 1 attempt (not retried)".to_string())
        };
        assert_eq!(server.requests(), attempts, "{}: attempts", case.name);
        for (id, reason) in &dead {
            assert!(id.starts_with("p/"), "{id}");
            assert!(
                reason.starts_with(&format!("inference failed {how}: endpoint fraud: ")),
                "{}: {reason}",
                case.name
            );
            for piece in &case.reason {
                assert!(
                    reason.contains(piece),
                    "{}: {piece:?} not in {reason:?}",
                    case.name
                );
            }
        }
        println!("{:<55} {attempts} attempt(s) → {}", case.name, dead[0].1);
        server.stop().await;
    }
}

/// The transient errors, twice, then an answer: three attempts, and the
/// foreign model's predictions on the right records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_until_the_foreign_model_answers() {
    for case in cases().into_iter().filter(|c| c.retried) {
        let server = Foreign::start().await;
        server.fail(&case.failure, 2);
        let c = config(&sagemaker(&server.url, FAST), "", default_sinks());
        let out = run_batcher(scorer(&c), &c, records(10, 3), 10).await;
        let (predictions, dead) = split(&out);
        assert!(dead.is_empty(), "{}: {dead:?}", case.name);
        assert_eq!(predictions.len(), 10, "{}", case.name);
        for p in &predictions {
            let i: usize = p.features.id[2..].parse().unwrap();
            assert_eq!(
                p.prediction["score"].as_f64(),
                Some(expected_score(i)),
                "{}",
                case.name
            );
            assert!(!p.fallback);
            assert_eq!(&*p.model, "fraud");
            assert_eq!(p.variant.as_deref(), Some("AllTraffic"));
        }
        assert_eq!(server.requests(), 3, "{}: attempts", case.name);
        assert!(server.seen().iter().all(|s| s.rows == 10));
        server.stop().await;
    }
}

/// With a fallback configured, a container's 4xx is answered by it at once,
/// flagged, and the error handed to the fallback (and logged) carries the
/// container's status and message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_answers_a_model_error_and_keeps_what_the_container_said() {
    let server = Foreign::start().await;
    let c = config(
        &sagemaker(
            &server.url,
            &format!("{FAST}\nfallback = \"constant\"\nfallback_score = 0.25"),
        ),
        "",
        default_sinks(),
    );
    let scorer = scorer(&c);
    let failure = model_error(400, CONTAINER_400);

    server.fail(&failure, 1);
    let rows = feature_rows(10);
    let refs: Vec<&FeatureVector> = rows.iter().collect();
    let answer = tokio::time::timeout(Duration::from_secs(10), scorer.primary.predict(&refs))
        .await
        .expect("the scorer answers in time");
    match answer {
        Answer::Fallback {
            prediction,
            model,
            error,
        } => {
            assert_eq!(&*model, "constant");
            assert_eq!(prediction.predictions, vec![json!({"score": 0.25}); 10]);
            assert!(
                error.starts_with("inference failed after 1 attempt (not retried): endpoint fraud: HTTP 424 ModelError (OriginalStatusCode 400)"),
                "{error}"
            );
            assert!(
                error.contains(&format!("OriginalMessage: {CONTAINER_400}")),
                "{error}"
            );
            assert!(
                error.contains(&format!("LogStreamArn: {LOG_STREAM}")),
                "{error}"
            );
        }
        Answer::Primary(_) => panic!("the primary answered"),
        Answer::Failed(reason) => panic!("no fallback: {reason}"),
    }
    assert_eq!(server.requests(), 1);

    // Through the batcher: fallback predictions, flagged, for every record.
    server.fail(&failure, 1);
    let out = run_batcher(scorer.clone(), &c, records(10, 3), 10).await;
    let (predictions, dead) = split(&out);
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(predictions.len(), 10);
    assert!(predictions
        .iter()
        .all(|p| p.fallback && &*p.model == "constant" && p.prediction == json!({"score": 0.25})));
    assert_eq!(server.requests(), 2);
    server.stop().await;
}
