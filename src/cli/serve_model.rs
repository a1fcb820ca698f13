//! `shardflow serve-model`: serves the config's embedded model over HTTP
//! with the SageMaker container contract (see `serve::model`) until
//! SIGINT/SIGTERM; exit 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use shardflow::inference;
use shardflow::serve::{self, Container};

use super::LOG_TARGET;

/// Serve the config's embedded model with the SageMaker container contract:
/// GET /ping, POST /invocations and POST /endpoints/{name}/invocations
/// (JSON or CSV). The model is `[inference] model`, or `fallback_model`.
#[derive(clap::Args, Debug)]
pub struct ServeModelArgs {
    #[arg(short, long, env = "SHARDFLOW_CONFIG")]
    config: PathBuf,
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Production variant named in X-Amzn-Invoked-Production-Variant when
    /// the request does not ask for one.
    #[arg(long, default_value = "AllTraffic")]
    variant: String,
}

/// Prints `listening on http://ADDR` on stderr and serves until a signal
/// (exit 0); exit 2 when the config has no embedded model or the model or
/// `--addr` is invalid, 1 when the address cannot be listened on.
pub fn main(args: ServeModelArgs) -> ExitCode {
    let path = &args.config;
    let config = match super::load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let inf = &config.inference;
    let Some(model_path) = inf.model.as_ref().or(inf.fallback_model.as_ref()) else {
        return super::invalid(format_args!(
            "{}: serve-model serves an embedded model: set [inference] model (or fallback_model)",
            path.display()
        ));
    };
    let model = match inference::load_embedded(&config, model_path) {
        Ok(m) => m,
        Err(e) => return super::invalid(format_args!("{e:#}")),
    };
    let addr: SocketAddr = match args.addr.parse() {
        Ok(a) => a,
        Err(e) => return super::invalid(format_args!("--addr {:?}: {e}", args.addr)),
    };
    let names = inference::feature_names(&config);
    let site = match Container::new(model, names, &args.variant) {
        Ok(container) => serve::router([container.into()]),
        Err(e) => return super::invalid(format_args!("{e:#}")),
    };
    let runtime = match super::runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        let server = serve::serve(addr, site).await?;
        eprintln!("listening on http://{}", server.addr());
        super::wait_for_signal().await;
        server.stop().await?;
        tracing::info!(target: LOG_TARGET, "stopped");
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::failed(format_args!("{e:#}")),
    }
}
