//! Writes synthetic events as NDJSON, for the file source or for a producer:
//!
//! ```sh
//! cargo run --example generate_events -- 100000 > events.ndjson
//! ```
//!
//! The events are the generator source's defaults (seed 42, 1000 keys,
//! Zipf 1.0, 2 s out-of-orderness, 1000 events per simulated second) with
//! fields `amount` and `merchant`, so a file run and a generator run with the
//! same schema see the same data.

use std::io::Write as _;

use shardflow::source::generator::demo_events;

fn main() -> anyhow::Result<()> {
    let count: u64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(10_000);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // In chunks, so a large count does not sit in memory.
    let mut written = 0;
    while written < count {
        let n = (count - written).min(100_000);
        for event in demo_events(written..written + n, 1_700_000_000_000) {
            out.write_all(&event)?;
            out.write_all(b"\n")?;
        }
        written += n;
    }
    out.flush()?;
    Ok(())
}
