//! The `shardflow` command line: the top-level parser and the dispatch to
//! the commands, one module each in [`cli`] (which also holds what they
//! share: config loading, the runtime, signals, exit codes).

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
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

/// The commands; each one's `--help` is the doc comment of its arguments.
#[derive(Subcommand, Debug)]
enum Command {
    Run(cli::run::RunArgs),
    Check(cli::check::CheckArgs),
    Replay(cli::replay::ReplayArgs),
    ServeModel(cli::serve_model::ServeModelArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => cli::run::main(args),
        Command::Check(args) => cli::check::main(args),
        Command::Replay(args) => cli::replay::main(args),
        Command::ServeModel(args) => cli::serve_model::main(args),
    }
}
