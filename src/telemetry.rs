//! Logs and metrics.
//!
//! Logs go to stderr (human-readable, or JSON with `--log-format json`) so
//! that stdout stays pure NDJSON for the stdout sink. Metrics are kept by the
//! `metrics` facade in the Prometheus recorder installed here;
//! `crate::serve::telemetry` serves it on `/metrics`, next to `/healthz` and
//! `/readyz`.

use std::io::IsTerminal as _;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Installs the tracing subscriber. `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second install (tests) keeps the first subscriber.
    let _ = result;
}

/// Buckets of `shardflow_stage_seconds`: from a millisecond (the
/// resolution of arrival times) to a minute of backlog.
pub const STAGE_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of `shardflow_api_request_seconds`: the online API answers in
/// well under a millisecond from memory; its target is a p99 of 10 ms.
pub const API_BUCKETS: [f64; 12] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Buckets of the cluster's restore and handoff durations: seconds, from
/// a small shard's fraction of one to a large one's minute.
pub const CLUSTER_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Installs the Prometheus recorder; returns the handle that renders it.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("shardflow_stage_seconds".into()),
            &STAGE_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("shardflow_api_request_seconds".into()),
                &API_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Prefix("shardflow_cluster_".into()),
                &CLUSTER_BUCKETS,
            )
        })
        .map_err(|e| anyhow::anyhow!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))
}

/// Where a record's time goes: `shardflow_stage_seconds{stage}` is, for each
/// batch leaving a stage, the time since its oldest record arrived
/// (`source`: from Kinesis's ApproximateArrivalTimestamp to the record's
/// receipt, i.e. the service's or emulator's share; then `decode`, `engine`,
/// `inference`, `sink`, each from the record's receipt to the moment the
/// stage handed it on, the sink's once written). One sample per batch, so
/// it costs nothing per record.
#[derive(Clone)]
pub struct StageClock(metrics::Histogram);

impl StageClock {
    pub fn new(stage: &'static str) -> StageClock {
        StageClock(metrics::histogram!("shardflow_stage_seconds", "stage" => stage))
    }

    /// A batch whose oldest record arrived at `arrival` (epoch ms) leaves now.
    pub fn left(&self, arrival: Option<crate::time::Millis>) {
        if let Some(arrival) = arrival {
            self.since(arrival, crate::time::now_millis());
        }
    }

    /// Something that began at `from` ended at `to` (epoch ms).
    pub fn since(&self, from: crate::time::Millis, to: crate::time::Millis) {
        self.0
            .record(to.saturating_sub(from).max(0) as f64 / 1000.0);
    }
}
