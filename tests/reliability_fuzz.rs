//! Hostile input, property-based: the record decoder and KPL deaggregation
//! fed arbitrary bytes and mutated, oversized, deeply nested, out-of-range and
//! duplicate-keyed records. Neither may panic; every refusal carries a reason;
//! what is accepted agrees with an independent JSON parse; and no input makes
//! them allocate more than a small multiple of its own size (a counting
//! global allocator, per thread, measures the peak of each call).
//!
//! `make test` runs `SHARDFLOW_FUZZ_CASES` (default 256) cases per property;
//! `make soak` runs many more. A failure prints the minimal input and
//! proptest stores it in `reliability_fuzz.proptest-regressions`.
//!
//! The end-to-end test puts a corpus of hostile records and aggregates into
//! the Kinesis emulator and checks the pipeline dead-letters each bad one
//! with its reason and keeps consuming.

mod emulator;
mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use md5::{Digest as _, Md5};
use proptest::prelude::*;
use shardflow::decode::Decoder;
use shardflow::record::{FieldValue, Position, RawRecord};
use shardflow::source::kinesis::deagg::{aggregate, deaggregate, Deaggregated, MAGIC};

// ---------------------------------------------------------------------------
// Allocation accounting: bytes live on this thread now and their peak.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // try_with: thread-local storage may be gone while a thread exits.
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it had allocated at once.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(|p| p.get()) - base;
    (out, peak.max(0) as usize)
}

/// What any one call may allocate: a few times its input, plus a constant.
fn alloc_bound(input: usize) -> usize {
    4 * input + (64 << 10)
}

fn cases() -> u32 {
    harness::knob("SHARDFLOW_FUZZ_CASES", 256) as u32
}

// ---------------------------------------------------------------------------
// The decoder.

const MIN_T: i64 = 946_684_800_000; // 2000-01-01
const MAX_T: i64 = 7_258_118_400_000; // 2200-01-01
const MAX_BYTES: usize = 1 << 20;

fn decoder() -> Decoder {
    let text = r#"
[source]
type = "generator"
[schema]
key = "userId"
timestamp = "ts"
fields = { amount = "f64", merchant = "string?", n = "i64?", ok = "bool?" }
[[sinks]]
type = "stdout"
kinds = ["features"]
"#;
    let config =
        shardflow::config::Config::from_str_at(text, Path::new("fuzz.toml"), |_| None).unwrap();
    assert_eq!(config.schema.max_record_bytes, MAX_BYTES);
    Decoder::new(&config.schema)
}

/// Decodes and checks the invariants every outcome must satisfy.
fn check_decode(d: &Decoder, bytes: &[u8]) -> Result<(), String> {
    let raw = RawRecord {
        position: Position::new(Arc::from("fuzz"), "1"),
        arrival: 0,
        bytes: Bytes::copy_from_slice(bytes),
        replay_watermark: None,
    };
    let (result, peak) = peak_alloc(|| d.decode(raw));
    assert!(
        peak <= alloc_bound(bytes.len()),
        "decoding {} bytes allocated {peak} bytes at once",
        bytes.len()
    );
    match result {
        Ok(e) => {
            assert!(!e.key.is_empty());
            assert!((MIN_T..=MAX_T).contains(&e.event_time), "{}", e.event_time);
            assert!(bytes.len() <= MAX_BYTES);
            for f in e.fields.iter().flatten() {
                if let FieldValue::F64(x) = f {
                    assert!(x.is_finite(), "a non-finite field was accepted");
                }
            }
            assert!(
                matches!(e.fields[0], Some(FieldValue::F64(_))),
                "amount is required"
            );
            // An independent parse agrees (where it can: serde_json's tree
            // parser stops at 128 levels, which the decoder need not).
            let tree = serde_json::from_slice::<serde_json::Value>(bytes);
            if let Ok(v) = tree {
                let key = &v["userId"];
                let want = key
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| key.as_i64().map(|n| n.to_string()))
                    .or_else(|| key.as_u64().map(|n| n.to_string()));
                assert_eq!(want.as_deref(), Some(&*e.key), "key of {v}");
                if let Some(t) = v["ts"].as_i64() {
                    assert_eq!(t, e.event_time);
                }
                if let (Some(a), Some(FieldValue::F64(got))) = (v["amount"].as_f64(), &e.fields[0])
                {
                    assert_eq!(a, *got);
                }
            } else if let Err(e) = tree {
                // Two refusals of the tree parser are not JSON errors: its
                // nesting limit, and a number beyond f64 (`1e999`), which
                // RFC 8259 allows and leaves to implementations. The decoder
                // checks the syntax of fields it skips but never reads their
                // numbers (a used field out of range is refused, see
                // `decode.rs`), so it may accept both.
                let depth = bytes.iter().filter(|&&b| b == b'[' || b == b'{').count();
                assert!(
                    depth > 100 || e.to_string().starts_with("number out of range"),
                    "accepted what serde_json refuses ({e}): {:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
            Ok(())
        }
        Err(dead) => {
            assert!(
                !dead.reason.trim().is_empty(),
                "a dead letter without a reason"
            );
            assert!(
                dead.reason.len() < 4096,
                "reason of {} bytes",
                dead.reason.len()
            );
            assert_eq!(&dead.raw[..], bytes, "the dead letter keeps the raw bytes");
            Err(dead.reason)
        }
    }
}

/// A JSON scalar or structure chosen to hurt: escapes, lone surrogates,
/// extreme numbers, deep nesting.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("\"\"".to_string()),
        Just("\"\\u0000\\n\\\"\\\\\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("\"NaN\"".to_string()),
        Just("NaN".to_string()),
        Just("Infinity".to_string()),
        Just("1e999".to_string()),
        Just("-1e999".to_string()),
        Just("1.7976931348623157e308".to_string()),
        Just("-0".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-9223372036854775809".to_string()),
        Just(i64::MAX.to_string()),
        Just(i64::MIN.to_string()),
        Just(u64::MAX.to_string()),
        Just("\"+275760-09-13T00:00:00Z\"".to_string()),
        Just("\"-292277026596-12-04T15:30:07Z\"".to_string()),
        Just("\"2023-11-14T22:13:20.999999999+23:59\"".to_string()),
        Just("\"9223372036854775807\"".to_string()),
        Just("\" 1700000000000 \"".to_string()),
        (MIN_T..MAX_T).prop_map(|t| t.to_string()),
        any::<i64>().prop_map(|t| t.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        "[a-zA-Z0-9 ]{0,12}".prop_map(|s| format!("\"{s}\"")),
        (1usize..3000).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
        (1usize..3000).prop_map(|d| "{\"a\":".repeat(d) + "1" + &"}".repeat(d)),
        (1usize..3000).prop_map(|d| "[".repeat(d)),
    ]
}

/// An object made of schema and foreign fields (possibly repeated), with
/// hostile or plausible values.
fn hostile_record() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just("userId"),
        Just("ts"),
        Just("amount"),
        Just("merchant"),
        Just("n"),
        Just("ok"),
        Just("extra"),
        Just("user\\u0049d"),
    ];
    let good = prop_oneof![
        Just("\"u1\"".to_string()),
        (MIN_T..MAX_T).prop_map(|t| t.to_string()),
        (-1e6f64..1e6).prop_map(|f| format!("{f}")),
        Just("\"m1\"".to_string()),
        Just("false".to_string()),
    ];
    let value = prop_oneof![2 => good, 1 => hostile_value()];
    proptest::collection::vec((name, value), 0..8).prop_map(|fields| {
        let body: Vec<String> = fields
            .into_iter()
            .map(|(n, v)| format!("\"{n}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(",")).into_bytes()
    })
}

/// A valid record and what it must decode to.
fn valid_record() -> impl Strategy<Value = (Vec<u8>, String, i64, f64, Option<i64>)> {
    (
        "[a-zA-Z0-9_\\-]{1,20}",
        MIN_T..MAX_T,
        -1e12f64..1e12,
        proptest::option::of(any::<i64>()),
        "[a-z]{0,3}",
    )
        .prop_map(|(key, t, amount, n, pad)| {
            let mut fields = vec![
                format!("\"userId\":{}", serde_json::to_string(&key).unwrap()),
                format!("\"ts\":{t}"),
                format!("\"amount\":{amount:?}"),
                format!("\"ignored_{pad}\":{{\"x\":[1,{{\"y\":null}}]}}"),
            ];
            if let Some(n) = n {
                fields.push(format!("\"n\":{n}"));
            }
            let text = format!("{{{}}}", fields.join(","));
            (text.into_bytes(), key, t, amount, n)
        })
}

/// Damages bytes: truncation, an inserted byte, a flipped byte, invalid UTF-8.
fn mutate(bytes: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = bytes.len().max(1);
    (0..4u8, 0..len, any::<u8>()).prop_map(move |(how, at, b)| {
        let mut v = bytes.clone();
        let at = at.min(v.len());
        match how {
            0 => v.truncate(at),
            1 => v.insert(at, b),
            2 if at < v.len() => v[at] ^= b | 1,
            _ => v.insert(at, 0xFF),
        }
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = check_decode(&decoder(), &bytes);
    }

    #[test]
    fn decoder_survives_hostile_records(record in hostile_record()) {
        let _ = check_decode(&decoder(), &record);
    }

    #[test]
    fn decoder_survives_damaged_records(record in valid_record().prop_flat_map(|(b, ..)| mutate(b))) {
        let _ = check_decode(&decoder(), &record);
    }

    #[test]
    fn valid_records_decode_exactly((bytes, key, t, amount, n) in valid_record()) {
        let d = decoder();
        check_decode(&d, &bytes).unwrap();
        let (k, time, fields) = d.decode_parts(&bytes).unwrap();
        prop_assert_eq!(&*k, key.as_str());
        prop_assert_eq!(time, t);
        prop_assert_eq!(fields[0].clone(), Some(FieldValue::F64(amount)));
        prop_assert_eq!(fields[2].clone(), n.map(FieldValue::I64));
    }
}

#[test]
fn each_kind_of_hostile_record_is_refused_with_its_reason() {
    let d = decoder();
    let pad = |n: usize| {
        let head = r#"{"userId":"u","ts":1700000000000,"amount":1,"pad":""#;
        let tail = "\"}";
        format!("{head}{}{tail}", "x".repeat(n - head.len() - tail.len())).into_bytes()
    };
    let deep = |n: usize| {
        format!(
            r#"{{"userId":"u","ts":1700000000000,"amount":{}}}"#,
            "[".repeat(n)
        )
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"userId\":\"u\",\"ts\":17".to_vec(), "malformed JSON"),
        (b"not json at all".to_vec(), "malformed JSON"),
        (deep(100_000).into_bytes(), "malformed JSON"),
        (pad(MAX_BYTES + 1), "over max_record_bytes"),
        (
            br#"{"userId":"u","ts":9223372036854775807,"amount":1}"#.to_vec(),
            "outside the accepted range",
        ),
        (
            br#"{"userId":"u","ts":-1700000000000,"amount":1}"#.to_vec(),
            "outside the accepted range",
        ),
        (
            br#"{"userId":"u","ts":18446744073709551615,"amount":1}"#.to_vec(),
            "out of range",
        ),
        (
            br#"{"userId":"u","ts":1e300,"amount":1}"#.to_vec(),
            "not a finite number of milliseconds",
        ),
        (
            br#"{"userId":"u","ts":1700000000000,"amount":NaN}"#.to_vec(),
            "malformed JSON",
        ),
        (
            br#"{"userId":"u","ts":1700000000000,"amount":"NaN"}"#.to_vec(),
            "must be f64",
        ),
        (
            br#"{"userId":"u","ts":1700000000000,"amount":1e400}"#.to_vec(),
            "malformed JSON",
        ),
        (
            b"{\"userId\":\"u\xc3\x28\",\"ts\":1700000000000,\"amount\":1}".to_vec(),
            "invalid UTF-8",
        ),
        (
            br#"{"userId":"u","ts":1700000000000,"amount":1,"amount":2}"#.to_vec(),
            "duplicate field amount",
        ),
        (
            br#"{"userId":"u","ts":1,"ts":1700000000000,"amount":1}"#.to_vec(),
            "duplicate field ts",
        ),
        (
            br#"{"userId":"u","ts":"+275760-09-13T00:00:00Z","amount":1}"#.to_vec(),
            "ts",
        ),
    ];
    for (bytes, want) in cases {
        let reason = check_decode(&d, &bytes).expect_err("refused");
        assert!(
            reason.contains(want),
            "{:.80}: {reason:?} lacks {want:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
    // 1 MiB exactly is accepted, and deep nesting in a field nobody reads is skipped.
    check_decode(&d, &pad(MAX_BYTES)).unwrap();
    let deep_ignored = format!(
        r#"{{"userId":"u","ts":1700000000000,"amount":1,"x":{}1{}}}"#,
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    check_decode(&d, deep_ignored.as_bytes()).unwrap();
}

// ---------------------------------------------------------------------------
// KPL deaggregation.

/// Wraps a protobuf body as an aggregate with a correct checksum, so the
/// parser (not the MD5 check) meets whatever the body holds.
fn with_checksum(body: &[u8]) -> Bytes {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(body);
    out.extend_from_slice(&Md5::digest(body));
    Bytes::from(out)
}

fn check_deagg(data: &Bytes) -> Deaggregated {
    let (result, peak) = peak_alloc(|| deaggregate(data));
    // Each user record is a slice of `data` (a Bytes handle, 32 bytes).
    assert!(
        peak <= alloc_bound(data.len()) + 16 * data.len(),
        "deaggregating {} bytes allocated {peak} bytes at once",
        data.len()
    );
    match &result {
        Deaggregated::Aggregate(records) => {
            assert!(!records.is_empty());
            let total: usize = records.iter().map(|r| r.len()).sum();
            assert!(
                total <= data.len(),
                "{total} bytes of records from {}",
                data.len()
            );
            assert!(records.len() <= data.len() / 2);
        }
        Deaggregated::Bad(reason) => assert!(!reason.is_empty()),
        Deaggregated::Single => assert!(data.len() < 4 || data[..4] != MAGIC),
    }
    result
}

/// A protobuf-shaped body: fields with arbitrary tags, wire types and
/// (possibly lying) lengths, some of them well-formed records.
fn protobuf_body() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        // A well-formed record holding `data`.
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|data| {
            let agg = aggregate("k", &[&data]);
            // Strip magic, the partition key table entry (3 bytes) and MD5.
            agg[4 + 3..agg.len() - 16].to_vec()
        }),
        // A tag with any wire type and a varint that may claim anything.
        (any::<u8>(), any::<u64>()).prop_map(|(tag, n)| {
            let mut v = vec![tag];
            let mut n = n;
            while n >= 0x80 {
                v.push((n as u8) | 0x80);
                n >>= 7;
            }
            v.push(n as u8);
            v
        }),
        proptest::collection::vec(any::<u8>(), 0..16),
    ];
    proptest::collection::vec(field, 0..12).prop_map(|fs| {
        let mut body = vec![0x0A, 0x01, b'k'];
        for f in fs {
            body.extend(f);
        }
        body
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn deagg_survives_arbitrary_bodies(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        check_deagg(&with_checksum(&body));
        let mut raw = MAGIC.to_vec();
        raw.extend(&body);
        check_deagg(&Bytes::from(raw));
    }

    #[test]
    fn deagg_survives_protobuf_shaped_bodies(body in protobuf_body()) {
        check_deagg(&with_checksum(&body));
    }

    #[test]
    fn aggregates_round_trip(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20)) {
        let refs: Vec<&[u8]> = records.iter().map(|r| r.as_slice()).collect();
        let data = Bytes::from(aggregate("pk", &refs));
        match check_deagg(&data) {
            Deaggregated::Aggregate(got) => {
                prop_assert_eq!(got.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), records.clone());
            }
            other => prop_assert!(false, "{:?}", other),
        }
        // Any damage to a real aggregate's bytes is caught by the checksum.
        let mut damaged = data.to_vec();
        let at = 4 + (records.len() * 7) % (damaged.len() - 4);
        damaged[at] ^= 0x40;
        prop_assert!(matches!(check_deagg(&Bytes::from(damaged)), Deaggregated::Bad(_)));
    }
}

#[test]
fn lying_lengths_in_an_aggregate_allocate_nothing_big() {
    // A record field claiming 2^62 bytes, a truncated varint, an 11-byte varint.
    let bodies: Vec<Vec<u8>> = vec![
        vec![0x1A, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40],
        vec![0x1A, 0xFF],
        vec![
            0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
        ],
        vec![0x1A, 0x02, 0x08, 0x07], // a record with key index 7 and no table
        vec![0x0B],                   // wire type 3 (groups): unsupported
    ];
    for body in bodies {
        match check_deagg(&with_checksum(&body)) {
            Deaggregated::Bad(reason) => assert!(reason.starts_with("KPL aggregate"), "{reason}"),
            Deaggregated::Aggregate(r) => panic!("{body:?} gave {} records", r.len()),
            Deaggregated::Single => panic!("{body:?} not seen as an aggregate"),
        }
    }
}

// ---------------------------------------------------------------------------
// End to end: hostile records through the Kinesis emulator and the pipeline.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_through_kinesis_become_dead_letters_with_reasons() {
    let emu = emulator::Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "hostile", 1).await;

    let good = |n: u64| emulator::event_json(1, n);
    let big_good = {
        let head = r#"{"userId":"u2","timestamp":1700000000000,"n":0,"pad":""#;
        format!("{head}{}\"}}", "x".repeat((1 << 20) - head.len() - 2 - 64)).into_bytes()
    };
    let corpus: Vec<(Vec<u8>, Option<&str>)> = vec![
        (good(0), None),
        (b"{\"userId\":".to_vec(), Some("malformed JSON")),
        (
            format!("{{\"userId\":{}", "[".repeat(500_000)).into_bytes(),
            Some("malformed JSON"),
        ),
        (big_good, None),
        (vec![b'['; (1 << 20) - 64], Some("malformed JSON")),
        (
            br#"{"userId":"u1","timestamp":9223372036854775807,"n":1}"#.to_vec(),
            Some("outside the accepted range"),
        ),
        (
            br#"{"userId":"u1","timestamp":-1,"n":1}"#.to_vec(),
            Some("outside the accepted range"),
        ),
        (
            br#"{"userId":"u1","timestamp":1700000000000,"n":NaN}"#.to_vec(),
            Some("malformed JSON"),
        ),
        (
            b"{\"userId\":\"\xff\xfe\",\"timestamp\":1700000000000,\"n\":1}".to_vec(),
            Some("invalid UTF-8"),
        ),
        (
            br#"{"userId":"u1","userId":"u9","timestamp":1700000000000,"n":1}"#.to_vec(),
            Some("duplicate field userId"),
        ),
        // A KPL aggregate with a wrong checksum: handed on whole, dead-lettered.
        (
            {
                let mut a = aggregate("k", &[&good(1)[..], &good(2)[..]]);
                let last = a.len() - 1;
                a[last] ^= 1;
                a
            },
            Some("invalid UTF-8"),
        ),
        // A valid aggregate of one good and one bad record: split.
        (
            aggregate("k", &[&good(3)[..], b"{oops"]),
            Some("malformed JSON"),
        ),
        (good(4), None),
    ];
    let records: Vec<(String, Vec<u8>)> = corpus
        .iter()
        .map(|(b, _)| ("k".to_string(), b.clone()))
        .collect();
    emulator::put(&client, "hostile", records).await;

    let dir = tempfile::tempdir().unwrap();
    let run = emulator::Running::start(emulator::config(dir.path(), &emu.url(), "hostile", ""));
    // 4 good events (good(0), big_good, good(3) in the aggregate, good(4)).
    let expected_dead = corpus.iter().filter(|(_, r)| r.is_some()).count();
    emulator::wait_for_ids(&emulator::features_path(dir.path()), 4, 60).await;
    let summary = run.stop().await;
    let out = harness::ndjson(&emulator::features_path(dir.path()));
    let dead: Vec<&serde_json::Value> = out.iter().filter(|v| v["kind"] == "dead_letter").collect();
    assert_eq!(dead.len(), expected_dead, "{dead:#?}");
    let mut reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    for want in corpus.iter().filter_map(|(_, r)| *r) {
        let i = reasons
            .iter()
            .position(|r| r.contains(want))
            .unwrap_or_else(|| panic!("no dead letter says {want:?}: {reasons:?}"));
        reasons.remove(i);
    }
    assert_eq!(summary.dead_letters as usize, expected_dead);
    harness::report(&format!(
        "hostile input end to end: {} Kinesis records ({} user records after deaggregation), {} events, {} dead letters with reasons, 0 panics",
        corpus.len(),
        summary.records_in,
        out.iter().filter(|v| v["kind"] == "features").count(),
        dead.len()
    ));
}
