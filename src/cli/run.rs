//! `shardflow run`: runs the pipeline of a config until its input ends or
//! SIGINT/SIGTERM, then drains, commits a final checkpoint and exits 0;
//! serves Prometheus metrics and health on `--metrics-addr` meanwhile, and
//! the online API on `[api] addr` when configured (one listener when the
//! two addresses are the same).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use shardflow::config::{Config, SourceConfig};
use shardflow::flow::Stats;
use shardflow::online::Online;
use shardflow::pipeline::{self, RunOptions};
use shardflow::serve::{self, Api, Part, Telemetry};
use shardflow::sink::stdout::StdoutClosed;
use shardflow::telemetry;

use super::LOG_TARGET;

/// Run the pipeline until the input ends or SIGINT/SIGTERM; then drain
/// in-flight work, commit a final checkpoint and exit 0.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The TOML config file.
    #[arg(short, long, env = "SHARDFLOW_CONFIG")]
    config: PathBuf,
    /// Where to serve Prometheus /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:9898", env = "SHARDFLOW_METRICS_ADDR")]
    metrics_addr: String,
    /// Start from empty state: discard what the state directory holds (state
    /// of an incompatible config, or older than the remote checkpoints).
    #[arg(long, conflicts_with = "restore_remote")]
    reset_state: bool,
    /// With a [checkpoint_store]: discard the local state and start from the
    /// newest remote checkpoint.
    #[arg(long)]
    restore_remote: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

/// Exit 0 when the run ended (or stdout was closed under it), 1 when it
/// failed, 2 when the config is invalid.
pub fn main(args: RunArgs) -> ExitCode {
    let config = match super::load_config(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if matches!(config.source(), SourceConfig::S3(_)) {
        return super::failed(format_args!(
            "an s3 source (an archive) is read by `shardflow replay`, not `run`"
        ));
    }
    let runtime = match super::runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let options = RunOptions {
        reset_state: args.reset_state,
        restore_remote: args.restore_remote,
        progress: !args.quiet,
        ..RunOptions::default()
    };
    match runtime.block_on(run(config, options, args.metrics_addr)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.chain().any(|c| c.is::<StdoutClosed>()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(target: LOG_TARGET, "{e:#}");
            super::failed(format_args!("{e:#}"))
        }
    }
}

async fn run(config: Config, mut options: RunOptions, metrics_addr: String) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    let mut parts = Vec::new();
    if metrics_addr != "off" {
        let addr: SocketAddr = metrics_addr
            .parse()
            .map_err(|e| anyhow::anyhow!("--metrics-addr {metrics_addr:?}: {e}"))?;
        let metrics = telemetry::install_metrics()?;
        parts.push((
            addr,
            Part::Telemetry(Telemetry::new(metrics, stats.clone())),
        ));
    }
    if let Some(api) = &config.api {
        // The API and the batcher share one model (its clients, breaker
        // and fallback): the pipeline takes it from the link.
        let (online, link) = Online::new(&config, options.aws.clone())?;
        options.online = Some(link);
        parts.push((api.addr, Part::Api(Api::new(online))));
    }
    let api_addr = config.api.as_ref().map(|a| a.addr);
    for (addr, site) in serve::by_address(parts) {
        // Served until the process ends.
        let server = serve::serve(addr, site).await?;
        if Some(addr) == api_addr {
            if let Some(link) = &mut options.online {
                link.advertise = Some(advertised(server.addr()));
            }
        }
    }
    let shutdown = super::stop_on_signal(
        "shutdown requested: draining and committing a final checkpoint (signal again to exit at once)",
        Some("second signal: exiting without a final checkpoint"),
    );
    let summary = pipeline::run(config, options, shutdown, stats).await?;
    tracing::info!(
        target: LOG_TARGET,
        records_in = summary.records_in,
        dead_letters = summary.dead_letters,
        checkpoints = summary.checkpoints,
        last_checkpoint = summary.last_checkpoint,
        "stopped"
    );
    Ok(())
}

/// The API's base URL as other workers of a cluster reach it: the bound
/// address, with this host's name for an unspecified IP (`0.0.0.0`).
fn advertised(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return format!("http://{bound}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("http://{host}:{}", bound.port())
}
