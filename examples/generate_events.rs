//! Writes synthetic events as NDJSON, for the file source or for a producer:
//!
//! ```sh
//! cargo run --example generate_events -- 100000 > events.ndjson
//! ```
//!
//! The events are the generator source's (seed 42, 1000 keys, Zipf 1.0,
//! 2 s out-of-orderness, 1000 events per simulated second, fields amount and
//! merchant), so a file run and a generator run see the same data.

use std::io::Write as _;

use rand_distr::Zipf;
use shardflow::config::{Config, GeneratorConfig};
use shardflow::source::generator::GeneratorSource;

fn main() -> anyhow::Result<()> {
    let count: u64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(10_000);
    let config = Config::from_str_at(
        r#"
[source]
type = "generator"
[schema]
key = "userId"
timestamp = "timestamp"
fields = { amount = "f64", merchant = "string" }
[[sinks]]
type = "stdout"
kinds = ["features"]
"#,
        std::path::Path::new("<example>"),
        |_| None,
    )?;
    let generator_config = GeneratorConfig::default();
    let zipf = Zipf::new(generator_config.keys as f64, generator_config.skew)?;
    let generator = GeneratorSource::new(generator_config, &config.schema);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in 0..count {
        out.write_all(&generator.event_bytes(i, 1_700_000_000_000, &zipf))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
