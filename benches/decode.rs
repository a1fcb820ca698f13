//! Decoder throughput: generator events through `[schema]` decoding.

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardflow::config::Config;
use shardflow::decode::Decoder;
use shardflow::record::{Position, RawRecord};
use shardflow::source::generator::demo_events;

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
    let partition: Arc<str> = Arc::from("p");
    let records: Vec<RawRecord> = demo_events(0..10_000, 1_700_000_000_000)
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| RawRecord {
            position: Position::new(partition.clone(), i.to_string()),
            arrival: 0,
            bytes: Bytes::from(bytes),
            replay_watermark: None,
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
