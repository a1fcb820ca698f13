//! `shardflow replay`: replays the events of an S3 archive through the
//! config's schema, engine and model into fresh state, writes the results to
//! the replay sinks (and training rows with `--export`) and ends with a
//! summary line on stderr; exit 0 once the archive was read.

use std::path::PathBuf;
use std::process::ExitCode;

use shardflow::replay;

use super::LOG_TARGET;

/// Replay events archived in S3 ([replay.source], or an s3 [source])
/// through the same engine and config as live, into fresh state; the
/// results go to [[replay.sinks]] (or [[sinks]]). Exits 0 when the
/// archive was read (bad objects become dead letters).
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[arg(short, long, env = "SHARDFLOW_CONFIG")]
    config: PathBuf,
    /// Only events at or after this time (RFC 3339 or epoch ms); objects
    /// filed in hours well before it are not read.
    #[arg(long, value_parser = shardflow::time::parse_time)]
    from: Option<i64>,
    /// Only events before this time.
    #[arg(long, value_parser = shardflow::time::parse_time)]
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
}

/// Exit 0 with the summary once the archive was read, 1 when the replay
/// failed, 2 when the config is invalid or has nothing to replay.
pub fn main(args: ReplayArgs) -> ExitCode {
    let path = &args.config;
    let config = match super::load_config(path).and_then(|c| {
        replay::prepare(&c).map_err(|e| super::invalid(format_args!("{}: {e:#}", path.display())))
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let options = replay::ReplayArgs {
        from: args.from,
        to: args.to,
        state_dir: args.state_dir,
        reset_state: args.reset_state,
        export: args.export,
        progress: !args.quiet,
    };
    let runtime = match super::runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        let shutdown = super::stop_on_signal(
            "stop requested: finishing the replay where it is (signal again to exit at once)",
            None,
        );
        replay::run(config, options, shutdown).await
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
            tracing::error!(target: LOG_TARGET, "{e:#}");
            super::failed(format_args!("{e:#}"))
        }
    }
}
