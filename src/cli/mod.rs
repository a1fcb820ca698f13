//! The commands of the `shardflow` binary, one file each: [`run`],
//! [`check`], [`replay`] and [`serve_model`]. Each holds its clap arguments
//! (whose doc comments are its `--help`) and its body, which returns the
//! process's exit code.
//!
//! What the commands share is here: loading the config, the tokio runtime,
//! SIGINT/SIGTERM handling, the target of their log lines and the exit codes:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success, including a clean stop on SIGINT/SIGTERM |
//! | 1 | a runtime failure ([`failed`]): a sink that cannot write, a state directory that cannot be opened |
//! | 2 | an invalid config or command line ([`invalid`]; clap exits 2 itself on a bad command line) |
//! | 130 | a second SIGINT/SIGTERM: exit at once, without a final checkpoint |
//!
//! Logging is set up by `main` before any command starts
//! (`telemetry::init_logging`, from the global `--log-format`); metrics by
//! [`run`], the one command that serves them.

pub mod check;
pub mod replay;
pub mod run;
pub mod serve_model;

use std::fmt::Display;
use std::path::Path;
use std::process::ExitCode;

use shardflow::config::Config;
use tokio::sync::watch;

/// The target of the commands' log lines: the binary's crate root, where they
/// were written before the commands had files of their own, so that log
/// lines and `RUST_LOG` filters stay as they were.
pub const LOG_TARGET: &str = "shardflow";

/// Exit code of a runtime failure.
const FAILED: u8 = 1;
/// Exit code of an invalid config or command line.
const INVALID: u8 = 2;
/// Exit code after a second SIGINT/SIGTERM.
const INTERRUPTED: i32 = 130;

/// Prints `error: {message}` on stderr; exit 2 (an invalid config or usage).
pub fn invalid(message: impl Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(INVALID)
}

/// Prints `error: {message}` on stderr; exit 1 (a runtime failure).
pub fn failed(message: impl Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(FAILED)
}

/// Loads and validates the config file; exit 2 with the message (file, line,
/// column) when it is invalid.
pub fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(invalid)
}

/// The multi-threaded runtime every command runs on; exit 1 when it cannot start.
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format_args!("cannot start the runtime: {e}")))
}

/// Resolves at the first SIGINT or SIGTERM (only SIGINT where SIGTERM cannot
/// be listened to).
pub async fn wait_for_signal() {
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

/// A graceful stop on the first signal, an immediate exit (130) on the
/// second: the receiver becomes true at the first SIGINT/SIGTERM, after
/// `requested` is logged (info); at the second, `second` is logged (warn) if
/// given and the process exits 130. Call within the runtime.
pub fn stop_on_signal(
    requested: &'static str,
    second: Option<&'static str>,
) -> watch::Receiver<bool> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(target: LOG_TARGET, "{requested}");
        let _ = shutdown_tx.send(true);
        wait_for_signal().await;
        if let Some(second) = second {
            tracing::warn!(target: LOG_TARGET, "{second}");
        }
        std::process::exit(INTERRUPTED);
    });
    shutdown_rx
}
