//! `run`'s telemetry endpoints: `/metrics` (the Prometheus recorder that
//! `crate::telemetry` installs, in text format), `/healthz` (the process is
//! up) and `/readyz` (the pipeline is running: [`Stats::ready`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::flow::Stats;

/// Metrics and health: a [`super::Part`] of `run`.
pub struct Telemetry {
    metrics: PrometheusHandle,
    stats: Arc<Stats>,
}

impl Telemetry {
    /// Renders `metrics` on `/metrics`; `/readyz` follows `stats.ready`.
    pub fn new(metrics: PrometheusHandle, stats: Arc<Stats>) -> Self {
        Telemetry { metrics, stats }
    }

    pub(super) fn routes(&self) -> Router {
        let (metrics, stats) = (self.metrics.clone(), self.stats.clone());
        Router::new()
            .route(
                "/metrics",
                get(move || std::future::ready(metrics.render())),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = stats.ready.load(Ordering::Relaxed);
                    std::future::ready(if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    })
                }),
            )
    }

    pub(super) fn announce(&self, bound: SocketAddr) {
        tracing::info!(target: super::LOG_TARGET, %bound, "metrics on http://{bound}/metrics");
    }
}
