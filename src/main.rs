//! The `shardflow` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use shardflow::config::Config;
use shardflow::flow::Stats;
use shardflow::pipeline::{self, RunOptions};
use shardflow::sink::stdout::StdoutClosed;
use shardflow::telemetry::{self, LogFormat};

/// The engine allocates an id and a feature vector per event; with glibc's
/// malloc that was a fifth of its time, and its per-thread arenas let the
/// resident set creep. The benches use the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Kinesis (or files, or a generator) in; event-time window features and model
/// predictions out. One binary, one TOML file.
#[derive(Parser, Debug)]
#[command(name = "shardflow", version, about, long_about = None, after_help = "\
Examples:
  shardflow check --config config/local.toml     validate a config and show the pipeline
  shardflow run --config config/local.toml       run it; Ctrl-C drains, checkpoints and exits 0
  shardflow replay --config config/replay.toml --export out/training.ndjson
                                                 replay the S3 archive, write training rows
                                                 (Parquet when FILE ends in .parquet)

Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage.
Config values may reference the environment as ${VAR} or ${VAR:-default}.")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "SHARDFLOW_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline until the input ends or SIGINT/SIGTERM; then drain
    /// in-flight work, commit a final checkpoint and exit 0.
    Run {
        /// The TOML config file.
        #[arg(short, long, env = "SHARDFLOW_CONFIG")]
        config: PathBuf,
        /// Where to serve Prometheus /metrics, /healthz and /readyz ("off" to disable).
        #[arg(long, default_value = "127.0.0.1:9898", env = "SHARDFLOW_METRICS_ADDR")]
        metrics_addr: String,
        /// Discard state written by an incompatible config instead of refusing to start.
        #[arg(long)]
        reset_state: bool,
        /// No progress line on stderr.
        #[arg(long)]
        quiet: bool,
    },
    /// Validate a config and print the pipeline it builds, without running it
    /// (exit 2 when invalid).
    Check {
        #[arg(short, long, env = "SHARDFLOW_CONFIG")]
        config: PathBuf,
    },
    /// Replay events archived in S3 ([replay.source], or an s3 [source])
    /// through the same engine and config as live, into fresh state; the
    /// results go to [[replay.sinks]] (or [[sinks]]). Exits 0 when the
    /// archive was read (bad objects become dead letters).
    Replay {
        #[arg(short, long, env = "SHARDFLOW_CONFIG")]
        config: PathBuf,
        /// Only events at or after this time (RFC 3339 or epoch ms); objects
        /// filed in hours well before it are not read.
        #[arg(long, value_parser = parse_time)]
        from: Option<i64>,
        /// Only events before this time.
        #[arg(long, value_parser = parse_time)]
        to: Option<i64>,
        /// Write training rows (each event's features as of that event, plus
        /// [replay] label) to this file: Parquet if it ends in .parquet,
        /// NDJSON otherwise.
        #[arg(long)]
        export: Option<PathBuf>,
        /// Keep the replayed state in this directory (default: a temporary one).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Wipe --state-dir first.
        #[arg(long, requires = "state_dir")]
        reset_state: bool,
        /// No progress on stderr.
        #[arg(long)]
        quiet: bool,
    },
    /// Serve the config's embedded model with the SageMaker container contract:
    /// GET /ping, POST /invocations and POST /endpoints/{name}/invocations
    /// (JSON or CSV). The model is `[inference] model`, or `fallback_model`.
    ServeModel {
        #[arg(short, long, env = "SHARDFLOW_CONFIG")]
        config: PathBuf,
        /// Address to listen on (port 0 picks a free port; the bound address is printed).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// Production variant named in X-Amzn-Invoked-Production-Variant when
        /// the request does not ask for one.
        #[arg(long, default_value = "AllTraffic")]
        variant: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            metrics_addr,
            reset_state,
            quiet,
        } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match runtime() {
                Ok(r) => r,
                Err(code) => return code,
            };
            let options = RunOptions {
                reset_state,
                progress: !quiet,
                ..RunOptions::default()
            };
            match runtime.block_on(run(config, options, metrics_addr)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.chain().any(|c| c.is::<StdoutClosed>()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::ServeModel {
            config,
            addr,
            variant,
        } => serve_model(&config, &addr, &variant),
        Command::Replay {
            config,
            from,
            to,
            export,
            state_dir,
            reset_state,
            quiet,
        } => replay(
            &config,
            shardflow::replay::ReplayArgs {
                from,
                to,
                state_dir,
                reset_state,
                export,
                progress: !quiet,
            },
        ),
    }
}

fn parse_time(text: &str) -> Result<i64, String> {
    shardflow::config::parse_time(text)
}

fn replay(path: &std::path::Path, args: shardflow::replay::ReplayArgs) -> ExitCode {
    let config = match Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
        shardflow::replay::prepare(&c).map_err(|e| format!("{}: {e:#}", path.display()))
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!(
                "stop requested: finishing the replay where it is (signal again to exit at once)"
            );
            let _ = shutdown_tx.send(true);
            wait_for_signal().await;
            std::process::exit(130);
        });
        shardflow::replay::run(config, args, shutdown_rx).await
    });
    match result {
        Ok(s) => {
            eprintln!(
                "replayed {} objects ({} bytes): {} records, {} events in {:.1}s ({:.0} events/s); dead letters {}, bad objects {}, duplicates skipped {}, outside --from/--to {}",
                s.objects,
                s.bytes,
                s.records,
                s.events,
                s.seconds,
                s.events as f64 / s.seconds.max(1e-3),
                s.dead_letters,
                s.bad_objects,
                s.duplicates,
                s.out_of_range
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match pipeline::describe(&config) {
        Ok(text) => {
            println!("{}: ok", path.display());
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e:#}", path.display());
            ExitCode::from(2)
        }
    }
}

fn serve_model(path: &std::path::Path, addr: &str, variant: &str) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let inf = &config.inference;
    let Some(model_path) = inf.model.as_ref().or(inf.fallback_model.as_ref()) else {
        eprintln!(
            "error: {}: serve-model serves an embedded model: set [inference] model (or fallback_model)",
            path.display()
        );
        return ExitCode::from(2);
    };
    let model = match shardflow::inference::load_embedded(&config, model_path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: --addr {addr:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let names = shardflow::inference::feature_names(&config);
    let describe = shardflow::inference::Model::describe(&model);
    let router = match shardflow::inference::server::router(model, names, variant) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(model = %describe, "serving on http://{bound} (GET /ping, POST /invocations, POST /endpoints/{{name}}/invocations)");
        eprintln!("listening on http://{bound}");
        shardflow::inference::server::serve(listener, router, wait_for_signal()).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config, options: RunOptions, metrics_addr: String) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    if metrics_addr != "off" {
        let addr: SocketAddr = metrics_addr
            .parse()
            .map_err(|e| anyhow::anyhow!("--metrics-addr {metrics_addr:?}: {e}"))?;
        let handle = telemetry::install_metrics()?;
        let bound = telemetry::serve(addr, handle, stats.clone()).await?;
        tracing::info!(%bound, "metrics on http://{bound}/metrics");
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: draining and committing a final checkpoint (signal again to exit at once)");
        let _ = shutdown_tx.send(true);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without a final checkpoint");
        std::process::exit(130);
    });
    let summary = pipeline::run(config, options, shutdown_rx, stats).await?;
    tracing::info!(
        records_in = summary.records_in,
        dead_letters = summary.dead_letters,
        checkpoints = summary.checkpoints,
        last_checkpoint = summary.last_checkpoint,
        "stopped"
    );
    Ok(())
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The multi-threaded runtime every command runs on; exit 1 when it cannot start.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}
