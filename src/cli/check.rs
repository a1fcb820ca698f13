//! `shardflow check`: validates a config and prints the pipeline it builds
//! (source, schema, watermark, features, model, sinks, replay, state) on
//! stdout, without running it; exit 2 when it is invalid.

use std::path::PathBuf;
use std::process::ExitCode;

use shardflow::config::{Config, FallbackKind, SinkConfig, SourceConfig};
use shardflow::{inference, replay, source};

/// Validate a config and print the pipeline it builds, without running it
/// (exit 2 when invalid).
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[arg(short, long, env = "SHARDFLOW_CONFIG")]
    config: PathBuf,
}

/// Prints `FILE: ok` and the pipeline on stdout (exit 0), or the error on
/// stderr (exit 2).
pub fn main(args: CheckArgs) -> ExitCode {
    let path = &args.config;
    let config = match super::load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match describe(&config) {
        Ok(text) => {
            println!("{}: ok", path.display());
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => super::invalid(format_args!("{}: {e:#}", path.display())),
    }
}

/// Where a sink writes.
fn sink_target(s: &SinkConfig) -> String {
    match s {
        SinkConfig::Stdout(_) => "stdout".to_string(),
        SinkConfig::File(f) => format!("file {}", f.path.display()),
        SinkConfig::Kinesis(k) => format!("kinesis stream {}", k.stream_name),
        SinkConfig::S3(c) => format!(
            "s3 archive s3://{}/{}YYYY/MM/DD/HH/ (objects ≤ {} bytes, ≤ {})",
            c.bucket, c.prefix, c.max_bytes, c.max_age
        ),
        SinkConfig::Dynamodb(c) => shardflow::sink::dynamodb::describe(c),
    }
}

/// A human-readable description of the pipeline a config builds; an error
/// when its source, model or replay cannot be built from it.
fn describe(config: &Config) -> anyhow::Result<String> {
    let mut out = String::new();
    let src = source::build(config)?;
    out.push_str(&format!("source:    {}\n", src.describe()));
    out.push_str(&format!(
        "schema:    key {:?}, event time {:?}, fields {}\n",
        config.schema.key,
        config.schema.timestamp,
        if config.schema.fields.is_empty() {
            "none".to_string()
        } else {
            config
                .schema
                .fields
                .iter()
                .map(|(n, t)| format!("{n}: {t}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    if let Some(store) = &config.checkpoint_store {
        let shardflow::config::CheckpointStoreConfig::S3(c) = store.get_ref();
        out.push_str(&format!(
            "state:     {}, every {} checkpoint(s) also in {} (the newest {} kept)\n",
            config.pipeline.state_dir.display(),
            c.every,
            store.get_ref().describe(),
            c.retain
        ));
    }
    let w = &config.watermark;
    out.push_str(&format!(
        "watermark: out-of-orderness {}, idle after {}, allowed lateness {}\n",
        w.max_out_of_orderness, w.idle_timeout, w.allowed_lateness
    ));
    if config.features.is_empty() {
        out.push_str("features:  none (events pass with an empty feature vector)\n");
    }
    for f in &config.features {
        out.push_str(&format!(
            "feature:   {} = {}({}) over {}\n",
            f.name.get_ref(),
            f.agg.as_str(),
            f.field.as_ref().map(|s| s.get_ref().as_str()).unwrap_or(""),
            f.window.get_ref()
        ));
    }
    for name in &config.schema.request_fields {
        out.push_str(&format!(
            "feature:   {name} = the event's own {name} (request field)
"
        ));
    }
    match inference::build(config)? {
        Some(m) => {
            let inf = &config.inference;
            out.push_str(&format!(
                "model:     {} (batches of ≤ {}, wait ≤ {}, ≤ {} in flight)\n",
                m.describe(),
                inf.max_batch,
                inf.max_wait,
                inf.max_in_flight
            ));
            out.push_str(&format!(
                "resilience: timeout {}, {} retries from {}, breaker at {:.0}% of ≥ {} calls over {} (cool-down {}), fallback {}\n",
                inf.request_timeout,
                inf.max_retries,
                inf.retry_base,
                inf.breaker_error_rate * 100.0,
                inf.breaker_min_requests,
                inf.breaker_window,
                inf.breaker_cooldown,
                match inf.fallback {
                    FallbackKind::DeadLetter => "dead letters".to_string(),
                    FallbackKind::Constant =>
                        format!("constant score {}", inf.fallback_score.unwrap_or_default()),
                    FallbackKind::Embedded => format!(
                        "embedded model {}",
                        inf.fallback_model.as_deref().unwrap_or(std::path::Path::new("")).display()
                    ),
                }
            ));
        }
        None => out.push_str("model:     none (the features output is final)\n"),
    }
    for s in &config.sinks {
        let s = s.get_ref();
        let kinds: Vec<_> = s.kinds().iter().map(|k| k.as_str()).collect();
        out.push_str(&format!(
            "sink:      {} ← {}\n",
            sink_target(s),
            kinds.join(", ")
        ));
    }
    if let Some(api) = &config.api {
        out.push_str(&format!(
            "api:       http://{}/v1/ (≤ {} requests queued for the engine, each waiting ≤ {})\n",
            api.addr, api.max_in_flight, api.request_timeout
        ));
    }
    if config.replay.is_some() || matches!(config.source(), SourceConfig::S3(_)) {
        match replay::prepare(config) {
            Ok(r) => {
                let src = source::build(&r)?;
                out.push_str(&format!("replay:    {}\n", src.describe()));
                for s in &r.sinks {
                    let kinds: Vec<_> = s.get_ref().kinds().iter().map(|k| k.as_str()).collect();
                    out.push_str(&format!(
                        "replay sink: {} ← {}\n",
                        sink_target(s.get_ref()),
                        kinds.join(", ")
                    ));
                }
                if let Some(label) = config.replay_label() {
                    out.push_str(&format!("replay label: {label}\n"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    out.push_str(&format!(
        "state:     {} (checkpoint every {})\n",
        config.pipeline.state_dir.display(),
        config.pipeline.checkpoint_interval
    ));
    Ok(out)
}
