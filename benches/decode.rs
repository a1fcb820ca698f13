//! Decoder throughput: generator events through `[schema]` decoding.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand_distr::Zipf;
use shardflow::config::{Config, GeneratorConfig};
use shardflow::decode::Decoder;
use shardflow::record::{Position, RawRecord};
use shardflow::source::generator::GeneratorSource;

fn decode(c: &mut Criterion) {
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
        std::path::Path::new("<bench>"),
        |_| None,
    )
    .expect("bench config parses");
    let generator_config = GeneratorConfig::default();
    let zipf = Zipf::new(generator_config.keys as f64, generator_config.skew).expect("valid zipf");
    let generator = GeneratorSource::new(generator_config, &config.schema);
    let partition: Arc<str> = Arc::from("p");
    let records: Vec<RawRecord> = (0..10_000)
        .map(|i| RawRecord {
            position: Position::new(partition.clone(), i.to_string()),
            arrival: 0,
            bytes: Bytes::from(generator.event_bytes(i, 1_700_000_000_000, &zipf)),
        })
        .collect();
    let decoder = Decoder::new(&config.schema);
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.sample_size(20);
    group.bench_function("generator_events", |b| {
        b.iter(|| {
            let mut ok = 0;
            for r in &records {
                ok += decoder.decode(r.clone()).is_ok() as usize;
            }
            ok
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
