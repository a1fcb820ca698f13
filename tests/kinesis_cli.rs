//! Runs the binary as a user does: `config/kinesis.toml` as shipped, against
//! the emulator on 127.0.0.1 (KINESIS_ENDPOINT, as the README documents);
//! SIGTERM, then a second run resumes after the last checkpoint.

mod emulator;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn start(dir: &Path, endpoint: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shardflow"))
        .current_dir(dir)
        .args([
            "run",
            "--config",
            "config/kinesis.toml",
            "--metrics-addr",
            "off",
        ])
        .env("KINESIS_ENDPOINT", endpoint)
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

async fn sigterm_and_wait(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shardflow did not stop within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn predictions(dir: &Path) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for v in emulator::lines(&dir.join("out/kinesis-predictions.ndjson")) {
        *ids.entry(v["id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    ids
}

async fn wait_predictions(dir: &Path, n: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while predictions(dir).len() < n {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("shardflow exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} predictions",
            predictions(dir).len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn events(range: std::ops::Range<u64>) -> Vec<(String, Vec<u8>)> {
    let now = shardflow::time::now_millis() as u64;
    range
        .map(|i| {
            let key = format!("user{}", i % 17);
            let body = format!(
                r#"{{"userId":"{key}","timestamp":{},"amount":{}.5,"merchant":"m{}"}}"#,
                now + i,
                i % 100,
                i % 5
            );
            (key, body.into_bytes())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_config_runs_against_the_emulator_and_resumes_after_sigterm() {
    let emu = emulator::Emulator::start(emulator::options()).await;
    let client = emu.client().await;
    emulator::create_stream(&client, "RealtimeEvents", 2).await;
    emulator::create_stream(&client, "RealtimeFeatures", 1).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config/models")).unwrap();
    std::fs::copy(
        repo("config/kinesis.toml"),
        dir.path().join("config/kinesis.toml"),
    )
    .unwrap();
    std::fs::copy(
        repo("config/models/fraud.toml"),
        dir.path().join("config/models/fraud.toml"),
    )
    .unwrap();

    emulator::put(&client, "RealtimeEvents", events(0..500)).await;
    let mut run = start(dir.path(), &emu.url());
    wait_predictions(dir.path(), 500, &mut run).await;
    sigterm_and_wait(run).await;

    emulator::put(&client, "RealtimeEvents", events(500..800)).await;
    let mut run = start(dir.path(), &emu.url());
    wait_predictions(dir.path(), 800, &mut run).await;
    sigterm_and_wait(run).await;

    let ids = predictions(dir.path());
    assert_eq!(ids.len(), 800);
    // SIGTERM commits a final checkpoint: the second run starts right after
    // the last sequence number of each shard, so nothing is scored twice.
    let twice: Vec<_> = ids.iter().filter(|(_, &c)| c > 1).collect();
    assert!(twice.is_empty(), "produced again: {twice:?}");
}
