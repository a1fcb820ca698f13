//! What stands between the batcher and a model that can fail: a per-request
//! timeout, jittered exponential retry, a circuit breaker and a fallback.
//!
//! The rules, in order, for one batch:
//!
//! 1. If the breaker is open (too many recent failures), the model is not
//!    called at all: the batch goes straight to the fallback. After
//!    `breaker_cooldown` one probe call is let through (half-open); its
//!    outcome closes or re-opens the breaker.
//! 2. Otherwise the model is called with `request_timeout`. A *transient*
//!    failure (throttling, 5xx, timeout, connection error, an unreadable
//!    answer) is retried up to `max_retries` times after `retry_base · 2^(n-1)`
//!    with ±50 % jitter, so that many shards that failed together do not
//!    retry together. A *permanent* failure (a 4xx model error, a wrong row
//!    count) is not retried: the same request would fail the same way.
//! 3. A batch that still has no answer goes to the fallback: a constant score,
//!    the embedded model, or dead letters carrying the error. Fallback records
//!    are flagged `fallback = true`. Nothing is dropped, and no model failure
//!    ever stops the pipeline: the batcher always gets an answer or dead
//!    letters back.
//!
//! Breaker accounting counts calls, not batches: every attempt (retries
//! included) is one success or one failure. Permanent 4xx errors mean the
//! endpoint is up and answering, so they count as successes for the breaker.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;

use super::{BatchPrediction, Model};
use crate::config::InferenceConfig;
use crate::record::FeatureVector;

/// Whether a failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Throttling, 5xx, a timeout, a connection error: the next try may work.
    Transient,
    /// The request itself is wrong (4xx), or the answer cannot be used (wrong
    /// row count): retrying repeats the failure.
    Permanent,
}

/// A classified model failure. Models return it inside `anyhow::Error`; an
/// error that is not one is treated as permanent.
#[derive(Debug, Clone)]
pub struct ModelError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ModelError {
    pub fn transient(message: impl Into<String>) -> Self {
        ModelError {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        ModelError {
            kind: ErrorKind::Permanent,
            message: message.into(),
        }
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ModelError {}

fn classify(e: &anyhow::Error) -> ErrorKind {
    e.chain()
        .find_map(|c| c.downcast_ref::<ModelError>())
        .map_or(ErrorKind::Permanent, |m| m.kind)
}

/// Retry timing.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base: Duration,
    pub timeout: Duration,
}

impl RetryPolicy {
    pub fn from_config(c: &InferenceConfig) -> Self {
        RetryPolicy {
            max_retries: c.max_retries,
            base: c.retry_base.std(),
            timeout: c.request_timeout.std(),
        }
    }

    /// The pause before retry `n` (1-based): `base · 2^(n-1)`, times a uniform
    /// factor in [0.5, 1.5).
    pub fn backoff(&self, n: u32) -> Duration {
        let nominal = self
            .base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16));
        nominal.mul_f64(rand::rng().random_range(0.5..1.5))
    }
}

/// The breaker's state, as reported to metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// A circuit breaker over a sliding window of call outcomes.
///
/// The window is kept as 10 buckets of `window / 10`, so memory is constant
/// whatever the call rate. It opens when the window holds at least
/// `min_requests` calls of which at least `error_rate` failed; after
/// `cooldown` a single probe is admitted; the probe's success closes it (and
/// clears the window), its failure re-opens it for another cool-down.
pub struct CircuitBreaker {
    error_rate: f64,
    min_requests: u32,
    cooldown: Duration,
    bucket: Duration,
    inner: Mutex<BreakerInner>,
}

struct BreakerInner {
    /// (bucket start, calls, failures), oldest first.
    buckets: VecDeque<(Instant, u32, u32)>,
    state: BreakerState,
    opened_at: Instant,
    probe_in_flight: bool,
}

/// What the breaker lets a caller do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call the model.
    Call,
    /// Call the model as the half-open probe.
    Probe,
    /// Do not call: use the fallback.
    Reject,
}

impl CircuitBreaker {
    pub fn new(error_rate: f64, window: Duration, min_requests: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            error_rate,
            min_requests,
            cooldown,
            bucket: (window / 10).max(Duration::from_millis(1)),
            inner: Mutex::new(BreakerInner {
                buckets: VecDeque::with_capacity(11),
                state: BreakerState::Closed,
                opened_at: Instant::now(),
                probe_in_flight: false,
            }),
        }
    }

    pub fn from_config(c: &InferenceConfig) -> Self {
        Self::new(
            c.breaker_error_rate,
            c.breaker_window.std(),
            c.breaker_min_requests,
            c.breaker_cooldown.std(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        // The critical sections cannot panic; a poisoned lock still holds a
        // consistent state.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Asks to make a call now.
    pub fn admit(&self) -> Admission {
        let mut s = self.lock();
        match s.state {
            BreakerState::Closed => Admission::Call,
            BreakerState::Open if s.opened_at.elapsed() >= self.cooldown => {
                s.state = BreakerState::HalfOpen;
                s.probe_in_flight = true;
                Admission::Probe
            }
            BreakerState::Open => Admission::Reject,
            BreakerState::HalfOpen if !s.probe_in_flight => {
                s.probe_in_flight = true;
                Admission::Probe
            }
            BreakerState::HalfOpen => Admission::Reject,
        }
    }

    /// Reports the outcome of an admitted call.
    pub fn record(&self, admission: Admission, ok: bool) {
        let now = Instant::now();
        let mut s = self.lock();
        if admission == Admission::Probe {
            s.probe_in_flight = false;
            if ok {
                s.state = BreakerState::Closed;
                s.buckets.clear();
                tracing::info!("circuit breaker closed: the probe call succeeded");
            } else {
                s.state = BreakerState::Open;
                s.opened_at = now;
                tracing::warn!("circuit breaker re-opened: the probe call failed");
            }
            return;
        }
        let window = self.bucket * 10;
        while s
            .buckets
            .front()
            .is_some_and(|(start, _, _)| now.duration_since(*start) >= window)
        {
            s.buckets.pop_front();
        }
        let bucket = self.bucket;
        match s.buckets.back_mut() {
            Some((start, calls, failures)) if now.duration_since(*start) < bucket => {
                *calls += 1;
                *failures += u32::from(!ok);
            }
            _ => s.buckets.push_back((now, 1, u32::from(!ok))),
        }
        if s.state != BreakerState::Closed || ok {
            return;
        }
        let (calls, failures) = s
            .buckets
            .iter()
            .fold((0u32, 0u32), |(c, f), (_, bc, bf)| (c + bc, f + bf));
        if calls >= self.min_requests && f64::from(failures) >= self.error_rate * f64::from(calls) {
            s.state = BreakerState::Open;
            s.opened_at = now;
            tracing::warn!(
                calls,
                failures,
                cooldown_ms = self.cooldown.as_millis() as u64,
                "circuit breaker opened: the model is failing; using the fallback"
            );
        }
    }
}

/// What answered a batch.
pub enum Answer {
    /// The primary model.
    Primary(BatchPrediction),
    /// The fallback, after the primary failed with `error`.
    Fallback {
        prediction: BatchPrediction,
        model: Arc<str>,
        error: String,
    },
    /// No answer: the records become dead letters with this reason.
    Failed(String),
}

/// The configured fallback.
pub enum Fallback {
    DeadLetter,
    Constant(f64),
    Model(Arc<dyn Model>),
}

/// A model behind timeout, retry, breaker and fallback.
pub struct Resilient {
    model: Arc<dyn Model>,
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    fallback: Fallback,
    retries: metrics::Counter,
    failures: metrics::Counter,
    fallbacks: metrics::Counter,
    breaker_rejections: metrics::Counter,
}

impl Resilient {
    pub fn new(
        model: Arc<dyn Model>,
        policy: RetryPolicy,
        breaker: CircuitBreaker,
        fallback: Fallback,
    ) -> Self {
        Resilient {
            model,
            policy,
            breaker,
            fallback,
            retries: metrics::counter!("shardflow_inference_retries_total"),
            failures: metrics::counter!("shardflow_inference_call_failures_total"),
            fallbacks: metrics::counter!("shardflow_inference_fallback_batches_total"),
            breaker_rejections: metrics::counter!("shardflow_inference_breaker_rejections_total"),
        }
    }

    pub fn model(&self) -> &Arc<dyn Model> {
        &self.model
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Scores a batch; always returns, within roughly
    /// `(max_retries + 1) · request_timeout + Σ backoff`.
    pub async fn predict(&self, rows: &[&FeatureVector]) -> Answer {
        match self.call_with_retry(rows).await {
            Ok(p) => Answer::Primary(p),
            Err(error) => self.fall_back(rows, error).await,
        }
    }

    async fn call_with_retry(&self, rows: &[&FeatureVector]) -> Result<BatchPrediction, String> {
        let mut attempt = 0u32;
        loop {
            let admission = self.breaker.admit();
            if admission == Admission::Reject {
                self.breaker_rejections.increment(1);
                return Err(format!(
                    "circuit breaker open: model {} is failing; not called",
                    self.model.name()
                ));
            }
            let outcome =
                match tokio::time::timeout(self.policy.timeout, self.model.predict(rows)).await {
                    Ok(Ok(p)) if p.predictions.len() == rows.len() => Ok(p),
                    Ok(Ok(p)) => Err((
                        ErrorKind::Permanent,
                        format!(
                            "model {} returned {} predictions for {} rows",
                            self.model.name(),
                            p.predictions.len(),
                            rows.len()
                        ),
                    )),
                    Ok(Err(e)) => Err((classify(&e), format!("{e:#}"))),
                    Err(_) => Err((
                        ErrorKind::Transient,
                        format!("timed out after {} ms", self.policy.timeout.as_millis()),
                    )),
                };
            match outcome {
                Ok(p) => {
                    self.breaker.record(admission, true);
                    return Ok(p);
                }
                Err((kind, message)) => {
                    self.failures.increment(1);
                    self.breaker.record(admission, kind == ErrorKind::Permanent);
                    let tries = attempt + 1;
                    if kind == ErrorKind::Permanent || attempt >= self.policy.max_retries {
                        let what = if kind == ErrorKind::Permanent {
                            "not retried"
                        } else {
                            "giving up"
                        };
                        return Err(format!(
                            "inference failed after {tries} attempt{} ({what}): {message}",
                            if tries == 1 { "" } else { "s" }
                        ));
                    }
                    attempt += 1;
                    let pause = self.policy.backoff(attempt);
                    tracing::debug!(attempt, pause_ms = pause.as_millis() as u64, error = %message, "retrying model call");
                    self.retries.increment(1);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    async fn fall_back(&self, rows: &[&FeatureVector], error: String) -> Answer {
        match &self.fallback {
            Fallback::DeadLetter => Answer::Failed(error),
            Fallback::Constant(score) => {
                self.fallbacks.increment(1);
                Answer::Fallback {
                    prediction: BatchPrediction {
                        predictions: vec![serde_json::json!({ "score": score }); rows.len()],
                        variant: None,
                    },
                    model: Arc::from("constant"),
                    error,
                }
            }
            Fallback::Model(m) => match m.predict(rows).await {
                Ok(p) if p.predictions.len() == rows.len() => {
                    self.fallbacks.increment(1);
                    Answer::Fallback {
                        prediction: p,
                        model: m.name(),
                        error,
                    }
                }
                Ok(p) => Answer::Failed(format!(
                    "{error}; the fallback model returned {} predictions for {} rows",
                    p.predictions.len(),
                    rows.len()
                )),
                Err(e) => Answer::Failed(format!("{error}; the fallback model failed too: {e:#}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter() {
        let p = RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(1000),
            timeout: Duration::from_secs(1),
        };
        for _ in 0..100 {
            for (n, nominal) in [(1, 1000.0), (2, 2000.0), (3, 4000.0)] {
                let b = p.backoff(n).as_secs_f64() * 1e3;
                assert!(b >= nominal * 0.5 && b < nominal * 1.5, "{n}: {b}");
            }
        }
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let b = CircuitBreaker::new(0.5, Duration::from_secs(60), 4, Duration::from_millis(30));
        for ok in [true, false, true] {
            assert_eq!(b.admit(), Admission::Call);
            b.record(Admission::Call, ok);
        }
        // 1 of 3 failed, below the minimum count: still closed.
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(Admission::Call, false);
        // 2 of 4 failed: open.
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(), Admission::Reject);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Admission::Probe);
        // Only one probe at a time.
        assert_eq!(b.admit(), Admission::Reject);
        b.record(Admission::Probe, false);
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Admission::Probe);
        b.record(Admission::Probe, true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Admission::Call);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let b = CircuitBreaker::new(0.5, Duration::from_millis(50), 2, Duration::from_secs(10));
        b.record(Admission::Call, false);
        std::thread::sleep(Duration::from_millis(60));
        b.record(Admission::Call, true);
        b.record(Admission::Call, true);
        b.record(Admission::Call, false);
        // 1 of 3 in the window: closed.
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
