//! `[source] type = "generator"`: synthetic events, no network, no files.
//!
//! Event `i` is a pure function of the seed and `i` (each event draws from its
//! own ChaCha stream), so a run is reproducible and a restart continues the
//! very same sequence after the last checkpointed index. Event time follows a
//! simulated clock that advances `1000 / rate` ms per event, minus a random
//! lag of up to `out_of_orderness`; keys follow a Zipf law over `keys` users.
//! Records carry the `[schema]` key and timestamp names and a value for each
//! schema field, by type.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Zipf};

use super::{Source, SourceContext};
use crate::config::{FieldSpec, FieldType, GeneratorConfig, SchemaConfig};
use crate::flow::BoxFuture;
use crate::record::{PartitionStatus, Position, RawRecord};
use crate::time::{now_millis, Millis};

/// Event-time clock rate when `rate = 0` (unthrottled): 10 k events per simulated second.
const UNTHROTTLED_CLOCK_RATE: f64 = 10_000.0;

pub struct GeneratorSource {
    config: GeneratorConfig,
    key_field: String,
    time_field: String,
    fields: Vec<(String, FieldSpec)>,
}

impl GeneratorSource {
    pub fn new(config: GeneratorConfig, schema: &SchemaConfig) -> Self {
        GeneratorSource {
            config,
            key_field: json_string(&schema.key),
            time_field: json_string(&schema.timestamp),
            fields: schema
                .fields
                .iter()
                .map(|(n, s)| (json_string(n), *s))
                .collect(),
        }
    }

    fn partition_names(&self) -> Vec<Arc<str>> {
        (0..self.config.partitions)
            .map(|p| Arc::from(format!("generator-{p}")))
            .collect()
    }

    /// The bytes of event `index`, deterministic for the seed.
    pub fn event_bytes(&self, index: u64, start_time: Millis, zipf: &Zipf<f64>) -> Vec<u8> {
        let c = &self.config;
        let mut rng = ChaCha8Rng::seed_from_u64(c.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let clock_rate = if c.rate > 0.0 {
            c.rate
        } else {
            UNTHROTTLED_CLOCK_RATE
        };
        let clock = start_time + (index as f64 * 1000.0 / clock_rate) as i64;
        let ooo = c.out_of_orderness.millis().max(0);
        let mut event_time = clock - rng.random_range(0..=ooo);
        if c.late_fraction > 0.0 && rng.random_bool(c.late_fraction) {
            event_time -= 2 * ooo + rng.random_range(60_000..600_000);
        }
        let key = zipf.sample(&mut rng) as u64;
        if c.bad_fraction > 0.0 && rng.random_bool(c.bad_fraction) {
            return self.bad_record(rng.random_range(0..5), key, event_time);
        }
        let mut out = format!(
            "{{{}:\"u{key}\",{}:{event_time}",
            self.key_field, self.time_field
        );
        for (name, spec) in &self.fields {
            out.push(',');
            out.push_str(name);
            out.push(':');
            match spec.ty {
                FieldType::F64 => {
                    // Log-normal-ish amounts in cents, heavier for a few keys.
                    let base = (rng.random::<f64>() * 4.0).exp() * (1.0 + (key % 7) as f64);
                    out.push_str(&format!("{:.2}", base));
                }
                FieldType::I64 => out.push_str(&rng.random_range(0..1000).to_string()),
                FieldType::String => out.push_str(&format!("\"m{}\"", rng.random_range(0..50))),
                FieldType::Bool => out.push_str(if rng.random_bool(0.05) {
                    "true"
                } else {
                    "false"
                }),
            }
        }
        out.push('}');
        out.into_bytes()
    }

    fn bad_record(&self, kind: u32, key: u64, event_time: Millis) -> Vec<u8> {
        match kind {
            0 => format!(
                "{{{}:\"u{key}\",{}:{event_time}",
                self.key_field, self.time_field
            ),
            1 => format!("{{{}:{event_time}}}", self.time_field),
            2 => format!(
                "{{{}:\"u{key}\",{}:\"not a time\"}}",
                self.key_field, self.time_field
            ),
            3 => format!("{{{}:\"u{key}\",{}:-1}}", self.key_field, self.time_field),
            _ => "not json at all".to_string(),
        }
        .into_bytes()
    }
}

/// Events `indices` of the default generator over the demo schema (`userId`,
/// `timestamp`, `amount: f64`, `merchant: string`), starting at `start_time`:
/// what examples and benchmarks feed through the pipeline.
pub fn demo_events(indices: std::ops::Range<u64>, start_time: Millis) -> Vec<Vec<u8>> {
    let config = GeneratorConfig::default();
    let Ok(zipf) = Zipf::new(config.keys as f64, config.skew) else {
        return Vec::new();
    };
    let schema = SchemaConfig {
        key: "userId".into(),
        timestamp: "timestamp".into(),
        fields: [
            (
                "amount".to_string(),
                FieldSpec {
                    ty: FieldType::F64,
                    optional: false,
                },
            ),
            (
                "merchant".to_string(),
                FieldSpec {
                    ty: FieldType::String,
                    optional: false,
                },
            ),
        ]
        .into_iter()
        .collect(),
        request_fields: Vec::new(),
        max_record_bytes: 1 << 20,
        min_event_time: 0,
        max_event_time: i64::MAX,
    };
    let generator = GeneratorSource::new(config, &schema);
    indices
        .map(|i| generator.event_bytes(i, start_time, &zipf))
        .collect()
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl Source for GeneratorSource {
    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "generator: {} keys (zipf {}), {} partitions, {}, seed {}{}",
            c.keys,
            c.skew,
            c.partitions,
            if c.rate > 0.0 {
                format!("{} events/s", c.rate)
            } else {
                "unthrottled".into()
            },
            c.seed,
            c.count
                .map(|n| format!(", {n} events then end"))
                .unwrap_or_default()
        )
    }

    fn run(self: Box<Self>, mut ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move {
            let c = self.config.clone();
            let partitions = self.partition_names();
            let zipf = Zipf::new(c.keys as f64, c.skew)
                .map_err(|e| anyhow::anyhow!("generator: invalid key distribution: {e}"))?;
            let start_time = c.start_time.unwrap_or_else(now_millis);
            let first = partitions
                .iter()
                .filter_map(|p| ctx.resume_position(p))
                .filter_map(|pos| pos.sequence.parse::<u64>().ok())
                .max()
                .map_or(0, |last| last + 1);
            if first > 0 {
                tracing::info!(
                    next_index = first,
                    "generator resuming after the last checkpoint"
                );
            }
            // Every partition holds the watermark before its first record.
            for status in [PartitionStatus::Known, PartitionStatus::Reading] {
                if !ctx.partitions(partitions.clone(), status).await {
                    return Ok(());
                }
            }
            let started = Instant::now();
            let mut index = first;
            loop {
                if ctx.is_shutting_down() {
                    ctx.end(false).await;
                    return Ok(());
                }
                if c.count.is_some_and(|n| index >= n) {
                    ctx.end(true).await;
                    return Ok(());
                }
                let mut n = ctx.batch_size as u64;
                if let Some(total) = c.count {
                    n = n.min(total - index);
                }
                if c.rate > 0.0 {
                    let due = (started.elapsed().as_secs_f64() * c.rate) as u64 + 1;
                    let emitted = index - first;
                    if due <= emitted {
                        let wait = (emitted + 1) as f64 / c.rate - started.elapsed().as_secs_f64();
                        let wait = std::time::Duration::from_secs_f64(wait.clamp(0.001, 1.0));
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = ctx.shutdown.changed() => {}
                        }
                        continue;
                    }
                    n = n.min(due - emitted);
                }
                let arrival = now_millis();
                let batch: Vec<RawRecord> = (index..index + n)
                    .map(|i| RawRecord {
                        position: Position::new(
                            partitions[(i % u64::from(c.partitions)) as usize].clone(),
                            itoa::Buffer::new().format(i),
                        ),
                        arrival,
                        bytes: Bytes::from(self.event_bytes(i, start_time, &zipf)),
                        replay_watermark: None,
                    })
                    .collect();
                index += n;
                if !ctx.send(batch).await {
                    return Ok(());
                }
            }
        })
    }
}
