//! A new consumer catching up from `trim_horizon`, through the binary, against
//! the emulator: 8 shards of backlog (20,000 records, 25 ms of event time
//! apart, in order within every shard), then one record a day later on each
//! shard. No record is late by the documented rule, since every shard holds
//! the watermark from the moment `ListShards` returned it, whichever shard
//! the subscriptions happen to drain first. The run's `/metrics` also shows
//! where the records' time went (`shardflow_stage_seconds` per stage).

mod emulator;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

const SHARDS: u128 = 8;
const RECORDS: u64 = 20_000;
const DAY: u64 = 86_400_000;
const T0: u64 = 1_700_000_000_000;

fn body(key: &str, t: u64) -> Vec<u8> {
    format!(r#"{{"userId":"{key}","timestamp":{t},"amount":1.0}}"#).into_bytes()
}

/// The shard (of `SHARDS` even ranges, as CreateStream lays them out) that
/// Kinesis routes a partition key to.
fn shard_of(key: &str) -> u128 {
    let hash = u128::from_be_bytes(Md5::digest(key.as_bytes()).into());
    hash / (u128::MAX / SHARDS + 1)
}

fn config(dir: &Path, endpoint: &str) -> String {
    format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "1s"

[source]
type = "kinesis"
stream_name = "catchup"
consumer_name = "catchup-test"
starting_position = "trim_horizon"
endpoint_url = "{endpoint}"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64" }}

[watermark]
max_out_of_orderness = "1s"
allowed_lateness = "1m"

[[features]]
name = "count_1m"
agg = "count"
window = {{ type = "tumbling", size = "1m" }}

[[sinks]]
type = "file"
path = "{dir}/features.ndjson"
kinds = ["features"]

[[sinks]]
type = "file"
path = "{dir}/late.ndjson"
kinds = ["late", "dead_letter"]
"#,
        dir = dir.display()
    )
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

fn start(config: &Path, metrics: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shardflow"))
        .args(["run", "--config"])
        .arg(config)
        .args(["--metrics-addr", metrics, "--quiet"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shardflow did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_from_trim_horizon_marks_no_record_late() {
    let emu = emulator::Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "catchup", SHARDS as i32).await;

    // 20,000 records in event-time order: put in that order, each shard's
    // share stays in order too.
    let backlog: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| {
            let key = format!("user{}", i % 1_000);
            let t = T0 + i * 25;
            let b = body(&key, t);
            (key, b)
        })
        .collect();
    emulator::put(&client, "catchup", backlog).await;
    // Then one record a day later on each shard.
    let mut later = Vec::new();
    for shard in 0..SHARDS {
        let key = (0..)
            .map(|n| format!("later{n}"))
            .find(|k| shard_of(k) == shard)
            .unwrap();
        let b = body(&key, T0 + RECORDS * 25 + DAY);
        later.push((key, b));
    }
    emulator::put(&client, "catchup", later).await;
    let total = RECORDS as usize + SHARDS as usize;

    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("catchup.toml");
    std::fs::write(&config_path, config(dir.path(), &emu.url())).unwrap();
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut child = start(&config_path, &metrics);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let seen = count_lines(&dir.path().join("features.ndjson"))
            + count_lines(&dir.path().join("late.ndjson"));
        if seen >= total {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("shardflow exited early: {status}");
        }
        if Instant::now() > deadline {
            stop(child);
            panic!("{seen} of {total} records came out within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = scrape(&metrics).expect("the metrics endpoint answers");
    stop(child);

    // Where the records' time went, stage by stage (one sample per batch).
    for stage in ["source", "decode", "engine", "sink"] {
        let count = page
            .lines()
            .find(|l| {
                l.starts_with("shardflow_stage_seconds_count")
                    && l.contains(&format!("stage=\"{stage}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(
            count > 0.0,
            "no shardflow_stage_seconds sample for {stage}:\n{page}"
        );
    }
    assert!(page.contains("shardflow_stage_seconds_bucket{stage=\"engine\",le=\"0.001\"}"));

    let late = count_lines(&dir.path().join("late.ndjson"));
    let features = count_lines(&dir.path().join("features.ndjson"));
    assert_eq!(late, 0, "{late} of {total} records came out late");
    assert_eq!(features, total);
}

/// `GET /metrics`, or `None` when nothing answers.
fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body.split_once("\r\n\r\n")?.1.to_owned())
}
